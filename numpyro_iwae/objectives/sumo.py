r"""SUMO (Luo et al., 2020) as a NumPyro ``ELBO``: an unbiased estimate of the IWAE
bound of ``m + max_terms`` particles by randomized truncation, which tends to
:math:`\log p(x)` as ``max_terms`` grows, per plate element.

"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from numpyro_iwae._jax import check_positive_int
from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.core.program import ModelOutput, Program
from numpyro_iwae.core.stages import log_ratio
from numpyro_iwae.maths.bounds import iwae_bound
from numpyro_iwae.maths.sumo import (
    SUMO_TAIL_RATIO,
    SUMO_TAIL_START,
    sample_sumo_terms,
    sumo_estimate,
    sumo_survival,
)
from numpyro_iwae.maths.surrogates import zero_valued
from numpyro_iwae.objectives.base import (
    Objective,
    refuse_global_sites,
    total_objective,
    zero_weight_log_w,
)

__all__ = ["GUIDE_OBJECTIVES", "SUMO"]


#: What the guide's parameters optimise under :class:`SUMO`.
GUIDE_OBJECTIVES = ("variance", "iwae")


class SUMO(Objective):
    r"""SUMO, the Russian-roulette estimator of :math:`\log p(x)` (Luo, Beatson,
    Norouzi, Zhu, Duvenaud, Adams & Chen, 2020, ICLR), as an objective for ``SVI``.

    Per plate element, from one growing run of :math:`m + T_{\max}` particles,

    .. math::

        \mathrm{SUMO} = \mathrm{IWAE}_m + \sum_{j=0}^{T-1}
            \frac{\mathrm{IWAE}_{m+j+1} - \mathrm{IWAE}_{m+j}}{P(T \ge j + 1)}

    (:func:`~numpyro_iwae.maths.sumo.sumo_estimate`), with T drawn afresh at every step
    and for every plate element, inside ``jit``, with :math:`P(T \ge k) = 1/k` up to
    80 and a geometric tail beyond (:func:`~numpyro_iwae.maths.sumo.sample_sumo_terms`;
    :math:`\mathbb E[T] \approx 5.08`), truncated at ``max_terms``. Its expectation is
    exactly :math:`\mathbb E[\mathrm{IWAE}_{m + T_{\max}}]`, within the IWAE gap of
    :math:`m + T_{\max}` particles of :math:`\log p(x)`, so the model's parameters get
    an unbiased gradient of that bound; the guide's parameters minimise the
    estimator's second moment :math:`\mathbb E[\mathrm{SUMO}^2]` (its mean does not
    depend on them: Luo et al.'s variance objective), or with
    ``guide_objective="iwae"`` ascend :math:`\mathrm{IWAE}_{m + T_{\max}}` on the same
    particles. :meth:`loss` returns :math:`-\mathrm{SUMO}`.

    **Cost.** Every step draws all :math:`m + T_{\max}` particles and masks the terms
    beyond T (shapes stay static under ``jit``): with the defaults that is 81 model
    evaluations where the estimator reads :math:`m + T \approx 6` on average. The
    variance grows quickly with ``max_terms`` beyond 80 (the geometric tail divides
    by :math:`0.9^{j - 80}`; see :func:`~numpyro_iwae.maths.sumo.sumo_estimate`).

    Discrete guide sites and global latent sites under local weighting are refused.

    :param min_particles: m, the particles of the first IWAE term (default 1).
    :param max_terms: :math:`T_{\max}` (default 80).
    :param guide_objective: ``"variance"`` (default) or ``"iwae"``.
    :param tail_start: where the truncation distribution's geometric tail begins
        (default 80; :func:`~numpyro_iwae.maths.sumo.sumo_survival`).
    :param tail_ratio: the tail's ratio (default 0.9).
    :param vectorize_particles: as for :class:`~numpyro_iwae.IWELBO`.
    :param weighting: as for :class:`~numpyro_iwae.IWELBO`.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro_iwae import SUMO
        >>> def model():
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=1.0)
        >>> def guide():  # the exact posterior: SUMO is exactly log p(x)
        ...     numpyro.sample("z", dist.Normal(0.5, 0.5**0.5))
        >>> round(-float(SUMO().loss(jax.random.key(0), {}, model, guide)), 4)
        -1.5155

    """

    estimators = ("reparam",)
    repr_fields = (
        "min_particles",
        "max_terms",
        "guide_objective",
        "tail_start",
        "tail_ratio",
        "weighting",
    )

    def __init__(
        self,
        min_particles: int = 1,
        max_terms: int = 80,
        *,
        guide_objective: str = "variance",
        tail_start: int = SUMO_TAIL_START,
        tail_ratio: float = SUMO_TAIL_RATIO,
        vectorize_particles: bool | Callable = True,
        weighting: str = "auto",
    ) -> None:
        self.min_particles = check_positive_int(min_particles, "min_particles")
        self.max_terms = check_positive_int(max_terms, "max_terms")
        if guide_objective not in GUIDE_OBJECTIVES:
            raise ValueError(
                f"`guide_objective` must be one of {GUIDE_OBJECTIVES}, got {guide_objective!r}."
            )
        self.guide_objective = guide_objective
        sumo_survival(1, tail_start, tail_ratio)  # checks them
        self.tail_start, self.tail_ratio = tail_start, tail_ratio
        super().__init__(
            self.min_particles + self.max_terms,
            vectorize_particles=vectorize_particles,
            weighting=weighting,
        )

    def check_structure(self, structure: PlateStructure) -> None:
        """Refuse discrete guide sites, and global sites under local weighting."""
        if structure.nonreparam_sites:
            raise ValueError(
                "SUMO has no score-function estimator for discrete guide sites "
                f"{list(structure.nonreparam_sites)}; use IWELBO (VIMCO) or "
                "ReweightedWakeSleep."
            )
        refuse_global_sites(structure, "SUMO", "use weighting='joint' or IWELBO.")

    def objective(
        self, rng_key: jax.Array, param_map: dict[str, Any], program: Program
    ) -> tuple[jax.Array, ModelOutput]:
        """SUMO, whose gradient is SUMO's for the model's parameters and the guide
        objective's for the guide's (see the class).
        """
        sg = jax.lax.stop_gradient
        draw_key, terms_key = jax.random.split(rng_key)
        particles = self.particles(draw_key, param_map, program)
        draw, structure = particles.draw, particles.structure
        log_p, log_p_theta, output = self.two_paths(particles)
        log_w_theta = log_ratio(log_p_theta, jax.tree.map(sg, draw.log_q_rep))
        log_w_phi = log_ratio(log_p, draw.log_q_rep)
        log_w_theta = zero_weight_log_w(log_w_theta, output, structure)
        log_w_phi = zero_weight_log_w(log_w_phi, output, structure)
        keys = tuple(jax.random.fold_in(terms_key, g) for g in range(structure.num_groups))
        m, t_max, variance = self.min_particles, self.max_terms, self.guide_objective == "variance"
        tail = (self.tail_start, self.tail_ratio)

        def element(log_w: jax.Array, part: tuple, score: bool) -> jax.Array:
            log_w_guide, key = part
            terms = sample_sumo_terms(key, t_max, log_w.shape[1:], *tail)
            value = sumo_estimate(log_w, terms, m, *tail)
            if variance:  # ascended: minus E[SUMO^2]
                guide_part = -(sumo_estimate(log_w_guide, terms, m, *tail) ** 2)
            else:
                guide_part = iwae_bound(log_w_guide)
            return value + zero_valued(guide_part)

        parts = tuple(zip(log_w_phi, keys))
        return total_objective(log_w_theta, parts, structure, element), output
