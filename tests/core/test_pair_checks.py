"""Model/guide pairs that Trace_ELBO accepts: IWELBO and MarginalLikelihood accept
them with the right answer, or refuse them with an error that says what to do.

In the spirit of Pyro's and NumPyro's ELBO test suites: factor and observed sites in
the guide, parameter-only models, autoguides first used outside SVI, Python-scalar
values, point-mass guides, mutable state, NaN data.
"""

import math

from conftest import bound_stats
from gaussians import assert_within, log_evidence, posterior
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDAIS,
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLaplaceApproximation,
    AutoNormal,
)
import optax
import pytest

from numpyro_iwae import IWELBO, MarginalLikelihood

X = np.array([0.3, -1.2, 2.0, 0.7])
ONES, ZEROS = np.ones(4), np.zeros(4)


def global_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 0.7), obs=x)


def local_model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 0.7), obs=x)


LOCAL_LOC, LOCAL_SCALE = posterior(X[:, None], np.ones(1), np.zeros(1), 0.7 * np.ones(1))
LOCAL_EVIDENCE = log_evidence(X[:, None], np.ones(1), np.zeros(1), 0.7 * np.ones(1))


def exact_local_guide(x):
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(LOCAL_LOC, LOCAL_SCALE))


# ---- 1. factor and observed sites in the guide --------------------------------

FACTORS = np.array([3.0, -1.0, 0.5, 2.0])


def test_guide_factor_and_observed_sites_enter_log_q_per_element():
    def guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(LOCAL_LOC, LOCAL_SCALE))
            numpyro.factor("f", FACTORS)
        numpyro.sample("o", dist.Normal(0.0, 1.0), obs=0.5)

    # Exact posterior: every log weight is log p(x_n) - f_n, minus log N(0.5; 0, 1) once.
    truth = float(np.sum(LOCAL_EVIDENCE - FACTORS) - dist.Normal(0.0, 1.0).log_prob(0.5))
    reference = -float(Trace_ELBO().loss(jax.random.key(0), {}, local_model, guide, X))
    assert abs(reference - truth) < 1e-4
    for k in (1, 8):
        value = -float(IWELBO(k).loss(jax.random.key(0), {}, local_model, guide, X))
        assert abs(value - truth) < 1e-4, k


def test_guide_factor_gets_its_gradient():
    def guide():
        c = numpyro.param("c", 1.5)
        numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.factor("f", c**2)

    def model():
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    # log w = -c^2 exactly: d(-loss)/dc = -2c.
    grad = jax.grad(lambda p: -IWELBO(4).loss(jax.random.key(0), p, model, guide))({"c": 1.5})
    assert abs(float(grad["c"]) + 3.0) < 1e-5


@pytest.mark.parametrize("estimator", ["stl", "dreg"])
def test_guide_factor_with_path_estimators_is_refused(estimator):
    def guide(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.factor("f", 3.0)

    with pytest.raises(ValueError, match=r"factor site\(s\) \['f'\].*'reparam'"):
        IWELBO(4, gradient_estimator=estimator).loss(jax.random.key(0), {}, global_model, guide, X)


@pytest.mark.slow
def test_auto_dais_k1_agrees_with_trace_elbo():
    guide = AutoDAIS(global_model, K=2)
    svi = SVI(global_model, guide, optax.adam(0.01), IWELBO(1))
    params = svi.get_params(svi.init(jax.random.key(0), X))
    ours, se1 = bound_stats(IWELBO(1), params, global_model, guide, X, reps=2000)
    ref, se2 = bound_stats(Trace_ELBO(), params, global_model, guide, X, reps=2000, seed=1)
    assert_within(ours, math.hypot(se1, se2), ref, what="AutoDAIS K=1 vs Trace_ELBO")


# ---- 2. an AutoGuide first used outside SVI -------------------------------------


@pytest.mark.parametrize("first_use", ["loss", "marginal"])
def test_autoguide_first_used_outside_svi_still_trains(first_use):
    guide = AutoNormal(global_model)
    if first_use == "loss":
        IWELBO(4).loss(jax.random.key(0), {}, global_model, guide, X)
    else:
        trained = AutoNormal(global_model)
        svi = SVI(global_model, trained, optax.adam(0.01), IWELBO(4))
        params = svi.get_params(svi.init(jax.random.key(0), X))
        MarginalLikelihood(global_model, guide, params=params, num_particles=8)(
            jax.random.key(1), X
        )
    svi = SVI(global_model, guide, optax.adam(0.05), IWELBO(4))
    result = svi.run(jax.random.key(2), 200, X, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


# ---- 3. Python scalars as values and state ------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.slow
def test_python_scalar_guide_value_and_state(k):
    def model():
        numpyro.primitives.mutable("count", 1.0)
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=0.5)

    def guide():
        numpyro.sample("z", dist.Normal(0.0, 2.0))

    pinned = handlers.substitute(guide, {"z": 2.0})
    truth = float(
        dist.Normal(0.0, 1.0).log_prob(2.0)
        + dist.Normal(2.0, 1.0).log_prob(0.5)
        - dist.Normal(0.0, 2.0).log_prob(2.0)
    )
    out = IWELBO(k).loss_with_mutable_state(jax.random.key(0), {}, model, pinned)
    assert abs(-float(out["loss"]) - truth) < 1e-5
    assert float(out["mutable_state"]["count"]) == 1.0


# ---- 4. no sample sites at all ------------------------------------------------


def test_parameter_only_model_gives_zero_loss_and_updates_state():
    def model():
        a = numpyro.param("a", 1.0)
        state = numpyro.primitives.mutable("state", {"steps": jnp.zeros(())})
        state["steps"] = state["steps"] + 1.0
        numpyro.deterministic("twice", 2 * a)

    def guide():
        numpyro.param("b", 1.0)

    assert float(Trace_ELBO().loss(jax.random.key(0), {"a": 1.0, "b": 1.0}, model, guide)) == 0.0
    assert float(IWELBO(3).loss(jax.random.key(0), {"a": 1.0, "b": 1.0}, model, guide)) == 0.0
    steps = {}
    for name, elbo in (("iwelbo", IWELBO(3)), ("trace", Trace_ELBO())):
        svi = SVI(model, guide, optax.adam(0.1), elbo)
        state = svi.init(jax.random.key(0))
        for _ in range(2):
            state, loss = jax.jit(svi.update)(state)
        assert float(loss) == 0.0
        steps[name] = float(state.mutable_state["state"]["steps"])
    assert steps["iwelbo"] == steps["trace"] == 3.0  # SVI.init runs the model once


# ---- 5. point-mass guides ------------------------------------------------------


@pytest.mark.parametrize("guide_class", [AutoDelta, AutoLaplaceApproximation])
def test_point_mass_guides_are_refused_by_marginal_likelihood(guide_class):
    guide = guide_class(global_model)
    params = (
        SVI(global_model, guide, optax.adam(0.05), Trace_ELBO())
        .run(jax.random.key(0), 100, X, progress_bar=False)
        .params
    )
    ml = MarginalLikelihood(global_model, guide, params=params, num_particles=100)
    with pytest.raises(ValueError, match=r"point masses \(Delta\).*AutoNormal"):
        ml(jax.random.key(1), X)
    # Training with a point mass is MAP estimation: IWELBO accepts it, as Trace_ELBO.
    iw = IWELBO(4).loss(jax.random.key(0), params, global_model, guide, X)
    tr = Trace_ELBO().loss(jax.random.key(0), params, global_model, guide, X)
    assert abs(float(iw) - float(tr)) < 1e-4


@pytest.mark.slow
def test_hand_written_delta_guide_is_refused_and_transforms_of_draws_are_not():
    def guide(x):
        numpyro.sample("z", dist.Delta(0.3))

    with pytest.raises(ValueError, match=r"\['z'\] are point masses"):
        MarginalLikelihood(global_model, guide, num_particles=10)(jax.random.key(0), X)
    # AutoDiagonalNormal writes each site as a Delta transform of an auxiliary draw.
    auto = AutoDiagonalNormal(global_model)
    params = (
        SVI(global_model, auto, optax.adam(0.05), Trace_ELBO())
        .run(jax.random.key(0), 500, X, progress_bar=False)
        .params
    )
    est = MarginalLikelihood(global_model, auto, params=params, num_particles=2000)(
        jax.random.key(1), X
    )
    truth = log_evidence(X, ONES, ZEROS, 0.7 * ONES)
    assert_within(est.log_marginal, est.stderr, truth, what="AutoDiagonalNormal evidence")


def test_one_particle_reports_no_standard_error():
    est = MarginalLikelihood(local_model, exact_local_guide, num_particles=1)(jax.random.key(0), X)
    assert np.isnan(float(est.stderr))
    assert abs(float(est.log_marginal) - LOCAL_EVIDENCE.sum()) < 1e-4


# ---- 6. mutable state of the guide ---------------------------------------------


def flax_like_guide(x):
    # Like numpyro.contrib.module.flax_module with mutable batch statistics: the
    # state is created at first use and must be passed back with the params.
    weight = numpyro.param("net$params")
    state = numpyro.primitives.mutable("net$state")
    assert (weight is None) == (state is None)
    if weight is None:
        weight = numpyro.param("net$params", 1.0)
        state = numpyro.primitives.mutable("net$state", {"mean": jnp.zeros(())})
    state["mean"] = 0.9 * state["mean"] + 0.1 * jnp.mean(x)
    numpyro.sample("z", dist.Normal(state["mean"], weight))


def test_marginal_likelihood_takes_mutable_state():
    svi = SVI(global_model, flax_like_guide, optax.adam(0.01), IWELBO(4))
    result = svi.run(jax.random.key(0), 50, X, progress_bar=False)
    ml = MarginalLikelihood(global_model, flax_like_guide, params=result.params, num_particles=64)
    with pytest.raises(ValueError, match=r"mutable site\(s\) \['net\$state'\].*mutable_state="):
        ml(jax.random.key(1), X)
    mutable = result.state.mutable_state
    est = MarginalLikelihood(
        global_model,
        flax_like_guide,
        params=result.params,
        mutable_state=mutable,
        num_particles=2000,
    )(jax.random.key(1), X)
    truth = log_evidence(X, ONES, ZEROS, 0.7 * ONES)
    assert_within(est.log_marginal, est.stderr, truth, what="guide with mutable state")


# ---- 7. a subsample-trained AutoGuide scored on the full data ---------------------


def subsampled_local_model(x, batch=None):
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as idx:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, 0.7), obs=x[idx])


@pytest.mark.slow
def test_subsample_trained_autoguide_on_full_data_says_what_happens():
    x = jnp.asarray(np.random.default_rng(0).normal(size=12))
    guide = AutoNormal(subsampled_local_model)
    svi = SVI(subsampled_local_model, guide, optax.adam(0.05), IWELBO(4))
    params = svi.run(jax.random.key(0), 1000, x, 4, progress_bar=False).params
    with pytest.raises(ValueError, match="AutoGuide fixes each plate's subsample size"):
        MarginalLikelihood(subsampled_local_model, guide, params=params, num_particles=8)(
            jax.random.key(1), x
        )
    fresh = AutoNormal(subsampled_local_model)
    est = MarginalLikelihood(subsampled_local_model, fresh, params=params, num_particles=500)(
        jax.random.key(1), x
    )
    truth = log_evidence(np.asarray(x)[:, None], np.ones(1), np.zeros(1), 0.7 * np.ones(1))
    assert_within(est.pointwise, 1e-3 + est.stderr, truth, what="fresh guide, full data")


# ---- 8. NaN in the observed data ---------------------------------------------------


def local_guide(x):
    loc = numpyro.param("loc", jnp.zeros(x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.slow
def test_nan_data_is_never_an_infinite_loss_or_evidence(validate):
    params = {"loc": jnp.zeros(4)}
    for bad in (jnp.nan, jnp.inf):
        x = jnp.asarray(X).at[2].set(bad)
        with numpyro.validation_enabled(validate):
            loss = IWELBO(4).loss(jax.random.key(0), params, local_model, local_guide, x)
            assert np.isnan(float(loss))  # the loss shows the bad datum
            ml = MarginalLikelihood(local_model, local_guide, params=params, num_particles=16)
            match = r"NaN or inf: 'x' at 1 element\(s\) of plate\(s\) \['data'\]"
            with pytest.raises(ValueError, match=match):
                ml(jax.random.key(1), x)


def test_masked_nan_data_is_accepted():
    x = jnp.asarray(X).at[2].set(jnp.nan)
    keep = ~jnp.isnan(x)

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            with handlers.mask(mask=keep):
                numpyro.sample("x", dist.Normal(z, 0.7), obs=jnp.where(keep, x, 0.0))

    est = MarginalLikelihood(model, exact_local_guide, num_particles=4)(jax.random.key(0), x)
    kept = np.delete(LOCAL_EVIDENCE, 2)
    assert np.isfinite(float(est.log_marginal))
    assert np.allclose(np.delete(np.asarray(est.pointwise), 2), kept, atol=1e-4)


# ---- 9. a particle of weight zero contributes exactly zero gradient -------------------


def wide_funnel_guide():
    loc, scale = numpyro.param("loc", 0.0), numpyro.param("scale", 100.0)
    v = numpyro.sample("v", dist.Normal(loc, scale))
    with numpyro.plate("i", 3):
        numpyro.sample("x", dist.Normal(0.0, numpyro.param("x_scale", 1.0)))
    return v


def funnel_3(safe, shared):
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    scale = jnp.exp(v / 2)
    if shared:  # a model parameter: its gradient sums over every particle
        scale = scale * numpyro.param("a", 1.0)
    if safe:  # the same weights, written so that no derivative is infinite
        # Below 1e-15 the weight exp(-x^2 / (2 scale^2)) is 0 in float32 either way;
        # unguarded, scale (or its square) underflows and log p is -inf or NaN.
        dead = scale < 1e-15
        scale = jnp.where(dead, 1.0, scale)
        numpyro.factor("dead", jnp.where(dead, -jnp.inf, 0.0))
    with numpyro.plate("i", 3):
        numpyro.sample("x", dist.Normal(0.0, scale))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("estimator", ["reparam", "stl", "dreg"])
@pytest.mark.slow
def test_zero_weight_particles_give_finite_and_exact_gradients(estimator, shared):
    params = {"loc": 0.0, "scale": 100.0, "x_scale": 1.0} | ({"a": 1.0} if shared else {})
    elbo = IWELBO(50, gradient_estimator=estimator)

    def grads(safe, key):
        model = lambda: funnel_3(safe, shared)  # noqa: E731
        return jax.grad(lambda p: elbo.loss(key, p, model, wide_funnel_guide))(params)

    keys = jax.random.split(jax.random.key(0), 20)
    ours = jax.jit(jax.vmap(lambda k: grads(False, k)))(keys)
    ref = jax.jit(jax.vmap(lambda k: grads(True, k)))(keys)
    # v ~ N(0, 100) underflows exp(v / 2)**2 for v < -174: about 1 particle in 25.
    for name in params:
        assert np.all(np.isfinite(ours[name])), name
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def local_funnel(safe):
    # A global mean next to per-element funnels: under local weighting mu is drawn
    # once and shared by every particle, so its gradient sums over all of them.
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("i", 4):
        v = numpyro.sample("v", dist.Normal(0.0, 3.0))
        scale = jnp.exp(v / 2)
        if safe:
            dead = scale < 1e-15
            scale = jnp.where(dead, 1.0, scale)
            numpyro.factor("dead", jnp.where(dead, -jnp.inf, 0.0))
        numpyro.sample("x", dist.Normal(mu, scale), obs=jnp.array([0.3, -1.0, 2.0, 0.5]))


def local_funnel_guide():
    numpyro.sample("mu", dist.Normal(numpyro.param("mu_loc", 0.2), 0.1))
    with numpyro.plate("i", 4):
        numpyro.sample("v", dist.Normal(numpyro.param("v_loc", 0.0), 100.0))


@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
@pytest.mark.slow
def test_zero_weight_particles_under_local_weighting(estimator):
    params = {"mu_loc": 0.2, "v_loc": 0.0}
    elbo = IWELBO(50, gradient_estimator=estimator, weighting="local")

    def grads(safe, key):
        model = lambda: local_funnel(safe)  # noqa: E731
        return jax.grad(lambda p: elbo.loss(key, p, model, local_funnel_guide))(params)

    keys = jax.random.split(jax.random.key(1), 20)
    ours = jax.jit(jax.vmap(lambda k: grads(False, k)))(keys)
    ref = jax.jit(jax.vmap(lambda k: grads(True, k)))(keys)
    for name in params:
        assert np.all(np.isfinite(ours[name])), name
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ---- 13. repeated evaluations reuse the compiled computation ------------------------


def test_marginal_likelihood_compiles_once_per_shape():
    traces = []

    def model(x):
        if isinstance(x, jax.core.Tracer):  # a trace for compilation (the data digest
            traces.append(1)  # also runs the model once, on the concrete data)
        local_model(x)

    def prior_guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    ml = MarginalLikelihood(model, prior_guide, num_particles=8)
    first = ml(jax.random.key(0), X)
    count = len(traces)
    second = ml(jax.random.key(1), X + 0.0)  # new values, same shape: no new trace
    assert len(traces) == count
    assert float(first.log_marginal) != float(second.log_marginal)  # new keys
    ml(jax.random.key(0), X[:3])  # a new shape compiles anew
    assert len(traces) > count


def two_site_model(x):
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, s + 0.5), obs=x)


def test_point_mass_next_to_a_random_auxiliary_draw_is_refused():
    # A Delta site next to a guide with a random auxiliary draw (AutoDiagonalNormal's):
    # only the data flow from the key tells the transform from the point mass.
    guide = AutoGuideList(two_site_model)
    guide.append(AutoDiagonalNormal(handlers.block(two_site_model, hide=["s"])))
    guide.append(AutoDelta(handlers.block(two_site_model, expose=["s"])))
    params = (
        SVI(two_site_model, guide, optax.adam(0.01), IWELBO(4))
        .run(jax.random.key(0), 50, X, progress_bar=False)
        .params
    )
    ml = MarginalLikelihood(two_site_model, guide, params=params, num_particles=16)
    with pytest.raises(ValueError, match=r"\['s'\] are point masses"):
        ml(jax.random.key(1), X)


@pytest.mark.slow
def test_numpyro_validation_warnings_as_trace_elbo_gives_them():
    # NumPyro's test_missing_plate_in_model and test_check_model_guide_match (6.).
    def model():
        x = numpyro.sample("x", dist.Normal(0, 1))
        with numpyro.plate("N", 10, dim=-2):
            numpyro.sample("obs", dist.Normal(x, 1), obs=jnp.ones((10, 2)))

    def guide():
        numpyro.sample("x", dist.Normal(0, 1))

    for objective in (IWELBO(1), IWELBO(4)):
        with pytest.warns(UserWarning, match="Missing a plate statement"):
            objective.loss(jax.random.key(0), {}, model, guide)

    def model2():
        with numpyro.plate("a", 10):
            numpyro.sample("x", dist.Normal().expand((10,)))

    def guide2():
        with numpyro.plate("data", 100, subsample_size=10):
            numpyro.sample("x", dist.Normal())

    with pytest.warns(UserWarning, match="Found plate statements in guide but not model"):
        IWELBO(1).loss(jax.random.key(0), {}, model2, guide2)


@pytest.mark.slow
def test_autosemidais_local_only_at_k_1_as_numpyro_tests_it():
    # NumPyro's test_autosemidais_local_only with IWELBO(1) for Trace_ELBO: the guide
    # draws a global site from local ones; at K = 1 every weighting is the ELBO.
    from numpyro.infer.autoguide import AutoSemiDAIS

    data = jnp.linspace(0, 1, 10)

    def model():
        with numpyro.plate("N", 10, subsample_size=5, dim=-1):
            batch = numpyro.subsample(data, event_dim=0)
            numpyro.sample("x", dist.Normal(batch, 1))

    def create_plates():
        return numpyro.plate("N", 10, subsample_size=5, dim=-1)

    local_guide = AutoNormal(model, create_plates=create_plates)
    guide = AutoSemiDAIS(model, model, None, local_guide=local_guide)
    svi = SVI(model, guide, optax.adam(0.01), IWELBO(1))
    svi_result = svi.run(jax.random.key(0), 10, progress_bar=False)
    samples = guide.sample_posterior(jax.random.key(1), svi_result.params, sample_shape=(100,))
    assert samples["x"].shape == (100, 5)
    assert np.all(np.isfinite(svi_result.losses))


def while_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))

    # A fixed point found by a while loop (2 z): reverse mode cannot differentiate it.
    def body(state):
        i, y = state
        return i + 1, 0.5 * y + z

    _, y = jax.lax.while_loop(lambda s: s[0] < 30, body, (0, 0.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(y, 1.0), obs=x)


def unrolled_model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    y = 0.0
    for _ in range(30):
        y = 0.5 * y + z
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(y, 1.0), obs=x)


@pytest.mark.parametrize("estimator", ["reparam", "stl"])
def test_forward_mode_differentiation_fits_a_while_loop_model(estimator):
    x = jnp.linspace(0.0, 2.0, 6)

    def guide(x):
        scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
        numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.0), scale))

    def fit(model, forward):
        svi = SVI(model, guide, optax.adam(0.05), IWELBO(4, gradient_estimator=estimator))
        return svi.run(
            jax.random.key(0), 100, x, progress_bar=False, forward_mode_differentiation=forward
        )

    forward = fit(while_model, True)
    reverse = fit(unrolled_model, False)  # the same model, differentiated in reverse mode
    np.testing.assert_allclose(forward.losses, reverse.losses, rtol=1e-4)
    for name in reverse.params:
        np.testing.assert_allclose(forward.params[name], reverse.params[name], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="forward_mode_differentiation"):
        svi = SVI(while_model, guide, optax.adam(0.05), IWELBO(4, gradient_estimator="dreg"))
        svi.run(jax.random.key(0), 2, x, progress_bar=False, forward_mode_differentiation=True)


@pytest.mark.slow
def test_forward_mode_gradient_ignores_particles_of_weight_zero():
    # Half the guide's mass lies where the model's density is zero (z < 0 for a
    # HalfNormal): those particles' tangents are NaN, their weight zero.
    def model():
        numpyro.sample("z", dist.HalfNormal(1.0))

    def guide():
        numpyro.sample("z", dist.Normal(numpyro.param("loc", 0.5), 1.0))

    def loss(params, key):
        return IWELBO(8).loss(key, params, model, guide)

    params = {"loc": jnp.asarray(0.5)}
    key = jax.random.key(3)
    g_rev = jax.grad(loss)(params, key)["loc"]
    g_fwd = jax.jacfwd(loss)(params, key)["loc"]
    assert np.isfinite(g_fwd)
    np.testing.assert_allclose(g_fwd, g_rev, rtol=1e-5)


def test_a_guide_built_for_data_of_another_size_says_so():
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0, 1))
            numpyro.sample("x", dist.Normal(z, 1), obs=x)

    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(0.1), Trace_ELBO())
    params = svi.run(jax.random.key(0), 5, jnp.zeros(10), progress_bar=False).params
    match = r"plate sizes \('data': guide 10, model 20\).*another size"
    with pytest.raises(ValueError, match=match):
        MarginalLikelihood(model, guide, params=params, num_particles=4)(
            jax.random.key(0), jnp.zeros(20)
        )
    with pytest.raises(ValueError, match=match):
        IWELBO(4).loss(jax.random.key(0), params, model, guide, jnp.zeros(20))
