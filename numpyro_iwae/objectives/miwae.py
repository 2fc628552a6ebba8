"""MIWAE (Rainforth et al., 2018): M independent IWAE bounds of K particles, averaged."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from numpyro_iwae._jax import check_positive_int
from numpyro_iwae.objectives.base import Objective
from numpyro_iwae.objectives.iwelbo import iwae_element_bound

__all__ = ["MIWAE", "replicate_mean"]


class MIWAE(Objective):
    r"""The multiply importance-weighted bound: M independent IWAE bounds of K
    particles, averaged (Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, 2018,
    *Tighter Variational Bounds are Not Necessarily Better*, ICML):

    .. math::

        \mathrm{MIWAE}(M, K) = \frac1M \sum_{m=1}^{M}
            \log \frac1K \sum_{k=1}^{K} w_{m,k},

    per plate element (see :func:`~numpyro_iwae.maths.bounds.miwae_bound`). M = 1 is
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

    repr_fields = ("num_particles", "num_replicates", "gradient_estimator", "weighting")

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
        self.replicates = self.num_replicates

    def element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        """The mean over the M replicates of their IWAE bounds (:func:`replicate_mean`)."""
        return replicate_mean(iwae_element_bound, self.replicates, log_w, log_q_score, score)


def replicate_mean(
    element_bound: Callable[[jax.Array, jax.Array, bool], jax.Array],
    replicates: int,
    log_w: jax.Array,
    log_q_score: jax.Array,
    score: bool,
) -> jax.Array:
    """``element_bound`` of each of ``replicates`` consecutive sets of particles of
    ``(replicates x K, *plates)`` log weights, averaged over the sets.
    """
    shape = (replicates, log_w.shape[0] // replicates) + log_w.shape[1:]
    per_replicate = jax.vmap(lambda w, q: element_bound(w, q, score))(
        log_w.reshape(shape), log_q_score.reshape(shape)
    )
    return jnp.mean(per_replicate, axis=0)
