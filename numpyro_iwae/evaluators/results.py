r"""What the evaluators return: the estimate of :math:`\log p(x)` per plate element,
its standard error and diagnostics, and its export to ArviZ.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["LogMarginalEstimate", "arviz_from_dict", "SUMOEstimate"]


class LogMarginalEstimate(NamedTuple):
    r"""An importance-sampling estimate of :math:`\log p(x)` with its diagnostics.

    Attributes:
        log_marginal: :math:`\log \hat p(x)`, the sum of ``pointwise``.
        pointwise: one estimate :math:`\log \frac1K \sum_k w_k` per element of the
            plates that enclose every sample site (per datapoint for a VAE); shape
            ``()`` when there is no such plate.
        stderr: standard error of ``log_marginal`` by the delta method,
            :math:`\sqrt{\sum_n (1/\mathrm{ESS}_n - 1/K)}` (NaN for one particle).
        pointwise_stderr: the same per element, :math:`\sqrt{1/\mathrm{ESS}_n - 1/K}`.
        ess: effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2`, like
            ``pointwise``.
        k_hat: PSIS Pareto shape estimate of the weights' tail, like ``pointwise``
            (Vehtari et al., 2024): below 0.5 the estimate is reliable, above 0.7 the
            weights' variance is likely infinite and ``stderr`` is not to be trusted.
            ``inf`` when fewer than five weights exceed the tail cutoff (e.g. all
            weights equal).
        log_weights: the ``(K, *plate_shape)`` log weights when requested with
            ``return_log_weights=True``, else ``None``.
        samples: approximate posterior samples, ``{site: (S, *site_shape)}``, drawn
            by importance resampling when ``num_samples=S``, else ``None``.
        local_ess: under local weighting (nested), the effective sample size of the
            inner (local) weights per element of each local plate,
            ``{plate: (*plate_shape, local size)}``, the median over the global
            draws; else ``None``. ``ess``, ``k_hat`` and ``log_weights`` then
            describe the outer weights, one per global draw.
        local_k_hat: like ``local_ess``, the inner weights' PSIS :math:`\hat k`.
        data_digest: a digest of the observed values the estimate was computed on
            (:func:`~numpyro_iwae.core.program.observed_digest`), so that
            :func:`~numpyro_iwae.compare_evidence` refuses estimates on different data.

    """

    log_marginal: jax.Array
    pointwise: jax.Array
    stderr: jax.Array
    pointwise_stderr: jax.Array
    ess: jax.Array
    k_hat: jax.Array
    log_weights: jax.Array | None = None
    samples: dict[str, jax.Array] | None = None
    local_ess: dict[str, jax.Array] | None = None
    local_k_hat: dict[str, jax.Array] | None = None
    data_digest: str | None = None

    def to_inference_data(self) -> Any:
        """The resampled posterior as ArviZ data: :class:`arviz.InferenceData` on
        ArviZ 0.x, an :class:`xarray.DataTree` on ArviZ 1.x (whose ``from_dict`` takes
        one ``{group: {variable: array}}`` mapping).

        The ``posterior`` group holds the samples (one chain); its attributes keep
        the estimate's ``log_marginal``, ``stderr``, and the per-element ``ess``
        and ``k_hat`` so the diagnostics travel with the draws.

        :raises ValueError: if the estimate was made without ``num_samples``.
        """
        import arviz as az

        if self.samples is None:
            raise ValueError(
                "This estimate has no posterior samples; create MarginalLikelihood with "
                "num_samples=S (posterior draws by importance resampling)."
            )
        posterior = {name: np.asarray(v)[None] for name, v in self.samples.items()}
        attrs = {
            "log_marginal": float(self.log_marginal),
            "stderr": float(self.stderr),
            "ess": np.asarray(self.ess).tolist(),
            "k_hat": np.asarray(self.k_hat).tolist(),
            "inference": "importance resampling (numpyro_iwae.MarginalLikelihood)",
        }
        idata = arviz_from_dict(az, {"posterior": posterior})
        idata.posterior.attrs.update(attrs)
        return idata


def arviz_from_dict(az: Any, groups: dict[str, dict[str, np.ndarray]]) -> Any:
    """``az.from_dict`` on both ArviZ lines: 1.x takes one ``{group: {var: array}}``
    mapping, 0.x one keyword argument per group.
    """
    if int(az.__version__.split(".")[0]) >= 1:
        return az.from_dict(groups)
    return az.from_dict(**groups)


class SUMOEstimate(NamedTuple):
    r"""A SUMO estimate of :math:`\log p(x)` from independent replicates.

    Attributes:
        log_marginal: the mean over replicates of the summed estimate, the sum of
            ``pointwise``.
        pointwise: the mean over replicates, per element of the plates that enclose
            every sample site (shape ``()`` when there is no such plate).
        stderr: standard error of ``log_marginal``: the replicates' sample standard
            deviation of their sums over :math:`\sqrt R` (NaN for one replicate).
        pointwise_stderr: the same per element.
        replicates: the ``(R, *plate_shape)`` estimates themselves.
        mean_particles: particles drawn (model evaluations per element) per
            replicate, on average: the cost.
        data_digest: as :attr:`LogMarginalEstimate.data_digest`.

    """

    log_marginal: jax.Array
    pointwise: jax.Array
    stderr: jax.Array
    pointwise_stderr: jax.Array
    replicates: jax.Array
    mean_particles: jax.Array
    data_digest: str | None = None

    def to_inference_data(self) -> Any:
        """The replicates as ArviZ data (:class:`arviz.InferenceData` on ArviZ 0.x, an
        :class:`xarray.DataTree` on 1.x): ``sample_stats`` holds each replicate's
        per-element estimate as ``log_marginal_likelihood`` (one chain, R draws; PyMC's
        name), with the estimate, its standard error and the mean particles per
        replicate in its attributes. SUMO draws no posterior samples.
        """
        import arviz as az

        idata = arviz_from_dict(
            az, {"sample_stats": {"log_marginal_likelihood": np.asarray(self.replicates)[None]}}
        )
        idata.sample_stats.attrs.update(
            {
                "log_marginal": float(self.log_marginal),
                "stderr": float(self.stderr),
                "mean_particles": float(self.mean_particles),
                "inference": "SUMO (numpyro_iwae.SUMOMarginal)",
            }
        )
        return idata
