"""Gradient paths around the model's log density: the doubly reparameterized
estimator's custom backward pass, and one forward pass whose two copies differentiate
different parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_iwae._jax import call_backward_defined, hoist_closure
from numpyro_iwae.maths.bounds import nan_to_neginf, replicate_weights
from numpyro_iwae.maths.layout import plate_layout

__all__ = ["dreg_log_weights", "split_gradient_paths"]


def dreg_log_weights(
    log_p_fn: Callable[[dict[str, jax.Array], Any], tuple[Any, Any]],
    values: dict[str, jax.Array],
    params: Any,
    log_q_path: Any,
    log_q_score: Any,
    value_axes: tuple[tuple[str, int, tuple[int, ...]], ...],
    value_groups: tuple[tuple[str, int], ...] = (),
    replicates: int = 1,
) -> tuple[Any, Any]:
    r"""Log weights whose gradient gives the doubly reparameterized estimator.

    Returns ``log_w = log_p_fn(values, params)[0] - log_q_path - log_q_score`` (and
    ``log_p_fn``'s auxiliary output) with a custom backward pass: a cotangent
    :math:`g_k` reaching :math:`\log w_k` flows to ``params`` and ``log_q_score``
    unchanged, and to ``values`` and ``log_q_path`` multiplied by
    :math:`\tilde w_k`. Under :func:`iwae_bound`, :math:`g_k = \tilde w_k`, so the
    guide's reparameterized parameters :math:`\phi` receive

    .. math::

        \sum_k \tilde w_k^2 \, \frac{\partial \log w_k}{\partial z_k}
        \frac{\partial z_k}{\partial \phi}

    (Tucker, Lawson, Gu & Maddison, 2019, *Doubly Reparameterized Gradient
    Estimators for Monte Carlo Objectives*, ICLR, eq. 7), with ``log_q_path``
    evaluated at ``stop_gradient`` parameters; model parameters keep the IWAE
    weights :math:`\tilde w_k`. One forward and one backward pass of the model.

    The log densities may be tuples with one array per group (local weighting):
    each value's cotangent is scaled by the weights of its group
    (``value_groups``, group 0 if absent), and only the groups that hold values
    are weighted; the others' ``log_q_path`` gets the plain cotangent.

    :param log_p_fn: ``(values, params) -> (log_p, aux)``, ``log_p`` of shape
        ``(K, *plates)`` (or a tuple of such arrays, one per group).
    :param values: latent values, each ``(K, *value_shape)``, carrying their path
        to the guide's parameters.
    :param params: differentiable parameters of ``log_p_fn`` (a pytree).
    :param log_q_path: guide log density of the reparameterized sites at stopped
        parameters, ``(K, *plates)`` (or a tuple).
    :param log_q_score: guide log density of the other sites, ``(K, *plates)`` (or a
        tuple).
    :param value_axes: ``(name, ndim, plate axes)`` per value, as in
        :attr:`numpyro_iwae.core.plates.PlateStructure.value_axes`.
    :param value_groups: ``(name, group)`` per value.
    :param replicates: M, when the particle axis holds M independent sets of K
        particles one after another (MIWAE): the weights are normalized within
        each set.

    """
    single = not isinstance(log_q_path, tuple)
    if single:
        log_q_path, log_q_score = (log_q_path,), (log_q_score,)
    converted, consts = hoist_closure(log_p_fn, values, params)
    axes = {name: (ndim, ax) for name, ndim, ax in value_axes}
    groups = dict(value_groups)
    weighted = sorted({groups.get(name, 0) for name in axes})

    def log_w_of(values, params, log_q_path, log_q_score, *consts):
        log_p, aux = converted(values, params, *consts)
        log_p = log_p if isinstance(log_p, tuple) else (log_p,)
        return tuple(p - q - s for p, q, s in zip(log_p, log_q_path, log_q_score)), aux

    @jax.custom_vjp
    def log_w_fn(values, params, log_q_path, log_q_score, *consts):
        return log_w_of(values, params, log_q_path, log_q_score, *consts)

    def fwd(values, params, log_q_path, log_q_score, *consts):
        out, vjp = jax.vjp(log_w_of, values, params, log_q_path, log_q_score, *consts)
        w = {g: replicate_weights(nan_to_neginf(out[0][g]), replicates) for g in weighted}
        return out, (vjp, w)

    def bwd(res, cotangent):
        vjp, w = res
        g_log_w, g_aux = cotangent
        g_values, g_params, _, g_score, *g_consts = vjp((g_log_w, g_aux))
        # The values' cotangent is the sum over the particle's plate elements; each
        # element's share is scaled by that element's weight. Values that live
        # outside every independent plate take the element-free weight.
        scaled = {}
        for name, g in g_values.items():
            if g.dtype == jax.dtypes.float0:  # integer values: no cotangent
                scaled[name] = g
                continue
            ndim, ax = axes[name]
            scaled[name] = g * plate_layout(w[groups.get(name, 0)], ndim, ax).astype(g.dtype)
        g_path = tuple(-g * w[i] if i in w else -g for i, g in enumerate(g_log_w))
        return (scaled, g_params, g_path, g_score, *g_consts)

    log_w_fn.defvjp(fwd, bwd)
    log_w, aux = call_backward_defined(
        log_w_fn, values, params, log_q_path, log_q_score, *consts, what="DReG"
    )
    return (log_w[0] if single else log_w), aux


def split_gradient_paths(
    log_p_fn: Callable[[dict[str, jax.Array], dict[str, Any]], tuple[Any, Any]],
    values: dict[str, jax.Array],
    params: dict[str, Any],
    theta_names: tuple[str, ...],
) -> tuple[tuple[Any, Any], Any]:
    """Evaluate ``log_p_fn(values, params)`` once and return ``((log_p, aux),
    log_p_theta)``: two copies of ``log_p`` whose gradients take different paths.
    The cotangent of ``log_p`` reaches ``values`` and the parameters *not* named in
    ``theta_names``; that of ``log_p_theta`` reaches only the parameters named in
    ``theta_names``. So an objective can give the model's parameters the gradient of
    one bound and the guide's (through the sampled values) the gradient of another,
    from one forward pass (two backward passes), as PIWAE does (Rainforth et al.,
    2018).
    """
    converted, consts = hoist_closure(log_p_fn, values, params)
    names = set(theta_names)

    def zero_cotangent(x: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(jnp.shape(x), jax.dtypes.float0)

    @jax.custom_vjp
    def fn(values, params, *consts):
        out = converted(values, params, *consts)
        return out, out[0]

    def fwd(values, params, *consts):
        out, vjp = jax.vjp(converted, values, params, *consts)
        return (out, out[0]), (vjp, jax.tree.map(zero_cotangent, out[1]))

    def bwd(res, cotangent):
        vjp, zero_aux = res
        (g_log_p, g_aux), g_theta = cotangent
        g_values, g_params, *g_consts = vjp((g_log_p, g_aux))
        _, t_params, *t_consts = vjp((g_theta, zero_aux))
        params_ct = {k: (t_params[k] if k in names else g) for k, g in g_params.items()}
        consts_ct = [
            g if g.dtype == jax.dtypes.float0 else g + t for g, t in zip(g_consts, t_consts)
        ]
        return (g_values, params_ct, *consts_ct)

    fn.defvjp(fwd, bwd)
    return call_backward_defined(fn, values, params, *consts, what="The two-path surrogate")
