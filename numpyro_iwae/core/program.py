"""A model/guide pair and the arguments both are called with, traced once.

:class:`Program` bundles the model, the guide and their arguments; :func:`trace_pair`
runs both once (the guide first, the model on its values) and the checks here refuse a
pair whose sites do not match, as NumPyro's ``Trace_ELBO`` would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
import hashlib
from typing import Any, NamedTuple

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import _without_rsample_stop_gradient
from numpyro.primitives import Messenger

from numpyro_iwae._jax import jaxpr_reaches
from numpyro_iwae.core.plates import Trace, is_latent, sample_sites

__all__ = [
    "Program",
    "GuideDraw",
    "ModelOutput",
    "check_sites",
    "is_delta",
    "point_mass_sites",
    "mutable_values",
    "draw_data",
    "trace_pair",
    "observed_digest",
    "MutableRecorder",
]


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
        global_key: the key of the draws every particle shares (the global sites
            of local weighting); set by :meth:`with_seeded_plates`.

    """

    model: Callable
    guide: Callable
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    global_key: jax.Array | None = None

    def with_seeded_plates(self, plate_key: jax.Array) -> Program:
        """The same program with its plates (only) seeded by ``plate_key``, so every
        particle drawn from it sees the same minibatch, and with a ``global_key``
        derived from it for the draws every particle shares.
        """
        hide = ["sample", "prng_key", "control_flow"]
        return replace(
            self,
            model=seed(self.model, plate_key, hide_types=hide),
            guide=seed(self.guide, plate_key, hide_types=hide),
            global_key=random.fold_in(plate_key, 1),
        )

    def trace_guide(
        self, params: Mapping[str, Any], key: jax.Array, shared: tuple[str, ...] = ()
    ) -> Trace:
        """Trace the guide with ``params`` substituted, seeded with ``key``; sampled
        values keep their path to the guide's parameters.

        The ``shared`` sites are drawn from keys derived from :attr:`global_key`
        alone, so every particle gets the same value for them (the global sites of
        local weighting).
        """
        guide = self.guide
        if shared:
            if self.global_key is None:
                raise ValueError("shared draws need a global key: use with_seeded_plates")
            guide = _SharedDraws(guide, self.global_key, shared)
        with _without_rsample_stop_gradient():
            guide = substitute(seed(guide, key), data=dict(params))
            return trace(guide).get_trace(*self.args, **self.kwargs)

    def bind_model(self, params: Mapping[str, Any], key: jax.Array, data: Mapping) -> Callable:
        """The model with ``params`` and then ``data`` (latent values, subsample
        indices and mutable state from a guide trace) substituted, seeded with
        ``key``; a guide value wins a name clash with a parameter.
        """
        return substitute(seed(self.model, key), data={**params, **data})

    def trace_model(self, params: Mapping[str, Any], key: jax.Array, data: Mapping) -> Trace:
        """Trace the model bound as :meth:`bind_model` binds it."""
        model = self.bind_model(params, key, data)
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


class _SharedDraws(Messenger):
    """Gives each named sample site a key of its own derived from ``key``, before
    any ``seed`` handler around it can: draws that do not depend on the particle.
    """

    def __init__(self, fn: Callable, key: jax.Array, names: tuple[str, ...]) -> None:
        self.key = key
        self.index = {name: i for i, name in enumerate(names)}
        super().__init__(fn)

    def process_message(self, msg: dict[str, Any]) -> None:
        if (
            msg["type"] == "sample"
            and msg["name"] in self.index
            and msg["value"] is None
            and msg["kwargs"].get("rng_key") is None
        ):
            msg["kwargs"]["rng_key"] = random.fold_in(self.key, self.index[msg["name"]])


def _unwrap(fn: Callable) -> Callable:
    while isinstance(fn, Messenger) and fn.fn is not None:
        fn = fn.fn
    return fn


class GuideDraw(NamedTuple):
    """The guide's side of K particles, each array with a leading particle axis.

    ``values`` are the latent values substituted into the model, ``plates`` the
    subsample indices of the guide's plates, and the ``log_q_*`` parts are as in
    :class:`LogWeights`, one array per group of the
    :class:`~numpyro_iwae.core.plates.PlateStructure` (one group under joint weighting).
    Under local weighting ``global_values`` holds the global sites' values, without
    a particle axis (every particle shares them), and ``values`` only the others.
    """

    values: dict[str, jax.Array]
    plates: dict[str, jax.Array]
    log_q_rep: tuple[jax.Array, ...]
    log_q_rep_path: tuple[jax.Array, ...] | None
    log_q_score: tuple[jax.Array, ...]
    mutable_state: dict[str, Any]
    global_values: dict[str, jax.Array] = {}


class ModelOutput(NamedTuple):
    """What a model evaluation returns beside ``log p``: the mutable state and, per
    observed site with NaN data, a boolean over the independent plates.
    """

    mutable_state: dict[str, Any]
    nan_data: dict[str, jax.Array]


def check_sites(model_trace: Trace, guide_trace: Trace) -> None:
    """Raise a ValueError unless every model latent is drawn by the guide and
    every non-auxiliary guide draw is a latent of the model, with matching shapes.
    """
    model_sites = sample_sites(model_trace)
    guide_sites = sample_sites(guide_trace)
    guide_latents = {n for n, s in guide_sites.items() if is_latent(s)}
    model_latents = {n for n, s in model_sites.items() if not s["is_observed"]}

    guide_enumerated = sorted(
        n for n, s in guide_sites.items() if s["infer"].get("enumerate") == "parallel"
    )
    if guide_enumerated:
        raise ValueError(
            f"Guide site(s) {guide_enumerated} are marked for enumeration. An importance "
            "weight needs a draw of every guide site, so the guide cannot sum them out: "
            "drop the mark in the guide (a discrete guide site then gets the VIMCO "
            "gradient), or leave the site out of the guide and mark it in the model, "
            "where it is summed out inside each particle's weight."
        )
    # Model sites marked for parallel enumeration are summed out, not drawn.
    missing = sorted(
        n
        for n in model_latents - guide_latents
        if model_sites[n]["infer"].get("enumerate") != "parallel"
    )
    if missing:
        raise ValueError(
            f"Model latent site(s) {missing} are not sampled by the guide. IWELBO "
            "needs the guide to propose every latent variable of the model; add "
            "them to the guide (or use an AutoGuide for continuous sites)."
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


def base_distribution(fn: Any) -> Any:
    """A site's distribution under its wrappers (Independent, Expanded, Masked)."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def is_delta(fn: Any) -> bool:
    """Whether a site's distribution is a ``Delta`` (under any wrappers)."""
    return type(base_distribution(fn)).__name__ == "Delta"


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
            for n, site in sample_sites(tr).items()
            if not site["is_observed"] and is_delta(site["fn"])
        }

    closed, shapes = jax.make_jaxpr(delta_values, return_shape=True)(key)
    names = sorted(shapes)  # a dict's leaves come in sorted key order
    random = jaxpr_reaches(closed.jaxpr)
    return tuple(sorted(n for n, r in zip(names, random) if not r))


def mutable_values(tr: Trace) -> dict[str, Any]:
    """The values of a trace's ``numpyro.mutable`` sites, keyed by name."""
    return {n: s["value"] for n, s in tr.items() if s["type"] == "mutable"}


def draw_data(tr: Trace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What the model sees of a guide trace: latent values, subsample indices of
    the guide's plates, and mutable state.
    """
    values = {n: s["value"] for n, s in sample_sites(tr).items() if is_latent(s)}
    plates = {n: s["value"] for n, s in tr.items() if s["type"] == "plate"}
    return values, plates, mutable_values(tr)


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
    values, plates, mutable = draw_data(guide_trace)
    model_trace = program.trace_model(params, model_key, {**mutable, **plates, **values})
    return model_trace, guide_trace


class MutableRecorder(Messenger):
    """Records ``mutable`` sites that were reached without a value."""

    def __init__(self, fn: Callable | None = None) -> None:
        self.empty: list[str] = []
        super().__init__(fn)

    def postprocess_message(self, msg: dict[str, Any]) -> None:
        """Note a ``mutable`` site that has no value yet."""
        if msg["type"] == "mutable" and msg["value"] is None:
            self.empty.append(msg["name"])


def observed_digest(program: Program, params: Mapping[str, Any], rng_key: jax.Array) -> str | None:
    """A digest of the observed values the model sees in one concrete run.

    What an estimate was computed on, so that estimates on different data are not
    compared (:func:`~numpyro_iwae.evaluators.comparison.compare_evidence`). The
    digest depends on the values only (as float64, with their shapes), not on the
    sites' names or order, so two models that name their data differently still
    match; sites holding no values (``numpyro.factor``) do not count. ``None`` under a
    JAX transformation (``jit``, ``vmap``), where the data are not concrete, and if the
    concrete run fails (the estimate is kept; comparisons then warn).
    """
    leaves = jax.tree.leaves((program.args, dict(program.kwargs), rng_key))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return None
    try:
        # Without NumPyro's eager argument checks: a particle far in the guide's tail
        # may give a density argument that underflows (weight zero for the estimate,
        # no reason to fail here).
        with numpyro.validation_enabled(False):
            model_trace, _ = trace_pair(program, params, random.split(rng_key))
    except Exception:  # noqa: BLE001 - a digest must not lose the estimate
        return None
    parts = []
    for site in sample_sites(model_trace).values():
        if site["is_observed"] and np.size(site["value"]) > 0:
            if isinstance(site["value"], jax.core.Tracer):
                return None
            value = np.asarray(site["value"], dtype=np.float64)
            parts.append(hashlib.sha256(repr(value.shape).encode() + value.tobytes()).digest())
    return hashlib.sha256(b"".join(sorted(parts))).hexdigest()[:16]
