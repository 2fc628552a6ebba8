"""Neal's funnel: what importance weighting buys, checked against the exact log Z = 0.

The funnel, v ~ N(0, 3^2) and x_i | v ~ N(0, exp(v / 2)^2) for i = 1..9, is a
normalized density, so its log normalizing constant is exactly 0: every number this
script prints can be checked against the truth.

For each guide (mean-field Normal, AutoNormal; a normalizing flow, AutoIAFNormal) it
fits the standard ELBO (K = 1) and IWELBO with K = 10 and 100 (reparam and DReG
gradients), then scores every fit with MarginalLikelihood: the log Z estimate, its
standard error, the effective sample size and the PSIS k-hat. The importance-resampled
posterior of v is compared with a NUTS reference (non-centred funnel) through ArviZ
(quantiles of both InferenceData posteriors).
It writes funnel.json (every number) and funnel.png (the picture) into --out.

Run:  python examples/funnel.py                 (about 100 s on 2 CPU cores)
      python examples/funnel.py --full --out out     (10^5 evaluation particles)
      python examples/funnel.py --help
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
import platform
import time

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, SVI
from numpyro.infer.autoguide import AutoIAFNormal, AutoNormal
import optax

from numpyro_iwae import IWELBO, MarginalLikelihood

DIM = 9
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def funnel(dim: int = DIM) -> None:
    """Neal's funnel: exact log Z = 0."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", dim):
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))


def funnel_noncentred(dim: int = DIM) -> None:
    """The same density, non-centred for NUTS: x = exp(v / 2) * x_raw."""
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", dim):
        x_raw = numpyro.sample("x_raw", dist.Normal(0.0, 1.0))
    numpyro.deterministic("x", jnp.exp(v / 2) * x_raw)


GUIDES = {
    "normal": lambda: AutoNormal(funnel),
    "iaf": lambda: AutoIAFNormal(funnel, num_flows=2, hidden_dims=[32, 32]),
}


def fit(guide_name: str, k: int, estimator: str, steps: int, lr: float, key, progress: bool):
    guide = GUIDES[guide_name]()
    # Clipping the gradient norm keeps the flow's early steps from blowing up at K = 100.
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.05)
    optim = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(schedule))
    svi = SVI(funnel, guide, optim, IWELBO(k, gradient_estimator=estimator))
    start = time.perf_counter()
    # A particle far in the flow's tail can have weight zero; IWELBO gives it exactly
    # zero gradient (no stable_update needed).
    result = svi.run(key, steps, progress_bar=progress)
    return guide, result, time.perf_counter() - start


def finite(result) -> bool:
    """Whether a fit ended with finite parameters."""
    leaves = jax.tree.leaves(result.params)
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves)


def strict_json(value):
    """JSON has no inf/NaN: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def bounds_from_log_weights(log_w: np.ndarray, ks: list[int]) -> dict[str, list[float]]:
    """Mean and standard error of the K-particle bound, from independent groups of K
    of the evaluation's particles (no further model evaluations)."""
    out = {}
    for k in ks:
        groups = log_w[: (len(log_w) // k) * k].reshape(-1, k)
        if len(groups) < 2:
            continue
        peak = groups.max(axis=1, keepdims=True)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        values = np.log(np.mean(np.exp(groups - peak), axis=1)) + peak[:, 0]
        out[str(k)] = [float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))]
    return out


def nuts_reference(num_samples: int, key):
    """NUTS on the non-centred funnel, as ArviZ InferenceData."""
    mcmc = MCMC(
        NUTS(funnel_noncentred), num_warmup=1000, num_samples=num_samples, progress_bar=False
    )
    mcmc.run(key)
    return az.from_numpyro(mcmc)


def v_quantiles(idata, group: str = "posterior") -> list[float]:
    """Quantiles of v from an ArviZ group of draws (over chains and draws)."""
    q = idata[group]["v"].quantile(list(QUANTILES), dim=("chain", "draw"))
    return [float(x) for x in q.values]


def log_density_v_x1(v: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """The funnel's exact marginal density of (v, x_1)."""
    return (
        -0.5 * (v / 3) ** 2
        - math.log(3 * math.sqrt(2 * math.pi))
        - 0.5 * x1**2 * np.exp(-v)
        - v / 2
        - 0.5 * math.log(2 * math.pi)
    )


def plot(results: list[dict], draws: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 11), constrained_layout=True)
    results = [r for r in results if not r["diverged"]]
    # Worst: the lowest estimate. Best: the closest to the truth among fits whose
    # k-hat says the estimate is reliable (all fits if none is).
    worst = min(results, key=lambda r: r["log_z"])
    reliable = [r for r in results if r["k_hat"] < 0.7] or results
    best = min(reliable, key=lambda r: abs(r["log_z"]))

    # (a), (b): density of (v, x1) with guide draws and resampled draws.
    vv, xx = np.meshgrid(np.linspace(-9, 9, 300), np.linspace(-25, 25, 300))
    dens = log_density_v_x1(vv, xx)
    for ax, r in ((axes[0, 0], worst), (axes[0, 1], best)):
        ax.contour(vv, xx, dens, levels=np.linspace(-12, -2, 11), colors="0.6", linewidths=0.7)
        g = draws[r["name"]]
        ax.scatter(g["guide_v"], g["guide_x1"], s=3, alpha=0.35, color="C0", label="guide draws")
        ax.scatter(g["res_v"], g["res_x1"], s=3, alpha=0.35, color="C3", label="resampled draws")
        ax.set_xlim(-9, 9)
        ax.set_ylim(-25, 25)
        ax.set_xlabel("v")
        ax.set_ylabel("x_1")
        label = "worst fit" if r is worst else "best reliable fit"
        ax.set_title(
            f"{label}: {r['name']}\nlog Z = {r['log_z']:.3f} ± {r['stderr']:.3f}, "
            f"k-hat {r['k_hat']:.2f}"
        )
        ax.legend(loc="lower right", markerscale=4)
    axes[0, 0].text(
        -8.6, 22, "grey: exact log density of (v, x_1)", fontsize=8, va="top", color="0.3"
    )

    # (c): the gap log Z - L_K = -L_K against K, on a log scale so that L_1 fits too.
    ax = axes[1, 0]
    floor = 1e-3
    # A fit trained with many particles can have a K = 1 bound far below log Z (1e8
    # nats): the axis stops a decade above the largest gap at K > 1 and such points sit
    # on its top edge as triangles, labelled with their value.
    above_one = [-v[0] for r in results for k, v in r["bounds"].items() if int(k) > 1 and -v[0] > 0]
    ceiling = 10 * max(above_one + [1.0])
    for i, r in enumerate(results):
        ks = np.array(sorted(int(k) for k in r["bounds"]))
        means = np.array([r["bounds"][str(k)][0] for k in ks])
        ses = np.array([r["bounds"][str(k)][1] for k in ks])
        gap = np.maximum(-means, floor)
        x = ks * 1.06 ** (i - (len(results) - 1) / 2)  # spread the fits sideways
        color, marker = f"C{i % 10}", "o" if r["guide"] == "iaf" else "s"
        style = "-" if r["guide"] == "iaf" else "--"
        off = gap > ceiling
        for xi, gi in zip(x[off], gap[off]):
            ax.annotate(
                f"{gi:.0e}",
                (xi, ceiling),
                xytext=(4, -10),
                textcoords="offset points",
                fontsize=6,
                color=color,
            )
        ax.plot(x[off], np.full(off.sum(), ceiling), "^", color=color, ms=7)
        gap = np.minimum(gap, ceiling)
        ax.plot(x, gap, style, color=color, lw=1, marker=marker, ms=4, label=r["name"])
        # +- 2 s.e. where it fits on the log axis; a hollow marker where it does not
        # (the bound is not significantly below log Z, or its s.e. exceeds the gap).
        sure = (2 * ses < gap) & ~off
        lower = gap - np.maximum(gap - 2 * ses, floor)
        ax.errorbar(
            x[sure], gap[sure], yerr=[lower[sure], 2 * ses[sure]], fmt="none", color=color, lw=1
        )
        ax.plot(x[~sure & ~off], gap[~sure & ~off], marker, ms=8, mfc="none", color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (evaluation particles per bound)")
    ax.set_ylabel("log Z - mean K-particle bound (± 2 s.e.)")
    ax.set_ylim(top=ceiling * 1.5)
    ax.set_title(
        "Gap of the bound to log Z = 0 against K\n(hollow: s.e. too large to draw; "
        "triangles: off the scale)"
    )
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))

    # (d): log Z estimates with error bars against the truth.
    ax = axes[1, 1]
    names = [r["name"] for r in results]
    y = np.arange(len(results))
    ax.errorbar(
        [r["log_z"] for r in results],
        y,
        xerr=[2 * r["stderr"] for r in results],
        fmt="o",
        color="C0",
        capsize=3,
    )
    for yi, r in zip(y, results):
        ax.annotate(
            f"k-hat {r['k_hat']:.2f}",
            (r["log_z"], yi),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=7,
        )
    ax.axvline(0.0, color="k", lw=1)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("log Z estimate (± 2 s.e.; exact value 0)")
    ax.set_title(f"MarginalLikelihood, {results[0]['eval_particles']} particles per fit")
    fig.suptitle("Neal's funnel (v ~ N(0, 3), x_i ~ N(0, exp(v/2)), 9 x's): exact log Z = 0")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: list[dict], nuts_q: list[float], nuts_samples: int) -> str:
    """The fits' numbers as a reStructuredText table (the docs page includes it)."""
    widths = (26, 7, 6, 6, 5, 7, 29)
    rule = " ".join("=" * w for w in widths)
    head = ("fit", "log Z", "s.e.", "ESS", "k-hat", "skipped", "v quantiles 5/25/50/75/95 %")
    lines = [rule, " ".join(f"{h:<{w}}" for h, w in zip(head, widths)).rstrip(), rule]
    for r in results:
        if r["diverged"]:
            cells = (r["name"], "diverged", "", "", "", str(r["skipped_steps"]), "")
        else:
            cells = (
                r["name"],
                f"{r['log_z']:.3f}",
                f"{r['stderr']:.3f}",
                f"{r['ess']:.0f}",
                f"{r['k_hat']:.2f}",
                str(r["skipped_steps"]),
                " ".join(f"{q:.2f}" for q in r["v_quantiles"]),
            )
        lines.append(" ".join(f"{c:<{w}}" for c, w in zip(cells, widths)).rstrip())
    nuts = (
        f"NUTS reference ({nuts_samples})",
        "",
        "",
        "",
        "",
        "",
        " ".join(f"{q:.2f}" for q in nuts_q),
    )
    lines.append(" ".join(f"{c:<{w}}" for c, w in zip(nuts, widths)).rstrip())
    lines.append(rule)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=3000, help="SVI steps per fit")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (cosine decay)")
    parser.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=[10, 100],
        help="IWELBO particles (K = 1, the ELBO, always runs)",
    )
    parser.add_argument(
        "--estimators", nargs="+", default=["reparam", "dreg"], choices=["reparam", "stl", "dreg"]
    )
    parser.add_argument("--guides", nargs="+", default=["normal", "iaf"], choices=sorted(GUIDES))
    parser.add_argument(
        "--eval-particles",
        type=int,
        default=10_000,
        help="MarginalLikelihood particles per fit",
    )
    parser.add_argument(
        "--full", action="store_true", help="evaluate with 100,000 particles per fit"
    )
    parser.add_argument(
        "--bound-ks",
        type=int,
        nargs="+",
        default=[1, 10, 100, 1000],
        help="K of the bound-vs-K panel",
    )
    parser.add_argument("--nuts-samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.full:
        args.eval_particles = 100_000
    progress = not args.no_progress

    key = jax.random.key(args.seed)
    runs = [(g, 1, "reparam") for g in args.guides] + [
        (g, k, e) for g in args.guides for k in args.ks for e in args.estimators
    ]
    print(
        f"Neal's funnel, exact log Z = 0: {len(runs)} fits of {args.steps} SVI steps, each scored "
        f"with {args.eval_particles} importance samples."
    )
    started = time.perf_counter()
    results, draws = [], {}
    for guide_name, k, estimator in runs:
        name = f"{guide_name}, " + ("ELBO" if k == 1 else f"IWAE K={k} {estimator}")
        key, k_fit, k_eval = jax.random.split(key, 3)
        guide, result, seconds = fit(guide_name, k, estimator, args.steps, args.lr, k_fit, progress)
        row = {
            "name": name,
            "guide": guide_name,
            "train_k": k,
            "estimator": estimator,
            "fit_seconds": seconds,
            "final_loss": float(np.nanmean(np.asarray(result.losses)[-200:])),
            "skipped_steps": int(np.sum(~np.isfinite(np.asarray(result.losses)))),
            "eval_particles": args.eval_particles,
            "diverged": not finite(result),
        }
        results.append(row)
        if row["diverged"]:
            print(f"{name}: the fit diverged (non-finite loss or parameters); not evaluated")
            continue
        ml = MarginalLikelihood(
            funnel,
            guide,
            params=result.params,
            num_particles=args.eval_particles,
            chunk_size=min(args.eval_particles, 2000),
            num_samples=2000,
            return_log_weights=True,
        )
        est = ml(k_eval)
        v_res = np.asarray(est.samples["v"])
        row.update(
            log_z=float(est.log_marginal),
            stderr=float(est.stderr),
            gap=float(-est.log_marginal),
            ess=float(est.ess),
            k_hat=float(est.k_hat),
            bounds=bounds_from_log_weights(np.asarray(est.log_weights, np.float64), args.bound_ks),
            v_quantiles=v_quantiles(est.to_inference_data(), "resampled_posterior"),
        )
        guide_draws = guide.sample_posterior(k_eval, result.params, sample_shape=(2000,))
        draws[name] = {
            "guide_v": np.asarray(guide_draws["v"]),
            "guide_x1": np.asarray(guide_draws["x"])[:, 0],
            "res_v": v_res,
            "res_x1": np.asarray(est.samples["x"])[:, 0],
        }

    key, k_nuts = jax.random.split(key)
    nuts_q = v_quantiles(nuts_reference(args.nuts_samples, k_nuts))

    qs = " ".join(f"{int(100 * q):>5}%" for q in QUANTILES)
    header = (
        f"{'fit':<26}{'log Z':>9}{'± s.e.':>8}{'ESS':>9}{'k-hat':>7}{'skipped':>8}"
        f"   v quantiles {qs}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if r["diverged"]:
            print(f"{r['name']:<26}{'diverged: not evaluated':>33}")
            continue
        vq = " ".join(f"{q:>6.2f}" for q in r["v_quantiles"])
        cells = f"{r['log_z']:>9.3f}{r['stderr']:>8.3f}{r['ess']:>9.0f}{r['k_hat']:>7.2f}"
        print(f"{r['name']:<26}{cells}{r['skipped_steps']:>8}               {vq}")
    vq = " ".join(f"{q:>6.2f}" for q in nuts_q)
    print(f"{'NUTS reference':<26}{'':>41}               {vq}")
    print("log Z = 0 exactly; k-hat above 0.7 means the estimate and its s.e. are unreliable;")
    print("'skipped': SVI steps whose loss was not finite.")

    args.out.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - started
    print(f"{seconds:.0f} s in all, {sum(r['fit_seconds'] for r in results):.0f} s of it training")
    summary = {
        "seconds": seconds,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "numpyro": numpyro.__version__,
        },
        "log_z": 0.0,
        "fits": results,
        "nuts": {"samples": args.nuts_samples, "v_quantiles": nuts_q},
        "quantiles": list(QUANTILES),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "funnel.json").write_text(json.dumps(strict_json(summary), indent=2))
    (args.out / "funnel_table.rst").write_text(table(results, nuts_q, args.nuts_samples))
    plot(results, draws, args.out / "funnel.png")
    print(f"wrote funnel.json, funnel_table.rst and funnel.png into {args.out}")
    return summary


if __name__ == "__main__":
    main()
