"""Annealed importance sampling (Neal, 2001) from a proposal q to an unnormalized target
p, with Hamiltonian Monte Carlo transitions, one independent chain per plate element.

The array-level core of ``MarginalLikelihood(..., annealing_steps=T)``: it knows
nothing about NumPyro. A state ``u`` is a pytree of unconstrained values; the caller
says how its leaves split into plate elements through two functions:
``element_sum(tree)`` sums a tree of value-shaped arrays to one number per element and
``element_expand(x, tree)`` lays a per-element array out against each leaf. Every
element runs its own chain (its own acceptance), so one element's rejection does not
stall another.

"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "TARGET_ACCEPTANCE",
    "sigmoid_schedule",
    "AISResult",
    "ais_log_weights",
    "hmc_transition",
]


#: The acceptance rate the step size adaptation aims at (HMC's usual 0.65).
TARGET_ACCEPTANCE = 0.65


def sigmoid_schedule(num_steps: int, sharpness: float = 4.0) -> jax.Array:
    r"""The inverse temperatures :math:`0 = \beta_0 < \beta_1 < \dots < \beta_T = 1`
    of a sigmoidal schedule (Grosse, Maddison & Salakhutdinov, 2013): :math:`\tilde
    \beta_t = \sigma(\delta (2t/T - 1))`, rescaled to run from 0 to 1, so the steps are
    small near both ends, where the intermediate distributions change fastest.

    Example:
        >>> from numpyro_iwae.maths.ais import sigmoid_schedule
        >>> [round(float(b), 3) for b in sigmoid_schedule(4)]
        [0.0, 0.105, 0.5, 0.895, 1.0]

    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    raw = jax.nn.sigmoid(sharpness * (2.0 * jnp.arange(num_steps + 1) / num_steps - 1.0))
    return (raw - raw[0]) / (raw[-1] - raw[0])


class AISResult(NamedTuple):
    r"""What one annealed run returns, per plate element.

    Attributes:
        log_w: the AIS log weight, :math:`\log \prod_t \gamma_t(u_{t-1}) /
            \gamma_{t-1}(u_{t-1})`; its exponential is unbiased for the target's
            normalizing constant over the proposal's.
        u: the final state (approximately from the target when the run is long).
        acceptance: the mean HMC acceptance probability over the transitions.
        step_sizes: the step size used at each transition, ``(T - 1, *elements)``.

    """

    log_w: jax.Array
    u: Any
    acceptance: jax.Array
    step_sizes: jax.Array


def ais_log_weights(
    key: jax.Array,
    u0: Any,
    log_densities: Callable[[Any], tuple[jax.Array, jax.Array]],
    betas: jax.Array,
    step_sizes: jax.Array,
    num_leapfrog: int,
    element_sum: Callable[[Any], jax.Array],
    element_expand: Callable[[jax.Array, Any], Any],
    adapt: bool = False,
) -> AISResult:
    r"""One annealed importance sampling run from ``u0`` (a draw from q) along
    :math:`\gamma_t = q^{1 - \beta_t} p^{\beta_t}`:

    .. math::

        \log w = \sum_{t=1}^{T} (\beta_t - \beta_{t-1})
            \big[\log p(u_{t-1}) - \log q(u_{t-1})\big],
        \qquad u_t \sim K_t(u_{t-1}, \cdot),

    with :math:`K_t` an HMC transition (``num_leapfrog`` leapfrog steps, unit mass)
    that leaves :math:`\gamma_t` invariant, per element. :math:`\mathbb E[e^{\log
    w}] = Z_p / Z_q` (Neal, 2001, *Annealed importance sampling*, Statistics and
    Computing 11), so with a normalized q and :math:`p = p(x, z)` it estimates
    :math:`p(x)` without bias. With q the exact posterior every :math:`\log p - \log
    q` equals :math:`\log p(x)` and so does :math:`\log w`, whatever the moves.

    ``step_sizes`` has one entry per transition, ``(T - 1, *elements)`` (or
    broadcastable). With ``adapt=True`` only its first row is used: each later step
    size is the previous one times :math:`\exp(2(a - 0.65))` with a the previous
    transition's acceptance probability, per element. The adapted step sizes depend
    on the chain's own past, so use them for a pilot run and pass the returned
    ``step_sizes`` to the runs whose weights are kept (fixed kernels keep the
    estimate unbiased).

    :param key: a PRNG key.
    :param u0: the initial state, a pytree of unconstrained values drawn from q.
    :param log_densities: ``u -> (log q(u), log p(u))`` per element: the proposal
        and the unnormalized target, each including the Jacobian of the map to
        unconstrained space (one function, so a model evaluated once gives both).
    :param betas: the schedule :math:`\beta_0 = 0, \dots, \beta_T = 1`
        (e.g. :func:`sigmoid_schedule`).
    :param step_sizes: HMC step sizes, see above.
    :param num_leapfrog: leapfrog steps per transition.
    :param element_sum: sums a tree shaped like ``u`` to one value per element.
    :param element_expand: lays a per-element array out against every leaf of a
        tree shaped like ``u``.
    :param adapt: adapt the step sizes along the run (for a pilot run).
    """
    num_steps = betas.shape[0] - 1

    def log_ratio(u: Any) -> jax.Array:
        log_q, log_p = log_densities(u)
        return log_p - log_q

    log_w = (betas[1] - betas[0]) * log_ratio(u0)
    elements = jnp.shape(log_w)
    step_sizes = jnp.broadcast_to(step_sizes, (max(num_steps - 1, 1), *elements))

    def log_gamma(u: Any, beta: jax.Array) -> jax.Array:
        log_q, log_p = log_densities(u)
        return (1.0 - beta) * log_q + beta * log_p

    def transition(carry: tuple, xs: tuple) -> tuple[tuple, tuple]:
        u, log_w, eps_prev, acc_prev = carry
        key, beta, beta_next, eps_given = xs
        eps = eps_prev * jnp.exp(2.0 * (acc_prev - TARGET_ACCEPTANCE)) if adapt else eps_given
        new_u, accept_prob = hmc_transition(
            key, u, lambda v: log_gamma(v, beta), eps, num_leapfrog, element_sum, element_expand
        )
        log_w = log_w + (beta_next - beta) * log_ratio(new_u)
        return (new_u, log_w, eps, accept_prob), (accept_prob, eps)

    if num_steps == 1:  # no transition between the two ends: importance sampling
        return AISResult(log_w, u0, jnp.ones(elements), step_sizes[:0])
    keys = jax.random.split(key, num_steps - 1)
    # The first transition uses the first step size (the multiplier is exp(0) = 1).
    init = (u0, log_w, step_sizes[0], jnp.full(elements, TARGET_ACCEPTANCE))
    xs = (keys, betas[1:-1], betas[2:], step_sizes)
    (u, log_w, _, _), (accepts, used) = jax.lax.scan(transition, init, xs)
    return AISResult(log_w, u, jnp.mean(accepts, axis=0), used)


def hmc_transition(
    key: jax.Array,
    u: Any,
    log_density: Callable[[Any], jax.Array],
    eps: jax.Array,
    num_leapfrog: int,
    element_sum: Callable[[Any], jax.Array],
    element_expand: Callable[[jax.Array, Any], Any],
    local_spread: float | None = None,
) -> tuple[Any, jax.Array]:
    r"""One HMC transition per element: leapfrog with per-element step sizes, then a
    Metropolis test per element (a NaN energy is rejected).

    With ``local_spread`` :math:`s` the step size follows the state: it is drawn as

    .. math::

        \log \epsilon \sim \mathcal N\big(\log \epsilon_0 + m(u), s^2\big), \qquad
        m(u) = \tfrac12 \log \frac{2d}{\lVert \nabla \log \gamma(u) \rVert^2 + d},

    d the element's dimension: in coordinates where the density's bulk has unit scale
    :math:`\lVert \nabla \log \gamma \rVert^2 \approx d` and :math:`m \approx 0`; at a
    mode the step grows by at most :math:`\sqrt 2`, and where the scale is much smaller
    than the bulk's (a funnel's neck, the gradient large) it shrinks with it. The
    Metropolis ratio carries :math:`g(\epsilon \mid u') / g(\epsilon \mid u)`: the step
    size is an auxiliary variable of the extended target :math:`\gamma(u) N(p)
    g(\epsilon \mid u)`, which the leapfrog involution at fixed :math:`\epsilon` keeps,
    so the transition leaves :math:`\gamma` invariant (the argument of the reversibility
    check in Biron-Lattes et al. 2024, *autoMALA*, AISTATS).
    """

    def grad(v: Any) -> tuple[jax.Array, Any]:
        # The elements are independent, so the gradient of their sum is each one's.
        def total(w: Any) -> tuple[jax.Array, jax.Array]:
            per_element = log_density(w)
            return jnp.sum(per_element), per_element

        (_, per_element), g = jax.value_and_grad(total, has_aux=True)(v)
        return per_element, g

    def scaled(x: jax.Array, tree: Any) -> Any:
        return jax.tree.map(lambda e, t: e * t, element_expand(x, tree), tree)

    leaves, treedef = jax.tree.flatten(u)
    keys = jax.random.split(key, len(leaves) + 2)
    momentum = treedef.unflatten(
        [jax.random.normal(k, jnp.shape(v)) for k, v in zip(keys[2:], leaves)]
    )
    kinetic = lambda p: 0.5 * element_sum(jax.tree.map(jnp.square, p))  # noqa: E731
    log_d0, g0 = grad(u)
    h0 = -log_d0 + kinetic(momentum)
    if local_spread is None:
        step = eps
    else:
        dim = element_sum(jax.tree.map(jnp.ones_like, u))

        def centre(g: Any) -> jax.Array:
            squared_norm = element_sum(jax.tree.map(jnp.square, g))
            return jnp.log(eps) + 0.5 * jnp.log(2 * dim / (squared_norm + dim))

        log_step = centre(g0) + local_spread * jax.random.normal(keys[1], jnp.shape(h0))
        step = jnp.exp(log_step)

    def leapfrog(_: int, state: tuple) -> tuple:
        v, p, _, g = state
        p = jax.tree.map(jnp.add, p, scaled(step / 2, g))
        v = jax.tree.map(jnp.add, v, scaled(step, p))
        log_d, g = grad(v)
        p = jax.tree.map(jnp.add, p, scaled(step / 2, g))
        return v, p, log_d, g

    v, p, log_d1, g1 = jax.lax.fori_loop(0, num_leapfrog, leapfrog, (u, momentum, log_d0, g0))
    log_ratio = h0 - (-log_d1 + kinetic(p))
    if local_spread is not None:
        # log g(step | v) - log g(step | u) for the Gaussian on log step.
        log_ratio = log_ratio + ((log_step - centre(g0)) ** 2 - (log_step - centre(g1)) ** 2) / (
            2 * local_spread**2
        )
    log_accept = jnp.where(jnp.isnan(log_ratio), -jnp.inf, jnp.minimum(log_ratio, 0.0))
    # U < a rather than log U < log a: U in [0, 1) is exactly 0 once in 2^23 draws, and
    # log 0 = -inf would accept any finite move, however improbable.
    accept = jax.random.uniform(keys[0], jnp.shape(h0)) < jnp.exp(log_accept)
    chosen = jax.tree.map(
        lambda a, new, old: jnp.where(a, new, old), element_expand(accept, u), v, u
    )
    return chosen, jnp.exp(log_accept)
