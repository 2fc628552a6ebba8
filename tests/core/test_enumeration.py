"""Enumerated model sites summed out inside each particle's weight, against exact sums."""

# ruff: noqa: E402 (funsor is optional: skip before importing what needs it)
import functools

import pytest

pytest.importorskip("funsor")

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import config_enumerate, markov
import numpyro.distributions as dist
from numpyro.infer import SVI, TraceEnum_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from scipy.special import logsumexp

from numpyro_iwae import (
    CIWAE,
    IWELBO,
    MIWAE,
    PIWAE,
    MarginalLikelihood,
    RenyiELBO,
    ReweightedWakeSleep,
)

Y = np.array([-2.1, -1.9, 0.3, 2.2, 1.8, 2.5], np.float32)
W = np.array([0.3, 0.7])
LOCS = np.array([-2.0, 2.0])


@config_enumerate
def fixed_mixture(y):
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("y", dist.Normal(jnp.asarray(LOCS)[z], 1.0), obs=y)


def empty_guide(y):
    pass


def normal_logpdf(x, loc, scale=1.0):
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)


def mixture_pointwise(y, locs):
    return logsumexp(np.log(W) + normal_logpdf(np.asarray(y, np.float64)[:, None], locs), -1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("weighting", ["joint", "local", "auto"])
def test_everything_enumerated_gives_log_p_exactly(k, weighting):
    exact = mixture_pointwise(Y, LOCS).sum()
    bound = -IWELBO(num_particles=k, weighting=weighting).loss(
        jax.random.key(0), {}, fixed_mixture, empty_guide, Y
    )
    np.testing.assert_allclose(bound, exact, rtol=1e-6)
    enum_elbo = -TraceEnum_ELBO().loss(jax.random.key(0), {}, fixed_mixture, empty_guide, Y)
    np.testing.assert_allclose(bound, enum_elbo, rtol=1e-6)


def test_evaluator_gives_each_datapoint_exactly():
    est = MarginalLikelihood(fixed_mixture, empty_guide, num_particles=7)(jax.random.key(0), Y)
    np.testing.assert_allclose(est.pointwise, mixture_pointwise(Y, LOCS), rtol=1e-6)
    np.testing.assert_allclose(est.pointwise_stderr, 0.0, atol=1e-6)


# Continuous component means, each assignment summed out.
YC = np.concatenate([np.full(6, -2.0), np.full(14, 2.0)]).astype(np.float32)
YC = YC + np.random.default_rng(0).normal(0.0, 0.5, YC.shape).astype(np.float32)
PRIOR_SCALE = 3.0


@config_enumerate
def mixture(y):
    locs = numpyro.sample("locs", dist.Normal(0.0, PRIOR_SCALE).expand([2]).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        numpyro.sample("y", dist.Normal(locs[z], 1.0), obs=y)


def quadrature_log_evidence(y, half_width=12.0, n=601):
    grid = np.linspace(-half_width, half_width, n)
    step = grid[1] - grid[0]
    a, b = np.meshgrid(grid, grid, indexing="ij")
    locs = np.stack([a.ravel(), b.ravel()], -1)  # (n^2, 2)
    y = np.asarray(y, np.float64)
    comp = np.log(W) + normal_logpdf(y[None, :, None], locs[:, None, :])  # (n^2, N, 2)
    log_lik = logsumexp(comp, -1).sum(-1)
    log_prior = normal_logpdf(locs, 0.0, PRIOR_SCALE).sum(-1)
    return float(logsumexp(log_lik + log_prior) + 2 * np.log(step))


@functools.lru_cache
def posterior_of_the_means(n=301, half_width=12.0):
    """Mean and s.d. of each component mean under the posterior, by quadrature."""
    grid = np.linspace(-half_width, half_width, n)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    locs = np.stack([a.ravel(), b.ravel()], -1)
    y = np.asarray(YC, np.float64)
    comp = np.log(W) + normal_logpdf(y[None, :, None], locs[:, None, :])
    log_post = logsumexp(comp, -1).sum(-1) + normal_logpdf(locs, 0.0, PRIOR_SCALE).sum(-1)
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    mean = w @ locs
    return mean, np.sqrt(w @ (locs - mean) ** 2)


def guide_near_posterior():
    guide = AutoNormal(numpyro.handlers.block(mixture, hide=["z"]))
    params = {
        "locs_auto_loc": jnp.array([-2.0, 2.0]),
        "locs_auto_scale": jnp.array([0.5, 0.35]),
    }
    return guide, params


@pytest.mark.slow
def test_evidence_matches_quadrature_within_standard_errors():
    guide, params = guide_near_posterior()
    exact = quadrature_log_evidence(YC)
    est = MarginalLikelihood(mixture, guide, params=params, num_particles=20000)(
        jax.random.key(3), YC
    )
    assert float(est.k_hat) < 0.7
    assert abs(float(est.log_marginal) - exact) <= 3 * float(est.stderr) + 1e-3, (
        float(est.log_marginal),
        exact,
        float(est.stderr),
    )


@pytest.mark.slow
def test_one_particle_is_trace_enum_elbo_and_more_particles_rise(stats):
    guide, params = guide_near_posterior()
    params = {**params, "locs_auto_scale": params["locs_auto_scale"] * 2.0}
    enum_mean, enum_se = stats(TraceEnum_ELBO(), params, mixture, guide, YC, reps=500)
    means = []
    for k in (1, 4, 16):
        mean, se = stats(
            IWELBO(num_particles=k, weighting="joint"), params, mixture, guide, YC, reps=500
        )
        means.append((mean, se))
    one, one_se = means[0]
    assert abs(one - enum_mean) <= 3 * np.hypot(one_se, enum_se)
    for (lo, lo_se), (hi, hi_se) in zip(means, means[1:]):
        assert hi - lo > 3 * np.hypot(lo_se, hi_se)


@pytest.mark.slow
def test_one_particle_gradient_is_trace_enum_elbo_in_expectation():
    guide, params = guide_near_posterior()
    keys = jax.random.split(jax.random.key(5), 300)

    def grads(elbo):
        fn = jax.vmap(lambda key: jax.grad(lambda p: elbo.loss(key, p, mixture, guide, YC))(params))
        g = jax.jit(fn)(keys)
        return np.concatenate([np.asarray(g[k], np.float64) for k in sorted(g)], -1)

    ours, theirs = grads(IWELBO(num_particles=1)), grads(TraceEnum_ELBO())
    se = np.hypot(ours.std(0, ddof=1), theirs.std(0, ddof=1)) / np.sqrt(len(keys))
    assert np.all(np.abs(ours.mean(0) - theirs.mean(0)) <= 4 * se), (ours.mean(0), theirs.mean(0))


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective",
    [
        MIWAE(num_particles=4, num_replicates=2),
        CIWAE(num_particles=4, beta=0.5),
        PIWAE(num_particles=4, num_replicates=2),
        RenyiELBO(alpha=0.5, num_particles=4),
        ReweightedWakeSleep(num_particles=4),
        IWELBO(num_particles=4, gradient_estimator="stl"),
        IWELBO(num_particles=4, gradient_estimator="dreg"),
    ],
    ids=lambda o: type(o).__name__ + getattr(o, "gradient_estimator", ""),
)
def test_the_family_sums_the_same_sites(objective):
    # With the exact posterior of the means as a tight guide, every particle's weight
    # is about log p(y): each objective's value is close to the exact evidence.
    guide = AutoNormal(numpyro.handlers.block(mixture, hide=["z"]))
    exact = quadrature_log_evidence(YC, n=301)
    mean, scale = posterior_of_the_means()
    params = {"locs_auto_loc": jnp.asarray(mean), "locs_auto_scale": jnp.asarray(scale)}
    loss, grad = jax.value_and_grad(
        lambda p: objective.loss(jax.random.key(0), p, mixture, guide, YC)
    )(params)
    assert abs(-float(loss) - exact) < 0.2
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grad.values())


def test_auto_weighting_treats_summed_sites_as_data():
    # Only the global means are drawn: local weighting would draw them once per step
    # (the ELBO), so the default weights them jointly, as for a regression.
    guide, params = guide_near_posterior()
    draw = IWELBO(num_particles=4).loss(jax.random.key(0), params, mixture, guide, YC)
    joint = IWELBO(num_particles=4, weighting="joint").loss(
        jax.random.key(0), params, mixture, guide, YC
    )
    np.testing.assert_allclose(draw, joint, rtol=1e-6)


# Per datapoint: an assignment summed out and a continuous offset drawn by the guide.
NOISE = 0.5


@config_enumerate
def offsets(y):
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
        u = numpyro.sample("u", dist.Normal(0.0, NOISE))
        numpyro.sample("y", dist.Normal(jnp.asarray(LOCS)[z] + u, NOISE), obs=y)


def offsets_guide(y):
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("u", dist.Normal(0.0, NOISE))


def test_per_datapoint_evidence_with_a_drawn_latent_beside_the_summed_one():
    est = MarginalLikelihood(offsets, offsets_guide, num_particles=4000)(jax.random.key(1), Y)
    y = np.asarray(Y, np.float64)[:, None]
    exact = logsumexp(np.log(W) + normal_logpdf(y, LOCS, np.sqrt(2) * NOISE), -1)
    assert np.all(np.abs(np.asarray(est.pointwise) - exact) <= 3 * np.asarray(est.pointwise_stderr))


@pytest.mark.slow
def test_local_weighting_trains_with_a_summed_site_per_element():
    @config_enumerate
    def model(y):
        locs = numpyro.sample("locs", dist.Normal(0.0, PRIOR_SCALE).expand([2]).to_event(1))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.asarray(W)))
            u = numpyro.sample("u", dist.Normal(0.0, NOISE))
            numpyro.sample("y", dist.Normal(locs[z] + u, NOISE), obs=y)

    guide = AutoNormal(
        numpyro.handlers.block(model, hide=["z"]),
        init_loc_fn=numpyro.infer.init_to_value(values={"locs": jnp.array([-1.0, 1.0])}),
    )
    elbo = IWELBO(num_particles=8, weighting="local", gradient_estimator="dreg")
    svi = SVI(model, guide, numpyro.optim.Adam(0.05), elbo)
    result = svi.run(jax.random.key(1), 1000, YC, progress_bar=False)
    assert np.mean(result.losses[-100:]) < np.mean(result.losses[:100])
    np.testing.assert_allclose(np.asarray(result.params["locs_auto_loc"]), [-2.0, 2.0], atol=0.5)


# A hidden Markov chain, written with markov() as NumPyro's HMM example writes it.
TRANS = np.array([[0.9, 0.1], [0.2, 0.8]])
EMIT_LOCS = np.array([-1.0, 1.0])
YS = np.array([-1.2, -0.7, 0.9, 1.3, 1.1, -0.4, -1.1], np.float32)


@config_enumerate
def hmm(ys, emit_scale=None):
    scale = emit_scale
    if scale is None:
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
    x = 0
    for t in markov(range(len(ys))):
        x = numpyro.sample(f"x_{t}", dist.Categorical(jnp.asarray(TRANS)[x]))
        numpyro.sample(f"y_{t}", dist.Normal(jnp.asarray(EMIT_LOCS)[x], scale), obs=ys[t])


def forward_log_evidence(ys, scale):
    alpha = np.log(TRANS[0]) + normal_logpdf(ys[0], EMIT_LOCS, scale)
    for y in ys[1:]:
        alpha = logsumexp(alpha[:, None] + np.log(TRANS), 0) + normal_logpdf(y, EMIT_LOCS, scale)
    return float(logsumexp(alpha))


@pytest.mark.slow
def test_hmm_without_continuous_latents_is_the_forward_algorithm():
    def no_guide(ys, emit_scale=None):
        pass

    bound = -IWELBO(num_particles=2).loss(jax.random.key(0), {}, hmm, no_guide, YS, 0.7)
    np.testing.assert_allclose(bound, forward_log_evidence(YS, 0.7), rtol=1e-5)
    est = MarginalLikelihood(hmm, no_guide, num_particles=3)(jax.random.key(0), YS, 0.7)
    np.testing.assert_allclose(est.log_marginal, forward_log_evidence(YS, 0.7), rtol=1e-5)


@pytest.mark.slow
def test_hmm_evidence_matches_the_forward_algorithm_under_quadrature():
    # About the posterior of log scale (mean -0.76, s.d. 0.36 by quadrature), wider.
    def guide(ys, emit_scale=None):
        numpyro.sample("scale", dist.LogNormal(-0.76, 0.45))

    est = MarginalLikelihood(hmm, guide, num_particles=4000)(jax.random.key(0), YS)
    log_s = np.linspace(np.log(0.05), np.log(20.0), 4001)
    s = np.exp(log_s)
    prior = normal_logpdf(log_s, 0.0, 0.5) - log_s  # LogNormal(0, 0.5) density in s
    integrand = np.array([forward_log_evidence(YS, v) for v in s]) + prior + log_s  # ds = s dlog s
    exact = float(logsumexp(integrand) + np.log(log_s[1] - log_s[0]))
    assert float(est.k_hat) < 0.7
    assert abs(float(est.log_marginal) - exact) <= 3 * float(est.stderr)


@config_enumerate
def scan_hmm(ys, emit_scale=None):
    """The HMM above written with scan, one chain per column of ``ys``, as NumPyro's
    HMM example writes it (the plate inside the step).
    """
    scale = emit_scale
    if scale is None:
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))

    def step(x_prev, y):
        with numpyro.plate("sequences", ys.shape[1]):
            x = numpyro.sample("x", dist.Categorical(jnp.asarray(TRANS)[x_prev]))
            numpyro.sample("y", dist.Normal(jnp.asarray(EMIT_LOCS)[x], scale), obs=y)
        return x, None

    scan(step, jnp.zeros(ys.shape[1], jnp.int32), ys)


YSEQ = np.stack([YS, YS[::-1], -YS], -1)  # three sequences of 7 steps


@pytest.mark.slow
def test_scan_hmm_is_the_forward_algorithm_per_sequence():
    def no_guide(ys, emit_scale=None):
        pass

    exact = [forward_log_evidence(YSEQ[:, i], 0.7) for i in range(3)]
    est = MarginalLikelihood(scan_hmm, no_guide, num_particles=3)(
        jax.random.key(0), jnp.asarray(YSEQ), 0.7
    )
    np.testing.assert_allclose(est.pointwise, exact, rtol=1e-5)
    bound = -IWELBO(num_particles=2).loss(
        jax.random.key(0), {}, scan_hmm, no_guide, jnp.asarray(YSEQ), 0.7
    )
    np.testing.assert_allclose(bound, sum(exact), rtol=1e-5)


@pytest.mark.slow
def test_scan_hmm_trains_and_matches_the_loop():
    def guide(ys, emit_scale=None):
        loc = numpyro.param("loc", -0.5)
        numpyro.sample("scale", dist.LogNormal(loc, 0.45))

    ys = jnp.asarray(YS)[:, None]
    params = {"loc": jnp.asarray(-0.76)}
    key = jax.random.key(4)
    looped = IWELBO(num_particles=4).loss(key, params, hmm, guide, YS)
    scanned = IWELBO(num_particles=4).loss(key, params, scan_hmm, guide, ys)
    np.testing.assert_allclose(scanned, looped, rtol=1e-5)
    # From far off, training finds the posterior of log scale (mean -0.76 by quadrature).
    far = {"loc": jnp.asarray(1.0)}
    svi = SVI(scan_hmm, guide, numpyro.optim.Adam(0.05), IWELBO(num_particles=8))
    state = svi.init(jax.random.key(1), ys, init_params=far)
    result = svi.run(jax.random.key(1), 400, ys, progress_bar=False, init_state=state)
    assert abs(float(result.params["loc"]) + 0.76) < 0.25, result.params["loc"]


@pytest.mark.slow
def test_autocontinuous_guide_with_enumeration():
    # NumPyro's TraceEnum_ELBO fails on this pair (pyro-ppl/numpyro#2013).
    guide = AutoDiagonalNormal(numpyro.handlers.block(mixture, hide=["z"]))
    svi = SVI(mixture, guide, numpyro.optim.Adam(0.05), IWELBO(num_particles=8))
    result = svi.run(jax.random.key(0), 300, YC, progress_bar=False)
    est = MarginalLikelihood(mixture, guide, params=result.params, num_particles=2000)(
        jax.random.key(1), YC
    )
    exact = quadrature_log_evidence(YC, n=301)
    assert abs(float(est.log_marginal) - exact) <= 3 * float(est.stderr) + 1e-3


def test_enumerated_guide_site_is_refused():
    def guide(y):
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("z", dist.Categorical(jnp.asarray(W)), infer={"enumerate": "parallel"})

    with pytest.raises(ValueError, match="Guide site.*marked for enumeration"):
        IWELBO(num_particles=2).loss(jax.random.key(0), {}, fixed_mixture, guide, Y)


def test_enumerated_site_shared_by_plate_elements_is_refused_under_local_weighting():
    @config_enumerate
    def shared(y):
        c = numpyro.sample("c", dist.Categorical(jnp.asarray(W)))
        with numpyro.plate("data", y.shape[0]):
            u = numpyro.sample("u", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(jnp.asarray(LOCS)[c] + u, 1.0), obs=y)

    def guide(y):
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("u", dist.Normal(0.0, 1.0))

    y = np.linspace(-2, 2, 12).astype(np.float32)
    with pytest.raises(ValueError, match="couple those elements"):
        IWELBO(num_particles=2, weighting="local").loss(jax.random.key(0), {}, shared, guide, y)
    # Jointly weighted it is summed out exactly: with the guide equal to u's prior the
    # weight is the likelihood averaged over c.
    bound = IWELBO(num_particles=1).loss(jax.random.key(0), {}, shared, guide, y)
    assert np.isfinite(float(bound))


# The shape of NumPyro's HMM example (examples/hmm_enum.py, its first model): global
# transition and emission probabilities, sequences of different lengths in a plate at
# dim -2, masked steps past each length, binary "tones" in a plate at dim -1, scan over time.
NUM_TONES = 3
LENGTHS = np.array([6, 4, 5])
TONES = (np.random.default_rng(2).random((3, 6, NUM_TONES)) < 0.4).astype(np.float32)


@config_enumerate
def hmm_example_shape(sequences, lengths):
    num_sequences, max_length, data_dim = sequences.shape
    probs_x = numpyro.sample("probs_x", dist.Dirichlet(0.9 * jnp.eye(2) + 0.1).to_event(1))
    probs_y = numpyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([2, data_dim]).to_event(2))

    def transition(carry, y):
        x_prev, t = carry
        with numpyro.plate("sequences", num_sequences, dim=-2):
            with numpyro.handlers.mask(mask=(t < lengths)[..., None]):
                x = numpyro.sample("x", dist.Categorical(probs_x[x_prev]))
                with numpyro.plate("tones", data_dim, dim=-1):
                    numpyro.sample("y", dist.Bernoulli(probs_y[x.squeeze(-1)]), obs=y)
        return (x, t + 1), None

    x_init = jnp.zeros((num_sequences, 1), dtype=jnp.int32)
    scan(transition, (x_init, 0), jnp.swapaxes(sequences, 0, 1))


def masked_forward(probs_x, probs_y, tones, length):
    """log p(one sequence) by the forward algorithm, its first ``length`` steps."""

    def emit(t):
        p = probs_y  # (states, tones)
        return np.sum(tones[t] * np.log(p) + (1 - tones[t]) * np.log1p(-p), -1)

    alpha = np.log(probs_x[0]) + emit(0)
    for t in range(1, length):
        alpha = logsumexp(alpha[:, None] + np.log(probs_x), 0) + emit(t)
    return float(logsumexp(alpha))


@pytest.mark.slow
def test_numpyro_hmm_example_shape_is_the_forward_algorithm_given_its_globals():
    probs_x = np.array([[0.7, 0.3], [0.2, 0.8]])
    probs_y = np.array([[0.2, 0.6, 0.4], [0.7, 0.1, 0.5]])
    fixed = numpyro.handlers.condition(
        hmm_example_shape, data={"probs_x": jnp.asarray(probs_x), "probs_y": jnp.asarray(probs_y)}
    )

    def no_guide(sequences, lengths):
        pass

    exact = sum(masked_forward(probs_x, probs_y, TONES[i], LENGTHS[i]) for i in range(3))
    prior = float(
        dist.Dirichlet(0.9 * jnp.eye(2) + 0.1).log_prob(probs_x).sum()
        + dist.Beta(0.1, 0.9).log_prob(probs_y).sum()
    )
    bound = -IWELBO(num_particles=2).loss(
        jax.random.key(0), {}, fixed, no_guide, jnp.asarray(TONES), jnp.asarray(LENGTHS)
    )
    # A masked step's state still ranges over its two values with factor 1: as in
    # NumPyro's own contraction, each masked step adds log 2 to the model's density.
    masked = int(np.sum(TONES.shape[1] - LENGTHS))
    np.testing.assert_allclose(bound, exact + prior + masked * np.log(2), rtol=1e-5)
    model = numpyro.contrib.funsor.enum(fixed, first_available_dim=-3)
    theirs, _ = numpyro.contrib.funsor.log_density(
        model, (jnp.asarray(TONES), jnp.asarray(LENGTHS)), {}, {}
    )
    np.testing.assert_allclose(bound, theirs, rtol=1e-6)


@pytest.mark.slow
def test_numpyro_hmm_example_shape_trains_and_is_scored():
    hidden = numpyro.handlers.block(hmm_example_shape, hide=["x"])
    guide = AutoNormal(hidden)
    args = (jnp.asarray(TONES), jnp.asarray(LENGTHS))
    svi = SVI(hmm_example_shape, guide, numpyro.optim.Adam(0.05), IWELBO(num_particles=8))
    result = svi.run(jax.random.key(0), 300, *args, progress_bar=False)
    assert np.mean(result.losses[-50:]) < np.mean(result.losses[:50])
    est = MarginalLikelihood(hmm_example_shape, guide, params=result.params, num_particles=2000)(
        jax.random.key(1), *args
    )
    assert np.isfinite(float(est.log_marginal)) and np.isfinite(float(est.stderr))
