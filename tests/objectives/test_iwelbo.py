"""IWELBO against exact answers: analytic evidence, Trace_ELBO, Neal's funnel."""

import math
import warnings

from conftest import bound_stats
from gaussians import assert_within, log_evidence, posterior
import jax
from jax.example_libraries import stax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
import optax
import pytest

from numpyro_iwae import IWELBO, JointWeightsWarning, UnweightedBoundWarning

A = np.array([1.0, -0.5, 2.0])
B = np.array([0.1, 0.0, -0.3])
SIG = np.array([0.5, 1.0, 0.8])
X = np.random.default_rng(0).normal(size=(4, 3)) + np.array([0.5, -0.2, 1.0])


def local_model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(A * z[:, None] + B, SIG).to_event(1), obs=x)


def local_guide(x):
    loc = numpyro.param("q_loc", jnp.zeros(x.shape[0]))
    scale = numpyro.param("q_scale", jnp.ones(x.shape[0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, scale))


def exact_local_params(x):
    loc, scale = posterior(x, A, B, SIG)
    return {"q_loc": jnp.asarray(loc, jnp.float32), "q_scale": jnp.asarray(scale, jnp.float32)}


def global_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 0.7), obs=x)


def global_guide(x):
    loc = numpyro.param("q_loc", 0.0)
    scale = numpyro.param("q_scale", 1.0, constraint=constraints.positive)
    numpyro.sample("z", dist.Normal(loc, scale))


XG = X[:, 0]
ONES, ZEROS = np.ones(XG.shape), np.zeros(XG.shape)


def float_tol(truth):
    # float32 log densities of O(|truth|) summed over a few terms: a few ulps each.
    return 1e-5 * max(1.0, abs(truth)) * 4


@pytest.mark.parametrize("num_particles", [1, 7, 64])
@pytest.mark.slow
def test_exact_posterior_gives_log_evidence_per_datapoint(num_particles):
    truth = log_evidence(X, A, B, SIG).sum()
    loss = IWELBO(num_particles).loss(
        jax.random.key(1), exact_local_params(X), local_model, local_guide, X
    )
    assert abs(-float(loss) - truth) < float_tol(truth)


@pytest.mark.parametrize("num_particles", [1, 7, 64])
def test_exact_posterior_gives_log_evidence_joint(num_particles):
    truth = log_evidence(XG, ONES, ZEROS, 0.7 * ONES)
    loc, scale = posterior(XG, ONES, ZEROS, 0.7 * ONES)
    params = {"q_loc": jnp.float32(loc), "q_scale": jnp.float32(scale)}
    loss = IWELBO(num_particles).loss(jax.random.key(2), params, global_model, global_guide, XG)
    assert abs(-float(loss) - truth) < float_tol(truth)


# A deliberately poor guide: the bound has a clear gap to log p(x) at K = 1.
POOR = {"q_loc": jnp.zeros(4), "q_scale": jnp.full(4, 1.5)}


def test_k1_agrees_with_trace_elbo_in_expectation():
    ours, se_ours = bound_stats(IWELBO(1), POOR, local_model, local_guide, X, reps=4000)
    ref, se_ref = bound_stats(Trace_ELBO(), POOR, local_model, local_guide, X, reps=4000, seed=1)
    assert_within(ours, math.hypot(se_ours, se_ref), ref, what="K=1 vs Trace_ELBO")


@pytest.mark.slow
def test_bound_below_log_evidence_and_rising_in_k():
    truth = log_evidence(X, A, B, SIG).sum()
    ks = [1, 4, 16, 64]
    means, ses = zip(
        *(bound_stats(IWELBO(k), POOR, local_model, local_guide, X, reps=2000, seed=k) for k in ks)
    )
    for k, m, s in zip(ks, means, ses):
        assert m <= truth + 4 * s, f"K={k}: bound {m} above log p(x) {truth}"
    for i in range(len(ks) - 1):
        se = math.hypot(ses[i], ses[i + 1])
        assert means[i + 1] > means[i] - 4 * se, f"bound fell from K={ks[i]} to {ks[i + 1]}"
    # The rise is real, not noise: from K=1 to K=64 it exceeds 10 standard errors.
    assert means[-1] - means[0] > 10 * math.hypot(ses[0], ses[-1])
    # ...and closes most of the gap for this 1-d posterior.
    assert truth - means[-1] < 0.2 * (truth - means[0])


def subsampled_model(x, batch):
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as idx:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(A * z[:, None] + B, SIG).to_event(1), obs=x[idx])


def subsampled_guide(x, batch):
    loc = numpyro.param("q_loc", jnp.zeros(x.shape[0]))
    scale = numpyro.param("q_scale", jnp.ones(x.shape[0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as idx:
        numpyro.sample("z", dist.Normal(loc[idx], scale[idx]))


@pytest.mark.slow
def test_subsampled_plate_is_unbiased_for_full_data_bound():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(10, 3)) * 2.0)
    params = {"q_loc": jnp.linspace(-1.0, 1.0, 10), "q_scale": jnp.full(10, 1.5)}
    elbo = IWELBO(8)
    full, se_full = bound_stats(
        elbo, params, subsampled_model, subsampled_guide, x, None, reps=4000
    )
    sub, se_sub = bound_stats(
        elbo, params, subsampled_model, subsampled_guide, x, 3, reps=20000, seed=1
    )
    se = math.hypot(se_full, se_sub)
    assert_within(sub, se, full, what="minibatch bound vs full-data bound")

    # The test can tell: scaling N/B *inside* the logsumexp is a visible bias.
    def inside(key):
        from numpyro_iwae.core.draw import log_weights
        from numpyro_iwae.core.program import Program

        program = Program(subsampled_model, subsampled_guide, (x, 3))
        weights, structure = log_weights(program, params, key, 8, lambda f, k: jax.vmap(f)(k))
        scaled = structure.scale * weights.log_w
        return jnp.sum(jax.nn.logsumexp(scaled, axis=0) - math.log(8))

    biased = np.asarray(jax.jit(jax.vmap(inside))(jax.random.split(jax.random.key(5), 40000)))
    se_biased = biased.std() / math.sqrt(biased.size)
    assert abs(biased.mean() - full) > 8 * math.hypot(se_full, se_biased)


def funnel():
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", 9):
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))


@pytest.mark.slow
def test_funnel_fitted_bound_below_zero_and_rising_in_k():
    guide = AutoNormal(funnel)
    svi = SVI(funnel, guide, optax.adam(0.01), IWELBO(10))
    params = svi.run(jax.random.key(0), 3000, progress_bar=False).params
    ks = [1, 10, 100, 1000]
    reps = {1: 4000, 10: 2000, 100: 1000, 1000: 300}
    stats = [bound_stats(IWELBO(k), params, funnel, guide, reps=reps[k], seed=k) for k in ks]
    for k, (m, s) in zip(ks, stats):
        assert m <= 4 * s, f"K={k}: funnel bound {m} above log Z = 0"
    for (m0, s0), (m1, s1) in zip(stats, stats[1:]):
        assert m1 > m0 + 3 * math.hypot(s0, s1)


@pytest.mark.parametrize("vectorize", [False, lambda fn, keys: jax.vmap(fn)(keys)])
@pytest.mark.slow
def test_vectorization_strategies_agree(vectorize):
    key = jax.random.key(7)
    ref = IWELBO(16).loss(key, POOR, local_model, local_guide, X)
    other = IWELBO(16, vectorize_particles=vectorize).loss(key, POOR, local_model, local_guide, X)
    assert np.allclose(ref, other, rtol=1e-6)
    guide = AutoNormal(funnel)
    svi = SVI(funnel, guide, optax.adam(0.01), IWELBO(16))
    p = svi.get_params(svi.init(jax.random.key(0)))
    a = IWELBO(16).loss(key, p, funnel, guide)
    b = IWELBO(16, vectorize_particles=vectorize).loss(key, p, funnel, guide)
    assert np.allclose(a, b, rtol=1e-6)


# ---- autoguides -------------------------------------------------------------


def two_latent_model(x, y):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 0.7), obs=x)
        numpyro.sample("y", dist.Normal(u, 1.3), obs=y)


@pytest.mark.parametrize(
    "guide_class", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoIAFNormal]
)
@pytest.mark.slow
def test_autoguides(guide_class):
    x, y = XG, X[:, 1]
    truth = log_evidence(x, ONES, ZEROS, 0.7 * ONES) + log_evidence(y, ONES, ZEROS, 1.3 * ONES)
    guide = guide_class(two_latent_model)
    svi = SVI(two_latent_model, guide, optax.adam(0.01), IWELBO(8))
    result = svi.run(jax.random.key(0), 1500, x, y, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses))
    assert losses[-100:].mean() < losses[:100].mean()
    params = result.params
    ours, se1 = bound_stats(IWELBO(1), params, two_latent_model, guide, x, y, reps=4000)
    ref, se2 = bound_stats(Trace_ELBO(), params, two_latent_model, guide, x, y, reps=4000, seed=1)
    assert_within(ours, math.hypot(se1, se2), ref, what=f"{guide_class.__name__} K=1 vs Trace_ELBO")
    m16, s16 = bound_stats(IWELBO(16), params, two_latent_model, guide, x, y, reps=2000, seed=2)
    assert m16 <= truth + 4 * s16
    assert truth - m16 < 0.1  # a fitted Gaussian guide is near exact here


# ---- handlers and model features, against exact answers ----------------------


def test_handlers_scale_tempered_likelihood():
    c, x = 0.3, 1.7

    def model():
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with handlers.scale(scale=c):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    # p(z) N(x; z, 1)^c is Gaussian in z: posterior N(c x / (1 + c), 1 / (1 + c)).
    def guide():
        numpyro.sample("z", dist.Normal(c * x / (1 + c), (1 + c) ** -0.5))

    truth = (
        -c / 2 * math.log(2 * math.pi)
        + 0.5 * math.log(2 * math.pi / c)
        + float(dist.Normal(0.0, math.sqrt(1 + 1 / c)).log_prob(x))
    )
    for k in (1, 8):
        assert abs(-float(IWELBO(k).loss(jax.random.key(0), {}, model, guide)) - truth) < 1e-5


def test_handlers_mask_drops_observations():
    mask = np.array([True, False, True, False])

    def model(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]), handlers.mask(mask=mask):
            numpyro.sample("x", dist.Normal(z, 0.7), obs=x)

    kept = XG[mask]
    loc, scale = posterior(kept, np.ones(2), np.zeros(2), 0.7 * np.ones(2))

    def guide(x):
        numpyro.sample("z", dist.Normal(loc, scale))

    truth = log_evidence(kept, np.ones(2), np.zeros(2), 0.7 * np.ones(2))
    for k in (1, 8):
        assert abs(-float(IWELBO(k).loss(jax.random.key(0), {}, model, guide, XG)) - truth) < 1e-5


def test_factor_and_two_latent_sites_chain():
    x = 0.9

    # z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, 1) given as a factor: x ~ N(0, 3).
    def model():
        z1 = numpyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = numpyro.sample("z2", dist.Normal(z1, 1.0))
        numpyro.factor("lik", dist.Normal(z2, 1.0).log_prob(x))

    def guide():  # the exact posterior, factorized as q(z1) q(z2 | z1)
        z1 = numpyro.sample("z1", dist.Normal(x / 3, math.sqrt(2 / 3)))
        numpyro.sample("z2", dist.Normal((z1 + x) / 2, math.sqrt(0.5)))

    truth = float(dist.Normal(0.0, math.sqrt(3.0)).log_prob(x))
    for k in (1, 8, 64):
        assert abs(-float(IWELBO(k).loss(jax.random.key(0), {}, model, guide)) - truth) < 1e-5


@pytest.mark.slow
def test_nested_plates_exact():
    xs = np.random.default_rng(4).normal(size=(3, 4, 1))

    def model():
        with numpyro.plate("a", 3, dim=-2), numpyro.plate("b", 4, dim=-1):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, 0.5), obs=xs[..., 0])

    loc, scale = posterior(xs, np.ones(1), np.zeros(1), 0.5 * np.ones(1))

    def guide():
        with numpyro.plate("a", 3, dim=-2), numpyro.plate("b", 4, dim=-1):
            numpyro.sample("z", dist.Normal(loc, scale))

    truth = log_evidence(xs, np.ones(1), np.zeros(1), 0.5 * np.ones(1)).sum()
    for k in (1, 8):
        assert abs(-float(IWELBO(k).loss(jax.random.key(0), {}, model, guide)) - truth) < 1e-4


@pytest.mark.slow
def test_numpyro_module_parameters_get_gradients():
    data = (np.random.default_rng(5).random((6, 5)) < 0.4).astype(np.float32)
    dec_init, dec_apply = stax.serial(stax.Dense(8), stax.Tanh, stax.Dense(5))
    enc_init, enc_apply = stax.serial(stax.Dense(8), stax.Tanh, stax.Dense(4))

    def model(x):
        decoder = numpyro.module("decoder", (dec_init, dec_apply), (x.shape[0], 2))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        encoder = numpyro.module("encoder", (enc_init, enc_apply), (x.shape[0], 5))
        h = encoder(x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(h[:, :2], jnp.exp(h[:, 2:])).to_event(1))

    svi = SVI(model, guide, optax.adam(1e-2), IWELBO(5))
    state = svi.init(jax.random.key(0), data)
    params = svi.get_params(state)
    assert {"decoder$params", "encoder$params"} <= set(params)
    grads = jax.grad(lambda p: IWELBO(5).loss(jax.random.key(1), p, model, guide, data))(params)
    for name in ("decoder$params", "encoder$params"):
        norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads[name]))
        assert np.isfinite(norm) and norm > 0, name
    ours, se1 = bound_stats(IWELBO(1), params, model, guide, data, reps=4000)
    ref, se2 = bound_stats(Trace_ELBO(), params, model, guide, data, reps=4000, seed=1)
    assert_within(ours, math.hypot(se1, se2), ref, what="module model K=1 vs Trace_ELBO")


@pytest.mark.slow
def test_svi_update_and_evaluate_under_jit():
    svi = SVI(local_model, local_guide, optax.adam(0.05), IWELBO(8))
    state = svi.init(jax.random.key(0), X)
    update = jax.jit(svi.update)
    losses = []
    for _ in range(300):
        state, loss = update(state, X)
        losses.append(float(loss))
    assert np.mean(losses[-30:]) < np.mean(losses[:30])
    value = jax.jit(svi.evaluate)(state, X)
    _, key = jax.random.split(state.rng_key)
    expected = IWELBO(8).loss(key, svi.get_params(state), local_model, local_guide, X)
    assert np.allclose(value, expected, rtol=1e-6)


@pytest.mark.slow
def test_mutable_state_is_averaged_over_particles():
    def model():
        state = numpyro.primitives.mutable("stats", {"z": jnp.zeros(()), "twice": jnp.zeros(())})
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        state["z"] = z
        state["twice"] = jnp.float32(2.0)

    def guide():
        numpyro.sample("z", dist.Normal(numpyro.param("loc", 3.0), 0.5))

    elbo = IWELBO(4096)
    out = elbo.loss_with_mutable_state(jax.random.key(0), {"loc": 3.0}, model, guide)
    stats = out["mutable_state"]["stats"]
    assert float(stats["twice"]) == 2.0
    assert abs(float(stats["z"]) - 3.0) < 5 * 0.5 / math.sqrt(4096)
    svi = SVI(model, guide, optax.adam(0.01), elbo)
    state = svi.init(jax.random.key(0))
    state, _ = jax.jit(svi.update)(state)
    assert abs(float(state.mutable_state["stats"]["z"]) - 3.0) < 0.1


# ---- errors, warnings and non-finite weights --------------------------------


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None, True])
def test_bad_num_particles(bad):
    with pytest.raises((TypeError, ValueError), match="num_particles"):
        IWELBO(bad)


def test_numpy_integer_num_particles_accepted():
    assert IWELBO(np.int64(3)).num_particles == 3


def test_bad_gradient_estimator_and_vectorize():
    with pytest.raises(ValueError, match="gradient_estimator.*reparam"):
        IWELBO(4, gradient_estimator="dreg2")
    with pytest.raises(TypeError, match="vectorize_particles"):
        IWELBO(4, vectorize_particles="vmap")


def test_guide_missing_model_latent():
    def model():
        numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"\['b'\] are not sampled by the guide"):
        IWELBO(2).loss(jax.random.key(0), {}, model, guide)


def test_guide_site_not_in_model():
    def model():
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    def guide():
        numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("typo", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"\['typo'\] do not appear in the model"):
        IWELBO(2).loss(jax.random.key(0), {}, model, guide)


def test_guide_shape_mismatch():
    def model():
        numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    def guide():
        numpyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    with pytest.raises(ValueError, match="shapes disagree at site 'a'"):
        IWELBO(2).loss(jax.random.key(0), {}, model, guide)


@pytest.mark.slow
def test_discrete_guide_site_bound_value_is_exact_at_exact_posterior():
    # p(c) = Bernoulli(0.3), y | c ~ N(2c, 1): the guide q(c) = p(c | y) makes every
    # weight equal p(y), whatever the discrete draws.
    y = 0.8
    lik = np.exp(
        [float(dist.Normal(0.0, 1.0).log_prob(y)), float(dist.Normal(2.0, 1.0).log_prob(y))]
    )
    evidence = 0.7 * lik[0] + 0.3 * lik[1]
    post = 0.3 * lik[1] / evidence

    def model():
        c = numpyro.sample("c", dist.Bernoulli(0.3))
        numpyro.sample("y", dist.Normal(2.0 * c, 1.0), obs=y)

    def guide():
        numpyro.sample("c", dist.Bernoulli(numpyro.param("p", 0.5)))

    for k in (1, 5):
        loss = IWELBO(k).loss(jax.random.key(0), {"p": post}, model, guide)
        assert abs(-float(loss) - math.log(evidence)) < 1e-5


@pytest.mark.slow
def test_joint_weighting_of_a_subsampled_plate_with_a_global_latent_is_an_error():
    def model(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0], subsample_size=2) as idx:
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    x = jnp.asarray(XG)  # indexed by traced subsample indices, as under SVI's jit
    joint = IWELBO(4, weighting="joint")
    with pytest.raises(ValueError, match=r"\['data'\] are subsampled.*train on the full data"):
        joint.loss(jax.random.key(0), {}, model, guide, x)
    # K = 1 is the ELBO: linear in the log weights, so subsampling stays unbiased.
    assert np.isfinite(IWELBO(1, weighting="joint").loss(jax.random.key(0), {}, model, guide, x))
    # The default is the ELBO here (no latent inside the plate: nothing can be
    # weighted without bias), and it says so once.
    with pytest.warns(UnweightedBoundWarning, match="No importance-weighted bound") as record:
        assert np.isfinite(IWELBO(4).loss(jax.random.key(0), {}, model, guide, x))
    assert len(record) == 1


@pytest.mark.slow
def test_joint_weights_warning_only_for_large_plates_that_hold_latents():
    def model(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    def hmodel(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            u = numpyro.sample("u", dist.Normal(z, 1.0))
            numpyro.sample("x", dist.Normal(u, 1.0), obs=x)

    def hguide(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("u", dist.Normal(0.0, 1.0))

    key = jax.random.key(0)
    with pytest.warns(JointWeightsWarning, match="data.*weighting='local'") as record:
        IWELBO(4, weighting="joint").loss(key, {}, hmodel, hguide, jnp.zeros(100))
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A plate of observations only: the joint bound is the IWAE bound over z,
        # whose gain does not fade with the plate's size; no warning.
        IWELBO(4, weighting="joint").loss(key, {}, model, guide, jnp.zeros(10_000))
        IWELBO(4).loss(key, {}, model, guide, jnp.zeros(10_000))
        IWELBO(4).loss(key, {}, hmodel, hguide, jnp.zeros(100))  # auto: local
        IWELBO(4).loss(key, {}, local_model, local_guide, np.zeros((500, 3)))
        # K = 1 is the ELBO whatever the weighting: no warning.
        IWELBO(1, weighting="joint").loss(key, {}, hmodel, hguide, jnp.zeros(100))
        IWELBO(1, weighting="local").loss(key, {}, model, guide, jnp.zeros(100))
    with pytest.warns(UnweightedBoundWarning, match="weighting='joint' \\(the default"):
        IWELBO(4, weighting="local").loss(key, {}, model, guide, jnp.zeros(100))


def gamma_model():
    numpyro.sample("z", dist.Gamma(2.0, 1.0))


def normal_guide():
    numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), 1.0))


@pytest.mark.parametrize("validate", [False, True])
def test_guide_outside_support_gives_inf_not_nan(validate):
    def loss(p):
        return IWELBO(8).loss(jax.random.key(0), p, gamma_model, normal_guide)

    with numpyro.validation_enabled(validate):
        # Every particle outside the support: bound -inf, loss +inf, zero gradient.
        value, grad = jax.value_and_grad(loss)({"loc": -10.0})
        assert value == np.inf and float(grad["loc"]) == 0.0
        # Some particles outside: they get weight zero, the rest give a finite bound.
        value, grad = jax.value_and_grad(loss)({"loc": 0.5})
        assert np.isfinite(value) and np.isfinite(grad["loc"])
