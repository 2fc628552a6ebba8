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

Run:  python benchmarks/khat_limits.py           (writes khat_limits.json)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 20])
    parser.add_argument("--annealing-steps", type=int, default=50)
    args = parser.parse_args()
    record = new_record()
    record.update(keys=args.keys, particles=args.particles)
    for n in args.sizes:
        x = np.asarray(jax.random.normal(jax.random.key(n), (n,)) * 1.5, np.float32)
        exact = exact_log_evidence(x)
        guide = AutoNormal(model)
        svi = SVI(model, guide, optax.adam(0.02), Trace_ELBO(8))
        params = svi.run(jax.random.key(0), 3000, jnp.asarray(x), progress_bar=False).params
        for steps in (0, args.annealing_steps):
            ml = MarginalLikelihood(
                model, guide, params=params, num_particles=args.particles, annealing_steps=steps
            )
            est = [ml(jax.random.key(100 + i), jnp.asarray(x)) for i in range(args.keys)]
            err = np.array([float(e.log_marginal) - exact for e in est])
            se = np.array([float(e.stderr) for e in est])
            k_hat = np.array([float(e.k_hat) for e in est])
            row = {
                "N": n,
                "annealing_steps": steps,
                "exact": exact,
                "mean_error": float(err.mean()),
                "mean_z": float(np.mean(err / se)),
                "coverage_2se": float(np.mean(np.abs(err) <= 2 * se)),
                "median_se": float(np.median(se)),
                "median_k_hat": float(np.median(k_hat)),
            }
            record["rows"].append(row)
            print(
                f"N={n:>3} T={steps:>3} exact {exact:9.3f}  error {row['mean_error']:+.3f}"
                f"  s.e. {row['median_se']:.3f}  z {row['mean_z']:+.2f}"
                f"  coverage {row['coverage_2se']:.2f}  k-hat {row['median_k_hat']:.2f}",
                flush=True,
            )
    save_record(record, HERE / "khat_limits.json")


if __name__ == "__main__":
    main()
