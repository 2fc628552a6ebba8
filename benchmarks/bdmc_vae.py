"""A trained MNIST VAE: bidirectional Monte Carlo on simulated images (the gap between
AIS's lower and reverse AIS's upper bound as T grows), and TemperedSMC against AIS at the
same number of model evaluations, on the simulated images (inside the sandwich?) and on
test images.

Loads parameters saved by examples/vae.py (``--params out/..._params.npz``), simulates
--images images from the model (the decoder's own draws, so the latents are exact
posterior draws), and runs BidirectionalMC for each T in --steps on them (K forward runs,
--chains reverse runs per image). Then TemperedSMC (N particles x R replicates per image,
with its defaults, and one run of --smc-light-particles replaying a pilot's schedule with
one 2-step transition per temperature at a target ESS of 0.99) and AIS with --particles
runs at each one's cost, on the simulated images and on as many test images. Writes
bdmc_vae.json and the figure bdmc_vae.png (the bounds per image against T).

Run:  python benchmarks/bdmc_vae.py --params PATH --data ../shared/data   (about 10 min)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path
import time

from examples_loader import load_example
import jax
import jax.numpy as jnp
import numpy as np
from recording import versions

from numpyro_iwae import BidirectionalMC, MarginalLikelihood, TemperedSMC

HERE = Path(__file__).resolve().parent


def per_image(est) -> tuple[float, float]:
    """Mean log p(x) per image and its standard error."""
    n = int(np.size(est.pointwise))
    return float(np.mean(np.asarray(est.pointwise))), float(est.stderr) / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--particles", type=int, default=16, help="forward AIS runs K")
    parser.add_argument("--chains", type=int, default=16, help="reverse AIS runs")
    parser.add_argument("--leapfrog", type=int, default=5)
    parser.add_argument("--smc-particles", type=int, default=64)
    parser.add_argument("--smc-replicates", type=int, default=4)
    parser.add_argument(
        "--smc-light-particles",
        type=int,
        default=256,
        help="particles of the second SMC row: one run replaying a pilot, one 2-step "
        "transition per temperature, target ESS 0.99 (0: no such row)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "bdmc_vae.json")
    parser.add_argument("--figure", type=Path, default=HERE / "bdmc_vae.png")
    args = parser.parse_args(argv)
    vae = load_example("vae")
    data = vae.load_mnist(args.data, "static", seed=args.seed)
    x_test = jnp.asarray(vae.random_rows(data.test, args.images, args.seed + 1))
    model, guide = vae.make_vae(vae.ARCHITECTURES[args.layers], vae.network_of(args.params))
    params = vae.load_params(args.params, vae.fresh_params(model, guide))
    load = os.getloadavg()[0]
    bdmc = BidirectionalMC(
        model,
        guide,
        params=params,
        num_particles=args.particles,
        num_chains=args.chains,
        leapfrog_steps=args.leapfrog,
    )
    simulation = bdmc.simulate(jax.random.key(args.seed), x_test)
    (x_sim,), _ = simulation.arguments((x_test,), {})
    sandwich_rows = []
    for steps in args.steps:
        bdmc.annealing_steps = steps
        start = time.perf_counter()
        out = bdmc.sandwich(jax.random.key(args.seed + 1), simulation, x_sim)
        seconds = time.perf_counter() - start
        lower, lower_se = per_image(out.lower)
        upper, upper_se = per_image(out.upper)
        row = {
            "annealing_steps": steps,
            "evaluations_per_image": args.particles * steps * (args.leapfrog + 3),
            "lower": lower,
            "lower_stderr": lower_se,
            "upper": upper,
            "upper_stderr": upper_se,
            "gap": upper - lower,
            "seconds_with_compile": seconds,
        }
        sandwich_rows.append(row)
        print(
            f"BDMC T={steps:<6}lower {lower:9.3f} ± {lower_se:.3f}  upper {upper:9.3f} ± "
            f"{upper_se:.3f}  gap {upper - lower:7.3f} nats/image  {seconds:6.1f} s",
            flush=True,
        )
    versus_rows = []
    smc_configs = {
        f"N={args.smc_particles} R={args.smc_replicates}": {
            "num_particles": args.smc_particles,
            "num_replicates": args.smc_replicates,
            "pilot": False,  # the recorded "defaults" row adapted each replicate
        }
    }
    if args.smc_light_particles:
        smc_configs[f"N={args.smc_light_particles} R=1 pilot light"] = {
            "num_particles": args.smc_light_particles,
            "num_replicates": 1,
            "pilot": True,
            "num_moves": 1,
            "leapfrog_steps": 2,
            "local_spread": None,
            "target_ess": 0.99,
        }
    for (label, x), (smc_config, options) in itertools.product(
        (("simulated", x_sim), ("test", x_test)), smc_configs.items()
    ):
        options = {"leapfrog_steps": args.leapfrog, **options}
        smc = TemperedSMC(model, guide, params=params, **options)
        start = time.perf_counter()
        est = smc(jax.random.key(args.seed + 2), x)
        seconds = time.perf_counter() - start
        evaluations = float(np.mean(np.asarray(est.num_evaluations)))
        steps = max(2, round(evaluations / (args.particles * (args.leapfrog + 3))))
        ais = MarginalLikelihood(
            model,
            guide,
            params=params,
            num_particles=args.particles,
            annealing_steps=steps,
            leapfrog_steps=args.leapfrog,
        )
        start_ais = time.perf_counter()
        est_ais = ais(jax.random.key(args.seed + 2), x)
        seconds_ais = time.perf_counter() - start_ais
        for method, e, sec, config in (
            ("SMC", est, seconds, smc_config),
            ("AIS", est_ais, seconds_ais, f"K={args.particles} T={steps}"),
        ):
            value, se = per_image(e)
            versus_rows.append(
                {
                    "images": label,
                    "method": method,
                    "config": config,
                    "evaluations_per_image": evaluations,
                    "log_likelihood": value,
                    "stderr": se,
                    "seconds_with_compile": sec,
                }
            )
            print(
                f"{label:<10}{method:<4}{config:<24}log p(x) {value:9.3f} ± {se:.3f} per "
                f"image  {evaluations:.3g} evaluations/image  {sec:6.1f} s",
                flush=True,
            )
    print(f"load average at start {load:.2f}")
    result = {
        "load_average": load,
        "versions": versions(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "sandwich": sandwich_rows,
        "versus": versus_rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    figure(sandwich_rows, versus_rows, args.figure)
    return result


def figure(rows: list[dict], versus: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["annealing_steps"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label, colour in (
        ("lower", "AIS from the guide", "C0"),
        ("upper", "reverse AIS", "C3"),
    ):
        values = np.array([r[key] for r in rows])
        errors = np.array([r[f"{key}_stderr"] for r in rows])
        ax.errorbar(steps, values, yerr=2 * errors, marker="o", color=colour, label=label)
    smc = [v for v in versus if v["images"] == "simulated" and v["method"] == "SMC"]
    for row, style in zip(smc, ("--", ":")):
        ax.axhline(
            row["log_likelihood"],
            color="k",
            ls=style,
            lw=1,
            label=f"TemperedSMC {row['config']} ({row['evaluations_per_image']:.2g} evaluations)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("annealing steps T")
    ax.set_ylabel("log p(x) per simulated image (nats)")
    ax.set_title("Bidirectional Monte Carlo on the MNIST VAE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
