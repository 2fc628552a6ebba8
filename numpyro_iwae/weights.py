r"""Log importance weights of a NumPyro model/guide pair, one row per particle.

This module is the one place that runs user code. Everything downstream
(estimators, objectives, evaluators) receives plain arrays plus a static
:class:`PlateStructure` describing how those arrays factorize.

For particle :math:`k` the guide is run to draw :math:`z_k \sim q_\phi(z \mid x)`,
the model is run with its values substituted, and every sample site's ``log_prob`` is
reduced to the *independent plates*: the plates that enclose every sample site of
the model and the guide (observed sites included). Along those plates the joint
density factorizes, so the importance-weighted bound can be formed separately per
plate element (Burda et al., 2016, applied per datapoint):

.. math::

    \log w_{k,n} = \sum_{s \in \text{model}} c_s \log p_s(\cdot)_n
                  - \sum_{s \in \text{guide}} c_s \log q_s(\cdot)_n ,

where :math:`n` indexes the independent plate elements, every other dimension of
a site's ``log_prob`` is summed, and :math:`c_s` is the site's scale *without*
the subsampling factor :math:`N/B` of the independent plates. That factor is
returned separately (:attr:`PlateStructure.scale`) because it must multiply the
bound *outside* the ``logsumexp``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import math
from typing import Any, NamedTuple
import warnings

import jax
from jax import random
import jax.numpy as jnp
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import _without_rsample_stop_gradient

from numpyro_iwae.estimators import nan_to_neginf

__all__ = [
    "GuideDraw",
    "JointWeightsWarning",
    "LARGE_PLATE_SIZE",
    "LogWeights",
    "PlateStructure",
    "check_subsampling",
    "draw_particles",
    "draw_with_keys",
    "log_weights",
    "plan",
    "seed_plates",
    "split_keys",
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


@dataclass(frozen=True)
class PlateStructure:
    """Static description of how the log weights factorize.

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

    @property
    def scale(self) -> float:
        r"""Subsampling factor :math:`\prod N/B` of the independent plates."""
        return math.prod(n / b for n, b in zip(self.full_sizes, self.sizes))


class LogWeights(NamedTuple):
    """Per-particle log densities, reduced to the independent plates.

    Every array has shape ``(K, *PlateStructure.sizes)``. The guide density is kept
    in three parts so each gradient estimator can take what it needs:

    - ``log_q_rep``: guide sites with a reparameterized sampler, live parameters;
    - ``log_q_rep_path``: the same sites with the guide's parameters under
      ``stop_gradient`` (the sampled values keep their path to the parameters), as
      STL and DReG need; equal in value to ``log_q_rep`` up to rounding;
    - ``log_q_score``: sites without a reparameterized sampler (their values carry
      no gradient), live parameters: the score-function part.

    ``mutable_state`` holds the values of ``mutable`` sites with a leading particle
    axis (``None`` when there are none).
    """

    log_p: jax.Array
    log_q_rep: jax.Array
    log_q_rep_path: jax.Array | None
    log_q_score: jax.Array
    mutable_state: dict[str, Any] | None

    @property
    def log_q(self) -> jax.Array:
        """``log q`` of every guide site, live parameters."""
        return self.log_q_rep + self.log_q_score

    @property
    def log_w(self) -> jax.Array:
        """``log p - log q``; a NaN (a density evaluated outside its support) is
        mapped to ``-inf``, i.e. weight zero.
        """
        return nan_to_neginf(self.log_p - self.log_q)


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


def _sample_sites(tr: Trace) -> dict[str, dict[str, Any]]:
    # Sites are kept even when their value is empty: a ``numpyro.factor`` site
    # has an empty value but a non-empty log density.
    return {name: site for name, site in tr.items() if site["type"] == "sample"}


def _is_latent(site: dict[str, Any]) -> bool:
    return not site["is_observed"] and not site["infer"].get("is_auxiliary", False)


def _check_sites(model_trace: Trace, guide_trace: Trace) -> None:
    """Raise a ValueError unless every model latent is drawn by the guide and
    every non-auxiliary guide site is a latent of the model, with matching shapes.
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


def _plate_structure(model_trace: Trace, guide_trace: Trace) -> PlateStructure:
    sites = list(_sample_sites(model_trace).values()) + [
        s for s in _sample_sites(guide_trace).values() if not s["is_observed"]
    ]
    if not sites:
        raise ValueError("The model and guide have no sample sites.")

    def full_size(name: str, fallback: int) -> int:
        for tr in (model_trace, guide_trace):
            if name in tr and tr[name]["type"] == "plate":
                return int(tr[name]["args"][0])
        return fallback

    stacks = [{f.name: f for f in s["cond_indep_stack"]} for s in sites]
    common = set.intersection(*(set(st) for st in stacks))
    all_plates: dict[str, Any] = {}
    for st in stacks:
        all_plates.update(st)
    # Order the independent plates as the model's first site does (outermost first).
    ref = stacks[0]
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
    nonreparam = tuple(
        sorted(
            n
            for n, s in _sample_sites(guide_trace).items()
            if not s["is_observed"] and not s["fn"].has_rsample
        )
    )
    value_axes = []
    for name, site in sorted(_sample_sites(guide_trace).items()):
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
    return PlateStructure(
        param_sites=param_sites,
        value_axes=tuple(value_axes),
        names=names,
        sizes=sizes,
        full_sizes=tuple(full_size(n, b) for n, b in zip(names, sizes)),
        joint_plates=joint,
        subsampled_joint_plates=subsampled_joint,
        nonreparam_sites=nonreparam,
        outside_sites=outside,
    )


def _site_log_density(site: dict[str, Any], structure: PlateStructure) -> jax.Array:
    """``scale * log_prob`` of one site, summed onto the independent plates.

    The subsampling factor of the independent plates is removed from the scale
    (it is applied outside the logsumexp by the objective).
    """
    fn, value = site["fn"], site["value"]
    if site["intermediates"]:
        log_prob = fn.log_prob(value, site["intermediates"])
    else:
        log_prob = fn.log_prob(value)
    frames = {f.name: f for f in site["cond_indep_stack"]}
    scale = site["scale"]
    if scale is not None:
        plate_factor = 1.0
        for name, full, sub in zip(structure.names, structure.full_sizes, structure.sizes):
            if name in frames and full != sub:
                plate_factor *= full / sub
        log_prob = log_prob * (scale / plate_factor)

    dims = [frames[name].dim for name in structure.names]
    ndim = max([jnp.ndim(log_prob)] + [-d for d in dims])
    log_prob = jnp.reshape(log_prob, (1,) * (ndim - jnp.ndim(log_prob)) + jnp.shape(log_prob))
    keep = [ndim + d for d in dims]
    summed = tuple(ax for ax in range(ndim) if ax not in keep)
    log_prob = jnp.sum(log_prob, axis=summed, keepdims=True)
    # Move the kept axes into the canonical order, then drop the summed ones.
    log_prob = jnp.moveaxis(log_prob, keep, range(ndim - len(keep), ndim))
    log_prob = jnp.reshape(log_prob, jnp.shape(log_prob)[ndim - len(keep) :])
    return jnp.broadcast_to(log_prob, structure.sizes)


def _mutable_values(tr: Trace) -> dict[str, Any]:
    return {n: s["value"] for n, s in tr.items() if s["type"] == "mutable"}


def _path_log_density(
    guide: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
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
    stopped = jax.tree.map(jax.lax.stop_gradient, params)
    try:
        rerun = trace(substitute(seed(guide, key), data={**stopped, **data})).get_trace(
            *args, **kwargs
        )
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


def trace_pair(
    model: Callable,
    guide: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
    rng_key: jax.Array,
) -> tuple[Trace, Trace]:
    """Run the guide, then the model against its draw, for one particle.

    ``rng_key`` holds two keys, ``(model_key, guide_key)``. The model is run
    exactly as the objectives run it (:func:`_trace_model`), so the checks and the
    plate structure found here describe the computation that follows.
    """
    model_key, guide_key = rng_key
    guide_trace = _trace_guide(guide, params, args, kwargs, guide_key)
    values, plates, mutable = _draw_data(guide_trace)
    model_trace = _trace_model(model, params, args, kwargs, model_key, mutable, plates, values)
    return model_trace, guide_trace


def _draw_data(tr: Trace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What the model sees of a guide trace: latent values, subsample indices of
    the guide's plates, and mutable state.
    """
    values = {n: s["value"] for n, s in _sample_sites(tr).items() if _is_latent(s)}
    plates = {n: s["value"] for n, s in tr.items() if s["type"] == "plate"}
    return values, plates, _mutable_values(tr)


def _trace_model(
    model: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
    key: jax.Array,
    mutable: dict[str, Any],
    plates: dict[str, Any],
    values: dict[str, Any],
) -> Trace:
    """Trace the model with the guide's latent values, minibatch and mutable state
    substituted (parameters first, so a guide value wins a name clash).
    """
    data = {**params, **mutable, **plates, **values}
    return trace(substitute(seed(model, key), data=data)).get_trace(*args, **kwargs)


def _trace_guide(guide: Callable, params: dict, args: tuple, kwargs: dict, key) -> Trace:
    with _without_rsample_stop_gradient():
        return trace(substitute(seed(guide, key), data=params)).get_trace(*args, **kwargs)


def _guide_stage(
    guide: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
    key: jax.Array,
    structure: PlateStructure,
    path: bool,
) -> GuideDraw:
    """One particle's guide draw: values for the model and the parts of ``log q``
    (the stopped-parameter part only when ``path``).
    """
    tr = _trace_guide(guide, params, args, kwargs, key)
    zeros = jnp.zeros(structure.sizes)
    rep, score = zeros, zeros
    for site in _sample_sites(tr).values():
        if site["is_observed"]:
            continue
        if site["fn"].has_rsample:
            rep = rep + _site_log_density(site, structure)
        else:
            score = score + _site_log_density(site, structure)
    values, plates, mutable = _draw_data(tr)
    rep_path = _path_log_density(guide, params, args, kwargs, key, tr, structure) if path else None
    return GuideDraw(values, plates, rep, rep_path, score, mutable)


def _model_stage(
    model: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
    key: jax.Array,
    structure: PlateStructure,
    draw: GuideDraw,
) -> tuple[jax.Array, dict[str, Any]]:
    """One particle's ``log p(x, z)`` with z from the guide draw, and mutable state."""
    tr = _trace_model(
        model, params, args, kwargs, key, draw.mutable_state, draw.plates, draw.values
    )
    log_p = jnp.zeros(structure.sizes)
    for site in _sample_sites(tr).values():
        log_p = log_p + _site_log_density(site, structure)
    return log_p, {**draw.mutable_state, **_mutable_values(tr)}


def plan(
    model: Callable,
    guide: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
    rng_key: jax.Array,
) -> PlateStructure:
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

    def probe(key: jax.Array) -> None:
        model_trace, guide_trace = trace_pair(model, guide, params, args, kwargs, key)
        _check_sites(model_trace, guide_trace)
        found.append(_plate_structure(model_trace, guide_trace))

    jax.eval_shape(probe, rng_key)
    return found[0]


ModelFn = Callable[[dict[str, jax.Array], dict[str, Any]], tuple[jax.Array, Any]]


def split_keys(rng_key: jax.Array, num_particles: int) -> tuple[jax.Array, jax.Array]:
    """``(plate_key, particle_keys)``: one key that seeds every subsampled plate (so
    all particles share a minibatch) and a ``(model, guide)`` key pair per particle,
    from one batched split.
    """
    plate_key, particle_key = random.split(rng_key)
    return plate_key, random.split(particle_key, (num_particles, 2))


def seed_plates(
    model: Callable, guide: Callable, plate_key: jax.Array
) -> tuple[Callable, Callable]:
    """Model and guide whose plates (only) are seeded with ``plate_key``."""
    hide = ["sample", "prng_key", "control_flow"]
    return seed(model, plate_key, hide_types=hide), seed(guide, plate_key, hide_types=hide)


def draw_particles(
    model: Callable,
    guide: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
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

    ``model_fn(values, params) -> (log_p, mutable_state)`` evaluates all K
    particles; it closes over the model keys, minibatch and data, so an objective
    can wrap it (e.g. in a ``custom_vjp``) without running user code twice.
    """
    plate_key, keys = split_keys(rng_key, num_particles)
    model, guide = seed_plates(model, guide, plate_key)
    structure = plan(model, guide, params, args, kwargs, keys[0])
    draw, model_fn = draw_with_keys(
        model, guide, params, args, kwargs, keys, vectorize, structure, path=path
    )
    return draw, model_fn, structure


def draw_with_keys(
    model: Callable,
    guide: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
    keys: jax.Array,
    vectorize: VectorizeFn,
    structure: PlateStructure,
    *,
    path: bool = False,
) -> tuple[GuideDraw, ModelFn]:
    """:func:`draw_particles` for given particle keys (shape ``(K, 2)``) and a known
    structure; ``model`` and ``guide`` must already have their plates seeded
    (:func:`seed_plates`). Used to draw a long run of particles chunk by chunk.
    """

    def guide_stage(key: jax.Array) -> GuideDraw:
        return _guide_stage(guide, params, args, kwargs, key, structure, path)

    draw = _map_particles(vectorize, guide_stage, keys[:, 1])

    def model_fn(values: dict[str, jax.Array], model_params: dict[str, Any]):
        def one(inputs: tuple) -> tuple[jax.Array, dict[str, Any]]:
            key, one_draw = inputs
            return _model_stage(model, model_params, args, kwargs, key, structure, one_draw)

        return _map_particles(vectorize, one, (keys[:, 0], draw._replace(values=values)))

    return draw, model_fn


def _map_particles(vectorize: VectorizeFn, fn: Callable, xs: Any) -> Any:
    if jax.tree.leaves(xs)[0].shape[0] == 1:  # no particle map: avoids batch-of-one work
        return jax.tree.map(lambda v: v[None], fn(jax.tree.map(lambda v: v[0], xs)))
    return vectorize(fn, xs)


def log_weights(
    model: Callable,
    guide: Callable,
    params: dict[str, Any],
    args: tuple,
    kwargs: dict[str, Any],
    rng_key: jax.Array,
    num_particles: int,
    vectorize: VectorizeFn,
) -> tuple[LogWeights, PlateStructure]:
    """Draw ``num_particles`` particles and return their log densities.

    Every particle sees the same subsample of every subsampled plate (the plates
    are seeded once, outside the particle map); latent values are drawn
    independently per particle.

    Args:
        model, guide: NumPyro callables.
        params: values for ``param`` (and ``mutable``) sites, constrained.
        args, kwargs: passed to both model and guide.
        rng_key: a JAX PRNG key.
        num_particles: K, the number of particles.
        vectorize: maps a function over the leading axis of a pytree
            (``jax.vmap``-like or ``jax.lax.map``-like).

    Returns:
        ``(LogWeights, PlateStructure)``.

    """
    draw, model_fn, structure = draw_particles(
        model, guide, params, args, kwargs, rng_key, num_particles, vectorize, path=True
    )
    log_p, mutable = model_fn(draw.values, params)
    weights = LogWeights(
        log_p, draw.log_q_rep, draw.log_q_rep_path, draw.log_q_score, mutable or None
    )
    return weights, structure


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
            "the logsumexp is biased). Use the full data (no subsample_size), or "
            "num_particles=1 (the ELBO), or move the global latents into the guide's "
            "point estimates (numpyro.param)."
        )
    large = [(n, size) for n, size in structure.joint_plates if size >= LARGE_PLATE_SIZE]
    if large and num_particles > 1:
        warnings.warn(
            f"The importance weights are joint over plate(s) {large} because "
            f"site(s) {list(structure.outside_sites)} lie outside them. The bound is "
            "valid but approaches the ELBO as the plate grows; the per-datapoint "
            "bound needs every sample site inside the data plate.",
            JointWeightsWarning,
            stacklevel=3,
        )
