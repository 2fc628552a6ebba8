"""Annealed importance sampling on plain arrays: exact with the exact posterior as proposal,
unbiased for Z_p / Z_q where importance sampling's weights are heavy-tailed, one chain per
plate element, the pilot step size adaptation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_iwae.maths.ais import ais_log_weights, hmc_transition, sigmoid_schedule

# Five plate elements, each a 2-D Gaussian target with its own normalizing constant.
LOG_Z = jnp.array([-3.0, 0.5, 2.0, -1.0, 4.0])
MEANS = jnp.array([[0.0, 1.0], [2.0, -1.0], [-1.0, 0.5], [0.3, 0.3], [5.0, 2.0]])
SCALE = 0.8


def normal_log_pdf(u, mean, scale):
    return jnp.sum(
        -0.5 * ((u - mean) / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi), -1
    )


def log_p(u):
    return LOG_Z + normal_log_pdf(u["z"], MEANS, SCALE)


def element_sum(tree):
    return jnp.sum(tree["z"], -1)


def element_expand(x, tree):
    return {"z": jnp.expand_dims(x, -1)}


def run(key, shift, scale, betas, step_size=0.4, leapfrog=5, adapt=False):
    k0, k1 = jax.random.split(key)
    q_mean, q_scale = MEANS + shift, SCALE * scale
    u0 = {"z": q_mean + q_scale * jax.random.normal(k0, MEANS.shape)}

    def log_densities(u):
        return normal_log_pdf(u["z"], q_mean, q_scale), log_p(u)

    return ais_log_weights(
        k1, u0, log_densities, betas, step_size, leapfrog, element_sum, element_expand, adapt
    )


def test_schedule_runs_from_zero_to_one_and_rises():
    betas = np.asarray(sigmoid_schedule(50))
    assert betas[0] == 0.0 and betas[-1] == 1.0 and np.all(np.diff(betas) > 0)


@pytest.mark.slow
def test_exact_proposal_gives_the_normalizing_constant_at_every_key():
    for i in range(3):
        out = run(jax.random.key(i), shift=0.0, scale=1.0, betas=sigmoid_schedule(20))
        np.testing.assert_allclose(out.log_w, LOG_Z, atol=1e-4)
        assert np.all(np.asarray(out.acceptance) > 0.5)  # the moves really happened


@pytest.mark.slow
def test_unbiased_where_importance_sampling_is_heavy_tailed():
    # The proposal is narrower than the target (0.6 of its scale) and moved 1.2 target
    # standard deviations: importance weights with infinite variance.
    runs = 2000
    keys = jax.random.split(jax.random.key(7), runs)

    def log_w(betas):
        return np.asarray(
            jax.jit(jax.vmap(lambda k: run(k, 1.2 * SCALE, 0.6, betas).log_w))(keys), np.float64
        )

    ais, plain = log_w(sigmoid_schedule(100)), log_w(jnp.array([0.0, 1.0]))
    for n in range(5):
        w = np.exp(ais[:, n] - LOG_Z[n])
        se = w.std(ddof=1) / math.sqrt(runs) / w.mean()
        assert abs(math.log(w.mean())) < 3 * se + 1e-3, (n, math.log(w.mean()), se)
        # Annealing shrinks the spread of the log weights (to 0.31-0.37 of IS's when
        # measured; IS's own estimate of element 2 was 7.9 of its standard errors off).
        assert ais[:, n].std() < 0.4 * plain[:, n].std(), (ais[:, n].std(), plain[:, n].std())


def test_each_element_runs_its_own_chain():
    # Element 0 gets a step size far too large: its proposals are rejected, the others'
    # are not, and every element's weight is still exact (exact proposal).
    eps = jnp.array([60.0, 0.4, 0.4, 0.4, 0.4])
    out = run(jax.random.key(1), 0.0, 1.0, sigmoid_schedule(20), step_size=eps)
    acc = np.asarray(out.acceptance)
    assert acc[0] < 0.05 and np.all(acc[1:] > 0.5), acc
    np.testing.assert_allclose(out.log_w, LOG_Z, atol=1e-4)


def test_pilot_adaptation_moves_the_step_size_towards_the_target_acceptance():
    out = run(jax.random.key(2), 0.5, 1.0, sigmoid_schedule(60), step_size=6.0, adapt=True)
    eps = np.asarray(out.step_sizes)
    assert eps.shape == (59, 5)
    assert np.all(eps[-1] < 3.0)  # shrunk from 6
    # Reusing the adapted sizes (fixed kernels) gives acceptances near 0.65.
    fixed = run(jax.random.key(3), 0.5, 1.0, sigmoid_schedule(60), step_size=eps)
    assert np.all(np.abs(np.asarray(fixed.acceptance) - 0.65) < 0.2), fixed.acceptance


def test_one_step_is_importance_sampling():
    out = run(jax.random.key(4), 0.3, 1.2, jnp.array([0.0, 1.0]))
    k0, _ = jax.random.split(jax.random.key(4))
    z = MEANS + 0.3 + SCALE * 1.2 * jax.random.normal(k0, MEANS.shape)
    expected = log_p({"z": z}) - normal_log_pdf(z, MEANS + 0.3, SCALE * 1.2)
    np.testing.assert_allclose(out.log_w, expected, rtol=1e-6)


def funnel_log_density(u):
    """A 2-D funnel, v ~ N(0, 1.5^2), x | v ~ N(0, e^v): its scale in x spans e^-2..e^2."""
    v, x = u["z"][0], u["z"][1]
    return jax.scipy.stats.norm.logpdf(v, 0.0, 1.5) + jax.scipy.stats.norm.logpdf(
        x, 0.0, jnp.exp(v / 2)
    )


@pytest.mark.parametrize("spread", [None, 0.3])
def test_hmc_transition_leaves_the_target_invariant(spread):
    # Exact draws moved by 10 transitions are still exact draws: the state-dependent
    # step size (spread 0.3) needs its g(eps | u') / g(eps | u) term for this (without
    # it the mean of v drifted by 10 of its standard errors, measured).
    n = 20_000
    kv, kx, km = jax.random.split(jax.random.key(5), 3)
    v = 1.5 * jax.random.normal(kv, (n,))
    u = {"z": jnp.stack([v, jnp.exp(v / 2) * jax.random.normal(kx, (n,))], -1)}

    def one(key, u):
        return hmc_transition(
            key,
            u,
            funnel_log_density,
            jnp.asarray(0.8),
            5,
            lambda t: jnp.sum(t["z"]),
            lambda a, t: {"z": jnp.broadcast_to(a, t["z"].shape)},
            spread,
        )

    def sweep(u, key):
        u, accept = jax.vmap(one)(jax.random.split(key, n), u)
        return u, accept.mean()

    moved, accepts = jax.jit(lambda u: jax.lax.scan(sweep, u, jax.random.split(km, 10)))(u)
    v_after = moved["z"][:, 0]
    assert float(jnp.mean(jnp.abs(v_after - v) > 0)) > 0.5  # they did move
    # Each statistic of exact draws has a known standard error.
    for stat, exact, stderr in (
        (jnp.mean(v_after), 0.0, 1.5 / math.sqrt(n)),
        (jnp.mean(v_after**2), 2.25, 2.25 * math.sqrt(2 / n)),
        (jnp.mean(v_after < -1.5), 0.1587, math.sqrt(0.1587 * 0.8413 / n)),
        (jnp.mean(v_after > 1.5), 0.1587, math.sqrt(0.1587 * 0.8413 / n)),
    ):
        assert abs(float(stat) - exact) < 4 * stderr, (float(stat), exact, stderr)


def test_a_uniform_draw_of_zero_accepts_no_improbable_move(monkeypatch):
    # jax.random.uniform is exactly 0 once in 2^23 draws; a run of tens of millions of
    # transitions meets it. Tested as log U < log a, that draw accepted a funnel move of
    # log acceptance -61,546 (a particle thrown from v = -1.4 to v = 169; its weight swamped
    # the run).
    monkeypatch.setattr(jax.random, "uniform", lambda key, shape=(), *a, **k: jnp.zeros(shape))
    u = {"z": jnp.array([0.3, -0.2])}

    def log_density(u):
        return -0.5 * jnp.sum(u["z"] ** 2)

    # A step of 50 on a unit Gaussian: the trajectory's energy grows by ~1e10.
    moved, prob = hmc_transition(
        jax.random.key(0),
        u,
        log_density,
        jnp.asarray(50.0),
        5,
        lambda t: jnp.sum(t["z"]),
        lambda a, t: {"z": jnp.broadcast_to(a, t["z"].shape)},
    )
    assert float(prob) == 0.0
    np.testing.assert_array_equal(moved["z"], u["z"])
