"""IWELBO: the importance-weighted bound as a NumPyro ``ELBO`` objective."""

from __future__ import annotations

import jax

from numpyro_iwae.maths.bounds import iwae_bound
from numpyro_iwae.maths.surrogates import with_score_terms
from numpyro_iwae.objectives.base import Objective

__all__ = ["IWELBO", "iwae_element_bound"]


def iwae_element_bound(log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
    """The IWAE bound per plate element from ``(K, *plates)`` log weights, with VIMCO's
    score-function terms for the discrete guide sites when ``score``.
    """
    bound = iwae_bound(log_w)
    return with_score_terms(bound, log_w, log_q_score) if score else bound


class IWELBO(Objective):
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

    def element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        """The IWAE bound per plate element (:func:`iwae_element_bound`)."""
        return iwae_element_bound(log_w, log_q_score, score)
