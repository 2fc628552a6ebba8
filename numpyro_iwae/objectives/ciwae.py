"""CIWAE (Rainforth et al., 2018): a convex combination of the ELBO and the IWAE bound."""

from __future__ import annotations

from collections.abc import Callable

import jax

from numpyro_iwae._jax import check_real
from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.maths.bounds import ciwae_bound
from numpyro_iwae.objectives.base import Objective

__all__ = ["CIWAE"]


class CIWAE(Objective):
    r"""The combination of the ELBO and the IWAE bound on the same K particles
    (Rainforth et al., 2018):

    .. math::

        \mathrm{CIWAE}_\beta = \beta\, \frac1K \sum_k \log w_k
            + (1 - \beta) \log \frac1K \sum_k w_k,

    per plate element (see :func:`~numpyro_iwae.maths.bounds.ciwae_bound`); beta = 0 is
    IWELBO(K), beta = 1 the ELBO with K particles. A lower bound for every beta in
    [0, 1]. Gradient estimators: ``"reparam"`` and ``"stl"``; DReG is defined for the
    IWAE part only and is refused, as are discrete guide sites (no learning signal is
    defined here for the mixture).

    :param num_particles: K.
    :param beta: the weight of the ELBO, in [0, 1].
    :param gradient_estimator: ``"reparam"`` or ``"stl"``.
    :param vectorize_particles: as for :class:`~numpyro_iwae.IWELBO`.
    :param weighting: as for :class:`~numpyro_iwae.IWELBO`.

    Example:
        >>> from numpyro_iwae import CIWAE
        >>> CIWAE(num_particles=8, beta=0.5)
        CIWAE(num_particles=8, beta=0.5, gradient_estimator='reparam', weighting='auto')

    """

    can_infer_discrete = False
    estimators = ("reparam", "stl")
    estimator_hint = (
        " The doubly reparameterized estimator is defined for the IWAE bound, not for its "
        "mixture with the ELBO."
    )

    repr_fields = ("num_particles", "beta", "gradient_estimator", "weighting")

    def __init__(
        self,
        num_particles: int = 8,
        beta: float = 0.5,
        *,
        gradient_estimator: str = "reparam",
        vectorize_particles: bool | Callable = True,
        weighting: str = "auto",
    ) -> None:
        super().__init__(
            num_particles,
            gradient_estimator=gradient_estimator,
            vectorize_particles=vectorize_particles,
            weighting=weighting,
        )
        self.beta = check_real(beta, "beta", 0.0, 1.0)

    def check_structure(self, structure: PlateStructure) -> None:
        """Refuse discrete guide sites (CIWAE has no score-function estimator)."""
        if structure.nonreparam_sites:
            raise ValueError(
                f"CIWAE has no score-function estimator for the discrete guide site(s) "
                f"{list(structure.nonreparam_sites)}. Use IWELBO or RenyiELBO (VIMCO), or "
                "enumerate the site."
            )

    def element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        """CIWAE per plate element (:func:`~numpyro_iwae.maths.bounds.ciwae_bound`)."""
        return ciwae_bound(log_w, self.beta)
