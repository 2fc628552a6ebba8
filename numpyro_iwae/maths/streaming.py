r"""A running log-sum-exp over chunks of particles, in bounded memory.

Per plate element the state keeps :math:`(m, s_1, s_2)` with :math:`m` the largest log
weight so far, :math:`s_1 = \sum_k e^{\log w_k - m}` and
:math:`s_2 = \sum_k e^{2(\log w_k - m)}`, plus the largest :math:`M + 1` log weights
for the Pareto fit, and importance resampling streams through the same chunks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_iwae.maths.layout import plate_layout

__all__ = [
    "RunningSums",
    "running_update",
    "running_sums_update",
    "running_top_merge",
    "merge_every",
    "running_start",
    "running_ess",
    "running_log_sum",
    "running_resample",
]


class RunningSums(NamedTuple):
    """Per plate element, the running sums of the weights seen so far."""

    peak: jax.Array  # running max of log w
    s1: jax.Array  # sum exp(log w - peak)
    s2: jax.Array  # sum exp(2 (log w - peak))
    top: jax.Array  # the largest M + 1 log weights


def running_update(state: RunningSums, log_w: jax.Array) -> RunningSums:
    """Fold a chunk of log weights, ``(chunk, *plates)``, into the running sums and
    the kept largest weights (:func:`running_sums_update` then :func:`running_top_merge`).
    """
    return running_top_merge(running_sums_update(state, log_w), log_w)


def running_sums_update(state: RunningSums, log_w: jax.Array) -> RunningSums:
    """Fold a chunk of log weights, ``(chunk, *plates)``, into the sums
    :math:`(m, s_1, s_2)` only; the kept largest weights are left to
    :func:`running_top_merge`, which can then take many chunks at once.
    """
    peak = jnp.maximum(state.peak, jnp.max(log_w, axis=0))
    safe = jnp.where(jnp.isneginf(peak), 0.0, peak)
    shrink = jnp.exp(state.peak - safe)
    rel = jnp.exp(log_w - safe)
    s1 = state.s1 * shrink + jnp.sum(rel, axis=0)
    s2 = state.s2 * shrink**2 + jnp.sum(rel**2, axis=0)
    return state._replace(peak=peak, s1=s1, s2=s2)


def running_top_merge(state: RunningSums, log_w: jax.Array) -> RunningSums:
    """Keep the largest ``M + 1`` of the kept weights and ``log_w``, ``(n, *plates)``.

    A ``top_k`` over the ``M + 1 + n`` candidates per element costs about as much for
    one particle as for ``M`` of them, so callers merge blocks of many chunks
    (:func:`merge_every`), not every chunk.
    """
    both = jnp.concatenate([state.top, log_w], axis=0)
    top = jnp.moveaxis(jax.lax.top_k(jnp.moveaxis(both, 0, -1), state.top.shape[0])[0], -1, 0)
    return state._replace(top=top)


def merge_every(chunk: int, m_top: int, elements: int, budget_bytes: int) -> int:
    """How many chunks of ``chunk`` particles to collect before one
    :func:`running_top_merge`: enough for about ``4 m_top`` particles (so the merge's cost
    per particle is a small fraction of the per-chunk one), and no more than
    ``budget_bytes`` of collected float32 log weights over ``elements`` plate elements.
    """
    wanted = -(-4 * m_top // chunk)
    affordable = budget_bytes // max(1, 4 * chunk * elements)
    return int(max(1, min(wanted, affordable)))


def running_start(shape: tuple[int, ...], m_top: int) -> RunningSums:
    """The sums before any particle, for plates of ``shape``, keeping the top ``m_top``."""
    return RunningSums(
        jnp.full(shape, -jnp.inf),
        jnp.zeros(shape),
        jnp.zeros(shape),
        jnp.full((m_top,) + shape, -jnp.inf),
    )


def running_ess(state: RunningSums) -> jax.Array:
    r""":math:`(\sum w)^2 / \sum w^2` from a running state (0 with no live weight)."""
    return jnp.where(state.s2 > 0, state.s1**2 / jnp.where(state.s2 > 0, state.s2, 1.0), 0.0)


def running_log_sum(state: RunningSums) -> jax.Array:
    r""":math:`\log \sum_k w_k` of the weights seen so far."""
    return state.peak + jnp.log(state.s1)


def running_resample(
    key: jax.Array,
    samples: dict[str, jax.Array],
    before: RunningSums,
    after: RunningSums,
    log_w: jax.Array,
    values: dict[str, jax.Array],
    axes: dict[str, tuple[int, tuple[int, ...]]],
) -> dict[str, jax.Array]:
    r"""Streamed importance resampling with replacement, per plate element.

    Each of the S slots holds a draw from the particles seen so far with
    probabilities proportional to their weights. A new chunk of total weight
    :math:`W_c` replaces a slot's draw with probability :math:`W_c / W_{\le c}`, by
    one of its particles chosen proportionally to weight; by induction every
    particle ends up chosen with probability :math:`w_k / \sum_j w_j`.
    """
    num_samples = next(iter(samples.values())).shape[0]
    plate_shape = log_w.shape[1:]
    k_switch, k_pick = jax.random.split(key)
    chunk_total = jax.nn.logsumexp(log_w, axis=0)
    p_switch = jnp.exp(chunk_total - running_log_sum(after))
    p_switch = jnp.where(jnp.isneginf(running_log_sum(before)), 1.0, p_switch)
    switch = jax.random.uniform(k_switch, (num_samples,) + plate_shape) < p_switch
    logits = jnp.moveaxis(log_w, 0, -1)  # (*plates, chunk)
    pick = jax.random.categorical(k_pick, logits, shape=(num_samples,) + plate_shape)
    out = {}
    for name, value in values.items():
        ndim, ax = axes[name]
        chosen = jnp.take_along_axis(value, plate_layout(pick, ndim, ax), axis=0)
        out[name] = jnp.where(plate_layout(switch, ndim, ax), chosen, samples[name])
    return out
