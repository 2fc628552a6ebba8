r"""The guide's draws with their joint densities and each observation's log-likelihood:
what an ArviZ export, and PSIS-LOO for an approximate posterior, read.

For draws :math:`z_s \sim q` (not resampled) this gives :math:`\log p(x, z_s)`,
:math:`\log q(z_s)` and, per observed site and element :math:`i` of its batch shape,
:math:`\log p(x_i \mid z_s)`. With them the leave-one-out predictive density of
:math:`x_i` is estimated by self-normalized importance sampling with ratios
:math:`r_s \propto p(x, z_s) / (q(z_s)\, p(x_i \mid z_s))`, Pareto smoothed
(Vehtari, Gelman & Gabry 2017, *Practical Bayesian model evaluation using leave-one-out
cross-validation and WAIC*, Statistics and Computing 27; Magnusson et al. 2019, *Bayesian
leave-one-out cross-validation for large data*, ICML, for approximate posteriors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from numpyro_iwae._jax import VectorizeFn, map_particles
from numpyro_iwae.core.draw import draw_with_keys
from numpyro_iwae.core.plates import PlateStructure, sample_sites, site_log_prob
from numpyro_iwae.core.program import Program

__all__ = ["draws_with_log_likelihood"]


def draws_with_log_likelihood(
    program: Program,
    params: Mapping[str, Any],
    keys: jax.Array,
    vectorize: VectorizeFn,
    structure: PlateStructure,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array, dict[str, jax.Array]]:
    """``(values, log_p, log_q, log_likelihood)`` for the particles of ``keys``
    (shape ``(S, 2)``), under joint weighting.

    ``values`` are the guide's draws ``{site: (S, *shape)}``; ``log_p`` and ``log_q``
    have shape ``(S,)``; ``log_likelihood`` maps each observed site holding values
    to ``(S, *batch shape)``, masked elements 0. The program's plates must be seeded
    (:meth:`~numpyro_iwae.core.program.Program.with_seeded_plates`).

    :raises ValueError: for weights formed per plate element (the draws of a
        per-datapoint latent are not one posterior draw) or summed-out sites (the
        per-observation likelihood would need them summed per element).
    """
    if structure.num_groups != 1 or structure.sizes:
        raise ValueError(
            "Draws for export need one joint weight per particle (weighting='joint'); "
            f"this pair forms its weights per element of plates {structure.names}."
        )
    if structure.enumerated:
        raise ValueError(
            "The per-observation log-likelihood of a model with summed-out sites "
            f"{list(structure.enumerated)} is not computed yet; the evidence estimate "
            "itself is."
        )
    draw, model_fn = draw_with_keys(program, params, keys, vectorize, structure)
    log_p, _ = model_fn(draw.values, dict(params))
    log_q = draw.log_q_rep[0] + draw.log_q_score[0]

    def observed(inputs: tuple) -> dict[str, jax.Array]:
        key, values, plates, mutable = inputs
        tr = program.trace_model(params, key, {**(mutable or {}), **plates, **values})
        return {
            name: site_log_prob(site, structure)
            for name, site in sample_sites(tr).items()
            if site["is_observed"] and np.size(site["value"]) > 0
        }

    inputs = (keys[:, 0], draw.values, draw.plates, draw.mutable_state)
    log_likelihood = map_particles(vectorize, observed, inputs)
    return dict(draw.values), log_p[0], log_q, log_likelihood
