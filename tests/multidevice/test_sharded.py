"""Run with 8 host devices (tests/test_sharding.py starts this in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8); skipped on fewer devices."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI
import optax
import pytest

from numpyro_iwae import IWELBO, SUMO, MarginalLikelihood, SUMOMarginal, shard_particles
from numpyro_iwae.core.draw import log_weights
from numpyro_iwae.core.program import Program

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def model(x):
    mu0 = numpyro.param("mu0", 0.2)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu0, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = numpyro.param("loc", x / 2 + 0.3)
    scale = numpyro.param("scale", jnp.full(x.shape, 0.9), constraint=dist.constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, scale))


def global_model(x):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(w, 1.0))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def global_guide(x):
    w = numpyro.sample("w", dist.Normal(numpyro.param("w_loc", 0.1), 0.5))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(x / 2 + w / 2, 0.8))


X = jnp.linspace(-2.0, 2.0, 16)


def particle_mesh():
    return Mesh(np.array(jax.devices()), ("particles",))


def loss_and_grads(elbo, params, model=model, guide=guide, x=X):
    fn = jax.jit(jax.value_and_grad(lambda p: elbo.loss(jax.random.key(3), p, model, guide, x)))
    return fn(params)


PARAMS = {"mu0": 0.2, "loc": X / 2 + 0.3, "scale": jnp.full(16, 0.9)}


@pytest.mark.parametrize("k, estimator", [(16, "reparam"), (13, "dreg"), (5, "reparam")])
def test_iwelbo_sharded_particles_equal_vmapped(k, estimator):
    sharded = shard_particles(particle_mesh())
    plain = loss_and_grads(IWELBO(k, gradient_estimator=estimator), PARAMS)
    split = loss_and_grads(
        IWELBO(k, gradient_estimator=estimator, vectorize_particles=sharded), PARAMS
    )
    np.testing.assert_allclose(split[0], plain[0], rtol=1e-5)
    for name in PARAMS:
        np.testing.assert_allclose(split[1][name], plain[1][name], rtol=1e-4, atol=1e-6)


def test_every_objective_on_the_weights_code_takes_it():
    sharded = shard_particles(particle_mesh())
    plain = loss_and_grads(SUMO(max_terms=11), PARAMS)
    split = loss_and_grads(SUMO(max_terms=11, vectorize_particles=sharded), PARAMS)
    np.testing.assert_allclose(split[0], plain[0], rtol=1e-5)
    for name in PARAMS:
        np.testing.assert_allclose(split[1][name], plain[1][name], rtol=1e-4, atol=1e-6)


def test_the_particles_really_are_split():
    sharded = shard_particles(particle_mesh())
    program = Program(model, guide, (X,), {})

    @jax.jit
    def weights(params):
        return log_weights(program, params, jax.random.key(0), 16, sharded)[0].log_p

    log_p = weights(PARAMS)
    assert log_p.shape == (16, 16)
    assert log_p.sharding.shard_shape(log_p.shape) == (2, 16)  # 2 particles per device
    assert len(log_p.sharding.device_set) == 8


def test_explicit_mesh_under_set_mesh():
    mesh = jax.make_mesh((8,), ("particles",), axis_types=(AxisType.Explicit,))
    plain = loss_and_grads(IWELBO(13), PARAMS)
    with jax.set_mesh(mesh):
        split = loss_and_grads(IWELBO(13, vectorize_particles=shard_particles(mesh)), PARAMS)
    np.testing.assert_allclose(split[0], plain[0], rtol=1e-5)
    np.testing.assert_allclose(split[1]["loc"], plain[1]["loc"], rtol=1e-4, atol=1e-6)


def test_axis_name_is_checked():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("particles", "data"))
    with pytest.raises(ValueError, match="say which one"):
        shard_particles(mesh)
    with pytest.raises(ValueError, match="not an axis"):
        shard_particles(mesh, "batch")
    assert shard_particles(mesh, "data").num_shards == 2


def data_on_devices(x, mesh, axis):
    return jax.device_put(x, NamedSharding(mesh, P(axis)))


def test_svi_step_on_sharded_data_equals_one_device():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x_split = data_on_devices(X, mesh, "data")
    svi = SVI(model, guide, optax.adam(0.05), IWELBO(8))

    def run(x):
        state = svi.init(jax.random.key(0), x)
        update = jax.jit(svi.update)
        losses = []
        for _ in range(3):
            state, loss = update(state, x)
            losses.append(loss)
        return np.array(losses), svi.get_params(state)

    losses, params = run(X)
    losses_split, params_split = run(x_split)
    np.testing.assert_allclose(losses_split, losses, rtol=1e-5)
    np.testing.assert_allclose(params_split["loc"], params["loc"], rtol=1e-5, atol=1e-6)


def test_marginal_likelihood_on_sharded_data_equals_one_device():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x_split = data_on_devices(X, mesh, "data")
    ml = MarginalLikelihood(model, guide, params=PARAMS, num_particles=300, chunk_size=64)
    one, split = ml(jax.random.key(1), X), ml(jax.random.key(1), x_split)
    np.testing.assert_allclose(split.pointwise, one.pointwise, rtol=1e-5)
    np.testing.assert_allclose(split.k_hat, one.k_hat, rtol=1e-4, atol=1e-5)
    # The per-element work stays on the element's device.
    assert split.pointwise.sharding.shard_shape((16,)) == (2,)
    # The memory budget is per device: the automatic chunk is 8 times larger.
    tight = MarginalLikelihood(model, guide, params=PARAMS, num_particles=5000, memory_budget=2**16)
    tight(jax.random.key(1), X)
    chunk_one = tight.chunk_size_used
    tight(jax.random.key(1), x_split)
    assert 8 * chunk_one <= tight.chunk_size_used < 8 * (chunk_one + 1)


def test_marginal_likelihood_with_sharded_particles_and_data():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("particles", "data"))
    x_split = data_on_devices(X, mesh, "data")
    sharded = shard_particles(mesh, "particles")
    plain = MarginalLikelihood(model, guide, params=PARAMS, num_particles=301, chunk_size=30)
    split = MarginalLikelihood(
        model, guide, params=PARAMS, num_particles=301, chunk_size=30, vectorize_particles=sharded
    )
    one, both = plain(jax.random.key(2), X), split(jax.random.key(2), x_split)
    np.testing.assert_allclose(both.pointwise, one.pointwise, rtol=1e-5)
    np.testing.assert_allclose(both.stderr, one.stderr, rtol=1e-4)


def test_nested_and_sumo_evaluators_on_sharded_data():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x_split = data_on_devices(X, mesh, "data")
    nested = MarginalLikelihood(
        global_model, global_guide, params={"w_loc": 0.1}, num_particles=4, num_global_particles=20
    )
    np.testing.assert_allclose(
        nested(jax.random.key(4), x_split).log_marginal,
        nested(jax.random.key(4), X).log_marginal,
        rtol=1e-5,
    )
    sumo = SUMOMarginal(model, guide, params=PARAMS, num_replicates=10)
    np.testing.assert_allclose(
        sumo(jax.random.key(5), x_split).replicates,
        sumo(jax.random.key(5), X).replicates,
        rtol=1e-5,
        atol=1e-5,
    )
