"""Gradient estimators: reparam, STL, DReG against a pure-JAX IWAE reference, and
VIMCO against exact enumeration of every particle tuple of small discrete models."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_iwae import IWELBO

X = jnp.array([0.5, -1.0, 2.0, 0.3])
# theta: decoder weight and bias; phi: a linear encoder with a per-datapoint scale.
PARAMS = {
    "a": jnp.array(1.2),
    "b": jnp.array(-0.2),
    "c": jnp.array(0.3),
    "d": jnp.array(0.1),
    "log_s": jnp.array([-0.1, -0.3, -0.5, 0.0]),
}
THETA, PHI = ("a", "b"), ("c", "d", "log_s")


def model(x):
    a, b = numpyro.param("a", 1.0), numpyro.param("b", 0.0)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(a * z + b, 0.8), obs=x)


def guide(x):
    c, d = numpyro.param("c", 0.0), numpyro.param("d", 0.0)
    log_s = numpyro.param("log_s", jnp.zeros(x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(c * x + d, jnp.exp(log_s)))


def normal_logpdf(v, loc, scale):
    return -0.5 * ((v - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi)


def reference_loss(params, key, k):
    """-(IWAE bound) written directly in JAX: the reparameterized gradient's reference."""
    loc, scale = params["c"] * X + params["d"], jnp.exp(params["log_s"])
    z = loc + scale * jax.random.normal(key, (k, X.shape[0]))
    log_w = (
        normal_logpdf(z, 0.0, 1.0)
        + normal_logpdf(X, params["a"] * z + params["b"], 0.8)
        - normal_logpdf(z, loc, scale)
    )
    return -jnp.sum(jax.nn.logsumexp(log_w, axis=0) - math.log(k))


def grads(loss, reps, seed=0):
    keys = jax.random.split(jax.random.key(seed), reps)
    g = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(PARAMS, keys)
    return {n: np.asarray(v, np.float64).reshape(reps, -1) for n, v in g.items()}


def ours(estimator, k):
    elbo = IWELBO(k, gradient_estimator=estimator)
    return lambda p, key: elbo.loss(key, p, model, guide, X)


def flat(tree, reps):
    """A (possibly nested) gradient with a leading draw axis as a (reps, n) array."""
    return np.concatenate(
        [np.asarray(v, np.float64).reshape(reps, -1) for v in jax.tree.leaves(tree)], axis=1
    )


def assert_means_agree(a, b, what, z=5.0):
    for name in a:
        ma, mb = a[name].mean(0), b[name].mean(0)
        se = np.sqrt(a[name].var(0, ddof=1) / len(a[name]) + b[name].var(0, ddof=1) / len(b[name]))
        assert np.all(np.abs(ma - mb) <= z * se), f"{what} {name}: {ma} vs {mb} (se {se})"


@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
@pytest.mark.slow
def test_unbiased_estimators_match_reference_gradient(estimator):
    reps, k = 3000, 8
    ref = grads(lambda p, key: reference_loss(p, key, k), reps, seed=1)
    mine = grads(ours(estimator, k), reps, seed=2)
    assert_means_agree(mine, ref, f"{estimator} vs reference")
    # Not vacuous: the gradients are clearly non-zero at these parameters.
    assert all(
        np.abs(ref[n].mean(0)).max() > 10 * ref[n].std(0).max() / math.sqrt(reps)
        for n in ("a", "c")
    )


@pytest.mark.slow
def test_stl_is_biased_for_k_above_one():
    reps, k = 3000, 8
    ref = grads(lambda p, key: reference_loss(p, key, k), reps, seed=1)
    stl = grads(ours("stl", k), reps, seed=2)
    with pytest.raises(AssertionError):
        assert_means_agree({n: stl[n] for n in PHI}, {n: ref[n] for n in PHI}, "stl")
    assert_means_agree({n: stl[n] for n in THETA}, {n: ref[n] for n in THETA}, "stl theta")


@pytest.mark.slow
def test_model_gradient_is_the_same_for_every_estimator():
    keys = jax.random.split(jax.random.key(3), 5)
    for key in keys:
        g = {e: jax.grad(ours(e, 16))(PARAMS, key) for e in ("reparam", "stl", "dreg")}
        for e in ("stl", "dreg"):
            for n in THETA:
                np.testing.assert_allclose(g[e][n], g["reparam"][n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dreg_reduces_guide_gradient_variance():
    reps, k = 2000, 16
    rep = grads(ours("reparam", k), reps, seed=4)
    drg = grads(ours("dreg", k), reps, seed=4)
    for n in PHI:
        ratio = drg[n].var(0) / rep[n].var(0)
        assert np.all(ratio < 0.8), f"{n}: variance ratio dreg/reparam {ratio}"


@pytest.mark.slow
def test_dreg_with_autoguide_transformed_sites():
    # AutoNormal draws a positive site through a transform (TransformedDistribution
    # with intermediates): DReG must keep the sample path through the transform.
    from numpyro.infer.autoguide import AutoNormal

    def pos_model():
        s = numpyro.sample("s", dist.LogNormal(0.0, 0.5))
        numpyro.sample("y", dist.Normal(0.0, s), obs=1.3)

    g = AutoNormal(pos_model)
    params = {"s_auto_loc": jnp.array(0.4), "s_auto_scale": jnp.array(0.6)}
    reps, k = 4000, 8
    keys = jax.random.split(jax.random.key(5), reps)

    def mean_grad(est):
        elbo = IWELBO(k, gradient_estimator=est)
        out = jax.jit(jax.vmap(jax.grad(lambda p, key: elbo.loss(key, p, pos_model, g)), (None, 0)))
        return {n: np.asarray(v) for n, v in out(params, keys).items()}

    rep, drg = mean_grad("reparam"), mean_grad("dreg")
    assert_means_agree(
        {n: v[:, None] for n, v in drg.items()},
        {n: v[:, None] for n, v in rep.items()},
        "autonormal",
    )


# ---- VIMCO against exact enumeration -----------------------------------------

MUS = jnp.array([-2.0, 0.0, 1.5])
PRIOR = jnp.array([0.2, 0.5, 0.3])
Y = 0.7


def mixture_model():
    c = numpyro.sample("c", dist.Categorical(probs=PRIOR))
    numpyro.sample("y", dist.Normal(MUS[c], 1.0), obs=Y)


def mixture_guide():
    numpyro.sample("c", dist.Categorical(logits=numpyro.param("logits", jnp.zeros(3))))


def exact_mixture_bound(logits, k):
    """E_q[log (1/K) sum_k w_k] summed over all 3^K particle tuples."""
    log_q = jax.nn.log_softmax(logits)
    log_w = jnp.log(PRIOR) + normal_logpdf(Y, MUS, 1.0) - log_q
    total = 0.0
    for idx in itertools.product(range(3), repeat=k):
        idx = jnp.array(idx)
        total = total + jnp.exp(jnp.sum(log_q[idx])) * (jax.nn.logsumexp(log_w[idx]) - math.log(k))
    return total


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.slow
def test_vimco_matches_exact_gradient_categorical(k):
    logits = jnp.array([0.4, -0.3, 0.1])
    exact = np.asarray(jax.grad(exact_mixture_bound)(logits, k))
    elbo = IWELBO(k)
    reps = 20000
    keys = jax.random.split(jax.random.key(6), reps)
    g = jax.jit(
        jax.vmap(
            jax.grad(lambda p, key: -elbo.loss(key, p, mixture_model, mixture_guide)), (None, 0)
        )
    )({"logits": logits}, keys)["logits"]
    g = np.asarray(g, np.float64)
    mean, se = g.mean(0), g.std(0, ddof=1) / math.sqrt(reps)
    assert np.all(np.abs(mean - exact) <= 5 * se), f"K={k}: {mean} vs exact {exact} (se {se})"
    assert np.abs(exact).max() > 10 * se.max()  # the test can tell a wrong answer


B_OBS = jnp.array([1.0, -0.5])


def bernoulli_model():
    with numpyro.plate("data", 2):
        z = numpyro.sample("z", dist.Bernoulli(0.4))
        numpyro.sample("y", dist.Normal(2.0 * z - 1.0, 0.7), obs=B_OBS)


def bernoulli_guide():
    with numpyro.plate("data", 2):
        numpyro.sample("z", dist.Bernoulli(logits=numpyro.param("q_logits", jnp.zeros(2))))


def exact_bernoulli_bound(q_logits, k):
    """Per-datapoint bounds summed, each by enumerating all 2^K particle tuples."""
    total = 0.0
    for n in range(2):
        log_q1 = jax.nn.log_sigmoid(q_logits[n])
        log_q = jnp.stack([jax.nn.log_sigmoid(-q_logits[n]), log_q1])
        z = jnp.array([0.0, 1.0])
        log_w = jnp.log(jnp.array([0.6, 0.4])) + normal_logpdf(B_OBS[n], 2.0 * z - 1.0, 0.7) - log_q
        for idx in itertools.product(range(2), repeat=k):
            idx = jnp.array(idx)
            total = total + jnp.exp(jnp.sum(log_q[idx])) * (
                jax.nn.logsumexp(log_w[idx]) - math.log(k)
            )
    return total


def test_vimco_matches_exact_gradient_bernoulli_per_datapoint():
    k, reps = 3, 20000
    q_logits = jnp.array([0.5, -0.8])
    exact = np.asarray(jax.grad(exact_bernoulli_bound)(q_logits, k))
    elbo = IWELBO(k)
    keys = jax.random.split(jax.random.key(7), reps)
    g = jax.jit(
        jax.vmap(
            jax.grad(lambda p, key: -elbo.loss(key, p, bernoulli_model, bernoulli_guide)),
            (None, 0),
        )
    )({"q_logits": q_logits}, keys)["q_logits"]
    g = np.asarray(g, np.float64)
    mean, se = g.mean(0), g.std(0, ddof=1) / math.sqrt(reps)
    assert np.all(np.abs(mean - exact) <= 5 * se), f"{mean} vs exact {exact} (se {se})"


def test_svi_does_not_warn_about_discrete_latents():
    import warnings

    from numpyro.infer import SVI
    import optax

    svi = SVI(mixture_model, mixture_guide, optax.adam(0.05), IWELBO(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.init(jax.random.key(0))


# ---- DReG through autoguides, lax.map and mutable state ---------------------


def two_site_model(x):
    s = numpyro.sample("s", dist.LogNormal(0.0, 0.5))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z.sum(), s), obs=x)


@pytest.mark.parametrize(
    "guide_class", ["AutoDiagonalNormal", "AutoMultivariateNormal", "AutoIAFNormal"]
)
@pytest.mark.slow
def test_dreg_is_unbiased_through_autoguide_delta_sites(guide_class):
    # These guides draw one auxiliary vector and hand the model Delta sites holding a
    # transform of it; DReG must keep that path (value and log-Jacobian).
    from numpyro.infer import SVI, autoguide
    import optax

    x = jnp.array([0.4, 1.1, -0.3])
    g = getattr(autoguide, guide_class)(two_site_model)
    svi = SVI(two_site_model, g, optax.adam(0.01), IWELBO(4))
    state = svi.run(jax.random.key(0), 300, x, progress_bar=False).state
    # Differentiate where SVI does: in the unconstrained space (e.g. AutoMultivariateNormal's
    # scale_tril has no upper triangle there; its constrained upper entries enter the
    # sampler but not log_prob, so gradients along them are not gradients of the bound).
    unconstrained = svi.optim.get_params(state.optim_state)
    reps, k = 4000, 6
    keys = jax.random.split(jax.random.key(8), reps)

    def draws(est):
        elbo = IWELBO(k, gradient_estimator=est)

        def loss(u, key):
            return elbo.loss(key, svi.constrain_fn(u), two_site_model, g, x)

        fn = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))
        return {n: flat(v, reps) for n, v in fn(unconstrained, keys).items()}

    rep, drg = draws("reparam"), draws("dreg")
    assert_means_agree(drg, rep, f"{guide_class} dreg vs reparam")
    # The variance reduction shows on the guide's parameters.
    name = max(rep, key=lambda n: rep[n].var(0).sum())
    assert drg[name].var(0).sum() < rep[name].var(0).sum()


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
@pytest.mark.slow
def test_estimators_agree_in_value_and_across_vectorization(estimator):
    key = jax.random.key(9)
    values = [
        IWELBO(8, gradient_estimator=e, vectorize_particles=v).loss(key, PARAMS, model, guide, X)
        for e in ("reparam", estimator)
        for v in (True, False)
    ]
    np.testing.assert_allclose(values, values[0], rtol=1e-6)
    grad_vmap = jax.grad(ours(estimator, 8))(PARAMS, key)
    elbo_map = IWELBO(8, gradient_estimator=estimator, vectorize_particles=False)
    grad_map = jax.grad(lambda p: elbo_map.loss(key, p, model, guide, X))(PARAMS)
    for n in PARAMS:
        np.testing.assert_allclose(grad_map[n], grad_vmap[n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dreg_returns_mutable_state():
    def counting_model(x):
        state = numpyro.primitives.mutable("state", {"mean_z": jnp.zeros(x.shape[0])})
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, 0.8), obs=x)
        state["mean_z"] = z

    out = IWELBO(2048, gradient_estimator="dreg").loss_with_mutable_state(
        jax.random.key(0), PARAMS, counting_model, guide, X
    )
    expected = PARAMS["c"] * X + PARAMS["d"]  # the guide's mean
    se = jnp.exp(PARAMS["log_s"]) / math.sqrt(2048)
    assert np.all(np.abs(out["mutable_state"]["state"]["mean_z"] - expected) < 5 * se)


@pytest.mark.slow
def test_dreg_refuses_a_scaled_guide_and_stl_stays_unbiased_at_k_1():
    # handlers.scale on model and guide (KL annealing, tempering): the objective is
    # log mean_k exp(c log w_k); DReG's squared weights assume c = 1.
    from numpyro import handlers

    from numpyro_iwae import ReweightedWakeSleep

    def model():
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=0.7)

    def guide():
        scale = numpyro.param("s", 0.9, constraint=dist.constraints.positive)
        numpyro.sample("z", dist.Normal(numpyro.param("m", 0.1), scale))

    smodel, sguide = handlers.scale(model, 2.0), handlers.scale(guide, 2.0)
    params = {"m": jnp.asarray(0.1), "s": jnp.asarray(0.9)}
    key = jax.random.key(0)
    for objective in (
        IWELBO(4, gradient_estimator="dreg"),
        ReweightedWakeSleep(4, gradient_estimator="wake_dreg"),
    ):
        with pytest.raises(ValueError, match=r"scaled .*gradient_estimator='reparam'"):
            objective.loss(key, params, smodel, sguide)
    assert np.isfinite(IWELBO(1, gradient_estimator="dreg").loss(key, params, smodel, sguide))

    def mean_grad(objective, seed):
        keys = jax.random.split(jax.random.key(seed), 4000)
        g = jax.vmap(jax.grad(lambda p, k: objective.loss(k, p, smodel, sguide)), (None, 0))
        out = g(params, keys)
        return {n: (float(v.mean()), float(v.std() / np.sqrt(v.size))) for n, v in out.items()}

    rep, stl = mean_grad(IWELBO(1), 1), mean_grad(IWELBO(1, gradient_estimator="stl"), 2)
    for name in params:
        (a, se_a), (b, se_b) = rep[name], stl[name]
        assert abs(a - b) < 3.5 * np.hypot(se_a, se_b), (name, a, b, se_a, se_b)
