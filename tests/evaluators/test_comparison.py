"""compare_evidence against exact Bayes factors of conjugate models, and its refusals."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_iwae import (
    EvidenceComparison,
    LogMarginalEstimate,
    MarginalLikelihood,
    SUMOEstimate,
    compare_evidence,
)

Y = jnp.asarray(np.random.default_rng(0).normal(0.8, 1.0, 12), jnp.float32)


def normal_mean_model(prior_scale, name="y"):
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, prior_scale))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample(name, dist.Normal(mu, 1.0), obs=y)

    return model


def guide(y):
    loc = numpyro.param("loc", 0.0)
    scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
    numpyro.sample("mu", dist.Normal(loc, scale))


def exact(prior_scale, y=Y):
    """log p(y) and the posterior of mu for y_n ~ N(mu, 1), mu ~ N(0, prior_scale^2)."""
    y = np.asarray(y, np.float64)
    n = y.size
    cov = np.eye(n) + prior_scale**2
    _, logdet = np.linalg.slogdet(cov)
    log_p = -0.5 * (y @ np.linalg.solve(cov, y) + logdet + n * np.log(2 * np.pi))
    precision = n + prior_scale**-2
    return log_p, y.sum() / precision, precision**-0.5


def estimate(prior_scale, widen=1.3, k=4000, seed=0, y=Y, name="y"):
    _, mean, sd = exact(prior_scale, y)
    params = {"loc": jnp.float32(mean + 0.1 * sd), "scale": jnp.float32(widen * sd)}
    model = normal_mean_model(prior_scale, name)
    return MarginalLikelihood(model, guide, params=params, num_particles=k)(jax.random.key(seed), y)


def test_bayes_factor_and_posterior_probabilities_match_the_exact_values():
    scales = {"narrow": 0.5, "unit": 1.0, "wide": 10.0}
    estimates = {n: estimate(s, seed=i) for i, (n, s) in enumerate(scales.items())}
    comparison = compare_evidence(estimates)
    assert isinstance(comparison, EvidenceComparison)
    log_p = {n: exact(s)[0] for n, s in scales.items()}
    best = max(log_p, key=log_p.get)
    assert comparison.names[0] == best and comparison.log_bayes_factor[0] == 0.0
    truth = np.array([log_p[n] - log_p[best] for n in comparison.names])
    np.testing.assert_array_less(
        np.abs(comparison.log_bayes_factor - truth), 3 * comparison.log_bayes_factor_stderr + 1e-6
    )
    assert abs(comparison.posterior_probs.sum() - 1.0) < 1e-12
    exact_probs = np.exp(truth) / np.exp(truth).sum()
    np.testing.assert_array_less(
        np.abs(comparison.posterior_probs - exact_probs),
        3 * comparison.posterior_probs_stderr + 1e-6,
    )
    # Every estimate's standard error travels; the best's Bayes factor has none.
    np.testing.assert_allclose(
        comparison.log_bayes_factor_stderr[1:],
        np.sqrt(comparison.stderr[1:] ** 2 + comparison.stderr[0] ** 2),
    )
    assert comparison.log_bayes_factor_stderr[0] == 0.0


def test_posterior_probability_stderr_is_the_spread_of_the_probabilities():
    # The delta method against the spread of P when each log evidence is redrawn
    # from N(estimate, s^2).
    logs, ses = np.array([-10.0, -10.4, -11.5]), np.array([0.03, 0.05, 0.02])
    estimates = {
        str(i): LogMarginalEstimate(
            jnp.float32(v),
            jnp.float32(v),
            jnp.float32(s),
            jnp.float32(s),
            jnp.float32(1.0),
            jnp.float32(0.1),
            data_digest="d",
        )
        for i, (v, s) in enumerate(zip(logs, ses))
    }
    comparison = compare_evidence(estimates)
    draws = np.random.default_rng(1).normal(logs, ses, (200_000, 3))
    probs = np.exp(draws - draws.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order = [int(n) for n in comparison.names]
    np.testing.assert_allclose(comparison.posterior_probs_stderr, probs.std(0)[order], rtol=0.03)


def test_prior_probabilities_by_name_or_in_order():
    a, b = estimate(1.0, seed=0), estimate(10.0, seed=1)
    by_name = compare_evidence({"a": a, "b": b}, prior_probs={"a": 3, "b": 1})
    in_order = compare_evidence({"a": a, "b": b}, prior_probs=[0.75, 0.25])
    np.testing.assert_allclose(by_name.posterior_probs, in_order.posterior_probs)
    np.testing.assert_allclose(
        by_name.prior_probs, [0.75, 0.25] if by_name.names[0] == "a" else [0.25, 0.75]
    )
    odds = np.exp(float(a.log_marginal) - float(b.log_marginal)) * 3
    p_a = by_name.posterior_probs[by_name.names.index("a")]
    np.testing.assert_allclose(p_a, odds / (1 + odds), rtol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        compare_evidence({"a": a, "b": b}, prior_probs={"a": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        compare_evidence({"a": a, "b": b}, prior_probs=[1.0, -1.0])
    with pytest.raises(ValueError, match="one per estimate"):
        compare_evidence({"a": a, "b": b}, prior_probs=[1.0])


def test_estimates_on_different_data_are_refused_and_names_do_not_matter():
    same = estimate(1.0, seed=0)
    renamed = estimate(10.0, seed=1, name="obs")  # same values under another site name
    assert same.data_digest == renamed.data_digest and len(same.data_digest) == 16
    compare_evidence({"a": same, "b": renamed})
    other = estimate(10.0, seed=1, y=Y + 0.1)
    with pytest.raises(ValueError, match="different observed values"):
        compare_evidence({"a": same, "b": other})
    with pytest.warns(UserWarning, match="no data digest"):
        compare_evidence({"a": same, "b": other._replace(data_digest=None)})


def test_a_high_k_hat_warns_with_the_remedy():
    poor = estimate(1.0, widen=0.3, k=2000)  # much narrower than the posterior
    assert float(poor.k_hat) > 0.7
    with pytest.warns(UserWarning, match="annealing"):
        comparison = compare_evidence({"poor": poor, "good": estimate(10.0, seed=1)})
    assert comparison.k_hat_max[comparison.names.index("poor")] > 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare_evidence({"good": estimate(1.0), "also": estimate(10.0, seed=1)})


def test_sumo_estimates_compare_and_the_table_reads():
    r = jnp.array([-10.0, -10.2, -9.9])
    sumo = SUMOEstimate(
        r.mean(),
        r.mean(),
        r.std(ddof=1) / jnp.sqrt(3.0),
        r.std(ddof=1) / jnp.sqrt(3.0),
        r,
        jnp.float32(6.0),
        data_digest="d",
    )
    other = LogMarginalEstimate(
        *(jnp.float32(x) for x in (-11.0, -11.0, 0.05, 0.05, 100.0, 0.3)), data_digest="d"
    )
    comparison = compare_evidence({"sumo": sumo, "is": other})
    assert comparison.names == ("sumo", "is") and np.isnan(comparison.k_hat_max[0])
    text = str(comparison)
    assert "sumo" in text and "log BF vs best" in text and "±" in text
    pd = pytest.importorskip("pandas")
    frame = comparison.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == ["sumo", "is"]
    np.testing.assert_allclose(frame["posterior_prob"].sum(), 1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        compare_evidence({})
    with pytest.raises(ValueError, match="has no `log_marginal`"):
        compare_evidence({"a": -3.0})
