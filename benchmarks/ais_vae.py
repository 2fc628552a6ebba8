"""Test log-likelihood of a trained MNIST VAE by importance sampling and by annealed
importance sampling (Wu et al., 2017: IS with the encoder overstates the NLL).

Loads parameters saved by examples/vae.py (e.g. those of benchmarks/objectives_mnist.py,
``objectives_mnist/vae_l1_iwae_k64_static_params.npz``), scores N test images drawn at
random (seeded) with MarginalLikelihood:

- IS with K = 5000 particles;
- AIS with K particles, T transitions of L leapfrog steps, first at the same number of
  model evaluations as IS (K T (L + 3) = 5000, gradients counted as one), then with more
  transitions until the estimate stops moving.

Reports the mean log p(x) per image, its standard error, the median k-hat, the time (with
compilation) and XLA's temporary memory of the compiled evaluation.

Run:  python benchmarks/ais_vae.py --params PATH --data ../shared/data   (about 10 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import time

from examples_loader import load_example
import jax
import jax.numpy as jnp
import numpy as np

from numpyro_iwae import MarginalLikelihood

HERE = Path(__file__).resolve().parent


def score(model, guide, params, x, key, k: int, steps: int, leapfrog: int) -> dict:
    ml = MarginalLikelihood(
        model,
        guide,
        params=params,
        num_particles=k,
        annealing_steps=steps,
        leapfrog_steps=leapfrog,
    )
    start = time.perf_counter()
    est = ml(key, x)
    pointwise = np.asarray(est.pointwise, np.float64)
    seconds = time.perf_counter() - start
    compiled = ml.lower(key, x).compile()
    return {
        "particles": k,
        "annealing_steps": steps,
        "evaluations_per_image": k * max(1, steps * (leapfrog + 3)),
        "log_likelihood": float(pointwise.mean()),
        "stderr": float(est.stderr) / len(pointwise),
        "k_hat_median": float(np.median(np.asarray(est.k_hat))),
        "seconds_with_compile": seconds,
        "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--is-particles", type=int, default=5000)
    parser.add_argument("--ais-particles", type=int, default=25)
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 100, 400])
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "ais_vae.json")
    args = parser.parse_args(argv)
    vae = load_example("vae")
    data = vae.load_mnist(args.data, "static", seed=args.seed)
    x = jnp.asarray(vae.random_rows(data.test, args.images, args.seed + 1))
    model, guide = vae.make_vae(vae.ARCHITECTURES[args.layers], vae.network_of(args.params))
    params = vae.load_params(args.params, vae.fresh_params(model, guide))
    load = os.getloadavg()[0]
    key = jax.random.key(args.seed)
    rows = [score(model, guide, params, x, key, args.is_particles, 0, args.leapfrog)]
    for steps in args.steps:
        rows.append(score(model, guide, params, x, key, args.ais_particles, steps, args.leapfrog))
    print(f"{args.params.name}: {args.images} test images, load average at start {load:.2f}")
    for r in rows:
        method = "IS" if r["annealing_steps"] == 0 else "AIS"
        print(
            f"{method:<4}K={r['particles']:<6}T={r['annealing_steps']:<5}"
            f"evals/image {r['evaluations_per_image']:<8}"
            f"log p(x) {r['log_likelihood']:9.3f} ± {r['stderr']:.3f}  "
            f"k-hat {r['k_hat_median']:5.2f}  {r['seconds_with_compile']:7.1f} s  "
            f"{r['temp_mib']:8.1f} MiB"
        )
    gap = rows[-1]["log_likelihood"] - rows[0]["log_likelihood"]
    se = math.hypot(rows[-1]["stderr"], rows[0]["stderr"])
    print(f"AIS (longest) - IS: {gap:.3f} ± {se:.3f} nats per image")
    result = {"load_average": load, "config": {k: str(v) for k, v in vars(args).items()}}
    result["rows"] = rows
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
