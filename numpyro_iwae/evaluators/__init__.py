r"""Evaluators of :math:`\log p(x)` for a fitted model/guide pair, in bounded memory.

One module per algorithm on one base (:mod:`~numpyro_iwae.evaluators.base`), with one
family of result types (:mod:`~numpyro_iwae.evaluators.results`); each public name is
re-exported here and from :mod:`numpyro_iwae`.
"""

from numpyro_iwae.evaluators.bdmc import BidirectionalMC, EvidenceSandwich
from numpyro_iwae.evaluators.comparison import EvidenceComparison, compare_evidence
from numpyro_iwae.evaluators.marginal import MarginalLikelihood
from numpyro_iwae.evaluators.results import LogMarginalEstimate, SUMOEstimate
from numpyro_iwae.evaluators.smc import TemperedSMC
from numpyro_iwae.evaluators.sumo import SUMOMarginal

__all__ = [
    "BidirectionalMC",
    "EvidenceSandwich",
    "EvidenceComparison",
    "LogMarginalEstimate",
    "MarginalLikelihood",
    "SUMOEstimate",
    "SUMOMarginal",
    "TemperedSMC",
    "compare_evidence",
]
