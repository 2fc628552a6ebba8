"""How a model/guide pair's log densities factorize over its plates.

Given one traced particle (a model trace and a guide trace), this module finds
which plates the importance weights are formed per element of, and reduces each
site's ``log_prob`` onto them. Nothing here runs user code.

**Independent plates** enclose every sample site of the model and of the guide.
The joint density factorizes along them, so the bound is formed per element.

**Local plates** (``weighting="local"``) are the outermost other plates that hold
latent draws whose densities stay inside them. Sample sites are put in *groups*:
group 0 holds the *global* sites (outside every local plate, drawn once and shared
by all particles), group ``i`` the sites inside the ``i``-th local plate (drawn per
particle). Log densities are then a tuple with one array per group: group 0 of
shape ``(K, *sizes)``, group ``i`` of shape ``(K, *sizes, local size i)``. Under
``weighting="joint"`` there is one group, the whole model, weighted over the
particles (Burda et al., 2016).

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "WEIGHTINGS",
    "Trace",
    "sample_sites",
    "is_latent",
    "enumerated_sites",
    "plate_nesting",
    "PlateStructure",
    "plate_structure",
    "to_plates",
    "site_log_prob",
    "site_log_density",
    "accumulate",
]


#: The accepted values of ``weighting``: how particles are weighted together.
WEIGHTINGS = ("auto", "joint", "local")


Trace = dict[str, dict[str, Any]]


def sample_sites(tr: Trace) -> dict[str, dict[str, Any]]:
    """The ``sample`` sites of a trace, by name (``numpyro.factor`` sites included:
    their value is empty but their log density is not).
    """
    return {name: site for name, site in tr.items() if site["type"] == "sample"}


def is_latent(site: dict[str, Any]) -> bool:
    """A draw of the guide that the model sees: not observed, not auxiliary."""
    return not site["is_observed"] and not site["infer"].get("is_auxiliary", False)


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
            sites but not all; under joint weighting the weights are joint along them.
        subsampled_joint_plates: the joint plates that are subsampled; for
            ``K > 1`` joint weighting has no unbiased bound for them.
        nonreparam_sites: guide latent sites whose distribution has no
            reparameterized sampler (e.g. ``Bernoulli``).
        outside_sites: sample sites that lie outside some joint plate (for
            error messages).
        value_axes: ``(name, ndim, plate axes)`` of each per-particle latent value:
            where its group's plates lie in its shape.
        param_sites: every ``param`` site of model and guide.
        model_param_sites: the ``param`` sites of the model.
        guide_factor_sites: observed and ``numpyro.factor`` sites of the guide; they
            enter :math:`\log q` but are not draws.
        guide_only_subsampled: plates the guide subsamples although the model, called
            on its own with the same arguments, does not (e.g. an AutoGuide that fixed
            its plate's subsample size at first use).
        weighting: ``"joint"`` or ``"local"``, as resolved for this model.
        local_plates: ``(name, size, full size)`` of each local plate (local
            weighting only).
        groups: ``(site name, group)`` for every sample site of model and guide:
            0 for the global group, ``i`` for the ``i``-th local plate. Empty under
            joint weighting (everything is in group 0).
        global_sites: the guide's draws in group 0 under local weighting: drawn
            once per step and shared by every particle.
        latent_plates: the joint plates that hold latent (not observed) sample
            sites of model or guide: where local latents live. Empty for a model
            whose only latents are global (an ordinary regression).
        unweighted: under local weighting, no latent is drawn per particle (the
            global sites are all there is, or the local draws do not depend on the
            particle): the bound is the ELBO for every K.
        scaled_guide_sites: guide draws whose log density is scaled by more than
            the subsampling of their plates (``handlers.scale``, as in KL annealing
            or tempering), or by a scale not known while tracing.
        enumerated: model latent sites marked for parallel enumeration that the
            guide does not draw: summed out inside the weight
            (:mod:`~numpyro_iwae.core.enumeration`).
        enum_nesting: the batch dimensions the plates take; enumeration allocates
            its dimensions left of them.

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
    weighting: str = "joint"
    local_plates: tuple[tuple[str, int, int], ...] = ()
    groups: tuple[tuple[str, int], ...] = ()
    global_sites: tuple[str, ...] = ()
    latent_plates: tuple[str, ...] = ()
    unweighted: bool = False
    scaled_guide_sites: tuple[str, ...] = ()
    enumerated: tuple[str, ...] = ()
    enum_nesting: int = 0

    @property
    def scale(self) -> float:
        r"""Subsampling factor :math:`\prod N/B` of the independent plates."""
        return math.prod(n / b for n, b in zip(self.full_sizes, self.sizes))

    @property
    def num_groups(self) -> int:
        """1 under joint weighting, 1 + the number of local plates under local."""
        return 1 + len(self.local_plates)

    def group_of(self, name: str) -> int:
        """The group of a sample site (0 for global sites and under joint weighting)."""
        return dict(self.groups).get(name, 0)

    def group_plates(self, group: int) -> tuple[str, ...]:
        """The plates a group's log densities are reduced onto, outermost first."""
        return self.names + ((self.local_plates[group - 1][0],) if group else ())

    def group_shape(self, group: int) -> tuple[int, ...]:
        """The shape (without the particle axis) of a group's log densities."""
        return self.sizes + ((self.local_plates[group - 1][1],) if group else ())

    def local_scale(self, group: int) -> float:
        """Subsampling factor N/B of a local plate (1 for group 0)."""
        if not group:
            return 1.0
        _, size, full = self.local_plates[group - 1]
        return full / size

    def group_sites(self, group: int, names: tuple[str, ...]) -> tuple[str, ...]:
        """Those of ``names`` that are in ``group``."""
        return tuple(n for n in names if self.group_of(n) == group)

    @property
    def value_groups(self) -> tuple[tuple[str, int], ...]:
        """``(name, group)`` of each per-particle latent value."""
        return tuple((name, self.group_of(name)) for name, _, _ in self.value_axes)

    def zeros(self) -> tuple[jax.Array, ...]:
        """One zero array per group, to accumulate log densities into."""
        return tuple(jnp.zeros(self.group_shape(g)) for g in range(self.num_groups))


def enumerated_sites(model_trace: Trace, guide_trace: Trace) -> tuple[str, ...]:
    """Model latent sites marked for parallel enumeration that the guide does not draw."""
    guide_sites = sample_sites(guide_trace)
    return tuple(
        sorted(
            name
            for name, site in sample_sites(model_trace).items()
            if not site["is_observed"]
            and site["infer"].get("enumerate") == "parallel"
            and name not in guide_sites
        )
    )


def plate_nesting(*traces: Trace) -> int:
    """How many batch dimensions the plates of ``traces`` take (NumPyro's
    ``max_plate_nesting``): enumeration allocates its dimensions left of them.
    """
    dims = [
        -frame.dim
        for tr in traces
        for site in tr.values()
        for frame in site.get("cond_indep_stack", ())
        if frame.dim is not None
    ]
    return max(dims, default=0)


def _local_plates(
    stacks: list[dict[str, Any]], draws: list[bool], common: set[str], demoted: set[str]
) -> tuple[list[str], set[str]]:
    """The outermost plates holding draws, and plates that must be demoted because
    a site lies in two of them (crossed plates: no per-element split exists).
    """
    extra = [set(st) - common for st in stacks]
    candidates = {p for e, draw in zip(extra, draws) if draw for p in e} - demoted

    def encloses(q: str, p: str) -> bool:  # every site in p is also in q
        return all(q in e for e in extra if p in e)

    def dominated(p: str) -> bool:
        return any(q != p and encloses(q, p) and (not encloses(p, q) or q < p) for q in candidates)

    local = sorted(p for p in candidates if not dominated(p))
    crossed = set()
    for e in extra:
        inside = [p for p in local if p in e]
        if len(inside) > 1:
            crossed.update(inside)
    return local, crossed


def plate_structure(
    model_trace: Trace,
    guide_trace: Trace,
    weighting: str = "joint",
    demoted: frozenset = frozenset(),
) -> PlateStructure:
    """Find the plate structure of one traced particle.

    :param model_trace: the model's trace, run against the guide's draw.
    :param guide_trace: the guide's trace.
    :param weighting: ``"joint"`` or ``"local"``.
    :param demoted: plates never to treat as local (their sites are global).

    :raises ValueError: model and guide subsample a plate differently, or a draw lies in
        a local plate in the model but not in the guide.

    """
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    named = [(n, s) for n, s in model_sites.items()] + [(n, s) for n, s in guide_sites.items()]
    sites = [s for _, s in named]

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
    for n, size in zip(names, sizes):
        _check_one_size(n, size, stacks)
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
    # Enumerated sites are summed out, not drawn: like data, they hold no latent draw.
    enumerated = enumerated_sites(model_trace, guide_trace)
    latent_plates = tuple(
        sorted(
            {
                p
                for s, st in zip(sites, stacks)
                if not s["is_observed"] and s["name"] not in enumerated
                for p in st
            }
            - common
        )
    )

    local: list[str] = []
    groups: dict[str, int] = {}
    if weighting == "local" and joint:
        local, groups = _split_local(named, stacks, common, set(demoted))
    local_plates = []
    for p in local:
        size = int(all_plates[p].size)
        _check_one_size(p, size, [st for st in stacks if p in st])
        local_plates.append((p, size, full_size(p, size)))

    nonreparam = tuple(
        sorted(
            n for n, s in guide_sites.items() if not s["is_observed"] and not s["fn"].has_rsample
        )
    )
    global_sites = tuple(
        sorted(n for n, s in guide_sites.items() if not s["is_observed"] and groups.get(n) == 0)
    )
    value_axes = _value_axes(guide_sites, names, local, groups, global_sites)
    param_sites = tuple(
        sorted(
            {n for tr in (model_trace, guide_trace) for n, s in tr.items() if s["type"] == "param"}
        )
    )
    return PlateStructure(
        names=names,
        sizes=sizes,
        full_sizes=tuple(full_size(n, b) for n, b in zip(names, sizes)),
        joint_plates=joint,
        subsampled_joint_plates=subsampled_joint,
        nonreparam_sites=nonreparam,
        outside_sites=outside,
        value_axes=value_axes,
        param_sites=param_sites,
        model_param_sites=tuple(sorted(n for n, s in model_trace.items() if s["type"] == "param")),
        guide_factor_sites=tuple(sorted(n for n, s in guide_sites.items() if s["is_observed"])),
        guide_only_subsampled=_guide_only_subsampled(model_trace, guide_trace),
        weighting="local" if groups else "joint",
        local_plates=tuple(local_plates),
        groups=tuple(sorted(groups.items())),
        global_sites=global_sites,
        latent_plates=latent_plates,
        scaled_guide_sites=tuple(
            n
            for n, site in sorted(guide_sites.items())
            if is_latent(site) and _scaled(site, full_size)
        ),
        enumerated=enumerated,
        enum_nesting=plate_nesting(model_trace, guide_trace),
    )


def _check_one_size(name: str, size: int, stacks: list[dict[str, Any]]) -> None:
    """Raise if plate ``name`` has another size than ``size`` at one of the sites."""
    for st in stacks:
        if int(st[name].size) != size:
            raise ValueError(
                f"Plate '{name}' has size {size} at one site and {st[name].size} at "
                "another; model and guide must subsample it identically."
            )


def _split_local(
    named: list[tuple[str, dict[str, Any]]],
    stacks: list[dict[str, Any]],
    common: set[str],
    demoted: set[str],
) -> tuple[list[str], dict[str, int]]:
    """The local plates and each site's group (0: global, ``i``: the ``i``-th local
    plate). A site in two local plates (crossed plates), or in a local plate in the
    model but not in the guide (a joint guide draws it outside), makes its plates
    global, and the split is redone without them.
    """
    draws = [not s["is_observed"] for _, s in named]
    while True:
        local, crossed = _local_plates(stacks, draws, common, demoted)
        groups: dict[str, int] = {}
        for (name, _), st in zip(named, stacks):
            inside = [i for i, p in enumerate(local, 1) if p in st]
            group = inside[0] if inside else 0
            if groups.setdefault(name, group) != group:
                crossed |= {local[g - 1] for g in (group, groups[name]) if g}
        if not crossed:
            return local, groups
        demoted |= crossed


def _value_axes(
    guide_sites: dict[str, dict[str, Any]],
    names: tuple[str, ...],
    local: list[str],
    groups: dict[str, int],
    global_sites: tuple[str, ...],
) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """``(name, ndim, plate axes)`` of each latent value drawn per particle: where the
    independent plates (and the site's local plate) lie in its value's shape.
    """
    value_axes = []
    for name, site in sorted(guide_sites.items()):
        if site["is_observed"] or not is_latent(site) or name in global_sites:
            continue
        ndim = jnp.ndim(site["value"])
        batch_ndim = ndim - site["fn"].event_dim
        frames = {f.name: f for f in site["cond_indep_stack"]}
        group = groups.get(name, 0)
        plates = names + ((local[group - 1],) if group else ())
        value_axes.append((name, ndim, tuple(batch_ndim + frames[n].dim for n in plates)))
    return tuple(value_axes)


def _guide_only_subsampled(model_trace: Trace, guide_trace: Trace) -> tuple:
    """``(plate, size, subsample size)`` of the plates the guide subsamples and the
    model, called with these arguments, does not (an AutoGuide fixes its plates'
    subsample sizes at its first call).
    """
    guide_only = []
    for name, site in sorted(guide_trace.items()):
        if site["type"] != "plate" or name not in model_trace:
            continue
        size, guide_sub = site["args"]
        model_sub = model_trace[name]["args"][1]
        if guide_sub is not None and guide_sub != size and model_sub in (None, size):
            guide_only.append((name, int(size), int(guide_sub)))
    return tuple(guide_only)


def _scaled(site: dict[str, Any], full_size: Callable[[str, int], int]) -> bool:
    """Whether a site's ``scale`` is more than its plates' subsampling factor (or is
    not known while tracing).
    """
    scale = site["scale"]
    if scale is None:
        return False
    factor = math.prod(
        full_size(f.name, int(f.size)) / int(f.size) for f in site["cond_indep_stack"]
    )
    try:
        return not np.allclose(np.asarray(scale), factor, rtol=1e-6)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return True


def to_plates(
    array: jax.Array, site: dict[str, Any], structure: PlateStructure, reduce: Callable
) -> jax.Array:
    """Reduce a site's batch-shaped ``array`` onto its group's plates with
    ``reduce`` (``jnp.sum``/``jnp.any``) over every other dimension.
    """
    group = structure.group_of(site["name"])
    frames = {f.name: f for f in site["cond_indep_stack"]}
    dims = [frames[name].dim for name in structure.group_plates(group)]
    ndim = max([jnp.ndim(array)] + [-d for d in dims])
    array = jnp.reshape(array, (1,) * (ndim - jnp.ndim(array)) + jnp.shape(array))
    keep = [ndim + d for d in dims]
    summed = tuple(ax for ax in range(ndim) if ax not in keep)
    array = reduce(array, axis=summed, keepdims=True)
    # Move the kept axes into the canonical order, then drop the reduced ones.
    array = jnp.moveaxis(array, keep, range(ndim - len(keep), ndim))
    array = jnp.reshape(array, jnp.shape(array)[ndim - len(keep) :])
    return jnp.broadcast_to(array, structure.group_shape(group))


def site_log_prob(site: dict[str, Any], structure: PlateStructure) -> jax.Array:
    """``scale * log_prob`` of one site, batch-shaped, without the subsampling
    factors of the plates its group is formed per element of (the objectives apply
    those outside the ``logsumexp``).
    """
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
        group = structure.group_of(site["name"])
        if group:
            plate_factor *= structure.local_scale(group)
        log_prob = log_prob * (scale / plate_factor)
    return log_prob


def site_log_density(site: dict[str, Any], structure: PlateStructure) -> jax.Array:
    """:func:`site_log_prob` summed onto the site's group's plates."""
    return to_plates(site_log_prob(site, structure), site, structure, jnp.sum)


def accumulate(
    sites: list[dict[str, Any]], structure: PlateStructure, density: Callable = site_log_density
) -> tuple[jax.Array, ...]:
    """Sum ``density(site, structure)`` of ``sites`` into one array per group."""
    totals = list(structure.zeros())
    for site in sites:
        group = structure.group_of(site["name"])
        totals[group] = totals[group] + density(site, structure)
    return tuple(totals)
