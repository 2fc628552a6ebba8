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
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_iwae.elbo import check_positive_int
from numpyro_iwae.estimators import nan_to_neginf, plate_layout
from numpyro_iwae.weights import (
    PlateStructure,
    draw_with_keys,
    plan,
    seed_plates,
    split_keys,
)

__all__ = ["LogMarginalEstimate", "MarginalLikelihood", "pareto_k_hat", "psis_tail_length"]

#: Particles per chunk when ``chunk_size=None``.
DEFAULT_CHUNK_SIZE = 64


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

    """

    log_marginal: jax.Array
    pointwise: jax.Array
    stderr: jax.Array
    ess: jax.Array
    k_hat: jax.Array
    log_weights: jax.Array | None = None
    samples: dict[str, jax.Array] | None = None

    def to_inference_data(self) -> Any:
        """The resampled posterior as :class:`arviz.InferenceData`.

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
        idata = az.from_dict(posterior=posterior)
        idata.posterior.attrs.update(attrs)
        return idata


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


class MarginalLikelihood:
    r"""Estimate :math:`\log p(x)` of a model with a (fitted) guide as proposal.

    .. math::

        \log \hat p(x) = \sum_n \Big[\log \frac1K \sum_{k=1}^K
            \frac{p(x_n, z_{k,n})}{q(z_{k,n} \mid x_n)}\Big],
        \qquad z_{k,n} \sim q,

    with one estimate per element :math:`n` of the plates that enclose every sample
    site, as in :class:`~numpyro_iwae.IWELBO`. Its expectation is a lower bound that
    tends to :math:`\log p(x)` as K grows (Burda et al., 2016, use K = 5000 to report
    test log-likelihoods). Particles are drawn ``chunk_size`` at a time and
    reduced on the fly, so memory is O(chunk x data); the same particles are drawn
    whatever the chunk size. Called like :class:`numpyro.infer.Predictive`:
    ``MarginalLikelihood(model, guide, params=params)(rng_key, *args, **kwargs)``
    returns a :class:`LogMarginalEstimate` with a standard error, the effective
    sample size and the PSIS :math:`\hat k` diagnostic.

    :param model: NumPyro model.
    :param guide: NumPyro guide, the proposal (e.g. an autoguide after SVI).
    :param params: values of the ``param`` sites (``svi_result.params``); every
        param site of model and guide must have one.
    :param num_particles: K, particles per plate element.
    :param chunk_size: particles per chunk; ``None`` for
        :data:`DEFAULT_CHUNK_SIZE` (or K if smaller).
    :param num_samples: S, posterior samples to draw by importance resampling:
        each of S draws picks particle k with probability :math:`\tilde w_k`,
        separately per plate element (with replacement, streamed across chunks).
        The draws are only as good as the weights: check ``ess`` and ``k_hat``.
    :param return_log_weights: also return all ``K x plate`` log weights. This
        takes O(K x data) memory, which streaming otherwise avoids: at K = 5000
        and 10,000 datapoints that is 200 MB of float32.

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
        num_particles: int = 1000,
        chunk_size: int | None = None,
        num_samples: int = 0,
        return_log_weights: bool = False,
    ) -> None:
        self.model = model
        self.guide = guide
        self.params = {} if params is None else dict(params)
        self.num_particles = check_positive_int(num_particles, "num_particles")
        if chunk_size is not None:
            chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.chunk_size = min(chunk_size or DEFAULT_CHUNK_SIZE, self.num_particles)
        self.return_log_weights = bool(return_log_weights)
        self.num_samples = 0 if num_samples == 0 else check_positive_int(num_samples, "num_samples")
        self._given_params = params is not None

    def _structure(self, model, guide, args, kwargs, key) -> PlateStructure:
        structure = plan(model, guide, self.params, args, kwargs, key)
        missing = sorted(set(structure.param_sites) - set(self.params))
        if missing:
            hint = "" if self._given_params else " (no params were given)"
            raise ValueError(
                f"`params` has no value for param site(s) {missing}{hint}. Pass the "
                "fitted values, e.g. MarginalLikelihood(..., params=svi_result.params); "
                "evaluating at initial values is rarely what is meant."
            )
        subsampled = [
            n
            for n, full, b in zip(structure.names, structure.full_sizes, structure.sizes)
            if full != b
        ]
        if subsampled or structure.subsampled_joint_plates:
            raise ValueError(
                f"Plate(s) {subsampled + list(structure.subsampled_joint_plates)} are "
                "subsampled; log p(x) is estimated on the data as given. Call the model "
                "without subsample_size (e.g. pass the full data)."
            )
        return structure

    def __call__(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> LogMarginalEstimate:
        """Estimate ``log p(x)`` for the data in ``args``/``kwargs``.

        :param rng_key: a JAX PRNG key; the same key gives the same particles
            whatever the chunk size.
        :return: a :class:`LogMarginalEstimate`.
        """
        k, chunk = self.num_particles, self.chunk_size
        plate_key, keys = split_keys(rng_key, k)
        model, guide = seed_plates(self.model, self.guide, plate_key)
        structure = self._structure(model, guide, args, kwargs, keys[0])
        num_chunks = -(-k // chunk)
        pad = num_chunks * chunk - k
        keys = jnp.concatenate([keys, keys[:pad]]) if pad else keys
        live = (jnp.arange(num_chunks * chunk) < k).reshape(num_chunks, chunk)
        keys = keys.reshape((num_chunks, chunk) + keys.shape[1:])
        params = self.params

        def chunk_log_w(chunk_keys: jax.Array, chunk_live: jax.Array) -> tuple[jax.Array, dict]:
            draw, model_fn = draw_with_keys(
                model, guide, params, args, kwargs, chunk_keys, _vmap, structure
            )
            log_p, _ = model_fn(draw.values, params)
            log_w = nan_to_neginf(log_p - draw.log_q_rep - draw.log_q_score)
            mask = chunk_live.reshape((chunk,) + (1,) * (log_w.ndim - 1))
            return jnp.where(mask, log_w, -jnp.inf), draw.values

        m_top = min(psis_tail_length(k) + 1, k)
        shape = structure.sizes
        init = _Running(
            jnp.full(shape, -jnp.inf),
            jnp.zeros(shape),
            jnp.zeros(shape),
            jnp.full((m_top,) + shape, -jnp.inf),
        )

        num_samples = self.num_samples
        axes = {name: (ndim, ax) for name, ndim, ax in structure.value_axes}
        samples0 = {}
        if num_samples:
            values_shape = jax.eval_shape(lambda: chunk_log_w(keys[0], live[0])[1])
            samples0 = {
                n: jnp.zeros((num_samples,) + v.shape[1:], v.dtype) for n, v in values_shape.items()
            }
        resample_keys = jax.random.split(jax.random.fold_in(rng_key, 1), num_chunks)

        def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array | None]:
            state, samples = carry
            chunk_keys, chunk_live, resample_key = xs
            log_w, values = chunk_log_w(chunk_keys, chunk_live)
            new_state = _update(state, log_w)
            if num_samples:
                samples = _resample(resample_key, samples, state, new_state, log_w, values, axes)
            return (new_state, samples), (log_w if self.return_log_weights else None)

        (state, samples), stacked = jax.lax.scan(
            body, (init, samples0), (keys, live, resample_keys)
        )
        return self._estimate(state, stacked, k, samples if num_samples else None)

    def _estimate(
        self, state: _Running, stacked: jax.Array | None, k: int, samples: dict | None
    ) -> LogMarginalEstimate:
        pointwise = state.peak + jnp.log(state.s1) - math.log(k)
        ess = jnp.where(state.s2 > 0, state.s1**2 / jnp.where(state.s2 > 0, state.s2, 1.0), 0.0)
        variance = jnp.maximum(1.0 / ess - 1.0 / k, 0.0)
        stderr = jnp.sqrt(jnp.sum(variance))
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


def _vmap(fn: Callable, xs: Any) -> Any:
    return jax.vmap(fn)(xs)
