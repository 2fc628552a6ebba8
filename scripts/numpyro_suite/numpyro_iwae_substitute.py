"""Run NumPyro's own tests with this package's objectives in place of NumPyro's.

Loaded as a pytest plugin (``-p numpyro_iwae_substitute``, this folder on ``sys.path``; see
``run.sh``) before NumPyro's test modules import their objectives: ``Trace_ELBO(K)``
becomes ``IWELBO(1)`` (K = 1) or ``MIWAE(1, K)`` (K independent ELBOs averaged, which is
what ``Trace_ELBO(num_particles=K)`` computes), and ``RenyiELBO(alpha, K)`` this package's
``RenyiELBO``. ``NUMPYRO_IWAE_SUBSTITUTE=renyi`` also puts ``RenyiELBO(0, K)`` (the IWAE bound)
in place of ``Trace_ELBO(K)``.
"""

from __future__ import annotations

import os

import numpyro.infer
import numpyro.infer.elbo

import numpyro_iwae

_MODE = os.environ.get("NUMPYRO_IWAE_SUBSTITUTE", "iwelbo")


def _trace_elbo(num_particles: int = 1, vectorize_particles: bool = True, **_):
    if _MODE == "renyi":
        return numpyro_iwae.RenyiELBO(
            0.0, num_particles=max(num_particles, 2), vectorize_particles=vectorize_particles
        )
    if num_particles == 1:
        return numpyro_iwae.IWELBO(1, vectorize_particles=vectorize_particles)
    return numpyro_iwae.MIWAE(1, num_particles, vectorize_particles=vectorize_particles)


def _renyi_elbo(alpha: float = 0.0, num_particles: int = 2, vectorize_particles=True, **_):
    return numpyro_iwae.RenyiELBO(
        alpha, num_particles=num_particles, vectorize_particles=vectorize_particles
    )


for module in (numpyro.infer, numpyro.infer.elbo):
    module.Trace_ELBO = _trace_elbo
    module.RenyiELBO = _renyi_elbo
