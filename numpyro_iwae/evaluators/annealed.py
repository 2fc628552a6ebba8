r"""Annealed importance sampling (Neal, 2001, *Annealed Importance Sampling*,
Statistics and Computing) from the guide to the posterior, as an evaluator.

Each particle is one annealed run along :math:`q^{1-\beta_t} p(x, z)^{\beta_t}` with a
sigmoidal schedule (:func:`~numpyro_iwae.maths.ais.sigmoid_schedule`) and Hamiltonian Monte
Carlo transitions in the unconstrained space of the guide's random draws
(:mod:`~numpyro_iwae.core.annealing`), one chain and one Metropolis test per plate
element. Each run's weight is unbiased for :math:`p(x)`, so the runs are reduced exactly
as importance sampling's particles (:mod:`~numpyro_iwae.evaluators.importance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from numpyro_iwae._jax import Static, check_positive_int
from numpyro_iwae.core.annealing import AnnealedDensity, Density, NonCentredDensity
from numpyro_iwae.core.draw import log_weights_with_keys, split_keys
from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.core.program import Program
from numpyro_iwae.evaluators.base import Evaluator
from numpyro_iwae.evaluators.importance import ChunkLogW, ImportanceSampling
from numpyro_iwae.maths.ais import AISResult, ais_log_weights, sigmoid_schedule
from numpyro_iwae.maths.bounds import nan_to_neginf

__all__ = [
    "AnnealedImportanceSampling",
    "check_hmc_options",
    "check_noncentred",
    "moved_density",
    "annealed_run",
    "annealed_setup",
    "pilot_step_sizes",
]


def check_hmc_options(
    leapfrog_steps: int, step_size: float, pilot_particles: int
) -> tuple[int, float, int]:
    """The HMC options of an annealed run, checked: positive ints and a positive step
    size, or an error naming the argument.
    """
    leapfrog_steps = check_positive_int(leapfrog_steps, "leapfrog_steps")
    if not float(step_size) > 0:
        raise ValueError(f"step_size must be positive, got {step_size!r}.")
    return leapfrog_steps, float(step_size), check_positive_int(pilot_particles, "pilot_particles")


def check_noncentred(noncentred: Sequence[str]) -> tuple[str, ...]:
    """The ``noncentred`` option of an annealed evaluator, checked: a sequence of site
    names (a bare string, one name spelled as its letters, is refused).
    """
    if isinstance(noncentred, str):
        raise TypeError(f"noncentred takes site names; for one site write ({noncentred!r},).")
    if not all(isinstance(n, str) for n in noncentred):
        raise TypeError(f"noncentred must be a sequence of site names, got {noncentred!r}.")
    return tuple(noncentred)


def moved_density(density: AnnealedDensity, noncentred: tuple[str, ...], key: jax.Array) -> Density:
    """The density whose state the moves see: ``density`` itself, or with the sites
    named in ``noncentred`` held non-centred
    (:class:`~numpyro_iwae.core.annealing.NonCentredDensity`, checked with a prototype
    run keyed by ``key``).
    """
    return NonCentredDensity(density, noncentred, key) if noncentred else density


def annealed_setup(
    ev: Evaluator, rng_key: jax.Array, values: dict, dynamic: list, static: Static
) -> tuple[AnnealedDensity, jax.Array, dict[str, jax.Array]]:
    """What an evaluator that moves the guide's draws (tempered SMC, reverse annealing)
    needs from its call: the annealed density of the program with its plates seeded,
    a ``(model key, guide key)`` pair for it, and the NaN-data flags of one
    importance-sampling draw (the plate names recorded for the error message).
    """
    args, kwargs = static.merge(dynamic)
    plate_key, keys = split_keys(rng_key, 1)
    program = Program(ev.model, ev.guide, args, kwargs).with_seeded_plates(plate_key)
    structure = ev._structure(program, values, keys[0])
    _, _, output = log_weights_with_keys(program, values, keys[:1], ev._vectorize, structure)
    nan_data = {n: jnp.any(v, axis=0) for n, v in output.nan_data.items()}
    ev._plate_names[static] = {n: structure.names for n in nan_data}
    return AnnealedDensity(program, values, structure, keys[0][1]), keys[0], nan_data


def annealed_run(
    density: Density,
    model_key: jax.Array,
    run_key: jax.Array,
    u0: dict,
    betas: jax.Array,
    step_sizes: jax.Array,
    leapfrog_steps: int,
    adapt: bool = False,
) -> AISResult:
    """One annealed run of :func:`~numpyro_iwae.maths.ais.ais_log_weights` from the state
    ``u0`` along ``betas`` (reversed, from the posterior to the guide, for an upper
    bound), the model's own draws keyed by ``model_key``.
    """
    return ais_log_weights(
        run_key,
        u0,
        lambda u: density.log_densities(u, model_key),
        betas,
        step_sizes,
        leapfrog_steps,
        density.element_sum,
        density.element_expand,
        adapt=adapt,
    )


def pilot_step_sizes(
    density: Density,
    model_key: jax.Array,
    key: jax.Array,
    betas: jax.Array,
    step_size: float,
    leapfrog_steps: int,
    pilot_particles: int,
) -> jax.Array:
    """Per-transition step sizes from a pilot of ``pilot_particles`` runs from the guide,
    adapting from ``step_size`` towards an acceptance of 0.65 (their geometric mean per
    transition and element); the pilot's weights are discarded.
    """

    def pilot(k: jax.Array) -> jax.Array:
        init_key, run_key = jax.random.split(k)
        u0 = density.init(init_key)
        eps = jnp.float32(step_size)
        return annealed_run(density, model_key, run_key, u0, betas, eps, leapfrog_steps, True)

    runs = jax.vmap(pilot)(jax.random.split(key, pilot_particles))
    return jnp.exp(jnp.mean(jnp.log(runs.step_sizes), axis=0))


class AnnealedImportanceSampling(ImportanceSampling):
    """Importance sampling whose particles are annealed runs (see the module).

    :param annealing_steps: T, the transitions per run.
    :param leapfrog_steps: leapfrog steps per HMC transition.
    :param step_size: the initial HMC step size; a pilot run of ``pilot_particles``
        adapts it per transition and per plate element towards an acceptance of 0.65,
        and the kept runs use those sizes fixed, so their weights stay unbiased.
    :param pilot_particles: particles of the pilot run (its weights are discarded).
    :param noncentred: loc-scale sites the moves hold non-centred
        (:class:`~numpyro_iwae.core.annealing.NonCentredDensity`).
    """

    name: ClassVar[str] = "annealed importance sampling"

    def __init__(
        self,
        annealing_steps: int,
        leapfrog_steps: int = 5,
        step_size: float = 0.1,
        pilot_particles: int = 16,
        noncentred: Sequence[str] = (),
    ) -> None:
        self.annealing_steps = check_positive_int(annealing_steps, "annealing_steps")
        self.leapfrog_steps, self.step_size, self.pilot_particles = check_hmc_options(
            leapfrog_steps, step_size, pilot_particles
        )
        self.noncentred = check_noncentred(noncentred)

    def particles(
        self,
        ev: Evaluator,
        chunk_log_w: ChunkLogW,
        program: Program,
        values: dict,
        structure: PlateStructure,
        key: jax.Array,
    ) -> ChunkLogW:
        """One AIS run per particle, with step sizes adapted once, in a pilot run of
        ``pilot_particles`` whose weights are discarded, and then fixed (so the kept
        weights stay unbiased). NaN data is found by one importance-sampling draw.
        """
        nan_data = chunk_log_w(key[None])[2]  # (1, *plates) flags, as a chunk has
        density = moved_density(
            AnnealedDensity(program, values, structure, key[1]), self.noncentred, key[1]
        )
        betas = sigmoid_schedule(self.annealing_steps + 1)

        pilot_key = jax.random.fold_in(key[0], 7)
        step_sizes = pilot_step_sizes(
            density,
            pilot_key,
            pilot_key,
            betas,
            self.step_size,
            self.leapfrog_steps,
            self.pilot_particles,
        )

        def kept(pair: jax.Array) -> tuple[jax.Array, dict]:
            init_key, run_key = jax.random.split(pair[1])
            u0 = density.init(init_key)
            out = annealed_run(
                density, pair[0], run_key, u0, betas, step_sizes, self.leapfrog_steps
            )
            # The final states, for importance resampling: approximately from the
            # posterior, weighted by their AIS weights.
            return out.log_w, density.values_at(out.u, pair[0])

        def annealed_log_w(chunk_keys: jax.Array) -> tuple[jax.Array, dict, dict]:
            log_w, draws = ev._vectorize(kept, chunk_keys)
            return nan_to_neginf(log_w), draws, nan_data

        return annealed_log_w
