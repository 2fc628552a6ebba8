"""The variational Renyi bound (Li & Turner, 2016) as a NumPyro ``ELBO``."""

from __future__ import annotations

from collections.abc import Callable

import jax

from numpyro_iwae._jax import check_real
from numpyro_iwae.maths.bounds import renyi_bound
from numpyro_iwae.maths.surrogates import renyi_learning_signal, with_score_terms
from numpyro_iwae.objectives.base import Objective

__all__ = ["RenyiELBO"]


class RenyiELBO(Objective):
    r"""The variational Renyi bound (Li & Turner, 2016, *Renyi Divergence Variational
    Inference*, NeurIPS), per plate element:

    .. math::

        \mathcal L_\alpha = \frac{1}{1 - \alpha} \log \frac1K \sum_{k=1}^K
            w_k^{1 - \alpha}

    (see :func:`~numpyro_iwae.maths.bounds.renyi_bound`). ``alpha = 0`` is
    :class:`~numpyro_iwae.IWELBO`; ``alpha = 1`` is the ELBO (the limit); in
    expectation the bound decreases in alpha, and for alpha in [0, 1] it lies between
    the ELBO and the IWAE bound. A drop-in for :class:`numpyro.infer.RenyiELBO` that
    also forms the bound per plate element, takes ``gradient_estimator``
    (``"reparam"`` or ``"stl"``), ``weighting`` and subsampled plates, and gives
    discrete guide sites a score-function gradient with leave-one-out baselines
    (:func:`~numpyro_iwae.maths.surrogates.renyi_learning_signal`) where NumPyro's class
    gives them none.

    :param alpha: the Renyi order (any finite real; NumPyro's default 0).
    :param num_particles: K.
    :param gradient_estimator: ``"reparam"`` or ``"stl"``.
    :param vectorize_particles: as for :class:`~numpyro_iwae.IWELBO`.
    :param weighting: as for :class:`~numpyro_iwae.IWELBO`.

    Example:
        >>> from numpyro_iwae import RenyiELBO
        >>> RenyiELBO(alpha=0.5, num_particles=8)
        RenyiELBO(alpha=0.5, num_particles=8, gradient_estimator='reparam', weighting='auto')

    """

    estimators = ("reparam", "stl")
    estimator_hint = " For DReG at alpha = 0 use IWELBO(gradient_estimator='dreg')."

    repr_fields = ("alpha", "num_particles", "gradient_estimator", "weighting")

    def __init__(
        self,
        alpha: float = 0.0,
        num_particles: int = 2,
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
        self.alpha = check_real(alpha, "alpha")

    def element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        """The Renyi bound per plate element, with its score-function terms."""
        bound = renyi_bound(log_w, self.alpha)
        if not score:
            return bound
        return with_score_terms(
            bound, log_w, log_q_score, signal=renyi_learning_signal(log_w, self.alpha)
        )
