"""The zero-weight gradient guard: a particle of weight zero contributes exactly zero
gradient, even where the model's derivatives at its values are infinite.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from numpyro_iwae._jax import call_backward_defined, hoist_closure
from numpyro_iwae.core.program import ModelOutput
from numpyro_iwae.core.stages import ModelFn
from numpyro_iwae.maths.layout import plate_layout

__all__ = ["zero_weight_safe"]


def _float_leaves(tree: Any) -> list[jax.Array]:
    return [g for g in jax.tree.leaves(tree) if jnp.issubdtype(g.dtype, jnp.inexact)]


def _layout_maps(value_axes: tuple, value_groups: tuple) -> tuple[dict, dict]:
    """``value_axes`` and ``value_groups`` as look-ups: name -> (ndim, plate axes), and
    name -> group.
    """
    return {name: (ndim, ax) for name, ndim, ax in value_axes}, dict(value_groups)


def _zero_dead_values(g_values: dict, dead: dict, axes: dict, groups: dict) -> dict[str, jax.Array]:
    """The values' cotangents with the dead particles' entries set to 0 (``dead``:
    per group, ``(K, *plates)`` booleans).
    """
    out = {}
    for name, g in g_values.items():
        if g.dtype == jax.dtypes.float0:  # integer values: no cotangent
            out[name] = g
        else:
            ndim, ax = axes[name]
            mask = plate_layout(dead[groups.get(name, 0)], ndim, ax)
            out[name] = jnp.where(mask, 0.0, g).astype(g.dtype)
    return out


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tag_values(layout: tuple, values: dict, carriers: tuple) -> tuple[dict, tuple]:
    """The identity on ``(values, carriers)``. The carriers are zeros added to each
    group's ``log p``, so their cotangent is the one reaching ``log p``; the backward
    pass, which receives it together with the values' cotangents, zeroes the dead
    particles' entries in the latter. ``layout``: ``(value_axes, value_groups)``.
    """
    return values, carriers


def _tag_values_fwd(layout: tuple, values: dict, carriers: tuple) -> tuple[tuple, None]:
    return (values, carriers), None


def _tag_values_bwd(layout: tuple, _: None, cotangent: tuple) -> tuple[dict, tuple]:
    g_values, g_carriers = cotangent
    axes, groups = _layout_maps(*layout)
    dead = {g: c == 0 for g, c in enumerate(g_carriers)}
    return _zero_dead_values(g_values, dead, axes, groups), g_carriers


_tag_values.defvjp(_tag_values_fwd, _tag_values_bwd)


def zero_weight_safe(
    model_fn: ModelFn,
    value_axes: tuple,
    shared_params: bool,
    value_groups: tuple[tuple[str, int], ...] = (),
    group_shapes: tuple[tuple[int, ...], ...] | None = None,
) -> ModelFn:
    r"""``model_fn`` whose gradient gets nothing from a particle of weight zero.

    A particle whose ``log p`` is ``-inf`` or NaN (a scale that underflowed to 0, a
    value outside the support), or so small that its normalized weight underflows,
    has weight zero, so the cotangent reaching its ``log p`` is 0; but the
    derivatives inside the model at that point can be infinite (or overflow), and
    :math:`0 \times \infty` makes the gradient NaN. Such particles are the dead
    ones, recognised by a cotangent of exactly 0 (which the bounds give every
    particle of weight zero; :func:`~numpyro_iwae.maths.bounds.nan_to_neginf` passes it
    through). The backward pass repairs this in two ways:

    - the cotangent of each particle's own latent values is set to zero where the
      particle is dead (it is separate per particle and plate element, so nothing
      else is touched): this costs one ``where``;
    - the cotangent of parameters shared by all particles (``shared_params``: the
      model has ``param`` or ``module`` sites, or global values) is a sum over
      particles, which one NaN spoils. Only when it comes out non-finite is the
      model's vector-Jacobian product evaluated again, with each dead particle moved
      onto the particle of its plate element with the largest cotangent (a live one,
      whose derivatives enter the gradient anyway; the zero cotangent makes the
      choice irrelevant to the result). Without ``shared_params`` this second path is
      not compiled at all.

    ``model_fn`` returns ``log p`` as one array or as a tuple of group arrays;
    ``value_groups`` says which group each value belongs to (group 0 if absent).
    Without ``shared_params``, given ``group_shapes`` (each group's plate shape), the
    model is not wrapped at all: the values pass through an identity whose backward
    pass zeroes the dead particles' cotangents, told which are dead by zeros added to
    ``log p`` (:func:`_tag_values`). This traces the model once instead of twice and
    leaves XLA the ordinary backward pass.
    """
    if not shared_params and group_shapes is not None:
        return _tagged(model_fn, tuple(value_axes), tuple(value_groups), group_shapes)
    return _guarded(model_fn, value_axes, value_groups, shared_params)


def _per_group(log_p: Any) -> tuple:
    return log_p if isinstance(log_p, tuple) else (log_p,)


def _tagged(
    model_fn: ModelFn,
    value_axes: tuple,
    value_groups: tuple,
    group_shapes: tuple[tuple[int, ...], ...],
) -> ModelFn:
    """The model unwrapped, its values passed through an identity whose backward pass
    zeroes the dead particles' cotangents (told which by zeros added to ``log p``).
    """
    layout = (value_axes, value_groups)

    def tagged(values: dict[str, jax.Array], params: Any) -> tuple[Any, ModelOutput]:
        if not values:
            return model_fn(values, params)
        k = jax.tree.leaves(values)[0].shape[0]
        carriers = tuple(jnp.zeros((k, *shape)) for shape in group_shapes)
        values, carriers = call_backward_defined(
            partial(_tag_values, layout),
            values,
            carriers,
            fallback=lambda v, c: (v, c),  # forward mode: the masked logsumexp suffices
        )
        log_p, output = model_fn(values, params)
        summed = tuple(p + c for p, c in zip(_per_group(log_p), carriers))
        return (summed if isinstance(log_p, tuple) else summed[0]), output

    return tagged


def _moved_values(values: dict, weights: tuple, axes: dict, groups: dict) -> dict:
    """Each dead particle's values (cotangent ``weights`` of its group exactly 0)
    replaced by those of its plate element's particle of largest ``|weight|``, a live one.
    """
    safe = {}
    for name, value in values.items():
        ndim, ax = axes[name]
        weight = weights[groups.get(name, 0)]
        best = plate_layout(jnp.argmax(jnp.abs(weight), axis=0)[None], ndim, ax)
        chosen = jnp.take_along_axis(value, best, axis=0)
        safe[name] = jnp.where(plate_layout(weight == 0, ndim, ax), chosen, value)
    return safe


def _guarded(
    model_fn: ModelFn, value_axes: tuple, value_groups: tuple, shared_params: bool
) -> ModelFn:
    """The model in a ``custom_vjp`` whose backward pass zeroes the dead particles'
    value cotangents and, if the shared parameters' cotangent comes out non-finite,
    redoes it with the dead particles moved onto live ones.
    """
    axes, groups = _layout_maps(value_axes, value_groups)
    live_groups = sorted({groups.get(name, 0) for name in axes})

    def wrapped(values: dict[str, jax.Array], params: Any) -> tuple[jax.Array, ModelOutput]:
        converted, consts = hoist_closure(model_fn, values, params)

        @jax.custom_vjp
        def fn(values, params, *consts):
            return converted(values, params, *consts)

        def fwd(values, params, *consts):
            out, vjp = jax.vjp(converted, values, params, *consts)
            # The inputs are kept only for the second backward pass, if there is one.
            return out, (vjp, (values, params, consts) if shared_params else None)

        def bwd(res, cotangent):
            vjp, inputs = res
            # Dead: a cotangent of exactly 0. The bounds give that to every particle
            # of weight zero: log p of -inf or NaN (nan_to_neginf passes cotangents
            # through), or finite but so small that its normalized weight underflows.
            # Only groups that hold per-particle values count.
            dead = {g: _per_group(cotangent[0])[g] == 0 for g in live_groups}
            g_values, *g_rest = vjp(cotangent)
            grads = (_zero_dead_values(g_values, dead, axes, groups), *g_rest)
            if not shared_params or not dead:
                return grads

            values, params, consts = inputs

            def moved(cotangent: Any) -> Any:
                # The dead particles' cotangent is 0, so at their new points they add
                # exactly 0. Only the shared inputs' cotangents are recomputed (the
                # values' are those of the first pass, zero where dead), so the branch
                # takes the values and the cotangent and returns small outputs.
                safe = _moved_values(values, _per_group(cotangent[0]), axes, groups)
                _, safe_vjp = jax.vjp(converted, safe, params, *consts)
                return safe_vjp(cotangent)[1]

            # Only the parameters' cotangents are checked and redone: those of the
            # closure's traced values (the data, keys) are rarely wanted, and reading
            # them would force XLA to compute them. The test reads nothing of size K
            # (a reduction over the particles' cotangents is measurably slower on a
            # small model's step; benchmarks/RESULTS.md, "zero-weight guard"). A sum is
            # non-finite whenever one of its terms is (an overflow only costs the exact
            # second pass), and cheaper than testing every entry with isfinite. With no
            # particle dead the second pass repeats the first.
            g_params, *g_consts = g_rest
            finite = jnp.isfinite(sum(jnp.sum(g) for g in _float_leaves(g_params)))
            g_params = jax.lax.cond(finite, lambda _: g_params, moved, cotangent)
            return (grads[0], g_params, *g_consts)

        fn.defvjp(fwd, bwd)
        # Forward mode: the plain model; the logsumexp's derivative drops the tangents
        # of particles of weight zero.
        return call_backward_defined(fn, values, params, *consts, fallback=converted)

    return wrapped
