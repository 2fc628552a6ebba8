"""IWELBO: the importance-weighted bound as a NumPyro ``ELBO`` objective."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.infer.elbo import ELBO

from numpyro_iwae._jax import check_positive_int
from numpyro_iwae.core.draw import draw_particles
from numpyro_iwae.core.paths import dreg_log_weights
from numpyro_iwae.core.plan import check_subsampling
from numpyro_iwae.core.plates import WEIGHTINGS, PlateStructure
from numpyro_iwae.core.program import GuideDraw, Program
from numpyro_iwae.core.stages import any_nan_data, mark_nan_data
from numpyro_iwae.maths.bounds import iwae_bound, nan_to_neginf
from numpyro_iwae.maths.surrogates import with_score_terms

__all__ = [
    "GRADIENT_ESTIMATORS",
    "average_particles",
    "IWELBO",
    "zero_weight_log_w",
    "total_objective",
    "refuse_global_sites",
    "local_objective",
]


#: The accepted values of ``IWELBO(gradient_estimator=...)``.
GRADIENT_ESTIMATORS = ("reparam", "stl", "dreg")


def average_particles(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mutable state of K particles -> one state: the mean of floating arrays
    over the particle axis, the first particle's value for anything else.
    """
    if state is None:
        return None

    def reduce(x: jax.Array) -> jax.Array:
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.mean(x, axis=0)
        return x[0]

    return jax.tree.map(reduce, state)


class IWELBO(ELBO):
    r"""The importance-weighted evidence lower bound (IWAE bound) for NumPyro SVI.

    For each element :math:`n` of the plates that enclose every sample site (each
    datapoint, for a VAE), with :math:`z_{k} \sim q_\phi(z \mid x_n)` drawn
    independently for :math:`k = 1, \dots, K`,

    .. math::

        \hat{\mathcal{L}}_K = \frac{N}{B} \sum_{n \in \text{batch}}
            \Big[\operatorname{logsumexp}_k \big(\log p_\theta(x_n, z_{k,n})
            - \log q_\phi(z_{k,n} \mid x_n)\big) - \log K\Big],

    and :meth:`loss` returns :math:`-\hat{\mathcal{L}}_K`. In expectation
    :math:`\mathrm{ELBO} = \mathcal{L}_1 \le \mathcal{L}_K \le \mathcal{L}_{K+1}
    \le \log p_\theta(x)` (Burda, Grosse & Salakhutdinov, 2016, *Importance
    Weighted Autoencoders*, ICLR). Dimensions of a site's ``log_prob`` outside
    those plates are summed before the ``logsumexp``; the subsampling factor
    :math:`N/B` multiplies the bound outside it.

    **Global and local latents.** For sample sites outside a data plate (global
    latents :math:`\theta`) next to latents inside it, ``weighting`` chooses:

    - ``"local"``: :math:`\theta \sim q(\theta)` is drawn once per step and shared by
      every particle, and the particles of the plate's latents are weighted per
      element (Geffner & Domke, 2022, *Variational Inference with Locally Enhanced
      Bounds for Hierarchical Models*, ICML):

      .. math::

          \log p(\theta) - \log q(\theta) + \frac{N}{B} \sum_{n \in \text{batch}}
          \Big[\operatorname{logsumexp}_k \log
          \frac{p(x_n, z_{nk} \mid \theta)}{q(z_{nk} \mid x_n, \theta)} - \log K\Big].

      A lower bound for every K, the ELBO at K = 1, exact for the exact posterior,
      and unbiased under minibatching. Plates whose latents reach sites outside
      them are made global (see :doc:`/local`). The global sites get the ELBO's
      gradient (STL with ``"stl"`` and ``"dreg"``); discrete global sites the
      score-function gradient.
    - ``"joint"``: one weight per particle for the whole plate. Valid, tighter for a
      few datapoints, but with latents inside the plate it falls towards the ELBO as
      the plate grows (a :class:`~numpyro_iwae.JointWeightsWarning` for large plates),
      and subsampling it with ``K > 1`` is an error (no unbiased estimate exists).
    - ``"auto"`` (default): importance-weights whatever can be weighted without
      bias (:func:`~numpyro_iwae.core.plan.choose_weighting`). Global latents next to a
      plate of observations only (an ordinary regression): joint, the IWAE bound over
      the global latents, whose gain does not shrink with the data; if that plate is
      subsampled, the ELBO (no importance-weighted bound minibatches without bias
      there; an :class:`~numpyro_iwae.UnweightedBoundWarning` says so). Latents inside
      the plate: local if it is subsampled or has at least
      :data:`~numpyro_iwae.core.plan.AUTO_LOCAL_SIZE` elements (before subsampling, so
      minibatches and full data get the same objective), joint otherwise. With
      K = 1 every weighting is the ELBO and ``"auto"`` is ``Trace_ELBO``'s. When every
      latent is local to the independent plates the two are the same.

    Particles are drawn in parallel with :func:`jax.vmap` (or ``lax.map``); every
    particle sees the same minibatch.

    :param num_particles: K, the number of importance samples per plate element.
    :param gradient_estimator: how the guide's parameters :math:`\phi` are
        differentiated through reparameterized sites:

        - ``"reparam"``: :math:`\sum_k \tilde w_k \nabla_\phi \log w_k`, the total
          derivative of the bound (Burda et al., 2016);
        - ``"stl"``: :math:`\sum_k \tilde w_k \frac{\partial \log w_k}{\partial z_k}
          \frac{\partial z_k}{\partial\phi}` with :math:`\log q` at
          ``stop_gradient`` parameters (Roeder, Wu & Duvenaud, 2017, *Sticking the
          Landing*); lower variance, biased for ``K > 1``;
        - ``"dreg"``: :math:`\sum_k \tilde w_k^2 \frac{\partial \log w_k}{\partial
          z_k} \frac{\partial z_k}{\partial\phi}` (Tucker et al., 2019); unbiased
          for the same gradient as ``"reparam"`` and its signal-to-noise ratio
          does not vanish as K grows. Costs one forward and one backward pass.

        Model parameters :math:`\theta` (those the guide does not use) always
        receive the IWAE gradient :math:`\sum_k \tilde w_k \nabla_\theta \log w_k`.
        A parameter used by both model and guide gets the IWAE gradient for its
        use in the model plus the chosen estimator's gradient for its use in
        the guide.
    :param vectorize_particles: ``True`` for :func:`jax.vmap`, ``False`` for
        :func:`jax.lax.map` (less memory, slower), or a callable
        ``f(fn, keys)`` as in :class:`numpyro.infer.elbo.ELBO`.
    :param weighting: ``"auto"``, ``"local"`` or ``"joint"``: how particles are
        weighted when some latents are global (above).

    **Mutable state** (:func:`numpyro.mutable`, e.g. batch-norm statistics) is
    returned by :meth:`loss_with_mutable_state` as the mean over particles of
    each floating-point value (the first particle's value for other dtypes).

    **Weights of zero.** A particle whose log weight is ``-inf`` or NaN (a
    density evaluated outside its support, a scale that underflowed to 0) gets
    weight zero and contributes exactly zero gradient, even where the model's
    derivatives are infinite (0 x inf would be NaN): its latent values get a zero
    cotangent, and if the model's shared parameters still get a non-finite one, the
    model's backward pass is redone with it moved onto a live particle of its plate
    element (:func:`~numpyro_iwae.core.guard.zero_weight_safe`). If every particle of
    a plate element has weight zero, the bound is ``-inf`` and the loss ``+inf``,
    never NaN.

    **NaN or infinite data.** An observed value that is NaN (as with ``Trace_ELBO``)
    or infinite (where ``Trace_ELBO``'s loss is ``+inf``), and not masked, makes its
    plate element's bound, and so the loss, NaN; it is not read as a weight of zero.
    :class:`~numpyro_iwae.MarginalLikelihood` raises an error naming the site.

    **Guide factors.** ``numpyro.factor`` and observed sites in the guide enter
    :math:`\log q` as in ``Trace_ELBO``, per plate element. ``"stl"`` and ``"dreg"``
    need :math:`\log q` to be the density the guide samples from and refuse such
    guides.

    **Discrete latents.** Guide sites without a reparameterized sampler
    (``Bernoulli``, ``Categorical``, ...) get the VIMCO score-function term with
    leave-one-out baselines (Mnih & Rezende, 2016; see
    :func:`~numpyro_iwae.maths.surrogates.vimco_learning_signal`) on top of the pathwise
    gradient of the other sites; with ``K = 1`` it is the plain score-function
    estimator, without a baseline. ``"stl"`` and ``"dreg"`` change only the
    reparameterized sites.

    Example:
        >>> import jax, optax, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import SVI
        >>> from numpyro.infer.autoguide import AutoNormal
        >>> from numpyro_iwae import IWELBO
        >>> def model(x):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> guide = AutoNormal(model)
        >>> svi = SVI(model, guide, optax.adam(0.05), IWELBO(num_particles=16))
        >>> result = svi.run(jax.random.key(0), 300, 1.0, progress_bar=False)
        >>> bool(result.losses[-1] < result.losses[0])
        True

    """

    can_infer_discrete = True
    #: The gradient estimators this objective defines, and what to say otherwise.
    _estimators: tuple[str, ...] = GRADIENT_ESTIMATORS
    _estimator_hint = ""

    def __init__(
        self,
        num_particles: int = 8,
        *,
        gradient_estimator: str = "reparam",
        vectorize_particles: bool | Callable = True,
        weighting: str = "auto",
    ) -> None:
        num_particles = check_positive_int(num_particles, "num_particles")
        if gradient_estimator not in self._estimators:
            raise ValueError(
                f"{type(self).__name__} takes gradient_estimator one of {self._estimators}, "
                f"got {gradient_estimator!r}.{self._estimator_hint}"
            )
        if not (isinstance(vectorize_particles, bool) or callable(vectorize_particles)):
            raise TypeError(
                "`vectorize_particles` must be True (jax.vmap), False (jax.lax.map) "
                f"or a callable f(fn, keys), got {vectorize_particles!r}."
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}.")
        self.gradient_estimator = gradient_estimator
        self.weighting = weighting
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)

    def __repr__(self) -> str:
        return (
            f"IWELBO(num_particles={self.num_particles}, "
            f"gradient_estimator={self.gradient_estimator!r}, weighting={self.weighting!r})"
        )

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Negative importance-weighted bound and the updated mutable state.

        :param rng_key: a JAX PRNG key.
        :param param_map: current values of ``param`` sites, keyed by name.
        :param model: NumPyro model.
        :param guide: NumPyro guide.
        :param args: positional arguments of model and guide.
        :param kwargs: keyword arguments of model and guide.
        :return: ``{"loss": scalar, "mutable_state": dict or None}``.
        """
        log_w, log_q_score, structure, output = self._log_weights(
            rng_key, param_map, Program(model, guide, args, kwargs)
        )
        bound = total_objective(log_w, log_q_score, structure, self._element_bound)
        return {"loss": -bound, "mutable_state": average_particles(output.mutable_state or None)}

    #: How many independent sets of ``num_particles`` particles are drawn (MIWAE's M).
    _replicates = 1

    def _log_weights(
        self, rng_key: jax.Array, param_map: dict[str, jax.Array], program: Program
    ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], PlateStructure, Any]:
        """Draw ``replicates x num_particles`` particles and return their log weights
        per group (with the surrogate of the chosen gradient estimator), the log
        density of the discrete guide sites, the plate structure and the model's
        output.
        """
        draw, model_fn, structure, model_params = self._draw(rng_key, param_map, program)
        if self.gradient_estimator == "dreg":
            log_w, output = dreg_log_weights(
                model_fn,
                draw.values,
                model_params,
                draw.log_q_rep_path,
                draw.log_q_score,
                structure.value_axes,
                structure.value_groups,
                replicates=self._replicates,
            )
        else:
            log_p, output = model_fn(draw.values, model_params)
            log_q_rep = draw.log_q_rep_path if self.gradient_estimator == "stl" else draw.log_q_rep
            log_w = tuple(p - q - s for p, q, s in zip(log_p, log_q_rep, draw.log_q_score))
        return zero_weight_log_w(log_w, output, structure), draw.log_q_score, structure, output

    def _draw(
        self, rng_key: jax.Array, param_map: dict[str, jax.Array], program: Program
    ) -> tuple[GuideDraw, Callable, PlateStructure, dict[str, Any]]:
        """Draw the particles and check what the objective needs; return the draw, the
        model's log density as a function of (values, params), the plate structure and
        the parameters to call it with (global values, under local weighting, enter
        the model as parameters do: shared by every particle, with the plain gradient).
        """
        draw, model_fn, structure = draw_particles(
            program,
            param_map,
            rng_key,
            self._replicates * self.num_particles,
            self.vectorize_particles_fn,
            path=self._draw_path(),
            weighting=self.weighting,
            bound_particles=self._bound_particles(),
        )
        check_subsampling(structure, self.num_particles)
        self._check_structure(structure)
        if self.gradient_estimator == "dreg" and self.num_particles > 1:
            if structure.scaled_guide_sites:
                raise ValueError(
                    f"{type(self).__name__}(gradient_estimator='dreg') assumes log w = "
                    "log p - log q with q the density the guide samples from, but guide "
                    f"site(s) {list(structure.scaled_guide_sites)} are scaled "
                    "(handlers.scale, e.g. KL annealing or tempering): the weights become "
                    "softmax(c log w) and DReG's squared weights are then biased. Use "
                    "gradient_estimator='reparam' (unbiased for the scaled objective)."
                )
        if self.gradient_estimator != "reparam" and structure.guide_factor_sites:
            hint = (
                " Use gradient_estimator='reparam', which includes them as Trace_ELBO does."
                if "reparam" in self._estimators
                else ""
            )
            raise ValueError(
                f"{type(self).__name__}(gradient_estimator={self.gradient_estimator!r}) "
                "needs log q to be the density the guide samples from, but the guide also "
                f"has observed or factor site(s) {list(structure.guide_factor_sites)}.{hint}"
            )
        return draw, model_fn, structure, {**param_map, **draw.global_values}

    def _bound_particles(self) -> int:
        """The particles of the objective's largest ``logsumexp`` (K = 1 makes
        every weighting the ELBO; ``weighting="auto"`` reads it).
        """
        return self.num_particles

    def _draw_path(self) -> str | None:
        """Which stopped-parameter part of ``log q`` the draw must also compute
        (``path`` of :func:`~numpyro_iwae.core.draw.draw_particles`).
        """
        return None if self.gradient_estimator == "reparam" else self.gradient_estimator

    def _check_structure(self, structure: PlateStructure) -> None:
        """Raise for a model/guide the objective does not support (none for IWELBO)."""

    def _element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        """The objective per plate element from ``(K, *plates)`` log weights, with the
        score-function terms of the discrete sites when ``score``.
        """
        bound = iwae_bound(log_w)
        return with_score_terms(bound, log_w, log_q_score) if score else bound


def zero_weight_log_w(
    log_w: tuple[jax.Array, ...], output: Any, structure: PlateStructure
) -> tuple[jax.Array, ...]:
    """Per group, NaN log weights mapped to ``-inf`` (weight zero), except at plate
    elements whose observed data is NaN, which stay NaN (see
    :func:`~numpyro_iwae.core.stages.mark_nan_data`).
    """
    nan_data = any_nan_data(output, structure)
    return tuple(mark_nan_data(nan_to_neginf(w), n) for w, n in zip(log_w, nan_data))


def total_objective(
    log_w: tuple[jax.Array, ...],
    parts: tuple[Any, ...],
    structure: PlateStructure,
    element_bound: Callable[[jax.Array, Any, bool], jax.Array],
) -> jax.Array:
    """The objective summed over plate elements and scaled for subsampling: under
    local weighting :func:`local_objective`, under joint weighting ``element_bound``
    of the one group (with the score-function terms when the guide has discrete
    sites); ``parts`` holds each group's second argument of ``element_bound``.
    """
    if structure.weighting == "local":
        per_element = local_objective(log_w, parts, structure, element_bound)
    else:
        per_element = element_bound(log_w[0], parts[0], bool(structure.nonreparam_sites))
    return structure.scale * jnp.sum(per_element)


def refuse_global_sites(structure: PlateStructure, objective: str, why: str) -> None:
    """Raise a ValueError if local weighting draws global latent sites, which
    ``objective`` does not support (``why`` says why and what to use instead).
    """
    if structure.weighting == "local" and structure.global_sites:
        raise ValueError(
            f"{objective} does not support global site(s) {list(structure.global_sites)} "
            f"under local weighting: {why}"
        )


def local_objective(
    log_w: tuple[jax.Array, ...],
    log_q_score: tuple[jax.Array, ...],
    structure: PlateStructure,
    element_bound: Callable[[jax.Array, jax.Array, bool], jax.Array],
) -> jax.Array:
    r"""The locally weighted bound per element of the independent plates, with the
    score-function terms of the discrete sites.

    Group 0 (the global sites, shared by every particle, so its rows agree) gives
    :math:`\log p(\theta) - \log q(\theta)`; each local plate adds
    :math:`\frac{N}{B}\sum_n \hat{\mathcal L}_{K,n}` with VIMCO terms for its discrete
    sites (each plate's objective is ``element_bound``). Discrete global sites get
    the score-function term of the whole objective (the ELBO's estimator for them: it
    has no baseline).
    """
    total = log_w[0][0]
    for group in range(1, structure.num_groups):
        score = bool(structure.group_sites(group, structure.nonreparam_sites))
        per_element = element_bound(log_w[group], log_q_score[group], score)
        total = total + structure.local_scale(group) * jnp.sum(per_element, axis=-1)
    if structure.group_sites(0, structure.nonreparam_sites):
        log_q = log_q_score[0][0]
        total = total + jax.lax.stop_gradient(total) * (log_q - jax.lax.stop_gradient(log_q))
    return total
