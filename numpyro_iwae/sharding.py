"""Particles split over the devices of a mesh: a ``vectorize_particles`` callable built on
:func:`jax.shard_map`, for IWELBO, the rest of the family and the evaluators.

"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["ShardedParticles", "shard_particles"]


class ShardedParticles:
    r"""Map a per-particle function over the leading (particle) axis of its inputs
    with :func:`jax.vmap` inside :func:`jax.shard_map`, so that each device of the mesh
    axis ``axis_name`` draws and scores :math:`\lceil K / n \rceil` of the K particles.
    Made by :func:`shard_particles`; see there.
    """

    def __init__(self, mesh: Mesh, axis_name: str) -> None:
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_shards = int(mesh.shape[axis_name])
        axis_type = dict(zip(mesh.axis_names, mesh.axis_types))[axis_name]
        self._explicit = axis_type == AxisType.Explicit
        self._sharding = NamedSharding(mesh, PartitionSpec(axis_name))

    def __repr__(self) -> str:
        return f"ShardedParticles(axis_name={self.axis_name!r}, num_shards={self.num_shards})"

    def padded(self, num_particles: int) -> int:
        """Particles evaluated for ``num_particles``: rounded up to a multiple of the
        number of shards.
        """
        return -(-num_particles // self.num_shards) * self.num_shards

    def __call__(self, fn: Callable, xs: Any) -> Any:
        """``jax.vmap(fn)(xs)``, its particles split over the mesh axis."""
        k = jax.tree.leaves(xs)[0].shape[0]
        pad = self.padded(k) - k
        if pad:  # repeat the first particle's inputs; their outputs are dropped below
            xs = jax.tree.map(lambda v: jnp.concatenate([v, jnp.repeat(v[:1], pad, 0)]), xs)
        if self._explicit:
            xs = jax.sharding.reshard(xs, self._sharding)
        spec = PartitionSpec(self.axis_name)
        mapped = jax.shard_map(
            jax.vmap(fn),
            mesh=self.mesh,
            in_specs=spec,
            out_specs=spec,
            axis_names={self.axis_name},
        )
        out = mapped(xs)
        if not pad:
            return out
        if self._explicit:  # an explicit sharding cannot be sliced unevenly: gather first
            out = jax.sharding.reshard(out, NamedSharding(self.mesh, PartitionSpec()))
        return jax.tree.map(lambda v: v[:k], out)


def shard_particles(mesh: Mesh, axis_name: str | None = None) -> ShardedParticles:
    r"""A ``vectorize_particles`` callable that splits the K particles over the devices
    of one axis of a :class:`jax.sharding.Mesh`.

    Pass it wherever a particle map is taken:
    ``IWELBO(K, vectorize_particles=shard_particles(mesh))`` (and MIWAE, CIWAE, PIWAE,
    RenyiELBO, ReweightedWakeSleep, SUMO), or
    ``MarginalLikelihood(..., vectorize_particles=shard_particles(mesh))`` to split every
    chunk of particles. Each device runs ``jax.vmap`` over its share; the log weights
    come back sharded over the particle axis and the ``logsumexp`` over particles is
    the only cross-device reduction, so loss and gradients equal the vmapped ones up to
    float rounding. The model and guide's parameters are replicated.

    When K is not a multiple of the number of devices n, the inputs of the first
    particle are repeated up to :math:`\lceil K/n \rceil n` and the extra outputs are
    dropped before the weights are reduced: the result is exactly that of K particles,
    at the cost of the padded ones.

    Other mesh axes stay under automatic partitioning, so a mesh ``("particles",
    "data")`` can split particles over one axis while the data (placed with a
    :class:`~jax.sharding.NamedSharding` over the other) splits each plate. With a mesh of
    ``Explicit`` axes (the default of :func:`jax.make_mesh` in recent JAX) run the
    computation under ``jax.set_mesh(mesh)``; a :class:`~jax.sharding.Mesh` built
    directly has ``Auto`` axes and needs no context.

    :param mesh: the device mesh.
    :param axis_name: the mesh axis to split the particles over; may be omitted for a
        mesh with one axis.
    :raises ValueError: if ``axis_name`` is not an axis of the mesh, or is omitted for
        a mesh with several axes.

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh
        >>> from numpyro_iwae import IWELBO, shard_particles
        >>> mesh = Mesh(np.array(jax.devices()), ("particles",))
        >>> elbo = IWELBO(16, vectorize_particles=shard_particles(mesh))
        >>> shard_particles(mesh).padded(10) % len(jax.devices())
        0

    """
    names = tuple(mesh.axis_names)
    if axis_name is None:
        if len(names) != 1:
            raise ValueError(
                f"The mesh has axes {names}; say which one splits the particles "
                "(shard_particles(mesh, axis_name=...))."
            )
        axis_name = names[0]
    if axis_name not in names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {names}.")
    return ShardedParticles(mesh, axis_name)
