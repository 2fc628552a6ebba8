"""The SUMO series (Luo et al., 2020) on plain arrays: the sampler of T matches the survival
function it divides by, T is redrawn inside jit, and the estimate is unbiased for the IWAE
bound of its largest particle count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_iwae.maths.sumo import (
    expected_sumo_terms,
    sample_sumo_terms,
    sumo_estimate,
    sumo_survival,
)


@pytest.mark.slow
def test_expected_number_of_terms():
    # E[T] = sum_k P(T >= k): the cost of one estimate beyond its m particles.
    expected = float(jnp.sum(sumo_survival(jnp.arange(1, 100_000))))
    head = sum(1 / k for k in range(1, 80))
    np.testing.assert_allclose(expected, head + (1 / 80) / (1 - 0.9), rtol=1e-5)
    assert 5.0 < expected < 5.1
    np.testing.assert_allclose(expected_sumo_terms(), expected, rtol=1e-5)
    for cap in (1, 3, 79, 80, 81, 200):
        capped = float(jnp.sum(sumo_survival(jnp.arange(1, cap + 1))))
        np.testing.assert_allclose(expected_sumo_terms(cap), capped, rtol=1e-5)
    short = float(jnp.sum(sumo_survival(jnp.arange(1, 2000), 5, 0.7)))
    np.testing.assert_allclose(expected_sumo_terms(None, 5, 0.7), short, rtol=1e-5)


@pytest.mark.parametrize("tail", [(80, 0.9), (5, 0.7), (1, 0.5)])
def test_sampler_matches_the_survival_function_it_divides_by(tail):
    n, max_terms = 400_000, 200
    t = np.asarray(sample_sumo_terms(jax.random.key(0), max_terms, (n,), *tail))
    assert t.min() >= 1 and t.max() <= max_terms
    for k in (1, 2, 3, 4, 5, 6, 10, 40, 79, 80, 81, 100, 120):
        p = float(sumo_survival(k, *tail))
        se = math.sqrt(p * (1 - p) / n)
        assert abs((t >= k).mean() - p) <= 3.5 * se + 1e-12, (k, (t >= k).mean(), p)


def test_truncation_arguments_are_checked():
    for tail in ((0, 0.9), (80, 1.0), (80, 0.0), (2.5, 0.9)):
        with pytest.raises(ValueError, match="tail_"):
            sumo_survival(3, *tail)


def test_terms_are_redrawn_inside_jit():
    draw = jax.jit(lambda key: sample_sumo_terms(key, 200))
    ts = {int(draw(jax.random.key(i))) for i in range(40)}
    assert len(ts) > 5


def test_exact_posterior_gives_log_p_for_every_t():
    log_w = jnp.full((31, 3), -2.5)
    for t in (1, 4, 30):
        np.testing.assert_allclose(sumo_estimate(log_w, t, min_particles=1), -2.5, atol=1e-5)


@pytest.mark.parametrize("tail, t_max", [((80, 0.9), 80), ((5, 0.7), 20)])
@pytest.mark.slow
def test_unbiased_for_the_iwae_bound_of_all_particles(tail, t_max):
    # Bounded weights with E[w] = 1 and T_max = 80 (no geometric tail: a light-tailed
    # estimate, so the sample standard error is reliable): E[SUMO] = E[IWAE_81], while
    # IWAE_1 = E[log w] lies 0.24 below. Likewise with a short head and 15 tail terms.
    n, m = 100_000, 1

    def one(key):
        k_w, k_t = jax.random.split(key)
        log_w = jnp.log(jax.random.uniform(k_w, (m + t_max,), minval=0.05, maxval=1.95))
        sumo = sumo_estimate(log_w, sample_sumo_terms(k_t, t_max, (), *tail), m, *tail)
        return sumo, jax.nn.logsumexp(log_w) - math.log(m + t_max), log_w[0]

    keys = jax.random.split(jax.random.key(1), n)
    sumo, iwae_all, iwae_m = (np.asarray(v, np.float64) for v in jax.jit(jax.vmap(one))(keys))
    se = math.sqrt(sumo.var() / n + iwae_all.var() / n)
    assert abs(sumo.mean() - iwae_all.mean()) < 3 * se, (sumo.mean(), iwae_all.mean(), se)
    assert abs(sumo.mean() - iwae_m.mean()) > 30 * se


@pytest.mark.slow
def test_per_element_terms_and_gradient():
    log_w = jax.random.normal(jax.random.key(2), (21, 4))
    t = jnp.array([1, 3, 7, 20])
    per_element = sumo_estimate(log_w, t, 1)
    for i in range(4):
        np.testing.assert_allclose(
            per_element[i], sumo_estimate(log_w[:, i], int(t[i]), 1), rtol=1e-6
        )
    grad = jax.grad(lambda lw: jnp.sum(sumo_estimate(lw, t, 1)))(log_w)
    assert np.all(np.isfinite(grad))
    # Particles beyond m + T carry no weight.
    assert np.all(np.asarray(grad)[2:, 0] == 0)


def test_min_particles_is_checked():
    with pytest.raises(ValueError, match="min_particles"):
        sumo_estimate(jnp.zeros(5), 2, min_particles=5)
