"""Planning the weights: which plates the bound is formed per element of, and which
weighting (joint or local) the objective uses.

:func:`plan` traces one particle and returns its
:class:`~numpyro_iwae.core.plates.PlateStructure`; :func:`choose_weighting` is the rule
``weighting="auto"`` follows; :func:`check_subsampling` warns where minibatching makes the
bound the ELBO.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any
import warnings

import jax
from numpyro.handlers import seed, substitute, trace
from numpyro.util import _validate_model, check_model_guide_match

from numpyro_iwae._jax import caller_stacklevel, jaxpr_dependencies, jaxpr_reaches
from numpyro_iwae.core.enumeration import require_funsor
from numpyro_iwae.core.plates import (
    PlateStructure,
    Trace,
    accumulate,
    plate_structure,
    sample_sites,
)
from numpyro_iwae.core.program import MutableRecorder, Program, check_sites, draw_data, trace_pair
from numpyro_iwae.core.stages import model_stage

__all__ = [
    "JointWeightsWarning",
    "UnweightedBoundWarning",
    "plan",
    "AUTO_LOCAL_SIZE",
    "choose_weighting",
    "large_latent_plates",
    "check_subsampling",
]


class JointWeightsWarning(UserWarning):
    """The importance weights are joint over a large plate that holds latents.

    Issued for ``K > 1`` when latent sites lie inside a plate of at least
    :data:`AUTO_LOCAL_SIZE` elements and some site outside it, and the weighting is
    joint (asked for, or forced by a guide that draws all sites jointly). The joint
    bound is still a valid lower bound on ``log p(x)``, but one weight then spans
    every element's latents and the bound falls towards the ELBO as the plate grows;
    the locally weighted bound keeps a per-element gain. Not issued when the plate
    holds only observations (an ordinary regression): the joint bound is then the
    IWAE bound over the global latents, whose gain does not depend on the plate size.
    """


class UnweightedBoundWarning(UserWarning):
    """Nothing is importance weighted: the objective is the ELBO for every K.

    Issued for ``K > 1`` under local weighting when no latent is drawn per
    particle: a model whose only latents are global next to a subsampled data plate
    (no importance-weighted bound has an unbiased minibatch estimate there, so the
    ELBO is the right objective, and the warning says so), ``weighting="local"``
    asked for such a model on full data (``"joint"``, the default there, weights
    the global sites), or local sites whose guide draws do not depend on the
    particle.
    """


def plan(
    program: Program,
    params: Mapping[str, Any],
    rng_key: jax.Array,
    weighting: str = "joint",
    num_particles: int | None = None,
) -> PlateStructure:
    """Trace one particle abstractly (no values are computed) to check that model
    and guide match and to find the plate structure; raises ``ValueError`` on a
    mismatch.

    Abstract tracing matters: a concrete particle could be extreme (a flow's draw
    far in the tail) and trip NumPyro's eager argument validation, where under
    ``jit`` the same particle simply gets weight zero. As under SVI's ``jit``,
    data must be indexable by traced subsample indices (JAX arrays, or
    ``numpyro.subsample``).

    ``weighting`` is ``"joint"``, ``"local"`` or ``"auto"`` (see
    :func:`choose_weighting`, which also reads ``num_particles``, the particles of
    the largest ``logsumexp``); the returned structure says which applies. Local
    weighting needs a program seeded with :meth:`Program.with_seeded_plates`.
    """
    found: list[PlateStructure] = []
    recorder = MutableRecorder()

    def probe(key: jax.Array) -> None:
        with recorder:
            model_trace, guide_trace = trace_pair(program, params, key)
        check_sites(model_trace, guide_trace)
        # NumPyro's own checks, for the warnings Trace_ELBO gives (a batch dimension
        # with no plate, a guide plate the model lacks).
        check_model_guide_match(model_trace, guide_trace)
        _validate_model(model_trace, plate_warning="loose")
        joint = plate_structure(model_trace, guide_trace)
        if joint.enumerated:
            require_funsor()
        found.append(joint)
        if weighting == "joint" or not joint.joint_plates:
            return
        if weighting == "auto" and choose_weighting(joint, num_particles) == "joint":
            return
        demoted: frozenset = frozenset()
        while True:
            local = plate_structure(model_trace, guide_trace, "local", demoted)
            leaks = _leaking_plates(program, params, key, local)
            if not leaks:
                break
            demoted |= leaks
        found.append(local)

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
        mismatch = _plate_size_mismatch(program, params, rng_key)
        if mismatch:
            raise ValueError(
                "Model and guide disagree on plate sizes ("
                + "; ".join(f"'{n}': guide {g}, model {m}" for n, g, m in mismatch)
                + "), so the model failed on the guide's draw. The guide was built for "
                "data of another size: an AutoGuide fixes its plates' sizes at first use. "
                "For data of this size build a fresh guide of the same class (and, to "
                "score a fitted model, fit it there or pass its global parameters)."
            ) from err
        raise
    if len(found) == 1:
        return found[0]
    joint, local = found
    try:
        weighted = _check_global_draws(program, params, rng_key, local)
    except ValueError:
        if weighting == "auto" and not joint.subsampled_joint_plates:
            return joint  # a joint guide over all sites: joint weights are what it allows
        raise
    return replace(local, unweighted=not weighted)


def _plate_size_mismatch(
    program: Program, params: Mapping[str, Any], rng_key: jax.Array
) -> list[tuple[str, int, int]]:
    """``(plate, guide size, model size)`` for plates that model and guide, each
    traced on its own (the model from its prior), declare with different full sizes.
    Empty if either cannot be traced on its own.
    """

    def sizes(tr: Trace) -> dict[str, int]:
        return {n: int(s["args"][0]) for n, s in tr.items() if s["type"] == "plate"}

    def traces(key: jax.Array) -> tuple[dict, dict]:
        guide = program.trace_guide(params, key[1])
        model = trace(substitute(seed(program.model, key[0]), data=dict(params)))
        return sizes(guide), sizes(model.get_trace(*program.args, **program.kwargs))

    found: list = []
    try:
        jax.eval_shape(lambda key: found.append(traces(key)), rng_key)
    except Exception:
        return []
    guide_sizes, model_sizes = found[0]
    return [
        (n, guide_sizes[n], model_sizes[n])
        for n in sorted(set(guide_sizes) & set(model_sizes))
        if guide_sizes[n] != model_sizes[n]
    ]


#: Under ``weighting="auto"``, local weighting is chosen for latents inside a plate
#: of at least this many elements (its full size, before subsampling), joint
#: weighting below: with a latent per datapoint next to a global one, the joint bound
#: is tighter than the local one for a few datapoints and looser from about ten on
#: (``benchmarks/auto_weighting.py``; the numbers are in ``benchmarks/RESULTS.md``).
AUTO_LOCAL_SIZE = 10


def choose_weighting(joint: PlateStructure, num_particles: int | None = None) -> str:
    """What ``weighting="auto"`` picks for a model with the given joint structure.

    - ``num_particles == 1``: ``"joint"``: every weighting is then the ELBO, and the
      joint one is ``Trace_ELBO``'s, for every guide and every subsampled plate.
    - No latent inside the plates the weights would be joint over (global latents
      next to a plate of observations, an ordinary regression): ``"joint"``, the IWAE
      bound over the global latents, whose gain does not shrink as the plate grows;
      but ``"local"`` (the ELBO: nothing can be weighted without bias) when such a
      plate is subsampled.
    - Latents inside such a plate: ``"local"`` if the plate is subsampled (the joint
      bound has no unbiased minibatch estimate) or its full size is at least
      :data:`AUTO_LOCAL_SIZE` (the joint bound then falls towards the ELBO), else
      ``"joint"`` (tighter for a few datapoints). Decided from full sizes, so the
      minibatches and the full data of one model get the same objective.
    """
    if num_particles == 1:
        return "joint"
    if not joint.latent_plates:
        return "local" if joint.subsampled_joint_plates else "joint"
    if joint.subsampled_joint_plates:
        return "local"
    return "local" if large_latent_plates(joint) else "joint"


def large_latent_plates(structure: PlateStructure) -> list[tuple[str, int]]:
    """``(name, full size)`` of the plates that hold latents, lie outside some site
    and have at least :data:`AUTO_LOCAL_SIZE` elements: where joint weights fall
    towards the ELBO.
    """
    sizes = dict(structure.joint_plates)
    return [(n, sizes[n]) for n in structure.latent_plates if sizes[n] >= AUTO_LOCAL_SIZE]


def _leaking_plates(
    program: Program, params: Mapping[str, Any], key: jax.Array, structure: PlateStructure
) -> frozenset[str]:
    """Local plates whose draws reach a log density of the model outside the plate.

    A site outside a plate may depend on the plate's latents (NumPyro's plates
    allow it), but then the plate's elements are not independent given the global
    sites and the local bound would be wrong; such plates are made global.
    Found by data flow in the model's jaxpr, from the local values to each group's
    ``log p``.
    """
    if not structure.local_plates:
        return frozenset()
    model_key, guide_key = key
    values, plates, mutable = draw_data(
        program.trace_guide(params, guide_key, structure.global_sites)
    )
    globals_ = {n: values[n] for n in structure.global_sites if n in values}
    local = {n: v for n, v in values.items() if n not in globals_}
    names = sorted(local)  # a dict's leaves come in sorted key order

    def log_p_of(local_values: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
        draw = ({**values, **local_values}, plates, mutable)
        return model_stage(program, {**params, **globals_}, model_key, structure, draw)[0]

    outputs = jaxpr_dependencies(jax.make_jaxpr(log_p_of)(local).jaxpr)
    leaks = set()
    for i, name in enumerate(names):
        group = structure.group_of(name)
        if any(i in deps for g, deps in enumerate(outputs) if g != group):
            leaks.add(structure.local_plates[group - 1][0])
    return frozenset(leaks)


def _check_global_draws(
    program: Program,
    params: Mapping[str, Any],
    key: jax.Array,
    structure: PlateStructure,
) -> bool:
    r"""Raise if the guide's global draws depend on its local ones (the guide must
    be :math:`q(\theta) \prod_n q(z_n \mid \theta)`); return whether some local draw
    depends on the particle (if none does, nothing is weighted: the bound is the ELBO).
    """
    shared = structure.global_sites

    def parts(guide_key: jax.Array) -> tuple:
        tr = program.trace_guide(params, guide_key, shared)
        values = draw_data(tr)[0]
        log_q = accumulate(list(sample_sites(tr).values()), structure)[0]
        local = {n: v for n, v in values.items() if n not in shared}
        return {n: values[n] for n in shared if n in values}, log_q, local

    closed, out = jax.make_jaxpr(parts, return_shape=True)(key[1])
    reached = jaxpr_reaches(closed.jaxpr)
    num_global = len(jax.tree.leaves(out[:2]))
    if any(reached[:num_global]):
        raise ValueError(
            f"Local weighting draws the global site(s) {list(shared)} once and the local "
            "sites per particle, so the guide must draw the global sites first and not "
            "from the local ones: q(theta) q(z | theta). In this guide a global draw or "
            "its density depends on a local draw (e.g. one joint AutoGuide over all "
            "sites). Use a guide per site (AutoNormal, or an AutoGuideList), or "
            "weighting='joint' (whose weights are joint over the data)."
        )
    return any(reached[num_global:])


def check_subsampling(structure: PlateStructure, num_particles: int) -> None:
    """Raise if the bound would be biased by subsampling; warn where the weighting
    weights nothing or fades towards the ELBO. Silent for ``K = 1`` (every weighting
    is then the ELBO).

    Under joint weighting a subsampled plate that does not enclose every sample site
    (a data plate next to a global latent) cannot be scaled outside the
    ``logsumexp``, and scaling inside it biases the bound for ``K > 1``: an error.
    Latents inside a plate of at least :data:`AUTO_LOCAL_SIZE` elements over which
    the weights are joint: a :class:`JointWeightsWarning`. Under local weighting
    with nothing drawn per particle: an :class:`UnweightedBoundWarning`.
    """
    if num_particles == 1:
        return
    if structure.weighting == "local":
        if structure.unweighted:
            warnings.warn(
                _unweighted_message(structure),
                UnweightedBoundWarning,
                stacklevel=caller_stacklevel(),
            )
        return
    if structure.subsampled_joint_plates:
        remedy = (
            "Use weighting='local' (the default 'auto' does): the global sites are drawn "
            "once and the particles weighted per plate element, which minibatches exactly."
            if structure.latent_plates
            else "No latent lies inside the subsampled plate(s), so no importance-weighted "
            "bound minibatches without bias: train on the full data (joint weighting is "
            "then exact), or accept the ELBO on minibatches (weighting='auto' or 'local')."
        )
        raise ValueError(
            f"Plate(s) {list(structure.subsampled_joint_plates)} are subsampled but do "
            f"not enclose every sample site (sites outside: "
            f"{list(structure.outside_sites)}). With weighting='joint' the importance "
            "weights are joint over all data, and no unbiased minibatch estimate of the "
            f"K-particle bound exists (rescaling inside the logsumexp is biased). {remedy}"
        )
    large = large_latent_plates(structure)
    if large:
        warnings.warn(
            f"The importance weights are joint over plate(s) {large}, which hold latent "
            f"sites, because site(s) {list(structure.outside_sites)} lie outside them: "
            "one weight per particle spans every element's latents, so the bound falls "
            "towards the ELBO as the plate grows (benchmarks/RESULTS.md measures it: "
            "with a latent per datapoint, looser than the locally weighted bound from "
            "about ten datapoints on). Use weighting='local', with a guide that draws the global "
            "sites first and each element's latents per element (e.g. AutoNormal).",
            JointWeightsWarning,
            stacklevel=caller_stacklevel(),
        )


def _unweighted_message(structure: PlateStructure) -> str:
    """What an :class:`UnweightedBoundWarning` says for this structure."""
    shared = list(structure.global_sites)
    if structure.latent_plates:
        plates = [p for p, _, _ in structure.local_plates] or list(structure.latent_plates)
        return (
            "Local weighting: no latent is drawn per particle inside the plate(s) "
            f"{plates}: the guide draws them once per step with the global sites "
            f"({shared}), so "
            "nothing is importance weighted and the bound is the ELBO for every K. Local "
            "weighting pays off for latents inside a data plate whose guide draws them per "
            "element (e.g. AutoNormal, not a joint AutoGuide such as AutoDiagonalNormal)."
        )
    if structure.subsampled_joint_plates:
        return (
            f"Plate(s) {list(structure.subsampled_joint_plates)} are subsampled and every "
            f"latent ({shared}) lies outside them. No importance-weighted bound has an "
            "unbiased minibatch estimate here, so the global sites are drawn once per step "
            "and this objective is the ELBO (Trace_ELBO's) for every K: the right "
            "objective for minibatches. To importance-weight the global sites, train on "
            "the full data, where the default weighting is joint."
        )
    return (
        f"weighting='local' draws the global site(s) {shared} once per step and no latent "
        "lies inside a plate, so nothing is importance weighted and the bound is the ELBO "
        "for every K. weighting='joint' (the default for this model) is the IWAE bound "
        "over the global sites; its gain does not shrink as the data grows."
    )
