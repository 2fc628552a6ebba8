r"""Estimating :math:`\log p(x)` of a fitted model with many particles, in bounded memory.

:class:`MarginalLikelihood` draws K particles from the guide in chunks and keeps, per
plate element, a running :math:`(m, s_1, s_2)` with :math:`m` the largest log weight so
far, :math:`s_1 = \sum_k e^{\log w_k - m}` and :math:`s_2 = \sum_k e^{2(\log w_k - m)}`,
plus the largest :math:`M + 1` log weights for the Pareto fit. Memory is
O(chunk x data), never O(K x data), and because every particle's key is fixed before
chunking, the result does not depend on the chunk size beyond float rounding.

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
import math
from typing import Any

import jax
import jax.numpy as jnp

from numpyro_iwae._jax import Static, check_positive_int
from numpyro_iwae.core.annealing import AnnealedDensity
from numpyro_iwae.core.draw import draw_with_keys, split_keys
from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.core.program import Program
from numpyro_iwae.evaluators.base import DEFAULT_MEMORY_BUDGET, Evaluator, chunk_keys
from numpyro_iwae.evaluators.results import LogMarginalEstimate
from numpyro_iwae.maths.ais import AISResult, ais_log_weights, sigmoid_schedule
from numpyro_iwae.maths.bounds import nan_to_neginf
from numpyro_iwae.maths.psis import pareto_k_hat, psis_tail_length
from numpyro_iwae.maths.streaming import (
    RunningSums,
    running_ess,
    running_resample,
    running_start,
    running_update,
)

__all__ = ["MarginalLikelihood"]


class MarginalLikelihood(Evaluator):
    r"""Estimate :math:`\log p(x)` of a model with a (fitted) guide as proposal.

    .. math::

        \log \hat p(x) = \sum_n \Big[\log \frac1K \sum_{k=1}^K
            \frac{p(x_n, z_{k,n})}{q(z_{k,n} \mid x_n)}\Big],
        \qquad z_{k,n} \sim q,

    with one estimate per element :math:`n` of the plates that enclose every sample
    site, as in :class:`~numpyro_iwae.IWELBO`. Its expectation is a lower bound that
    tends to :math:`\log p(x)` as K grows (Burda et al., 2016, use K = 5000 to report
    test log-likelihoods). Particles are drawn a chunk at a time and reduced on the
    fly, so memory is O(chunk x data); the same particles are drawn whatever the
    chunk size. Called like :class:`numpyro.infer.Predictive`:
    ``MarginalLikelihood(model, guide, params=params)(rng_key, *args, **kwargs)``
    returns a :class:`LogMarginalEstimate` with a standard error, the effective
    sample size and the PSIS :math:`\hat k` diagnostic.

    The evaluation is compiled once per shape of the arguments: repeated calls with
    arrays of the same shapes and dtypes (and equal non-array arguments, which are
    treated as static) reuse it.

    :param model: NumPyro model.
    :param guide: NumPyro guide, the proposal (e.g. an autoguide after SVI). It must
        have a density: point masses (``AutoDelta``, the training guide of
        ``AutoLaplaceApproximation``, any ``Delta`` draw that is not a transform of
        an auxiliary draw) are refused.
    :param params: values of the ``param`` sites (``svi_result.params``); every
        param site of model and guide must have one.
    :param mutable_state: values of the ``mutable`` sites, e.g. batch-norm
        statistics of a flax module (``svi_result.state.mutable_state``).
    :param num_particles: K, particles per plate element.
    :param chunk_size: particles per chunk; ``None`` to choose the largest chunk
        whose intermediate arrays fit in ``memory_budget``.
    :param memory_budget: bytes the particles of one chunk may take when
        ``chunk_size=None`` (default :data:`DEFAULT_MEMORY_BUDGET`, 1 GiB). The
        size of one particle is the total size of the arrays one particle's
        guide and model computations create, an upper bound on what they keep
        alive at once. The budget is per device: when the data are placed on
        several devices (a :class:`~jax.sharding.NamedSharding` over the plate's
        axis) or the particles split with ``vectorize_particles``, each device holds
        its share of a chunk, and the chunk grows by the number of shards.
    :param vectorize_particles: how the particles of a chunk are mapped: ``True``
        for :func:`jax.vmap` (default), ``False`` for :func:`jax.lax.map`, or a
        callable ``f(fn, xs)`` such as :func:`~numpyro_iwae.shard_particles` to
        split them over devices.
    :param num_samples: S, posterior samples to draw by importance resampling:
        each of S draws picks particle k with probability :math:`\tilde w_k`,
        separately per plate element (with replacement, streamed across chunks).
        The draws are only as good as the weights: check ``ess`` and ``k_hat``.
    :param return_log_weights: also return all ``K x plate`` log weights. This
        takes O(K x data) memory, which streaming otherwise avoids: at K = 5000
        and 10,000 datapoints that is 200 MB of float32.
    :param num_global_particles: S, for a model with global latents :math:`\theta`
        (sites outside a data plate) next to local ones: use the nested estimator

        .. math::

            \hat p(x) = \frac1S \sum_{s=1}^S \frac{p(\theta_s)}{q(\theta_s)}
                \prod_n \hat p_n(\theta_s), \qquad
            \hat p_n(\theta) = \frac1K \sum_{k=1}^K
                \frac{p(x_n, z_{nk} \mid \theta)}{q(z_{nk} \mid x_n, \theta)},

        unbiased for :math:`p(x)` because the inner estimates are independent
        given :math:`\theta`, with the local plates chosen as by
        ``IWELBO(weighting="local")``. The S global draws are made one after
        another, each with its K local particles streamed in chunks, so memory is
        that of one chunk. ``stderr``, ``ess`` and ``k_hat`` describe the S outer
        weights; ``local_ess`` and ``local_k_hat`` the inner ones. ``None`` (the
        default): plain importance sampling, whose weights are joint over a data
        plate next to a global latent (fine for a few datapoints, hopeless for
        many: the joint weights' spread grows with the data).
    :param annealing_steps: T; with T > 0 each particle is an annealed importance
        sampling run (Neal, 2001) from the guide to the posterior along
        :math:`q^{1-\beta_t} p(x, z)^{\beta_t}`, sigmoidal :math:`\beta_t`
        (:func:`~numpyro_iwae.maths.ais.sigmoid_schedule`), with T Hamiltonian Monte Carlo
        transitions in the unconstrained space of the guide's random draws (for an
        ``AutoContinuous`` guide, its auxiliary latent), one chain and one Metropolis
        test per plate element (:mod:`numpyro_iwae.core.annealing`). Each weight is still
        an unbiased estimate of :math:`p(x)`, so the estimate, its standard error, ESS
        and :math:`\hat k` read as for importance sampling, but a poor guide no longer
        leaves them heavy-tailed. Cost: about T (``leapfrog_steps`` + 3) evaluations
        of model and guide (gradients counted as one) per particle. 0 (default):
        importance sampling. With ``num_samples`` the runs' final states are
        resampled by their weights. Discrete guide draws are refused; not yet
        available with ``num_global_particles``.
    :param leapfrog_steps: leapfrog steps per HMC transition (default 5).
    :param step_size: the initial HMC step size (default 0.1); a pilot run of
        ``pilot_particles`` adapts it per transition and per plate element towards
        an acceptance of 0.65, and the kept runs use those sizes fixed, so their
        weights stay unbiased.
    :param pilot_particles: particles of the pilot run (default 16; its weights
        are discarded).

    :raises ValueError: when called, if a param site has no value, a plate is
        subsampled, the guide is a point mass, or the observed data holds NaN
        (naming the site); with ``num_global_particles``, if the model has no
        global latent or the guide draws its global sites from local ones.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro_iwae import MarginalLikelihood
        >>> def model():
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=0.5)
        >>> def guide():  # the exact posterior: every weight equals p(x)
        ...     numpyro.sample("z", dist.Normal(0.25, 0.5**0.5))
        >>> est = MarginalLikelihood(model, guide, num_particles=1000)(jax.random.key(0))
        >>> exact = float(dist.Normal(0.0, 2**0.5).log_prob(0.5))  # x ~ N(0, 2)
        >>> abs(float(est.log_marginal) - exact) < 1e-5, float(est.stderr)
        (True, 0.0)

    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        *,
        params: dict[str, Any] | None = None,
        mutable_state: dict[str, Any] | None = None,
        num_particles: int = 1000,
        chunk_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        num_samples: int = 0,
        return_log_weights: bool = False,
        num_global_particles: int | None = None,
        vectorize_particles: bool | Callable = True,
        annealing_steps: int = 0,
        leapfrog_steps: int = 5,
        step_size: float = 0.1,
        pilot_particles: int = 16,
    ) -> None:
        super().__init__(
            model,
            guide,
            params=params,
            mutable_state=mutable_state,
            memory_budget=memory_budget,
            vectorize_particles=vectorize_particles,
        )
        self.num_particles = check_positive_int(num_particles, "num_particles")
        if chunk_size is not None:
            chunk_size = min(check_positive_int(chunk_size, "chunk_size"), self.num_particles)
        self.chunk_size = chunk_size
        self.return_log_weights = bool(return_log_weights)
        self.num_samples = 0 if num_samples == 0 else check_positive_int(num_samples, "num_samples")
        if num_global_particles is not None:
            num_global_particles = check_positive_int(num_global_particles, "num_global_particles")
            if self.num_samples:
                raise ValueError(
                    "num_samples (importance resampling) is not available with "
                    "num_global_particles (the nested estimator); use one or the other."
                )
        self.num_global_particles = num_global_particles
        self.annealing_steps = (
            0 if annealing_steps == 0 else check_positive_int(annealing_steps, "annealing_steps")
        )
        self.leapfrog_steps = check_positive_int(leapfrog_steps, "leapfrog_steps")
        if not float(step_size) > 0:
            raise ValueError(f"step_size must be positive, got {step_size!r}.")
        self.step_size = float(step_size)
        self.pilot_particles = check_positive_int(pilot_particles, "pilot_particles")
        if self.annealing_steps and num_global_particles is not None:
            raise ValueError(
                "annealing_steps is not yet available with num_global_particles; use "
                "importance sampling (annealing_steps=0) for the nested estimator."
            )

    def __call__(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> LogMarginalEstimate:
        """Estimate ``log p(x)`` for the data in ``args``/``kwargs``.

        :param rng_key: a JAX PRNG key; the same key gives the same particles
            whatever the chunk size.
        :return: a :class:`LogMarginalEstimate`.
        """
        return self._score(rng_key, args, kwargs)

    def _evaluate_traced(
        self, rng_key: jax.Array, values: dict, dynamic: list, static: Static
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        args, kwargs = static.merge(dynamic)
        k = self.num_particles
        plate_key, keys = split_keys(rng_key, k)
        program = Program(self.model, self.guide, args, kwargs).with_seeded_plates(plate_key)
        if self.num_global_particles is not None:
            return self._evaluate_nested(rng_key, values, program, keys[0], static)
        structure = self._structure(program, values, keys[0])

        def chunk_log_w(chunk_keys: jax.Array) -> tuple[jax.Array, dict, dict]:
            draw, model_fn = draw_with_keys(program, values, chunk_keys, self._vectorize, structure)
            log_p, output = model_fn(draw.values, values)
            log_w = nan_to_neginf(log_p[0] - draw.log_q_rep[0] - draw.log_q_score[0])
            return log_w, draw.values, output.nan_data

        if self.annealing_steps:
            # NaN data is found by one importance-sampling draw; the weights come from
            # the annealed runs.
            nan_data = chunk_log_w(keys[:1])[2]  # (1, *plates) flags, as a chunk has
            chunk_log_w = self._annealed(program, values, structure, keys[0], nan_data)

        chunk = self.chunk_size or self._auto_chunk(chunk_log_w, keys, k)
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

        num_samples = self.num_samples
        axes = {name: (ndim, ax) for name, ndim, ax in structure.value_axes}
        samples0 = {}
        if num_samples:
            samples0 = {
                n: jnp.zeros((num_samples,) + v.shape[1:], v.dtype)
                for n, v in out_shapes[1].items()
            }
        resample_keys = jax.random.split(jax.random.fold_in(rng_key, 1), num_chunks)

        def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array | None]:
            state, samples, nan_data = carry
            chunk_keys, chunk_live, resample_key = xs
            log_w, draw_values, chunk_nan = masked_log_w(chunk_keys, chunk_live)
            new_state = running_update(state, log_w)
            if num_samples:
                samples = running_resample(
                    resample_key, samples, state, new_state, log_w, draw_values, axes
                )
            nan_data = {n: nan_data[n] | chunk_nan[n] for n in nan_data}
            return (new_state, samples, nan_data), (log_w if self.return_log_weights else None)

        (state, samples, nan_data), stacked = jax.lax.scan(
            body, (init, samples0, nan0), (keys, live, resample_keys)
        )
        estimate = self._estimate(state, stacked, k, samples if num_samples else None)
        self._plate_names[static] = {n: structure.names for n in nan_data}  # for errors
        return estimate, nan_data

    def _annealed(
        self,
        program: Program,
        values: dict,
        structure: PlateStructure,
        key: jax.Array,
        nan_data: dict[str, jax.Array],
    ) -> Callable:
        """``chunk_log_w`` for annealed importance sampling: one AIS run per particle,
        with step sizes adapted once, in a pilot run of ``pilot_particles`` whose
        weights are discarded, and then fixed (so the kept weights stay unbiased).
        """
        density = AnnealedDensity(program, values, structure, key[1])
        betas = sigmoid_schedule(self.annealing_steps + 1)

        def one(pair: jax.Array, step_sizes: jax.Array, adapt: bool) -> AISResult:
            init_key, run_key = jax.random.split(pair[1])
            return ais_log_weights(
                run_key,
                density.init(init_key),
                lambda u: density.log_densities(u, pair[0]),
                betas,
                step_sizes,
                self.leapfrog_steps,
                density.element_sum,
                density.element_expand,
                adapt=adapt,
            )

        pilot_keys = jax.random.split(jax.random.fold_in(key[0], 7), (self.pilot_particles, 2))
        pilot = jax.vmap(lambda k: one(k, jnp.float32(self.step_size), True))(pilot_keys)
        step_sizes = jnp.exp(jnp.mean(jnp.log(pilot.step_sizes), axis=0))

        def kept(pair: jax.Array) -> tuple[jax.Array, dict]:
            out = one(pair, step_sizes, False)
            # The final states, for importance resampling: approximately from the
            # posterior, weighted by their AIS weights.
            return out.log_w, density.values_at(out.u, pair[0])

        def chunk_log_w(chunk_keys: jax.Array) -> tuple[jax.Array, dict, dict]:
            log_w, draws = self._vectorize(kept, chunk_keys)
            return nan_to_neginf(log_w), draws, nan_data

        return chunk_log_w

    def _evaluate_nested(
        self, rng_key: jax.Array, values: dict, program: Program, key: jax.Array, static: Static
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        r"""The nested estimator: S global draws, each with K local particles per
        element of every local plate, streamed over chunks of local particles and
        mapped sequentially over the global draws.
        """
        k, num_global = self.num_particles, self.num_global_particles
        structure = self._structure(program, values, key, "local")
        if structure.weighting != "local":
            raise ValueError(
                "num_global_particles needs global latent sites (outside a data plate), "
                "but every latent of this model is local to the plates "
                f"{list(structure.names)}: leave num_global_particles=None."
            )

        def chunk_log_w(global_key: jax.Array, chunk_keys: jax.Array) -> tuple:
            prog = replace(program, global_key=global_key)
            draw, model_fn = draw_with_keys(prog, values, chunk_keys, self._vectorize, structure)
            log_p, output = model_fn(draw.values, {**values, **draw.global_values})
            parts = zip(log_p, draw.log_q_rep, draw.log_q_score)
            log_w = tuple(nan_to_neginf(p - q - s) for p, q, s in parts)
            return log_w, output.nan_data

        def particle_keys(global_key: jax.Array) -> jax.Array:
            return jax.random.split(jax.random.fold_in(global_key, 0), (k, 2))

        global_keys = jax.random.split(jax.random.fold_in(rng_key, 2), num_global)
        chunk = self.chunk_size or self._auto_chunk(
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
        estimate = self._estimate(
            state, outer[None] if self.return_log_weights else None, num_global, None
        )
        names = [p for p, _, _ in structure.local_plates]
        estimate = estimate._replace(
            local_ess=dict(zip(names, (jnp.median(e, axis=0) for e in inner_ess))),
            local_k_hat=dict(zip(names, (jnp.median(h, axis=0) for h in inner_k_hat))),
        )
        nan_data = {n: jnp.any(v, axis=0) for n, v in nan_data.items()}
        self._plate_names[static] = {
            n: structure.group_plates(structure.group_of(n)) for n in nan_data
        }
        return estimate, nan_data

    def _estimate(
        self, state: RunningSums, stacked: jax.Array | None, k: int, samples: dict | None
    ) -> LogMarginalEstimate:
        pointwise = state.peak + jnp.log(state.s1) - math.log(k)
        ess = running_ess(state)
        variance = jnp.maximum(1.0 / ess - 1.0 / k, 0.0)
        # One particle says nothing about the spread of the weights: unknown, not 0.
        stderr = jnp.sqrt(jnp.sum(variance)) if k > 1 else jnp.float32(jnp.nan)
        k_hat = pareto_k_hat(state.top) if state.top.shape[0] > 1 else jnp.full(ess.shape, jnp.inf)
        log_weights = None
        if stacked is not None:
            log_weights = stacked.reshape((-1,) + stacked.shape[2:])[:k]
        return LogMarginalEstimate(
            log_marginal=jnp.sum(pointwise),
            pointwise=pointwise,
            stderr=stderr,
            ess=ess,
            k_hat=k_hat,
            log_weights=log_weights,
            samples=samples,
        )
