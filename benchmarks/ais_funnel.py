"""Neal's funnel (exact log Z = 0): mean-field fits scored by importance sampling and by
annealed importance sampling at the same number of model evaluations.

Fits AutoNormal to the 10-D funnel of examples/funnel.py with the ELBO and with IWELBO
(K = 10, DReG), then estimates log Z with MarginalLikelihood: importance sampling with
K = 100 x T (L + 3) particles, and AIS with K = 100 particles of T transitions of L
leapfrog steps, for T in --steps (with --noncentred, AIS also with the moves on
x / exp(v / 2), MarginalLikelihood(noncentred=("x",))). Every estimate should be 0
within its standard error; the mean-field guide misses the funnel's neck, so importance
sampling's k-hat is high.

Run:  python benchmarks/ais_funnel.py        (about 80 seconds on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import time

from examples_loader import load_example
import jax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_iwae import IWELBO, MarginalLikelihood

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit-steps", type=int, default=3000)
    parser.add_argument("--particles", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200, 1000])
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument(
        "--noncentred",
        action="store_true",
        help="add AIS rows with noncentred=('x',): the moves run on x / exp(v / 2)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "ais_funnel.json")
    args = parser.parse_args(argv)
    funnel = load_example("funnel").funnel
    load = os.getloadavg()[0]
    rows = []
    for name, elbo in (
        ("ELBO", Trace_ELBO()),
        ("IWELBO K=10 DReG", IWELBO(10, gradient_estimator="dreg")),
    ):
        guide = AutoNormal(funnel)
        svi = SVI(funnel, guide, optax.adam(5e-3), elbo)
        params = svi.run(jax.random.key(0), args.fit_steps, progress_bar=False).params
        for steps in args.steps:
            cost = steps * (args.leapfrog + 3)
            runs = [("IS", args.particles * cost, None, ()), ("AIS", args.particles, steps, ())]
            if args.noncentred:
                runs.append(("AIS non-centred", args.particles, steps, ("x",)))
            for method, k, t, noncentred in runs:
                ml = MarginalLikelihood(
                    funnel,
                    guide,
                    params=params,
                    num_particles=k,
                    annealing_steps=t,
                    leapfrog_steps=args.leapfrog,
                    noncentred=noncentred,
                )
                start = time.perf_counter()
                est = ml(jax.random.key(1))
                seconds = time.perf_counter() - start
                row = {
                    "fit": name,
                    "method": method,
                    "particles": k,
                    "annealing_steps": t or 0,
                    "evaluations": args.particles * cost,
                    "log_z": float(est.log_marginal),
                    "stderr": float(est.stderr),
                    "k_hat": float(est.k_hat),
                    "ess": float(est.ess),
                    "seconds_with_compile": seconds,
                }
                rows.append(row)
                print(
                    f"{name:<18}{method:<16}K={k:<7}T={t or 0:<5}log Z {row['log_z']:8.3f} "
                    f"± {row['stderr']:.3f}  k-hat {row['k_hat']:5.2f}  {seconds:6.1f} s"
                )
    print(f"load average at start {load:.2f}")
    result = {"load_average": load, "config": {k: str(v) for k, v in vars(args).items()}}
    result["rows"] = rows
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
