r"""Estimating :math:`\log p(x)` of a fitted model with many particles, in bounded memory.

:class:`MarginalLikelihood` draws K particles from the guide in chunks and keeps, per
plate element, a running :math:`(m, s_1, s_2)` with :math:`m` the largest log weight so
far, :math:`s_1 = \sum_k e^{\log w_k - m}` and :math:`s_2 = \sum_k e^{2(\log w_k - m)}`,
plus the largest :math:`M + 1` log weights for the Pareto fit. Memory is
O(chunk x data), never O(K x data), and because every particle's key is fixed before
chunking, the result does not depend on the chunk size beyond float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
import hashlib
import math
from typing import Any, NamedTuple

import jax
from jax.extend.core import Literal
import jax.numpy as jnp
import numpy as np

from numpyro_iwae.ais import AISResult, ais_log_weights, sigmoid_schedule
from numpyro_iwae.annealing import AnnealedDensity
from numpyro_iwae.elbo import check_positive_int
from numpyro_iwae.estimators import nan_to_neginf, plate_layout
from numpyro_iwae.weights import (
    PlateStructure,
    Program,
    draw_with_keys,
    plan,
    point_mass_sites,
    split_keys,
)

__all__ = ["LogMarginalEstimate", "MarginalLikelihood", "pareto_k_hat", "psis_tail_length"]

#: Bytes the particles of one chunk may take when ``chunk_size=None`` (1 GiB).
DEFAULT_MEMORY_BUDGET = 2**30


class LogMarginalEstimate(NamedTuple):
    r"""An importance-sampling estimate of :math:`\log p(x)` with its diagnostics.

    Attributes:
        log_marginal: :math:`\log \hat p(x)`, the sum of ``pointwise``.
        pointwise: one estimate :math:`\log \frac1K \sum_k w_k` per element of the
            plates that enclose every sample site (per datapoint for a VAE); shape
            ``()`` when there is no such plate.
        stderr: standard error of ``log_marginal`` by the delta method,
            :math:`\sqrt{\sum_n (1/\mathrm{ESS}_n - 1/K)}`.
        ess: effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2`, like
            ``pointwise``.
        k_hat: PSIS Pareto shape estimate of the weights' tail, like ``pointwise``
            (Vehtari et al., 2024): below 0.5 the estimate is reliable, above 0.7 the
            weights' variance is likely infinite and ``stderr`` is not to be trusted.
            ``inf`` when fewer than five weights exceed the tail cutoff (e.g. all
            weights equal).
        log_weights: the ``(K, *plate_shape)`` log weights when requested with
            ``return_log_weights=True``, else ``None``.
        samples: approximate posterior samples, ``{site: (S, *site_shape)}``, drawn
            by importance resampling when ``num_samples=S > 0``, else ``None``.
        local_ess: with ``num_global_particles``, the effective sample size of the
            inner (local) weights per element of each local plate,
            ``{plate: (*plate_shape, local size)}``, the median over the global
            draws; else ``None``. ``ess``, ``k_hat`` and ``log_weights`` then
            describe the outer weights, one per global draw.
        local_k_hat: like ``local_ess``, the inner weights' PSIS :math:`\hat k`.

    """

    log_marginal: jax.Array
    pointwise: jax.Array
    stderr: jax.Array
    ess: jax.Array
    k_hat: jax.Array
    log_weights: jax.Array | None = None
    samples: dict[str, jax.Array] | None = None
    local_ess: dict[str, jax.Array] | None = None
    local_k_hat: dict[str, jax.Array] | None = None

    def to_inference_data(self) -> Any:
        """The resampled posterior as ArviZ data: :class:`arviz.InferenceData` on
        ArviZ 0.x, an :class:`xarray.DataTree` on ArviZ 1.x (whose ``from_dict`` takes
        one ``{group: {variable: array}}`` mapping).

        The ``posterior`` group holds the samples (one chain); its attributes keep
        the estimate's ``log_marginal``, ``stderr``, and the per-element ``ess``
        and ``k_hat`` so the diagnostics travel with the draws.

        :raises ValueError: if the estimate was made with ``num_samples=0``.
        """
        import arviz as az

        if self.samples is None:
            raise ValueError(
                "This estimate has no posterior samples; create MarginalLikelihood with "
                "num_samples > 0."
            )
        posterior = {name: np.asarray(v)[None] for name, v in self.samples.items()}
        attrs = {
            "log_marginal": float(self.log_marginal),
            "stderr": float(self.stderr),
            "ess": np.asarray(self.ess).tolist(),
            "k_hat": np.asarray(self.k_hat).tolist(),
            "inference": "importance resampling (numpyro_iwae.MarginalLikelihood)",
        }
        idata = _arviz_from_dict(az, {"posterior": posterior})
        idata.posterior.attrs.update(attrs)
        return idata


def _arviz_from_dict(az: Any, groups: dict[str, dict[str, np.ndarray]]) -> Any:
    """``az.from_dict`` on both ArviZ lines: 1.x takes one ``{group: {var: array}}``
    mapping, 0.x one keyword argument per group.
    """
    if int(az.__version__.split(".")[0]) >= 1:
        return az.from_dict(groups)
    return az.from_dict(**groups)


def psis_tail_length(num_particles: int) -> int:
    r"""PSIS tail length :math:`M = \lceil \min(K/5,\ 3\sqrt K) \rceil` (Vehtari et al.,
    2024, *Pareto Smoothed Importance Sampling*, JMLR 25(72), section 3).
    """
    return int(math.ceil(min(0.2 * num_particles, 3 * math.sqrt(num_particles))))


def pareto_k_hat(top: jax.Array) -> jax.Array:
    r"""PSIS :math:`\hat k` from the largest :math:`M + 1` log weights.

    With the log weights shifted so the largest is 0, the cutoff :math:`u` is the
    :math:`(M+1)`-th largest (at least the log of the smallest normal float), and
    the tail :math:`y_i = e^{\log w_i} - e^u` over the weights strictly above it.
    A generalized Pareto distribution is fitted to the tail by the empirical Bayes
    method of Zhang & Stephens (2009, *A New and Efficient Estimation Method for
    the Generalized Pareto Distribution*, Technometrics 51(3)): with
    :math:`\theta` on a grid of :math:`m = 30 + \lfloor \sqrt n \rfloor` points

    .. math::

        \theta_j = \frac{1}{y_{(n)}}
            + \frac{1 - \sqrt{m / (j - 1/2)}}{3\, y_{(\lfloor n/4 + 1/2 \rfloor)}},
        \quad \xi(\theta) = \frac1n \sum_i \log(1 - \theta y_i),
        \quad \ell(\theta) = n \big(\log(-\theta / \xi(\theta)) - \xi(\theta) - 1\big),

    :math:`\hat\theta = \sum_j \theta_j\, \mathrm{softmax}(\ell)_j`, and
    :math:`\hat k = (n\, \xi(\hat\theta) + 10 \cdot 0.5) / (n + 10)`, the shape
    shrunk towards 0.5 by a weak prior (Vehtari et al., 2024). Fewer than five
    tail weights give ``inf``. The fit runs in the input's precision: in float32,
    weights below :math:`e^{-87}` times the largest are zero, which can change
    :math:`\hat k` for extremely heavy tails (:math:`\hat k > 2`), never its
    verdict.

    Args:
        top: the largest :math:`M + 1` log weights along axis 0, in any order.

    Returns:
        :math:`\hat k`, shape ``top.shape[1:]``.

    """
    m_tail = top.shape[0] - 1
    x = jnp.sort(top, axis=0)[::-1]  # descending
    x = x - x[0]
    cutoff = jnp.maximum(x[m_tail], jnp.log(jnp.finfo(x.dtype).tiny))
    tail = x[:m_tail][::-1]  # ascending
    valid = tail > cutoff
    n = jnp.sum(valid, axis=0)
    y = jnp.where(valid, jnp.exp(tail) - jnp.exp(cutoff), 0.0)
    n_f = n.astype(x.dtype)
    safe_n = jnp.maximum(n_f, 1.0)

    # The valid entries are the last n of the ascending tail.
    first = m_tail - n
    quartile = jnp.clip(first + jnp.floor(n_f / 4 + 0.5).astype(n.dtype) - 1, 0, m_tail - 1)
    y_quartile = jnp.take_along_axis(y, quartile[None], axis=0)[0]
    y_max = y[-1]

    m_max = 30 + int(math.isqrt(max(m_tail, 0)))
    m_grid = 30 + jnp.floor(jnp.sqrt(n_f))
    j = jnp.arange(1, m_max + 1, dtype=x.dtype).reshape((m_max,) + (1,) * n.ndim)
    grid_ok = j <= m_grid
    theta = 1.0 / y_max + (1.0 - jnp.sqrt(m_grid / (j - 0.5))) / (3.0 * y_quartile)

    # xi for every grid point: (m_max, *shape)
    xi_grid = (
        jnp.sum(jnp.where(valid[None], jnp.log1p(-theta[:, None] * y[None]), 0.0), axis=1) / safe_n
    )
    ell = n_f * (jnp.log(-theta / xi_grid) - xi_grid - 1.0)
    ell = jnp.where(grid_ok, ell, -jnp.inf)
    theta_hat = jnp.sum(jax.nn.softmax(ell, axis=0) * jnp.where(grid_ok, theta, 0.0), axis=0)
    xi_hat = jnp.sum(jnp.where(valid, jnp.log1p(-theta_hat * y), 0.0), axis=0) / safe_n
    k_hat = (n_f * xi_hat + 10 * 0.5) / (n_f + 10)
    return jnp.where(n > 4, k_hat, jnp.inf)


class _Running(NamedTuple):
    peak: jax.Array  # running max of log w
    s1: jax.Array  # sum exp(log w - peak)
    s2: jax.Array  # sum exp(2 (log w - peak))
    top: jax.Array  # the largest M + 1 log weights


def _update(state: _Running, log_w: jax.Array) -> _Running:
    peak = jnp.maximum(state.peak, jnp.max(log_w, axis=0))
    safe = jnp.where(jnp.isneginf(peak), 0.0, peak)
    shrink = jnp.exp(state.peak - safe)
    rel = jnp.exp(log_w - safe)
    s1 = state.s1 * shrink + jnp.sum(rel, axis=0)
    s2 = state.s2 * shrink**2 + jnp.sum(rel**2, axis=0)
    both = jnp.concatenate([state.top, log_w], axis=0)
    top = jnp.moveaxis(jax.lax.top_k(jnp.moveaxis(both, 0, -1), state.top.shape[0])[0], -1, 0)
    return _Running(peak, s1, s2, top)


def _empty_running(shape: tuple[int, ...], m_top: int) -> _Running:
    return _Running(
        jnp.full(shape, -jnp.inf),
        jnp.zeros(shape),
        jnp.zeros(shape),
        jnp.full((m_top,) + shape, -jnp.inf),
    )


def _ess(state: _Running) -> jax.Array:
    r""":math:`(\sum w)^2 / \sum w^2` from a running state (0 with no live weight)."""
    return jnp.where(state.s2 > 0, state.s1**2 / jnp.where(state.s2 > 0, state.s2, 1.0), 0.0)


def _chunked(keys: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Particle keys as ``(chunks, chunk, ...)``, padded by repeating keys, and the
    mask of the real particles.
    """
    num_chunks = -(-k // chunk)
    pad = num_chunks * chunk - k
    keys = jnp.concatenate([keys, keys[:pad]]) if pad else keys
    live = (jnp.arange(num_chunks * chunk) < k).reshape(num_chunks, chunk)
    return keys.reshape((num_chunks, chunk) + keys.shape[1:]), live


def _log_total(state: _Running) -> jax.Array:
    return state.peak + jnp.log(state.s1)


def _resample(
    key: jax.Array,
    samples: dict[str, jax.Array],
    before: _Running,
    after: _Running,
    log_w: jax.Array,
    values: dict[str, jax.Array],
    axes: dict[str, tuple[int, tuple[int, ...]]],
) -> dict[str, jax.Array]:
    r"""Streamed importance resampling with replacement, per plate element.

    Each of the S slots holds a draw from the particles seen so far with
    probabilities proportional to their weights. A new chunk of total weight
    :math:`W_c` replaces a slot's draw with probability :math:`W_c / W_{\le c}`, by
    one of its particles chosen proportionally to weight; by induction every
    particle ends up chosen with probability :math:`w_k / \sum_j w_j`.
    """
    num_samples = next(iter(samples.values())).shape[0]
    plate_shape = log_w.shape[1:]
    k_switch, k_pick = jax.random.split(key)
    chunk_total = jax.nn.logsumexp(log_w, axis=0)
    p_switch = jnp.exp(chunk_total - _log_total(after))
    p_switch = jnp.where(jnp.isneginf(_log_total(before)), 1.0, p_switch)
    switch = jax.random.uniform(k_switch, (num_samples,) + plate_shape) < p_switch
    logits = jnp.moveaxis(log_w, 0, -1)  # (*plates, chunk)
    pick = jax.random.categorical(k_pick, logits, shape=(num_samples,) + plate_shape)
    out = {}
    for name, value in values.items():
        ndim, ax = axes[name]
        chosen = jnp.take_along_axis(value, plate_layout(pick, ndim, ax), axis=0)
        out[name] = jnp.where(plate_layout(switch, ndim, ax), chosen, samples[name])
    return out


class Evaluator:
    r"""What the estimators of :math:`\log p(x)` for a fitted model share: the fitted
    values, the checks of a model/guide pair before it is scored (missing params,
    point masses, subsampled plates, NaN data), and the call, compiled once per
    shape of the arguments. Subclasses define ``_evaluate_traced``.
    """

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
        if vectorize_particles is True:
            vectorize_particles = _vmap
        elif vectorize_particles is False:
            vectorize_particles = _lax_map
        elif not callable(vectorize_particles):
            raise ValueError(
                "`vectorize_particles` must be True (jax.vmap), False (jax.lax.map) or a "
                f"callable f(fn, xs) such as shard_particles(mesh), got {vectorize_particles!r}."
            )
        self._vectorize = vectorize_particles
        self._data_shards = 1
        self._given_params = params is not None
        self._evaluate = jax.jit(self._evaluate_traced, static_argnums=3)
        # Argument structures whose model needs the arrays' values (see _score).
        self._concrete_args: set[_Static] = set()
        self._plate_names: dict[_Static, dict[str, tuple[str, ...]]] = {}

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
        dynamic, static = _split_static((args, kwargs))
        # Read while tracing (jit retraces for other input shardings): how many ways
        # the data are split, so the memory budget is per device.
        self._data_shards = max([_num_shards(v) for v in dynamic], default=1)
        if static not in self._concrete_args:
            try:
                estimate, nan_data = self._evaluate(rng_key, values, dynamic, static)
            except _CONCRETIZATION_ERRORS:
                self._concrete_args.add(static)
        if static in self._concrete_args:
            concrete = _split_static((args, kwargs), concrete=True)[1]
            try:
                estimate, nan_data = self._evaluate(rng_key, values, [], concrete)
            except _CONCRETIZATION_ERRORS as err:
                raise ValueError(
                    "The model or guide needs the concrete value of a traced quantity even "
                    "with every argument concrete (e.g. a latent draw in Python control "
                    "flow, `if z > 0:`). The estimate runs the model under jax.jit, as SVI "
                    "does: use jnp.where or lax.cond on random values. JAX said: "
                    f"{type(err).__name__}: {str(err).splitlines()[0]}"
                ) from err
            static = concrete
        _raise_on_nan_data(nan_data, self._plate_names.get(static, {}))
        return estimate

    def _auto_chunk(self, chunk_log_w: Callable, keys: jax.Array, num_particles: int) -> int:
        """The largest chunk whose particles fit in ``memory_budget``: the peak size
        of two particles' arrays less one particle's (what one more particle adds).
        """
        if num_particles == 1:
            return 1
        one, two = (_peak_bytes(jax.make_jaxpr(chunk_log_w)(keys[:c]).jaxpr) for c in (1, 2))
        per_particle = max(two - one, one // 2, 1)
        # Per device: the data and (with shard_particles) the particles are split.
        shards = self._data_shards * getattr(self._vectorize, "num_shards", 1)
        chunk = int(min(num_particles, max(1, self.memory_budget * shards // per_particle)))
        self._auto_chunk_used = chunk  # for tests and benchmarks
        return chunk


class MarginalLikelihood(Evaluator):
    r"""Estimate :math:`\log p(x)` of a model with a (fitted) guide as proposal.

    .. math::

        \log \hat p(x) = \sum_n \Big[\log \frac1K \sum_{k=1}^K
            \frac{p(x_n, z_{k,n})}{q(z_{k,n} \mid x_n)}\Big],
        \qquad z_{k,n} \sim q,

    with one estimate per element :math:`n` of the plates that enclose every sample
    site, as in :class:`~numpyro_iwae.IWELBO`. Its expectation is a lower bound that
    tends to :math:`\log p(x)` as K grows (Burda et al., 2016, use K = 5000 to report
    test log-likelihoods). Particles are drawn a chunk at a time and reduced on the
    fly, so memory is O(chunk x data); the same particles are drawn whatever the
    chunk size. Called like :class:`numpyro.infer.Predictive`:
    ``MarginalLikelihood(model, guide, params=params)(rng_key, *args, **kwargs)``
    returns a :class:`LogMarginalEstimate` with a standard error, the effective
    sample size and the PSIS :math:`\hat k` diagnostic.

    The evaluation is compiled once per shape of the arguments: repeated calls with
    arrays of the same shapes and dtypes (and equal non-array arguments, which are
    treated as static) reuse it.

    :param model: NumPyro model.
    :param guide: NumPyro guide, the proposal (e.g. an autoguide after SVI). It must
        have a density: point masses (``AutoDelta``, the training guide of
        ``AutoLaplaceApproximation``, any ``Delta`` draw that is not a transform of
        an auxiliary draw) are refused.
    :param params: values of the ``param`` sites (``svi_result.params``); every
        param site of model and guide must have one.
    :param mutable_state: values of the ``mutable`` sites, e.g. batch-norm
        statistics of a flax module (``svi_result.state.mutable_state``).
    :param num_particles: K, particles per plate element.
    :param chunk_size: particles per chunk; ``None`` to choose the largest chunk
        whose intermediate arrays fit in ``memory_budget``.
    :param memory_budget: bytes the particles of one chunk may take when
        ``chunk_size=None`` (default :data:`DEFAULT_MEMORY_BUDGET`, 1 GiB). The
        size of one particle is the total size of the arrays one particle's
        guide and model computations create, an upper bound on what they keep
        alive at once. The budget is per device: when the data are placed on
        several devices (a :class:`~jax.sharding.NamedSharding` over the plate's
        axis) or the particles split with ``vectorize_particles``, each device holds
        its share of a chunk, and the chunk grows by the number of shards.
    :param vectorize_particles: how the particles of a chunk are mapped: ``True``
        for :func:`jax.vmap` (default), ``False`` for :func:`jax.lax.map`, or a
        callable ``f(fn, xs)`` such as :func:`~numpyro_iwae.shard_particles` to
        split them over devices.
    :param num_samples: S, posterior samples to draw by importance resampling:
        each of S draws picks particle k with probability :math:`\tilde w_k`,
        separately per plate element (with replacement, streamed across chunks).
        The draws are only as good as the weights: check ``ess`` and ``k_hat``.
    :param return_log_weights: also return all ``K x plate`` log weights. This
        takes O(K x data) memory, which streaming otherwise avoids: at K = 5000
        and 10,000 datapoints that is 200 MB of float32.
    :param num_global_particles: S, for a model with global latents :math:`\theta`
        (sites outside a data plate) next to local ones: use the nested estimator

        .. math::

            \hat p(x) = \frac1S \sum_{s=1}^S \frac{p(\theta_s)}{q(\theta_s)}
                \prod_n \hat p_n(\theta_s), \qquad
            \hat p_n(\theta) = \frac1K \sum_{k=1}^K
                \frac{p(x_n, z_{nk} \mid \theta)}{q(z_{nk} \mid x_n, \theta)},

        unbiased for :math:`p(x)` because the inner estimates are independent
        given :math:`\theta`, with the local plates chosen as by
        ``IWELBO(weighting="local")``. The S global draws are made one after
        another, each with its K local particles streamed in chunks, so memory is
        that of one chunk. ``stderr``, ``ess`` and ``k_hat`` describe the S outer
        weights; ``local_ess`` and ``local_k_hat`` the inner ones. ``None`` (the
        default): plain importance sampling, whose weights are joint over a data
        plate next to a global latent (fine for a few datapoints, hopeless for
        many: the joint weights' spread grows with the data).
    :param annealing_steps: T; with T > 0 each particle is an annealed importance
        sampling run (Neal, 2001) from the guide to the posterior along
        :math:`q^{1-\beta_t} p(x, z)^{\beta_t}`, sigmoidal :math:`\beta_t`
        (:func:`~numpyro_iwae.ais.sigmoid_schedule`), with T Hamiltonian Monte Carlo
        transitions in the unconstrained space of the guide's random draws (for an
        ``AutoContinuous`` guide, its auxiliary latent), one chain and one Metropolis
        test per plate element (:mod:`numpyro_iwae.annealing`). Each weight is still
        an unbiased estimate of :math:`p(x)`, so the estimate, its standard error, ESS
        and :math:`\hat k` read as for importance sampling, but a poor guide no longer
        leaves them heavy-tailed. Cost: about T (``leapfrog_steps`` + 3) evaluations
        of model and guide (gradients counted as one) per particle. 0 (default):
        importance sampling. With ``num_samples`` the runs' final states are
        resampled by their weights. Discrete guide draws are refused; not yet
        available with ``num_global_particles``.
    :param leapfrog_steps: leapfrog steps per HMC transition (default 5).
    :param step_size: the initial HMC step size (default 0.1); a pilot run of
        ``pilot_particles`` adapts it per transition and per plate element towards
        an acceptance of 0.65, and the kept runs use those sizes fixed, so their
        weights stay unbiased.
    :param pilot_particles: particles of the pilot run (default 16; its weights
        are discarded).

    :raises ValueError: when called, if a param site has no value, a plate is
        subsampled, the guide is a point mass, or the observed data holds NaN
        (naming the site); with ``num_global_particles``, if the model has no
        global latent or the guide draws its global sites from local ones.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro_iwae import MarginalLikelihood
        >>> def model():
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(z, 1.0), obs=0.5)
        >>> def guide():  # the exact posterior: every weight equals p(x)
        ...     numpyro.sample("z", dist.Normal(0.25, 0.5**0.5))
        >>> est = MarginalLikelihood(model, guide, num_particles=1000)(jax.random.key(0))
        >>> exact = float(dist.Normal(0.0, 2**0.5).log_prob(0.5))  # x ~ N(0, 2)
        >>> abs(float(est.log_marginal) - exact) < 1e-5, float(est.stderr)
        (True, 0.0)

    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        *,
        params: dict[str, Any] | None = None,
        mutable_state: dict[str, Any] | None = None,
        num_particles: int = 1000,
        chunk_size: int | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        num_samples: int = 0,
        return_log_weights: bool = False,
        num_global_particles: int | None = None,
        vectorize_particles: bool | Callable = True,
        annealing_steps: int = 0,
        leapfrog_steps: int = 5,
        step_size: float = 0.1,
        pilot_particles: int = 16,
    ) -> None:
        super().__init__(
            model,
            guide,
            params=params,
            mutable_state=mutable_state,
            memory_budget=memory_budget,
            vectorize_particles=vectorize_particles,
        )
        self.num_particles = check_positive_int(num_particles, "num_particles")
        if chunk_size is not None:
            chunk_size = min(check_positive_int(chunk_size, "chunk_size"), self.num_particles)
        self.chunk_size = chunk_size
        self.return_log_weights = bool(return_log_weights)
        self.num_samples = 0 if num_samples == 0 else check_positive_int(num_samples, "num_samples")
        if num_global_particles is not None:
            num_global_particles = check_positive_int(num_global_particles, "num_global_particles")
            if self.num_samples:
                raise ValueError(
                    "num_samples (importance resampling) is not available with "
                    "num_global_particles (the nested estimator); use one or the other."
                )
        self.num_global_particles = num_global_particles
        self.annealing_steps = (
            0 if annealing_steps == 0 else check_positive_int(annealing_steps, "annealing_steps")
        )
        self.leapfrog_steps = check_positive_int(leapfrog_steps, "leapfrog_steps")
        if not float(step_size) > 0:
            raise ValueError(f"step_size must be positive, got {step_size!r}.")
        self.step_size = float(step_size)
        self.pilot_particles = check_positive_int(pilot_particles, "pilot_particles")
        if self.annealing_steps and num_global_particles is not None:
            raise ValueError(
                "annealing_steps is not yet available with num_global_particles; use "
                "importance sampling (annealing_steps=0) for the nested estimator."
            )

    def __call__(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> LogMarginalEstimate:
        """Estimate ``log p(x)`` for the data in ``args``/``kwargs``.

        :param rng_key: a JAX PRNG key; the same key gives the same particles
            whatever the chunk size.
        :return: a :class:`LogMarginalEstimate`.
        """
        return self._score(rng_key, args, kwargs)

    def _evaluate_traced(
        self, rng_key: jax.Array, values: dict, dynamic: list, static: _Static
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        args, kwargs = static.merge(dynamic)
        k = self.num_particles
        plate_key, keys = split_keys(rng_key, k)
        program = Program(self.model, self.guide, args, kwargs).with_seeded_plates(plate_key)
        if self.num_global_particles is not None:
            return self._evaluate_nested(rng_key, values, program, keys[0], static)
        structure = self._structure(program, values, keys[0])

        def chunk_log_w(chunk_keys: jax.Array) -> tuple[jax.Array, dict, dict]:
            draw, model_fn = draw_with_keys(program, values, chunk_keys, self._vectorize, structure)
            log_p, output = model_fn(draw.values, values)
            log_w = nan_to_neginf(log_p[0] - draw.log_q_rep[0] - draw.log_q_score[0])
            return log_w, draw.values, output.nan_data

        if self.annealing_steps:
            # NaN data is found by one importance-sampling draw; the weights come from
            # the annealed runs.
            nan_data = chunk_log_w(keys[:1])[2]  # (1, *plates) flags, as a chunk has
            chunk_log_w = self._annealed(program, values, structure, keys[0], nan_data)

        chunk = self.chunk_size or self._auto_chunk(chunk_log_w, keys, k)
        keys, live = _chunked(keys, k, chunk)
        num_chunks = keys.shape[0]

        def masked_log_w(chunk_keys: jax.Array, chunk_live: jax.Array) -> tuple:
            log_w, draw_values, nan_data = chunk_log_w(chunk_keys)
            mask = chunk_live.reshape((chunk,) + (1,) * (log_w.ndim - 1))
            nan_data = {n: jnp.any(v, axis=0) for n, v in nan_data.items()}
            return jnp.where(mask, log_w, -jnp.inf), draw_values, nan_data

        init = _empty_running(structure.sizes, min(psis_tail_length(k) + 1, k))
        out_shapes = jax.eval_shape(lambda: masked_log_w(keys[0], live[0]))
        nan0 = {n: jnp.zeros(v.shape, bool) for n, v in out_shapes[2].items()}

        num_samples = self.num_samples
        axes = {name: (ndim, ax) for name, ndim, ax in structure.value_axes}
        samples0 = {}
        if num_samples:
            samples0 = {
                n: jnp.zeros((num_samples,) + v.shape[1:], v.dtype)
                for n, v in out_shapes[1].items()
            }
        resample_keys = jax.random.split(jax.random.fold_in(rng_key, 1), num_chunks)

        def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array | None]:
            state, samples, nan_data = carry
            chunk_keys, chunk_live, resample_key = xs
            log_w, draw_values, chunk_nan = masked_log_w(chunk_keys, chunk_live)
            new_state = _update(state, log_w)
            if num_samples:
                samples = _resample(
                    resample_key, samples, state, new_state, log_w, draw_values, axes
                )
            nan_data = {n: nan_data[n] | chunk_nan[n] for n in nan_data}
            return (new_state, samples, nan_data), (log_w if self.return_log_weights else None)

        (state, samples, nan_data), stacked = jax.lax.scan(
            body, (init, samples0, nan0), (keys, live, resample_keys)
        )
        estimate = self._estimate(state, stacked, k, samples if num_samples else None)
        self._plate_names[static] = {n: structure.names for n in nan_data}  # for errors
        return estimate, nan_data

    def _annealed(
        self,
        program: Program,
        values: dict,
        structure: PlateStructure,
        key: jax.Array,
        nan_data: dict[str, jax.Array],
    ) -> Callable:
        """``chunk_log_w`` for annealed importance sampling: one AIS run per particle,
        with step sizes adapted once, in a pilot run of ``pilot_particles`` whose
        weights are discarded, and then fixed (so the kept weights stay unbiased).
        """
        density = AnnealedDensity(program, values, structure, key[1])
        betas = sigmoid_schedule(self.annealing_steps + 1)

        def one(pair: jax.Array, step_sizes: jax.Array, adapt: bool) -> AISResult:
            init_key, run_key = jax.random.split(pair[1])
            return ais_log_weights(
                run_key,
                density.init(init_key),
                lambda u: density.log_densities(u, pair[0]),
                betas,
                step_sizes,
                self.leapfrog_steps,
                density.element_sum,
                density.element_expand,
                adapt=adapt,
            )

        pilot_keys = jax.random.split(jax.random.fold_in(key[0], 7), (self.pilot_particles, 2))
        pilot = jax.vmap(lambda k: one(k, jnp.float32(self.step_size), True))(pilot_keys)
        step_sizes = jnp.exp(jnp.mean(jnp.log(pilot.step_sizes), axis=0))

        def kept(pair: jax.Array) -> tuple[jax.Array, dict]:
            out = one(pair, step_sizes, False)
            # The final states, for importance resampling: approximately from the
            # posterior, weighted by their AIS weights.
            return out.log_w, density.values_at(out.u, pair[0])

        def chunk_log_w(chunk_keys: jax.Array) -> tuple[jax.Array, dict, dict]:
            log_w, draws = self._vectorize(kept, chunk_keys)
            return nan_to_neginf(log_w), draws, nan_data

        return chunk_log_w

    def _evaluate_nested(
        self, rng_key: jax.Array, values: dict, program: Program, key: jax.Array, static: _Static
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        r"""The nested estimator: S global draws, each with K local particles per
        element of every local plate, streamed over chunks of local particles and
        mapped sequentially over the global draws.
        """
        k, num_global = self.num_particles, self.num_global_particles
        structure = self._structure(program, values, key, "local")
        if structure.weighting != "local":
            raise ValueError(
                "num_global_particles needs global latent sites (outside a data plate), "
                "but every latent of this model is local to the plates "
                f"{list(structure.names)}: leave num_global_particles=None."
            )

        def chunk_log_w(global_key: jax.Array, chunk_keys: jax.Array) -> tuple:
            prog = replace(program, global_key=global_key)
            draw, model_fn = draw_with_keys(prog, values, chunk_keys, self._vectorize, structure)
            log_p, output = model_fn(draw.values, {**values, **draw.global_values})
            parts = zip(log_p, draw.log_q_rep, draw.log_q_score)
            log_w = tuple(nan_to_neginf(p - q - s) for p, q, s in parts)
            return log_w, output.nan_data

        def particle_keys(global_key: jax.Array) -> jax.Array:
            return jax.random.split(jax.random.fold_in(global_key, 0), (k, 2))

        global_keys = jax.random.split(jax.random.fold_in(rng_key, 2), num_global)
        chunk = self.chunk_size or self._auto_chunk(
            lambda ck: chunk_log_w(global_keys[0], ck), particle_keys(global_keys[0]), k
        )
        m_top = min(psis_tail_length(k) + 1, k)

        def one_global(global_key: jax.Array) -> tuple:
            keys, live = _chunked(particle_keys(global_key), k, chunk)

            def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
                states, _, nan_data = carry
                chunk_keys, chunk_live = xs
                log_w, chunk_nan = chunk_log_w(global_key, chunk_keys)
                mask = chunk_live.reshape((chunk,) + (1,) * len(structure.sizes))
                states = tuple(
                    _update(state, jnp.where(mask[..., None], w, -jnp.inf))
                    for state, w in zip(states, log_w[1:])
                )
                nan_data = {n: nan_data[n] | jnp.any(v, axis=0) for n, v in chunk_nan.items()}
                # The global group's rows agree (every particle shares the global draw).
                return (states, log_w[0][0], nan_data), None

            out = jax.eval_shape(lambda: chunk_log_w(global_key, keys[0]))
            nan0 = {n: jnp.zeros(v.shape[1:], bool) for n, v in out[1].items()}
            init = tuple(
                _empty_running(structure.group_shape(g), m_top)
                for g in range(1, structure.num_groups)
            )
            carry0 = (init, jnp.zeros(structure.sizes), nan0)
            (states, global_term, nan_data), _ = jax.lax.scan(body, carry0, (keys, live))
            outer = global_term
            ess, k_hats = [], []
            for state in states:
                outer = outer + jnp.sum(state.peak + jnp.log(state.s1) - math.log(k), axis=-1)
                ess.append(_ess(state))
                k_hats.append(
                    pareto_k_hat(state.top) if m_top > 1 else jnp.full(ess[-1].shape, jnp.inf)
                )
            return outer, tuple(ess), tuple(k_hats), nan_data

        outer, inner_ess, inner_k_hat, nan_data = jax.lax.map(one_global, global_keys)
        state = _update(
            _empty_running(structure.sizes, min(psis_tail_length(num_global) + 1, num_global)),
            outer,
        )
        estimate = self._estimate(
            state, outer[None] if self.return_log_weights else None, num_global, None
        )
        names = [p for p, _, _ in structure.local_plates]
        estimate = estimate._replace(
            local_ess=dict(zip(names, (jnp.median(e, axis=0) for e in inner_ess))),
            local_k_hat=dict(zip(names, (jnp.median(h, axis=0) for h in inner_k_hat))),
        )
        nan_data = {n: jnp.any(v, axis=0) for n, v in nan_data.items()}
        self._plate_names[static] = {
            n: structure.group_plates(structure.group_of(n)) for n in nan_data
        }
        return estimate, nan_data

    def _estimate(
        self, state: _Running, stacked: jax.Array | None, k: int, samples: dict | None
    ) -> LogMarginalEstimate:
        pointwise = state.peak + jnp.log(state.s1) - math.log(k)
        ess = _ess(state)
        variance = jnp.maximum(1.0 / ess - 1.0 / k, 0.0)
        # One particle says nothing about the spread of the weights: unknown, not 0.
        stderr = jnp.sqrt(jnp.sum(variance)) if k > 1 else jnp.float32(jnp.nan)
        k_hat = pareto_k_hat(state.top) if state.top.shape[0] > 1 else jnp.full(ess.shape, jnp.inf)
        log_weights = None
        if stacked is not None:
            log_weights = stacked.reshape((-1,) + stacked.shape[2:])[:k]
        return LogMarginalEstimate(
            log_marginal=jnp.sum(pointwise),
            pointwise=pointwise,
            stderr=stderr,
            ess=ess,
            k_hat=k_hat,
            log_weights=log_weights,
            samples=samples,
        )


def _raise_on_nan_data(nan_data: dict[str, jax.Array], plates: dict[str, tuple[str, ...]]) -> None:
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


def _nbytes(var: Any) -> int:
    aval = var.aval
    if not (hasattr(aval, "shape") and hasattr(aval, "dtype")):
        return 0
    return math.prod(aval.shape) * aval.dtype.itemsize


def _peak_bytes(jaxpr: Any) -> int:
    """Peak total size of the arrays alive at once while a jaxpr runs in order.

    A value is alive from the equation that makes it to its last use; a nested
    jaxpr (``jit``, ``custom_vjp``, ...) adds its own peak while its equation runs.
    XLA fuses and reuses buffers, so the true peak is lower (about 2-3x lower for
    the MNIST VAE): an upper bound, cheap to compute (no compilation).
    """
    last: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if not isinstance(var, Literal):
                last[var] = i
    for var in jaxpr.outvars:
        if not isinstance(var, Literal):
            last[var] = len(jaxpr.eqns)
    live = {var: _nbytes(var) for var in [*jaxpr.invars, *jaxpr.constvars]}
    current = peak = sum(live.values())
    for i, eqn in enumerate(jaxpr.eqns):
        inner = 0
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    inner = max(inner, _peak_bytes(sub))
        made = {var: _nbytes(var) for var in eqn.outvars}
        peak = max(peak, current + max(inner, sum(made.values())))
        live.update(made)
        current += sum(made.values())
        for var in eqn.invars:
            if not isinstance(var, Literal) and last.get(var) == i and var in live:
                current -= live.pop(var)
    return peak


class _Static:
    """The non-array leaves of the call's arguments and their tree structure:
    static under ``jit`` (hashed by value, arrays by their contents, anything else
    unhashable by identity).
    """

    def __init__(self, treedef: Any, leaves: tuple, slots: tuple[bool, ...]) -> None:
        self.treedef, self.leaves, self.slots = treedef, leaves, slots
        self._cached_key: tuple | None = None

    def _key(self) -> tuple:
        if self._cached_key is None:
            self._cached_key = self._compute_key()
        return self._cached_key

    def _compute_key(self) -> tuple:
        def one(v: Any) -> Any:
            if isinstance(v, (jax.Array, np.ndarray, np.generic)):
                array = np.asarray(v)
                digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
                return ("array", array.shape, str(array.dtype), digest)
            try:
                hash(v)
            except TypeError:
                return ("id", id(v))
            return (type(v), v)

        return (self.treedef, self.slots, tuple(one(v) for v in self.leaves))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self._key() == other._key()

    def merge(self, dynamic: list) -> Any:
        dyn, stat = iter(dynamic), iter(self.leaves)
        leaves = [next(dyn) if is_array else next(stat) for is_array in self.slots]
        return jax.tree.unflatten(self.treedef, leaves)


def _split_static(tree: Any, concrete: bool = False) -> tuple[list, _Static]:
    """The array leaves of ``tree`` (dynamic under ``jit``) and the rest (static).
    With ``concrete=True`` every leaf is static, arrays keyed by their contents.
    """
    leaves, treedef = jax.tree.flatten(tree)
    slots = tuple(
        not concrete and isinstance(v, (jax.Array, np.ndarray, np.generic)) for v in leaves
    )
    dynamic = [v for v, is_array in zip(leaves, slots) if is_array]
    static = tuple(v for v, is_array in zip(leaves, slots) if not is_array)
    return dynamic, _Static(treedef, static, slots)


#: What JAX raises when traced code needs a concrete value (``np.unique(x)``,
#: ``int(x)``, ``if x:`` on a tracer).
_CONCRETIZATION_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _vmap(fn: Callable, xs: Any) -> Any:
    return jax.vmap(fn)(xs)


def _lax_map(fn: Callable, xs: Any) -> Any:
    return jax.lax.map(fn, xs)


def _num_shards(x: Any) -> int:
    """Into how many pieces an array is split across devices (1 if replicated)."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or not hasattr(sharding, "shard_shape") or not np.ndim(x):
        return 1
    shard = sharding.shard_shape(np.shape(x))
    return max(1, math.prod(np.shape(x)) // max(1, math.prod(shard)))
