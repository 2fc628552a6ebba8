"""One of two processes of tests/test_sharding.py's multi-host test: 4 host devices
each, joined by jax.distributed into one 8-device mesh over which IWELBO's particles
are split. Prints the sharded loss, the one-device loss and the largest gradient
difference."""

import os
import sys


def main(process_id: int, port: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    import jax.numpy as jnp
    from jax.sharding import Mesh
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from numpyro_iwae import IWELBO, shard_particles

    x = jnp.linspace(-2.0, 2.0, 16)

    def model(x):
        mu0 = numpyro.param("mu0", 0.2)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(mu0, 1.0))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = numpyro.param("loc", x / 2 + 0.3)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, 0.9))

    def value_and_grad(elbo, params):
        fn = lambda p: elbo.loss(jax.random.key(3), p, model, guide, x)  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(params)

    params = {"mu0": 0.2, "loc": x / 2 + 0.3}
    mesh = Mesh(np.array(jax.devices()), ("particles",))
    loss, grads = value_and_grad(IWELBO(13, vectorize_particles=shard_particles(mesh)), params)
    local = jax.local_devices()[0]
    plain_loss, plain_grads = value_and_grad(IWELBO(13), jax.device_put(params, local))
    diff = max(
        float(np.max(np.abs(np.asarray(grads[n].addressable_shards[0].data) - plain_grads[n])))
        for n in params
    )
    loss_here = float(loss.addressable_shards[0].data)
    print("RESULT", jax.process_count(), jax.device_count(), loss_here, float(plain_loss), diff)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
