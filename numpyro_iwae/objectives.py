r"""The importance-weighted objective family beside :class:`~numpyro_iwae.IWELBO`.

Each is a NumPyro ``ELBO`` usable in ``SVI``, per plate element, minibatched with the
subsampling factor outside every ``logsumexp``, with local or joint weighting as
IWELBO; they share its weights code and differ only in the array maths that turns a
plate element's K log weights into its objective (``numpyro_iwae.estimators``).
``loss`` returns the negative of the objective's value.
"""

from __future__ import annotations

from collections.abc import Callable
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from numpyro_iwae.elbo import (
    IWELBO,
    average_particles,
    check_positive_int,
    refuse_global_sites,
    total_objective,
    zero_weight_log_w,
)
from numpyro_iwae.estimators import (
    ciwae_bound,
    dreg_surrogate,
    iwae_bound,
    renyi_bound,
    renyi_learning_signal,
    split_gradient_paths,
    with_score_terms,
)
from numpyro_iwae.plates import PlateStructure
from numpyro_iwae.weights import Program

__all__ = ["CIWAE", "MIWAE", "PIWAE", "RenyiELBO"]


def _check_real(
    value: float, name: str, low: float | None = None, high: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite real number, got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value!r}.")
    return float(value)


class MIWAE(IWELBO):
    r"""The multiply importance-weighted bound: M independent IWAE bounds of K
    particles, averaged (Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, 2018,
    *Tighter Variational Bounds are Not Necessarily Better*, ICML):

    .. math::

        \mathrm{MIWAE}(M, K) = \frac1M \sum_{m=1}^{M}
            \log \frac1K \sum_{k=1}^{K} w_{m,k},

    per plate element (see :func:`~numpyro_iwae.estimators.miwae_bound`). M = 1 is
    IWELBO(K), K = 1 the ELBO estimated with M particles. Every gradient estimator of
    :class:`~numpyro_iwae.IWELBO` applies within each replicate (DReG's weights are
    normalized per replicate; VIMCO's baselines leave one out of its replicate).

    :param num_particles: K, the particles of each replicate.
    :param num_replicates: M, the number of independent replicates.
    :param gradient_estimator: as for :class:`~numpyro_iwae.IWELBO`.
    :param vectorize_particles: as for :class:`~numpyro_iwae.IWELBO`.
    :param weighting: as for :class:`~numpyro_iwae.IWELBO`; under local weighting
        every replicate shares the step's global draw.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro_iwae import MIWAE
        >>> def model():
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=0.5)
        >>> def guide():  # the exact posterior: every weight equals p(x)
        ...     numpyro.sample("z", dist.Normal(0.25, 0.5**0.5))
        >>> miwae = MIWAE(num_particles=4, num_replicates=3)
        >>> loss = miwae.loss(jax.random.key(0), {}, model, guide)
        >>> exact = float(dist.Normal(0.0, 2**0.5).log_prob(0.5))  # x ~ N(0, 2)
        >>> abs(-float(loss) - exact) < 1e-5
        True

    """

    def __init__(
        self,
        num_particles: int = 8,
        num_replicates: int = 1,
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
        self.num_replicates = check_positive_int(num_replicates, "num_replicates")
        self._replicates = self.num_replicates

    def __repr__(self) -> str:
        return (
            f"MIWAE(num_particles={self.num_particles}, num_replicates={self.num_replicates}, "
            f"gradient_estimator={self.gradient_estimator!r}, weighting={self.weighting!r})"
        )

    def _element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        shape = (self._replicates, self.num_particles) + log_w.shape[1:]
        one = super()._element_bound
        per_replicate = jax.vmap(lambda w, q: one(w, q, score))(
            log_w.reshape(shape), log_q_score.reshape(shape)
        )
        return jnp.mean(per_replicate, axis=0)


class CIWAE(IWELBO):
    r"""The combination of the ELBO and the IWAE bound on the same K particles
    (Rainforth et al., 2018):

    .. math::

        \mathrm{CIWAE}_\beta = \beta\, \frac1K \sum_k \log w_k
            + (1 - \beta) \log \frac1K \sum_k w_k,

    per plate element (see :func:`~numpyro_iwae.estimators.ciwae_bound`); beta = 0 is
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
    _estimators = ("reparam", "stl")
    _estimator_hint = (
        " The doubly reparameterized estimator is defined for the IWAE bound, not for its "
        "mixture with the ELBO."
    )

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
        self.beta = _check_real(beta, "beta", 0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"CIWAE(num_particles={self.num_particles}, beta={self.beta}, "
            f"gradient_estimator={self.gradient_estimator!r}, weighting={self.weighting!r})"
        )

    def _check_structure(self, structure: PlateStructure) -> None:
        if structure.nonreparam_sites:
            raise ValueError(
                f"CIWAE has no score-function estimator for the discrete guide site(s) "
                f"{list(structure.nonreparam_sites)}. Use IWELBO or RenyiELBO (VIMCO), or "
                "enumerate the site."
            )

    def _element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        return ciwae_bound(log_w, self.beta)


class RenyiELBO(IWELBO):
    r"""The variational Renyi bound (Li & Turner, 2016, *Renyi Divergence Variational
    Inference*, NeurIPS), per plate element:

    .. math::

        \mathcal L_\alpha = \frac{1}{1 - \alpha} \log \frac1K \sum_{k=1}^K
            w_k^{1 - \alpha}

    (see :func:`~numpyro_iwae.estimators.renyi_bound`). ``alpha = 0`` is
    :class:`~numpyro_iwae.IWELBO`; ``alpha = 1`` is the ELBO (the limit); in
    expectation the bound decreases in alpha, and for alpha in [0, 1] it lies between
    the ELBO and the IWAE bound. A drop-in for :class:`numpyro.infer.RenyiELBO` that
    also forms the bound per plate element, takes ``gradient_estimator``
    (``"reparam"`` or ``"stl"``), ``weighting`` and subsampled plates, and gives
    discrete guide sites a score-function gradient with leave-one-out baselines
    (:func:`~numpyro_iwae.estimators.renyi_learning_signal`) where NumPyro's class
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

    _estimators = ("reparam", "stl")
    _estimator_hint = " For DReG at alpha = 0 use IWELBO(gradient_estimator='dreg')."

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
        self.alpha = _check_real(alpha, "alpha")

    def __repr__(self) -> str:
        return (
            f"RenyiELBO(alpha={self.alpha}, num_particles={self.num_particles}, "
            f"gradient_estimator={self.gradient_estimator!r}, weighting={self.weighting!r})"
        )

    def _element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        bound = renyi_bound(log_w, self.alpha)
        if not score:
            return bound
        return with_score_terms(
            bound, log_w, log_q_score, signal=renyi_learning_signal(log_w, self.alpha)
        )


class PIWAE(MIWAE):
    r"""The partially importance-weighted objective (Rainforth et al., 2018): from one
    set of M K particles, the model's parameters :math:`\theta` ascend
    :math:`\mathrm{IWAE}_{MK}` and the guide's parameters :math:`\phi` ascend
    :math:`\mathrm{MIWAE}(M, K)`:

    .. math::

        \nabla_\theta \log \frac{1}{MK} \sum_{m,k} w_{m,k}, \qquad
        \nabla_\phi \frac1M \sum_m \log \frac1K \sum_k w_{m,k}.

    The model is evaluated once; the two gradients take separate backward passes
    (:func:`~numpyro_iwae.estimators.split_gradient_paths`). :meth:`loss` returns
    :math:`-\mathrm{IWAE}_{MK}`, the bound the model is trained on. Model parameters
    are the ``param``/``module`` sites of the model; a parameter used by model and
    guide gets the IWAE gradient for its use in the model and the MIWAE gradient for
    its use in the guide. Gradient estimators for :math:`\phi`: ``"reparam"``,
    ``"stl"`` and ``"dreg"`` (MIWAE's doubly reparameterized gradient, per set of K:
    :func:`~numpyro_iwae.estimators.dreg_surrogate`; not with global latent sites
    under local weighting); discrete guide sites get MIWAE's VIMCO terms.

    :param num_particles: K, the particles of each of the guide's replicates.
    :param num_replicates: M.
    :param gradient_estimator: ``"reparam"``, ``"stl"`` or ``"dreg"``.
    :param vectorize_particles: as for :class:`~numpyro_iwae.IWELBO`.
    :param weighting: as for :class:`~numpyro_iwae.IWELBO`.

    Example:
        >>> from numpyro_iwae import PIWAE
        >>> PIWAE(num_particles=8, num_replicates=8)
        PIWAE(num_particles=8, num_replicates=8, gradient_estimator='reparam', weighting='auto')

    """

    _estimators = ("reparam", "stl", "dreg")
    _estimator_hint = ""

    def __init__(
        self,
        num_particles: int = 8,
        num_replicates: int = 1,
        *,
        gradient_estimator: str = "reparam",
        vectorize_particles: bool | Callable = True,
        weighting: str = "auto",
    ) -> None:
        super().__init__(
            num_particles,
            num_replicates,
            gradient_estimator=gradient_estimator,
            vectorize_particles=vectorize_particles,
            weighting=weighting,
        )

    def __repr__(self) -> str:
        return super().__repr__().replace("MIWAE(", "PIWAE(", 1)

    def _bound_particles(self) -> int:
        """The model's bound is over all M x K particles."""
        return self.num_particles * self.num_replicates

    def _check_structure(self, structure: PlateStructure) -> None:
        super()._check_structure(structure)
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
        bound = self._element_bound(log_w, log_q_score, score)
        return bound + dreg_surrogate(log_w, log_w_path, self._replicates)

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        r"""Negative :math:`\mathrm{IWAE}_{MK}` and the updated mutable state; the
        gradient is PIWAE's (see the class).
        """
        program = Program(model, guide, args, kwargs)
        draw, model_fn, structure, model_params = self._draw(rng_key, param_map, program)
        (log_p, output), log_p_theta = split_gradient_paths(
            model_fn, draw.values, model_params, structure.model_param_sites
        )
        log_q_rep = draw.log_q_rep_path if self.gradient_estimator == "stl" else draw.log_q_rep
        sg = jax.lax.stop_gradient
        # phi's log weights: values and guide densities live; theta's: only log p.
        log_w_phi = zero_weight_log_w(
            tuple(p - q - s for p, q, s in zip(log_p, log_q_rep, draw.log_q_score)),
            output,
            structure,
        )
        log_w_theta = zero_weight_log_w(
            tuple(p - sg(q) - sg(s) for p, q, s in zip(log_p_theta, log_q_rep, draw.log_q_score)),
            output,
            structure,
        )
        score_q = tuple(sg(s) for s in draw.log_q_score)
        element, phi_parts = self._element_bound, draw.log_q_score
        if self.gradient_estimator == "dreg":
            # phi's gradient: DReG's surrogate on the path log weights, plus MIWAE's
            # VIMCO terms for discrete sites; its log weights give only the value.
            paths = tuple(
                p - qp - sg(s) for p, qp, s in zip(log_p, draw.log_q_rep_path, draw.log_q_score)
            )
            log_w_phi = tuple(sg(w) for w in log_w_phi)
            element, phi_parts = self._dreg_element, tuple(zip(draw.log_q_score, paths))

        def iwae_all(log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
            return iwae_bound(log_w)

        theta = total_objective(log_w_theta, score_q, structure, iwae_all)
        phi = total_objective(log_w_phi, phi_parts, structure, element)
        bound = theta + phi - sg(phi)
        return {"loss": -bound, "mutable_state": average_particles(output.mutable_state or None)}
