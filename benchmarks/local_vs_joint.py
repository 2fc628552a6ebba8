"""Joint against local weighting on hierarchical models.

Quality: mu ~ N(0, 1), z_n ~ N(mu, 0.8), x_n ~ N(z_n, 0.6), n = 1..N (exact evidence),
with an AutoNormal guide (mean field: it cannot hold the posterior's z_n-mu
correlation). For N = 10, 100, 1000 the guide is fitted five ways from the same
start, for the same number of full-data Adam steps (step size 0.01, 1e-3 for the
last quarter, 1e-4 for the last eighth): Trace_ELBO, and IWELBO(K) with weighting
"joint" and "local", each with the reparam and the DReG gradient. Each fitted guide
is then scored by the exact log p(x), its ELBO, its joint and local K-particle bounds
(means over 500 draws), and its q(mu) against the exact posterior of mu.

Step time of the two weightings, side by side in one process (300 short interleaved
rounds; see ``step_times``), on (a) the model above with N = 1000 (three scalar
densities per element: the per-element bound is most of the work) and (b) a grouped
model shaped like examples/hierarchical.py: 10,000 observations in 100 groups, a
random effect per group, observations nested in their group's plate.

Run:  python benchmarks/local_vs_joint.py           (writes local_vs_joint.json)
      python benchmarks/local_vs_joint.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_iwae import IWELBO

HERE = Path(__file__).resolve().parent
TAU, S = 0.8, 0.6
D = TAU**2 + S**2


def model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, TAU))
        numpyro.sample("x", dist.Normal(z, S), obs=x)


def log_evidence(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    n = x.size
    log_det = n * math.log(D) + math.log1p(n / D)
    quad = (x @ x - x.sum() ** 2 / (D + n)) / D
    return -0.5 * (n * math.log(2 * math.pi) + log_det + quad)


def posterior_mu(x: np.ndarray) -> tuple[float, float]:
    prec = 1 + x.size / D
    return float(x.sum() / D / prec), prec**-0.5


def fit(objective, x, steps, seed=0):
    guide = AutoNormal(model)
    # 0.01, then 10x smaller for the last 25% and 100x for the last 12.5% of the
    # steps, so the final iterate is not dominated by gradient noise.
    schedule = optax.piecewise_constant_schedule(
        0.01, {int(0.75 * steps): 0.1, int(0.875 * steps): 0.1}
    )
    svi = SVI(model, guide, optax.adam(schedule), objective)
    result = svi.run(jax.random.key(seed), steps, x, progress_bar=False)
    return guide, result.params


def mean_bound(objective, params, guide, x, num=500):
    keys = jax.random.split(jax.random.key(123), num)
    loss = jax.jit(jax.vmap(lambda k: objective.loss(k, params, model, guide, x)))
    values = -np.asarray(loss(keys), np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(num))


def quality(sizes, k, steps):
    rows = []
    for n in sizes:
        x = jnp.asarray(np.random.default_rng(n).normal(0.7, math.sqrt(1 + D), n), jnp.float32)
        exact = log_evidence(x)
        mu_mean, mu_sd = posterior_mu(np.asarray(x))
        for name, objective in (
            ("Trace_ELBO", Trace_ELBO()),
            ("joint", IWELBO(k, weighting="joint")),
            ("joint-dreg", IWELBO(k, weighting="joint", gradient_estimator="dreg")),
            ("local", IWELBO(k, weighting="local")),
            ("local-dreg", IWELBO(k, weighting="local", gradient_estimator="dreg")),
        ):
            t0 = time.perf_counter()
            guide, params = fit(objective, x, steps)
            seconds = time.perf_counter() - t0
            scores = {
                label: mean_bound(obj, params, guide, x)
                for label, obj in (
                    ("elbo", IWELBO(1, weighting="joint")),
                    ("joint_bound", IWELBO(k, weighting="joint")),
                    ("local_bound", IWELBO(k, weighting="local")),
                )
            }
            row = {
                "N": n,
                "fitted_with": name,
                "K": k,
                "log_px": exact,
                **{f"{label}_gap": exact - v for label, (v, _) in scores.items()},
                **{f"{label}_se": se for label, (_, se) in scores.items()},
                "q_mu_mean": float(params["mu_auto_loc"]),
                "q_mu_sd": float(params["mu_auto_scale"]),
                "post_mu_mean": mu_mean,
                "post_mu_sd": mu_sd,
                "fit_seconds": seconds,
            }
            rows.append(row)
            print(
                f"N={n:5d} {name:10s} gaps (nats): ELBO {row['elbo_gap']:8.3f} "
                f"joint {row['joint_bound_gap']:8.3f} local {row['local_bound_gap']:8.3f} | "
                f"q(mu) {row['q_mu_mean']:.3f}+-{row['q_mu_sd']:.3f} vs "
                f"{mu_mean:.3f}+-{mu_sd:.3f}",
                flush=True,
            )
    return rows


def grouped_model(x):
    """x: (groups, observations per group)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("groups", x.shape[0], dim=-2):
        a = numpyro.sample("a", dist.Normal(mu, sigma))
        with numpyro.plate("obs", x.shape[1], dim=-1):
            numpyro.sample("x", dist.Normal(a, 1.0), obs=x)


def step_times(workload, fn, x, ks, rounds, steps_per_round):
    """Seconds per step of both weightings, in alternating rounds of a few steps.

    The shared machine has periods of up to half a second in which every step takes
    about twice as long; short rounds keep such a period inside one or two rounds,
    and two statistics are reported: the median over rounds of the local/joint
    ratio of neighbouring rounds, and the ratio of the two weightings' 10th
    percentiles (the noise only adds time).
    """
    rows = []
    for k in ks:
        runners = {}
        for weighting in ("joint", "local"):
            guide = AutoNormal(fn)
            svi = SVI(fn, guide, optax.adam(1e-3), IWELBO(k, weighting=weighting))
            state = svi.init(jax.random.key(0), x)
            update = jax.jit(svi.update)
            state, loss = update(state, x)  # compile
            jax.block_until_ready(loss)
            runners[weighting] = [update, state]
        times = {w: [] for w in runners}
        for r in range(rounds):
            order = list(runners) if r % 2 == 0 else list(runners)[::-1]
            for w in order:
                update, state = runners[w]
                t0 = time.perf_counter()
                for _ in range(steps_per_round):
                    state, loss = update(state, x)
                jax.block_until_ready(loss)
                times[w].append((time.perf_counter() - t0) / steps_per_round)
                runners[w][1] = state
        ratios = [lo / jo for lo, jo in zip(times["local"], times["joint"])]
        p10 = {w: float(np.percentile(t, 10)) for w, t in times.items()}
        row = {
            "workload": workload,
            "K": k,
            "joint_ms": 1e3 * statistics.median(times["joint"]),
            "local_ms": 1e3 * statistics.median(times["local"]),
            "ratio_median": statistics.median(ratios),
            "joint_p10_ms": 1e3 * p10["joint"],
            "local_p10_ms": 1e3 * p10["local"],
            "ratio_p10": p10["local"] / p10["joint"],
            "rounds": rounds,
            "steps_per_round": steps_per_round,
        }
        rows.append(row)
        print(
            f"step {workload} K={k}: joint {row['joint_ms']:.3f} ms, "
            f"local {row['local_ms']:.3f} ms, local/joint {row['ratio_median']:.3f} "
            f"(10th percentiles: {row['ratio_p10']:.3f})",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "local_vs_joint.json"))
    parser.add_argument("--steps-only", action="store_true", help="only the step times")
    args = parser.parse_args()
    steps = 300 if args.quick else 8000
    rounds = 10 if args.quick else 300
    out = Path(args.out)
    # --steps-only keeps the quality rows of an earlier run in the same file.
    results = json.loads(out.read_text()) if args.steps_only and out.exists() else {}
    results["device"] = str(jax.devices()[0])
    if not args.steps_only:
        results["quality_load_before"] = os.getloadavg()[0]
        results["quality"] = quality((10, 100, 1000), 8, steps)
        results["quality_load_after"] = os.getloadavg()[0]
    results["step_time_load_before"] = os.getloadavg()[0]
    print(f"load average before the step times: {results['step_time_load_before']:.2f}")
    results["step_time"] = step_times(
        "normal N=1000",
        model,
        jnp.asarray(np.random.default_rng(0).normal(size=1000), jnp.float32),
        (8, 32),
        rounds,
        20,
    ) + step_times(
        "grouped 100x100",
        grouped_model,
        jnp.asarray(np.random.default_rng(0).normal(size=(100, 100)), jnp.float32),
        (8, 32),
        rounds,
        10,
    )
    results["step_time_load_after"] = os.getloadavg()[0]
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
