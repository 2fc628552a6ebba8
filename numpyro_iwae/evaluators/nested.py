r"""Nested importance sampling for global latents next to local ones (local weighting).

For global latents :math:`\theta` (sites outside a data plate) and local ones,

.. math::

    \hat p(x) = \frac1S \sum_{s=1}^S \frac{p(\theta_s)}{q(\theta_s)}
        \prod_n \hat p_n(\theta_s), \qquad
    \hat p_n(\theta) = \frac1K \sum_{k=1}^K
        \frac{p(x_n, z_{nk} \mid \theta)}{q(z_{nk} \mid x_n, \theta)},

unbiased for :math:`p(x)` because the inner estimates are independent given
:math:`\theta`; the local plates are chosen as by ``IWELBO(weighting="local")``. The S
global draws are made one after another, each with its K local particles streamed in
chunks, so memory is that of one chunk.
"""

from __future__ import annotations

from dataclasses import replace
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from numpyro_iwae._jax import Static, check_positive_int
from numpyro_iwae.core.draw import log_weights_with_keys
from numpyro_iwae.core.program import Program
from numpyro_iwae.evaluators.base import Evaluator, chunk_keys
from numpyro_iwae.evaluators.importance import estimate_from_sums
from numpyro_iwae.evaluators.results import LogMarginalEstimate
from numpyro_iwae.maths.psis import pareto_k_hat, psis_tail_length
from numpyro_iwae.maths.streaming import running_ess, running_start, running_update

__all__ = ["NestedImportanceSampling"]


class NestedImportanceSampling:
    """S global draws, each with K local particles per element of every local plate
    (see the module).

    :param num_global_particles: S.
    """

    name: ClassVar[str] = "nested importance sampling (weighting='local')"
    weighting: ClassVar[str] = "local"
    supports: ClassVar[frozenset[str]] = frozenset({"return_log_weights"})

    def __init__(self, num_global_particles: int) -> None:
        self.num_global_particles = check_positive_int(num_global_particles, "num_global_particles")

    def evaluate(
        self,
        ev: Evaluator,
        rng_key: jax.Array,
        values: dict,
        program: Program,
        keys: jax.Array,
        static: Static,
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        """The estimate and the per-element NaN-data flags of each observed site.
        ``stderr``, ``ess`` and ``k_hat`` describe the S outer weights; ``local_ess``
        and ``local_k_hat`` the inner ones (the median over the global draws).
        """
        k, num_global = ev.num_particles, self.num_global_particles
        structure = ev._structure(program, values, keys[0], "local")
        if structure.weighting != "local":
            raise ValueError(
                "Local weighting (nested importance sampling) needs global latent sites "
                "(outside a data plate), but every latent of this model is local to the "
                f"plates {list(structure.names)}: use weighting='joint' (and leave "
                "num_global_particles=None)."
            )

        def chunk_log_w(global_key: jax.Array, chunk_keys: jax.Array) -> tuple:
            prog = replace(program, global_key=global_key)
            log_w, _, output = log_weights_with_keys(
                prog, values, chunk_keys, ev._vectorize, structure
            )
            return log_w, output.nan_data

        def particle_keys(global_key: jax.Array) -> jax.Array:
            return jax.random.split(jax.random.fold_in(global_key, 0), (k, 2))

        global_keys = jax.random.split(jax.random.fold_in(rng_key, 2), num_global)
        chunk = ev.chunk_size or ev._auto_chunk(
            lambda ck: chunk_log_w(global_keys[0], ck), particle_keys(global_keys[0]), k
        )
        m_top = min(psis_tail_length(k) + 1, k)

        def one_global(global_key: jax.Array) -> tuple:
            keys, live = chunk_keys(particle_keys(global_key), k, chunk)

            def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
                states, _, nan_data = carry
                chunk_keys, chunk_live = xs
                log_w, chunk_nan = chunk_log_w(global_key, chunk_keys)
                mask = chunk_live.reshape((chunk,) + (1,) * len(structure.sizes))
                states = tuple(
                    running_update(state, jnp.where(mask[..., None], w, -jnp.inf))
                    for state, w in zip(states, log_w[1:])
                )
                nan_data = {n: nan_data[n] | jnp.any(v, axis=0) for n, v in chunk_nan.items()}
                # The global group's rows agree (every particle shares the global draw).
                return (states, log_w[0][0], nan_data), None

            out = jax.eval_shape(lambda: chunk_log_w(global_key, keys[0]))
            nan0 = {n: jnp.zeros(v.shape[1:], bool) for n, v in out[1].items()}
            init = tuple(
                running_start(structure.group_shape(g), m_top)
                for g in range(1, structure.num_groups)
            )
            carry0 = (init, jnp.zeros(structure.sizes), nan0)
            (states, global_term, nan_data), _ = jax.lax.scan(body, carry0, (keys, live))
            outer = global_term
            ess, k_hats = [], []
            for state in states:
                outer = outer + jnp.sum(state.peak + jnp.log(state.s1) - math.log(k), axis=-1)
                ess.append(running_ess(state))
                k_hats.append(
                    pareto_k_hat(state.top) if m_top > 1 else jnp.full(ess[-1].shape, jnp.inf)
                )
            return outer, tuple(ess), tuple(k_hats), nan_data

        outer, inner_ess, inner_k_hat, nan_data = jax.lax.map(one_global, global_keys)
        state = running_update(
            running_start(structure.sizes, min(psis_tail_length(num_global) + 1, num_global)),
            outer,
        )
        estimate = estimate_from_sums(
            state, outer if ev.return_log_weights else None, num_global, None
        )
        names = [p for p, _, _ in structure.local_plates]
        estimate = estimate._replace(
            local_ess=dict(zip(names, (jnp.median(e, axis=0) for e in inner_ess))),
            local_k_hat=dict(zip(names, (jnp.median(h, axis=0) for h in inner_k_hat))),
        )
        nan_data = {n: jnp.any(v, axis=0) for n, v in nan_data.items()}
        ev._plate_names[static] = {
            n: structure.group_plates(structure.group_of(n)) for n in nan_data
        }
        return estimate, nan_data
