r"""Comparing models by their estimated evidence: Bayes factors and posterior model
probabilities, each with its Monte Carlo standard error.

For models :math:`M_1, \dots, M_J` fitted to the same data :math:`x`, with estimates
:math:`\hat\ell_j \approx \log p(x \mid M_j)` and standard errors :math:`s_j` from
independent particles,

.. math::

   \log \widehat{\mathrm{BF}}_{j, b} = \hat\ell_j - \hat\ell_b, \qquad
   \mathrm{se} = \sqrt{s_j^2 + s_b^2},

against the best model :math:`b`, and with prior model probabilities :math:`\pi_j`

.. math::

   \hat P(M_j \mid x) = \frac{\pi_j e^{\hat\ell_j}}{\sum_i \pi_i e^{\hat\ell_i}}, \qquad
   \mathrm{se}^2 = \hat P_j^2 \Big[(1 - \hat P_j)^2 s_j^2 + \sum_{i \ne j} \hat P_i^2 s_i^2\Big]

(the delta method: :math:`\partial P_j / \partial \ell_i = P_j(\delta_{ij} - P_i)`). Kass &
Raftery (1995), *Bayes factors*, JASA 90, for their reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
import warnings

import numpy as np

__all__ = ["EvidenceComparison", "compare_evidence", "K_HAT_THRESHOLD"]

#: Above this PSIS :math:`\hat k` an importance-sampling estimate's standard error is not
#: to be trusted (Vehtari et al., 2024, *Pareto smoothed importance sampling*, JMLR).
K_HAT_THRESHOLD = 0.7


@dataclass(frozen=True)
class EvidenceComparison:
    r"""Models compared by evidence, best (largest log evidence) first.

    Attributes:
        names: the given names, best first.
        log_evidence: each model's :math:`\log \hat p(x)`.
        stderr: their standard errors.
        log_bayes_factor: :math:`\log \hat p(x \mid M) - \log \hat p(x \mid M_{best})`
            (0 for the best).
        log_bayes_factor_stderr: :math:`\sqrt{s_M^2 + s_{best}^2}` (0 for the best: it
            is compared with itself).
        prior_probs: the prior model probabilities used (normalized).
        posterior_probs: :math:`\hat P(M \mid x)`; they sum to 1.
        posterior_probs_stderr: their Monte Carlo standard errors (delta method).
        k_hat_max: the worst PSIS :math:`\hat k` of each estimate (NaN where the
            estimate has none, e.g. SUMO).

    """

    names: tuple[str, ...]
    log_evidence: np.ndarray
    stderr: np.ndarray
    log_bayes_factor: np.ndarray
    log_bayes_factor_stderr: np.ndarray
    prior_probs: np.ndarray
    posterior_probs: np.ndarray
    posterior_probs_stderr: np.ndarray
    k_hat_max: np.ndarray

    def __str__(self) -> str:
        header = ("model", "log evidence", "log BF vs best", "P(model | data)", "max k-hat")
        rows = [
            (
                name,
                f"{self.log_evidence[i]:.2f} ± {self.stderr[i]:.2f}",
                f"{self.log_bayes_factor[i]:.2f} ± {self.log_bayes_factor_stderr[i]:.2f}",
                f"{self.posterior_probs[i]:.3f} ± {self.posterior_probs_stderr[i]:.3f}",
                f"{self.k_hat_max[i]:.2f}",
            )
            for i, name in enumerate(self.names)
        ]
        widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
        lines = [
            "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
            for r in (header, *rows)
        ]
        return "\n".join(lines)

    def to_dataframe(self) -> Any:
        """The comparison as a :class:`pandas.DataFrame`, one row per model, best first.

        :raises ImportError: if pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(
                "EvidenceComparison.to_dataframe needs pandas: pip install pandas"
            ) from err
        return pd.DataFrame(
            {
                "log_evidence": self.log_evidence,
                "stderr": self.stderr,
                "log_bayes_factor": self.log_bayes_factor,
                "log_bayes_factor_stderr": self.log_bayes_factor_stderr,
                "prior_prob": self.prior_probs,
                "posterior_prob": self.posterior_probs,
                "posterior_prob_stderr": self.posterior_probs_stderr,
                "k_hat_max": self.k_hat_max,
            },
            index=pd.Index(self.names, name="model"),
        )


def compare_evidence(
    estimates: Mapping[str, Any],
    *,
    prior_probs: Mapping[str, float] | Sequence[float] | None = None,
) -> EvidenceComparison:
    r"""Compare models by their estimated evidence (module docstring for the equations).

    :param estimates: ``{name: estimate}``: any evaluator's result
        (:class:`~numpyro_iwae.LogMarginalEstimate` from importance sampling, annealing or
        nested estimation, :class:`~numpyro_iwae.SUMOEstimate`), one per model, from
        independent runs on the same data.
    :param prior_probs: prior model probabilities, by name or in the order of
        ``estimates``; normalized here. Default: uniform.
    :return: an :class:`EvidenceComparison`, best model first.
    :raises ValueError: for no estimates, an estimate of no single number, prior
        probabilities that are negative, all zero, or do not match the names, and
        estimates computed on different data (their ``data_digest`` differs).

    Warns (``UserWarning``) when an estimate's :math:`\hat k` exceeds 0.7, naming the
    remedy, and when an estimate carries no digest (its data cannot be checked).

    >>> import jax.numpy as jnp
    >>> from numpyro_iwae import LogMarginalEstimate
    >>> def est(value, se):
    ...     v = jnp.float32(value)
    ...     return LogMarginalEstimate(v, v, jnp.float32(se), jnp.float32(se), jnp.float32(1e3),
    ...                                jnp.float32(0.2), data_digest="same data")
    >>> c = compare_evidence({"one": est(-10.0, 0.1), "two": est(-9.0, 0.1)})
    >>> c.names, float(c.log_bayes_factor[1]), round(float(c.posterior_probs[0]), 3)
    (('two', 'one'), -1.0, 0.731)
    """
    if not isinstance(estimates, Mapping) or not estimates:
        raise ValueError("compare_evidence needs a non-empty {name: estimate} mapping.")
    names = [str(n) for n in estimates]
    values = list(estimates.values())
    log_evidence = np.array([_scalar(e, "log_marginal", n) for n, e in zip(names, values)])
    stderr = np.array([_scalar(e, "stderr", n) for n, e in zip(names, values)])
    _check_same_data(names, values)
    k_hat_max = np.array([_worst_k_hat(e) for e in values])
    bad = [f"{n} ({k:.2f})" for n, k in zip(names, k_hat_max) if k > K_HAT_THRESHOLD]
    if bad:
        warnings.warn(
            f"PSIS k-hat above {K_HAT_THRESHOLD} for {', '.join(bad)}: those estimates and "
            "their standard errors are not to be trusted (the guide misses posterior mass). "
            "Estimate again with annealing (MarginalLikelihood(..., annealing_steps=T)) or "
            "a better-fitted guide.",
            UserWarning,
            stacklevel=2,
        )
    prior = _prior(prior_probs, names)

    with np.errstate(divide="ignore"):
        log_joint = log_evidence + np.log(prior)
    posterior = np.exp(log_joint - np.max(log_joint))
    posterior /= posterior.sum()
    # Delta method with independent estimates: dP_j / dl_i = P_j (delta_ij - P_i).
    p2s2 = posterior**2 * stderr**2
    posterior_var = posterior**2 * ((1 - posterior) ** 2 * stderr**2 + p2s2.sum() - p2s2)
    order = np.argsort(-log_evidence, kind="stable")
    best = order[0]
    log_bf = log_evidence - log_evidence[best]
    log_bf_se = np.sqrt(stderr**2 + stderr[best] ** 2)
    log_bf_se[best] = 0.0
    return EvidenceComparison(
        names=tuple(names[i] for i in order),
        log_evidence=log_evidence[order],
        stderr=stderr[order],
        log_bayes_factor=log_bf[order],
        log_bayes_factor_stderr=log_bf_se[order],
        prior_probs=prior[order],
        posterior_probs=posterior[order],
        posterior_probs_stderr=np.sqrt(posterior_var)[order],
        k_hat_max=k_hat_max[order],
    )


def _scalar(estimate: Any, field: str, name: str) -> float:
    if not hasattr(estimate, field):
        raise ValueError(
            f"Estimate {name!r} has no `{field}`: pass an evaluator's result "
            f"(LogMarginalEstimate, SUMOEstimate), got {type(estimate).__name__}."
        )
    value = np.asarray(getattr(estimate, field), dtype=np.float64)
    if value.shape != ():
        raise ValueError(f"Estimate {name!r}: `{field}` must be one number, got {value.shape}.")
    if field == "log_marginal" and not np.isfinite(value):
        raise ValueError(f"Estimate {name!r} has log evidence {float(value)}.")
    return float(value)


def _worst_k_hat(estimate: Any) -> float:
    k_hat = getattr(estimate, "k_hat", None)
    if k_hat is None:
        return float("nan")
    k_hat = np.asarray(k_hat, dtype=np.float64)
    return float(np.max(k_hat)) if k_hat.size else float("nan")


def _check_same_data(names: list[str], estimates: list[Any]) -> None:
    digests = {n: getattr(e, "data_digest", None) for n, e in zip(names, estimates)}
    missing = [n for n, d in digests.items() if d is None]
    if missing:
        warnings.warn(
            f"Estimate(s) {missing} carry no data digest, so whether every estimate was "
            "computed on the same data cannot be checked.",
            UserWarning,
            stacklevel=3,
        )
    groups: dict[str, list[str]] = {}
    for name, digest in digests.items():
        if digest is not None:
            groups.setdefault(digest, []).append(name)
    if len(groups) > 1:
        listed = "; ".join(", ".join(g) for g in groups.values())
        raise ValueError(
            "Evidences are comparable only on the same data, and these estimates were "
            f"computed on different observed values (groups with equal data: {listed})."
        )


def _prior(
    prior_probs: Mapping[str, float] | Sequence[float] | None, names: list[str]
) -> np.ndarray:
    if prior_probs is None:
        return np.full(len(names), 1.0 / len(names))
    if isinstance(prior_probs, Mapping):
        given = {str(k) for k in prior_probs}
        if given != set(names):
            raise ValueError(
                f"prior_probs names {sorted(given)} do not match the estimates' {sorted(names)}."
            )
        prior = np.array([prior_probs[n] for n in names], dtype=np.float64)
    else:
        prior = np.asarray(prior_probs, dtype=np.float64)
        if prior.shape != (len(names),):
            raise ValueError(
                f"prior_probs has shape {prior.shape}; expected one per estimate ({len(names)})."
            )
    if not np.all(np.isfinite(prior)) or np.any(prior < 0) or prior.sum() <= 0:
        raise ValueError(f"prior_probs must be non-negative, finite and not all 0: {prior}.")
    return prior / prior.sum()
