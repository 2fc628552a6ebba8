"""What every evaluator shares: argument checks, the compiled-function cache, chunking
of the particles and the memory estimate that sizes the chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_iwae._jax import (
    CONCRETIZATION_ERRORS,
    Static,
    check_positive_int,
    check_vectorize,
    num_shards,
    peak_bytes,
    split_static,
)
from numpyro_iwae.core.plan import plan
from numpyro_iwae.core.plates import PlateStructure
from numpyro_iwae.core.program import Program, observed_digest, point_mass_sites

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "CPU_WORKING_SET",
    "chunk_keys",
    "Evaluator",
    "raise_on_nan_data",
]


#: Bytes the particles of one chunk may take when ``chunk_size=None`` (1 GiB).
DEFAULT_MEMORY_BUDGET = 2**30

#: On CPU, bytes one chunk's particles are kept under as well (128 MiB): there a
#: chunk that stays near the caches runs faster than one that fills the memory
#: budget, while accelerators want the largest chunk that fits.
CPU_WORKING_SET = 2**27


def chunk_keys(keys: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Particle keys as ``(chunks, chunk, ...)``, padded by repeating keys, and the
    mask of the real particles.
    """
    num_chunks = -(-k // chunk)
    pad = num_chunks * chunk - k
    keys = jnp.concatenate([keys, keys[:pad]]) if pad else keys
    live = (jnp.arange(num_chunks * chunk) < k).reshape(num_chunks, chunk)
    return keys.reshape((num_chunks, chunk) + keys.shape[1:]), live


class Evaluator:
    r"""What the estimators of :math:`\log p(x)` for a fitted model share: the fitted
    values, the checks of a model/guide pair before it is scored (missing params,
    point masses, subsampled plates, NaN data), and the call, compiled once per
    shape of the arguments. Subclasses define ``_evaluate_traced``.

    The algorithms an evaluator runs (:mod:`~numpyro_iwae.evaluators.importance` and
    its siblings) read the settings below from it.
    """

    #: K, particles per plate element.
    num_particles: int
    #: Particles per chunk (``None``: the largest that fits ``memory_budget``).
    chunk_size: int | None = None
    #: Posterior draws by importance resampling (``None``: none).
    num_samples: int | None = None
    #: Whether the estimate keeps every log weight.
    return_log_weights: bool = False
    #: The chunk the last evaluation chose from the memory budget (``None`` before one
    #: has, or when ``chunk_size`` was given).
    chunk_size_used: int | None = None

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        *,
        params: dict[str, Any] | None = None,
        mutable_state: dict[str, Any] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        vectorize_particles: bool | Callable = True,
    ) -> None:
        self.model = model
        self.guide = guide
        self.params = {} if params is None else dict(params)
        self.mutable_state = {} if mutable_state is None else dict(mutable_state)
        self.memory_budget = check_positive_int(memory_budget, "memory_budget")
        self._vectorize = check_vectorize(vectorize_particles)
        self._data_shards = 1
        self._given_params = params is not None
        self._evaluate = jax.jit(self._evaluate_traced, static_argnums=3)
        # Argument structures whose model needs the arrays' values (see _score).
        self._concrete_args: set[Static] = set()
        self._plate_names: dict[Static, dict[str, tuple[str, ...]]] = {}

    def _structure(
        self, program: Program, values: dict, key: jax.Array, weighting: str = "joint"
    ) -> PlateStructure:
        structure = plan(program, values, key, weighting)
        missing = sorted(set(structure.param_sites) - set(self.params))
        if missing:
            hint = "" if self._given_params else " (no params were given)"
            raise ValueError(
                f"`params` has no value for param site(s) {missing}{hint}. Pass the "
                "fitted values, e.g. MarginalLikelihood(..., params=svi_result.params); "
                "evaluating at initial values is rarely what is meant."
            )
        point_masses = point_mass_sites(program, values, key[1])
        if point_masses:
            raise ValueError(
                f"Guide site(s) {list(point_masses)} are point masses "
                "(Delta): every particle is the same point, so importance sampling would "
                "report log p(x, z*) with a standard error of 0, a confident wrong "
                "answer. Score a guide with a density instead, e.g. AutoNormal or "
                "AutoMultivariateNormal(model, init_loc_fn=init_to_value(values="
                "point_guide.median(params))) fitted for a few SVI steps."
            )
        for name, size, sub in structure.guide_only_subsampled:
            raise ValueError(
                f"The guide subsamples plate '{name}' to {sub} of {size} elements, but the "
                "model, called with these arguments, does not subsample it: an AutoGuide "
                "fixes each plate's subsample size the first time it runs (here, in "
                "training). To score the full data, create a new guide of the same class "
                "for the model, e.g. AutoNormal(model), and pass the fitted params to it: "
                "its plates follow the arguments of its first call."
            )
        subsampled = [
            n
            for n, full, b in zip(structure.names, structure.full_sizes, structure.sizes)
            if full != b
        ] + [n for n, size, full in structure.local_plates if full != size]
        if subsampled or structure.subsampled_joint_plates:
            raise ValueError(
                f"Plate(s) {subsampled + list(structure.subsampled_joint_plates)} are "
                "subsampled; log p(x) is estimated on the data as given. Call the model "
                "without subsample_size (e.g. pass the full data)."
            )
        return structure

    def lower(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
        """The evaluation for these arguments, lowered but not run
        (:class:`jax.stages.Lowered`): ``.compile().memory_analysis()`` gives XLA's own
        account of its memory, ``.compile().cost_analysis()`` its FLOPs.
        """
        values = {**self.params, **self.mutable_state}
        Program(self.model, self.guide, args, kwargs).prepare_guide(values, rng_key)
        dynamic, static = split_static((args, kwargs))
        self._data_shards = max([num_shards(v) for v in dynamic], default=1)
        return self._evaluate.lower(rng_key, values, dynamic, static)

    def _score(self, rng_key: jax.Array, args: tuple, kwargs: dict) -> Any:
        """Check, then run the compiled ``_evaluate_traced`` on the call's arguments
        (arrays dynamic, everything else static) and raise on NaN data.

        A model that needs its arguments' values while it is traced (NumPyro's own
        examples read sizes with ``np.unique(x)`` or ``int(np.max(x))``, as SVI, MCMC
        and Predictive allow) fails with arrays as tracers; it is then compiled with
        the arrays as constants (keyed by their contents), and later calls with
        arguments of the same structure go there directly.
        """
        values = {**self.params, **self.mutable_state}
        Program(self.model, self.guide, args, kwargs).prepare_guide(values, rng_key)
        dynamic, static = split_static((args, kwargs))
        # Read while tracing (jit retraces for other input shardings): how many ways
        # the data are split, so the memory budget is per device.
        self._data_shards = max([num_shards(v) for v in dynamic], default=1)
        if static not in self._concrete_args:
            try:
                estimate, nan_data = self._evaluate(rng_key, values, dynamic, static)
            except CONCRETIZATION_ERRORS:
                self._concrete_args.add(static)
        if static in self._concrete_args:
            concrete = split_static((args, kwargs), concrete=True)[1]
            try:
                estimate, nan_data = self._evaluate(rng_key, values, [], concrete)
            except CONCRETIZATION_ERRORS as err:
                raise ValueError(
                    "The model or guide needs the concrete value of a traced quantity even "
                    "with every argument concrete (e.g. a latent draw in Python control "
                    "flow, `if z > 0:`). The estimate runs the model under jax.jit, as SVI "
                    "does: use jnp.where or lax.cond on random values. JAX said: "
                    f"{type(err).__name__}: {str(err).splitlines()[0]}"
                ) from err
            static = concrete
        raise_on_nan_data(nan_data, self._plate_names.get(static, {}))
        program = Program(self.model, self.guide, args, kwargs)
        return estimate._replace(data_digest=observed_digest(program, values, rng_key))

    def _auto_chunk(
        self, chunk_log_w: Callable, keys: jax.Array, num_particles: int, reserved: int = 0
    ) -> int:
        """The largest chunk whose particles fit in ``memory_budget`` less ``reserved``
        bytes held elsewhere (on CPU also in :data:`CPU_WORKING_SET`): the peak size of
        two particles' arrays less one particle's (what one more particle adds).
        """
        if num_particles == 1:
            return 1
        one, two = (peak_bytes(jax.make_jaxpr(chunk_log_w)(keys[:c]).jaxpr) for c in (1, 2))
        per_particle = max(two - one, one // 2, 1)
        # Per device: the data and (with shard_particles) the particles are split.
        shards = self._data_shards * getattr(self._vectorize, "num_shards", 1)
        limit = max(self.memory_budget - reserved, 1)
        if jax.default_backend() == "cpu":
            limit = min(limit, CPU_WORKING_SET)
        chunk = int(min(num_particles, max(1, limit * shards // per_particle)))
        self.chunk_size_used = chunk
        return chunk


def raise_on_nan_data(nan_data: dict[str, jax.Array], plates: dict[str, tuple[str, ...]]) -> None:
    """Raise a ValueError naming the observed sites whose data holds NaN (when the
    flags are concrete; under a JAX transformation the estimate is NaN there).
    """
    if any(isinstance(v, jax.core.Tracer) for v in nan_data.values()):
        return
    bad = {n: np.argwhere(np.asarray(v)) for n, v in nan_data.items() if np.any(v)}
    if not bad:
        return
    where = "; ".join(
        f"'{n}' at {len(idx)} element(s) of plate(s) {list(plates[n])}, first {idx[0].tolist()}"
        if plates.get(n)
        else f"'{n}'"
        for n, idx in sorted(bad.items())
    )
    raise ValueError(
        f"Observed data holds NaN or inf: {where}. log p(x) is not defined there. Drop those "
        "rows, or mask them (numpyro.handlers.mask, or obs_mask= in numpyro.sample)."
    )
