"""SUMOMarginal: exact with the exact posterior, unbiased where IWAE at its cost is below,
chunk-invariant, its cost, its checks and its export."""

from functools import partial
import math

import gaussians
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_iwae import SUMOMarginal
from numpyro_iwae.maths.sumo import (
    expected_sumo_terms,
    sumo_estimate,
    sumo_survival,
)

# ------------------------------------------------------------ SUMO as an evaluator

EVAL_X = jnp.linspace(-2.0, 2.0, 8)
POST_SCALE = 0.5**0.5


def eval_model(x):
    with numpyro.plate("n", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def shifted_guide(x, shift=0.45):
    # The posterior N(x/2, 1/2) moved by 0.64 posterior standard deviations:
    # log-normal weights (every moment finite), an IWAE_6 gap of about 0.04 each.
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("z", dist.Normal(x / 2 + shift, POST_SCALE))


@pytest.mark.slow
def test_evaluator_is_exact_with_the_exact_posterior():
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(EVAL_X)
    for max_terms in (80, None):
        est = SUMOMarginal(
            eval_model, partial(shifted_guide, shift=0.0), max_terms=max_terms, num_replicates=20
        )(jax.random.key(0), EVAL_X)
        assert est.replicates.shape == (20, 8)
        np.testing.assert_allclose(est.replicates, np.broadcast_to(exact, (20, 8)), atol=2e-5)
        assert float(est.stderr) < 1e-5


@pytest.mark.slow
def test_evaluator_is_unbiased_where_iwae_at_its_cost_is_below():
    r = 8000
    est = SUMOMarginal(eval_model, shifted_guide, num_replicates=r)(jax.random.key(4), EVAL_X)
    x = np.asarray(EVAL_X, np.float64)[:, None]
    exact = float(np.sum(gaussians.log_evidence(x, [1.0], [0.0], [1.0])))
    loc = x[:, 0] / 2 + 0.45
    # IWAE at about SUMO's expected cost per element (m + E[T] = 5.97 -> 6) and at
    # its largest (81, what the truncated SUMO is unbiased for), independently.
    rng = np.random.default_rng(0)
    bound = {
        k: gaussians.mc_iwae_bound(rng, x, [1.0], [0.0], [1.0], loc, POST_SCALE, k, 4000)
        for k in (6, 81)
    }
    iwae6, se6 = (float(np.sum(bound[6][0])), float(np.sqrt(np.sum(bound[6][1] ** 2))))
    gap81 = exact - float(np.sum(bound[81][0]))
    se = float(est.stderr)
    assert gap81 < se  # the truncation's bias is below what this test can see
    assert abs(float(est.log_marginal) - exact) < 4 * se, (float(est.log_marginal), exact, se)
    assert exact - iwae6 > 10 * se6  # IWAE at the same cost is detectably low ...
    assert float(est.log_marginal) - iwae6 > 4 * math.hypot(se, se6)  # ... and SUMO above it


def test_evaluator_does_not_depend_on_the_chunk_size():
    def run(chunk):
        est = SUMOMarginal(eval_model, shifted_guide, num_replicates=50, chunk_size=chunk)
        return est(jax.random.key(1), EVAL_X)

    one, seven = run(1), run(7)
    np.testing.assert_allclose(one.replicates, seven.replicates, rtol=1e-5, atol=1e-5)
    # Rounded up to whole chunks: never fewer particles than one at a time.
    assert float(seven.mean_particles) >= float(one.mean_particles)


def test_evaluator_cost_is_m_plus_the_expected_terms():
    # One element, chunks of one particle: particles drawn = m + T exactly.
    r, m = 4000, 2
    est = SUMOMarginal(
        eval_model, shifted_guide, min_particles=m, max_terms=80, num_replicates=r, chunk_size=1
    )(jax.random.key(2), EVAL_X[:1])
    k = np.arange(1, 81)
    p = np.asarray(sumo_survival(k), np.float64)
    mean_t = p.sum()
    var_t = np.sum((2 * k - 1) * p) - mean_t**2  # E[T^2] = sum (2k - 1) P(T >= k)
    assert abs(float(est.mean_particles) - (m + mean_t)) < 4 * math.sqrt(var_t / r)
    np.testing.assert_allclose(expected_sumo_terms(80), mean_t, rtol=1e-5)
    assert est.pointwise.shape == (1,)


def test_sumo_estimate_exports_its_replicates_like_the_other_estimates():
    est = SUMOMarginal(eval_model, shifted_guide, num_replicates=5)(jax.random.key(0), EVAL_X)
    idata = est.to_inference_data()
    stats = idata.sample_stats["log_marginal_likelihood"]
    assert stats.shape == (1, 5, 8)
    np.testing.assert_allclose(np.asarray(stats)[0], np.asarray(est.replicates))
    assert idata.sample_stats.attrs["log_marginal"] == pytest.approx(float(est.log_marginal))
    assert idata.sample_stats.attrs["stderr"] == pytest.approx(float(est.stderr))


def test_evaluator_checks_its_arguments_and_the_pair():
    for tail in ((0, 0.9), (80, 1.0), (80, 0.0), (2.5, 0.9)):
        with pytest.raises(ValueError, match="tail_"):
            SUMOMarginal(eval_model, shifted_guide, tail_start=tail[0], tail_ratio=tail[1])
    for bad in ({"num_replicates": 0}, {"max_terms": 0}, {"chunk_size": 0}, {"min_particles": 0}):
        with pytest.raises(ValueError):
            SUMOMarginal(eval_model, shifted_guide, **bad)
    one = SUMOMarginal(eval_model, shifted_guide, num_replicates=1)(jax.random.key(0), EVAL_X)
    assert np.isnan(float(one.stderr))  # unknown, not 0

    def point_guide(x):
        with numpyro.plate("n", x.shape[0]):
            numpyro.sample("z", dist.Delta(x / 2))

    with pytest.raises(ValueError, match="point mass"):
        SUMOMarginal(eval_model, point_guide)(jax.random.key(0), EVAL_X)
    with pytest.raises(ValueError, match="NaN"):
        SUMOMarginal(eval_model, shifted_guide)(jax.random.key(0), EVAL_X.at[3].set(jnp.nan))


def test_all_zero_weights_give_minus_infinity_not_nan():
    log_w = jnp.full((12, 2), -jnp.inf).at[:, 1].set(0.0)
    value = sumo_estimate(log_w, jnp.array([11, 11]), 1)
    assert float(value[0]) == -np.inf and abs(float(value[1])) < 1e-5
