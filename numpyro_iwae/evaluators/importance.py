r"""Importance sampling from the guide, streamed over chunks of particles.

Per plate element, with :math:`z_{k} \sim q` drawn a chunk at a time,

.. math::

    \log \hat p(x_n) = \log \frac1K \sum_{k=1}^K \frac{p(x_n, z_{k,n})}{q(z_{k,n} \mid x_n)},

kept as running sums (:mod:`~numpyro_iwae.maths.streaming`) so memory is that of one chunk;
every particle's key is fixed before chunking, so the result does not depend on the chunk
size beyond float rounding (Burda, Grosse & Salakhutdinov, 2016, use K = 5000 for test
log-likelihoods). Importance resampling streams through the same chunks. The same engine
runs annealed importance sampling (:mod:`~numpyro_iwae.evaluators.annealed`), whose
particles are annealed runs instead of guide draws.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from numpyro_iwae._jax import Static
from numpyro_iwae.core.draw import log_weights_with_keys
from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.core.program import Program
from numpyro_iwae.evaluators.base import Evaluator, chunk_keys
from numpyro_iwae.evaluators.results import LogMarginalEstimate, standard_errors
from numpyro_iwae.maths.psis import pareto_k_hat, psis_tail_length
from numpyro_iwae.maths.streaming import (
    RunningSums,
    merge_every,
    running_ess,
    running_resample,
    running_start,
    running_sums_update,
    running_top_merge,
)

__all__ = ["ImportanceSampling", "ChunkLogW", "estimate_from_sums"]

#: ``chunk_keys -> (log_w (chunk, *plates), latent values, NaN-data flags)``.
ChunkLogW = Callable[[jax.Array], tuple[jax.Array, dict, dict]]


class ImportanceSampling:
    """The guide as proposal, one weight per particle and plate element (joint
    weighting); see the module.
    """

    #: How the estimate is described in messages.
    name: ClassVar[str] = "importance sampling"
    #: The weighting of the particles.
    weighting: ClassVar[str] = "joint"
    #: The optional outputs this algorithm can give (``MarginalLikelihood`` arguments).
    supports: ClassVar[frozenset[str]] = frozenset({"num_samples", "return_log_weights"})

    def evaluate(
        self,
        ev: Evaluator,
        rng_key: jax.Array,
        values: dict,
        program: Program,
        keys: jax.Array,
        static: Static,
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        """The estimate and the per-element NaN-data flags of each observed site."""
        structure = ev._structure(program, values, keys[0])

        def chunk_log_w(chunk_keys: jax.Array) -> tuple[jax.Array, dict, dict]:
            log_w, draw, output = log_weights_with_keys(
                program, values, chunk_keys, ev._vectorize, structure
            )
            return log_w[0], draw.values, output.nan_data

        chunk_log_w = self.particles(ev, chunk_log_w, program, values, structure, keys[0])
        estimate, nan_data = stream(ev, rng_key, keys, structure, chunk_log_w)
        ev._plate_names[static] = {n: structure.names for n in nan_data}  # for errors
        return estimate, nan_data

    def particles(
        self,
        ev: Evaluator,
        chunk_log_w: ChunkLogW,
        program: Program,
        values: dict,
        structure: PlateStructure,
        key: jax.Array,
    ) -> ChunkLogW:
        """What one chunk of particles is: here the guide's draws themselves."""
        return chunk_log_w


def stream(
    ev: Evaluator,
    rng_key: jax.Array,
    keys: jax.Array,
    structure: PlateStructure,
    chunk_log_w: ChunkLogW,
) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
    """Reduce ``K`` particles (``keys``) a chunk at a time: running sums, resampling
    and the NaN-data flags, in a ``lax.scan`` over blocks of chunks (the largest weights
    merged once per block).
    """
    k = ev.num_particles
    chunk = ev.chunk_size or ev._auto_chunk(chunk_log_w, keys, k)
    keys, live = chunk_keys(keys, k, chunk)
    num_chunks = keys.shape[0]

    def masked_log_w(chunk_keys: jax.Array, chunk_live: jax.Array) -> tuple:
        log_w, draw_values, nan_data = chunk_log_w(chunk_keys)
        mask = chunk_live.reshape((chunk,) + (1,) * (log_w.ndim - 1))
        nan_data = {n: jnp.any(v, axis=0) for n, v in nan_data.items()}
        return jnp.where(mask, log_w, -jnp.inf), draw_values, nan_data

    init = running_start(structure.sizes, min(psis_tail_length(k) + 1, k))
    out_shapes = jax.eval_shape(lambda: masked_log_w(keys[0], live[0]))
    nan0 = {n: jnp.zeros(v.shape, bool) for n, v in out_shapes[2].items()}

    num_samples = ev.num_samples
    axes = {name: (ndim, ax) for name, ndim, ax in structure.value_axes}
    samples0 = {}
    if num_samples:
        samples0 = {
            n: jnp.zeros((num_samples,) + v.shape[1:], v.dtype) for n, v in out_shapes[1].items()
        }
    resample_keys = jax.random.split(jax.random.fold_in(rng_key, 1), num_chunks)
    # The largest weights (for PSIS) are merged once per block of chunks: a top_k per
    # chunk would cost as much as the model on small models (benchmarks/RESULTS.md).
    every = merge_every(chunk, init.top.shape[0], math.prod(structure.sizes), ev.memory_budget // 8)

    def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array]:
        state, samples, nan_data = carry
        chunk_keys, chunk_live, resample_key = xs
        log_w, draw_values, chunk_nan = masked_log_w(chunk_keys, chunk_live)
        new_state = running_sums_update(state, log_w)
        if num_samples:
            samples = running_resample(
                resample_key, samples, state, new_state, log_w, draw_values, axes
            )
        nan_data = {n: nan_data[n] | chunk_nan[n] for n in nan_data}
        return (new_state, samples, nan_data), log_w

    def block(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array | None]:
        (state, samples, nan_data), log_w = jax.lax.scan(body, carry, xs)
        flat = log_w.reshape((-1,) + log_w.shape[2:])
        state = running_top_merge(state, flat)
        return (state, samples, nan_data), (flat if ev.return_log_weights else None)

    xs = (keys, live, resample_keys)
    whole = num_chunks // every * every
    carry, stacked = jax.lax.scan(
        block,
        (init, samples0, nan0),
        jax.tree.map(lambda x: x[:whole].reshape((-1, every) + x.shape[1:]), xs),
    )
    if ev.return_log_weights:
        stacked = stacked.reshape((-1,) + stacked.shape[2:])
    if whole < num_chunks:
        carry, rest = block(carry, jax.tree.map(lambda x: x[whole:], xs))
        if ev.return_log_weights:
            stacked = jnp.concatenate([stacked, rest])
    state, samples, nan_data = carry
    return estimate_from_sums(state, stacked, k, samples if num_samples else None), nan_data


def estimate_from_sums(
    state: RunningSums, stacked: jax.Array | None, k: int, samples: dict | None
) -> LogMarginalEstimate:
    r"""The estimate from the running sums of ``k`` particles (and, if kept, their log
    weights ``(>= k, *plates)``, padding last): per element
    :math:`\log \frac1K \sum_k w_k`, the delta-method standard error
    :math:`\sqrt{1/\mathrm{ESS} - 1/K}`, the ESS and PSIS :math:`\hat k`.
    """
    pointwise = state.peak + jnp.log(state.s1) - math.log(k)
    ess = running_ess(state)
    stderr, pointwise_stderr = standard_errors(jnp.maximum(1.0 / ess - 1.0 / k, 0.0), k)
    k_hat = pareto_k_hat(state.top) if state.top.shape[0] > 1 else jnp.full(ess.shape, jnp.inf)
    log_weights = None if stacked is None else stacked[:k]
    return LogMarginalEstimate(
        log_marginal=jnp.sum(pointwise),
        pointwise=pointwise,
        stderr=stderr,
        pointwise_stderr=pointwise_stderr,
        ess=ess,
        k_hat=k_hat,
        log_weights=log_weights,
        samples=samples,
    )
