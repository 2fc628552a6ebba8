"""Importance-weighted variational inference for NumPyro.

Public names:

- :class:`IWELBO`: the importance-weighted bound as a NumPyro ``ELBO`` objective.
- :class:`JointWeightsWarning`: issued when the weights are joint over a large plate.
"""

from numpyro_iwae.elbo import IWELBO
from numpyro_iwae.weights import JointWeightsWarning

__all__ = ["IWELBO", "JointWeightsWarning"]
__version__ = "0.1.0"
