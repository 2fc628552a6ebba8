"""One particle's two stages: the guide's draw, with the log densities each gradient
estimator needs, and the model's log density at the drawn values, reduced to the plates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from numpyro_iwae.core.enumeration import enumerated_log_p
from numpyro_iwae.core.plates import (
    PlateStructure,
    Trace,
    accumulate,
    sample_sites,
    site_log_prob,
    to_plates,
)
from numpyro_iwae.core.program import (
    GuideDraw,
    ModelOutput,
    Program,
    draw_data,
    is_delta,
    mutable_values,
)

__all__ = ["log_ratio", "mark_nan_data", "ModelFn", "guide_stage", "model_stage", "any_nan_data"]


def log_ratio(log_p: tuple[jax.Array, ...], *log_q: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    r"""Log importance weights per group, :math:`\log w = \log p - \sum_j \log q_j`:
    the one place the model's and the guide's log densities are combined (the guide's
    in parts, e.g. ``log_q_rep`` and ``log_q_score``; stop gradients before if a path
    must not be differentiated).
    """
    out = []
    for p, *parts in zip(log_p, *log_q):
        for q in parts:
            p = p - q
        out.append(p)
    return tuple(out)


def mark_nan_data(log_w: jax.Array, nan_data: jax.Array | None) -> jax.Array:
    """Set the log weights of plate elements with NaN observed data to NaN.

    A NaN log weight is otherwise read as weight zero (a latent value outside its
    support); NaN *data* is an error of the input and must show in the result
    rather than pass as a bound of ``-inf``.
    """
    if nan_data is None:
        return log_w
    return jnp.where(nan_data, jnp.nan, log_w)


def _nan_data(site: dict[str, Any], log_prob: jax.Array, structure: PlateStructure) -> jax.Array:
    """Plate elements where an observed value is NaN or infinite and not masked (its
    ``log_prob`` is then NaN or ``-inf``; a mask makes it 0).
    """
    value = jnp.asarray(site["value"])
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return jnp.zeros(structure.group_shape(structure.group_of(site["name"])), bool)
    event_dim = min(site["fn"].event_dim, value.ndim)
    nan = ~jnp.isfinite(value)
    if event_dim:
        nan = jnp.any(nan, axis=tuple(range(-event_dim, 0)))
    bad = ~jnp.isfinite(log_prob) & nan
    return to_plates(bad, site, structure, jnp.any)


ModelFn = Callable[[dict[str, jax.Array], dict[str, Any]], tuple[jax.Array, ModelOutput]]


def guide_stage(
    program: Program,
    params: Mapping[str, Any],
    key: jax.Array,
    structure: PlateStructure,
    path: str | None,
) -> GuideDraw:
    """One particle's guide draw: values for the model and the parts of ``log q``
    per group (the stopped-parameter part only when ``path`` is ``"stl"`` or
    ``"dreg"``, see :func:`_path_log_density`). Global sites are
    drawn from the program's global key, so every particle gets the same value.
    """
    tr = program.trace_guide(params, key, structure.global_sites)
    sites = list(sample_sites(tr).values())
    pathwise = [s["is_observed"] or s["fn"].has_rsample for s in sites]
    rep = accumulate([s for s, p in zip(sites, pathwise) if p], structure)
    score = accumulate([s for s, p in zip(sites, pathwise) if not p], structure)
    values, plates, mutable = draw_data(tr)
    rep_path = None
    if path:
        rep_path = _path_log_density(program, params, key, tr, structure, path == "dreg")
    return GuideDraw(values, plates, rep, rep_path, score, mutable)


def _path_log_density(
    program: Program,
    params: Mapping[str, Any],
    key: jax.Array,
    tr: Trace,
    structure: PlateStructure,
    stop_globals: bool = False,
) -> tuple[jax.Array, ...]:
    r"""``log q`` of the reparameterized sites at ``stop_gradient(params)``, as a
    function of the sampled values (which keep their path to the parameters), per
    group.

    The guide is run again with its parameters stopped and every sampled value
    (and minibatch) substituted, so each distribution is rebuilt from stopped
    parameters however it stores them (a flow's network, a closure), and each
    density is evaluated at the value: through a transform's inverse rather than
    through intermediates computed with live parameters. ``Delta`` sites that
    carry a transform of an auxiliary sample recompute value and log-Jacobian
    from the substituted sample, i.e. along its path.

    With ``stop_globals`` (DReG under local weighting) the local groups come from a
    second pass with the global draws stopped as well: a local site's density is then
    that of :math:`q(z \mid \mathrm{sg}(\theta))`, as the doubly reparameterized
    identity for the local particles needs (theta is a parameter of their proposal),
    while the global group keeps its live path. Without it (STL), theta is a live
    value like any other: the path derivative of :math:`\log q(\theta, z)`.
    """
    # Delta draws are not substituted but recomputed from their (substituted)
    # auxiliary draw: Delta.log_prob(x) is log(x == v), so a v recomputed in another
    # fusion context must not be compared with the first pass's x (were they to differ
    # in the last bit, log q would be -inf).
    data = {
        n: s["value"]
        for n, s in tr.items()
        if s["type"] == "plate" or (s["type"] == "sample" and not is_delta(s["fn"]))
    }
    stopped = jax.tree.map(jax.lax.stop_gradient, dict(params))

    def densities(values: dict[str, Any]) -> tuple[jax.Array, ...]:
        rerun = program.trace_guide({**stopped, **values}, key)
        sites = [
            {**s, "intermediates": []}
            for s in sample_sites(rerun).values()
            if not s["is_observed"] and s["fn"].has_rsample
        ]
        return accumulate(sites, structure)

    try:
        total = densities(data)
        if stop_globals and structure.global_sites:
            # The local groups again, with the global draws stopped (what each pass
            # does not use, XLA drops).
            shared = {
                n: jax.lax.stop_gradient(data[n]) for n in structure.global_sites if n in data
            }
            total = (total[0], *densities({**data, **shared})[1:])
        return total
    except NotImplementedError as err:
        raise NotImplementedError(
            "gradient_estimator 'stl'/'dreg' evaluates log q(z) at stopped parameters as a "
            "function of z, through the inverse of each transform; a transform in this guide "
            f"has none ({err}). Use gradient_estimator='reparam' for this guide."
        ) from err


def model_stage(
    program: Program,
    params: Mapping[str, Any],
    key: jax.Array,
    structure: PlateStructure,
    draw: tuple[dict, dict, dict],
) -> tuple[tuple[jax.Array, ...], ModelOutput]:
    """One particle's ``log p(x, z)`` per group with z from the guide draw (its
    values, subsample indices and mutable state; global values come in ``params``),
    its mutable state and where its observed data is NaN.
    """
    values, plates, mutable = draw
    data = {**mutable, **plates, **values}
    summed = None
    if structure.enumerated:  # the enumerated sites summed out, per group
        model = program.bind_model(params, key, data)
        summed, tr = enumerated_log_p(model, program.args, program.kwargs, structure)
    else:
        tr = program.trace_model(params, key, data)
    log_p = list(structure.zeros())
    nan_data = {}
    for name, site in sample_sites(tr).items():
        if summed is not None and not site["is_observed"]:
            continue
        log_prob = site_log_prob(site, structure)
        if summed is None:
            group = structure.group_of(name)
            log_p[group] = log_p[group] + to_plates(log_prob, site, structure, jnp.sum)
        if site["is_observed"]:
            nan_data[name] = _nan_data(site, log_prob, structure)
    return summed or tuple(log_p), ModelOutput({**mutable, **mutable_values(tr)}, nan_data)


def any_nan_data(output: ModelOutput, structure: PlateStructure) -> tuple[jax.Array | None, ...]:
    """Per group, the plate elements with NaN observed data at any of its sites
    (``None`` for a group that observes nothing), from a K-particle
    :class:`ModelOutput`.
    """
    found: list[list[jax.Array]] = [[] for _ in range(structure.num_groups)]
    for name, nan in output.nan_data.items():
        found[structure.group_of(name)].append(nan[0])
    return tuple(jnp.any(jnp.stack(f), axis=0) if f else None for f in found)
