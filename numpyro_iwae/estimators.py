"""Pure functions on log-weight arrays: bound values and gradient surrogates.

Every function takes log weights with the particle axis first,
``log_w.shape == (K, *plate_shape)``, and returns one value per plate element.
Nothing here knows about NumPyro.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["iwae_bound", "normalized_weights"]


def _safe_logsumexp(log_w: jax.Array) -> jax.Array:
    """``logsumexp`` over axis 0 that is ``-inf`` with a zero gradient (not NaN)
    for elements whose particles all have weight zero.
    """
    dead = jnp.all(log_w == -jnp.inf, axis=0)
    safe = jnp.where(dead, 0.0, log_w)
    peak = jax.lax.stop_gradient(jnp.max(safe, axis=0))
    total = peak + jnp.log(jnp.sum(jnp.exp(safe - peak), axis=0))
    return jnp.where(dead, -jnp.inf, total)


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

    Args:
        log_w: log weights, shape ``(K, *plate_shape)``.

    Returns:
        The bound estimate, shape ``plate_shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.estimators import iwae_bound
        >>> float(iwae_bound(jnp.log(jnp.array([1.0, 3.0]))))  # log((1 + 3) / 2)
        0.693...

    """
    return _safe_logsumexp(log_w) - math.log(log_w.shape[0])


def normalized_weights(log_w: jax.Array) -> jax.Array:
    r"""Self-normalized importance weights :math:`\tilde w_k = w_k / \sum_j w_j`
    over the particle axis (axis 0); zero for elements with no live particle.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.estimators import normalized_weights
        >>> normalized_weights(jnp.log(jnp.array([1.0, 3.0]))).tolist()
        [0.25, 0.75]

    """
    lse = _safe_logsumexp(log_w)
    dead = jnp.isneginf(lse)
    return jnp.where(dead, 0.0, jnp.exp(log_w - jnp.where(dead, 0.0, lse)))
