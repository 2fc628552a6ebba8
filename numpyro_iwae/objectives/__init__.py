"""The importance-weighted objectives, each a NumPyro ``ELBO`` usable in ``SVI``.

One module per objective; each is re-exported here and from :mod:`numpyro_iwae`.
"""

from numpyro_iwae.objectives.ciwae import CIWAE
from numpyro_iwae.objectives.iwelbo import IWELBO
from numpyro_iwae.objectives.miwae import MIWAE
from numpyro_iwae.objectives.piwae import PIWAE
from numpyro_iwae.objectives.renyi import RenyiELBO
from numpyro_iwae.objectives.sumo import SUMO
from numpyro_iwae.objectives.wake_sleep import ReweightedWakeSleep

__all__ = ["CIWAE", "IWELBO", "MIWAE", "PIWAE", "SUMO", "RenyiELBO", "ReweightedWakeSleep"]
