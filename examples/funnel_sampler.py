"""A latent-variable model trained as a sampler for Neal's funnel: IWAE against SUMO.

The sampler is q(x) = int N(x | mu(z), sigma(z)) N(z | 0, I) dz with an 8-D latent and
an MLP decoder; an MLP encoder r(z | x) is the proposal that estimates log q(x). It is
trained to minimise the reverse KL to the funnel p*,

    KL(q || p*) = E_{x ~ q}[log q(x) - log p*(x)],

through x (reparameterised), with log q(x) replaced by an estimate:

- IWAE_K, a lower bound: the decoder can lower the objective by making log q(x) hard
  for the encoder to estimate instead of by matching p*; the encoder ascends IWAE_K.
- SUMO (Luo et al., 2020): m + T particles, T random with E[T] = 4.97 (1 + 4.97 = 5.97
  expected particles with m = 1, so IWAE-6 is the same expected cost; IWAE-81 the same
  padded computation), unbiased for IWAE_{m+80}; the encoder minimises E[SUMO^2].

Targets (normalised, so KL >= 0 and samples are exact):
- funnel2d: x1 ~ N(0, 1.35^2), x0 | x1 ~ N(0, exp(x1)^2);
- funnel10d: Neal's funnel of examples/funnel.py, v ~ N(0, 3^2), x_i | v ~ N(0, exp(v/2)^2).

Every trained sampler is scored independently of its training objective: the reverse
KL with log q(x) from MarginalLikelihood (K particles per x, the PSIS k-hat says whether
to trust it; a negative KL means it does not) and from SUMOMarginal; the KS distance of
the neck coordinate (x1 or v) to its exact N(0, s^2); and the energy distance of the
samples to exact funnel samples (beside that of two exact sample sets, the noise floor).
Writes funnel_sampler.json and funnel_sampler.png into --out.

Run:  python examples/funnel_sampler.py          (about 9 minutes on 2 CPU cores)
      python examples/funnel_sampler.py --help
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
import json
import math
from pathlib import Path
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from numpyro_iwae import MarginalLikelihood, SUMOMarginal
from numpyro_iwae.maths.bounds import iwae_bound
from numpyro_iwae.maths.sumo import expected_sumo_terms, sample_sumo_terms, sumo_estimate

# ---------------------------------------------------------------- the targets


@dataclass(frozen=True)
class Target:
    """A normalised funnel: its log density, an exact sampler and its neck coordinate."""

    name: str
    dim: int
    neck: int  # the coordinate whose scale sets the others' (x1 or v)
    neck_scale: float
    other: int  # the coordinate plotted against the neck

    def log_density(self, x: jax.Array) -> jax.Array:
        v = x[..., self.neck]
        rest = jnp.delete(x, self.neck, axis=-1, assume_unique_indices=True)
        scale = jnp.exp(v * self.rest_exponent)[..., None]
        log_v = dist.Normal(0.0, self.neck_scale).log_prob(v)
        return log_v + jnp.sum(dist.Normal(0.0, scale).log_prob(rest), axis=-1)

    @property
    def rest_exponent(self) -> float:
        return 1.0 if self.dim == 2 else 0.5

    def pair_log_density(self, other: np.ndarray, neck: np.ndarray) -> jax.Array:
        """The exact marginal density of (other, neck), for contours."""
        scale = jnp.exp(jnp.asarray(neck) * self.rest_exponent)
        log_neck = dist.Normal(0.0, self.neck_scale).log_prob(neck)
        return log_neck + dist.Normal(0.0, scale).log_prob(other)

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        k_v, k_rest = jax.random.split(key)
        v = self.neck_scale * jax.random.normal(k_v, (n,))
        rest = jnp.exp(v * self.rest_exponent)[:, None] * jax.random.normal(
            k_rest, (n, self.dim - 1)
        )
        return jnp.insert(rest, self.neck, v, axis=1)


TARGETS = {
    "funnel2d": Target("funnel2d", dim=2, neck=1, neck_scale=1.35, other=0),
    "funnel10d": Target("funnel10d", dim=10, neck=0, neck_scale=3.0, other=1),
}

# ---------------------------------------------------------------- the sampler


def mlp_init(key: jax.Array, sizes: list[int]) -> list[tuple[jax.Array, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) / math.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def gaussian_head(params, inputs: jax.Array, scale_floor: float) -> tuple[jax.Array, jax.Array]:
    """An MLP (tanh) whose output is split into a location and a scale >= the floor."""
    h = inputs
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    w, b = params[-1]
    loc, raw = jnp.split(h @ w + b, 2, axis=-1)
    return loc, jax.nn.softplus(raw) + scale_floor


@dataclass(frozen=True)
class Sampler:
    """The latent-variable model and its encoder, as NumPyro model and guide too (so
    MarginalLikelihood and SUMOMarginal score it)."""

    dim: int
    latent: int
    scale_floor: float

    def decode(self, dec, z):
        return gaussian_head(dec, z, self.scale_floor)

    def encode(self, enc, x):
        return gaussian_head(enc, x, 1e-4)

    def sample(self, dec, key: jax.Array, n: int) -> jax.Array:
        k_z, k_x = jax.random.split(key)
        loc, scale = self.decode(dec, jax.random.normal(k_z, (n, self.latent)))
        return loc + scale * jax.random.normal(k_x, loc.shape)

    def log_weights(self, dec, enc, x: jax.Array, key: jax.Array, n: int) -> jax.Array:
        """``(n, batch)`` log p(x, z_k) - log r(z_k | x), z_k ~ r(z | x)."""
        loc, scale = self.encode(enc, x)
        z = loc + scale * jax.random.normal(key, (n,) + loc.shape)
        x_loc, x_scale = self.decode(dec, z)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_lik = dist.Normal(x_loc, x_scale).log_prob(x).sum(-1)
        return log_prior + log_lik - dist.Normal(loc, scale).log_prob(z).sum(-1)

    def model(self, dec, enc, x):
        with numpyro.plate("x", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent]).to_event(1))
            loc, scale = self.decode(dec, z)
            numpyro.sample("obs", dist.Normal(loc, scale).to_event(1), obs=x)

    def guide(self, dec, enc, x):
        with numpyro.plate("x", x.shape[0]):
            loc, scale = self.encode(enc, x)
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class Method:
    """How log q(x) is estimated in training: IWAE_K, or SUMO(m, T_max)."""

    name: str
    particles: int  # drawn per x and step
    sumo: bool
    min_particles: int = 1

    @classmethod
    def parse(cls, name: str, sumo_m: int, sumo_max_terms: int) -> Method:
        if method_name(name) == "sumo":
            return cls("sumo", sumo_m + sumo_max_terms, True, sumo_m)
        return cls(name, int(name[5:]), False)

    def estimate(self, log_w: jax.Array, key: jax.Array) -> jax.Array:
        if not self.sumo:
            return iwae_bound(log_w)
        terms = sample_sumo_terms(key, self.particles - self.min_particles, log_w.shape[1:])
        return sumo_estimate(log_w, terms, self.min_particles)

    def expected_particles(self) -> float:
        if not self.sumo:
            return float(self.particles)
        return self.min_particles + expected_sumo_terms(self.particles - self.min_particles)


def make_step(sampler: Sampler, target: Target, method: Method, optimizer, batch: int) -> Callable:
    """One update of decoder and encoder. The decoder descends the estimated reverse
    KL (through the sampled x); the encoder, at the same x and particles, ascends IWAE_K
    or descends E[SUMO^2] (Luo et al.'s variance objective: SUMO's mean does not
    depend on the encoder)."""
    sg = jax.lax.stop_gradient

    def step(params, opt_state, key):
        dec, enc = params
        k_x, k_w, k_t = jax.random.split(key, 3)

        def decoder_objective(dec):
            x = sampler.sample(dec, k_x, batch)
            log_w = sampler.log_weights(dec, sg(enc), x, k_w, method.particles)
            return jnp.mean(method.estimate(log_w, k_t) - target.log_density(x)), x

        (objective, x), g_dec = jax.value_and_grad(decoder_objective, has_aux=True)(dec)

        def encoder_objective(enc):
            log_w = sampler.log_weights(sg(dec), enc, sg(x), k_w, method.particles)
            estimate = method.estimate(log_w, k_t)
            return jnp.mean(estimate**2) if method.sumo else -jnp.mean(estimate)

        g_enc = jax.grad(encoder_objective)(enc)
        updates, opt_state = optimizer.update((g_dec, g_enc), opt_state, params)
        return optax.apply_updates(params, updates), opt_state, objective

    return jax.jit(step)


# ---------------------------------------------------------------- scoring


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), V-statistic form."""

    def mean_dist(u, v):
        return float(np.mean(np.sqrt(np.sum((u[:, None] - v[None]) ** 2, axis=-1))))

    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def score(sampler, target, params, key, num_x, num_particles, sumo_replicates) -> dict:
    """The independent scores of a trained sampler (see the module docstring)."""
    dec, enc = params
    k_x, k_is, k_sumo, k_exact = jax.random.split(key, 4)
    x = sampler.sample(dec, k_x, num_x)
    log_p = np.asarray(target.log_density(x), np.float64)
    est = MarginalLikelihood(sampler.model, sampler.guide, num_particles=num_particles)(
        k_is, dec, enc, x
    )
    log_q = np.asarray(est.pointwise, np.float64)
    k_hat = np.asarray(est.k_hat)
    row = {
        "kl_is": float(np.mean(log_q - log_p)),
        "kl_is_stderr": float(np.std(log_q - log_p, ddof=1) / math.sqrt(num_x)),
        "is_particles": num_particles,
        "k_hat_median": float(np.median(k_hat)),
        "k_hat_above_0.7": float(np.mean(k_hat > 0.7)),
    }
    if sumo_replicates:
        sumo = SUMOMarginal(sampler.model, sampler.guide, num_replicates=sumo_replicates)(
            k_sumo, dec, enc, x
        )
        diff = np.asarray(sumo.replicates, np.float64) - log_p
        row["kl_sumo"] = float(diff.mean())
        # x and the replicates both vary: the s.e. of the mean over x of the per-x means.
        row["kl_sumo_stderr"] = float(np.std(diff.mean(0), ddof=1) / math.sqrt(num_x))
    exact = np.asarray(target.sample(k_exact, 2 * num_x), np.float64)
    xs = np.asarray(x, np.float64)
    row["ks_neck"] = ks_distance(xs[:, target.neck], exact[:num_x, target.neck])
    m = min(num_x, 2000)
    row["energy"] = energy_distance(xs[:m], exact[:m])
    row["energy_floor"] = energy_distance(exact[num_x : num_x + m], exact[:m])
    row["samples"] = xs[:2000].tolist()
    return row


# ---------------------------------------------------------------- the run


def train(sampler, target, method, args, key, progress: bool) -> dict:
    k_dec, k_enc, key = jax.random.split(key, 3)
    hidden = [args.hidden, args.hidden]
    params = (
        mlp_init(k_dec, [sampler.latent, *hidden, 2 * target.dim]),
        mlp_init(k_enc, [target.dim, *hidden, 2 * sampler.latent]),
    )
    optimizer = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(args.lr))
    opt_state = optimizer.init(params)
    step = make_step(sampler, target, method, optimizer, args.batch)
    objectives, checkpoints = [], []
    bar = range(args.steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"{target.name} {method.name}", leave=False)
    start = time.perf_counter()
    for i in bar:
        key, k_step = jax.random.split(key)
        params, opt_state, objective = step(params, opt_state, k_step)
        objectives.append(float(objective))
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            key, k_eval = jax.random.split(key)
            row = score(
                sampler, target, params, k_eval, args.curve_samples, args.curve_particles, 0
            )
            checkpoints.append({"step": i + 1, **{k: row[k] for k in ("kl_is", "k_hat_median")}})
            if progress:
                bar.set_postfix(
                    objective=f"{np.mean(objectives[-50:]):.3g}", kl=f"{row['kl_is']:.3g}"
                )
    seconds = time.perf_counter() - start
    return {
        "params": params,
        "objectives": objectives,
        "checkpoints": checkpoints,
        "seconds": seconds,
    }


def smooth(values: list[float], width: int) -> np.ndarray:
    values = np.asarray(values, np.float64)
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(results: dict, targets: list[Target], methods: list[Method], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + len(methods)
    fig, axes = plt.subplots(
        len(targets), cols, figsize=(4 * cols, 3.6 * len(targets)), squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, target in zip(axes, targets):
        ax = row[0]
        for colour, method in zip(colours, methods):
            res = results[target.name][method.name]
            obj = smooth(res["objectives"], 50)
            ax.plot(
                np.arange(len(obj)) + 50,
                obj,
                color=colour,
                alpha=0.5,
                lw=1,
                label=f"{method.name}: objective",
            )
            steps = [c["step"] for c in res["checkpoints"]]
            ax.plot(
                steps,
                [c["kl_is"] for c in res["checkpoints"]],
                "o-",
                color=colour,
                ms=3,
                label=f"{method.name}: KL (IS)",
            )
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("step")
        ax.set_title(f"{target.name}: reverse KL, as trained and by IS")
        ax.legend(fontsize=6)
        lim_other = (-4, 4) if target.dim == 2 else (-8, 8)
        lim_neck = (-4, 4) if target.dim == 2 else (-9, 9)
        grid_o, grid_n = np.meshgrid(np.linspace(*lim_other, 200), np.linspace(*lim_neck, 200))
        log_dens = np.asarray(target.pair_log_density(grid_o, grid_n))
        for ax, method in zip(row[1:], methods):
            res = results[target.name][method.name]
            ax.contour(
                grid_o,
                grid_n,
                log_dens,
                levels=np.linspace(-12, log_dens.max(), 10),
                linestyles="solid",
                colors="0.6",
                linewidths=0.6,
            )
            s = np.asarray(res["final"]["samples"])
            ax.scatter(s[:1000, target.other], s[:1000, target.neck], s=2, alpha=0.5)
            ax.set_xlim(*lim_other)
            ax.set_ylim(*lim_neck)
            f = res["final"]
            ax.set_title(
                f"{method.name}: KS {f['ks_neck']:.2f}, energy {f['energy']:.3f}", fontsize=9
            )
            ax.set_xlabel("x0" if target.dim == 2 else "x1")
            ax.set_ylabel("x1" if target.dim == 2 else "v")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slim(results: dict, block: int = 10) -> None:
    """Keep the JSON small: the training objective as means over blocks of steps, and
    200 of the final samples."""
    for by_method in results.values():
        for res in by_method.values():
            objectives = np.asarray(res.pop("objectives"), np.float64)
            usable = len(objectives) // block * block
            res["objective_block"] = block
            res["objective_block_means"] = objectives[:usable].reshape(-1, block).mean(1).tolist()
            res["final"]["samples"] = res["final"]["samples"][:200]


def strict_json(value):
    """JSON has no inf/NaN: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def method_name(name: str) -> str:
    """``name`` if it is 'sumo' or 'iwae-K' with K >= 1 (an argparse type)."""
    if name == "sumo" or (name.startswith("iwae-") and name[5:].isdigit() and int(name[5:]) >= 1):
        return name
    raise argparse.ArgumentTypeError(f"must be 'sumo' or 'iwae-K' with K >= 1, got {name!r}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument(
        "--methods",
        nargs="+",
        type=method_name,
        default=["iwae-6", "iwae-81", "sumo"],
        metavar="{iwae-K,sumo}",
        help="how log q(x) is estimated: 'iwae-K' (the IWAE bound with K >= 1 particles) or 'sumo'",
    )
    parser.add_argument("--steps", type=int, default=3000, help="updates per sampler")
    parser.add_argument("--batch", type=int, default=256, help="x drawn per update")
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--scale-floor", type=float, default=0.05, help="smallest decoder standard deviation"
    )
    parser.add_argument("--sumo-m", type=int, default=1, help="SUMO's minimum particles m")
    parser.add_argument("--sumo-max-terms", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--curve-samples", type=int, default=500, help="x per checkpoint score")
    parser.add_argument("--curve-particles", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=2000, help="x in the final score")
    parser.add_argument("--eval-particles", type=int, default=5000)
    parser.add_argument("--sumo-replicates", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    methods = [Method.parse(m, args.sumo_m, args.sumo_max_terms) for m in args.methods]
    targets = [TARGETS[t] for t in args.targets]
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)

    print(
        "Reverse KL to the funnel, each sampler scored by importance sampling with "
        f"{args.eval_particles} particles per x (and SUMO, {args.sumo_replicates} replicates); "
        "expected particles per x and step: "
        + ", ".join(
            f"{m.name} {m.expected_particles():.2f} (computes {m.particles})" for m in methods
        )
    )
    header = (
        f"{'target':<10}{'method':<9}{'KL (IS)':>10}{'± s.e.':>8}{'k-hat':>7}{'>0.7':>6}"
        f"{'KL (SUMO)':>11}{'KS neck':>9}{'energy':>8}{'floor':>7}{'min':>6}"
    )
    print(header)
    key = jax.random.key(args.seed)
    results: dict = {}
    for target in targets:
        sampler = Sampler(target.dim, args.latent, args.scale_floor)
        for method in methods:
            key, k_train, k_score = jax.random.split(key, 3)
            res = train(sampler, target, method, args, k_train, progress)
            final = score(
                sampler,
                target,
                res.pop("params"),
                k_score,
                args.eval_samples,
                args.eval_particles,
                args.sumo_replicates,
            )
            res["final"] = final
            res["expected_particles"] = method.expected_particles()
            res["computed_particles"] = method.particles
            results.setdefault(target.name, {})[method.name] = res
            print(
                f"{target.name:<10}{method.name:<9}{final['kl_is']:>10.3f}{final['kl_is_stderr']:>8.3f}"
                f"{final['k_hat_median']:>7.2f}{final['k_hat_above_0.7']:>6.2f}"
                f"{final.get('kl_sumo', float('nan')):>11.3f}{final['ks_neck']:>9.3f}"
                f"{final['energy']:>8.3f}{final['energy_floor']:>7.3f}{res['seconds'] / 60:>6.1f}"
            )
    plot(results, targets, methods, args.out / "funnel_sampler.png")
    saved = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    saved["results"] = results
    slim(results)
    (args.out / "funnel_sampler.json").write_text(json.dumps(strict_json(saved)))
    print(
        "A negative KL (IS) is impossible for the true KL: there the sampler's log q(x) is "
        "underestimated by importance sampling too (see k-hat)."
    )
    return saved


if __name__ == "__main__":
    main()
