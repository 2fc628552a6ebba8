"""MIWAE, CIWAE and RenyiELBO: exact identities at a shared key, orderings in
expectation, and gradients against exact enumeration.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import RenyiELBO as NumPyroRenyiELBO
import pytest

from numpyro_iwae import CIWAE, IWELBO, MIWAE, PIWAE, RenyiELBO
from numpyro_iwae.core.draw import log_weights
from numpyro_iwae.core.program import Program
from numpyro_iwae.maths.bounds import iwae_bound, renyi_bound

X = jnp.array([0.3, -1.2, 2.0, 0.7])


def model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc, scale = numpyro.param("loc", 0.3 * x), numpyro.param("scale", 0.9 * jnp.ones(4))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, scale))


EXACT = {"loc": X / 2, "scale": jnp.full(4, 0.5**0.5)}  # z | x ~ N(x / 2, 1 / 2)
POOR = {"loc": 0.3 * X, "scale": jnp.full(4, 0.9)}
LOG_PX = float(jnp.sum(dist.Normal(0.0, 2**0.5).log_prob(X)))


def shared_log_w(params, num, key):
    vmap = lambda fn, xs: jax.vmap(fn)(xs)  # noqa: E731
    weights, _ = log_weights(Program(model, guide, (X,)), params, key, num, vmap)
    return weights.log_w


@pytest.mark.slow
def test_miwae_with_m_not_k_against_the_same_particles():
    m, k, key = 5, 3, jax.random.key(0)
    params = {"loc": jnp.zeros(4), "scale": jnp.full(4, 0.4)}  # weights far from equal
    loss = MIWAE(num_particles=k, num_replicates=m).loss(key, params, model, guide, X)
    log_w = shared_log_w(params, m * k, key)  # the same key draws the same M K particles
    want = jnp.mean(jnp.stack([iwae_bound(log_w[i * k : (i + 1) * k]) for i in range(m)]), 0)
    np.testing.assert_allclose(-float(loss), float(jnp.sum(want)), rtol=1e-6)
    # The test has power: the axis-swapped bound (K sets of M) differs by far more than
    # the tolerance above.
    swapped = jnp.mean(jnp.stack([iwae_bound(log_w[i * m : (i + 1) * m]) for i in range(k)]), 0)
    assert abs(float(jnp.sum(swapped)) - float(jnp.sum(want))) > 1e-3 * abs(float(jnp.sum(want)))


@pytest.mark.slow
def test_ciwae_is_linear_in_beta_on_the_same_particles():
    k, key = 6, jax.random.key(1)
    log_w = shared_log_w(POOR, k, key)
    elbo, iwae = float(jnp.sum(jnp.mean(log_w, 0))), float(jnp.sum(iwae_bound(log_w)))
    for beta in (0.0, 0.3, 1.0):
        loss = CIWAE(num_particles=k, beta=beta).loss(key, POOR, model, guide, X)
        np.testing.assert_allclose(-float(loss), beta * elbo + (1 - beta) * iwae, rtol=1e-6)


def test_renyi_alpha_zero_is_iwelbo_and_alpha_one_the_elbo():
    k, key = 6, jax.random.key(2)
    iwelbo = IWELBO(k).loss(key, POOR, model, guide, X)
    renyi0 = RenyiELBO(alpha=0.0, num_particles=k).loss(key, POOR, model, guide, X)
    np.testing.assert_allclose(float(renyi0), float(iwelbo), rtol=1e-6)
    renyi1 = RenyiELBO(alpha=1.0, num_particles=k).loss(key, POOR, model, guide, X)
    elbo = jnp.sum(jnp.mean(shared_log_w(POOR, k, key), 0))
    np.testing.assert_allclose(-float(renyi1), float(elbo), rtol=1e-6)


def mean_se(objective, params, num=2000, seed=0, model=model, guide=guide):
    keys = jax.random.split(jax.random.key(seed), num)
    values = -np.asarray(
        jax.jit(jax.vmap(lambda k: objective.loss(k, params, model, guide, X)))(keys), np.float64
    )
    return values.mean(), values.std(ddof=1) / math.sqrt(num)


@pytest.mark.slow
def test_renyi_bound_decreases_in_alpha_and_is_exact_at_the_posterior():
    means = [mean_se(RenyiELBO(alpha=a, num_particles=8), POOR) for a in (0.0, 0.5, 1.0)]
    for (upper, se_u), (lower, se_l) in zip(means, means[1:]):
        assert upper - lower > 3 * math.hypot(se_u, se_l)
    assert LOG_PX - means[0][0] > 3 * means[0][1]
    for alpha in (0.0, 0.5, 1.0):
        loss = RenyiELBO(alpha=alpha, num_particles=8).loss(
            jax.random.key(3), EXACT, model, guide, X
        )
        np.testing.assert_allclose(-float(loss), LOG_PX, atol=1e-4)


@pytest.mark.slow
def test_renyi_agrees_with_numpyros_class_where_it_applies():
    ours, se_ours = mean_se(RenyiELBO(alpha=0.5, num_particles=4), POOR)
    theirs, se_theirs = mean_se(NumPyroRenyiELBO(alpha=0.5, num_particles=4), POOR, seed=1)
    assert abs(ours - theirs) < 3 * math.hypot(se_ours, se_theirs)


@pytest.mark.slow
def test_miwae_dreg_is_unbiased_for_its_reparam_gradient():
    def grads(objective, seed):
        keys = jax.random.split(jax.random.key(seed), 3000)
        fn = jax.vmap(jax.grad(lambda p, k: objective.loss(k, p, model, guide, X)), (None, 0))
        return jax.jit(fn)(POOR, keys)

    rep = grads(MIWAE(4, 3), 0)
    dreg = grads(MIWAE(4, 3, gradient_estimator="dreg"), 1)
    for name in POOR:
        a, b = np.asarray(rep[name], np.float64), np.asarray(dreg[name], np.float64)
        se = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
        assert np.all(np.abs(a.mean(0) - b.mean(0)) < 3.5 * se), name
        assert np.all(b.std(0) < a.std(0)), name  # and with less variance


def discrete_model():
    z = numpyro.sample("z", dist.Bernoulli(0.3))
    numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=1.5)


def discrete_guide():
    numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("phi", 0.4)))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.slow
def test_renyi_gradient_of_a_discrete_site_against_exact_enumeration(alpha):
    k = 2

    def log_w(z, phi):
        log_p = dist.Bernoulli(0.3).log_prob(z) + dist.Normal(2.0 * z, 1.0).log_prob(1.5)
        return log_p - dist.Bernoulli(logits=phi).log_prob(z)

    def expected_bound(phi):
        total = 0.0
        for zs in itertools.product((0.0, 1.0), repeat=k):
            zs = jnp.array(zs)
            prob = jnp.prod(jnp.exp(dist.Bernoulli(logits=phi).log_prob(zs)))
            total = total + prob * renyi_bound(log_w(zs, phi), alpha)
        return total

    want = float(jax.grad(expected_bound)(0.4))
    objective = RenyiELBO(alpha=alpha, num_particles=k)
    keys = jax.random.split(jax.random.key(0), 8000)
    grad = jax.vmap(
        jax.grad(lambda p, key: -objective.loss(key, p, discrete_model, discrete_guide)),
        (None, 0),
    )
    got = np.asarray(jax.jit(grad)({"phi": jnp.asarray(0.4)}, keys)["phi"], np.float64)
    assert abs(got.mean() - want) < 3 * got.std(ddof=1) / math.sqrt(got.size), (got.mean(), want)


def test_undefined_combinations_are_errors():
    with pytest.raises(ValueError, match="CIWAE takes gradient_estimator"):
        CIWAE(4, 0.5, gradient_estimator="dreg")
    with pytest.raises(ValueError, match="RenyiELBO takes gradient_estimator"):
        RenyiELBO(0.5, 4, gradient_estimator="dreg")
    with pytest.raises(ValueError, match="beta"):
        CIWAE(4, beta=1.5)
    with pytest.raises(ValueError, match="CIWAE has no score-function estimator"):
        CIWAE(2).loss(jax.random.key(0), {"phi": 0.4}, discrete_model, discrete_guide)
    with pytest.raises(ValueError, match="num_replicates"):
        MIWAE(4, 0)


def param_model(x):
    mu0 = numpyro.param("mu0", 0.2)  # a model parameter
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def global_model(x):
    mu0 = numpyro.param("mu0", 0.2)  # a model parameter, inside the local weights
    shift = numpyro.sample("shift", dist.Normal(0.0, 1.0))  # a global latent
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(shift + mu0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def global_guide(x):
    numpyro.sample("shift", dist.Normal(numpyro.param("s_loc", 0.1), 0.5))
    guide(x)


@pytest.mark.parametrize("weighting", ["joint", "local"])
@pytest.mark.slow
def test_piwae_gives_the_model_iwae_mk_and_the_guide_miwae(weighting):
    m, k, key = 3, 4, jax.random.key(7)
    fn, g = (param_model, guide) if weighting == "joint" else (global_model, global_guide)
    params = {**POOR, "mu0": jnp.asarray(0.2)}
    if weighting == "local":
        params["s_loc"] = jnp.asarray(0.1)

    def value_and_grad(objective):
        return jax.value_and_grad(lambda p: objective.loss(key, p, fn, g, X))(params)

    piwae_loss, piwae = value_and_grad(PIWAE(k, m, weighting=weighting))
    iwae_loss, iwae = value_and_grad(IWELBO(m * k, weighting=weighting))
    _, miwae = value_and_grad(MIWAE(k, m, weighting=weighting))
    # The same key draws the same M K particles for all three.
    np.testing.assert_allclose(float(piwae_loss), float(iwae_loss), rtol=1e-6)
    np.testing.assert_allclose(piwae["mu0"], iwae["mu0"], rtol=1e-5)
    assert abs(float(iwae["mu0"]) - float(miwae["mu0"])) > 1e-3  # the test has power
    for name in params:
        if name != "mu0":
            np.testing.assert_allclose(piwae[name], miwae[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["joint", "local"])
@pytest.mark.slow
def test_piwae_dreg_gives_the_guide_miwae_dregs_gradient(weighting):
    m, k, key = 3, 4, jax.random.key(8)
    params = {**POOR, "mu0": jnp.asarray(0.2)}

    def value_and_grad(objective):
        return jax.value_and_grad(lambda p: objective.loss(key, p, param_model, guide, X))(params)

    piwae_loss, piwae = value_and_grad(PIWAE(k, m, gradient_estimator="dreg", weighting=weighting))
    iwae_loss, iwae = value_and_grad(IWELBO(m * k, weighting=weighting))
    _, miwae = value_and_grad(MIWAE(k, m, gradient_estimator="dreg", weighting=weighting))
    _, miwae_reparam = value_and_grad(MIWAE(k, m, weighting=weighting))
    np.testing.assert_allclose(float(piwae_loss), float(iwae_loss), rtol=1e-6)
    np.testing.assert_allclose(piwae["mu0"], iwae["mu0"], rtol=1e-5)
    for name in params:
        if name != "mu0":
            np.testing.assert_allclose(piwae[name], miwae[name], rtol=1e-5, atol=1e-6)
            # DReG's gradient differs from the reparameterized one at a single key.
            assert not np.allclose(piwae[name], miwae_reparam[name], rtol=1e-3)


def test_piwae_dreg_refuses_global_latents_under_local_weighting():
    params = {**POOR, "mu0": jnp.asarray(0.2), "s_loc": jnp.asarray(0.1)}
    with pytest.raises(ValueError, match=r"PIWAE\(gradient_estimator='dreg'\).*\['shift'\]"):
        PIWAE(4, 2, gradient_estimator="dreg", weighting="local").loss(
            jax.random.key(0), params, global_model, global_guide, X
        )


def test_a_new_objective_is_one_class_on_the_base():
    # A Monte Carlo objective declared by its per-element bound alone (here the mean of
    # the log weights: the ELBO estimated with K particles) runs through the shared
    # pipeline: values, local weighting and subsampling scale come with it.
    from numpyro_iwae.objectives.base import Objective

    class MeanLogWeight(Objective):
        estimators = ("reparam",)

        def element_bound(self, log_w, log_q_score, score):
            return jnp.mean(log_w, axis=0)

    key = jax.random.key(3)
    ours = MeanLogWeight(6).loss(key, {}, model, guide, X)
    miwae = MIWAE(1, 6).loss(key, {}, model, guide, X)  # K ELBOs averaged: the same
    np.testing.assert_allclose(float(ours), float(miwae), rtol=1e-5)
    assert repr(MeanLogWeight(6)) == (
        "MeanLogWeight(num_particles=6, gradient_estimator='reparam', weighting='auto')"
    )
    with pytest.raises(ValueError, match="gradient_estimator"):
        MeanLogWeight(6, gradient_estimator="dreg")
