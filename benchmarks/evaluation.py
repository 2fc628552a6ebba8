"""Throughput and peak memory of MarginalLikelihood on the IWAE paper's VAE.

Evaluates log p(x) with K = 5000 particles on 1000 and 10,000 synthetic binary
784-pixel datapoints through the 784-200-200-50 VAE (tanh, Bernoulli), streamed in
chunks (by default as many particles per chunk as the memory budget allows), and
compares with two hand-written evaluations of the same network: the naive one (one
vmap over all K particles, where that fits in memory) and a per-datapoint
``lax.map`` (all K particles of one datapoint at a time). Each configuration runs in
its own process so that its peak resident memory (VmHWM) can be read; throughput is
particles x datapoints per second and, counting the decoder's matmul FLOPs, a fraction
of the float32 matmul rate measured on the same machine.

Run:  python benchmarks/evaluation.py            (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import subprocess
import sys
import textwrap

from burda_vae import child_env

HERE = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import json, math, sys, time
    import jax, jax.numpy as jnp, numpy as np
    import numpyro.distributions as dist
    from burda_vae import build
    from numpyro_iwae import MarginalLikelihood

    mode, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chunk = None if sys.argv[4] == "auto" else int(sys.argv[4])

    model, guide, params, (enc_apply, enc), (dec_apply, dec) = build()

    x = jnp.asarray((np.random.default_rng(0).random((n, 784)) < 0.2).astype(np.float32))

    def hand_log_w(key, x):
        h = enc_apply(enc, x)
        eps = jax.random.normal(key, (k,) + h[:, :50].shape)
        z = h[:, :50] + jnp.exp(h[:, 50:]) * eps
        logits = dec_apply(dec, z)
        return (
            jnp.sum(x * logits - jax.nn.softplus(logits), -1)
            + jnp.sum(dist.Normal(0.0, 1.0).log_prob(z), -1)
            - jnp.sum(dist.Normal(h[:, :50], jnp.exp(h[:, 50:])).log_prob(z), -1)
        )

    if mode == "streamed":
        ml = MarginalLikelihood(model, guide, params=params, num_particles=k, chunk_size=chunk)
        fn = jax.jit(lambda key, x: ml(key, x).log_marginal)
    elif mode == "permap":  # hand-written: lax.map over datapoints, all K particles each
        def permap(key, x):
            def one(args):
                key, xi = args
                return jax.nn.logsumexp(hand_log_w(key, xi[None]), 0) - math.log(k)
            return jnp.sum(jax.lax.map(one, (jax.random.split(key, x.shape[0]), x)))
        fn = jax.jit(permap)
    else:  # naive: every particle at once, as a single vmap would
        fn = jax.jit(lambda key, x: jnp.sum(jax.nn.logsumexp(hand_log_w(key, x), 0) - math.log(k)))

    compiled = fn.lower(jax.random.key(0), x).compile()
    t0 = time.perf_counter()
    value = float(compiled(jax.random.key(0), x))
    seconds = time.perf_counter() - t0
    # VmHWM: peak resident memory of this process image (ru_maxrss survives exec on
    # Linux and would include the parent's peak).
    status = open("/proc/self/status").readlines()
    peak = int([l.split()[1] for l in status if l.startswith("VmHWM")][0]) / 2**20  # GiB
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    device_peak = stats.get("peak_bytes_in_use", 0) / 2**30
    print(json.dumps({"mode": mode, "n": n, "k": k, "chunk": chunk, "seconds": seconds,
                      "peak_gib": peak, "device_peak_gib": device_peak,
                      "log_marginal": value, "device": f"{jax.devices()[0].platform}: "
                      f"{jax.devices()[0].device_kind}"}))
    """
)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    code = textwrap.dedent(
        f"""
        import statistics, time, jax, jax.numpy as jnp
        a = jax.random.normal(jax.random.key(0), ({n}, {n}))
        f = jax.jit(jnp.dot); f(a, a).block_until_ready()
        ts = []
        for _ in range({repeats}):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t0)
        print(2 * {n}**3 / statistics.median(ts) / 1e9)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def run(mode: str, n: int, k: int, chunk: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(n), str(k), str(chunk)],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return {"mode": mode, "n": n, "k": k, "chunk": chunk, "error": out.stderr[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def decoder_flops(n: int, k: int) -> float:
    return 2.0 * n * k * (50 * 200 + 200 * 200 + 200 * 784)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--chunk", default="auto", help="particles per chunk, or auto (the memory budget)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="GPU sizes: every mode at N = 10,000, K = 5000 (peak memory is the device's)",
    )
    parser.add_argument(
        "--rate",
        action="store_true",
        help="only K = 5000 over 10,000 points, streamed against the per-datapoint lax.map",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = HERE / ("evaluation_rate.json" if args.rate else "evaluation.json")
    if args.rate:
        configs = [("streamed", 10000, 5000), ("permap", 10000, 5000)]
    elif args.quick:
        configs = [("streamed", 100, 200), ("naive", 100, 200), ("permap", 100, 200)]
    elif args.gpu:
        configs = [
            ("streamed", 10000, 5000),
            ("permap", 10000, 5000),
            ("naive", 1000, 5000),
        ]
    else:
        configs = [
            ("streamed", 1000, 500),
            ("naive", 1000, 500),
            ("streamed", 1000, 5000),
            ("permap", 1000, 5000),
            ("streamed", 10000, 5000),
        ]
    rate = matmul_gflops()
    print(f"float32 matmul rate: {rate:.0f} GFLOP/s")
    rows = []
    for mode, n, k in configs:
        r = run(mode, n, k, args.chunk)
        if "error" not in r:
            r["throughput"] = n * k / r["seconds"]
            r["gflops"] = decoder_flops(n, k) / r["seconds"] / 1e9
            r["matmul_fraction"] = r["gflops"] / rate
            print(
                f"{mode:<9} N={n:<6} K={k:<5} {r['seconds']:8.2f} s  "
                f"peak {r['peak_gib']:5.2f} GiB (device {r['device_peak_gib']:5.2f})  "
                f"{r['throughput']:.3g} particle-datapoints/s  {r['gflops']:.0f} GFLOP/s "
                f"({100 * r['matmul_fraction']:.0f}% of matmul)  log p = {r['log_marginal']:.1f}"
            )
        else:
            print(f"{mode:<9} N={n:<6} K={k:<5} failed: {r['error']}")
        rows.append(r)
    result = {
        "matmul_gflops": rate,
        "device": next((r["device"] for r in rows if "device" in r), None),
        "chunk": args.chunk,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
