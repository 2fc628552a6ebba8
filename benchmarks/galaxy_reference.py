"""An independent reference for the galaxy evidences: blackjax's adaptive tempered SMC.

examples/galaxy.py estimates log p(y) of C-component mixtures of the galaxy velocities
with this library (assignments summed out by funsor, weights from a fitted guide). This
script computes the same evidences with code that shares nothing with that path: the
log prior and log likelihood are written here in plain ``jax.numpy`` (the sum over the
assignments is a ``logsumexp`` per galaxy), and the evidence is the product of the mean
incremental weights of blackjax's adaptive tempered SMC (prior to posterior, the next
temperature by bisection on an ESS target, systematic resampling, HMC moves with a
diagonal mass matrix from the particle cloud; Del Moral, Doucet & Jasra 2006). The
standard error is over independent replicates.

Parametrization (unconstrained, Jacobians included): weights by additive log-ratios
against the last one, ordered means by mu_1 and log gaps, variances by their logs. The
means are ordered with density C! prod_c N(mu_c; 20, 10^2), so the evidence is that of the
exchangeable prior (see the example's docstring).

blackjax is not a dependency of the library; install it to rerun:
``pip install blackjax`` (1.7.1 here). Writes benchmarks/galaxy_reference.json.

Run:  python benchmarks/galaxy_reference.py       (about 15 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
from pathlib import Path
import time

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, logsumexp
from jax.scipy.stats import norm
import numpy as np

HERE = Path(__file__).resolve().parent


def unpack(x: jax.Array, c: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log weights, ordered means, log variances) from the unconstrained vector."""
    logw = jax.nn.log_softmax(jnp.concatenate([x[: c - 1], jnp.zeros(1)]))
    gaps = x[c : 2 * c - 1]
    mu = x[c - 1] + jnp.concatenate([jnp.zeros(1), jnp.cumsum(jnp.exp(gaps))])
    return logw, mu, x[2 * c - 1 :]


def log_prior(x: jax.Array, c: int) -> jax.Array:
    logw, mu, log_var = unpack(x, c)
    dirichlet = gammaln(c) + logw.sum()  # Dirichlet(1) density times the log-ratio Jacobian
    means = math.lgamma(c + 1) + norm.logpdf(mu, 20.0, 10.0).sum() + x[c : 2 * c - 1].sum()
    # InverseGamma(3, 20) on exp(log_var), times the Jacobian exp(log_var).
    variances = (3 * jnp.log(20.0) - gammaln(3.0) - 3 * log_var - 20.0 / jnp.exp(log_var)).sum()
    return dirichlet + means + variances


def log_likelihood(x: jax.Array, c: int, y: jax.Array) -> jax.Array:
    logw, mu, log_var = unpack(x, c)
    per_galaxy = logw + norm.logpdf(y[:, None], mu, jnp.exp(0.5 * log_var))
    return logsumexp(per_galaxy, axis=1).sum()


def prior_draws(key: jax.Array, n: int, c: int) -> jax.Array:
    k_w, k_mu, k_var = jax.random.split(key, 3)
    w = jax.random.dirichlet(k_w, jnp.ones(c), (n,))
    mu = jnp.sort(20.0 + 10.0 * jax.random.normal(k_mu, (n, c)), axis=1)
    var = 20.0 / jax.random.gamma(k_var, 3.0, (n, c))
    return jnp.concatenate(
        [
            jnp.log(w[:, :-1]) - jnp.log(w[:, -1:]),
            mu[:, :1],
            jnp.log(jnp.diff(mu, axis=1)),
            jnp.log(var),
        ],
        axis=1,
    )


def smc_log_evidence(key: jax.Array, c: int, y: jax.Array, args: argparse.Namespace):
    import blackjax
    from blackjax.smc.tuning.from_particles import inverse_mass_matrix_from_particles

    def parameters(particles: jax.Array) -> dict:
        return {
            "inverse_mass_matrix": inverse_mass_matrix_from_particles(particles)[None],
            "step_size": jnp.array([args.step_size]),
            "num_integration_steps": jnp.array([args.leapfrog_steps]),
        }

    start = prior_draws(jax.random.fold_in(key, 1), args.particles, c)
    smc = blackjax.inner_kernel_tuning(
        smc_algorithm=blackjax.adaptive_tempered_smc,
        logprior_fn=lambda x: log_prior(x, c),
        loglikelihood_fn=lambda x: log_likelihood(x, c, y),
        mcmc_step_fn=blackjax.hmc.build_kernel(),
        mcmc_init_fn=blackjax.hmc.init,
        resampling_fn=blackjax.smc.resampling.systematic,
        mcmc_parameter_update_fn=lambda key, state, info: parameters(state.particles),
        initial_parameter_value=parameters(start),
        num_mcmc_steps=args.moves,
        target_ess=args.target_ess,
    )

    def step(carry):
        key, state, log_z, temperatures = carry
        key, sub = jax.random.split(key)
        state, info = smc.step(sub, state)
        return key, state, log_z + info.log_likelihood_increment, temperatures + 1

    def unfinished(carry):
        return carry[1].sampler_state.tempering_param < 1.0

    carry = (key, smc.init(start), jnp.zeros(()), jnp.zeros((), jnp.int32))
    _, _, log_z, temperatures = jax.lax.while_loop(unfinished, step, carry)
    return log_z, temperatures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--components", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--replicates", type=int, default=5)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--target-ess", type=float, default=0.9)
    parser.add_argument("--moves", type=int, default=50, help="HMC moves per temperature")
    parser.add_argument("--step-size", type=float, default=0.1)
    parser.add_argument("--leapfrog-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "galaxy_reference.json")
    args = parser.parse_args(argv)

    spec = importlib.util.spec_from_file_location("galaxy", HERE.parent / "examples" / "galaxy.py")
    galaxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(galaxy)
    y = jnp.asarray(galaxy.load_galaxies())

    results: dict = {
        "method": "blackjax adaptive tempered SMC, HMC moves",
        "versions": {p: importlib.metadata.version(p) for p in ("jax", "blackjax")},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "components": {},
    }
    for c in args.components:
        run = jax.jit(lambda key, c=c: smc_log_evidence(key, c, y, args))
        began = time.perf_counter()
        values, temperatures = [], []
        for r in range(args.replicates):
            log_z, steps = run(jax.random.PRNGKey(100 * c + r))
            values.append(float(log_z))
            temperatures.append(int(steps))
        values_arr = np.array(values)
        row = {
            "replicates": values,
            "temperatures": temperatures,
            "log_p": float(values_arr.mean()),
            "stderr": float(values_arr.std(ddof=1) / np.sqrt(len(values))),
            "seconds": time.perf_counter() - began,
        }
        results["components"][str(c)] = row
        print(
            f"C = {c}: log p(y) = {row['log_p']:.3f} +- {row['stderr']:.3f} "
            f"({np.round(values_arr, 3).tolist()}, {temperatures[0]} temperatures, "
            f"{row['seconds']:.0f} s)",
            flush=True,
        )
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
