r"""The NumPyro side of annealed importance sampling: a guide's random draws as an
unconstrained state, and the per-element log densities that :mod:`numpyro_iwae.maths.ais`
anneals between.

The state is the guide's *random* draws (for ``AutoNormal`` the latent sites, for an
``AutoContinuous`` guide its auxiliary ``_auto_latent``), each mapped to unconstrained
space. Running the guide with them substituted gives the model's values (its ``Delta``
sites recomputed) and :math:`\log q` of the draws; so with :math:`J` the Jacobian of the
map from unconstrained space,

.. math::

    \log \gamma_0(u) = \log q_{\mathrm{draws}}(s(u)) + \log |J(u)|, \qquad
    \log \gamma_T(u) = \log p(x, z(u)) - \log q_{\mathrm{rest}}(u) + \log |J(u)|,

where :math:`q_{\mathrm{rest}}` holds the guide's other sites (a ``Delta`` site's
``log_density``, observed and factor sites). Their difference is the importance log
weight :math:`\log p(x, z) - \log q(z)` of :class:`~numpyro_iwae.MarginalLikelihood`, so
with no annealing steps AIS is importance sampling.

"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import substitute, trace

from numpyro_iwae.core.plates import PlateStructure, accumulate, sample_sites, to_plates
from numpyro_iwae.core.program import Program, base_distribution, draw_data, is_delta
from numpyro_iwae.core.stages import model_stage
from numpyro_iwae.maths.layout import plate_layout

__all__ = ["AnnealedDensity", "Density", "NonCentredDensity"]


class AnnealedDensity:
    """Per-particle functions for :func:`~numpyro_iwae.maths.ais.ais_log_weights` from a
    model/guide pair: the initial state, the two log densities per plate element, and
    the per-element sum and layout of a state-shaped tree.

    :param program: model, guide and their arguments, plates already seeded.
    :param values: the fitted params and mutable state.
    :param structure: the plate structure (joint weighting: one group).
    :param key: a key for a prototype run of the guide.
    :raises ValueError: if a random draw of the guide is discrete.
    """

    def __init__(
        self, program: Program, values: Mapping[str, Any], structure: PlateStructure, key
    ) -> None:
        self.program, self.values, self.structure = program, dict(values), structure
        tr = program.trace_guide(self.values, key)
        self.sites = {
            name: site
            for name, site in sample_sites(tr).items()
            if not site["is_observed"] and not is_delta(site["fn"])
        }
        discrete = sorted(n for n, s in self.sites.items() if s["fn"].support.is_discrete)
        if discrete:
            raise ValueError(
                f"Annealing moves the guide's draws by Hamiltonian Monte Carlo, but "
                f"{discrete} are discrete; use annealing_steps=0 (importance sampling)."
            )
        self.transforms = {n: biject_to(s["fn"].support) for n, s in self.sites.items()}

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        """One particle's draws from the guide, in unconstrained space."""
        tr = self.program.trace_guide(self.values, key)
        return {n: t.inv(tr[n]["value"]) for n, t in self.transforms.items()}

    def log_densities(self, u: dict[str, jax.Array], key: jax.Array) -> tuple:
        r"""``(log γ_0(u), log γ_T(u))`` per plate element (see the module)."""
        draws = {n: t(u[n]) for n, t in self.transforms.items()}
        guide_key, model_key = jax.random.split(key)
        tr = self.program.trace_guide({**self.values, **draws}, guide_key)
        sites = list(sample_sites(tr).values())
        log_q_draws = accumulate([s for s in sites if s["name"] in draws], self.structure)[0]
        log_q_rest = accumulate([s for s in sites if s["name"] not in draws], self.structure)[0]
        jacobian = self.element_sum(
            {n: t.log_abs_det_jacobian(u[n], draws[n]) for n, t in self.transforms.items()},
            event_reduced=True,
        )
        log_p, _ = model_stage(self.program, self.values, model_key, self.structure, draw_data(tr))
        return log_q_draws + jacobian, log_p[0] - log_q_rest + jacobian

    def values_at(self, u: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        """The model's latent values at state ``u`` (the guide run with the draws
        substituted), for importance resampling of the final states.
        """
        draws = {n: t(u[n]) for n, t in self.transforms.items()}
        tr = self.program.trace_guide({**self.values, **draws}, jax.random.split(key)[0])
        return draw_data(tr)[0]

    def element_sum(self, tree: dict[str, jax.Array], event_reduced: bool = False) -> jax.Array:
        """Sum a tree shaped like the state (or, with ``event_reduced``, like its batch
        shapes) to one value per plate element.
        """
        total = self.structure.zeros()[0]
        for name, x in tree.items():
            if not event_reduced:
                event = self.transforms[name].domain.event_dim
                x = jnp.sum(x, axis=tuple(range(jnp.ndim(x) - event, jnp.ndim(x))))
            total = total + to_plates(x, self.sites[name], self.structure, jnp.sum)
        return total

    def element_expand(self, x: jax.Array, tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Lay a per-element array out against every leaf of a state-shaped tree."""
        out = {}
        for name, leaf in tree.items():
            frames = {f.name: f for f in self.sites[name]["cond_indep_stack"]}
            batch = jnp.ndim(leaf) - self.transforms[name].domain.event_dim
            axes = tuple(batch + frames[p].dim for p in self.structure.names)
            out[name] = plate_layout(jnp.asarray(x)[None], jnp.ndim(leaf), axes)[0]
        return out


class NonCentredDensity:
    r"""An :class:`AnnealedDensity` whose state holds some loc-scale sites non-centred:
    for a site :math:`z \sim D(\mathrm{loc}(z_{pa}), \mathrm{scale}(z_{pa}))` of a
    loc-scale family on the real line the state holds
    :math:`w = (z - \mathrm{loc}) / \mathrm{scale}`, as
    ``LocScaleReparam(centered=0)`` would sample it, and both log densities gain the
    Jacobian :math:`\sum \log \mathrm{scale}`:

    .. math::

        \log \gamma'_\beta(w) = \log \gamma_\beta(z(w)) + \sum \log \mathrm{scale}(z_{pa}(w)).

    The ratio :math:`p / q`, so every normalizing constant, is unchanged; what changes
    is the geometry the moves see. Where a site's scale follows another latent (a
    funnel, a hierarchical model's group effects) the centred posterior has a neck no
    step size follows, and the non-centred one has none (Papaspiliopoulos, Roberts &
    Skold 2007, *A general framework for the parametrization of hierarchical models*,
    Statist. Sci. 22). The guide and the model are not changed: the model is run once
    more per evaluation, with the non-centred sites computed from their parents as it
    reaches them.

    :param density: the density in the guide's draws.
    :param names: the sites to hold non-centred: guide draws of real support whose
        model distribution has a ``loc`` and a ``scale``.
    :param key: a key for a prototype run of the model.
    :raises ValueError: for a name that is not such a site, and for a guide with point
        masses (their values would not reach the model's loc and scale).
    """

    def __init__(self, density: AnnealedDensity, names: Sequence[str], key: jax.Array) -> None:
        self.density, self.names = density, tuple(names)
        unknown = sorted(set(self.names) - set(density.sites))
        if unknown:
            raise ValueError(
                f"noncentred names {unknown}, which are not continuous random draws of the "
                f"guide; those are {sorted(density.sites)}."
            )
        guide_sites = sample_sites(density.program.trace_guide(density.values, key))
        point_masses = sorted(
            n for n, s in guide_sites.items() if not s["is_observed"] and is_delta(s["fn"])
        )
        if point_masses:
            raise ValueError(
                f"noncentred moves recompute the model's loc and scale from the guide's random "
                f"draws alone, but the guide also sets {point_masses} as point masses; use a "
                "guide whose latent sites are all random draws (AutoNormal, say)."
            )
        tr = self._model_trace(density.init(key), key)
        for name in self.names:
            fn = tr[name]["fn"]
            base = base_distribution(fn)
            if not (
                fn.support is constraints.real or fn.support is constraints.real_vector
            ) or not (hasattr(base, "loc") and hasattr(base, "scale")):
                raise ValueError(
                    f"noncentred site {name!r} has the model distribution "
                    f"{type(base).__name__} on {fn.support}; only loc-scale families on the "
                    "real line (Normal, StudentT, Cauchy, Laplace, ...) can be non-centred."
                )
        self.element_sum, self.element_expand = density.element_sum, density.element_expand

    def _model_trace(self, draws: dict[str, jax.Array], key: jax.Array, noncentred=None):
        """The model run with the guide's ``draws`` (constrained by the density's
        transforms); with ``noncentred`` state values, those sites are set to loc + scale
        * w as the model reaches them, their parents already set.
        """
        names = () if noncentred is None else self.names
        values = {n: t(draws[n]) for n, t in self.density.transforms.items() if n not in names}

        def at(msg: dict) -> Any:
            if msg["type"] == "sample" and msg["name"] in names:
                base = base_distribution(msg["fn"])
                return base.loc + base.scale * noncentred[msg["name"]]
            return None

        program = self.density.program
        model = program.bind_model(self.density.values, key, values)
        return trace(substitute(model, substitute_fn=at)).get_trace(*program.args, **program.kwargs)

    def _log_scale(self, tr, shapes: dict[str, jax.Array]) -> jax.Array:
        return self.density.element_sum(
            {
                n: jnp.broadcast_to(jnp.log(base_distribution(tr[n]["fn"]).scale), shapes[n].shape)
                for n in self.names
            }
        )

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        """One particle's draws from the guide, non-centred where named."""
        return self.noncentre(self.density.init(key), jax.random.fold_in(key, 1))

    def noncentre(self, u: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        r"""The state of the guide's draws ``u`` (unconstrained): the named sites as
        :math:`(z - \mathrm{loc}) / \mathrm{scale}`, the rest as they are; the inverse
        of :meth:`centred`.
        """
        tr = self._model_trace(u, key)
        w = dict(u)
        for n in self.names:
            base = base_distribution(tr[n]["fn"])
            w[n] = (u[n] - base.loc) / base.scale
        return w

    def centred(self, w: dict[str, jax.Array], key: jax.Array) -> tuple[dict, jax.Array]:
        """The guide's draws at state ``w`` and the Jacobian per plate element."""
        tr = self._model_trace(w, key, noncentred=w)
        u = {**w, **{n: tr[n]["value"] for n in self.names}}
        return u, self._log_scale(tr, w)

    def log_densities(self, w: dict[str, jax.Array], key: jax.Array) -> tuple:
        r"""``(log γ'_0(w), log γ'_T(w))`` per plate element."""
        u, log_scale = self.centred(w, jax.random.fold_in(key, 1))
        log_q, log_p = self.density.log_densities(u, key)
        return log_q + log_scale, log_p + log_scale

    def values_at(self, w: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        """The model's latent values at state ``w``."""
        return self.density.values_at(self.centred(w, jax.random.fold_in(key, 1))[0], key)


#: What the annealed evaluators move: the guide's draws, or those with some sites
#: non-centred.
Density = AnnealedDensity | NonCentredDensity
