"""Gradient surrogates on log importance weights: expressions whose value is zero
(or the bound) and whose gradient is an estimator's (VIMCO, Renyi, DReG, wake-phi).

Log weights have the particle axis first, ``(K, *plate_shape)``. Nothing here knows
about NumPyro.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from numpyro_iwae.maths.bounds import iwae_bound, normalized_weights, replicate_weights

__all__ = [
    "vimco_learning_signal",
    "with_score_terms",
    "renyi_learning_signal",
    "zero_valued",
    "dreg_surrogate",
    "wake_phi_surrogate",
]


def vimco_learning_signal(log_w: jax.Array) -> jax.Array:
    r"""VIMCO's per-particle learning signal with leave-one-out baselines.

    .. math::

        \ell_j = \hat L - \log \frac1K \Big(\sum_{i \ne j} w_i + \hat w_{-j}\Big),
        \qquad \hat w_{-j} = \exp\Big(\frac{1}{K-1} \sum_{i \ne j} \log w_i\Big),

    where :math:`\hat L = \log \frac1K \sum_i w_i` (Mnih & Rezende, 2016,
    *Variational Inference for Monte Carlo Objectives*, ICML, eqs. 9-10). Each
    :math:`\ell_j` multiplies :math:`\nabla_\phi \log q(z_j)` in
    the gradient.
    With ``K = 1`` there is no other particle to form a baseline, and the signal
    is :math:`\hat L` itself (the plain score-function estimator). Non-finite
    signals (a particle of weight zero) are set to zero. The leave-one-out sums
    are formed exactly, at O(K^2) memory per plate element.

    :param log_w: ``(K, *plate_shape)``.

    :return: ``(K, *plate_shape)``, to be used under ``stop_gradient``.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.maths.surrogates import vimco_learning_signal
        >>> vimco_learning_signal(jnp.zeros(4)).tolist()  # equal weights: no signal
        [0.0, 0.0, 0.0, 0.0]

    """
    k = log_w.shape[0]
    bound = iwae_bound(log_w)
    if k == 1:
        signal = jnp.broadcast_to(bound, log_w.shape)
    else:
        mean_others = (jnp.sum(log_w, axis=0) - log_w) / (k - 1)
        # For each j, the K log weights with the j-th replaced by mean_others[j].
        eye = jnp.eye(k, dtype=bool).reshape((k, k) + (1,) * (log_w.ndim - 1))
        loo = jnp.where(eye, mean_others[:, None], log_w[None])
        signal = bound - (jax.nn.logsumexp(loo, axis=1) - math.log(k))
    return jnp.where(jnp.isfinite(signal), signal, 0.0)


def with_score_terms(
    bound: jax.Array,
    log_w: jax.Array,
    log_q_score: jax.Array,
    signal: jax.Array | None = None,
) -> jax.Array:
    r"""Add score-function terms to a per-element bound without changing its value:
    ``bound + sum_k sg(l_k) (log q_k - sg(log q_k))``, by default with VIMCO's
    learning signals :math:`\ell` of :func:`vimco_learning_signal` computed from
    ``log_w``.

    :param bound: ``plate_shape``, the bound whose gradient holds the pathwise part.
    :param log_w: ``(K, *plate_shape)``.
    :param log_q_score: ``(K, *plate_shape)``, the log density of the guide sites
        without a reparameterized sampler, live parameters.
    :param signal: ``(K, *plate_shape)`` learning signals to use instead of VIMCO's.

    """
    if signal is None:
        signal = vimco_learning_signal(log_w)
    signal = jax.lax.stop_gradient(signal)
    centred = log_q_score - jax.lax.stop_gradient(log_q_score)
    return bound + jnp.sum(signal * centred, axis=0)


def renyi_learning_signal(log_w: jax.Array, alpha: float) -> jax.Array:
    r"""Score-function learning signals for :func:`renyi_bound`, with leave-one-out
    baselines: VIMCO's (:func:`vimco_learning_signal`) on the tempered log weights
    :math:`(1 - \alpha) \log w`, divided by :math:`1 - \alpha`. At ``alpha = 1`` (the
    ELBO, linear in the log weights) particle j's signal is
    :math:`(\log w_j - \frac{1}{K-1}\sum_{i \ne j} \log w_i) / K` (``log w / 1`` for
    K = 1).
    """
    k = log_w.shape[0]
    if alpha == 1:
        if k == 1:
            signal = log_w
        else:
            baseline = (jnp.sum(log_w, axis=0) - log_w) / (k - 1)
            signal = (log_w - baseline) / k
        return jnp.where(jnp.isfinite(signal), signal, 0.0)
    return vimco_learning_signal((1.0 - alpha) * log_w) / (1.0 - alpha)


def zero_valued(x: jax.Array) -> jax.Array:
    """``x - stop_gradient(x)``: value 0, gradient that of ``x``; how the surrogates
    below add a gradient without changing an objective's value.
    """
    return x - jax.lax.stop_gradient(x)


def _path_terms(coef: jax.Array, log_w_path: jax.Array) -> jax.Array:
    """``coef * zero_valued(log_w_path)`` per particle, 0 where ``coef`` is 0 (a
    particle of weight zero, whose log weight may be ``-inf``), in value and gradient.
    """
    dead = coef == 0
    return jnp.where(dead, 0.0, coef * jnp.where(dead, 0.0, zero_valued(log_w_path)))


def dreg_surrogate(log_w: jax.Array, log_w_path: jax.Array, replicates: int = 1) -> jax.Array:
    r"""A per-element surrogate of value 0 whose gradient is the doubly reparameterized
    estimator of the guide's gradient of :math:`\frac1M \sum_m \log \frac1K \sum_k
    w_{m,k}` (Tucker, Lawson, Gu & Maddison, 2019, eq. 7, per set of K):

    .. math::

        \frac1M \sum_m \sum_k \tilde w_{m,k}^2 \,
            \frac{\partial \log w_{m,k}}{\partial z_{m,k}}
            \frac{\partial z_{m,k}}{\partial \phi},

    with :math:`\tilde w` normalized within each set (no gradient) and ``log_w_path``
    the log weights whose gradient is the path derivative (``log q`` at stopped
    parameters). The same gradient as :func:`dreg_log_weights` for ``replicates``
    sets, as a plain sum, for objectives that already differentiate the model's
    parameters along another path (PIWAE). A particle of weight zero contributes 0
    even where its log weight is ``-inf``.
    """
    coef = replicate_weights(jax.lax.stop_gradient(log_w), replicates) ** 2
    return jnp.sum(_path_terms(coef, log_w_path), axis=0) / replicates


def wake_phi_surrogate(
    log_w: jax.Array,
    log_q_fixed: jax.Array,
    log_w_path: jax.Array | None = None,
    log_q_score_fixed: jax.Array | None = None,
) -> jax.Array:
    r"""The wake-:math:`\phi` update of reweighted wake-sleep (Bornschein & Bengio,
    2015; Le, Kosiorek, Siddharth, Teh & Wood, 2019) per plate element, as a
    surrogate of value 0 whose gradient is

    .. math::

        \sum_k \tilde w_k \, \nabla_\phi \log q_\phi(z_k) \Big|_{z_k\ \text{fixed}},

    the self-normalized estimate of :math:`-\nabla_\phi \mathrm{KL}(p(z \mid x)
    \,\|\, q_\phi(z))`. It needs no path through :math:`z`, so it holds for
    discrete sites.

    ``log_q_fixed`` is a ``(K, *plates)`` array of value 0 whose gradient is
    :math:`\nabla_\phi \log q(z_k)` at fixed :math:`z_k`. With ``log_w_path`` (the
    log weights whose gradient is the path derivative
    :math:`\frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi}`)
    the reparameterized sites take the doubly reparameterized form instead (Tucker,
    Lawson, Gu & Maddison, 2019, eq. for RWS-DReG):

    .. math::

        \sum_k \left(\tilde w_k - \tilde w_k^2\right)
            \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},

    equal in expectation (:math:`\mathbb E[f \nabla_\phi \log q] =
    \mathbb E[\partial_z f \, \partial_\phi z]` with :math:`f = \tilde w_k`, whose
    derivative in :math:`z_k` is :math:`\tilde w_k (1 - \tilde w_k) \partial_{z_k} \log
    w_k`), and then ``log_q_fixed`` holds only the reparameterized sites while
    ``log_q_score_fixed`` holds the discrete ones, which keep the score form.
    The weights :math:`\tilde w` come from ``log_w`` and carry no gradient.
    """
    w = normalized_weights(jax.lax.stop_gradient(log_w))
    if log_w_path is None:
        return jnp.sum(w * log_q_fixed, axis=0)
    terms = _path_terms(w - w**2, log_w_path)
    if log_q_score_fixed is not None:
        terms = terms + w * log_q_score_fixed
    return jnp.sum(terms, axis=0)
