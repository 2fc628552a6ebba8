r"""The base every importance-weighted objective derives from: one pipeline, declared hooks.

Every objective takes the same steps in each SVI step (:meth:`Objective.loss_with_mutable_state`):

1. bundle the model, the guide and their arguments
   (:class:`~numpyro_iwae.core.program.Program`);
2. draw ``replicates x num_particles`` particles and check the pair
   (:meth:`Objective.particles`);
3. turn them into a scalar whose value is the objective and whose gradient is the
   objective's estimator (:meth:`Objective.objective`);
4. return its negative as the loss, with the particles' mutable state averaged.

An objective with one gradient path (IWELBO, MIWAE, CIWAE, RenyiELBO) declares one hook,
:meth:`Objective.element_bound`: the objective of one plate element from its ``(K,)``
log weights :math:`\log w_k = \log p(x, z_k) - \log q(z_k)`. One whose model and guide
parameters ascend different objectives (PIWAE, SUMO, ReweightedWakeSleep) overrides
:meth:`Objective.objective`, starting from :meth:`Objective.two_paths`: one forward pass of
the model whose two copies of :math:`\log p` differentiate different parameters.

Example: a new objective is one class (here the IWAE bound with the VIMCO terms turned
into the plain score-function estimator's):

    >>> import jax, numpyro, numpyro.distributions as dist
    >>> from numpyro_iwae.maths.bounds import iwae_bound
    >>> from numpyro_iwae.objectives.base import Objective
    >>> class PlainIWAE(Objective):
    ...     def element_bound(self, log_w, log_q_score, score):
    ...         return iwae_bound(log_w)
    >>> def model():
    ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=0.5)
    >>> def guide():  # the exact posterior: every weight equals p(x)
    ...     numpyro.sample("z", dist.Normal(0.25, 0.5**0.5))
    >>> loss = PlainIWAE(num_particles=4).loss(jax.random.key(0), {}, model, guide)
    >>> round(-float(loss), 4) == round(float(dist.Normal(0.0, 2**0.5).log_prob(0.5)), 4)
    True

"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.infer.elbo import ELBO

from numpyro_iwae._jax import check_positive_int, check_vectorize
from numpyro_iwae.core.draw import draw_particles
from numpyro_iwae.core.paths import dreg_log_weights, split_gradient_paths
from numpyro_iwae.core.plan import check_subsampling
from numpyro_iwae.core.plates import WEIGHTINGS, PlateStructure
from numpyro_iwae.core.program import GuideDraw, ModelOutput, Program
from numpyro_iwae.core.stages import ModelFn, any_nan_data, log_ratio, mark_nan_data
from numpyro_iwae.maths.bounds import nan_to_neginf

__all__ = [
    "GRADIENT_ESTIMATORS",
    "Objective",
    "Particles",
    "TwoPaths",
    "average_particles",
    "zero_weight_log_w",
    "total_objective",
    "refuse_global_sites",
    "local_objective",
]


#: The gradient estimators of the guide's reparameterized sites that the IWAE-type
#: objectives accept (``gradient_estimator=``): the total derivative, sticking the
#: landing, and the doubly reparameterized estimator.
GRADIENT_ESTIMATORS = ("reparam", "stl", "dreg")


class Particles(NamedTuple):
    """One step's particles, as every objective receives them.

    Attributes:
        draw: the guide's side (values, log densities per group).
        model_fn: ``(values, params) -> (log_p per group, ModelOutput)``.
        structure: how the log densities factorize over the plates.
        params: the parameters to call ``model_fn`` with: the step's parameters and,
            under local weighting, the global values (shared by every particle).

    """

    draw: GuideDraw
    model_fn: ModelFn
    structure: PlateStructure
    params: dict[str, Any]


class TwoPaths(NamedTuple):
    """The model's log density from one forward pass, as two copies whose gradients
    take different paths (:func:`~numpyro_iwae.core.paths.split_gradient_paths`).

    Attributes:
        log_p: per group; its gradient reaches the sampled values and every
            parameter the model does not own alone.
        log_p_theta: per group; its gradient reaches only the model's own parameters.
        output: the model's output (mutable state, NaN-data flags).

    """

    log_p: tuple[jax.Array, ...]
    log_p_theta: tuple[jax.Array, ...]
    output: ModelOutput


class Objective(ELBO):
    """Base class of the importance-weighted objectives (see the module).

    Subclasses set :attr:`estimators` and declare :meth:`element_bound` or override
    :meth:`objective`; :meth:`check_structure`, :meth:`bound_particles` and
    :meth:`draw_path` have defaults. ``replicates`` (MIWAE's M) sets how many
    independent sets of ``num_particles`` particles are drawn.

    :param num_particles: K, the number of importance samples per plate element.
    :param gradient_estimator: one of :attr:`estimators`.
    :param vectorize_particles: ``True`` for :func:`jax.vmap`, ``False`` for
        :func:`jax.lax.map`, or a callable ``f(fn, keys)``.
    :param weighting: ``"auto"``, ``"joint"`` or ``"local"``
        (:data:`~numpyro_iwae.core.plates.WEIGHTINGS`).
    """

    can_infer_discrete = True
    #: The accepted values of ``gradient_estimator``.
    estimators: ClassVar[tuple[str, ...]] = GRADIENT_ESTIMATORS
    #: The estimators built on squared normalized weights (DReG's), which a scaled guide
    #: biases: refused with scaled guide sites for K > 1.
    squared_weight_estimators: ClassVar[tuple[str, ...]] = ("dreg",)
    #: Former spellings of ``gradient_estimator`` values, refused with the new name.
    renamed_estimators: ClassVar[dict[str, str]] = {}
    #: What the error for another value adds (e.g. which class has it).
    estimator_hint: ClassVar[str] = ""
    #: The constructor arguments ``repr`` shows, in order.
    repr_fields: ClassVar[tuple[str, ...]] = ("num_particles", "gradient_estimator", "weighting")
    #: How many independent sets of ``num_particles`` particles are drawn (MIWAE's M).
    replicates: int = 1

    def __init__(
        self,
        num_particles: int = 8,
        *,
        gradient_estimator: str = "reparam",
        vectorize_particles: bool | Callable = True,
        weighting: str = "auto",
    ) -> None:
        num_particles = check_positive_int(num_particles, "num_particles")
        if gradient_estimator in self.renamed_estimators:
            raise ValueError(
                f"{type(self).__name__}'s gradient_estimator {gradient_estimator!r} is now "
                f"called {self.renamed_estimators[gradient_estimator]!r} (one name per "
                "estimator across the objectives; see the changelog)."
            )
        if gradient_estimator not in self.estimators:
            raise ValueError(
                f"{type(self).__name__} takes gradient_estimator one of {self.estimators}, "
                f"got {gradient_estimator!r}.{self.estimator_hint}"
            )
        check_vectorize(vectorize_particles)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}.")
        self.gradient_estimator = gradient_estimator
        self.weighting = weighting
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.repr_fields)
        return f"{type(self).__name__}({fields})"

    def loss_with_mutable_state(
        self,
        rng_key: jax.Array,
        param_map: dict[str, jax.Array],
        model: Callable,
        guide: Callable,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The negative objective and the updated mutable state.

        :param rng_key: a JAX PRNG key.
        :param param_map: current values of ``param`` sites, keyed by name.
        :param model: NumPyro model.
        :param guide: NumPyro guide.
        :param args: positional arguments of model and guide.
        :param kwargs: keyword arguments of model and guide.
        :return: ``{"loss": scalar, "mutable_state": dict or None}``; the mutable state
            is the mean over particles of each floating-point value (the first
            particle's value for other dtypes).
        """
        objective, output = self.objective(rng_key, param_map, Program(model, guide, args, kwargs))
        return {
            "loss": -objective,
            "mutable_state": average_particles(output.mutable_state or None),
        }

    def objective(
        self, rng_key: jax.Array, param_map: dict[str, jax.Array], program: Program
    ) -> tuple[jax.Array, ModelOutput]:
        """The objective (summed over plate elements, scaled for subsampling) and the
        model's output. By default: :meth:`log_weights` of :meth:`particles`, reduced
        per plate element by :meth:`element_bound` (:func:`total_objective`).
        """
        particles = self.particles(rng_key, param_map, program)
        log_w, output = self.log_weights(particles)
        log_q_score = particles.draw.log_q_score
        return total_objective(log_w, log_q_score, particles.structure, self.element_bound), output

    def element_bound(self, log_w: jax.Array, log_q_score: jax.Array, score: bool) -> jax.Array:
        """The objective per plate element from ``(replicates x K, *plates)`` log
        weights, with the score-function terms of the discrete guide sites (their log
        density ``log_q_score``) when ``score``. Declared by each single-path objective.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define element_bound or override objective."
        )

    def particles(
        self, rng_key: jax.Array, param_map: dict[str, jax.Array], program: Program
    ) -> Particles:
        """Draw the particles and check that the objective supports the pair."""
        draw, model_fn, structure = draw_particles(
            program,
            param_map,
            rng_key,
            self.replicates * self.num_particles,
            self.vectorize_particles_fn,
            path=self.draw_path(),
            weighting=self.weighting,
            bound_particles=self.bound_particles(),
        )
        check_subsampling(structure, self.num_particles)
        self.check_structure(structure)
        if self.gradient_estimator in self.squared_weight_estimators and self.num_particles > 1:
            if structure.scaled_guide_sites:
                raise ValueError(
                    f"{type(self).__name__}(gradient_estimator={self.gradient_estimator!r}) "
                    "assumes log w = "
                    "log p - log q with q the density the guide samples from, but guide "
                    f"site(s) {list(structure.scaled_guide_sites)} are scaled "
                    "(handlers.scale, e.g. KL annealing or tempering): the weights become "
                    "softmax(c log w) and DReG's squared weights are then biased. Use "
                    "gradient_estimator='reparam' (unbiased for the scaled objective)."
                )
        if self.gradient_estimator != "reparam" and structure.guide_factor_sites:
            hint = (
                " Use gradient_estimator='reparam', which includes them as Trace_ELBO does."
                if "reparam" in self.estimators
                else ""
            )
            raise ValueError(
                f"{type(self).__name__}(gradient_estimator={self.gradient_estimator!r}) "
                "needs log q to be the density the guide samples from, but the guide also "
                f"has observed or factor site(s) {list(structure.guide_factor_sites)}.{hint}"
            )
        return Particles(draw, model_fn, structure, {**param_map, **draw.global_values})

    def log_weights(self, particles: Particles) -> tuple[tuple[jax.Array, ...], ModelOutput]:
        """Log weights per group, ``(replicates x K, *plates)``, whose gradient is the
        chosen estimator's (the path term stopped for ``"stl"``, DReG's backward pass
        for ``"dreg"``), with NaN weights read as zero (:func:`zero_weight_log_w`), and
        the model's output.
        """
        draw, model_fn, structure, params = particles
        if self.gradient_estimator == "dreg":
            log_w, output = dreg_log_weights(
                model_fn,
                draw.values,
                params,
                draw.log_q_rep_path,
                draw.log_q_score,
                structure.value_axes,
                structure.value_groups,
                replicates=self.replicates,
            )
        else:
            log_p, output = model_fn(draw.values, params)
            log_q_rep = draw.log_q_rep_path if self.gradient_estimator == "stl" else draw.log_q_rep
            log_w = log_ratio(log_p, log_q_rep, draw.log_q_score)
        return zero_weight_log_w(log_w, output, structure), output

    def two_paths(self, particles: Particles) -> TwoPaths:
        """The model's log density at the particles, once, as :class:`TwoPaths`."""
        draw, model_fn, structure, params = particles
        (log_p, output), log_p_theta = split_gradient_paths(
            model_fn, draw.values, params, structure.model_param_sites
        )
        return TwoPaths(log_p, log_p_theta, output)

    def bound_particles(self) -> int:
        """The particles of the objective's largest ``logsumexp`` (K = 1 makes
        every weighting the ELBO; ``weighting="auto"`` reads it).
        """
        return self.num_particles

    def draw_path(self) -> str | None:
        """Which stopped-parameter part of ``log q`` the draw must also compute
        (``path`` of :func:`~numpyro_iwae.core.draw.draw_particles`).
        """
        return None if self.gradient_estimator == "reparam" else self.gradient_estimator

    def check_structure(self, structure: PlateStructure) -> None:
        """Raise for a model/guide pair the objective does not support (none by default)."""


def average_particles(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Mutable state of K particles -> one state: the mean of floating arrays
    over the particle axis, the first particle's value for anything else.
    """
    if state is None:
        return None

    def reduce(x: jax.Array) -> jax.Array:
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return jnp.mean(x, axis=0)
        return x[0]

    return jax.tree.map(reduce, state)


def zero_weight_log_w(
    log_w: tuple[jax.Array, ...], output: Any, structure: PlateStructure
) -> tuple[jax.Array, ...]:
    """Per group, NaN log weights mapped to ``-inf`` (weight zero), except at plate
    elements whose observed data is NaN, which stay NaN (see
    :func:`~numpyro_iwae.core.stages.mark_nan_data`).
    """
    nan_data = any_nan_data(output, structure)
    return tuple(mark_nan_data(nan_to_neginf(w), n) for w, n in zip(log_w, nan_data))


def total_objective(
    log_w: tuple[jax.Array, ...],
    parts: tuple[Any, ...],
    structure: PlateStructure,
    element_bound: Callable[[jax.Array, Any, bool], jax.Array],
) -> jax.Array:
    """The objective summed over plate elements and scaled for subsampling: under
    local weighting :func:`local_objective`, under joint weighting ``element_bound``
    of the one group (with the score-function terms when the guide has discrete
    sites); ``parts`` holds each group's second argument of ``element_bound``.
    """
    if structure.weighting == "local":
        per_element = local_objective(log_w, parts, structure, element_bound)
    else:
        per_element = element_bound(log_w[0], parts[0], bool(structure.nonreparam_sites))
    return structure.scale * jnp.sum(per_element)


def refuse_global_sites(structure: PlateStructure, objective: str, why: str) -> None:
    """Raise a ValueError if local weighting draws global latent sites, which
    ``objective`` does not support (``why`` says why and what to use instead).
    """
    if structure.weighting == "local" and structure.global_sites:
        raise ValueError(
            f"{objective} does not support global site(s) {list(structure.global_sites)} "
            f"under local weighting: {why}"
        )


def local_objective(
    log_w: tuple[jax.Array, ...],
    log_q_score: tuple[jax.Array, ...],
    structure: PlateStructure,
    element_bound: Callable[[jax.Array, jax.Array, bool], jax.Array],
) -> jax.Array:
    r"""The locally weighted bound per element of the independent plates, with the
    score-function terms of the discrete sites.

    Group 0 (the global sites, shared by every particle, so its rows agree) gives
    :math:`\log p(\theta) - \log q(\theta)`; each local plate adds
    :math:`\frac{N}{B}\sum_n \hat{\mathcal L}_{K,n}` with VIMCO terms for its discrete
    sites (each plate's objective is ``element_bound``). Discrete global sites get
    the score-function term of the whole objective (the ELBO's estimator for them: it
    has no baseline).
    """
    total = log_w[0][0]
    for group in range(1, structure.num_groups):
        score = bool(structure.group_sites(group, structure.nonreparam_sites))
        per_element = element_bound(log_w[group], log_q_score[group], score)
        total = total + structure.local_scale(group) * jnp.sum(per_element, axis=-1)
    if structure.group_sites(0, structure.nonreparam_sites):
        log_q = log_q_score[0][0]
        total = total + jax.lax.stop_gradient(total) * (log_q - jax.lax.stop_gradient(log_q))
    return total
