r"""What the evaluators return: the estimate of :math:`\log p(x)` per plate element,
its standard error and diagnostics, and its export to ArviZ.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ImportanceDraws",
    "LogMarginalEstimate",
    "arviz_from_dict",
    "SUMOEstimate",
    "standard_errors",
]


class ImportanceDraws(NamedTuple):
    r"""S draws from the guide, not resampled, with what an ArviZ export and PSIS-LOO
    for an approximate posterior need (:mod:`numpyro_iwae.core.pointwise`).

    Attributes:
        values: the draws, ``{site: (S, *site_shape)}``.
        log_p: :math:`\log p(x, z_s)`, shape ``(S,)``.
        log_q: :math:`\log q(z_s)`, shape ``(S,)``; ``log_p - log_q`` are the draws'
            importance log weights.
        log_likelihood: per observed site, :math:`\log p(x_i \mid z_s)` of each
            element of its batch shape, ``(S, *batch_shape)``.

    """

    values: dict[str, jax.Array]
    log_p: jax.Array
    log_q: jax.Array
    log_likelihood: dict[str, jax.Array]


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
        draws: with ``num_draws=S``, S further draws from the guide, not resampled,
            with their densities and per-observation log-likelihoods
            (:class:`ImportanceDraws`); else ``None``.
        num_evaluations: where the cost depends on the run (adaptive tempered SMC),
            the model evaluations (a density, or a density with its gradient) the
            estimate took per element, like ``pointwise``; else ``None``.

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
    draws: ImportanceDraws | None = None
    num_evaluations: jax.Array | None = None

    def to_inference_data(self) -> Any:
        """The estimate as ArviZ data: :class:`arviz.InferenceData` on ArviZ 0.x, an
        :class:`xarray.DataTree` on 1.x.

        With ``num_draws`` (:attr:`draws`): ``posterior`` holds the guide's draws, not
        resampled (one chain); ``log_likelihood`` each observed site's
        per-observation log-likelihood; ``sample_stats`` the draws' ``log_p`` and
        ``log_q`` and the estimate as ``log_marginal_likelihood`` (PyMC's name),
        repeated per draw. ArviZ 1.x's ``loo_approximate_posterior(idata,
        log_p=..., log_q=...)`` then gives PSIS-LOO corrected for the guide
        (docs: "Comparing models"). With ``num_samples``: the importance-resampled
        draws in a group of their own, ``resampled_posterior``, so that ArviZ's
        MCMC diagnostics do not read them as a chain. Every group's attributes hold
        ``log_marginal``, ``stderr``, ``ess`` and ``k_hat``.

        :raises ValueError: if the estimate was made with neither ``num_draws`` nor
            ``num_samples``.
        """
        import arviz as az

        if self.draws is None and self.samples is None:
            raise ValueError(
                "This estimate holds no draws; create MarginalLikelihood with num_draws=S "
                "(the guide's draws with their log-likelihoods, for LOO) or num_samples=S "
                "(posterior draws by importance resampling)."
            )
        attrs = {
            "log_marginal": float(self.log_marginal),
            "stderr": float(self.stderr),
            "ess": np.asarray(self.ess).tolist(),
            "k_hat": np.asarray(self.k_hat).tolist(),
            "inference": "importance sampling (numpyro_iwae.MarginalLikelihood)",
        }
        groups: dict[str, dict[str, np.ndarray]] = {}
        if self.draws is not None:
            d = self.draws
            num = int(np.shape(d.log_p)[0])
            groups["posterior"] = _one_chain(d.values)
            if d.log_likelihood:  # a model observed only through factors has none
                groups["log_likelihood"] = _one_chain(d.log_likelihood)
            groups["sample_stats"] = _one_chain(
                {
                    "log_p": d.log_p,
                    "log_q": d.log_q,
                    "log_marginal_likelihood": np.full(num, float(self.log_marginal)),
                }
            )
        idata = _empty_arviz(az) if not groups else arviz_from_dict(az, groups)
        if self.samples is not None:
            resampled = arviz_from_dict(az, {"posterior": _one_chain(self.samples)})["posterior"]
            _add_group(az, idata, "resampled_posterior", resampled)
        for name in (*groups, *(("resampled_posterior",) if self.samples is not None else ())):
            idata[name].attrs.update(attrs)
        return idata


def _one_chain(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.asarray(v)[None] for name, v in arrays.items()}


def _empty_arviz(az: Any) -> Any:
    if int(az.__version__.split(".")[0]) >= 1:
        import xarray as xr

        return xr.DataTree()
    return az.InferenceData()


def _add_group(az: Any, idata: Any, name: str, group: Any) -> None:
    """A group outside ArviZ's scheme, on both lines."""
    if int(az.__version__.split(".")[0]) >= 1:
        idata[name] = group
    else:
        idata.add_groups({name: group})


def standard_errors(variance: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """``(stderr, pointwise_stderr)`` from per-element variances of the log estimate:
    the square root of their sum and of each. One particle or replicate says nothing
    about the spread: both are then NaN (unknown, not 0).
    """
    if count > 1:
        return jnp.sqrt(jnp.sum(variance)), jnp.sqrt(variance)
    return jnp.float32(jnp.nan), jnp.full(jnp.shape(variance), jnp.nan, jnp.result_type(variance))


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
