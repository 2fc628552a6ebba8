"""PIWAE (Rainforth et al., 2018): the IWAE bound for the model, MIWAE for the guide."""

from __future__ import annotations

from typing import Any

import jax

from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.core.program import ModelOutput, Program
from numpyro_iwae.core.stages import log_ratio
from numpyro_iwae.maths.bounds import iwae_bound
from numpyro_iwae.maths.surrogates import dreg_surrogate
from numpyro_iwae.objectives.base import (
    refuse_global_sites,
    total_objective,
    zero_weight_log_w,
)
from numpyro_iwae.objectives.miwae import MIWAE

__all__ = ["PIWAE"]


class PIWAE(MIWAE):
    r"""The partially importance-weighted objective (Rainforth et al., 2018): from one
    set of M K particles, the model's parameters :math:`\theta` ascend
    :math:`\mathrm{IWAE}_{MK}` and the guide's parameters :math:`\phi` ascend
    :math:`\mathrm{MIWAE}(M, K)`:

    .. math::

        \nabla_\theta \log \frac{1}{MK} \sum_{m,k} w_{m,k}, \qquad
        \nabla_\phi \frac1M \sum_m \log \frac1K \sum_k w_{m,k}.

    The model is evaluated once; the two gradients take separate backward passes
    (:func:`~numpyro_iwae.core.paths.split_gradient_paths`). :meth:`loss` returns
    :math:`-\mathrm{IWAE}_{MK}`, the bound the model is trained on. Model parameters
    are the ``param``/``module`` sites of the model; a parameter used by model and
    guide gets the IWAE gradient for its use in the model and the MIWAE gradient for
    its use in the guide. Gradient estimators for :math:`\phi`: ``"reparam"``,
    ``"stl"`` and ``"dreg"`` (MIWAE's doubly reparameterized gradient, per set of K:
    :func:`~numpyro_iwae.maths.surrogates.dreg_surrogate`; not with global latent sites
    under local weighting); discrete guide sites get MIWAE's VIMCO terms.

    :param num_particles: K, the particles of each of the guide's replicates.
    :param num_replicates: M.
    :param gradient_estimator: ``"reparam"``, ``"stl"`` or ``"dreg"``.
    :param vectorize_particles: as for :class:`~numpyro_iwae.IWELBO`.
    :param weighting: as for :class:`~numpyro_iwae.IWELBO`.

    The guide's objective is :class:`~numpyro_iwae.MIWAE`'s (its ``element_bound``);
    PIWAE adds the model's and joins the two (``objective``).

    Example:
        >>> from numpyro_iwae import PIWAE
        >>> PIWAE(num_particles=8, num_replicates=8)
        PIWAE(num_particles=8, num_replicates=8, gradient_estimator='reparam', weighting='auto')

    """

    def bound_particles(self) -> int:
        """The model's bound is over all M x K particles."""
        return self.num_particles * self.num_replicates

    def check_structure(self, structure: PlateStructure) -> None:
        """Refuse global sites under local weighting with DReG."""
        if self.gradient_estimator == "dreg":
            refuse_global_sites(
                structure,
                "PIWAE(gradient_estimator='dreg')",
                "use gradient_estimator='reparam' or 'stl', or weighting='joint'.",
            )

    def _dreg_element(self, log_w: jax.Array, part: tuple, score: bool) -> jax.Array:
        """MIWAE's value (and VIMCO terms) from stopped log weights, plus DReG's
        surrogate for the reparameterized sites.
        """
        log_q_score, log_w_path = part
        bound = self.element_bound(log_w, log_q_score, score)
        return bound + dreg_surrogate(log_w, log_w_path, self.replicates)

    def objective(
        self, rng_key: jax.Array, param_map: dict[str, Any], program: Program
    ) -> tuple[jax.Array, ModelOutput]:
        r""":math:`\mathrm{IWAE}_{MK}` whose gradient is PIWAE's (see the class)."""
        particles = self.particles(rng_key, param_map, program)
        draw, structure = particles.draw, particles.structure
        log_p, log_p_theta, output = self.two_paths(particles)
        log_q_rep = draw.log_q_rep_path if self.gradient_estimator == "stl" else draw.log_q_rep
        sg = jax.lax.stop_gradient
        # phi's log weights: values and guide densities live; theta's: only log p.
        log_w_phi = zero_weight_log_w(
            log_ratio(log_p, log_q_rep, draw.log_q_score), output, structure
        )
        stopped = jax.tree.map(sg, (log_q_rep, draw.log_q_score))
        log_w_theta = zero_weight_log_w(log_ratio(log_p_theta, *stopped), output, structure)
        score_q = stopped[1]
        element, phi_parts = self.element_bound, draw.log_q_score
        if self.gradient_estimator == "dreg":
            # phi's gradient: DReG's surrogate on the path log weights, plus MIWAE's
            # VIMCO terms for discrete sites; its log weights give only the value.
            paths = log_ratio(log_p, draw.log_q_rep_path, score_q)
            log_w_phi = tuple(sg(w) for w in log_w_phi)
            element, phi_parts = self._dreg_element, tuple(zip(draw.log_q_score, paths))

        def iwae_all(log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
            return iwae_bound(log_w)

        theta = total_objective(log_w_theta, score_q, structure, iwae_all)
        phi = total_objective(log_w_phi, phi_parts, structure, element)
        return theta + phi - sg(phi), output
