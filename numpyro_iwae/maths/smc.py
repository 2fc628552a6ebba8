r"""Adaptive tempered sequential Monte Carlo from a proposal q to an unnormalized target p,
one independent particle system per plate element.

The path is :math:`\gamma_\beta = q^{1-\beta} p^{\beta}`, :math:`0 = \beta_0 < \dots <
\beta_T = 1`. At each step the next :math:`\beta` is the one at which the conditional
effective sample size of the incremental weights falls to a target fraction of the
particles (bisection; Zhou, Johansen & Aston 2016, *Toward automatic model comparison: an
adaptive sequential Monte Carlo approach*, JCGS 25), the particles are resampled
(multinomial or systematic) when their ESS falls below a threshold, and moved by HMC
transitions that leave :math:`\gamma_\beta` invariant, the step size adapted from the
cloud's acceptance. Each run also estimates its own :math:`\hat Z`'s variance from the
particles' genealogy (Lee & Whiteley 2018).
The evidence estimate

.. math::

    \log \hat Z = \sum_{t=1}^{T} \log \sum_{i} W^{(i)}_{t-1}
        \exp\big((\beta_t - \beta_{t-1}) [\log p - \log q](u^{(i)}_{t-1})\big)

(normalized weights :math:`W_{t-1}`) is unbiased for :math:`Z_p / Z_q` in
:math:`\hat Z` when the temperatures and kernels are fixed in advance (Del Moral, Doucet &
Jasra 2006, *Sequential Monte Carlo samplers*, JRSS B 68): a run can record what it
adapted (:class:`SMCSchedule`) for later runs to replay. Like
:mod:`numpyro_iwae.maths.ais` this knows nothing about NumPyro: a state is a pytree whose
leaves have a leading particle axis, and ``element_sum`` / ``element_expand`` say how the
rest of each leaf splits into plate elements.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from numpyro_iwae.maths.ais import TARGET_ACCEPTANCE, hmc_transition

#: The default spread of the state-dependent step size's log (see ``local_spread``).
LOCAL_SPREAD = 0.3
#: The default fraction of :math:`1 - \beta` a tempering step keeps (see ``gap_fraction``).
GAP_FRACTION = 0.5
#: Below this :math:`1 - \beta` the CESS alone chooses the steps.
GAP_FLOOR = 1e-3

__all__ = [
    "GAP_FLOOR",
    "GAP_FRACTION",
    "LOCAL_SPREAD",
    "multinomial_indices",
    "next_temperature",
    "systematic_indices",
    "SMCResult",
    "SMCSchedule",
    "single_run_relative_variance",
    "tempered_smc",
]


def _conditional_log_ess(log_w: jax.Array, log_ratio: jax.Array, delta: jax.Array) -> jax.Array:
    """Log of CESS / N for normalized log weights ``log_w`` (particles first)."""
    first = logsumexp(log_w + delta * log_ratio, axis=0)
    return 2 * first - logsumexp(log_w + 2 * delta * log_ratio, axis=0)


def next_temperature(
    beta: jax.Array,
    log_w: jax.Array,
    log_ratio: jax.Array,
    target: float,
    iterations: int = 40,
) -> jax.Array:
    r"""The next inverse temperature per element: the largest :math:`\beta' \le 1` with
    conditional ESS :math:`\ge` ``target`` :math:`\times N`,

    .. math::

        \mathrm{CESS}(\delta) = N \frac{\big(\sum_i W_i e^{\delta \ell_i}\big)^2}
            {\sum_i W_i e^{2 \delta \ell_i}}, \qquad \delta = \beta' - \beta,

    found by bisection on :math:`\delta \in [0, 1 - \beta]` (CESS decreases in
    :math:`\delta`). ``log_w`` are the normalized log weights and ``log_ratio`` the
    :math:`\ell_i = \log p - \log q` of the particles, both ``(N, *elements)``.

    >>> import jax.numpy as jnp
    >>> flat = jnp.zeros((4, 1)) - jnp.log(4.0)
    >>> float(next_temperature(jnp.zeros(1), flat, jnp.zeros((4, 1)), 0.5)[0])  # no spread
    1.0
    """
    log_target = jnp.log(target)
    high = 1.0 - beta
    # Where even the whole way keeps the ESS, go to 1.
    done = _conditional_log_ess(log_w, log_ratio, high) >= log_target

    def halve(_: int, bounds: tuple) -> tuple:
        low, high = bounds
        mid = 0.5 * (low + high)
        ok = _conditional_log_ess(log_w, log_ratio, mid) >= log_target
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid)

    low, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(beta), high))
    return jnp.where(done, 1.0, beta + low)


def _inverse_cdf(log_w: jax.Array, points: jax.Array) -> jax.Array:
    """For each point in [0, 1), per element, the first particle whose cumulative
    normalized weight exceeds it: ``(N, *elements)`` indices for points shaped alike.
    """
    n = log_w.shape[0]
    elements = log_w.shape[1:]
    cumulative = jnp.cumsum(jnp.exp(log_w - jnp.max(log_w, axis=0)), axis=0)
    # Divided by its own last entry the CDF ends at exactly 1 (a float32 sum of the
    # normalized weights may end below it, and the points above would fall to the last
    # particle whatever its weight); counting the entries <= the point (side="right")
    # never picks a particle of zero weight, a point of exactly 0 included. Points are
    # kept below 1 (systematic ones, (i + U) / N, round up to 1 in float32).
    cdf = cumulative / cumulative[-1]
    below_one = jnp.nextafter(jnp.ones((), cdf.dtype), jnp.zeros((), cdf.dtype))
    flat_cdf = cdf.reshape(n, -1).T
    flat_points = jnp.minimum(points, below_one).reshape(n, -1).T
    idx = jax.vmap(lambda c, p: jnp.searchsorted(c, p, side="right"))(flat_cdf, flat_points)
    return jnp.minimum(idx.T.reshape((n,) + elements), n - 1)


def systematic_indices(key: jax.Array, log_w: jax.Array) -> jax.Array:
    """Systematic resampling per element: ``(N, *elements)`` ancestor indices for the
    normalized log weights ``log_w`` (one uniform per element; Kitagawa 1996).
    """
    n = log_w.shape[0]
    offsets = jax.random.uniform(key, log_w.shape[1:])
    grid = jnp.arange(n).reshape((n,) + (1,) * (log_w.ndim - 1))
    return _inverse_cdf(log_w, (grid + offsets) / n)


def multinomial_indices(key: jax.Array, log_w: jax.Array) -> jax.Array:
    r"""Multinomial resampling per element: ``(N, *elements)`` ancestor indices, each
    drawn independently with the normalized weights ``exp(log_w)`` (N uniforms through
    the inverse of the weights' cumulative sum: :math:`O(N \log N)` per element).
    """
    return _inverse_cdf(log_w, jax.random.uniform(key, log_w.shape))


def single_run_relative_variance(
    log_w: jax.Array, eve: jax.Array, num_resampled: jax.Array
) -> jax.Array:
    r"""Lee & Whiteley's estimate of :math:`\mathrm{Var}(\hat Z) / \hat Z^2` from one SMC
    run, per element (Lee & Whiteley 2018, *Variance estimation in the particle
    filter*, Biometrika 105; Chan & Lai 2013):

    .. math::

        \hat V / \hat Z^2 = 1 - \Big(\frac{N}{N-1}\Big)^{m+1}
            \Big(1 - \sum_j \Big(\sum_{i: E_i = j} W_i\Big)^2\Big),

    :math:`W` the final normalized weights, :math:`E_i` the initial particle that particle
    :math:`i` descends from (its Eve index) and :math:`m` the number of resampling
    steps. :math:`\hat Z^2 - \hat V` is unbiased for :math:`Z^2` under multinomial
    resampling, whatever the Markov moves; without resampling it is the delta-method
    variance of importance sampling. Under systematic resampling it is too low (each
    resampling step's count noise, which the :math:`N/(N-1)` factor corrects for, is
    mostly absent). It degrades as the Eve indices collapse (all particles of one
    ancestor give 1).

    :param log_w: normalized log weights, ``(N, *elements)``.
    :param eve: each particle's Eve index, ``(N, *elements)``.
    :param num_resampled: resampling steps per element.

    >>> import jax.numpy as jnp
    >>> w = jnp.log(jnp.array([[0.5], [0.25], [0.25]]))  # no resampling: IS's
    >>> float(single_run_relative_variance(w, jnp.arange(3)[:, None], jnp.zeros(1))[0])
    0.0625
    """
    n = log_w.shape[0]
    flat_w = jnp.exp(log_w).reshape(n, -1).T
    flat_eve = eve.reshape(n, -1).T
    groups = jax.vmap(lambda w, e: jax.ops.segment_sum(w, e, num_segments=n))(flat_w, flat_eve)
    coincide = jnp.sum(groups**2, axis=1).reshape(log_w.shape[1:])
    factor = jnp.exp((num_resampled + 1) * jnp.log(n / (n - 1)))
    return 1.0 - factor * (1.0 - coincide)


RESAMPLING = {"multinomial": multinomial_indices, "systematic": systematic_indices}


class SMCSchedule(NamedTuple):
    r"""What an adaptive run chose, step by step, to be replayed by later runs.

    Row ``t`` of each array is tempering step ``t``; rows past a run's last step are
    never read.

    Attributes:
        betas: :math:`\beta_t` per element, ``(max_temperatures, *elements)``.
        resample: whether step ``t`` resampled, per element.
        step_sizes: the cloud's step size of step ``t``'s moves, per element.
        scales: the diagonal mass matrix of step ``t``'s moves (the cloud's standard
            deviations): a pytree like one particle's state, each leaf with a leading
            ``max_temperatures`` axis.
        num_steps: the steps the run took (its slowest element's).

    """

    betas: jax.Array
    resample: jax.Array
    step_sizes: jax.Array
    scales: Any
    num_steps: jax.Array


class SMCResult(NamedTuple):
    r"""What :func:`tempered_smc` returns.

    Attributes:
        log_z: :math:`\log \hat Z` per element.
        num_temperatures: the number of tempering steps each element took.
        u: the final particles (weighted by ``log_w``).
        log_w: their normalized log weights, ``(N, *elements)``.
        acceptance: the mean HMC acceptance over the run, per element.
        schedule: the temperatures, resampling steps and kernels the run used
            (:class:`SMCSchedule`), to run again with ``schedule=``.
        relative_variance: the run's own estimate of
            :math:`\mathrm{Var}(\hat Z) / \hat Z^2` per element
            (:func:`single_run_relative_variance`).
        log_increments: step ``t``'s term of :math:`\log \hat Z`, :math:`\log
            \hat Z_{\beta_t} / \hat Z_{\beta_{t-1}}`, ``(max_temperatures, *elements)``
            (0 past an element's last step): where along the path the estimate accrued,
            to hold against exact values where they are known.

    """

    log_z: jax.Array
    num_temperatures: jax.Array
    u: Any
    log_w: jax.Array
    acceptance: jax.Array
    schedule: SMCSchedule
    relative_variance: jax.Array
    log_increments: jax.Array


def tempered_smc(
    key: jax.Array,
    u0: Any,
    log_densities: Callable[[Any], tuple[jax.Array, jax.Array]],
    element_sum: Callable[[Any], jax.Array],
    element_expand: Callable[[jax.Array, Any], Any],
    *,
    target_ess: float = 0.9,
    resample_ess: float = 0.5,
    num_moves: int = 5,
    num_leapfrog: int = 5,
    step_size: float = 0.5,
    max_temperatures: int = 1000,
    local_spread: float | None = LOCAL_SPREAD,
    gap_fraction: float = GAP_FRACTION,
    schedule: SMCSchedule | None = None,
    resampling: str = "multinomial",
    map_particles: Callable[[Callable, Any], Any] | None = None,
) -> SMCResult:
    r"""One adaptive tempered SMC run per element from particles ``u0`` drawn from q.

    :param key: a PRNG key.
    :param u0: N draws from q: a pytree whose leaves have a leading particle axis.
    :param log_densities: ``u -> (log q(u), log p(u))`` for *one* particle, per element
        (each including its Jacobian), as for :func:`~numpyro_iwae.maths.ais.ais_log_weights`;
        it is mapped over the particles here.
    :param element_sum: for one particle, sums a tree shaped like its state to one
        value per element.
    :param element_expand: for one particle, lays a per-element array against every leaf.
    :param target_ess: the conditional ESS fraction each tempering step keeps.
    :param resample_ess: resample when the ESS fraction falls below this.
    :param num_moves: sweeps per temperature. A sweep is one HMC transition with the
        cloud's step size and, unless ``local_spread`` is None, one more whose step size
        follows the particle's state (:func:`~numpyro_iwae.maths.ais.hmc_transition`):
        the first crosses the bulk and the wide end of a funnel in long trajectories,
        the second enters regions whose scale is much smaller than the cloud's (a
        funnel's neck), which no single step size both does.
    :param num_leapfrog: leapfrog steps per transition.
    :param step_size: the initial step size (in coordinates scaled by the cloud's
        standard deviations: a diagonal mass matrix); after each temperature's moves it
        is multiplied by :math:`\exp(2(\bar a - 0.65))`, :math:`\bar a` the particles'
        mean acceptance there, per element, and kept within [0.001, 2].
    :param max_temperatures: an upper bound on the steps (a run that has not reached
        :math:`\beta = 1` by then reports NaN).
    :param local_spread: the spread of the state-dependent step size's log (None: no
        such transitions).
    :param gap_fraction: each step keeps at least this fraction of the remaining
        :math:`1 - \beta` until it is below ``GAP_FLOOR`` (0: the CESS alone decides).
        With a guide whose tails are lighter than the posterior's, the tempered
        target's tails open only as :math:`\beta \to 1` (for a Gaussian guide out to
        about :math:`(1 - \beta)^{-1/2}` scales), where no particle is yet to tell the
        CESS; a few geometric steps let the moves carry particles out.
    :param schedule: replay the temperatures, resampling steps, step sizes and mass
        matrices of an earlier run (its ``SMCResult.schedule``) instead of adapting
        them from this run's particles. Adapted from the particles it then weights, a
        run's :math:`\hat Z` is biased, by roughly :math:`1/N` and in either direction;
        with a schedule fixed in advance it is unbiased (Del Moral, Doucet & Jasra
        2006). The options that shape the adaptation are then ignored.
    :param resampling: ``"multinomial"`` (each ancestor drawn independently: the run's
        ``relative_variance`` is then unbiased) or ``"systematic"`` (one uniform per
        element; Kitagawa 1996).
    :param map_particles: ``f(fn, xs)`` mapping a function of one particle over the
        leading axis of ``xs`` for the densities and the moves (default
        :func:`jax.vmap`; a chunked map bounds the model's intermediate arrays to a
        chunk of particles, the particles themselves are held together).
    """
    if resampling not in RESAMPLING:
        raise ValueError(f"resampling must be one of {sorted(RESAMPLING)}, got {resampling!r}.")
    resample_indices = RESAMPLING[resampling]
    if map_particles is None:

        def map_particles(fn: Callable, xs: Any) -> Any:
            return jax.vmap(fn)(xs)

    def densities(u: Any) -> tuple[jax.Array, jax.Array]:
        return map_particles(log_densities, u)

    log_q0, log_p0 = densities(u0)
    n = log_q0.shape[0]
    elements = log_q0.shape[1:]
    init_w = jnp.full((n, *elements), -jnp.log(n))
    if schedule is not None and schedule.betas.shape[1:] != elements:
        raise ValueError(
            f"schedule is of a run with elements of shape {schedule.betas.shape[1:]}, "
            f"these particles have {elements}: replay a schedule on the data it was made on."
        )

    def cloud_scale(u: Any) -> Any:
        # A diagonal mass matrix from the cloud: HMC on u / scale, scale the particles'
        # standard deviation per coordinate (they are equally weighted after resampling
        # or nearly so; the moves leave gamma_beta invariant whatever the scale).
        return jax.tree.map(lambda leaf: jnp.maximum(jnp.std(leaf, axis=0), 1e-6), u)

    def move(key: jax.Array, u: Any, beta: jax.Array, eps: jax.Array, scale: Any) -> tuple:

        def log_gamma(v: Any) -> jax.Array:
            log_q, log_p = log_densities(jax.tree.map(jnp.multiply, v, scale))
            return (1.0 - beta) * log_q + beta * log_p

        def transition(v: Any, key: jax.Array, spread: float | None) -> tuple:
            def one(key_v: tuple) -> tuple:
                key, v = key_v
                return hmc_transition(
                    key, v, log_gamma, eps, num_leapfrog, element_sum, element_expand, spread
                )

            v, accept = map_particles(one, (jax.random.split(key, n), v))
            return v, jnp.mean(accept, axis=0)

        spreads = (None,) if local_spread is None else (None, local_spread)

        def sweep(v: Any, key: jax.Array) -> tuple:
            accepts = []
            for k, spread in zip(jax.random.split(key, len(spreads)), spreads):
                v, accept = transition(v, k, spread)
                accepts.append(accept)
            return v, sum(accepts) / len(accepts)

        v = jax.tree.map(jnp.divide, u, scale)
        v, accepts = jax.lax.scan(sweep, v, jax.random.split(key, num_moves))
        accept = jnp.mean(accepts, axis=0)
        # One damped update per temperature, kept in a range that moves whitened
        # coordinates (a step far outside it is a failed adaptation, not a tuning).
        eps = jnp.clip(eps * jnp.exp(2.0 * (accept - TARGET_ACCEPTANCE)), 1e-3, 2.0)
        return jax.tree.map(jnp.multiply, v, scale), eps, accept

    last_step = max_temperatures if schedule is None else schedule.num_steps

    def unfinished(carry: tuple) -> jax.Array:
        beta, steps = carry[0], carry[5]
        return jnp.any(beta < 1.0) & (steps < last_step)

    def step(carry: tuple) -> tuple:
        beta, u, log_w, log_z, eps, steps, counts, accept_sum, key, record = carry[:10]
        eve, num_resampled = carry[10:]
        key, k_resample, k_move = jax.random.split(key, 3)
        log_q, log_p = densities(u)
        ratio = jnp.where(jnp.isfinite(log_p - log_q), log_p - log_q, -jnp.inf)
        if schedule is None:
            new_beta = next_temperature(beta, log_w, ratio, target_ess)
            # Keep a fraction of the remaining 1 - beta per step (down to GAP_FLOOR), so
            # that tails the guide keeps closed until beta is near 1 open over several
            # steps.
            slowest = jnp.where(1.0 - beta > GAP_FLOOR, 1.0 - (1.0 - beta) * gap_fraction, 1.0)
            new_beta = jnp.minimum(new_beta, slowest)
        else:
            new_beta = schedule.betas[steps]
        delta = new_beta - beta
        increment = logsumexp(log_w + delta * ratio, axis=0)
        increment = jnp.where(delta > 0, increment, 0.0)
        log_z = log_z + increment
        log_w = log_w + delta * ratio
        log_w = log_w - logsumexp(log_w, axis=0)
        indices = resample_indices(k_resample, log_w)
        if schedule is None:
            resample = jnp.exp(-logsumexp(2 * log_w, axis=0)) / n < resample_ess
        else:
            resample = schedule.resample[steps]

        one = jax.tree.map(lambda leaf: leaf[0], u)
        laid = jax.vmap(element_expand, in_axes=(0, None))(indices, one)
        flags = element_expand(resample, one)
        u = jax.tree.map(
            lambda leaf, idx, flag: jnp.where(
                flag, jnp.take_along_axis(leaf, jnp.broadcast_to(idx, leaf.shape), axis=0), leaf
            ),
            u,
            laid,
            flags,
        )
        log_w = jnp.where(resample, -jnp.log(n), log_w)
        eve = jnp.where(resample, jnp.take_along_axis(eve, indices, axis=0), eve)
        num_resampled = num_resampled + resample
        if schedule is None:
            scale = cloud_scale(u)
        else:
            eps = schedule.step_sizes[steps]
            scale = jax.tree.map(lambda leaf: leaf[steps], schedule.scales)
        betas, resampled, step_sizes, scales, increments = record
        record = (
            betas.at[steps].set(new_beta),
            resampled.at[steps].set(resample),
            step_sizes.at[steps].set(eps),
            jax.tree.map(lambda rows, leaf: rows.at[steps].set(leaf), scales, scale),
            increments.at[steps].set(increment),
        )
        u, eps, accept = move(k_move, u, new_beta, eps, scale)
        active = delta > 0
        return (
            new_beta,
            u,
            log_w,
            log_z,
            eps,
            steps + 1,
            counts + active,
            accept_sum + jnp.where(active, accept, 0.0),
            key,
            record,
            eve,
            num_resampled,
        )

    zeros = jnp.zeros(elements)
    rows = max_temperatures if schedule is None else schedule.betas.shape[0]
    one = jax.tree.map(lambda leaf: leaf[0], u0)
    record = (
        jnp.ones((rows, *elements)),
        jnp.zeros((rows, *elements), bool),
        jnp.zeros((rows, *elements)),
        jax.tree.map(lambda leaf: jnp.ones((rows, *leaf.shape), leaf.dtype), one),
        jnp.zeros((rows, *elements)),
    )
    carry = (
        zeros,
        u0,
        init_w,
        zeros,
        jnp.full(elements, step_size),
        jnp.zeros((), jnp.int32),
        jnp.zeros(elements, jnp.int32),
        zeros,
        key,
        record,
        jnp.broadcast_to(jnp.arange(n).reshape((n,) + (1,) * len(elements)), init_w.shape),
        jnp.zeros(elements, jnp.int32),
    )
    beta, u, log_w, log_z, _, steps, counts, accept_sum, _, record, eve, num_resampled = (
        jax.lax.while_loop(unfinished, step, carry)
    )
    log_z = jnp.where(beta < 1.0, jnp.nan, log_z)
    used = SMCSchedule(*record[:4], num_steps=steps)
    acceptance = accept_sum / jnp.maximum(counts, 1)
    relative_variance = single_run_relative_variance(log_w, eve, num_resampled)
    return SMCResult(log_z, counts, u, log_w, acceptance, used, relative_variance, record[4])
