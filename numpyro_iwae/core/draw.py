r"""Log importance weights of a NumPyro model/guide pair, one row per particle.

This module is the one place that runs user code. Everything downstream
(estimators, objectives, evaluators) receives plain arrays plus a static
:class:`PlateStructure` describing how those arrays factorize.

A :class:`Program` bundles the model, the guide and the arguments both are called
with. For particle :math:`k` the guide is run to draw :math:`z_k \sim q_\phi(z \mid x)`,
the model is run with its values substituted, and every sample site's ``log_prob`` is
reduced to the *independent plates*: the plates that enclose every sample site of
the model and the guide (observed sites and ``numpyro.factor`` sites included). Along
those plates the joint density factorizes, so the importance-weighted bound can be
formed separately per plate element (Burda et al., 2016, applied per datapoint):

.. math::

    \log w_{k,n} = \sum_{s \in \text{model}} c_s \log p_s(\cdot)_n
                  - \sum_{s \in \text{guide}} c_s \log q_s(\cdot)_n ,

where :math:`n` indexes the independent plate elements, every other dimension of
a site's ``log_prob`` is summed, and :math:`c_s` is the site's scale *without*
the subsampling factor :math:`N/B` of the independent plates. That factor is
returned separately (:attr:`PlateStructure.scale`) because it must multiply the
bound *outside* the ``logsumexp``. As in NumPyro's ``Trace_ELBO``, the guide's sum
runs over *every* sample site of the guide: its latent draws and also its observed
and ``numpyro.factor`` sites.

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from jax import random

from numpyro_iwae._jax import VectorizeFn, map_particles
from numpyro_iwae.core.guard import zero_weight_safe
from numpyro_iwae.core.plan import plan
from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.core.program import GuideDraw, ModelOutput, Program
from numpyro_iwae.core.stages import (
    ModelFn,
    any_nan_data,
    guide_stage,
    log_ratio,
    mark_nan_data,
    model_stage,
)
from numpyro_iwae.maths.bounds import nan_to_neginf

__all__ = [
    "LogWeights",
    "split_keys",
    "draw_particles",
    "draw_with_keys",
    "log_weights_with_keys",
    "log_weights",
]


class LogWeights(NamedTuple):
    """Per-particle log densities, reduced to the independent plates.

    Every array has shape ``(K, *PlateStructure.sizes)``. The guide density is kept
    in three parts so each gradient estimator can take what it needs:

    - ``log_q_rep``: the guide terms differentiated along their path: sites with a
      reparameterized sampler and the guide's observed and ``factor`` sites, live
      parameters;
    - ``log_q_rep_path``: the reparameterized sites with the guide's parameters
      under ``stop_gradient`` (the sampled values keep their path to the
      parameters), as STL and DReG need; equal in value to ``log_q_rep`` up to
      rounding when the guide has no factor sites;
    - ``log_q_score``: sites without a reparameterized sampler (their values carry
      no gradient), live parameters: the score-function part.

    ``mutable_state`` holds the values of ``mutable`` sites with a leading particle
    axis (``None`` when there are none). ``nan_data`` is ``True`` at the plate
    elements where an observed value of the model is NaN (and not masked).
    """

    log_p: jax.Array
    log_q_rep: jax.Array
    log_q_rep_path: jax.Array | None
    log_q_score: jax.Array
    mutable_state: dict[str, Any] | None
    nan_data: jax.Array | None = None

    @property
    def log_q(self) -> jax.Array:
        """``log q`` of every guide site, live parameters."""
        return self.log_q_rep + self.log_q_score

    @property
    def log_w(self) -> jax.Array:
        """``log p - log q``; a NaN (a density evaluated outside its support) is
        mapped to ``-inf``, i.e. weight zero, except where the observed data is NaN,
        which stays NaN.
        """
        return mark_nan_data(nan_to_neginf(self.log_p - self.log_q), self.nan_data)


def split_keys(rng_key: jax.Array, num_particles: int) -> tuple[jax.Array, jax.Array]:
    """``(plate_key, particle_keys)``: one key that seeds every subsampled plate (so
    all particles share a minibatch) and a ``(model, guide)`` key pair per particle,
    from one batched split.
    """
    plate_key, particle_key = random.split(rng_key)
    return plate_key, random.split(particle_key, (num_particles, 2))


def draw_particles(
    program: Program,
    params: Mapping[str, Any],
    rng_key: jax.Array,
    num_particles: int,
    vectorize: VectorizeFn,
    *,
    path: str | None = None,
    weighting: str = "joint",
    bound_particles: int | None = None,
) -> tuple[GuideDraw, ModelFn, PlateStructure]:
    """Draw K particles from the guide; return them with the model's log density
    as a pure function of (latent values, params).

    ``bound_particles`` is the number of particles in the objective's largest
    ``logsumexp`` (``num_particles`` if ``None``), which ``weighting="auto"`` reads.

    With ``path="stl"`` or ``"dreg"`` the draw also holds ``log_q_rep_path``
    (``None`` otherwise), which costs a second, gradient-free pass of the guide.

    ``model_fn(values, params) -> (log_p, ModelOutput)`` evaluates all K
    particles; it closes over the model keys, minibatch and data, so an objective
    can wrap it (e.g. in a ``custom_vjp``) without running user code twice. Under
    local weighting ``params`` must also hold the draw's ``global_values``.
    """
    plate_key, keys = split_keys(rng_key, num_particles)
    program.prepare_guide(params, plate_key)
    program = program.with_seeded_plates(plate_key)
    structure = plan(program, params, keys[0], weighting, bound_particles or num_particles)
    draw, model_fn = draw_with_keys(program, params, keys, vectorize, structure, path=path)
    return draw, model_fn, structure


def draw_with_keys(
    program: Program,
    params: Mapping[str, Any],
    keys: jax.Array,
    vectorize: VectorizeFn,
    structure: PlateStructure,
    *,
    path: str | None = None,
) -> tuple[GuideDraw, ModelFn]:
    """:func:`draw_particles` for given particle keys (shape ``(K, 2)``) and a known
    structure; the program's plates must already be seeded
    (:meth:`Program.with_seeded_plates`). Used to draw a long run of particles chunk
    by chunk.
    """

    def guide_draw(key: jax.Array) -> GuideDraw:
        return guide_stage(program, params, key, structure, path)

    draw = map_particles(vectorize, guide_draw, keys[:, 1])
    if structure.global_sites:
        # Shared by every particle: one value (the map broadcast it), passed to the
        # model with the parameters.
        shared = {n: draw.values[n][0] for n in structure.global_sites if n in draw.values}
        values = {n: v for n, v in draw.values.items() if n not in shared}
        draw = draw._replace(values=values, global_values=shared)

    def model_fn(values: dict[str, jax.Array], model_params: dict[str, Any]):
        def one(inputs: tuple) -> tuple[jax.Array, ModelOutput]:
            key, one_draw = inputs
            return model_stage(program, model_params, key, structure, one_draw)

        # Only what the model reads: the guide's log densities stay out of the map.
        inputs = (keys[:, 0], (values, draw.plates, draw.mutable_state))
        return map_particles(vectorize, one, inputs)

    shared_params = bool(structure.model_param_sites or structure.global_sites)
    group_shapes = tuple(structure.group_shape(g) for g in range(structure.num_groups))
    safe = zero_weight_safe(
        model_fn, structure.value_axes, shared_params, structure.value_groups, group_shapes
    )
    return draw, safe


def log_weights_with_keys(
    program: Program,
    params: Mapping[str, Any],
    keys: jax.Array,
    vectorize: VectorizeFn,
    structure: PlateStructure,
) -> tuple[tuple[jax.Array, ...], GuideDraw, ModelOutput]:
    """Log weights per group at given particle keys, with NaN read as weight zero
    (:func:`~numpyro_iwae.maths.bounds.nan_to_neginf`), and the draw and model output
    they came from: what every evaluator reduces, a chunk of particles at a time
    (:func:`draw_with_keys`; under local weighting the draw's global values enter the
    model with the parameters).
    """
    draw, model_fn = draw_with_keys(program, params, keys, vectorize, structure)
    log_p, output = model_fn(draw.values, {**params, **draw.global_values})
    log_w = log_ratio(log_p, draw.log_q_rep, draw.log_q_score)
    return tuple(nan_to_neginf(w) for w in log_w), draw, output


def log_weights(
    program: Program,
    params: Mapping[str, Any],
    rng_key: jax.Array,
    num_particles: int,
    vectorize: VectorizeFn,
) -> tuple[LogWeights, PlateStructure]:
    """Draw ``num_particles`` particles and return their log densities.

    Every particle sees the same subsample of every subsampled plate (the plates
    are seeded once, outside the particle map); latent values are drawn
    independently per particle.

    :param program: model, guide and their arguments.
    :param params: values for ``param`` (and ``mutable``) sites, constrained.
    :param rng_key: a JAX PRNG key.
    :param num_particles: K, the number of particles.
    :param vectorize: maps a function over the leading axis of a pytree
        (``jax.vmap``-like or ``jax.lax.map``-like).

    :return: ``(LogWeights, PlateStructure)``.

    """
    draw, model_fn, structure = draw_particles(
        program, params, rng_key, num_particles, vectorize, path="stl"
    )
    log_p, output = model_fn(draw.values, params)
    weights = LogWeights(
        log_p[0],
        draw.log_q_rep[0],
        draw.log_q_rep_path[0],
        draw.log_q_score[0],
        output.mutable_state or None,
        any_nan_data(output, structure)[0],
    )
    return weights, structure
