"""SUMO (Luo et al., 2020): the sampler of T matches the survival function it
divides by, T is redrawn inside jit, the estimator is unbiased for the IWAE bound of
its largest particle count (log p(x) as that grows), and the SVI objective gives the
model that bound's gradient and the guide a lower-variance estimator."""

from functools import partial
import math

import gaussians
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI
import optax
import pytest

from numpyro_iwae import IWELBO, SUMO, SUMOMarginal
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
        with pytest.raises(ValueError, match="tail_"):
            SUMO(tail_start=tail[0], tail_ratio=tail[1])
        with pytest.raises(ValueError, match="tail_"):
            SUMOMarginal(eval_model, shifted_guide, tail_start=tail[0], tail_ratio=tail[1])


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
