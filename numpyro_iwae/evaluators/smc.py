r"""Adaptive tempered sequential Monte Carlo from the guide to the posterior, as an
evaluator: for posteriors whose geometry one fixed annealing schedule cannot follow.

N particles start as draws of the guide and move together along
:math:`q^{1-\beta} p(x, z)^{\beta}`: each step chooses the next :math:`\beta` so that the
conditional ESS keeps a target fraction, resamples when the ESS falls low, and moves every
particle by HMC in the unconstrained space of the guide's random draws, its step size
adapted from the cloud's acceptance (:func:`~numpyro_iwae.maths.smc.tempered_smc`; Del
Moral, Doucet & Jasra 2006; Zhou, Johansen & Aston 2016). Each plate element that the
weights factorize over (as for importance sampling) runs its own particle system and
schedule. R independent replicates give

.. math::

    \log \hat p(x_n) = \log \frac1R \sum_{r=1}^R \hat Z_{r,n},

with the delta-method standard error of the replicates' mean, its variance estimated
from each run's own particle genealogy (Lee & Whiteley 2018, *Variance estimation in the
particle filter*) or from the spread between replicates; :math:`\hat p` is unbiased:
the replicates replay the schedule of a pilot run (``pilot=True``, the default), where
each adapting from its own particles would bias it by roughly :math:`1/N`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from numpyro_iwae._jax import Static, check_positive_int, chunked
from numpyro_iwae.core.annealing import Density
from numpyro_iwae.evaluators.annealed import (
    annealed_setup,
    check_hmc_options,
    check_noncentred,
    moved_density,
)
from numpyro_iwae.evaluators.base import DEFAULT_MEMORY_BUDGET, Evaluator
from numpyro_iwae.evaluators.results import LogMarginalEstimate, standard_errors
from numpyro_iwae.maths.smc import (
    GAP_FRACTION,
    LOCAL_SPREAD,
    RESAMPLING,
    SMCResult,
    SMCSchedule,
    tempered_smc,
)

__all__ = ["TemperedSMC"]

VARIANCE_ESTIMATES = ("single_run", "replicates")

#: The particles' states a run holds at once, in copies of the N states: the cloud,
#: a move's momenta, gradients and proposals, the resampled cloud (XLA's
#: ``memory_analysis`` of a compiled run: 11.4 copies on CPU, at 200 and 800 particles
#: and 100 and 400 elements).
HELD_STATE_COPIES = 12


class TemperedSMC(Evaluator):
    r"""Estimate :math:`\log p(x)` by adaptive tempered SMC from a (fitted) guide.

    Called like :class:`~numpyro_iwae.MarginalLikelihood`:
    ``TemperedSMC(model, guide, params=params)(rng_key, *args, **kwargs)`` returns a
    :class:`~numpyro_iwae.LogMarginalEstimate` whose ``stderr`` comes from the
    ``num_replicates`` independent runs (``variance_estimate``), ``ess`` is the
    replicates' effective number (:math:`(\sum_r \hat Z_r)^2 / \sum_r \hat Z_r^2`) and
    ``k_hat`` is NaN (too few replicates for a tail fit).

    The defaults are for posteriors whose scale varies (a funnel): few tempering steps,
    each with long moves and a state-dependent step size. Where the posterior has one
    scale (a VAE's latents, a linear-Gaussian model), many small steps with cheap moves
    do better at equal cost: ``num_replicates=1, num_moves=1, leapfrog_steps=2,
    local_spread=None, target_ess=0.99`` (the docs' evidence page compares both against
    AIS). Where a site's scale follows another latent, name it in ``noncentred``: the
    HMC moves cross a funnel's neck slowly in the model's own coordinates.

    :param model: NumPyro model.
    :param guide: NumPyro guide with continuous random draws (the particles move by HMC).
    :param params: values of the ``param`` sites (``svi_result.params``).
    :param mutable_state: values of the ``mutable`` sites.
    :param num_particles: N, particles per replicate (and per plate element).
    :param num_replicates: R, independent runs (at least 2 for a standard error from
        their spread; one suffices for the single-run one).
    :param target_ess: the conditional ESS fraction each tempering step keeps
        (closer to 1: more, smaller steps; at 0.5 a guide narrower than the posterior
        left per-datapoint estimates 0.1 low beyond their standard errors in the tests'
        model, at 0.9 not).
    :param resample_ess: resample (systematic) when the ESS fraction falls below this.
    :param num_moves: sweeps per temperature: one HMC transition with the cloud's step
        size and (unless ``local_spread`` is None) one whose step size follows the
        particle's state, for posteriors whose scale varies (a funnel's neck); see
        :func:`~numpyro_iwae.maths.smc.tempered_smc`.
    :param leapfrog_steps: leapfrog steps per transition.
    :param step_size: the initial step size in coordinates scaled by the cloud's
        standard deviations (a diagonal mass matrix), then adapted from the cloud's
        acceptance towards 0.65 after each temperature.
    :param max_temperatures: at most this many tempering steps (an element that has not
        reached :math:`\beta = 1` by then reports NaN).
    :param local_spread: the spread of the state-dependent step size's log
        (:func:`~numpyro_iwae.maths.ais.hmc_transition`); None uses the cloud's step size
        only (half the cost per sweep).
    :param gap_fraction: each tempering step keeps at least this fraction of the
        remaining :math:`1 - \beta` (until it is below 0.001), however large a step the
        CESS allows: with a guide lighter-tailed than the posterior the tempered targets'
        tails open only near :math:`\beta = 1`, where no particle is yet to show it
        (0: the CESS alone decides).
    :param pilot: first run one adaptive pass (its estimate unused) and give every
        replicate its temperatures, resampling steps, step sizes and mass matrices
        (default). Adapted from its own particles (``False``), each replicate's
        :math:`\hat Z` is biased, by roughly :math:`1/N`, on the models measured low;
        replaying a schedule fixed in advance makes it unbiased (one run more in
        ``num_evaluations``). A replicate whose particles go where the pilot's did not
        is weighted with the pilot's steps, not its own (read ``ess``, the replicates'
        effective number).
    :param resampling: ``"multinomial"`` (each ancestor drawn independently) or
        ``"systematic"`` (one uniform per element, Kitagawa 1996).
    :param variance_estimate: ``"single_run"``: each replicate's own estimate of
        :math:`\mathrm{Var}(\hat Z_r)` from its particles' genealogy
        (:func:`~numpyro_iwae.maths.smc.single_run_relative_variance`), pooled over the
        replicates, :math:`\widehat{\mathrm{Var}}(\bar Z) = \sum_r \hat V_r / R^2`;
        unbiased under multinomial resampling (required), it has the degrees of freedom
        of N particles where the replicates' spread has R - 1 (with two replicates
        on the evidence page's coverage model: 2-s.e. coverage 87.5-100% per key
        against 50-80%). ``"replicates"``: the sample variance of the R estimates
        over R.
    :param noncentred: names of loc-scale sites (Normal, StudentT, ... on the real line,
        drawn by the guide) whose moves run non-centred, on :math:`(z - \mathrm{loc}) /
        \mathrm{scale}` as ``LocScaleReparam(centered=0)`` would sample them
        (:class:`~numpyro_iwae.core.annealing.NonCentredDensity`): for sites whose scale
        follows another latent (a funnel's ``x``, a hierarchical model's group effects),
        whose centred posterior has a neck the HMC moves cross slowly. The guide and the
        model are unchanged, and so is what is estimated; each evaluation runs the model
        once more.
    :param memory_budget: bytes a run may hold (default 1 GiB): the N particles' states,
        held together (resampling needs them all; about 12 copies during a move), and
        in what remains the model's intermediate arrays of a chunk of particles (on
        CPU also at most 128 MiB): the densities and moves run on chunks of that many
        particles one after another (``chunk_size_used`` records it), and replicates
        one after another. A run whose states alone exceed it is refused, with the
        number of plate elements per call whose states take half of it: each element
        runs its own particle system, so scoring the data in slices changes nothing
        but the memory.
    :param vectorize_particles: how particles are mapped (``True``: :func:`jax.vmap`).

    :raises ValueError: at construction for a bad option; when called, as
        :class:`~numpyro_iwae.MarginalLikelihood` does, and for discrete guide draws.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro_iwae import TemperedSMC
        >>> def model():
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=0.5)
        >>> def guide():  # too wide and off centre: SMC moves the particles over
        ...     numpyro.sample("z", dist.Normal(1.0, 2.0))
        >>> est = TemperedSMC(model, guide, num_particles=200)(jax.random.key(0))
        >>> exact = float(dist.Normal(0.0, 2**0.5).log_prob(0.5))  # x ~ N(0, 2)
        >>> abs(float(est.log_marginal) - exact) < 4 * float(est.stderr) + 0.01
        True

    """

    def __init__(
        self,
        model: Any,
        guide: Any,
        *,
        params: dict[str, Any] | None = None,
        mutable_state: dict[str, Any] | None = None,
        num_particles: int = 1000,
        num_replicates: int = 4,
        target_ess: float = 0.9,
        resample_ess: float = 0.5,
        num_moves: int = 5,
        leapfrog_steps: int = 5,
        step_size: float = 0.5,
        max_temperatures: int = 1000,
        local_spread: float | None = LOCAL_SPREAD,
        gap_fraction: float = GAP_FRACTION,
        pilot: bool = True,
        resampling: str = "multinomial",
        variance_estimate: str = "single_run",
        noncentred: Sequence[str] = (),
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        vectorize_particles: Any = True,
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
        if self.num_particles < 2:
            raise ValueError("num_particles must be at least 2 (particles are resampled).")
        self.num_replicates = check_positive_int(num_replicates, "num_replicates")
        for name, value in (("target_ess", target_ess), ("resample_ess", resample_ess)):
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}.")
        self.target_ess, self.resample_ess = float(target_ess), float(resample_ess)
        self.num_moves = check_positive_int(num_moves, "num_moves")
        self.leapfrog_steps, self.step_size, _ = check_hmc_options(leapfrog_steps, step_size, 1)
        self.max_temperatures = check_positive_int(max_temperatures, "max_temperatures")
        if local_spread is not None and not float(local_spread) > 0.0:
            raise ValueError(f"local_spread must be positive or None, got {local_spread!r}.")
        self.local_spread = None if local_spread is None else float(local_spread)
        if not 0.0 <= float(gap_fraction) < 1.0:
            raise ValueError(f"gap_fraction must lie in [0, 1), got {gap_fraction!r}.")
        self.gap_fraction = float(gap_fraction)
        if not isinstance(pilot, bool):
            raise TypeError(f"pilot must be True or False, got {pilot!r}.")
        self.pilot = pilot
        if resampling not in RESAMPLING:
            raise ValueError(f"resampling must be one of {sorted(RESAMPLING)}, got {resampling!r}.")
        self.resampling = resampling
        if variance_estimate not in VARIANCE_ESTIMATES:
            raise ValueError(
                f"variance_estimate must be one of {VARIANCE_ESTIMATES}, got {variance_estimate!r}."
            )
        if variance_estimate == "single_run" and resampling != "multinomial":
            raise ValueError(
                "variance_estimate='single_run' needs resampling='multinomial' (under "
                "systematic resampling Lee & Whiteley's estimate is too low); use "
                "variance_estimate='replicates' with systematic resampling."
            )
        self.variance_estimate = variance_estimate
        self.noncentred = check_noncentred(noncentred)

    def __call__(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> LogMarginalEstimate:
        """Estimate ``log p(x)`` for the data in ``args``/``kwargs``.

        :return: a :class:`~numpyro_iwae.LogMarginalEstimate`.
        """
        return self._score(rng_key, args, kwargs)

    def _evaluate_traced(
        self, rng_key: jax.Array, values: dict, dynamic: list, static: Static
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        density, (model_key, _), nan_data = annealed_setup(self, rng_key, values, dynamic, static)
        density = moved_density(density, self.noncentred, model_key)

        def log_densities(u: dict) -> tuple[jax.Array, jax.Array]:
            return density.log_densities(u, model_key)

        def gradients(keys: jax.Array) -> dict:
            # What a move holds per particle: the densities' gradient at a draw.
            def one(key: jax.Array) -> dict:
                return jax.grad(lambda u: jnp.sum(sum(log_densities(u))))(density.init(key))

            return self._vectorize(one, keys)

        probe = jax.random.split(jax.random.fold_in(rng_key, 5), self.num_particles)
        held = self._held_state_bytes(density, log_densities, probe[0])
        chunk = self._auto_chunk(gradients, probe, self.num_particles, reserved=held)
        map_particles = chunked(self._vectorize, chunk)

        def run(key: jax.Array, schedule: SMCSchedule | None = None) -> SMCResult:
            init_key, run_key = jax.random.split(key)
            u0 = self._vectorize(density.init, jax.random.split(init_key, self.num_particles))
            return tempered_smc(
                run_key,
                u0,
                log_densities,
                density.element_sum,
                density.element_expand,
                target_ess=self.target_ess,
                resample_ess=self.resample_ess,
                num_moves=self.num_moves,
                num_leapfrog=self.leapfrog_steps,
                step_size=self.step_size,
                max_temperatures=self.max_temperatures,
                local_spread=self.local_spread,
                gap_fraction=self.gap_fraction,
                schedule=schedule,
                resampling=self.resampling,
                map_particles=map_particles,
            )

        schedule, pilot_temperatures = None, 0.0
        if self.pilot:
            pilot = run(jax.random.fold_in(rng_key, 4))
            schedule, pilot_temperatures = pilot.schedule, pilot.num_temperatures

        def replicate(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            result = run(key, schedule)
            return result.log_z, result.num_temperatures, result.relative_variance

        run_keys = jax.random.split(jax.random.fold_in(rng_key, 3), self.num_replicates)
        log_z, temperatures, relative_variance = jax.lax.map(replicate, run_keys)  # (R, ...)
        # Per particle: the first densities, then per temperature the densities for the
        # weights and every transition's L + 1 gradients; the pilot run's too.
        transitions = self.num_moves * (1 if self.local_spread is None else 2)
        per_temperature = 1 + transitions * (self.leapfrog_steps + 1)
        temperatures = temperatures.astype(jnp.float32)  # counts past int32 at scale
        runs = self.num_replicates + (1 if self.pilot else 0)
        steps = jnp.sum(temperatures, axis=0) + jnp.asarray(pilot_temperatures, jnp.float32)
        evaluations = self.num_particles * (runs + steps * per_temperature)
        single_run = relative_variance if self.variance_estimate == "single_run" else None
        estimate = replicate_estimate(log_z, single_run)
        return estimate._replace(num_evaluations=evaluations), nan_data

    def _held_state_bytes(
        self, density: Density, log_densities: Callable[[dict], tuple], key: jax.Array
    ) -> int:
        """The bytes of the states a run holds (``HELD_STATE_COPIES`` copies of the
        N particles'); a run whose states would not fit ``memory_budget`` is refused,
        saying how many plate elements per call would.
        """
        state = jax.eval_shape(density.init, key)
        elements = jax.eval_shape(lambda k: log_densities(density.init(k))[0], key).shape
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        held = HELD_STATE_COPIES * self.num_particles * state_bytes
        if held <= self.memory_budget:
            return held
        gib = 2.0**30
        advice = "use fewer particles or raise memory_budget"
        count = math.prod(elements)
        if count > 1:
            # States in half the budget, the model's chunks in the other half.
            fits = max(1, count * self.memory_budget // (2 * held))
            advice = (
                f"score the data in slices of {fits} of these {count} plate elements per "
                "call (their states then take half the budget; each element runs its own "
                "particle system, so the slices' "
                "estimates are the whole data's: pointwise concatenates, log_marginal "
                "adds, stderr adds in quadrature), or " + advice
            )
        raise ValueError(
            f"TemperedSMC holds its {self.num_particles} particles' states together, about "
            f"{HELD_STATE_COPIES} copies of them during a move: {held / gib:.2f} GiB here, "
            f"above memory_budget ({self.memory_budget / gib:.2f} GiB). To stay within it, "
            f"{advice}."
        )


def replicate_estimate(
    log_z: jax.Array, single_run: jax.Array | None = None
) -> LogMarginalEstimate:
    r"""The estimate from R replicates' :math:`\log \hat Z_r` per element: the log of
    their mean :math:`\bar Z`, with the delta-method standard error
    :math:`\sqrt{\widehat{\mathrm{Var}}(\bar Z)} / \bar Z`.

    Without ``single_run`` the variance is the replicates' sample variance over R (NaN
    for one replicate). With each replicate's own estimate :math:`\hat\rho_r` of
    :math:`\mathrm{Var}(\hat Z_r) / \hat Z_r^2` (Lee & Whiteley 2018; ``single_run``,
    shaped like ``log_z``) it is :math:`\sum_r \hat Z_r^2 \hat\rho_r / R^2`: unbiased
    as each term is, with the many degrees of freedom of N particles rather than the
    R - 1 of the replicates (floored at 0).
    """
    r = log_z.shape[0]
    pointwise = logsumexp(log_z, axis=0) - math.log(r)
    w = jnp.exp(log_z - jnp.max(log_z, axis=0))
    ess = jnp.sum(w, axis=0) ** 2 / jnp.sum(w**2, axis=0)
    if single_run is None:
        relative_var = jnp.var(w, axis=0, ddof=min(r - 1, 1)) / jnp.mean(w, axis=0) ** 2 / r
        stderr, pointwise_stderr = standard_errors(relative_var, r)
    else:
        relative_var = jnp.sum(w**2 * single_run, axis=0) / jnp.sum(w, axis=0) ** 2
        relative_var = jnp.maximum(relative_var, 0.0)
        stderr, pointwise_stderr = standard_errors(relative_var, 2)
    return LogMarginalEstimate(
        log_marginal=jnp.sum(pointwise),
        pointwise=pointwise,
        stderr=stderr,
        pointwise_stderr=pointwise_stderr,
        ess=ess,
        k_hat=jnp.full(pointwise.shape, jnp.nan, pointwise.dtype),
    )
