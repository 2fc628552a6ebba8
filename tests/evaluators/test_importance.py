"""MarginalLikelihood against analytic evidence, arviz's PSIS, and a memory bound."""

import math
import subprocess
import sys
import textwrap

import arviz as az
from gaussians import log_evidence, posterior
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_iwae import MarginalLikelihood
from numpyro_iwae.maths.psis import pareto_k_hat, psis_tail_length

SIG = 0.7
X = np.random.default_rng(0).normal(size=(6, 1)) * 1.5
TRUTH = log_evidence(X, np.ones(1), np.zeros(1), np.full(1, SIG))  # per datapoint
POST_LOC, POST_SCALE = posterior(X, np.ones(1), np.zeros(1), np.full(1, SIG))


def model(x):
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(z, SIG), obs=x[:, 0])


def guide(x):
    loc = numpyro.param("loc", jnp.zeros(x.shape[0]))
    scale = numpyro.param("scale", jnp.ones(x.shape[0]))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, scale))


def params(loc_shift=0.0, scale_factor=1.0):
    return {
        "loc": jnp.asarray(POST_LOC + loc_shift, jnp.float32),
        "scale": jnp.asarray(POST_SCALE * scale_factor, jnp.float32),
    }


def estimate(p, k=1000, chunk=None, seed=0, **kw):
    ml = MarginalLikelihood(model, guide, params=p, num_particles=k, chunk_size=chunk, **kw)
    return ml(jax.random.key(seed), X)


def test_estimate_within_standard_errors_of_truth_per_datapoint():
    est = estimate(params(0.3, 1.8), k=2000)
    assert est.pointwise.shape == (6,)
    se_n = np.sqrt(1 / np.asarray(est.ess) - 1 / 2000)
    assert np.all(np.abs(np.asarray(est.pointwise) - TRUTH) <= 4 * se_n)
    assert abs(float(est.log_marginal) - TRUTH.sum()) <= 4 * float(est.stderr)
    np.testing.assert_allclose(est.log_marginal, np.sum(est.pointwise), rtol=1e-6)


def test_reported_stderr_matches_spread_over_repeated_runs():
    ml = MarginalLikelihood(model, guide, params=params(0.3, 1.8), num_particles=200)
    runs = jax.jit(jax.vmap(lambda key: ml(key, X)))(jax.random.split(jax.random.key(1), 400))
    spread = float(np.std(np.asarray(runs.log_marginal), ddof=1))
    reported = float(np.median(np.asarray(runs.stderr)))
    assert 0.5 < reported / spread < 2.0, (reported, spread)
    # ...and the mean over runs is within its own standard error of the truth (the
    # bias of log-mean-exp at K = 200 is below that here).
    mean = float(np.mean(np.asarray(runs.log_marginal)))
    assert abs(mean - TRUTH.sum()) < 4 * spread / math.sqrt(400) + 1e-3


@pytest.mark.parametrize("chunk", [7, 100, 1000])
@pytest.mark.slow
def test_same_answer_whatever_the_chunk_size(chunk):
    ref = estimate(params(0.3, 1.8), k=1000, chunk=None)
    other = estimate(params(0.3, 1.8), k=1000, chunk=chunk)
    for field in ("log_marginal", "pointwise", "stderr", "ess", "k_hat"):
        np.testing.assert_allclose(getattr(other, field), getattr(ref, field), rtol=2e-5)


def test_exact_posterior_gives_full_ess_and_zero_stderr():
    est = estimate(params(), k=500)
    np.testing.assert_allclose(est.ess, 500.0, rtol=1e-4)
    assert float(est.stderr) < 1e-6
    np.testing.assert_allclose(est.pointwise, TRUTH, atol=1e-5)


@pytest.mark.slow
def test_k_hat_flags_narrow_guides_and_clears_wide_ones():
    # A Normal proposal r times narrower than a Normal target gives weights with a
    # Pareto tail of shape k = 1 - r^2 (0.99 at r = 0.1); a wider one gives bounded
    # weights (k < 0). One k-hat has sd about (1 + k) / sqrt(M) = 0.12 with M = 300
    # tail weights and is biased low on such tails, so the datapoints' mean (sd about
    # 0.05) must exceed 0.7 and each one 0.5.
    narrow = np.asarray(estimate(params(0.0, 0.1), k=10000).k_hat)
    wide = np.asarray(estimate(params(0.0, 2.0), k=10000).k_hat)
    assert narrow.mean() > 0.7 and np.all(narrow > 0.5), narrow
    assert np.all(wide < 0.5), wide


def test_k_hat_agrees_with_arviz_psislw():
    est = estimate(params(0.5, 0.6), k=3000, return_log_weights=True)
    log_w = np.asarray(est.log_weights, np.float64)
    assert log_w.shape == (3000, 6)
    if hasattr(az, "psislw"):  # ArviZ 0.x: the same estimator
        _, ref = az.psislw(log_w.T.copy())
        atol = 2e-3
    else:  # ArviZ 1.x: arviz-stats' array interface, which takes the negated log ratios
        from arviz_stats.base import array_stats

        _, ref = array_stats.psislw(-log_w.T.copy(), axis=-1)
        # Its tail fit differs in detail: up to 0.025 here, against a sampling s.d. of
        # k-hat of about (1 + k) / sqrt(M) = 0.13 with M = 165 tail weights.
        atol = 0.03
    np.testing.assert_allclose(est.k_hat, ref, atol=atol)
    # The returned weights are the ones the estimate was built from.
    lse = np.logaddexp.reduce(log_w, axis=0) - math.log(3000)
    np.testing.assert_allclose(est.pointwise, lse, rtol=1e-5)


@pytest.mark.slow
def test_pareto_k_hat_on_known_tails():
    # Weights that are exactly Pareto with shape k: log w = k * Exponential(1).
    rng = np.random.default_rng(2)
    num = 1_000_000
    m = psis_tail_length(num)
    for k_true in (0.3, 0.8):
        log_w = k_true * rng.exponential(size=(num, 3))
        top = np.sort(log_w, axis=0)[::-1][: m + 1]
        k_hat = np.asarray(pareto_k_hat(jnp.asarray(top, jnp.float32)))
        # The shape estimate's sd is about (1 + k) / sqrt(M); the weak prior moves it
        # towards 0.5 by 10 (0.5 - k) / (M + 10).
        prior_pull = 10 * (0.5 - k_true) / (m + 10)
        tol = 4 * (1 + k_true) / math.sqrt(m)
        assert np.all(np.abs(k_hat - (k_true + prior_pull)) < tol), (k_true, k_hat, tol)


def test_model_without_latents_is_exact():
    def fixed(x):
        numpyro.sample("x", dist.Normal(0.0, 2.0).expand([x.shape[0]]).to_event(1), obs=x[:, 0])

    def empty(x):
        pass

    est = MarginalLikelihood(fixed, empty, num_particles=10)(jax.random.key(0), X)
    exact = float(dist.Normal(0.0, 2.0).log_prob(X[:, 0]).sum())
    assert abs(float(est.log_marginal) - exact) < 1e-5
    assert float(est.stderr) == 0.0 and float(est.ess) == 10.0


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", None, True])
def test_bad_num_particles(bad):
    with pytest.raises((TypeError, ValueError), match="num_particles"):
        MarginalLikelihood(model, guide, num_particles=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "8", True])
def test_bad_chunk_size(bad):
    with pytest.raises((TypeError, ValueError), match="chunk_size"):
        MarginalLikelihood(model, guide, chunk_size=bad)


def test_missing_params_are_named():
    with pytest.raises(ValueError, match=r"\['loc', 'scale'\].*no params were given"):
        MarginalLikelihood(model, guide)(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"\['scale'\]"):
        MarginalLikelihood(model, guide, params={"loc": jnp.zeros(6)})(jax.random.key(0), X)


def test_subsampled_plate_is_refused():
    def sub_model(x):
        with numpyro.plate("data", x.shape[0], subsample_size=2):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=0.0)

    def sub_guide(x):
        with numpyro.plate("data", x.shape[0], subsample_size=2):
            numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="subsampled"):
        MarginalLikelihood(sub_model, sub_guide, num_particles=4)(jax.random.key(0), X)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.example_libraries import stax
    import numpyro, numpyro.distributions as dist
    from numpyro_iwae import MarginalLikelihood

    init, apply = stax.serial(stax.Dense(200), stax.Tanh, stax.Dense(784))
    _, dec = init(jax.random.key(0), (1, 50))

    def model(x):
        d = numpyro.module("decoder", (init, apply), (1, 50))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([50]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=d(z)).to_event(1), obs=x)

    def guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(0.0, 1.0).expand([50]).to_event(1))

    x = (np.random.default_rng(0).random((1000, 784)) < 0.2).astype(np.float32)
    ml = MarginalLikelihood(model, guide, params={"decoder$params": dec}, num_particles=5000)
    est = jax.jit(lambda k, x: ml(k, x))(jax.random.key(0), x)
    assert np.isfinite(float(est.log_marginal))
    # Peak resident memory of this process image. (ru_maxrss would not do: Linux keeps
    # it across exec, so a child of a large pytest process reports the parent's peak.)
    print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])  # KiB
    """
)


def test_automatic_chunk_follows_the_budget_and_on_cpu_the_working_set():
    from numpyro_iwae.evaluators.base import CPU_WORKING_SET

    x = np.zeros((4000, 64), np.float32)

    def wide_model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([64]).to_event(1))
            numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def wide_guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(0.0, 1.0).expand([64]).to_event(1))

    def chunk(budget):
        ml = MarginalLikelihood(wide_model, wide_guide, num_particles=5000, memory_budget=budget)
        jax.eval_shape(lambda key: ml(key, x).log_marginal, jax.random.key(0))
        return ml.chunk_size_used

    # A particle here is about 1 MiB of arrays: a small budget bounds the chunk ...
    small = chunk(2**24)
    assert 1 < small < chunk(CPU_WORKING_SET) < 5000
    # ... and on CPU a budget past the working set buys no larger chunk.
    assert jax.default_backend() != "cpu" or chunk(2**34) == chunk(CPU_WORKING_SET)


@pytest.mark.slow
def test_k5000_over_1000_datapoints_stays_under_2_gib():
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak_gib = int(out.stdout.strip().splitlines()[-1]) / 2**20
    # The naive vmap over 5000 particles would hold 5000 x 1000 x 784 logits (15 GiB).
    assert peak_gib < 2.0, f"peak resident memory {peak_gib:.2f} GiB"


@pytest.mark.slow
def test_importance_resampling_recovers_the_posterior_per_datapoint():
    ml = MarginalLikelihood(
        model, guide, params=params(0.3, 1.8), num_particles=4000, chunk_size=100, num_samples=4000
    )
    est = ml(jax.random.key(3), X)
    z = np.asarray(est.samples["z"], np.float64)
    assert z.shape == (4000, 6)
    # Resampled draws are correlated through the weights: their effective number is
    # about min(S, ESS), so the mean's standard error is sd / sqrt(min(S, ESS)).
    n_eff = np.minimum(4000, np.asarray(est.ess))
    se = POST_SCALE / np.sqrt(n_eff)
    assert np.all(np.abs(z.mean(0) - POST_LOC) < 5 * se), (z.mean(0), POST_LOC, se)
    assert np.all(np.abs(z.std(0) / POST_SCALE - 1) < 0.1)
    # A bad guide that never proposes the posterior region cannot be rescued: the
    # test would notice if resampling ignored the weights (the guide mean is 0.3 off).
    assert np.all(np.abs(z.mean(0) - (POST_LOC + 0.3)) > 5 * se)


@pytest.mark.slow
def test_inference_data_keeps_the_diagnostics():
    est = estimate(params(0.3, 1.8), k=500, num_samples=200)
    idata = est.to_inference_data()
    # Resampled draws are not a chain: they stay out of `posterior`.
    groups = idata.groups() if callable(idata.groups) else list(idata.children)
    assert "posterior" not in groups
    resampled = idata["resampled_posterior"]
    assert resampled["z"].shape == (1, 200, 6)
    attrs = resampled.attrs
    assert attrs["log_marginal"] == pytest.approx(float(est.log_marginal))
    assert attrs["k_hat"] == pytest.approx(np.asarray(est.k_hat).tolist())
    assert len(attrs["ess"]) == 6
    with pytest.raises(ValueError, match="num_draws=S"):
        estimate(params(), k=10).to_inference_data()


def test_resampling_with_a_global_latent():
    def gmodel(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(z, SIG), obs=x[:, 0])

    loc, scale = posterior(X[:, 0], np.ones(6), np.zeros(6), np.full(6, SIG))

    def gguide(x):
        numpyro.sample("z", dist.Normal(float(loc), 2.0 * float(scale)))

    est = MarginalLikelihood(gmodel, gguide, num_particles=3000, num_samples=3000)(
        jax.random.key(4), X
    )
    z = np.asarray(est.samples["z"], np.float64)
    assert z.shape == (3000,) and est.pointwise.shape == ()
    se = float(scale) / math.sqrt(min(3000, float(est.ess)))
    assert abs(z.mean() - float(loc)) < 5 * se
    truth = log_evidence(X[:, 0], np.ones(6), np.zeros(6), np.full(6, SIG))
    assert abs(float(est.log_marginal) - truth) < 4 * float(est.stderr) + 1e-4


@pytest.mark.slow
def test_extreme_particles_do_not_abort_eager_evaluation():
    # A guide far in the tail makes exp(v / 2) underflow to 0, which NumPyro's eager
    # argument validation would reject; such particles must get weight zero instead.
    from numpyro_iwae import IWELBO

    def funnel_model():
        v = numpyro.sample("v", dist.Normal(0.0, 3.0))
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))

    def far_guide():
        numpyro.sample("v", dist.Normal(-2000.0, 1.0))
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with numpyro.validation_enabled():
        loss = IWELBO(4).loss(jax.random.key(0), {}, funnel_model, far_guide)
        est = MarginalLikelihood(funnel_model, far_guide, num_particles=8)(jax.random.key(0))
    assert float(loss) == np.inf and not np.isnan(float(loss))
    assert float(est.log_marginal) == -np.inf


def test_mass_the_guide_never_visits_is_invisible_to_the_diagnostics():
    # Documents the limit (docs: "what k-hat cannot see"): a normalized two-mode target
    # (log Z = 0) and a guide wider than one mode that never reaches the other. The
    # estimate is log 0.7 with a small standard error, a high ESS and k-hat < 0: every
    # weight-based diagnostic looks fine and the answer is 0.36 nats wrong.
    two_modes = dist.MixtureSameFamily(
        dist.Categorical(jnp.array([0.3, 0.7])),
        dist.Normal(jnp.array([-4.0, 4.0]), jnp.array([0.7, 0.7])),
    )

    def model():
        numpyro.sample("z", two_modes)

    def guide():
        numpyro.sample("z", dist.Normal(3.5, 1.2))

    est = MarginalLikelihood(model, guide, num_particles=4000)(jax.random.key(0))
    assert float(est.k_hat) < 0.5 and float(est.ess) > 1000
    assert abs(float(est.log_marginal) - math.log(0.7)) < 4 * float(est.stderr)
    assert -float(est.log_marginal) > 10 * float(est.stderr)  # log Z = 0 is far outside


def test_pointwise_stderr_adds_up_to_the_stderr():
    est = estimate(params(0.3, 1.8), k=500)
    se_n = np.asarray(est.pointwise_stderr)
    assert se_n.shape == (6,)
    np.testing.assert_allclose(se_n, np.sqrt(1 / np.asarray(est.ess) - 1 / 500), rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.sum(se_n**2)), float(est.stderr), rtol=1e-5)
    one = estimate(params(), k=1)
    assert np.all(np.isnan(np.asarray(one.pointwise_stderr))) and np.isnan(float(one.stderr))


@pytest.mark.slow
def test_the_kept_largest_weights_are_those_of_all_particles():
    # The PSIS tail is merged once per block of chunks (chunk 3: 1000 particles are
    # 334 chunks, blocks of 128 leave a remainder of 78): the kept weights must be exactly the
    # largest of all K, as k-hat computed from every log weight shows.
    from numpyro_iwae.maths.psis import pareto_k_hat, psis_tail_length

    est = estimate(params(0.3, 1.8), k=1000, chunk=3, return_log_weights=True)
    log_w = np.asarray(est.log_weights)
    assert log_w.shape == (1000, 6)
    m = psis_tail_length(1000) + 1
    top = -np.sort(-log_w, axis=0)[:m]
    np.testing.assert_allclose(est.k_hat, pareto_k_hat(jnp.asarray(top)), rtol=1e-6)
    np.testing.assert_allclose(
        est.pointwise, jax.nn.logsumexp(log_w, axis=0) - math.log(1000), rtol=1e-5
    )
