r"""The evaluators' front door: :class:`MarginalLikelihood` picks an algorithm from its
arguments and runs it.

Each algorithm is an object with one module (:mod:`~numpyro_iwae.evaluators.importance`,
:mod:`~numpyro_iwae.evaluators.annealed`, :mod:`~numpyro_iwae.evaluators.nested`) that
declares its weighting and the optional outputs it supports; an option the chosen
algorithm does not declare is refused by name. One front door rather than one public class
per algorithm: the algorithms share every argument, check and result type, and differ in
two choices a user makes (the weighting, and whether particles are annealed), which read
better as arguments of one call than as a class hierarchy to choose from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from numpyro_iwae._jax import Static, check_positive_int
from numpyro_iwae.core.draw import split_keys
from numpyro_iwae.core.plan import choose_weighting, plan
from numpyro_iwae.core.plates import WEIGHTINGS
from numpyro_iwae.core.pointwise import draws_with_log_likelihood
from numpyro_iwae.core.program import Program
from numpyro_iwae.evaluators.annealed import (
    AnnealedImportanceSampling,
    check_hmc_options,
    check_noncentred,
)
from numpyro_iwae.evaluators.base import DEFAULT_MEMORY_BUDGET, Evaluator
from numpyro_iwae.evaluators.importance import ImportanceSampling
from numpyro_iwae.evaluators.nested import NestedImportanceSampling
from numpyro_iwae.evaluators.results import ImportanceDraws, LogMarginalEstimate

__all__ = ["MarginalLikelihood", "DEFAULT_GLOBAL_PARTICLES"]

#: S, the global draws of local weighting when ``num_global_particles`` is not given.
DEFAULT_GLOBAL_PARTICLES = 100


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
        ``chunk_size=None`` (default :data:`DEFAULT_MEMORY_BUDGET`, 1 GiB; on CPU
        at most :data:`~numpyro_iwae.evaluators.base.CPU_WORKING_SET`, 128 MiB, is
        used, which runs faster there). The
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
    :param num_samples: posterior samples to draw by importance resampling (``None``,
        the default: none):
        each of S draws picks particle k with probability :math:`\tilde w_k`,
        separately per plate element (with replacement, streamed across chunks).
        The draws are only as good as the weights: check ``ess`` and ``k_hat``.
    :param return_log_weights: also return all ``K x plate`` log weights. This
        takes O(K x data) memory, which streaming otherwise avoids: at K = 5000
        and 10,000 datapoints that is 5 x 10^7 float32 values.
    :param weighting: ``"joint"``: plain importance sampling, one weight per particle
        and element of the plates that enclose every sample site (fine for a few
        datapoints next to a global latent, hopeless for many: the joint weights'
        spread grows with the data). ``"local"``: for a model with global latents
        :math:`\theta` (sites outside a data plate) next to local ones, the nested
        estimator (:mod:`~numpyro_iwae.evaluators.nested`),

        .. math::

            \hat p(x) = \frac1S \sum_{s=1}^S \frac{p(\theta_s)}{q(\theta_s)}
                \prod_n \hat p_n(\theta_s), \qquad
            \hat p_n(\theta) = \frac1K \sum_{k=1}^K
                \frac{p(x_n, z_{nk} \mid \theta)}{q(z_{nk} \mid x_n, \theta)},

        unbiased for :math:`p(x)`, with the local plates chosen as by
        ``IWELBO(weighting="local")``; ``stderr``, ``ess`` and ``k_hat`` then describe
        the S outer weights, ``local_ess`` and ``local_k_hat`` the inner ones.
        ``"auto"``: the objectives' rule
        (:func:`~numpyro_iwae.core.plan.choose_weighting`). ``None`` (default):
        ``"local"`` if ``num_global_particles`` is given, else ``"joint"``.
    :param num_global_particles: S, the global draws of local weighting (default
        :data:`DEFAULT_GLOBAL_PARTICLES`).
    :param annealing_steps: T; each particle is then an annealed importance
        sampling run (Neal, 2001) from the guide to the posterior along
        :math:`q^{1-\beta_t} p(x, z)^{\beta_t}`, sigmoidal :math:`\beta_t`
        (:func:`~numpyro_iwae.maths.ais.sigmoid_schedule`), with T Hamiltonian Monte Carlo
        transitions in the unconstrained space of the guide's random draws (for an
        ``AutoContinuous`` guide, its auxiliary latent), one chain and one Metropolis
        test per plate element (:mod:`numpyro_iwae.core.annealing`). Each weight is still
        an unbiased estimate of :math:`p(x)`, so the estimate, its standard error, ESS
        and :math:`\hat k` read as for importance sampling, but a poor guide no longer
        leaves them heavy-tailed. Cost: about T (``leapfrog_steps`` + 3) evaluations
        of model and guide (gradients counted as one) per particle. ``None``
        (default): importance sampling. With ``num_samples`` the runs' final states are
        resampled by their weights. Discrete guide draws are refused; not yet
        available with local weighting.
    :param leapfrog_steps: leapfrog steps per HMC transition (default 5).
    :param step_size: the initial HMC step size (default 0.1); a pilot run of
        ``pilot_particles`` adapts it per transition and per plate element towards
        an acceptance of 0.65, and the kept runs use those sizes fixed, so their
        weights stay unbiased.
    :param pilot_particles: particles of the pilot run (default 16; its weights
        are discarded).
    :param noncentred: with ``annealing_steps``, names of loc-scale sites (guide draws on
        the real line) whose HMC moves run non-centred, on :math:`(z - \mathrm{loc}) /
        \mathrm{scale}` (:class:`~numpyro_iwae.core.annealing.NonCentredDensity`): for a
        site whose scale follows another latent (a funnel, a hierarchical model's group
        effects). What is estimated is unchanged; each evaluation runs the model once
        more. Refused without ``annealing_steps`` (importance sampling has no moves).
    :param num_draws: S further draws from the guide, independent of the K particles and
        not resampled, kept with :math:`\log p(x, z_s)`, :math:`\log q(z_s)` and each
        observed site's per-observation log-likelihood
        (:class:`~numpyro_iwae.evaluators.results.ImportanceDraws`, in ``draws``): what
        :meth:`~numpyro_iwae.LogMarginalEstimate.to_inference_data` exports for ArviZ's
        LOO. ``None`` (default): none. Joint weighting with one weight per particle
        (global latents only), importance sampling, no summed-out sites.

    :raises ValueError: when called, if a param site has no value, a plate is
        subsampled, the guide is a point mass, or the observed data holds NaN
        (naming the site); under local weighting, if the model has no global latent
        or the guide draws its global sites from local ones. At construction, a
        ValueError for an option the chosen algorithm does not support (each
        algorithm declares its own).

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
        num_samples: int | None = None,
        return_log_weights: bool = False,
        weighting: str | None = None,
        num_global_particles: int | None = None,
        vectorize_particles: bool | Callable = True,
        annealing_steps: int | None = None,
        leapfrog_steps: int = 5,
        step_size: float = 0.1,
        pilot_particles: int = 16,
        noncentred: Sequence[str] = (),
        num_draws: int | None = None,
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
        self.num_samples = _optional_count(num_samples, "num_samples")
        self.num_draws = _optional_count(num_draws, "num_draws")
        if weighting is None:
            weighting = "joint" if num_global_particles is None else "local"
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be None or one of {WEIGHTINGS}, got {weighting!r}.")
        if num_global_particles is not None and weighting == "joint":
            raise ValueError(
                "num_global_particles sets the global draws of local weighting; with "
                "weighting='joint' there are none. Use weighting='local' or leave "
                "num_global_particles=None."
            )
        self.weighting = weighting
        self.num_global_particles = _optional_count(num_global_particles, "num_global_particles")
        self.annealing_steps = _optional_count(annealing_steps, "annealing_steps")
        # Checked whether or not annealing is on: a bad value is an error, not ignored.
        self.leapfrog_steps, self.step_size, self.pilot_particles = check_hmc_options(
            leapfrog_steps, step_size, pilot_particles
        )
        self.noncentred = check_noncentred(noncentred)
        if self.noncentred and self.annealing_steps is None:
            raise ValueError(
                "noncentred sets the coordinates of the annealing's HMC moves; importance "
                "sampling (annealing_steps=None) has none. Give annealing_steps, or leave "
                "noncentred=()."
            )
        self._joint: ImportanceSampling = (
            ImportanceSampling()
            if self.annealing_steps is None
            else AnnealedImportanceSampling(
                self.annealing_steps,
                self.leapfrog_steps,
                self.step_size,
                self.pilot_particles,
                self.noncentred,
            )
        )
        self._local = NestedImportanceSampling(
            self.num_global_particles or DEFAULT_GLOBAL_PARTICLES
        )
        options = {
            "num_samples": self.num_samples is not None,
            "return_log_weights": self.return_log_weights,
            "annealing_steps": self.annealing_steps is not None,
        }
        for algorithm in self._algorithms():
            for option in sorted(name for name, given in options.items() if given):
                if option not in algorithm.supports and option != "annealing_steps":
                    raise ValueError(
                        f"{option} is not available with {algorithm.name}; leave it at "
                        "its default or choose another weighting."
                    )
            if self.num_draws is not None and (
                self.annealing_steps is not None or algorithm.weighting == "local"
            ):
                raise ValueError(
                    "num_draws keeps draws of the guide with their importance weights: "
                    "available with importance sampling and weighting='joint' only."
                )
            if options["annealing_steps"] and algorithm.weighting == "local":
                raise ValueError(
                    f"annealing_steps is not yet available with {algorithm.name}; use "
                    "importance sampling (annealing_steps=None) for the nested estimator."
                )

    def _algorithms(self) -> list[Any]:
        """The algorithms this evaluator may run: one, or both under ``"auto"``."""
        if self.weighting == "auto":
            return [self._joint, self._local]
        return [self._local] if self.weighting == "local" else [self._joint]

    def __call__(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> LogMarginalEstimate:
        """Estimate ``log p(x)`` for the data in ``args``/``kwargs``.

        :param rng_key: a JAX PRNG key; the same key gives the same particles
            whatever the chunk size.
        :return: a :class:`~numpyro_iwae.LogMarginalEstimate`.
        """
        estimate = self._score(rng_key, args, kwargs)
        if self.num_draws is None:
            return estimate
        return estimate._replace(draws=self._draws(jax.random.fold_in(rng_key, 1), args, kwargs))

    def _draws(self, rng_key: jax.Array, args: tuple, kwargs: dict) -> ImportanceDraws:
        """``num_draws`` draws of the guide with their densities and log-likelihoods."""
        values = {**self.params, **self.mutable_state}
        plate_key, keys = split_keys(rng_key, self.num_draws)
        program = Program(self.model, self.guide, args, kwargs).with_seeded_plates(plate_key)
        structure = plan(program, values, keys[0], "joint", self.num_draws)

        def run(keys: jax.Array) -> ImportanceDraws:
            return ImportanceDraws(
                *draws_with_log_likelihood(program, values, keys, self._vectorize, structure)
            )

        return jax.jit(run)(keys)

    def _evaluate_traced(
        self, rng_key: jax.Array, values: dict, dynamic: list, static: Static
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        args, kwargs = static.merge(dynamic)
        plate_key, keys = split_keys(rng_key, self.num_particles)
        program = Program(self.model, self.guide, args, kwargs).with_seeded_plates(plate_key)
        algorithm = self._joint if self.weighting == "joint" else self._local
        if self.weighting == "auto":
            # Nested where the objectives would weight locally and there are global
            # latents to nest over; otherwise every latent is local and the two agree.
            joint = self._structure(program, values, keys[0])
            local = plan(program, values, keys[0], "local")
            if choose_weighting(joint, self.num_particles) == "joint" or local.weighting != "local":
                algorithm = self._joint
        return algorithm.evaluate(self, rng_key, values, program, keys, static)


def _optional_count(value: int | None, name: str) -> int | None:
    """``None`` (off) or a positive int; 0 is refused with the spelling of "off"."""
    if value is None:
        return None
    if value == 0 and not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a positive int, or None for none, got 0.")
    return check_positive_int(value, name)
