"""Time one SVI step of IWELBO against NumPyro's RenyiELBO(alpha=0) and a hand-written
JAX IWAE of the same network, side by side in one process.

Workloads:
  (a) the IWAE paper's VAEs, as examples/vae.py defines them: one stochastic layer
      (784-200-200-50 tanh encoder and decoder) and two (100 then 50 latents),
      Bernoulli likelihood, batch 20 and 100, K = 1, 5, 50, synthetic binary data;
  (b) Neal's funnel with a mean-field Normal guide, K = 1, 10, 100, 1000.

Every method runs the same number of steps per timed chunk; chunks of the three
methods are interleaved round by round (so drifts in machine speed hit all alike),
and the median seconds per step over rounds is reported with the ratios.
The machine's float32 matmul rate is measured in the same process.

Run:  python benchmarks/step_time.py            (writes benchmarks/results.json)
      python benchmarks/step_time.py --quick    (fewer rounds; a smoke run)
      python benchmarks/step_time.py --batches 20 100 1000 --funnel-ks \\
          --out benchmarks/results_gpu.json --marker step_time_gpu   (on a GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import platform
import statistics
import time
from unittest import mock

from examples_loader import load_example
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, RenyiELBO
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_iwae import IWELBO
from numpyro_iwae.core import draw as core_draw

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- machine rate


def matmul_gflops(n: int | None = None, repeats: int = 10, precision=None) -> float:
    """Measured float32 matrix-multiply rate, GFLOP/s (median of repeats), at JAX's
    default precision unless ``precision`` says otherwise (on a GPU the default may use
    TF32 matrix units; the networks timed here use the same default). ``n`` defaults to
    2048 on a CPU and 8192 on an accelerator (a size that fills it)."""
    if n is None:
        n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


# ---------------------------------------------------------------- the VAE


vae_example = load_example("vae")
PIXELS = vae_example.PIXELS


def _normal_log_prob(z, loc, log_scale):
    return jnp.sum(
        -0.5 * ((z - loc) / jnp.exp(log_scale)) ** 2 - log_scale - 0.5 * math.log(2 * math.pi),
        axis=-1,
    )


def hand_vae_loss(arch, nets, params, key, x, k):
    """-(IWAE bound) of the L-layer VAE, written directly in JAX: the reference.

    The networks are ``nets`` (examples/vae.py's, in the library being timed), called
    with ``params`` as ``SVI.get_params`` holds them. Every network sees a 2-d matrix
    (all K x B particles at once), which is faster than a 3-d input to ``stax.Dense``.
    """
    depth = len(arch.latents)

    def apply(name, h):
        out = vae_example.apply_network(nets, params, name, h.reshape(-1, h.shape[-1]))
        return out.reshape(h.shape[:-1] + out.shape[-1:])

    log_q = log_p = 0.0
    zs, h = [], x
    for i in range(depth):  # the guide, upwards; x is shared by all particles
        loc, log_scale = jnp.split(apply(f"encoder{i}", h), 2, axis=-1)
        key, sub = jax.random.split(key)
        eps = jax.random.normal(sub, (k,) + x.shape[:1] + loc.shape[-1:])
        h = loc + jnp.exp(log_scale) * eps
        log_q = log_q + _normal_log_prob(h, loc, log_scale)
        zs.append(h)
    log_p = _normal_log_prob(zs[-1], 0.0, 0.0)
    for i in reversed(range(1, depth)):  # the model, downwards
        loc, log_scale = jnp.split(apply(f"decoder{i}", zs[i]), 2, axis=-1)
        log_p = log_p + _normal_log_prob(zs[i - 1], loc, log_scale)
    logits = apply("decoder0", zs[0])
    log_p = log_p + jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)
    return -jnp.sum(jax.nn.logsumexp(log_p - log_q, axis=0) - math.log(k))


def vae_flops(arch, batch: int, k: int) -> float:
    """Matmul FLOPs of one step: forward plus backward (2x forward) passes. The first
    encoder runs once per image, every other network once per particle."""
    total = 0
    for name, net in vae_example.networks(arch, "stax").items():
        width = arch.hidden[int(name[-1])]
        macs = net.size_in * width + width * width + width * net.size_out
        total += (batch if name == "encoder0" else k * batch) * macs
    return 3 * 2 * total


# ---------------------------------------------------------------- the funnel


def funnel():
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", 9):
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))


def _funnel_iwae_loss(params, eps, k):
    """-(IWAE bound) of the funnel under a mean-field Normal guide (as AutoNormal),
    given the standard-normal noise ``eps`` of shape (K, 10)."""
    loc, scale = params["loc"], jax.nn.softplus(params["raw_scale"])
    z = loc + scale * eps
    v, x = z[:, 0], z[:, 1:]
    log_p = jax.scipy.stats.norm.logpdf(v, 0.0, 3.0) + jnp.sum(
        jax.scipy.stats.norm.logpdf(x, 0.0, jnp.exp(v / 2)[:, None]), axis=-1
    )
    log_q = jnp.sum(jax.scipy.stats.norm.logpdf(z, loc, scale), axis=-1)
    return -(jax.nn.logsumexp(log_p - log_q) - math.log(k))


def hand_funnel_loss(params, key, k):
    """The hand-written funnel IWAE: all K x 10 normals from one key."""
    return _funnel_iwae_loss(params, jax.random.normal(key, (k, 10)), k)


def hand_funnel_numpyro_keys_loss(params, key, k):
    """The same loss drawing its noise as NumPyro's seed handler does: a (model,
    guide) key pair per particle, then one key split per site. The gap between this
    and ``hand_funnel_loss`` is the cost of that key handling."""

    def noise(pair):
        key = pair[1]
        key, k_v = jax.random.split(key)
        _, k_x = jax.random.split(key)
        return jnp.concatenate([jax.random.normal(k_v, (1,)), jax.random.normal(k_x, (9,))])

    return _funnel_iwae_loss(params, jax.vmap(noise)(jax.random.split(key, (k, 2))), k)


# ---------------------------------------------------------------- steppers


class Stepper:
    """A step function and its state; ``run(n)`` takes n steps and blocks.

    The n steps run inside one jitted ``lax.scan`` (as ``SVI.run`` does without a
    progress bar), so the time is the step's computation, not Python dispatch.
    """

    def __init__(self, step, state):
        # Strong dtypes from the start (as SVI.init does): a weakly typed leaf turns
        # strong after one step, which would recompile the chunk inside timed rounds.
        self.state = jax.tree.map(
            lambda x: (
                jax.lax.convert_element_type(x, jnp.result_type(x))
                if jnp.issubdtype(jnp.result_type(x), jnp.number)
                else x
            ),
            state,
        )
        self._chunks = {}
        self._step = step

    def _chunk(self, n: int):
        if n not in self._chunks:

            def chunk(state):
                return jax.lax.scan(lambda s, _: self._step(s), state, None, length=n)

            self._chunks[n] = jax.jit(chunk)
        return self._chunks[n]

    def run(self, n: int) -> None:
        self.state, losses = self._chunk(n)(self.state)
        jax.block_until_ready(losses)


def svi_stepper(model, guide, elbo, *args):
    svi = SVI(model, guide, optax.adam(1e-3), elbo)
    state = svi.init(jax.random.key(0), *args)
    return Stepper(lambda s: svi.update(s, *args), state)


def hand_stepper(loss_fn, params, *args):
    opt = optax.adam(1e-3)

    def step(carry):
        params, opt_state, key = carry
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, sub, *args)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), loss

    return Stepper(step, (params, opt.init(params), jax.random.key(0)))


def time_interleaved(steppers: dict[str, Stepper], rounds: int, target_s: float) -> dict:
    """Median seconds per step for each stepper, chunks interleaved by round."""
    probe = next(iter(steppers.values()))
    probe.run(4)  # compile
    t0 = time.perf_counter()
    probe.run(4)
    per = (time.perf_counter() - t0) / 4
    n = max(1, int(target_s / max(per, 1e-7)))
    for s in steppers.values():  # compile the timed chunk length and warm up
        s.run(n)
    samples = {name: [] for name in steppers}
    names = list(steppers)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steppers[name].run(n)
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def without_guard(stepper: Stepper) -> Stepper:
    """``stepper`` with IWELBO's zero-weight guard replaced by the identity while its
    step is traced: the ablation that prices the guard (unsafe for real use)."""
    step = stepper._step

    def unguarded(state):
        with mock.patch.object(core_draw, "zero_weight_safe", lambda fn, *_, **__: fn):
            return step(state)

    stepper._step = unguarded
    return stepper


def without_conditional(stepper: Stepper) -> Stepper:
    """``stepper`` with every ``lax.cond`` traced in its step replaced by its true
    branch, NaN where the predicate is false: the guard's test stays, its conditional
    and its second backward pass go. Prices the conditional alone (unsafe for real
    use; the guard takes the true branch when no particle is dead)."""
    step = stepper._step

    def select(pred, true_fn, false_fn, *operands):
        out = true_fn(*operands)
        return jax.tree.map(lambda a: jnp.where(pred, a, jnp.nan), out)

    def unconditional(state):
        with mock.patch.object(jax.lax, "cond", select):
            return step(state)

    stepper._step = unconditional
    return stepper


def with_select(stepper: Stepper) -> Stepper:
    """``stepper`` with every ``lax.cond`` traced in its step computing both branches
    and selecting (``jnp.where``): the guard's exact answer without a conditional, so
    without a host round trip on a GPU, at the price of its second backward pass in
    every step. A candidate formulation of the guard, timed."""
    step = stepper._step

    def select(pred, true_fn, false_fn, *operands):
        t, f = true_fn(*operands), false_fn(*operands)
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), t, f)

    def both(state):
        with mock.patch.object(jax.lax, "cond", select):
            return step(state)

    stepper._step = both
    return stepper


def vae_case(
    layers: int,
    batch: int,
    k: int,
    rounds: int,
    target_s: float,
    guard_ablation: bool = False,
    network: str = "nnx",
) -> dict:
    arch = vae_example.ARCHITECTURES[layers]
    model, guide = vae_example.make_vae(arch, network)
    nets = vae_example.networks(arch, network)
    x = (jax.random.uniform(jax.random.key(1), (batch, PIXELS)) < 0.3).astype(jnp.float32)
    params = vae_example.fresh_params(model, guide)
    steppers = {
        "iwelbo": svi_stepper(model, guide, IWELBO(k), x),
        "iwelbo_stl": svi_stepper(model, guide, IWELBO(k, gradient_estimator="stl"), x),
        "iwelbo_dreg": svi_stepper(model, guide, IWELBO(k, gradient_estimator="dreg"), x),
        "renyi": svi_stepper(model, guide, RenyiELBO(alpha=0, num_particles=k), x),
        "hand": hand_stepper(lambda p, key, x: hand_vae_loss(arch, nets, p, key, x, k), params, x),
    }
    if guard_ablation:
        steppers["iwelbo_noguard"] = without_guard(svi_stepper(model, guide, IWELBO(k), x))
        steppers["iwelbo_nocond"] = without_conditional(svi_stepper(model, guide, IWELBO(k), x))
        steppers["iwelbo_select"] = with_select(svi_stepper(model, guide, IWELBO(k), x))
    return time_interleaved(steppers, rounds, target_s)


def funnel_case(k: int, rounds: int, target_s: float) -> dict:
    params = {"loc": jnp.zeros(10), "raw_scale": jnp.full(10, math.log(math.expm1(0.1)))}
    steppers = {
        "iwelbo": svi_stepper(funnel, AutoNormal(funnel), IWELBO(k)),
        "renyi": svi_stepper(funnel, AutoNormal(funnel), RenyiELBO(alpha=0, num_particles=k)),
        "hand": hand_stepper(lambda p, key: hand_funnel_loss(p, key, k), params),
        "hand_numpyro_keys": hand_stepper(
            lambda p, key: hand_funnel_numpyro_keys_loss(p, key, k), params
        ),
    }
    return time_interleaved(steppers, rounds, target_s)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of short chunks")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--results-md",
        type=Path,
        default=HERE / "RESULTS.md",
        help="markdown file whose generated block gets the tables (none: 'none')",
    )
    parser.add_argument(
        "--chunk-seconds", type=float, default=0.4, help="target length of one timed chunk"
    )
    parser.add_argument(
        "--guard-ablation",
        action="store_true",
        help="also time IWELBO with the zero-weight guard removed (prices the guard)",
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--networks",
        nargs="+",
        choices=vae_example.NETWORKS,
        default=["nnx", "eqx"],
        help="how the VAE's networks are written (examples/vae.py --network)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 50], help="VAE particles")
    parser.add_argument(
        "--funnel-ks", type=int, nargs="*", default=[1, 10, 100, 1000], help="none: skip"
    )
    parser.add_argument(
        "--marker",
        default="step_time",
        help="name of the generated block in --results-md (<!-- NAME:begin -->)",
    )
    args = parser.parse_args(argv)
    if str(args.results_md) == "none":
        args.results_md = None
    rounds, target = (3, 0.05) if args.quick else (args.rounds, args.chunk_seconds)

    load = os.getloadavg()
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "matmul_gflops": matmul_gflops(),
    }
    if jax.devices()[0].platform != "cpu":
        machine["matmul_gflops_highest"] = matmul_gflops(precision=jax.lax.Precision.HIGHEST)
    print(f"float32 matmul rate: {machine['matmul_gflops']:.1f} GFLOP/s on {machine['device']}")
    rows = []
    for network in args.networks:
        for layers in args.layers:
            arch = vae_example.ARCHITECTURES[layers]
            for batch in args.batches:
                for k in args.ks:
                    t = vae_case(layers, batch, k, rounds, target, args.guard_ablation, network)
                    gflops = vae_flops(arch, batch, k) / t["iwelbo"] / 1e9
                    rows.append(
                        {
                            "workload": "vae",
                            "network": network,
                            "layers": layers,
                            "batch": batch,
                            "k": k,
                            **t,
                            "iwelbo_gflops": gflops,
                            "matmul_fraction": gflops / machine["matmul_gflops"],
                        }
                    )
                    print(
                        f"vae {network:4} L={layers} batch={batch:<4} K={k:<4} "
                        + report(t)
                        + f"  {gflops:.1f} GFLOP/s"
                    )
    for k in args.funnel_ks:
        t = funnel_case(k, rounds, target)
        rows.append({"workload": "funnel", "batch": None, "k": k, **t})
        print(f"funnel          K={k:<4} " + report(t))
    result = {
        "machine": machine,
        "load_average": {"start": load, "end": os.getloadavg()},
        "rounds": rounds,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if args.results_md is not None:
        write_tables(result, args.results_md, args.marker)
        print(f"updated {args.results_md}")
    return result


def report(t: dict) -> str:
    line = (
        f"iwelbo {t['iwelbo'] * 1e3:8.3f} ms  renyi {t['renyi'] * 1e3:8.3f} ms  "
        f"hand {t['hand'] * 1e3:8.3f} ms  iwelbo/hand {t['iwelbo'] / t['hand']:.3f}  "
        f"iwelbo/renyi {t['iwelbo'] / t['renyi']:.3f}"
    )
    if "iwelbo_dreg" in t:
        line += (
            f"  stl/reparam {t['iwelbo_stl'] / t['iwelbo']:.3f}"
            f"  dreg/reparam {t['iwelbo_dreg'] / t['iwelbo']:.3f}"
        )
    if "iwelbo_noguard" in t:
        line += f"  guard {t['iwelbo'] / t['iwelbo_noguard']:.3f}"
        line += f"  its conditional {t['iwelbo'] / t['iwelbo_nocond']:.3f}"
        line += f"  both branches/guard {t['iwelbo_select'] / t['iwelbo']:.3f}"
    if "hand_numpyro_keys" in t:
        line += f"  iwelbo/hand_numpyro_keys {t['iwelbo'] / t['hand_numpyro_keys']:.3f}"
    return line


def markdown(result: dict) -> str:
    """The tables of RESULTS.md, from a results dict."""
    m = result["machine"]
    where = (
        f"{m['cpu_count']} CPU cores ({m['platform']})"
        if m["device"].startswith("TFRT_CPU") or "cpu" in m["device"].lower()
        else f"{m.get('device_kind', m['device'])} ({m['cpu_count']} CPU cores beside it)"
    )
    out = [
        f"Machine: {where}, JAX {m['jax']}, "
        f"NumPyro {m['numpyro']}, {result['rounds']} interleaved rounds, medians"
        + (
            f", load average {result['load_average']['start'][0]:.2f} at the start and "
            f"{result['load_average']['end'][0]:.2f} at the end. "
            if "load_average" in result
            else ". "
        )
        + f"Measured float32 matmul rate: **{m['matmul_gflops']:.0f} GFLOP/s**"
        + (
            f" at JAX's default precision ({m['matmul_gflops_highest']:.0f} GFLOP/s at "
            "precision HIGHEST, true float32)."
            if "matmul_gflops_highest" in m
            else "."
        ),
        "",
        "VAE (Burda et al.'s architectures: 1 stochastic layer 784-200-200-50, 2 layers "
        "with 100 and 50 latents; tanh, Bernoulli; the networks written in Flax NNX, "
        "Equinox or stax, the hand-written IWAE calling the same networks), ms per SVI "
        "step:",
        "",
        "| network | layers | batch | K | IWELBO | RenyiELBO | hand JAX | IWELBO / hand "
        "| IWELBO / Renyi | IWELBO GFLOP/s | of matmul rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    vae = [r for r in result["rows"] if r["workload"] == "vae"]
    for r in result["rows"]:
        if r["workload"] == "vae":
            out.append(
                f"| {r.get('network', 'stax')} | {r['layers']} | {r['batch']} | {r['k']} "
                f"| {r['iwelbo'] * 1e3:.3f} | {r['renyi'] * 1e3:.3f} "
                f"| {r['hand'] * 1e3:.3f} | {r['iwelbo'] / r['hand']:.3f} "
                f"| {r['iwelbo'] / r['renyi']:.3f} | {r['iwelbo_gflops']:.0f} "
                f"| {100 * r['matmul_fraction']:.2g}% |"
            )
    out += [
        "",
        "Gradient estimators on the same VAE, ms per SVI step (same interleaved rounds):",
        "",
        "| network | layers | batch | K | reparam | STL | DReG | STL / reparam "
        "| DReG / reparam | DReG / hand JAX IWAE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in vae:
        out.append(
            f"| {r.get('network', 'stax')} | {r['layers']} | {r['batch']} | {r['k']} "
            f"| {r['iwelbo'] * 1e3:.3f} | {r['iwelbo_stl'] * 1e3:.3f} "
            f"| {r['iwelbo_dreg'] * 1e3:.3f} | {r['iwelbo_stl'] / r['iwelbo']:.3f} "
            f"| {r['iwelbo_dreg'] / r['iwelbo']:.3f} | {r['iwelbo_dreg'] / r['hand']:.3f} |"
        )
    if not any(r["workload"] == "funnel" for r in result["rows"]):
        return "\n".join(out) + "\n"
    out += [
        "",
        "Funnel (mean-field Normal guide), microseconds per SVI step:",
        "",
        "| K | IWELBO | RenyiELBO | hand JAX | hand JAX, NumPyro-style keys "
        "| IWELBO / hand | IWELBO / hand, NumPyro keys | IWELBO / Renyi |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["workload"] == "funnel":
            out.append(
                f"| {r['k']} | {r['iwelbo'] * 1e6:.1f} | {r['renyi'] * 1e6:.1f} "
                f"| {r['hand'] * 1e6:.1f} | {r['hand_numpyro_keys'] * 1e6:.1f} "
                f"| {r['iwelbo'] / r['hand']:.3f} "
                f"| {r['iwelbo'] / r['hand_numpyro_keys']:.3f} "
                f"| {r['iwelbo'] / r['renyi']:.3f} |"
            )
    return "\n".join(out) + "\n"


def write_tables(result: dict, path: Path, marker: str = "step_time") -> None:
    """Replace the generated block of RESULTS.md (between the markers) with new tables."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{markdown(result)}{end}{tail}")


if __name__ == "__main__":
    main()
