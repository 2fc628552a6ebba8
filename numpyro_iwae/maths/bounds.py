"""Bounds from log importance weights: the IWAE bound and the family's variants.

Every function takes log weights with the particle axis first,
``log_w.shape == (K, *plate_shape)``, and returns one value per plate element.
Nothing here knows about NumPyro.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "iwae_bound",
    "normalized_weights",
    "nan_to_neginf",
    "replicate_weights",
    "miwae_bound",
    "ciwae_bound",
    "renyi_bound",
]


@jax.custom_jvp
def _safe_logsumexp(log_w: jax.Array) -> jax.Array:
    """``logsumexp`` over axis 0 that is ``-inf`` with a zero gradient (not NaN)
    for elements whose particles all have weight zero.

    Its derivative is written out (the softmax weights, from the forward pass's
    own exponentials), so the backward pass computes no exponential again (the
    locally weighted bound's logsumexp runs over every particle of every plate
    element; the saving is measured in ``benchmarks/RESULTS.md``).
    """
    return _logsumexp_parts(log_w)[0]


def _logsumexp_parts(log_w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logsumexp, exp(log_w - peak), 1 / sum)`` over axis 0; the last is 0 where
    every particle has weight zero.
    """
    peak = jnp.max(log_w, axis=0)
    dead = peak == -jnp.inf
    peak = jnp.where(dead, 0.0, peak)
    scaled = jnp.exp(log_w - peak)
    total = jnp.sum(scaled, axis=0)
    return peak + jnp.log(total), scaled, jnp.where(dead, 0.0, 1.0 / total)


@_safe_logsumexp.defjvp
def _safe_logsumexp_jvp(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    (log_w,), (tangent,) = primals, tangents
    out, scaled, inverse = _logsumexp_parts(log_w)
    # A particle of weight zero adds nothing, even where its tangent is not finite
    # (forward mode through a density evaluated outside its support).
    return out, jnp.sum(scaled * jnp.where(scaled > 0, tangent, 0.0), axis=0) * inverse


def iwae_bound(log_w: jax.Array) -> jax.Array:
    r"""The importance-weighted bound, one value per plate element.

    .. math::

        \hat{\mathcal{L}}_K = \log \frac{1}{K} \sum_{k=1}^{K} w_k
                            = \operatorname{logsumexp}_k(\log w_k) - \log K,

    whose expectation :math:`\mathcal{L}_K` satisfies
    :math:`\mathrm{ELBO} = \mathcal{L}_1 \le \mathcal{L}_K \le \mathcal{L}_{K+1}
    \le \log p(x)` (Burda, Grosse & Salakhutdinov, 2016, *Importance Weighted
    Autoencoders*, Theorem 1). Its gradient is
    :math:`\sum_k \tilde w_k \nabla \log w_k` with
    :math:`\tilde w = \operatorname{softmax}(\log w)`.

    Particles with ``log_w = -inf`` get weight zero; an element whose particles
    all have weight zero gets ``-inf`` (and a zero gradient, not NaN).

    :param log_w: log weights, shape ``(K, *plate_shape)``.

    :return: The bound estimate, shape ``plate_shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.maths.bounds import iwae_bound
        >>> float(iwae_bound(jnp.log(jnp.array([1.0, 3.0]))))  # log((1 + 3) / 2)
        0.693...

    """
    return _safe_logsumexp(log_w) - math.log(log_w.shape[0])


def normalized_weights(log_w: jax.Array) -> jax.Array:
    r"""Self-normalized importance weights :math:`\tilde w_k = w_k / \sum_j w_j`
    over the particle axis (axis 0); zero for elements with no live particle.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.maths.bounds import normalized_weights
        >>> normalized_weights(jnp.log(jnp.array([1.0, 3.0]))).tolist()
        [0.25, 0.75]

    """
    lse = _safe_logsumexp(log_w)
    dead = jnp.isneginf(lse)
    return jnp.where(dead, 0.0, jnp.exp(log_w - jnp.where(dead, 0.0, lse)))


@jax.custom_jvp
def nan_to_neginf(log_w: jax.Array) -> jax.Array:
    """Map NaN log weights to ``-inf``: weight zero (a density evaluated outside
    its support).

    Its derivative hands the tangent (and so the cotangent) through unchanged, in
    forward and reverse mode alike. The bounds here give a
    log weight of ``-inf`` a cotangent of exactly 0, so masking it again changes
    nothing, and not keeping the NaN mask for the backward pass spares XLA from
    recomputing the log weights there (on Neal's funnel at K = 10 the compiled
    step shrank from 5575 to 4570 instructions). Use it only where a ``-inf``
    entry's cotangent is 0.
    """
    return jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)


@nan_to_neginf.defjvp
def _nan_to_neginf_jvp(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    return nan_to_neginf(primals[0]), tangents[0]


def replicate_weights(log_w: jax.Array, replicates: int) -> jax.Array:
    """:func:`normalized_weights` within each of ``replicates`` consecutive sets of
    particles.
    """
    if replicates == 1:
        return normalized_weights(log_w)
    sets = log_w.reshape((replicates, -1) + log_w.shape[1:])
    return jax.vmap(normalized_weights)(sets).reshape(log_w.shape)


def miwae_bound(log_w: jax.Array, num_replicates: int) -> jax.Array:
    r"""The multiply importance-weighted bound, one value per plate element:

    .. math::

        \mathrm{MIWAE}(M, K) = \frac1M \sum_{m=1}^M \log \frac1K \sum_{k=1}^K w_{m,k},

    the mean of M independent :func:`iwae_bound` estimates of K particles each
    (Rainforth et al., 2018, *Tighter Variational Bounds are Not Necessarily
    Better*, ICML). Replicate m is rows ``m K .. (m + 1) K - 1`` of ``log_w``.

    :param log_w: ``(M K, *plate_shape)``.
    :param num_replicates: M.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.maths.bounds import miwae_bound
        >>> log_w = jnp.log(jnp.array([1.0, 3.0, 2.0, 2.0, 5.0, 1.0]))
        >>> float(miwae_bound(log_w, 2))  # sets (1, 3, 2), (2, 5, 1): (log 2 + log 8/3) / 2
        0.836...

    """
    sets = log_w.reshape((num_replicates, -1) + log_w.shape[1:])
    return jnp.mean(jax.vmap(iwae_bound)(sets), axis=0)


def ciwae_bound(log_w: jax.Array, beta: float) -> jax.Array:
    r"""The combination :math:`\beta\, \mathrm{ELBO} + (1 - \beta)\, \mathrm{IWAE}_K` on the
    same K particles, one value per plate element (Rainforth et al., 2018):

    .. math::

        \beta \frac1K \sum_k \log w_k + (1 - \beta) \log \frac1K \sum_k w_k.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.maths.bounds import ciwae_bound
        >>> float(ciwae_bound(jnp.log(jnp.array([1.0, 4.0])), 0.5))  # (log 2 + log 2.5) / 2
        0.804...

    """
    return beta * jnp.mean(log_w, axis=0) + (1.0 - beta) * iwae_bound(log_w)


def renyi_bound(log_w: jax.Array, alpha: float) -> jax.Array:
    r"""The variational Renyi bound, one value per plate element:

    .. math::

        \mathcal L_\alpha = \frac{1}{1 - \alpha} \log \frac1K \sum_{k=1}^K
            w_k^{1 - \alpha}

    (Li & Turner, 2016, *Renyi Divergence Variational Inference*, NeurIPS). At
    :math:`\alpha = 0` it is :func:`iwae_bound`; as :math:`\alpha \to 1` it tends to the
    ELBO :math:`\frac1K \sum_k \log w_k`, which is what ``alpha = 1`` computes. In
    expectation it decreases in :math:`\alpha`.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.maths.bounds import renyi_bound
        >>> log_w = jnp.log(jnp.array([1.0, 4.0]))
        >>> [round(float(renyi_bound(log_w, a)), 3) for a in (0.0, 0.5, 1.0)]
        [0.916, 0.811, 0.693]

    """
    if alpha == 1:
        return jnp.mean(log_w, axis=0)
    return iwae_bound((1.0 - alpha) * log_w) / (1.0 - alpha)
