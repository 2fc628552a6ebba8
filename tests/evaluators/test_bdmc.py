"""Bidirectional Monte Carlo against exact evidence: exact with the exact posterior as
guide, a lower and an upper bound in expectation whose gap closes as T grows, per
simulated datapoint, the amortized guide fed the simulated data, refusals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.autoguide import AutoMultivariateNormal
import pytest

from numpyro_iwae import BidirectionalMC

NOISE = 0.5
POST_SCALE = math.sqrt(NOISE**2 / (1 + NOISE**2))  # z | y ~ N(0.8 y, 0.2)
SHRINK = 1 / (1 + NOISE**2)


def model(y):
    with numpyro.plate("data", jnp.shape(y)[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(z, NOISE), obs=y)


def exact_log_evidence(y):
    return dist.Normal(0.0, math.sqrt(1 + NOISE**2)).log_prob(y)  # per datapoint


def poor_guide(y):
    with numpyro.plate("data", jnp.shape(y)[0]):
        numpyro.sample("z", dist.Normal(0.7, 0.25))


def amortized_guide(y):  # the exact posterior, read from the data argument
    with numpyro.plate("data", jnp.shape(y)[0]):
        numpyro.sample("z", dist.Normal(SHRINK * y, POST_SCALE))


def test_the_exact_posterior_closes_the_sandwich_and_the_arguments_carry_the_data():
    # The guide reads y from its argument; the call replaces the argument by the
    # simulated data, so the guide is the exact posterior and every weight is p(y).
    bdmc = BidirectionalMC(model, amortized_guide, annealing_steps=10, num_particles=8)
    out = bdmc(jax.random.key(0), jnp.zeros(4))
    exact = exact_log_evidence(out.simulation.observed["y"])
    np.testing.assert_allclose(out.lower.pointwise, exact, atol=1e-4)
    np.testing.assert_allclose(out.upper.pointwise, exact, atol=1e-4)
    np.testing.assert_allclose(out.pointwise_gap, 0.0, atol=2e-4)
    assert out.lower.data_digest == out.upper.data_digest is not None


@pytest.mark.slow
def test_bounds_hold_in_expectation_over_simulated_datapoints_and_the_gap_closes():
    # Each simulated datapoint is its own problem with its own exact draw z*_n; the
    # bounds hold in expectation over (y_n, z*_n), so average over 60 of them (for one
    # fixed z* the reverse weight is not unbiased for 1 / p(y) at small T).
    n = 60
    bdmc = BidirectionalMC(model, poor_guide, num_particles=16, num_chains=16)
    sim = bdmc.simulate(jax.random.key(1), jnp.zeros(n))
    exact = np.asarray(exact_log_evidence(sim.observed["y"]))
    gaps = {}
    for steps in (3, 100):
        bdmc.annealing_steps = steps
        out = bdmc.sandwich(jax.random.key(2), sim, sim.observed["y"])
        below = np.asarray(out.lower.pointwise) - exact
        above = np.asarray(out.upper.pointwise) - exact
        se_below = below.std(ddof=1) / math.sqrt(n)
        se_above = above.std(ddof=1) / math.sqrt(n)
        assert below.mean() < 3 * se_below, (steps, below.mean(), se_below)
        assert above.mean() > -3 * se_above, (steps, above.mean(), se_above)
        if steps == 3:  # a poor guide and few steps: both bounds are strict
            assert below.mean() < -3 * se_below, (below.mean(), se_below)
            assert above.mean() > 3 * se_above, (above.mean(), se_above)
        gaps[steps] = float(out.gap) / n
    assert gaps[100] < 0.2 * gaps[3], gaps


def test_a_factor_or_no_observation_is_refused():
    def factor_model(y):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.factor("like", -((y - z) ** 2))

    def guide(y):
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="factor"):
        BidirectionalMC(factor_model, guide)(jax.random.key(0), 1.0)

    def prior_only(y):
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="observes nothing"):
        BidirectionalMC(prior_only, guide)(jax.random.key(0), 1.0)


def test_a_guide_drawing_other_sites_is_refused():
    guide = AutoMultivariateNormal(model)
    params = {"auto_loc": jnp.zeros(2), "auto_scale_tril": jnp.eye(2)}
    bdmc = BidirectionalMC(model, guide, params=params, annealing_steps=2)
    with pytest.raises(ValueError, match="_auto_latent"):
        bdmc(jax.random.key(0), jnp.zeros(2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"annealing_steps": 0}, "annealing_steps"),
        ({"num_chains": 0}, "num_chains"),
        ({"step_size": -1.0}, "step_size"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BidirectionalMC(model, poor_guide, **kwargs)
