"""Importance-weighted variational inference for NumPyro.

Public names:

- :class:`IWELBO`: the importance-weighted bound as a NumPyro ``ELBO`` objective.
- :class:`MIWAE`, :class:`CIWAE`, :class:`PIWAE`, :class:`RenyiELBO`,
  :class:`ReweightedWakeSleep`, :class:`SUMO`: the rest of the family.
- :class:`MarginalLikelihood`: ``log p(x)`` with many particles in bounded memory, with a
  standard error, the effective sample size and the PSIS k-hat (:class:`LogMarginalEstimate`).
- :class:`SUMOMarginal`: an estimate of ``log p(x)`` whose expectation is ``log p(x)``
  (SUMO), with a standard error from replicates (:class:`SUMOEstimate`).
- :class:`TemperedSMC`: ``log p(x)`` by adaptive tempered SMC from the guide, for
  posteriors that importance sampling and annealing cannot reach.
- :class:`BidirectionalMC`: ``log p(x)`` of data simulated from the model between a
  lower and an upper bound (:class:`EvidenceSandwich`), to choose an evaluator's settings.
- :func:`compare_evidence`: Bayes factors and posterior model probabilities with standard
  errors from several evidence estimates (:class:`EvidenceComparison`).
- :func:`shard_particles`: split the particles over the devices of a mesh.
- :class:`JointWeightsWarning`: the weights are joint over a large plate that holds latents.
- :class:`UnweightedBoundWarning`: nothing is importance weighted; the objective is the ELBO.
"""

from numpyro_iwae.core.plan import JointWeightsWarning, UnweightedBoundWarning
from numpyro_iwae.evaluators import (
    BidirectionalMC,
    EvidenceComparison,
    EvidenceSandwich,
    LogMarginalEstimate,
    MarginalLikelihood,
    SUMOEstimate,
    SUMOMarginal,
    TemperedSMC,
    compare_evidence,
)
from numpyro_iwae.objectives import (
    CIWAE,
    IWELBO,
    MIWAE,
    PIWAE,
    SUMO,
    RenyiELBO,
    ReweightedWakeSleep,
)
from numpyro_iwae.sharding import ShardedParticles, shard_particles

__all__ = [
    "BidirectionalMC",
    "CIWAE",
    "EvidenceComparison",
    "EvidenceSandwich",
    "IWELBO",
    "JointWeightsWarning",
    "LogMarginalEstimate",
    "MarginalLikelihood",
    "MIWAE",
    "PIWAE",
    "RenyiELBO",
    "ReweightedWakeSleep",
    "ShardedParticles",
    "SUMO",
    "SUMOEstimate",
    "SUMOMarginal",
    "TemperedSMC",
    "UnweightedBoundWarning",
    "compare_evidence",
    "shard_particles",
]
__version__ = "0.1.0"
