r"""Log importance weights of a NumPyro model/guide pair, one row per particle.

This module is the one place that runs user code. Everything downstream
(estimators, objectives, evaluators) receives plain arrays plus a static
:class:`PlateStructure` describing how those arrays factorize.

A :class:`Program` bundles the model, the guide and the arguments both are called
with. For particle :math:`k` the guide is run to draw :math:`z_k \sim q_\phi(z \mid x)`,
the model is run with its values substituted, and every sample site's ``log_prob`` is
reduced to the *independent plates*: the plates that enclose every sample site of
the model and the guide (observed sites and ``numpyro.factor`` sites included). Along
those plates the joint density factorizes, so the importance-weighted bound can be
formed separately per plate element (Burda et al., 2016, applied per datapoint):

.. math::

    \log w_{k,n} = \sum_{s \in \text{model}} c_s \log p_s(\cdot)_n
                  - \sum_{s \in \text{guide}} c_s \log q_s(\cdot)_n ,

where :math:`n` indexes the independent plate elements, every other dimension of
a site's ``log_prob`` is summed, and :math:`c_s` is the site's scale *without*
the subsampling factor :math:`N/B` of the independent plates. That factor is
returned separately (:attr:`PlateStructure.scale`) because it must multiply the
bound *outside* the ``logsumexp``. As in NumPyro's ``Trace_ELBO``, the guide's sum
runs over *every* sample site of the guide: its latent draws and also its observed
and ``numpyro.factor`` sites.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
import math
import os
import sys
from typing import Any, NamedTuple
import warnings

import jax
from jax import random
from jax.extend.core import Literal
import jax.numpy as jnp
from numpyro import handlers
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import _without_rsample_stop_gradient
from numpyro.primitives import Messenger

from numpyro_iwae.estimators import nan_to_neginf, plate_layout

__all__ = [
    "GuideDraw",
    "JointWeightsWarning",
    "LARGE_PLATE_SIZE",
    "LogWeights",
    "ModelOutput",
    "PlateStructure",
    "Program",
    "any_nan_data",
    "caller_stacklevel",
    "check_subsampling",
    "draw_particles",
    "draw_with_keys",
    "log_weights",
    "mark_nan_data",
    "plan",
    "point_mass_sites",
    "split_keys",
    "zero_weight_safe",
]

#: A plate of at least this many elements over which the weights are joint
#: (because some site lies outside it) triggers a :class:`JointWeightsWarning`.
LARGE_PLATE_SIZE = 100

Trace = dict[str, dict[str, Any]]
VectorizeFn = Callable[[Callable, jax.Array], Any]


class JointWeightsWarning(UserWarning):
    """The importance weights are joint over a large plate.

    Raised when some sample site lies outside a plate of at least
    :data:`LARGE_PLATE_SIZE` elements, so the bound cannot be formed per plate
    element. The joint bound is still a valid lower bound on ``log p(x)``, but
    the benefit of importance weighting shrinks as the plate grows.
    """


@dataclass(frozen=True, eq=False)
class Program:
    """A model, its guide, and the arguments both are called with.

    Objectives and evaluators pass this one record instead of threading the four
    parts through every function. It is immutable: :meth:`with_seeded_plates`
    returns a new record.

    Attributes:
        model: the NumPyro model.
        guide: the NumPyro guide.
        args: positional arguments of both.
        kwargs: keyword arguments of both.

    """

    model: Callable
    guide: Callable
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def with_seeded_plates(self, plate_key: jax.Array) -> Program:
        """The same program with its plates (only) seeded by ``plate_key``, so every
        particle drawn from it sees the same minibatch.
        """
        hide = ["sample", "prng_key", "control_flow"]
        return replace(
            self,
            model=seed(self.model, plate_key, hide_types=hide),
            guide=seed(self.guide, plate_key, hide_types=hide),
        )

    def trace_guide(self, params: Mapping[str, Any], key: jax.Array) -> Trace:
        """Trace the guide with ``params`` substituted, seeded with ``key``; sampled
        values keep their path to the guide's parameters.
        """
        with _without_rsample_stop_gradient():
            guide = substitute(seed(self.guide, key), data=dict(params))
            return trace(guide).get_trace(*self.args, **self.kwargs)

    def trace_model(self, params: Mapping[str, Any], key: jax.Array, data: Mapping) -> Trace:
        """Trace the model with ``params`` and then ``data`` (latent values, subsample
        indices and mutable state from a guide trace) substituted; a guide value wins
        a name clash with a parameter.
        """
        model = substitute(seed(self.model, key), data={**params, **data})
        return trace(model).get_trace(*self.args, **self.kwargs)

    def prepare_guide(self, params: Mapping[str, Any], key: jax.Array) -> None:
        """Let an AutoGuide build its prototype from a concrete run.

        An AutoGuide inspects the model on its first call and keeps what it finds.
        If that first call happened under :func:`jax.eval_shape` or ``vmap`` (as the
        objectives trace the guide), it would keep tracers and break any later use,
        e.g. ``SVI.run``. ``SVI.init`` makes this call concretely; objectives and
        evaluators used outside SVI call this first.
        """
        guide = _unwrap(self.guide)
        if getattr(guide, "prototype_trace", False) is not None:
            return
        with handlers.block():
            seed(substitute(guide, data=dict(params)), key)(*self.args, **self.kwargs)


def _unwrap(fn: Callable) -> Callable:
    while isinstance(fn, Messenger) and fn.fn is not None:
        fn = fn.fn
    return fn


@dataclass(frozen=True)
class PlateStructure:
    r"""Static description of how the log weights factorize.

    Attributes:
        names: the independent plates, i.e. the plates that enclose every sample
            site of the model and of the guide, outermost first. The log weights
            have one entry per element of these plates.
        sizes: their (subsampled) sizes: the trailing shape of the log weights.
        full_sizes: their sizes before subsampling.
        joint_plates: ``{name: full size}`` of plates that enclose some sample
            sites but not all; the weights are joint along them.
        subsampled_joint_plates: the joint plates that are subsampled; for
            ``K > 1`` they have no unbiased bound (see :func:`check_subsampling`).
        nonreparam_sites: guide latent sites whose distribution has no
            reparameterized sampler (e.g. ``Bernoulli``).
        outside_sites: sample sites that lie outside some joint plate (for
            error messages).
        value_axes: ``(name, ndim, plate axes)`` of each guide latent value: where
            the independent plates lie in its shape.
        param_sites: every ``param`` site of model and guide.
        model_param_sites: the ``param`` sites of the model.
        guide_factor_sites: observed and ``numpyro.factor`` sites of the guide; they
            enter :math:`\log q` but are not draws.
        guide_only_subsampled: plates the guide subsamples although the model, called
            on its own with the same arguments, does not (e.g. an AutoGuide that fixed
            its plate's subsample size at first use).

    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    full_sizes: tuple[int, ...]
    joint_plates: tuple[tuple[str, int], ...]
    subsampled_joint_plates: tuple[str, ...]
    nonreparam_sites: tuple[str, ...]
    outside_sites: tuple[str, ...]
    value_axes: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    param_sites: tuple[str, ...] = ()
    model_param_sites: tuple[str, ...] = ()
    guide_factor_sites: tuple[str, ...] = ()
    guide_only_subsampled: tuple[tuple[str, int, int], ...] = ()

    @property
    def scale(self) -> float:
        r"""Subsampling factor :math:`\prod N/B` of the independent plates."""
        return math.prod(n / b for n, b in zip(self.full_sizes, self.sizes))


class LogWeights(NamedTuple):
    """Per-particle log densities, reduced to the independent plates.

    Every array has shape ``(K, *PlateStructure.sizes)``. The guide density is kept
    in three parts so each gradient estimator can take what it needs:

    - ``log_q_rep``: the guide terms differentiated along their path: sites with a
      reparameterized sampler and the guide's observed and ``factor`` sites, live
      parameters;
    - ``log_q_rep_path``: the reparameterized sites with the guide's parameters
      under ``stop_gradient`` (the sampled values keep their path to the
      parameters), as STL and DReG need; equal in value to ``log_q_rep`` up to
      rounding when the guide has no factor sites;
    - ``log_q_score``: sites without a reparameterized sampler (their values carry
      no gradient), live parameters: the score-function part.

    ``mutable_state`` holds the values of ``mutable`` sites with a leading particle
    axis (``None`` when there are none). ``nan_data`` is ``True`` at the plate
    elements where an observed value of the model is NaN (and not masked).
    """

    log_p: jax.Array
    log_q_rep: jax.Array
    log_q_rep_path: jax.Array | None
    log_q_score: jax.Array
    mutable_state: dict[str, Any] | None
    nan_data: jax.Array | None = None

    @property
    def log_q(self) -> jax.Array:
        """``log q`` of every guide site, live parameters."""
        return self.log_q_rep + self.log_q_score

    @property
    def log_w(self) -> jax.Array:
        """``log p - log q``; a NaN (a density evaluated outside its support) is
        mapped to ``-inf``, i.e. weight zero, except where the observed data is NaN,
        which stays NaN.
        """
        return mark_nan_data(nan_to_neginf(self.log_p - self.log_q), self.nan_data)


def mark_nan_data(log_w: jax.Array, nan_data: jax.Array | None) -> jax.Array:
    """Set the log weights of plate elements with NaN observed data to NaN.

    A NaN log weight is otherwise read as weight zero (a latent value outside its
    support); NaN *data* is an error of the input and must show in the result
    rather than pass as a bound of ``-inf``.
    """
    if nan_data is None:
        return log_w
    return jnp.where(nan_data, jnp.nan, log_w)


class GuideDraw(NamedTuple):
    """The guide's side of K particles, each array with a leading particle axis.

    ``values`` are the latent values substituted into the model, ``plates`` the
    subsample indices of the guide's plates, and the ``log_q_*`` parts are as in
    :class:`LogWeights`.
    """

    values: dict[str, jax.Array]
    plates: dict[str, jax.Array]
    log_q_rep: jax.Array
    log_q_rep_path: jax.Array | None
    log_q_score: jax.Array
    mutable_state: dict[str, Any]


class ModelOutput(NamedTuple):
    """What a model evaluation returns beside ``log p``: the mutable state and, per
    observed site with NaN data, a boolean over the independent plates.
    """

    mutable_state: dict[str, Any]
    nan_data: dict[str, jax.Array]


def _sample_sites(tr: Trace) -> dict[str, dict[str, Any]]:
    # Sites are kept even when their value is empty: a ``numpyro.factor`` site
    # has an empty value but a non-empty log density.
    return {name: site for name, site in tr.items() if site["type"] == "sample"}


def _is_latent(site: dict[str, Any]) -> bool:
    return not site["is_observed"] and not site["infer"].get("is_auxiliary", False)


def _check_sites(model_trace: Trace, guide_trace: Trace) -> None:
    """Raise a ValueError unless every model latent is drawn by the guide and
    every non-auxiliary guide draw is a latent of the model, with matching shapes.
    """
    model_sites = _sample_sites(model_trace)
    guide_sites = _sample_sites(guide_trace)
    guide_latents = {n for n, s in guide_sites.items() if _is_latent(s)}
    model_latents = {n for n, s in model_sites.items() if not s["is_observed"]}

    missing = sorted(model_latents - guide_latents)
    if missing:
        raise ValueError(
            f"Model latent site(s) {missing} are not sampled by the guide. IWELBO "
            "needs the guide to propose every latent variable of the model; add "
            "them to the guide (or use an AutoGuide)."
        )
    extra = sorted(guide_latents - set(model_sites))
    if extra:
        raise ValueError(
            f"Guide sample site(s) {extra} do not appear in the model. Rename them "
            "to match the model, or mark auxiliary variables with "
            "infer={'is_auxiliary': True}."
        )
    observed = sorted(n for n in guide_latents if model_sites[n]["is_observed"])
    if observed:
        raise ValueError(
            f"Site(s) {observed} are observed in the model but sampled in the guide; "
            "remove them from the guide."
        )
    for name in sorted(guide_latents):
        g_shape = jnp.shape(guide_sites[name]["value"])
        m_shape = tuple(model_sites[name]["fn"].shape())
        if g_shape != m_shape:
            raise ValueError(
                f"Model and guide shapes disagree at site '{name}': model "
                f"{m_shape} vs guide {g_shape}. Check the plates and event dims "
                "of that site in both."
            )


def _base_distribution(fn: Any) -> Any:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _is_delta(fn: Any) -> bool:
    return type(_base_distribution(fn)).__name__ == "Delta"


def _reaches(jaxpr: Any) -> list[bool]:
    """For each output of a jaxpr, whether it depends on any input (conservatively:
    every output of an equation depends on all of its inputs).
    """
    tainted = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(v in tainted for v in eqn.invars if not isinstance(v, Literal)):
            tainted.update(eqn.outvars)
    return [not isinstance(v, Literal) and v in tainted for v in jaxpr.outvars]


def point_mass_sites(
    program: Program, params: Mapping[str, Any], key: jax.Array
) -> tuple[str, ...]:
    """The guide's ``Delta`` draws whose value does not depend on its random key.

    A ``Delta`` site is often a deterministic transform of a random draw (the latent
    sites of ``AutoContinuous`` guides, with their log-Jacobian): it has a density
    through that draw. One whose value is the same whatever the key (``AutoDelta``,
    the training guide of ``AutoLaplaceApproximation``, a ``Delta`` of a parameter in
    a hand-written guide or inside an ``AutoGuideList``) is a point mass. Found by
    data flow in the guide's jaxpr, from the key to each value; no values are
    computed.
    """

    def delta_values(key: jax.Array) -> dict[str, jax.Array]:
        tr = program.trace_guide(params, key)
        return {
            n: jnp.asarray(site["value"])
            for n, site in _sample_sites(tr).items()
            if not site["is_observed"] and _is_delta(site["fn"])
        }

    closed, shapes = jax.make_jaxpr(delta_values, return_shape=True)(key)
    names = sorted(shapes)  # a dict's leaves come in sorted key order
    random = _reaches(closed.jaxpr)
    return tuple(sorted(n for n, r in zip(names, random) if not r))


def _plate_structure(model_trace: Trace, guide_trace: Trace) -> PlateStructure:
    sites = list(_sample_sites(model_trace).values()) + list(_sample_sites(guide_trace).values())

    def full_size(name: str, fallback: int) -> int:
        for tr in (model_trace, guide_trace):
            if name in tr and tr[name]["type"] == "plate":
                return int(tr[name]["args"][0])
        return fallback

    stacks = [{f.name: f for f in s["cond_indep_stack"]} for s in sites]
    common = set.intersection(*(set(st) for st in stacks)) if stacks else set()
    all_plates: dict[str, Any] = {}
    for st in stacks:
        all_plates.update(st)
    # Order the independent plates as the model's first site does (outermost first).
    ref = stacks[0] if stacks else {}
    names = tuple(sorted(common, key=lambda n: ref[n].dim))
    sizes = tuple(int(ref[n].size) for n in names)
    for st in stacks:
        for n, size in zip(names, sizes):
            if int(st[n].size) != size:
                raise ValueError(
                    f"Plate '{n}' has size {size} at one site and {st[n].size} at "
                    "another; model and guide must subsample it identically."
                )
    joint = tuple(
        sorted((n, full_size(n, int(f.size))) for n, f in all_plates.items() if n not in common)
    )
    subsampled_joint = tuple(
        n
        for n, f in sorted(all_plates.items())
        if n not in common and full_size(n, int(f.size)) != int(f.size)
    )
    outside = tuple(
        sorted({s["name"] for s, st in zip(sites, stacks) if set(all_plates) - set(st)})
    )
    guide_sites = _sample_sites(guide_trace)
    nonreparam = tuple(
        sorted(
            n for n, s in guide_sites.items() if not s["is_observed"] and not s["fn"].has_rsample
        )
    )
    value_axes = []
    for name, site in sorted(guide_sites.items()):
        if site["is_observed"] or not _is_latent(site):
            continue
        ndim = jnp.ndim(site["value"])
        batch_ndim = ndim - site["fn"].event_dim
        frames = {f.name: f for f in site["cond_indep_stack"]}
        value_axes.append((name, ndim, tuple(batch_ndim + frames[n].dim for n in names)))
    param_sites = tuple(
        sorted(
            {n for tr in (model_trace, guide_trace) for n, s in tr.items() if s["type"] == "param"}
        )
    )
    guide_only = []
    for name, site in sorted(guide_trace.items()):
        if site["type"] != "plate" or name not in model_trace:
            continue
        size, guide_sub = site["args"]
        model_sub = model_trace[name]["args"][1]
        if guide_sub is not None and guide_sub != size and model_sub in (None, size):
            guide_only.append((name, int(size), int(guide_sub)))
    return PlateStructure(
        names=names,
        sizes=sizes,
        full_sizes=tuple(full_size(n, b) for n, b in zip(names, sizes)),
        joint_plates=joint,
        subsampled_joint_plates=subsampled_joint,
        nonreparam_sites=nonreparam,
        outside_sites=outside,
        value_axes=tuple(value_axes),
        param_sites=param_sites,
        model_param_sites=tuple(sorted(n for n, s in model_trace.items() if s["type"] == "param")),
        guide_factor_sites=tuple(sorted(n for n, s in guide_sites.items() if s["is_observed"])),
        guide_only_subsampled=tuple(guide_only),
    )


def _to_plates(
    array: jax.Array, site: dict[str, Any], structure: PlateStructure, reduce: Callable
) -> jax.Array:
    """Reduce a site's batch-shaped ``array`` onto the independent plates with
    ``reduce`` (``jnp.sum``/``jnp.any``) over every other dimension.
    """
    frames = {f.name: f for f in site["cond_indep_stack"]}
    dims = [frames[name].dim for name in structure.names]
    ndim = max([jnp.ndim(array)] + [-d for d in dims])
    array = jnp.reshape(array, (1,) * (ndim - jnp.ndim(array)) + jnp.shape(array))
    keep = [ndim + d for d in dims]
    summed = tuple(ax for ax in range(ndim) if ax not in keep)
    array = reduce(array, axis=summed, keepdims=True)
    # Move the kept axes into the canonical order, then drop the reduced ones.
    array = jnp.moveaxis(array, keep, range(ndim - len(keep), ndim))
    array = jnp.reshape(array, jnp.shape(array)[ndim - len(keep) :])
    return jnp.broadcast_to(array, structure.sizes)


def _site_log_density(site: dict[str, Any], structure: PlateStructure) -> jax.Array:
    """``scale * log_prob`` of one site, summed onto the independent plates.

    The subsampling factor of the independent plates is removed from the scale
    (it is applied outside the logsumexp by the objective).
    """
    return _to_plates(_site_log_prob(site, structure), site, structure, jnp.sum)


def _site_log_prob(site: dict[str, Any], structure: PlateStructure) -> jax.Array:
    fn, value = site["fn"], site["value"]
    if site["intermediates"]:
        log_prob = fn.log_prob(value, site["intermediates"])
    else:
        log_prob = fn.log_prob(value)
    scale = site["scale"]
    if scale is not None:
        frames = {f.name for f in site["cond_indep_stack"]}
        plate_factor = 1.0
        for name, full, sub in zip(structure.names, structure.full_sizes, structure.sizes):
            if name in frames and full != sub:
                plate_factor *= full / sub
        log_prob = log_prob * (scale / plate_factor)
    return log_prob


def _nan_data(site: dict[str, Any], log_prob: jax.Array, structure: PlateStructure) -> jax.Array:
    """Plate elements where an observed value is NaN and not masked (its
    ``log_prob`` is NaN, or ``-inf`` under NumPyro's validation, there; a mask makes
    it 0).
    """
    value = jnp.asarray(site["value"])
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return jnp.zeros(structure.sizes, bool)
    event_dim = min(site["fn"].event_dim, value.ndim)
    nan = jnp.isnan(value)
    if event_dim:
        nan = jnp.any(nan, axis=tuple(range(-event_dim, 0)))
    bad = ~jnp.isfinite(log_prob) & nan
    return _to_plates(bad, site, structure, jnp.any)


def _mutable_values(tr: Trace) -> dict[str, Any]:
    return {n: s["value"] for n, s in tr.items() if s["type"] == "mutable"}


def _draw_data(tr: Trace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What the model sees of a guide trace: latent values, subsample indices of
    the guide's plates, and mutable state.
    """
    values = {n: s["value"] for n, s in _sample_sites(tr).items() if _is_latent(s)}
    plates = {n: s["value"] for n, s in tr.items() if s["type"] == "plate"}
    return values, plates, _mutable_values(tr)


def trace_pair(
    program: Program, params: Mapping[str, Any], rng_key: jax.Array
) -> tuple[Trace, Trace]:
    """Run the guide, then the model against its draw, for one particle.

    ``rng_key`` holds two keys, ``(model_key, guide_key)``. The model is run
    exactly as the objectives run it, so the checks and the plate structure found
    here describe the computation that follows.
    """
    model_key, guide_key = rng_key
    guide_trace = program.trace_guide(params, guide_key)
    values, plates, mutable = _draw_data(guide_trace)
    model_trace = program.trace_model(params, model_key, {**mutable, **plates, **values})
    return model_trace, guide_trace


class _MutableRecorder(Messenger):
    """Records ``mutable`` sites that were reached without a value."""

    def __init__(self, fn: Callable | None = None) -> None:
        self.empty: list[str] = []
        super().__init__(fn)

    def postprocess_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "mutable" and msg["value"] is None:
            self.empty.append(msg["name"])


def plan(program: Program, params: Mapping[str, Any], rng_key: jax.Array) -> PlateStructure:
    """Trace one particle abstractly (no values are computed) to check that model
    and guide match and to find the plate structure; raises ``ValueError`` on a
    mismatch.

    Abstract tracing matters: a concrete particle could be extreme (a flow's draw
    far in the tail) and trip NumPyro's eager argument validation, where under
    ``jit`` the same particle simply gets weight zero. As under SVI's ``jit``,
    data must be indexable by traced subsample indices (JAX arrays, or
    ``numpyro.subsample``).
    """
    found: list[PlateStructure] = []
    recorder = _MutableRecorder()

    def probe(key: jax.Array) -> None:
        with recorder:
            model_trace, guide_trace = trace_pair(program, params, key)
        _check_sites(model_trace, guide_trace)
        found.append(_plate_structure(model_trace, guide_trace))

    try:
        jax.eval_shape(probe, rng_key)
    except Exception as err:
        if recorder.empty:
            raise ValueError(
                f"The model or guide failed ({type(err).__name__}: {err}) after reaching "
                f"mutable site(s) {sorted(set(recorder.empty))} with no value. Their state "
                "is not part of `params`: pass it too, e.g. "
                "mutable_state=svi_result.state.mutable_state."
            ) from err
        raise
    return found[0]


ModelFn = Callable[[dict[str, jax.Array], dict[str, Any]], tuple[jax.Array, ModelOutput]]


def split_keys(rng_key: jax.Array, num_particles: int) -> tuple[jax.Array, jax.Array]:
    """``(plate_key, particle_keys)``: one key that seeds every subsampled plate (so
    all particles share a minibatch) and a ``(model, guide)`` key pair per particle,
    from one batched split.
    """
    plate_key, particle_key = random.split(rng_key)
    return plate_key, random.split(particle_key, (num_particles, 2))


def _guide_stage(
    program: Program,
    params: Mapping[str, Any],
    key: jax.Array,
    structure: PlateStructure,
    path: bool,
) -> GuideDraw:
    """One particle's guide draw: values for the model and the parts of ``log q``
    (the stopped-parameter part only when ``path``).
    """
    tr = program.trace_guide(params, key)
    zeros = jnp.zeros(structure.sizes)
    rep, score = zeros, zeros
    for site in _sample_sites(tr).values():
        if site["is_observed"] or site["fn"].has_rsample:
            rep = rep + _site_log_density(site, structure)
        else:
            score = score + _site_log_density(site, structure)
    values, plates, mutable = _draw_data(tr)
    rep_path = _path_log_density(program, params, key, tr, structure) if path else None
    return GuideDraw(values, plates, rep, rep_path, score, mutable)


def _path_log_density(
    program: Program,
    params: Mapping[str, Any],
    key: jax.Array,
    tr: Trace,
    structure: PlateStructure,
) -> jax.Array:
    """``log q`` of the reparameterized sites at ``stop_gradient(params)``, as a
    function of the sampled values (which keep their path to the parameters).

    The guide is run again with its parameters stopped and every sampled value
    (and minibatch) substituted, so each distribution is rebuilt from stopped
    parameters however it stores them (a flow's network, a closure), and each
    density is evaluated at the value: through a transform's inverse rather than
    through intermediates computed with live parameters. ``Delta`` sites that
    carry a transform of an auxiliary sample recompute value and log-Jacobian
    from the substituted sample, i.e. along its path.
    """
    data = {n: s["value"] for n, s in tr.items() if s["type"] in ("sample", "plate")}
    stopped = jax.tree.map(jax.lax.stop_gradient, dict(params))
    try:
        rerun = program.trace_guide({**stopped, **data}, key)
        total = jnp.zeros(structure.sizes)
        for site in _sample_sites(rerun).values():
            if not site["is_observed"] and site["fn"].has_rsample:
                total = total + _site_log_density({**site, "intermediates": []}, structure)
    except NotImplementedError as err:
        raise NotImplementedError(
            "gradient_estimator 'stl'/'dreg' evaluates log q(z) at stopped parameters as a "
            "function of z, through the inverse of each transform; a transform in this guide "
            f"has none ({err}). Use gradient_estimator='reparam' for this guide."
        ) from err
    return total


def _model_stage(
    program: Program,
    params: Mapping[str, Any],
    key: jax.Array,
    structure: PlateStructure,
    draw: tuple[dict, dict, dict],
) -> tuple[jax.Array, ModelOutput]:
    """One particle's ``log p(x, z)`` with z from the guide draw (its values,
    subsample indices and mutable state), its mutable state and where its observed
    data is NaN.
    """
    values, plates, mutable = draw
    data = {**mutable, **plates, **values}
    tr = program.trace_model(params, key, data)
    log_p = jnp.zeros(structure.sizes)
    nan_data = {}
    for name, site in _sample_sites(tr).items():
        log_prob = _site_log_prob(site, structure)
        log_p = log_p + _to_plates(log_prob, site, structure, jnp.sum)
        if site["is_observed"]:
            nan_data[name] = _nan_data(site, log_prob, structure)
    return log_p, ModelOutput({**mutable, **_mutable_values(tr)}, nan_data)


def draw_particles(
    program: Program,
    params: Mapping[str, Any],
    rng_key: jax.Array,
    num_particles: int,
    vectorize: VectorizeFn,
    *,
    path: bool = False,
) -> tuple[GuideDraw, ModelFn, PlateStructure]:
    """Draw K particles from the guide; return them with the model's log density
    as a pure function of (latent values, params).

    With ``path=True`` the draw also holds ``log_q_rep_path`` (``None``
    otherwise), which costs a second, gradient-free pass of the guide.

    ``model_fn(values, params) -> (log_p, ModelOutput)`` evaluates all K
    particles; it closes over the model keys, minibatch and data, so an objective
    can wrap it (e.g. in a ``custom_vjp``) without running user code twice.
    """
    plate_key, keys = split_keys(rng_key, num_particles)
    program.prepare_guide(params, plate_key)
    program = program.with_seeded_plates(plate_key)
    structure = plan(program, params, keys[0])
    draw, model_fn = draw_with_keys(program, params, keys, vectorize, structure, path=path)
    return draw, model_fn, structure


def draw_with_keys(
    program: Program,
    params: Mapping[str, Any],
    keys: jax.Array,
    vectorize: VectorizeFn,
    structure: PlateStructure,
    *,
    path: bool = False,
) -> tuple[GuideDraw, ModelFn]:
    """:func:`draw_particles` for given particle keys (shape ``(K, 2)``) and a known
    structure; the program's plates must already be seeded
    (:meth:`Program.with_seeded_plates`). Used to draw a long run of particles chunk
    by chunk.
    """

    def guide_stage(key: jax.Array) -> GuideDraw:
        return _guide_stage(program, params, key, structure, path)

    draw = _map_particles(vectorize, guide_stage, keys[:, 1])

    def model_fn(values: dict[str, jax.Array], model_params: dict[str, Any]):
        def one(inputs: tuple) -> tuple[jax.Array, ModelOutput]:
            key, one_draw = inputs
            return _model_stage(program, model_params, key, structure, one_draw)

        # Only what the model reads: the guide's log densities stay out of the map.
        inputs = (keys[:, 0], (values, draw.plates, draw.mutable_state))
        return _map_particles(vectorize, one, inputs)

    return draw, zero_weight_safe(model_fn, structure.value_axes, bool(structure.model_param_sites))


def _float_leaves(tree: Any) -> list[jax.Array]:
    return [g for g in jax.tree.leaves(tree) if jnp.issubdtype(g.dtype, jnp.inexact)]


def zero_weight_safe(model_fn: ModelFn, value_axes: tuple, shared_params: bool) -> ModelFn:
    r"""``model_fn`` whose gradient gets nothing from a particle of weight zero.

    A particle whose ``log p`` is ``-inf`` or NaN (a scale that underflowed to 0, a
    value outside the support), or so small that its normalized weight underflows,
    has weight zero, so the cotangent reaching its ``log p`` is 0; but the
    derivatives inside the model at that point can be infinite (or overflow), and
    :math:`0 \times \infty` makes the gradient NaN. Such particles are the dead
    ones, recognised by a cotangent of exactly 0 (which the bounds give every
    particle of weight zero; :func:`~numpyro_iwae.estimators.nan_to_neginf` passes it
    through). The backward pass repairs this in two ways:

    - the cotangent of each particle's own latent values is set to zero where the
      particle is dead (it is separate per particle and plate element, so nothing
      else is touched): this costs one ``where``;
    - the cotangent of parameters shared by all particles (``shared_params``: the
      model has ``param`` or ``module`` sites) is a sum over particles, which one
      NaN spoils. Only when it comes out non-finite while some particle is dead is
      the model's vector-Jacobian product evaluated again, with each dead particle
      moved onto the best particle of its plate element (a point where every
      derivative is finite; the zero cotangent makes the choice irrelevant).
      Without ``shared_params`` this second path is not compiled at all.
    """
    axes = {name: (ndim, ax) for name, ndim, ax in value_axes}

    def wrapped(values: dict[str, jax.Array], params: Any) -> tuple[jax.Array, ModelOutput]:
        converted, consts = jax.closure_convert(model_fn, values, params)

        @jax.custom_vjp
        def fn(values, params, *consts):
            return converted(values, params, *consts)

        def fwd(values, params, *consts):
            out, vjp = jax.vjp(converted, values, params, *consts)
            # The inputs are kept only for the second backward pass, if there is one.
            return out, (vjp, (out[0], values, params, consts) if shared_params else None)

        def zero_dead(g_values: dict, dead: jax.Array) -> dict:
            out = {}
            for name, g in g_values.items():
                if g.dtype == jax.dtypes.float0:  # integer values: no cotangent
                    out[name] = g
                else:
                    ndim, ax = axes[name]
                    out[name] = jnp.where(plate_layout(dead, ndim, ax), 0.0, g).astype(g.dtype)
            return out

        def bwd(res, cotangent):
            vjp, inputs = res
            # Dead: a cotangent of exactly 0. The bounds give that to every particle
            # of weight zero: log p of -inf or NaN (nan_to_neginf passes cotangents
            # through), or finite but so small that its normalized weight underflows.
            dead = cotangent[0] == 0
            g_values, *g_rest = vjp(cotangent)
            grads = (zero_dead(g_values, dead), *g_rest)
            if not shared_params:
                return grads

            log_p, values, params, consts = inputs

            def moved(_: None) -> tuple:
                # The dead particles' cotangent is 0, so at their new, finite points
                # they contribute exactly 0 to every cotangent.
                best = jnp.argmax(jnp.where(dead, -jnp.inf, log_p), axis=0)
                safe = {}
                for name, value in values.items():
                    ndim, ax = axes[name]
                    chosen = jnp.take_along_axis(value, plate_layout(best[None], ndim, ax), axis=0)
                    safe[name] = jnp.where(plate_layout(dead, ndim, ax), chosen, value)
                _, safe_vjp = jax.vjp(converted, safe, params, *consts)
                return safe_vjp(cotangent)

            finite = [jnp.all(jnp.isfinite(g)) for g in _float_leaves(g_rest)]
            redo = jnp.any(dead) & ~jnp.all(jnp.array(finite or [True]))
            return jax.lax.cond(redo, moved, lambda _: grads, None)

        fn.defvjp(fwd, bwd)
        return fn(values, params, *consts)

    return wrapped


def _map_particles(vectorize: VectorizeFn, fn: Callable, xs: Any) -> Any:
    if jax.tree.leaves(xs)[0].shape[0] == 1:  # no particle map: avoids batch-of-one work
        out = fn(jax.tree.map(lambda v: v[0], xs))
        return jax.tree.map(lambda v: jnp.expand_dims(jnp.asarray(v), 0), out)
    return vectorize(fn, xs)


def any_nan_data(output: ModelOutput) -> jax.Array | None:
    """Plate elements with NaN observed data at any site (``None`` if the model
    observes nothing), from a K-particle :class:`ModelOutput`.
    """
    if not output.nan_data:
        return None
    return jnp.any(jnp.stack([v[0] for v in output.nan_data.values()]), axis=0)


def log_weights(
    program: Program,
    params: Mapping[str, Any],
    rng_key: jax.Array,
    num_particles: int,
    vectorize: VectorizeFn,
) -> tuple[LogWeights, PlateStructure]:
    """Draw ``num_particles`` particles and return their log densities.

    Every particle sees the same subsample of every subsampled plate (the plates
    are seeded once, outside the particle map); latent values are drawn
    independently per particle.

    Args:
        program: model, guide and their arguments.
        params: values for ``param`` (and ``mutable``) sites, constrained.
        rng_key: a JAX PRNG key.
        num_particles: K, the number of particles.
        vectorize: maps a function over the leading axis of a pytree
            (``jax.vmap``-like or ``jax.lax.map``-like).

    Returns:
        ``(LogWeights, PlateStructure)``.

    """
    draw, model_fn, structure = draw_particles(
        program, params, rng_key, num_particles, vectorize, path=True
    )
    log_p, output = model_fn(draw.values, params)
    weights = LogWeights(
        log_p,
        draw.log_q_rep,
        draw.log_q_rep_path,
        draw.log_q_score,
        output.mutable_state or None,
        any_nan_data(output),
    )
    return weights, structure


_LIBRARY_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (sys.modules["jax"], sys.modules["numpyro"], sys.modules[__name__.split(".")[0]])
)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside
    this package, NumPyro and JAX: the user's line.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def check_subsampling(structure: PlateStructure, num_particles: int) -> None:
    """Raise if the bound would be biased by subsampling; warn if it is joint
    over a large plate.

    A subsampled plate that does not enclose every sample site (e.g. a data plate
    next to a global latent) cannot be scaled outside the ``logsumexp``, and
    scaling inside it biases the bound for ``K > 1``. With ``K = 1`` the bound
    is the ELBO, which is linear in the log weights, so scaling is unbiased.
    """
    if structure.subsampled_joint_plates and num_particles > 1:
        raise ValueError(
            f"Plate(s) {list(structure.subsampled_joint_plates)} are subsampled but do "
            f"not enclose every sample site (sites outside: "
            f"{list(structure.outside_sites)}). With global latent variables the "
            "importance weights are joint over all data, and no unbiased "
            "minibatch estimate of the K-particle bound exists (rescaling inside "
            "the logsumexp is biased). Use num_particles=1 (the ELBO, e.g. "
            "Trace_ELBO), or move the global latents into the guide's point "
            "estimates (numpyro.param)."
        )
    large = [(n, size) for n, size in structure.joint_plates if size >= LARGE_PLATE_SIZE]
    if large and num_particles > 1:
        warnings.warn(
            f"The importance weights are joint over plate(s) {large} because "
            f"site(s) {list(structure.outside_sites)} lie outside them: one weight per "
            "particle for the whole data. The bound is valid, but with many datapoints "
            "one particle takes nearly all the weight, the bound is barely above the "
            "ELBO and the guide's gradient is noisier than the ELBO's: such fits can end "
            "worse than Trace_ELBO's. For a global latent next to a large data plate "
            "prefer Trace_ELBO; IWELBO pays off when every latent is local to a plate "
            "element.",
            JointWeightsWarning,
            stacklevel=caller_stacklevel(),
        )
