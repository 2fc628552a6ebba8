"""Per-element arrays laid out against value arrays, so the two broadcast."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["plate_layout"]


def plate_layout(per_element: jax.Array, ndim: int, axes: tuple[int, ...]) -> jax.Array:
    """Lay ``per_element`` of shape ``(L, *plate_sizes)`` out against values of shape
    ``(L, *value_shape)`` whose independent-plate axes are ``axes`` (in plate order),
    with size-1 axes elsewhere, so the two broadcast.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_iwae.maths.layout import plate_layout
        >>> plate_layout(jnp.ones((4, 3)), ndim=2, axes=(0,)).shape  # value (4, 3, 5)
        (4, 3, 1)

    """
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    moved = jnp.transpose(per_element, (0, *(1 + i for i in order)))
    shape = [per_element.shape[0]] + [1] * ndim
    for i in order:
        shape[1 + axes[i]] = per_element.shape[1 + i]
    return jnp.reshape(moved, shape)
