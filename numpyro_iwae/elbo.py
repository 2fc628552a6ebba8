"""IWELBO: the importance-weighted bound as a NumPyro ``ELBO`` objective."""

from __future__ import annotations

from collections.abc import Callable
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.infer.elbo import ELBO

from numpyro_iwae.estimators import iwae_bound
from numpyro_iwae.weights import check_subsampling, log_weights

__all__ = ["IWELBO", "GRADIENT_ESTIMATORS"]

#: The accepted values of ``IWELBO(gradient_estimator=...)``.
GRADIENT_ESTIMATORS = ("reparam", "stl", "dreg")
_IMPLEMENTED = ("reparam",)


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, or raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def _average_particles(state: dict[str, Any] | None) -> dict[str, Any] | None:
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
    :math:`N/B` multiplies the bound outside it. Sample sites outside a plate
    (global latents) make the weights joint over that plate: the bound stays
    valid but is looser, and a :class:`~numpyro_iwae.weights.JointWeightsWarning`
    is issued for large plates. Subsampling such a plate with ``K > 1`` is an
    error (no unbiased estimate exists).

    Particles are drawn in parallel with :func:`jax.vmap` (or ``lax.map``); every
    particle sees the same minibatch.

    :param num_particles: K, the number of importance samples per plate element.
    :param gradient_estimator: how guide parameters are differentiated:
        ``"reparam"`` (the total derivative of the bound, Burda et al. 2016).
        ``"stl"`` and ``"dreg"`` are reserved for the next release. Model
        parameters always receive the IWAE gradient
        :math:`\sum_k \tilde w_k \nabla_\theta \log w_k`.
    :param vectorize_particles: ``True`` for :func:`jax.vmap`, ``False`` for
        :func:`jax.lax.map` (less memory, slower), or a callable
        ``f(fn, keys)`` as in :class:`numpyro.infer.elbo.ELBO`.

    **Mutable state** (:func:`numpyro.mutable`, e.g. batch-norm statistics) is
    returned by :meth:`loss_with_mutable_state` as the mean over particles of
    each floating-point value (the first particle's value for other dtypes).

    **Weights of zero.** A particle whose log weight is ``-inf`` or NaN (a
    density evaluated outside its support) gets weight zero. If every particle
    of a plate element has weight zero, the bound is ``-inf`` and the loss
    ``+inf``, never NaN; that element contributes no gradient.

    Guide sites without a reparameterized sampler (discrete latents) raise
    :class:`NotImplementedError` for now.

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

    can_infer_discrete = False

    def __init__(
        self,
        num_particles: int = 8,
        *,
        gradient_estimator: str = "reparam",
        vectorize_particles: bool | Callable = True,
    ) -> None:
        num_particles = check_positive_int(num_particles, "num_particles")
        if gradient_estimator not in GRADIENT_ESTIMATORS:
            raise ValueError(
                f"`gradient_estimator` must be one of {GRADIENT_ESTIMATORS}, got "
                f"{gradient_estimator!r}."
            )
        if gradient_estimator not in _IMPLEMENTED:
            raise NotImplementedError(
                f"gradient_estimator={gradient_estimator!r} is not implemented yet; use 'reparam'."
            )
        if not (isinstance(vectorize_particles, bool) or callable(vectorize_particles)):
            raise TypeError(
                "`vectorize_particles` must be True (jax.vmap), False (jax.lax.map) "
                f"or a callable f(fn, keys), got {vectorize_particles!r}."
            )
        self.gradient_estimator = gradient_estimator
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)

    def __repr__(self) -> str:
        return (
            f"IWELBO(num_particles={self.num_particles}, "
            f"gradient_estimator={self.gradient_estimator!r})"
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
        weights, structure = log_weights(
            model,
            guide,
            param_map,
            args,
            kwargs,
            rng_key,
            self.num_particles,
            self.vectorize_particles_fn,
        )
        check_subsampling(structure, self.num_particles)
        if structure.nonreparam_sites:
            raise NotImplementedError(
                f"Guide site(s) {list(structure.nonreparam_sites)} have no "
                "reparameterized sampler (discrete latents). Their gradient needs a "
                "score-function estimator (VIMCO), which IWELBO does not provide yet; "
                "marginalize them out in the model or use TraceGraph_ELBO."
            )
        bound = structure.scale * jnp.sum(iwae_bound(weights.log_w))
        return {"loss": -bound, "mutable_state": _average_particles(weights.mutable_state)}
