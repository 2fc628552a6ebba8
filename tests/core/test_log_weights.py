"""core.plates, core.draw and core.plan: plate detection, per-element log weights, scales."""

import math

from gaussians import assert_within, mc_iwae_bound, normal_logpdf
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
import numpyro.distributions as dist
from numpyro.infer.autoguide import AutoDiagonalNormal
import pytest

from numpyro_iwae.core.draw import log_weights
from numpyro_iwae.core.program import Program
from numpyro_iwae.maths.bounds import iwae_bound

A = np.array([1.0, -0.5, 2.0])
B = np.array([0.1, 0.0, -0.3])
SIG = np.array([0.5, 1.0, 0.8])
X = np.random.default_rng(0).normal(size=(5, 3)) * 1.5


def vmap(fn, keys):
    return jax.vmap(fn)(keys)


def model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(A * z[:, None] + B, SIG).to_event(1), obs=x)


Q_LOC = np.linspace(-1.0, 1.0, 5)
Q_SCALE = np.full(5, 1.3)


def guide(x):
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(Q_LOC, Q_SCALE))


def weights(model, guide, *args, k=4, key=0, **kwargs):
    return log_weights(Program(model, guide, args, kwargs), {}, jax.random.key(key), k, vmap)


@pytest.mark.slow
def test_local_latents_give_one_weight_per_datapoint():
    w, structure = weights(model, guide, X, k=6)
    assert structure.names == ("data",) and structure.sizes == (5,)
    assert structure.scale == 1.0 and structure.joint_plates == ()
    assert w.log_p.shape == w.log_q.shape == (6, 5)


def test_log_weights_match_hand_computed_densities():
    # The model records each particle's z in a mutable site, returned per particle.
    def recording_model(x):
        record = numpyro.primitives.mutable("record", {"z": jnp.zeros(x.shape[0])})
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(A * z[:, None] + B, SIG).to_event(1), obs=x)
        record["z"] = z

    w, _ = weights(recording_model, guide, X, k=3, key=5)
    z = np.asarray(w.mutable_state["record"]["z"], np.float64)
    assert z.shape == (3, 5) and np.ptp(z, axis=0).min() > 0  # distinct particles
    log_p = normal_logpdf(z, 0, 1) + normal_logpdf(X, A * z[..., None] + B, SIG).sum(-1)
    log_q = normal_logpdf(z, Q_LOC, Q_SCALE)
    np.testing.assert_allclose(w.log_p, log_p, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(w.log_q, log_q, rtol=1e-5, atol=1e-4)


def test_per_datapoint_bound_matches_independent_monte_carlo():
    k, reps = 8, 4000
    fn = jax.jit(jax.vmap(lambda key: iwae_bound(weights_from_key(key, k))))
    ours = np.asarray(fn(jax.random.split(jax.random.key(1), reps)), np.float64)
    mean, se = ours.mean(0), ours.std(0, ddof=1) / math.sqrt(reps)
    ref, ref_se = mc_iwae_bound(np.random.default_rng(2), X, A, B, SIG, Q_LOC, Q_SCALE, k, reps)
    assert mean.shape == (5,)
    assert_within(mean, np.hypot(se, ref_se), ref, what="per-datapoint bound")


def weights_from_key(key, k):
    return log_weights(Program(model, guide, (X,)), {}, key, k, vmap)[0].log_w


def test_global_latent_makes_weights_joint():
    def gmodel(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def gguide(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    w, structure = weights(gmodel, gguide, X[:, 0])
    assert structure.names == () and w.log_p.shape == (4,)
    assert structure.joint_plates == (("data", 5),)
    assert structure.outside_sites == ("z",)


@pytest.mark.slow
def test_autodiagonal_guide_is_joint_over_its_plate():
    # AutoDiagonalNormal draws all latents as one site outside every plate, so the
    # weights cannot be split per datapoint even though the model's can.
    g = AutoDiagonalNormal(model)
    params = {"auto_loc": jnp.zeros(5), "auto_scale": jnp.ones(5)}
    w, structure = log_weights(Program(model, g, (X,)), params, jax.random.key(0), 3, vmap)
    assert structure.names == () and w.log_p.shape == (3,)


@pytest.mark.slow
def test_subsample_scale_is_separated_from_user_scale():
    def smodel(x):
        with numpyro.plate("data", 10, subsample_size=4):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            with handlers.scale(scale=0.5):
                numpyro.sample("x", dist.Normal(z, 1.0), obs=0.0)

    def sguide(x):
        with numpyro.plate("data", 10, subsample_size=4):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    w, structure = weights(smodel, sguide, None, k=2)
    assert structure.sizes == (4,) and structure.full_sizes == (10,)
    assert structure.scale == 2.5
    # log p - log q = 0.5 * log N(0; z, 1): the subsample factor 2.5 is not inside.
    z_term = w.log_p - w.log_q
    assert np.all(z_term <= 0.5 * normal_logpdf(0.0, 0.0, 1.0) + 1e-6)


@pytest.mark.slow
def test_same_subsample_for_every_particle():
    def smodel(x):
        with numpyro.plate("data", 50, subsample_size=5) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def sguide(x):
        with numpyro.plate("data", 50, subsample_size=5) as idx:
            numpyro.sample("z", dist.Normal(x[idx], 1e-3))

    # With a guide centred on the data, log w depends on which x were drawn; if all
    # particles see the same minibatch their weights agree to within the guide noise.
    x = jnp.arange(50.0)
    w, _ = weights(smodel, sguide, x, k=16)
    # (log p is about -x^2 / 2: another minibatch would move it by hundreds, the
    # guide noise by about |x| * 1e-3.)
    log_p = np.asarray(w.log_p)
    assert np.all(np.ptp(log_p, axis=0) < 1e-3 * np.abs(log_p).max(axis=0))


@pytest.mark.slow
def test_nan_log_weight_is_weight_zero():
    w, _ = weights(model, guide, X, k=2)
    broken = w._replace(log_p=w.log_p.at[0, 0].set(jnp.nan))
    assert broken.log_w[0, 0] == -jnp.inf and np.isfinite(broken.log_w[1, 0])


@pytest.mark.parametrize("shared, shapes", [(False, None), (False, ((),)), (True, None)])
def test_zero_weight_safe_ignores_particles_whose_weight_underflows(shared, shapes):
    from numpyro_iwae.core.guard import zero_weight_safe
    from numpyro_iwae.core.program import ModelOutput

    # Particle 0 sits where d log p / dz = -inf, with log p = -1000: finite, but its
    # normalized weight underflows to exactly 0 beside the others (log p = -1).
    def model_fn(values, params):
        z = values["z"]
        return params["a"] * (-jnp.sqrt(z) - 1000.0 * (1.0 - z)), ModelOutput({}, {})

    values, params = {"z": jnp.array([0.0, 1.0, 1.0])}, {"a": jnp.array(1.0)}

    def bound(fn, values, params):
        return iwae_bound(fn(values, params)[0])

    plain = jax.grad(bound, argnums=(1, 2))(model_fn, values, params)
    assert np.isnan(plain[0]["z"][0])  # 0 x inf: what the wrapper is for
    safe_fn = zero_weight_safe(model_fn, (("z", 0, ()),), shared, group_shapes=shapes)
    g_values, g_params = jax.grad(bound, argnums=(1, 2))(safe_fn, values, params)
    # Each live particle has weight 1/2 and d log p / dz = -1/2 + 1000 at z = 1.
    np.testing.assert_allclose(g_values["z"], [0.0, 499.75, 499.75], rtol=1e-6)
    if shared:  # d/da of logsumexp(a * c_k): the live particles' c = -1 each
        np.testing.assert_allclose(g_params["a"], -1.0, rtol=1e-6)
