r"""SUMO as an evaluator: an estimate of :math:`\log p(x)` per plate element, unbiased
for the IWAE bound of many particles (or, untruncated, for :math:`\log p(x)`) at the
cost of a few, with a standard error from independent replicates.

"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp

from numpyro_iwae._jax import Static, check_positive_int
from numpyro_iwae.core.draw import log_weights_with_keys, split_keys
from numpyro_iwae.core.program import Program
from numpyro_iwae.evaluators.base import DEFAULT_MEMORY_BUDGET, Evaluator
from numpyro_iwae.evaluators.results import SUMOEstimate
from numpyro_iwae.maths.sumo import (
    SUMO_TAIL_RATIO,
    SUMO_TAIL_START,
    sample_sumo_terms,
    sumo_start,
    sumo_survival,
    sumo_update,
)

__all__ = ["DEFAULT_SUMO_CHUNK", "SUMOMarginal"]


#: Particles drawn at a time by :class:`SUMOMarginal` when ``chunk_size=None`` (fewer
#: if the memory budget says so).
DEFAULT_SUMO_CHUNK = 16


class SUMOMarginal(Evaluator):
    r"""Estimate :math:`\log p(x)` of a model with a (fitted) guide by SUMO (Luo et al.,
    2020, ICLR), the Russian-roulette series over the IWAE bounds of one growing run
    of particles,

    .. math::

        \mathrm{SUMO} = \mathrm{IWAE}_m + \sum_{j=1}^{T}
            \frac{\mathrm{IWAE}_{m+j} - \mathrm{IWAE}_{m+j-1}}{P(T \ge j)},
        \qquad T \sim p(T),

    per element of the plates that enclose every sample site, as
    :class:`~numpyro_iwae.MarginalLikelihood` does (the same checks of the pair too).
    With the default ``max_terms=80`` the estimate's expectation is exactly
    :math:`\mathbb E[\mathrm{IWAE}_{m + 80}]` (what the :class:`~numpyro_iwae.SUMO`
    objective trains on): a lower bound, but that of 81 particles at an expected
    cost of about 6. With ``max_terms=None`` T is drawn from the untruncated
    distribution (:func:`~numpyro_iwae.maths.sumo.sumo_survival`) and the
    expectation is :math:`\log p(x)` itself, not a bound, at the price of a variance
    that is infinite in practice (below).

    Each of the R replicates draws T per element, then particles a chunk at a time
    (keyed by their index, so chunking does not change them) until every element
    has its :math:`m + T`, updating a running ``logsumexp``
    (:func:`~numpyro_iwae.maths.sumo.sumo_update`): memory is that of one chunk, the
    cost :math:`m + \max_n T_n` particles rounded up to a chunk (about 6 for one
    element with m = 1, 32 for eight elements; with hundreds the largest T sets it,
    m + 80). The replicates are independent, so their spread gives the standard
    error.

    **When to trust it.** The estimate is heavy-tailed: an increment that comes
    late is divided by :math:`P(T \ge j)` (1/80 at j = 80, and
    :math:`0.9^{j - 80}/80` beyond). Measured on eight linear-Gaussian datapoints
    with a Normal guide moved 0.64 posterior standard deviations (log-normal
    weights), 8,000 replicates, five keys: with ``max_terms=80`` the standard error
    was 0.037-0.038 at every key, the estimates within 1.9 of it of the exact
    value and the largest single deviation 20-25; with ``max_terms=None`` the
    standard error ranged over 0.07-0.78 and the largest deviation over 310-6,100:
    its variance is effectively infinite and its sample standard error
    meaningless. Check ``replicates`` for outliers and compare with
    :class:`~numpyro_iwae.MarginalLikelihood` (a lower bound with a PSIS
    :math:`\hat k`). An element whose first m weights are all zero while a later
    one is not gets NaN (no finite :math:`\mathrm{IWAE}_m` to start from): raise m;
    an element whose weights are all zero gets :math:`-\infty`.

    :param model: NumPyro model.
    :param guide: NumPyro guide with a density (point masses are refused).
    :param params: values of the ``param`` sites (``svi_result.params``).
    :param mutable_state: values of the ``mutable`` sites.
    :param min_particles: m (default 1).
    :param max_terms: :math:`T_{\max}` (default 80), or ``None`` for no truncation
        (unbiased for :math:`\log p(x)`, but see *When to trust it*).
    :param num_replicates: R, independent estimates (default 100).
    :param tail_start: as for :class:`~numpyro_iwae.SUMO` (default 80).
    :param tail_ratio: as for :class:`~numpyro_iwae.SUMO` (default 0.9).
    :param chunk_size: particles per chunk; ``None``: 16, or fewer if one chunk's
        arrays would exceed ``memory_budget``.
    :param memory_budget: as for :class:`~numpyro_iwae.MarginalLikelihood`.
    :param vectorize_particles: as for :class:`~numpyro_iwae.MarginalLikelihood`.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro_iwae import SUMOMarginal
        >>> def model():
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=0.5)
        >>> def guide():  # the exact posterior: every replicate is log p(x)
        ...     numpyro.sample("z", dist.Normal(0.25, 0.5**0.5))
        >>> est = SUMOMarginal(model, guide, num_replicates=10)(jax.random.key(0))
        >>> exact = float(dist.Normal(0.0, 2**0.5).log_prob(0.5))
        >>> abs(float(est.log_marginal) - exact) < 1e-5, round(float(est.stderr), 6)
        (True, 0.0)

    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        *,
        params: dict[str, Any] | None = None,
        mutable_state: dict[str, Any] | None = None,
        min_particles: int = 1,
        max_terms: int | None = 80,
        num_replicates: int = 100,
        tail_start: int = SUMO_TAIL_START,
        tail_ratio: float = SUMO_TAIL_RATIO,
        chunk_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        vectorize_particles: bool | Callable = True,
    ) -> None:
        super().__init__(
            model,
            guide,
            params=params,
            mutable_state=mutable_state,
            memory_budget=memory_budget,
            vectorize_particles=vectorize_particles,
        )
        self.min_particles = check_positive_int(min_particles, "min_particles")
        if max_terms is not None:
            max_terms = check_positive_int(max_terms, "max_terms")
        self.max_terms = max_terms
        self.num_replicates = check_positive_int(num_replicates, "num_replicates")
        sumo_survival(1, tail_start, tail_ratio)  # checks them
        self.tail_start, self.tail_ratio = tail_start, tail_ratio
        if chunk_size is not None:
            chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.chunk_size = chunk_size

    def __call__(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> SUMOEstimate:
        """Estimate ``log p(x)`` for the data in ``args``/``kwargs``.

        :param rng_key: a JAX PRNG key; the same key gives the same estimate
            whatever the chunk size (up to float rounding).
        :return: a :class:`SUMOEstimate`.
        """
        return self._score(rng_key, args, kwargs)

    def _evaluate_traced(
        self, rng_key: jax.Array, values: dict, dynamic: list, static: Static
    ) -> tuple[SUMOEstimate, dict[str, jax.Array]]:
        args, kwargs = static.merge(dynamic)
        m, max_terms = self.min_particles, self.max_terms
        tail = (self.tail_start, self.tail_ratio)
        plate_key, first = split_keys(rng_key, 1)
        program = Program(self.model, self.guide, args, kwargs).with_seeded_plates(plate_key)
        structure = self._structure(program, values, first[0])

        def chunk_log_w(keys: jax.Array) -> tuple[jax.Array, dict]:
            log_w, _, output = log_weights_with_keys(
                program, values, keys, self._vectorize, structure
            )
            log_w = log_w[0]
            nan_data = {n: jnp.any(v, axis=0) for n, v in output.nan_data.items()}
            return log_w, nan_data

        def particle_keys(particles_key: jax.Array, index: jax.Array) -> jax.Array:
            return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(particles_key, i)))(index)

        chunk = self.chunk_size
        if chunk is None:
            probe = particle_keys(rng_key, jnp.arange(2))
            budget_chunk = self._auto_chunk(chunk_log_w, probe, DEFAULT_SUMO_CHUNK)
            chunk = min(DEFAULT_SUMO_CHUNK, budget_chunk)
        nan0 = {
            n: jnp.zeros(v.shape, bool)
            for n, v in jax.eval_shape(chunk_log_w, particle_keys(rng_key, jnp.arange(chunk)))[
                1
            ].items()
        }

        def one_replicate(key: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
            terms_key, particles_key = jax.random.split(key)
            terms = sample_sumo_terms(terms_key, max_terms, structure.sizes, *tail)
            needed = m + jnp.max(terms)

            def body(carry: tuple) -> tuple:
                run, nan_data = carry
                log_w, chunk_nan = chunk_log_w(
                    particle_keys(particles_key, run.count + jnp.arange(chunk))
                )
                run = sumo_update(run, log_w, terms, m, *tail)
                return run, {n: nan_data[n] | chunk_nan[n] for n in nan_data}

            run, nan_data = jax.lax.while_loop(
                lambda carry: carry[0].count < needed, body, (sumo_start(structure.sizes), nan0)
            )
            return run.value, run.count, nan_data

        keys = jax.random.split(jax.random.fold_in(rng_key, 3), self.num_replicates)
        replicates, counts, nan_data = jax.lax.map(one_replicate, keys)
        nan_data = {n: jnp.any(v, axis=0) for n, v in nan_data.items()}
        self._plate_names[static] = {n: structure.names for n in nan_data}  # for errors
        return self._estimate(replicates, counts), nan_data

    def _estimate(self, replicates: jax.Array, counts: jax.Array) -> SUMOEstimate:
        r = self.num_replicates
        totals = jnp.sum(replicates.reshape(r, -1), axis=1)

        def stderr(x: jax.Array) -> jax.Array:
            if r == 1:  # one replicate says nothing about the spread: unknown, not 0
                return jnp.full(x.shape[1:], jnp.nan, x.dtype)
            return jnp.std(x, axis=0, ddof=1) / math.sqrt(r)

        return SUMOEstimate(
            log_marginal=jnp.mean(totals),
            pointwise=jnp.mean(replicates, axis=0),
            stderr=stderr(totals),
            pointwise_stderr=stderr(replicates),
            replicates=replicates,
            mean_particles=jnp.mean(counts.astype(jnp.float32)),
        )
