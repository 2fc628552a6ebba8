"""Coverage per datapoint at AIS's cost: the poor-guide linear-Gaussian model of the AIS
tests (40 datapoints, z_n ~ N(0, 1), x_n ~ N(z_n, 1); a guide 1.1 posterior standard
deviations off and 0.57 as wide), scored by TemperedSMC in configurations that cost at
most AIS's 40,000 evaluations per datapoint (with and without a pilot run that fixes the
replicates' schedule; each with the standard error from the spread between replicates
and with the single-run one of Lee & Whiteley, pooled over the replicates), at four
keys: the share of datapoints whose exact log p(x_n) lies within 2 reported standard
errors, and the total's error over its standard error.

``--ladder`` instead runs TemperedSMC (one sweep) at N = 12 .. 200 particles with R = 4
replicates and at N x R = 200 with R = 4, 8, 16, and reports each configuration's mean
error per datapoint against its standard errors: which part of the miss is a bias of each
replicate (shrinking with N) and which the replicates' standard error.

Run:  python benchmarks/smc_coverage.py           (about 2 minutes on 2 CPU cores)
      python benchmarks/smc_coverage.py --ladder  (writes smc_coverage_ladder.json)
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from recording import versions

from numpyro_iwae import MarginalLikelihood, TemperedSMC

HERE = Path(__file__).resolve().parent
X = jnp.linspace(-3.0, 3.0, 40)
EXACT = np.asarray(dist.Normal(0.0, math.sqrt(2.0)).log_prob(X), np.float64)
LADDER = tuple(
    {"num_particles": n, "num_replicates": r, "num_moves": 1, "pilot": False}
    for n, r in ((12, 4), (25, 4), (50, 4), (100, 4), (200, 4), (25, 8), (12, 16))
)
# Moves that suit this Gaussian posterior: one transition of 2 leapfrog steps per
# temperature, at the many small temperature steps of a CESS target of 0.99.
LIGHT = {"num_moves": 1, "leapfrog_steps": 2, "local_spread": None, "target_ess": 0.99}
CONFIGS = (
    {"num_particles": 50, "num_replicates": 4, "num_moves": 1, "pilot": False},
    {"num_particles": 25, "num_replicates": 8, "num_moves": 1, "pilot": True},
    {"num_particles": 16, "num_replicates": 12, "num_moves": 1, "pilot": True},
    {"num_particles": 50, "num_replicates": 4, "pilot": True, **LIGHT},
    {"num_particles": 100, "num_replicates": 2, "pilot": True, **LIGHT},
    {"num_particles": 200, "num_replicates": 1, "pilot": True, **LIGHT},
)
# Each configuration with each standard error where it has one (one replicate has no
# spread between replicates).
VARIANCE_ESTIMATES = ("replicates", "single_run")


def model(x):
    with numpyro.plate("n", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):  # the posterior is N(x / 2, 1 / 2)
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("z", dist.Normal(x / 2 + 0.8, 0.4))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--ladder", action="store_true", help="particles against replicates, SMC only"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = HERE / ("smc_coverage_ladder.json" if args.ladder else "smc_coverage.json")
    load = os.getloadavg()[0]
    evaluators = {}
    if not args.ladder:
        evaluators["AIS K=100 T=50"] = (
            MarginalLikelihood(model, guide, num_particles=100, annealing_steps=50),
            40_000,
        )
    for cfg in LADDER if args.ladder else CONFIGS:
        name = "SMC N={num_particles} R={num_replicates} sweeps={num_moves}".format(**cfg)
        if "target_ess" in cfg:
            name += f" L={cfg['leapfrog_steps']} cess={cfg['target_ess']}"
        name += " pilot" if cfg.get("pilot") else ""
        for variance in ("replicates",) if args.ladder else VARIANCE_ESTIMATES:
            if variance == "replicates" and cfg["num_replicates"] == 1:
                continue
            evaluators[f"{name} s.e. {variance}"] = (
                TemperedSMC(model, guide, variance_estimate=variance, **cfg),
                None,
            )
    rows = []
    for name, (evaluator, cost) in evaluators.items():
        for key in range(args.keys):
            est = evaluator(jax.random.key(key), X)
            se = np.asarray(est.pointwise_stderr, np.float64)
            pointwise = np.asarray(est.pointwise, np.float64)
            if est.num_evaluations is not None:
                cost = float(np.mean(np.asarray(est.num_evaluations)))
            row = {
                "method": name,
                "key": key,
                "evaluations_per_datapoint": cost,
                "coverage_2se": float(np.mean(np.abs(pointwise - EXACT) < 2 * se)),
                "total_error_over_se": float((est.log_marginal - EXACT.sum()) / est.stderr),
                "mean_error": float(np.mean(pointwise - EXACT)),
                "rms_error": float(np.sqrt(np.mean((pointwise - EXACT) ** 2))),
                "rms_stderr": float(np.sqrt(np.mean(se**2))),
            }
            rows.append(row)
            print(
                f"{name:<52} key {key}  coverage {row['coverage_2se']:.3f}  total "
                f"{row['total_error_over_se']:+6.2f} s.e.  {cost:8.0f} evaluations/datapoint  "
                f"mean error {row['mean_error']:+.4f}  rms s.e. {row['rms_stderr']:.4f}",
                flush=True,
            )
    print(f"load average at start {load:.2f}")
    result = {"load_average": load, "versions": versions(), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
