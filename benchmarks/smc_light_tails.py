"""A guide whose tails are lighter than the posterior's, with exact evidence:
z ~ StudentT(3) (log Z = 0), guide N(0, 1). TemperedSMC, with and without its tempering
floor, against AIS and importance sampling at the same number of model evaluations, over
--keys keys: the mean estimate, the standard error of that mean, the mean reported
standard error and the 2-s.e. coverage of 0.

Run:  python benchmarks/smc_light_tails.py        (about 30 seconds on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from recording import versions

from numpyro_iwae import MarginalLikelihood, TemperedSMC

HERE = Path(__file__).resolve().parent


def model() -> None:
    numpyro.sample("z", dist.StudentT(3.0))


def guide() -> None:
    numpyro.sample("z", dist.Normal(0.0, 1.0))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--particles", type=int, default=250)
    parser.add_argument("--replicates", type=int, default=4)
    parser.add_argument("--ais-particles", type=int, default=100)
    parser.add_argument(
        "--pilot",
        action="store_true",
        help="replicates replay a pilot (TemperedSMC's default); the recorded "
        "smc_light_tails.json adapted each replicate",
    )
    parser.add_argument("--out", type=Path, default=HERE / "smc_light_tails.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]

    def smc(gap_fraction: float) -> TemperedSMC:
        return TemperedSMC(
            model,
            guide,
            num_particles=args.particles,
            num_replicates=args.replicates,
            gap_fraction=gap_fraction,
            pilot=args.pilot,
        )

    cost = float(smc(0.5)(jax.random.key(0)).num_evaluations)
    steps = round(cost / (args.ais_particles * 8))  # T (5 + 3) evaluations per run
    evaluators = {
        f"TemperedSMC {args.particles} x {args.replicates}": smc(0.5),
        "TemperedSMC, gap_fraction=0": smc(0.0),
        f"AIS K={args.ais_particles} T={steps}": MarginalLikelihood(
            model, guide, num_particles=args.ais_particles, annealing_steps=steps
        ),
        f"IS K={int(cost)}": MarginalLikelihood(model, guide, num_particles=int(cost)),
    }
    rows = []
    for name, evaluator in evaluators.items():
        estimates = [evaluator(jax.random.key(k)) for k in range(args.keys)]
        values = np.array([float(e.log_marginal) for e in estimates])
        stderrs = np.array([float(e.stderr) for e in estimates])
        row = {
            "method": name,
            "mean": float(values.mean()),
            "stderr_of_mean": float(values.std(ddof=1) / np.sqrt(args.keys)),
            "mean_reported_stderr": float(stderrs.mean()),
            "coverage_2se": float(np.mean(np.abs(values) < 2 * stderrs)),
        }
        rows.append(row)
        print(
            f"{name:<32}mean {row['mean']:+.4f} ± {row['stderr_of_mean']:.4f}  reported s.e. "
            f"{row['mean_reported_stderr']:.4f}  2-s.e. coverage {row['coverage_2se']:.2f}",
            flush=True,
        )
    print(f"{cost:.0f} evaluations per estimate; load average at start {load:.2f}")
    result = {
        "load_average": load,
        "versions": versions(),
        "evaluations": cost,
        "config": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
