"""What PSIS k-hat can and cannot see: importance sampling against an exact log p(x).

A scale with a heavy-tailed prior, sigma ~ HalfCauchy(1), and N observations
x_n ~ N(0, sigma): the posterior of log sigma has exponential tails, which a Gaussian
guide in log sigma (AutoNormal, what SVI fits) cannot hold. The exact log p(x) is a 1-D
integral, computed by adaptive quadrature (scipy) in float64. For each N the guide is
fitted with Trace_ELBO, then MarginalLikelihood (K particles) is run with ``--keys``
independent keys: the mean error against the exact value, the mean z-score
(error / reported s.e.), the 2-s.e. coverage and the median k-hat, plainly and with
annealing (AIS). A guide whose tails are lighter than the posterior's rarely proposes
the missing mass, and its weights then look well behaved.

Third, eight schools (Rubin 1981) as NumPyro's examples write it, centred: mu ~ N(0, 5),
tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j). Its exact log p(y):
theta and mu integrate out in closed form (y ~ N(0, 25 11' + diag(sigma^2 + tau^2))), tau by
quadrature. The posterior is a funnel in (tau, theta); a mean-field guide cannot reach
its neck (small tau), and no weight it draws says so.

Fourth, mass the guide never visits, with log Z = 0 exactly (a normalized density and
no data): a two-mode target 0.3 N(-4, 0.7) + 0.7 N(4, 0.7) with a guide on one mode
that is wider than it (so its weights there are light-tailed: k-hat < 0), and a
Student-t(3) target with a Normal(0, 1) guide (lighter tails than the target).

Second, the 0.5-0.7 band: a logistic regression with 6 weights (N(0, 1) prior, 60
simulated rows, correlated features) and a mean-field guide (AutoNormal, Trace_ELBO),
whose k-hat lands between 0.5 and 0.7. Reference: importance sampling from a full-rank
Gaussian fit (AutoMultivariateNormal) with 400,000 particles (its s.e. is printed).

Run:  python benchmarks/khat_limits.py           (writes khat_limits.json)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
import optax
from recording import new_record, save_record
from scipy import integrate, stats

from numpyro_iwae import MarginalLikelihood

HERE = Path(__file__).resolve().parent


def model(x):
    sigma = numpyro.sample("sigma", dist.HalfCauchy(1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(0.0, sigma), obs=x)


def exact_log_evidence(x: np.ndarray) -> float:
    """log of the integral over u = log sigma of p(sigma) sigma prod_n N(x_n | 0, sigma)."""
    x = np.asarray(x, np.float64)

    def log_integrand(u):
        sigma = math.exp(u)
        return stats.halfcauchy.logpdf(sigma) + u + np.sum(stats.norm.logpdf(x, 0.0, sigma))

    grid = np.linspace(-15, 15, 3001)
    peak = max(log_integrand(u) for u in grid)
    value, _ = integrate.quad(lambda u: math.exp(log_integrand(u) - peak), -30, 30, limit=400)
    return peak + math.log(value)


Y_SCHOOLS = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA_SCHOOLS = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def schools(sigma, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def schools_log_evidence() -> float:
    y, sigma = Y_SCHOOLS, SIGMA_SCHOOLS

    def log_integrand(u):
        tau = math.exp(u)
        cov = 25.0 * np.ones((8, 8)) + np.diag(sigma**2 + tau**2)
        return (
            stats.halfcauchy.logpdf(tau, scale=5.0)
            + u
            + stats.multivariate_normal.logpdf(y, np.zeros(8), cov)
        )

    grid = np.linspace(-20, 15, 3501)
    peak = max(log_integrand(u) for u in grid)
    value, _ = integrate.quad(lambda u: math.exp(log_integrand(u) - peak), -40, 30, limit=400)
    return peak + math.log(value)


def schools_rows(keys: int, particles: int, steps: int) -> list[dict]:
    data = (jnp.asarray(SIGMA_SCHOOLS, jnp.float32), jnp.asarray(Y_SCHOOLS, jnp.float32))
    exact = schools_log_evidence()
    guide = AutoNormal(schools)
    svi = SVI(schools, guide, optax.adam(0.01), Trace_ELBO(4))
    params = svi.run(jax.random.key(0), 10_000, *data, progress_bar=False).params
    rows = []
    for t in (None, steps):
        ml = MarginalLikelihood(
            schools, guide, params=params, num_particles=particles, annealing_steps=t
        )
        est = [ml(jax.random.key(300 + i), *data) for i in range(keys)]
        rows.append(summarize(est, exact, {"model": "eight schools", "annealing_steps": t or 0}))
    return rows


def summarize(est: list, exact: float, row: dict) -> dict:
    """Errors against the exact value, z-scores, coverage and k-hat over the keys."""
    err = np.array([float(e.log_marginal) - exact for e in est])
    se = np.array([float(e.stderr) for e in est])
    k_hat = np.array([float(e.k_hat) for e in est])
    row.update(
        exact=exact,
        mean_error=float(err.mean()),
        mean_z=float(np.mean(err / se)),
        coverage_2se=float(np.mean(np.abs(err) <= 2 * se)),
        median_se=float(np.median(se)),
        median_k_hat=float(np.median(k_hat)),
    )
    print(
        f"{row['model']:>36} T={row['annealing_steps']:>3} exact {exact:9.3f}  error "
        f"{row['mean_error']:+.3f}  s.e. {row['median_se']:.3f}  z {row['mean_z']:+.2f}  "
        f"coverage {row['coverage_2se']:.2f}  k-hat {row['median_k_hat']:.2f}",
        flush=True,
    )
    return row


def mass_rows(keys: int, particles: int) -> list[dict]:
    two_modes = dist.MixtureSameFamily(
        dist.Categorical(jnp.array([0.3, 0.7])),
        dist.Normal(jnp.array([-4.0, 4.0]), jnp.array([0.7, 0.7])),
    )
    cases = {
        "mass: two modes, guide N(3.5, 1.2)": (two_modes, dist.Normal(3.5, 1.2)),
        "mass: t(3), guide N(0, 1)": (dist.StudentT(3.0), dist.Normal(0.0, 1.0)),
    }
    rows = []
    for name, (target, proposal) in cases.items():

        def model(target=target):
            numpyro.sample("z", target)

        def guide(proposal=proposal):
            numpyro.sample("z", proposal)

        ml = MarginalLikelihood(model, guide, num_particles=particles)
        est = [ml(jax.random.key(400 + i)) for i in range(keys)]
        rows.append(summarize(est, 0.0, {"model": name, "annealing_steps": 0}))
    return rows


def logistic_model(features, labels):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([features.shape[1]]).to_event(1))
    with numpyro.plate("data", features.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=features @ w), obs=labels)


def logistic_band(keys: int, particles: int) -> dict:
    rng = np.random.default_rng(0)
    d, n = 6, 60
    cov = 0.6 * np.ones((d, d)) + 0.4 * np.eye(d)
    features = rng.multivariate_normal(np.zeros(d), cov, size=n).astype(np.float32)
    w_true = np.array([1.0, -0.5, 0.8, 0.0, -1.2, 0.4], np.float32)
    labels = (rng.random(n) < 1 / (1 + np.exp(-features @ w_true))).astype(np.float32)
    data = (jnp.asarray(features), jnp.asarray(labels))

    def fitted(guide_class):
        guide = guide_class(logistic_model)
        svi = SVI(logistic_model, guide, optax.adam(0.01), Trace_ELBO(4))
        return guide, svi.run(jax.random.key(0), 5000, *data, progress_bar=False).params

    full, full_params = fitted(AutoMultivariateNormal)
    reference = MarginalLikelihood(logistic_model, full, params=full_params, num_particles=400_000)(
        jax.random.key(1), *data
    )
    guide, params = fitted(AutoNormal)
    ml = MarginalLikelihood(logistic_model, guide, params=params, num_particles=particles)
    est = [ml(jax.random.key(200 + i), *data) for i in range(keys)]
    exact = float(reference.log_marginal)
    err = np.array([float(e.log_marginal) - exact for e in est])
    se = np.array([float(e.stderr) for e in est])
    k_hat = np.array([float(e.k_hat) for e in est])
    row = {
        "reference": exact,
        "reference_se": float(reference.stderr),
        "reference_k_hat": float(reference.k_hat),
        "mean_error": float(err.mean()),
        "mean_z": float(np.mean(err / se)),
        "coverage_2se": float(np.mean(np.abs(err) <= 2 * se)),
        "median_se": float(np.median(se)),
        "median_k_hat": float(np.median(k_hat)),
        "k_hat_quartiles": np.quantile(k_hat, [0.25, 0.75]).tolist(),
    }
    print(
        f"logistic d=6: reference {exact:.3f} +- {row['reference_se']:.4f} "
        f"(k-hat {row['reference_k_hat']:.2f}); mean-field K={particles}: error "
        f"{row['mean_error']:+.3f}  s.e. {row['median_se']:.3f}  z {row['mean_z']:+.2f}  "
        f"coverage {row['coverage_2se']:.2f}  k-hat {row['median_k_hat']:.2f} "
        f"(quartiles {row['k_hat_quartiles'][0]:.2f}-{row['k_hat_quartiles'][1]:.2f})",
        flush=True,
    )
    return row


#: The row-name prefix of each part, for --only.
PARTS = {"band": "logistic", "scale": "scale", "schools": "eight schools", "mass": "mass"}


def scale_rows(n: int, args: argparse.Namespace) -> list[dict]:
    x = np.asarray(jax.random.normal(jax.random.key(n), (n,)) * 1.5, np.float32)
    exact = exact_log_evidence(x)
    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(0.02), Trace_ELBO(8))
    params = svi.run(jax.random.key(0), 3000, jnp.asarray(x), progress_bar=False).params
    rows = []
    for steps in (None, args.annealing_steps):
        ml = MarginalLikelihood(
            model, guide, params=params, num_particles=args.particles, annealing_steps=steps
        )
        est = [ml(jax.random.key(100 + i), jnp.asarray(x)) for i in range(args.keys)]
        rows.append(summarize(est, exact, {"model": f"scale N={n}", "annealing_steps": steps or 0}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 20])
    parser.add_argument("--annealing-steps", type=int, default=50)
    parser.add_argument("--band-keys", type=int, default=100, help="keys for the 0.5-0.7 band")
    parser.add_argument("--only", choices=list(PARTS), default=None)
    args = parser.parse_args()
    record = new_record()
    record.update(keys=args.keys, particles=args.particles)
    path = HERE / "khat_limits.json"
    if args.only and path.exists():  # rerun one part, keep the others' rows
        kept = json.loads(path.read_text())
        record["band"] = kept.get("band")
        record["rows"] = [
            r for r in kept.get("rows", []) if not r["model"].startswith(PARTS[args.only])
        ]
    if args.only in (None, "band"):
        record["band"] = logistic_band(args.band_keys, args.particles)
    if args.only in (None, "scale"):
        for n in args.sizes:
            record["rows"] += scale_rows(n, args)
    if args.only in (None, "schools"):
        record["rows"] += schools_rows(args.keys, args.particles, args.annealing_steps)
    if args.only in (None, "mass"):
        record["rows"] += mass_rows(args.keys, args.particles)
    save_record(record, path)


if __name__ == "__main__":
    main()
