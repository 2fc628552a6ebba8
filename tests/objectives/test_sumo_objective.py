"""SUMO as an SVI objective: unbiased for the IWAE bound and its model gradient, the guide
objectives' gradients, and T redrawn at every step of a jitted loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI
import optax
import pytest

from numpyro_iwae import IWELBO, SUMO
from numpyro_iwae.maths.sumo import (
    sample_sumo_terms,
)

# ------------------------------------------------------------ the SUMO objective

XS = jnp.array([1.0, -0.5, 2.0])


def model(x):
    mu0 = numpyro.param("mu0", 0.0)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", jnp.zeros(x.shape[0]))
    log_scale = numpyro.param("log_scale", jnp.zeros(x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)))


def log_evidence(x, mu0=0.0):
    return float(jnp.sum(dist.Normal(mu0, math.sqrt(2.0)).log_prob(x)))


@pytest.mark.slow
def test_exact_posterior_gives_log_p_at_every_key():
    params = {"mu0": 0.0, "loc": XS / 2, "log_scale": jnp.full(3, 0.5 * math.log(0.5))}
    for i in range(5):
        loss = SUMO().loss(jax.random.key(i), params, model, guide, XS)
        np.testing.assert_allclose(-loss, log_evidence(XS), atol=2e-4)


# A guide wider than the posterior (variance 0.5): bounded weights, light tails.
WIDE = {"mu0": 0.3, "loc": XS / 2 + 0.2, "log_scale": jnp.full(3, 0.0)}


def per_key(objective, keys, params=WIDE):
    def one(key):
        return jax.value_and_grad(lambda p: -objective.loss(key, p, model, guide, XS))(params)

    return jax.jit(jax.vmap(one))(keys)


@pytest.mark.slow
def test_unbiased_for_the_iwae_bound_and_its_model_gradient():
    n = 4000
    value, grad = per_key(SUMO(), jax.random.split(jax.random.key(10), n))
    iwae, iwae_grad = per_key(IWELBO(81), jax.random.split(jax.random.key(11), n))
    elbo = per_key(IWELBO(1), jax.random.split(jax.random.key(12), n))[0]
    for a, b in [(value, iwae), (grad["mu0"], iwae_grad["mu0"])]:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 3 * se, (a.mean(), b.mean(), se)
    se = math.sqrt(np.var(value) / n + np.var(elbo) / n)
    assert np.mean(value) - np.mean(elbo) > 5 * se  # SUMO is above the ELBO


@pytest.mark.slow
def test_iwae_guide_objective_gives_the_guide_iwelbos_gradient():
    key = jax.random.key(3)
    _, g = per_key(SUMO(guide_objective="iwae"), key[None])
    _, g_iw = per_key(IWELBO(81), jax.random.split(key)[0][None])
    for name in ("loc", "log_scale"):
        np.testing.assert_allclose(g[name], g_iw[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_variance_objective_reduces_the_estimators_variance():
    params = {"mu0": 0.0, "loc": jnp.zeros(3), "log_scale": jnp.full(3, 0.7)}
    keys = jax.random.split(jax.random.key(20), 2000)

    def variance(p):
        return float(np.var(np.asarray(per_key(SUMO(), keys, p)[0])))

    before = variance(params)
    svi = SVI(model, guide, optax.adam(0.02), SUMO())
    state = svi.init(jax.random.key(0), XS, init_params=params)
    state, _ = jax.lax.scan(lambda s, _: svi.update(s, XS), state, None, length=300)
    after = variance({**svi.get_params(state), "mu0": 0.0})
    assert after < 0.2 * before, (before, after)


@pytest.mark.slow
def test_terms_vary_across_steps_of_a_jitted_svi_loop(monkeypatch):
    # Record T at run time (a debug callback fires per execution, not per trace).
    import numpyro_iwae.objectives.sumo as sumo_module

    seen = []

    def spy(key, max_terms, shape=(), *tail):
        terms = sample_sumo_terms(key, max_terms, shape, *tail)
        jax.debug.callback(lambda t: seen.append(np.asarray(t).copy()), terms)
        return terms

    monkeypatch.setattr(sumo_module, "sample_sumo_terms", spy)
    svi = SVI(model, guide, optax.adam(0.01), SUMO())
    state = svi.init(jax.random.key(0), XS, init_params=WIDE)
    step = jax.jit(lambda s: svi.update(s, XS)[0])
    traced = len(seen)
    for _ in range(20):
        state = step(state)
    jax.effects_barrier()
    runs = seen[traced:]
    assert len(runs) == 20 and all(r.shape == (3,) for r in runs)  # one T per datapoint
    assert len({tuple(r) for r in runs}) >= 15


def test_sumo_refuses_discrete_guides_and_bad_arguments():
    for tail in ((0, 0.9), (80, 1.0), (80, 0.0), (2.5, 0.9)):
        with pytest.raises(ValueError, match="tail_"):
            SUMO(tail_start=tail[0], tail_ratio=tail[1])

    def discrete_model():
        numpyro.sample("z", dist.Bernoulli(0.5))

    def discrete_guide():
        numpyro.sample("z", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="no score-function estimator"):
        SUMO().loss(jax.random.key(0), {}, discrete_model, discrete_guide)
    with pytest.raises(ValueError, match="guide_objective"):
        SUMO(guide_objective="kl")
    with pytest.raises(ValueError, match="max_terms"):
        SUMO(max_terms=0)


def test_max_terms_is_checked():
    with pytest.raises(ValueError, match="max_terms"):
        sample_sumo_terms(jax.random.key(0), 0)
