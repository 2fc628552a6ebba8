"""Neal's funnel fitted with the ELBO and with IWELBO, checked against log Z = 0.

The funnel, v ~ N(0, 3^2) and x_i | v ~ N(0, exp(v / 2)^2) for i = 1..9, is a
normalized density, so its exact log normalizing constant is 0: every bound
printed below must be <= 0, and a better fit (or more particles) brings it closer.

For each training objective (the ELBO, IWELBO with K = 10 and K = 100) a
mean-field Normal guide (AutoNormal) is fitted with SVI; the fitted guide is then
scored with the K-particle bound for several evaluation K, each averaged over
independent draws and reported with its standard error.

Run:  python examples/funnel.py            (about a minute on 2 CPU cores)
      python examples/funnel.py --help
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_iwae import IWELBO


def funnel(dim: int = 9) -> None:
    """Neal's funnel: exact log Z = 0."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", dim):
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))


def mean_bound(params, guide, k: int, draws: int, key: jax.Array) -> tuple[float, float]:
    """Mean and standard error of the K-particle bound over independent draws."""
    elbo = IWELBO(k)
    keys = jax.random.split(key, draws)
    values = jax.jit(jax.vmap(lambda kk: -elbo.loss(kk, params, funnel, guide)))(keys)
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(draws))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000, help="SVI steps per fit")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument(
        "--train-k",
        type=int,
        nargs="+",
        default=[1, 10, 100],
        help="particles of the training objective (1 = the ELBO)",
    )
    parser.add_argument(
        "--eval-k",
        type=int,
        nargs="+",
        default=[1, 10, 100, 1000],
        help="particles of the evaluation bound",
    )
    parser.add_argument(
        "--eval-particles",
        type=int,
        default=200_000,
        help="total particles per evaluation (draws = this / K)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write funnel.json here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    key = jax.random.key(args.seed)
    results = []
    print(f"Neal's funnel, exact log Z = 0. {args.steps} SVI steps per fit, AutoNormal guide.")
    for train_k in args.train_k:
        name = "ELBO (K=1)" if train_k == 1 else f"IWELBO K={train_k}"
        guide = AutoNormal(funnel)
        svi = SVI(funnel, guide, optax.adam(args.lr), IWELBO(train_k))
        key, fit_key, eval_key = jax.random.split(key, 3)
        start = time.perf_counter()
        fit = svi.run(fit_key, args.steps, progress_bar=not args.no_progress)
        seconds = time.perf_counter() - start
        row = {"objective": name, "train_k": train_k, "fit_seconds": seconds, "bounds": {}}
        for k in args.eval_k:
            draws = max(args.eval_particles // k, 100)
            eval_key, sub = jax.random.split(eval_key)
            row["bounds"][k] = mean_bound(fit.params, guide, k, draws, sub)
        results.append(row)

    header = f"{'trained with':<16}" + "".join(f"{f'bound K={k}':>20}" for k in args.eval_k)
    print("\n" + header + "\n" + "-" * len(header))
    for row in results:
        cells = "".join(f"{m:>12.3f} ± {s:<5.3f}" for m, s in row["bounds"].values())
        print(f"{row['objective']:<16}{cells}")
    print("Every entry is a lower bound on log Z = 0 (mean ± standard error).")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "funnel.json"
        path.write_text(json.dumps({"log_z": 0.0, "fits": results}, indent=2))
        print(f"wrote {path}")
    return {"log_z": 0.0, "fits": results}


if __name__ == "__main__":
    main()
