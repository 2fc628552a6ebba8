"""Pareto-smoothed importance sampling diagnostics (Vehtari, Simpson, Gelman, Yao &
Gabry, 2024, *Pareto Smoothed Importance Sampling*, JMLR): the tail length and the
shape k-hat of the largest importance weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["psis_tail_length", "pareto_k_hat"]


def psis_tail_length(num_particles: int) -> int:
    r"""PSIS tail length :math:`M = \lceil \min(K/5,\ 3\sqrt K) \rceil` (Vehtari et al.,
    2024, *Pareto Smoothed Importance Sampling*, JMLR 25(72), section 3).
    """
    return int(math.ceil(min(0.2 * num_particles, 3 * math.sqrt(num_particles))))


def pareto_k_hat(top: jax.Array) -> jax.Array:
    r"""PSIS :math:`\hat k` from the largest :math:`M + 1` log weights.

    With the log weights shifted so the largest is 0, the cutoff :math:`u` is the
    :math:`(M+1)`-th largest (at least the log of the smallest normal float), and
    the tail :math:`y_i = e^{\log w_i} - e^u` over the weights strictly above it.
    A generalized Pareto distribution is fitted to the tail by the empirical Bayes
    method of Zhang & Stephens (2009, *A New and Efficient Estimation Method for
    the Generalized Pareto Distribution*, Technometrics 51(3)): with
    :math:`\theta` on a grid of :math:`m = 30 + \lfloor \sqrt n \rfloor` points

    .. math::

        \theta_j = \frac{1}{y_{(n)}}
            + \frac{1 - \sqrt{m / (j - 1/2)}}{3\, y_{(\lfloor n/4 + 1/2 \rfloor)}},
        \quad \xi(\theta) = \frac1n \sum_i \log(1 - \theta y_i),
        \quad \ell(\theta) = n \big(\log(-\theta / \xi(\theta)) - \xi(\theta) - 1\big),

    :math:`\hat\theta = \sum_j \theta_j\, \mathrm{softmax}(\ell)_j`, and
    :math:`\hat k = (n\, \xi(\hat\theta) + 10 \cdot 0.5) / (n + 10)`, the shape
    shrunk towards 0.5 by a weak prior (Vehtari et al., 2024). Fewer than five
    tail weights give ``inf``. The fit runs in the input's precision: in float32,
    weights below :math:`e^{-87}` times the largest are zero, which can change
    :math:`\hat k` for extremely heavy tails (:math:`\hat k > 2`), never its
    verdict.

    :param top: the largest :math:`M + 1` log weights along axis 0, in any order.

    :return: :math:`\hat k`, shape ``top.shape[1:]``.

    """
    m_tail = top.shape[0] - 1
    x = jnp.sort(top, axis=0)[::-1]  # descending
    x = x - x[0]
    cutoff = jnp.maximum(x[m_tail], jnp.log(jnp.finfo(x.dtype).tiny))
    tail = x[:m_tail][::-1]  # ascending
    valid = tail > cutoff
    n = jnp.sum(valid, axis=0)
    y = jnp.where(valid, jnp.exp(tail) - jnp.exp(cutoff), 0.0)
    n_f = n.astype(x.dtype)
    safe_n = jnp.maximum(n_f, 1.0)

    # The valid entries are the last n of the ascending tail.
    first = m_tail - n
    quartile = jnp.clip(first + jnp.floor(n_f / 4 + 0.5).astype(n.dtype) - 1, 0, m_tail - 1)
    y_quartile = jnp.take_along_axis(y, quartile[None], axis=0)[0]
    y_max = y[-1]

    m_max = 30 + int(math.isqrt(max(m_tail, 0)))
    m_grid = 30 + jnp.floor(jnp.sqrt(n_f))
    j = jnp.arange(1, m_max + 1, dtype=x.dtype).reshape((m_max,) + (1,) * n.ndim)
    grid_ok = j <= m_grid
    theta = 1.0 / y_max + (1.0 - jnp.sqrt(m_grid / (j - 0.5))) / (3.0 * y_quartile)

    # xi for every grid point: (m_max, *shape)
    xi_grid = (
        jnp.sum(jnp.where(valid[None], jnp.log1p(-theta[:, None] * y[None]), 0.0), axis=1) / safe_n
    )
    ell = n_f * (jnp.log(-theta / xi_grid) - xi_grid - 1.0)
    ell = jnp.where(grid_ok, ell, -jnp.inf)
    theta_hat = jnp.sum(jax.nn.softmax(ell, axis=0) * jnp.where(grid_ok, theta, 0.0), axis=0)
    xi_hat = jnp.sum(jnp.where(valid, jnp.log1p(-theta_hat * y), 0.0), axis=0) / safe_n
    k_hat = (n_f * xi_hat + 10 * 0.5) / (n_f + 10)
    return jnp.where(n > 4, k_hat, jnp.inf)
