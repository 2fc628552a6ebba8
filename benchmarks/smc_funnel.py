"""Neal's funnel (exact log Z = 0) from mean-field fits: adaptive tempered SMC against
annealed importance sampling and importance sampling at the same number of model
evaluations.

Fits AutoNormal to the 10-D funnel of examples/funnel.py with the ELBO and with IWELBO
(K = 10, DReG), as benchmarks/ais_funnel.py does, then estimates log Z with TemperedSMC
(N particles, R replicates; its ``num_evaluations`` is the cost), and with
MarginalLikelihood at that cost: AIS with --ais-particles particles of T transitions of
L leapfrog steps (T (L + 3) evaluations per particle), and importance sampling with one
draw per evaluation up to --max-is-draws (the evaluator holds a key per draw). Run
with --smc-only to time the SMC rows alone.

Run:  python benchmarks/smc_funnel.py        (about 15 minutes on 2 CPU cores)
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
from recording import versions

from numpyro_iwae import IWELBO, MarginalLikelihood, TemperedSMC
from numpyro_iwae.maths.smc import GAP_FRACTION

HERE = Path(__file__).resolve().parent


def timed(evaluator, key) -> tuple:
    start = time.perf_counter()
    est = evaluator(key)
    jax.block_until_ready(est.log_marginal)
    return est, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--fit-steps", type=int, default=3000)
    parser.add_argument("--particles", type=int, default=4000, help="SMC particles N")
    parser.add_argument("--replicates", type=int, default=8, help="SMC replicates R")
    parser.add_argument("--moves", type=int, default=10, help="SMC sweeps per temperature")
    parser.add_argument("--leapfrog", type=int, default=30)
    parser.add_argument("--target-ess", type=float, default=0.99)
    parser.add_argument("--gap-fraction", type=float, default=GAP_FRACTION)
    parser.add_argument("--fits", nargs="+", choices=("elbo", "iwelbo"), default=["elbo", "iwelbo"])
    parser.add_argument("--ais-particles", type=int, default=400)
    parser.add_argument("--ais-leapfrog", type=int, default=5)
    parser.add_argument("--max-is-draws", type=int, default=20_000_000)
    parser.add_argument("--smc-only", action="store_true")
    parser.add_argument(
        "--keys",
        type=int,
        nargs="+",
        default=[1],
        help="PRNG keys of the SMC runs (the AIS and IS rows use the first)",
    )
    parser.add_argument(
        "--pilot",
        action="store_true",
        help="replicates replay a pilot (TemperedSMC's default); without it each adapts",
    )
    parser.add_argument(
        "--noncentred",
        action="store_true",
        help="TemperedSMC(noncentred=('x',)): the moves run on x / exp(v / 2)",
    )
    parser.add_argument(
        "--ais-noncentred",
        action="store_true",
        help="MarginalLikelihood(annealing_steps=T, noncentred=('x',)) for the AIS rows",
    )
    parser.add_argument("--out", type=Path, default=HERE / "smc_funnel.json")
    args = parser.parse_args(argv)
    funnel = load_example("funnel").funnel
    load = os.getloadavg()[0]
    rows = []
    fits = {
        "elbo": ("ELBO", Trace_ELBO()),
        "iwelbo": ("IWELBO K=10 DReG", IWELBO(10, gradient_estimator="dreg")),
    }
    for name, elbo in (fits[f] for f in args.fits):
        guide = AutoNormal(funnel)
        svi = SVI(funnel, guide, optax.adam(5e-3), elbo)
        params = svi.run(jax.random.key(0), args.fit_steps, progress_bar=False).params
        smc = TemperedSMC(
            funnel,
            guide,
            params=params,
            num_particles=args.particles,
            num_replicates=args.replicates,
            num_moves=args.moves,
            leapfrog_steps=args.leapfrog,
            target_ess=args.target_ess,
            gap_fraction=args.gap_fraction,
            pilot=args.pilot,
            noncentred=("x",) if args.noncentred else (),
        )
        runs = [(key, *timed(smc, jax.random.key(key))) for key in args.keys]
        evaluations = float(runs[0][1].num_evaluations)

        def record(
            method: str,
            est,
            seconds: float,
            config: str,
            cost: float,
            name: str = name,
            key: int = args.keys[0],
        ) -> None:
            row = {
                "fit": name,
                "method": method,
                "config": config,
                "evaluations": cost,
                "log_z": float(est.log_marginal),
                "stderr": float(est.stderr),
                "k_hat": float(est.k_hat),
                "key": key,
                "seconds_with_compile": seconds,
            }
            rows.append(row)
            print(
                f"{name:<18}{method:<5}{config:<18}log Z {row['log_z']:8.3f} ± "
                f"{row['stderr']:.3f}  ({row['log_z'] / row['stderr']:5.1f} s.e.)  "
                f"k-hat {row['k_hat']:5.2f}  {cost:.3g} evaluations  {seconds:6.1f} s",
                flush=True,
            )

        options = (" pilot" if args.pilot else "") + (" noncentred" if args.noncentred else "")
        config = f"N={args.particles} R={args.replicates}{options}"
        for key, est, seconds in runs:
            record("SMC", est, seconds, config, float(est.num_evaluations), key=key)
        if args.smc_only:
            continue
        per_particle = args.ais_leapfrog + 3
        steps = max(2, round(evaluations / (args.ais_particles * per_particle)))
        ais = MarginalLikelihood(
            funnel,
            guide,
            params=params,
            num_particles=args.ais_particles,
            annealing_steps=steps,
            leapfrog_steps=args.ais_leapfrog,
            noncentred=("x",) if args.ais_noncentred else (),
        )
        cost = float(args.ais_particles * steps * per_particle)
        record(
            "AIS",
            *timed(ais, jax.random.key(args.keys[0])),
            f"K={args.ais_particles} T={steps}" + (" noncentred" if args.ais_noncentred else ""),
            cost,
        )
        # Importance sampling holds one key per particle, so it is capped.
        draws = min(int(evaluations), args.max_is_draws)
        is_ = MarginalLikelihood(funnel, guide, params=params, num_particles=draws)
        record("IS", *timed(is_, jax.random.key(args.keys[0])), f"K={draws}", float(draws))
    print(f"load average at start {load:.2f}")
    result = {
        "load_average": load,
        "versions": versions(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
