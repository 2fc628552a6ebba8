"""Local weighting: global latents drawn once, local particles weighted per plate
element (Geffner & Domke, 2022), checked against exact evidence and an independent
Monte Carlo computation of the same bound.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
import optax
import pytest

from numpyro_iwae import IWELBO, JointWeightsWarning, MarginalLikelihood, UnweightedBoundWarning
from numpyro_iwae.core.draw import split_keys
from numpyro_iwae.core.plan import plan
from numpyro_iwae.core.program import Program

TAU, S = 0.8, 0.6
D = TAU**2 + S**2  # variance of x_n given mu
RNG = np.random.default_rng(0)
X20 = jnp.asarray(RNG.normal(0.7, math.sqrt(1 + D), size=20), jnp.float32)


def log_evidence(x: np.ndarray) -> float:
    """log N(x | 0, 1 1^T + D I), by the matrix determinant lemma and
    Sherman-Morrison.
    """
    x = np.asarray(x, np.float64)
    n = x.size
    log_det = n * math.log(D) + math.log1p(n / D)
    quad = (x @ x - x.sum() ** 2 / (D + n)) / D
    return -0.5 * (n * math.log(2 * math.pi) + log_det + quad)


def model(x, subsample=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0], subsample_size=subsample) as idx:
        z = numpyro.sample("z", dist.Normal(mu, TAU))
        numpyro.sample("x", dist.Normal(z, S), obs=x[idx])


def guide(x, subsample=None):
    mu = numpyro.sample("mu", dist.Normal(numpyro.param("m", 0.0), numpyro.param("s", 1.0)))
    a, b = numpyro.param("a", 0.5), numpyro.param("b", 0.5)
    with numpyro.plate("data", x.shape[0], subsample_size=subsample) as idx:
        numpyro.sample("z", dist.Normal(a * mu + b * x[idx], numpyro.param("c", 1.0)))


def exact_params(x) -> dict[str, jax.Array]:
    """The guide parameters at which q is the exact posterior."""
    prec_z = 1 / TAU**2 + 1 / S**2
    prec_mu = 1 + x.shape[0] / D
    return {
        "m": jnp.asarray(float(np.sum(x)) / D / prec_mu),
        "s": jnp.asarray(prec_mu**-0.5),
        "a": jnp.asarray(1 / TAU**2 / prec_z),
        "b": jnp.asarray(1 / S**2 / prec_z),
        "c": jnp.asarray(prec_z**-0.5),
    }


def poor_params(x) -> dict[str, jax.Array]:
    """A guide that is off in every parameter (weights of moderate variance)."""
    p = exact_params(x)
    return {**p, "m": p["m"] + 0.2, "s": 1.3 * p["s"], "b": 0.8 * p["b"], "c": 1.3 * p["c"]}


def bounds(elbo, params, x, num_keys, seed=0, **kwargs):
    """``num_keys`` independent estimates of the bound (minus the loss)."""
    keys = jax.random.split(jax.random.key(seed), num_keys)
    loss = jax.jit(jax.vmap(lambda k: elbo.loss(k, params, model, guide, x, **kwargs)))
    return -np.asarray(loss(keys), np.float64)


def mean_se(values):
    return values.mean(), values.std(ddof=1) / math.sqrt(values.size)


def independent_local_bound(params, x, k, num_keys, seed=1):
    """The locally weighted bound computed by hand (numpy), for checking."""
    rng = np.random.default_rng(seed)
    p = {n: float(v) for n, v in params.items()}
    x = np.asarray(x, np.float64)

    def log_normal(v, loc, scale):
        return -0.5 * ((v - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)

    out = []
    for _ in range(num_keys):
        mu = rng.normal(p["m"], p["s"])
        glob = log_normal(mu, 0, 1) - log_normal(mu, p["m"], p["s"])
        loc = p["a"] * mu + p["b"] * x
        z = rng.normal(loc, p["c"], size=(k, x.size))
        log_w = log_normal(z, mu, TAU) + log_normal(x, z, S) - log_normal(z, loc, p["c"])
        peak = log_w.max(0)
        local = peak + np.log(np.exp(log_w - peak).mean(0))
        out.append(glob + local.sum())
    return np.array(out)


@pytest.mark.parametrize("k", [1, 8])
def test_exact_posterior_gives_the_evidence_with_zero_variance(k):
    values = bounds(IWELBO(k, weighting="local"), exact_params(X20), X20, 16)
    np.testing.assert_allclose(values, log_evidence(X20), atol=2e-4)


def test_local_bound_matches_an_independent_computation():
    params = poor_params(X20)
    ours, se_ours = mean_se(bounds(IWELBO(8, weighting="local"), params, X20, 2000))
    theirs, se_theirs = mean_se(independent_local_bound(params, X20, 8, 2000))
    assert abs(ours - theirs) < 3 * math.hypot(se_ours, se_theirs)
    # The check has power: the bound with one particle per element (the ELBO) differs.
    fewer, se_fewer = mean_se(independent_local_bound(params, X20, 1, 2000))
    assert abs(ours - fewer) > 5 * math.hypot(se_ours, se_fewer)


@pytest.mark.slow
def test_local_bound_is_below_the_evidence_and_rises_with_k():
    params = poor_params(X20)
    means, ses = zip(
        *(mean_se(bounds(IWELBO(k, weighting="local"), params, X20, 1000)) for k in (1, 4, 32))
    )
    for lower, upper, se_l, se_u in zip(means, means[1:], ses, ses[1:]):
        assert upper - lower > 3 * math.hypot(se_l, se_u)
    assert log_evidence(X20) - means[-1] > 3 * ses[-1]


def test_k1_local_bound_is_the_elbo():
    params = poor_params(X20)
    ours, se_ours = mean_se(bounds(IWELBO(1, weighting="local"), params, X20, 2000))
    keys = jax.random.split(jax.random.key(5), 2000)
    elbo = jax.jit(jax.vmap(lambda k: Trace_ELBO().loss(k, params, model, guide, X20)))
    theirs, se_theirs = mean_se(-np.asarray(elbo(keys), np.float64))
    assert abs(ours - theirs) < 3 * math.hypot(se_ours, se_theirs)


@pytest.mark.slow
def test_minibatch_estimates_average_to_the_full_data_bound():
    params = poor_params(X20)
    elbo = IWELBO(8, weighting="local")
    full, se_full = mean_se(bounds(elbo, params, X20, 2000))
    mini, se_mini = mean_se(bounds(elbo, params, X20, 4000, seed=3, subsample=5))
    assert abs(full - mini) < 3 * math.hypot(se_full, se_mini)
    # The default weighting of a subsampled model with a global latent is local.
    default = bounds(IWELBO(8), params, X20, 16, seed=3, subsample=5)
    np.testing.assert_allclose(default, bounds(elbo, params, X20, 16, seed=3, subsample=5))


@pytest.mark.slow
def test_auto_weighting_is_joint_for_small_plates_and_local_for_large():
    auto, joint = IWELBO(8), IWELBO(8, weighting="joint")
    x5 = X20[:5]  # below AUTO_LOCAL_SIZE = 10: joint
    np.testing.assert_allclose(
        bounds(auto, poor_params(x5), x5, 4), bounds(joint, poor_params(x5), x5, 4)
    )
    local = IWELBO(8, weighting="local")
    for x in (X20, jnp.asarray(RNG.normal(0.7, math.sqrt(1 + D), size=100), jnp.float32)):
        np.testing.assert_allclose(
            bounds(auto, poor_params(x), x, 4), bounds(local, poor_params(x), x, 4)
        )


@pytest.mark.slow
def test_default_minibatch_loss_averages_to_the_default_full_data_loss():
    # The default objective is decided from the model's structure and full plate
    # size, so minibatches estimate the full-data objective without bias (the old
    # rule weighted 20 datapoints jointly whole and locally subsampled: about 40
    # standard errors apart).
    params = poor_params(X20)
    full, se_full = mean_se(bounds(IWELBO(8), params, X20, 2000))
    mini, se_mini = mean_se(bounds(IWELBO(8), params, X20, 4000, seed=3, subsample=5))
    assert abs(full - mini) < 3 * math.hypot(se_full, se_mini), (full, mini, se_full, se_mini)


@pytest.mark.slow
def test_vectorize_particles_false_gives_the_same_bound():
    params = poor_params(X20)
    vmapped = bounds(IWELBO(8, weighting="local"), params, X20, 4)
    mapped = bounds(IWELBO(8, weighting="local", vectorize_particles=False), params, X20, 4)
    np.testing.assert_allclose(vmapped, mapped, rtol=1e-5)


def grads(elbo, params, x, num_keys, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_keys)
    grad = jax.jit(jax.vmap(jax.grad(lambda p, k: elbo.loss(k, p, model, guide, x)), (None, 0)))
    return {n: np.asarray(g, np.float64) for n, g in grad(params, keys).items()}


@pytest.mark.parametrize("k", [1, 8])
def test_stl_gradient_vanishes_at_the_exact_posterior(k):
    g = grads(IWELBO(k, gradient_estimator="stl", weighting="local"), exact_params(X20), X20, 8)
    for name, value in g.items():
        np.testing.assert_allclose(value, 0.0, atol=2e-3, err_msg=name)


@pytest.mark.slow
def test_dreg_gradient_is_unbiased_for_the_reparam_gradient():
    params = poor_params(X20)
    rep = grads(IWELBO(8, weighting="local"), params, X20, 3000)
    dreg = grads(IWELBO(8, gradient_estimator="dreg", weighting="local"), params, X20, 3000, 1)
    for name in params:
        (a, se_a), (b, se_b) = mean_se(rep[name]), mean_se(dreg[name])
        assert abs(a - b) < 3.5 * math.hypot(se_a, se_b), (name, a, b, se_a, se_b)
    # ... with less variance for the local proposal's parameters.
    for name in ("b", "c"):
        assert dreg[name].std() < rep[name].std()


def two_plate_model(xa, xb):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    for name, x in (("a", xa), ("b", xb)):
        with numpyro.plate(name, x.shape[0]):
            z = numpyro.sample(f"z{name}", dist.Normal(mu, TAU))
            numpyro.sample(f"x{name}", dist.Normal(z, S), obs=x)


TWO_PLATE = exact_params(X20)


def two_plate_guide(xa, xb):
    p = TWO_PLATE
    mu = numpyro.sample("mu", dist.Normal(p["m"], p["s"]))
    for name, x in (("a", xa), ("b", xb)):
        with numpyro.plate(name, x.shape[0]):
            numpyro.sample(f"z{name}", dist.Normal(p["a"] * mu + p["b"] * x, p["c"]))


@pytest.mark.slow
def test_each_data_plate_gets_its_own_per_element_bounds():
    xa, xb = X20[:12], X20[12:]
    program = Program(two_plate_model, two_plate_guide, (xa, xb)).with_seeded_plates(
        jax.random.key(0)
    )
    structure = plan(program, {}, split_keys(jax.random.key(1), 1)[1][0], "local")
    assert [p for p, _, _ in structure.local_plates] == ["a", "b"]
    assert structure.global_sites == ("mu",)
    loss = IWELBO(8, weighting="local").loss(
        jax.random.key(0), {}, two_plate_model, two_plate_guide, xa, xb
    )
    np.testing.assert_allclose(-float(loss), log_evidence(X20), atol=2e-4)


def nested_model(x):  # x: (groups, obs per group)
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", x.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Normal(mu, TAU))
        with numpyro.plate("obs", x.shape[1], dim=-1):
            numpyro.sample("x", dist.Normal(z, S), obs=x)


@pytest.mark.slow
def test_latents_nested_deeper_stay_inside_their_elements_weight():
    x = jnp.reshape(X20, (5, 4))
    guide = AutoNormal(nested_model)
    program = Program(nested_model, guide, (x,)).with_seeded_plates(jax.random.key(0))
    program.prepare_guide({}, jax.random.key(0))
    params = {}
    structure = plan(program, params, split_keys(jax.random.key(1), 1)[1][0], "local")
    assert [p for p, _, _ in structure.local_plates] == ["groups"]
    assert structure.group_shape(1) == (5,)


def crossed_model(x, group):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", 4):
        a = numpyro.sample("a", dist.Normal(mu, TAU))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(a[group], S), obs=x)


def leaking_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, TAU))
        numpyro.sample("x", dist.Normal(z, S), obs=x)
    numpyro.sample("total", dist.Normal(jnp.sum(z), 1.0), obs=0.0)


@pytest.mark.parametrize(
    "fn, args",
    [(crossed_model, (X20, jnp.arange(20) % 4)), (leaking_model, (X20,))],
    ids=["indexed-groups", "site-outside-depends-on-plate"],
)
def test_a_plate_whose_latents_reach_sites_outside_it_is_global(fn, args):
    program = Program(fn, AutoNormal(fn), args).with_seeded_plates(jax.random.key(0))
    program.prepare_guide({}, jax.random.key(0))
    params = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing is weighted: the ELBO
        structure = plan(program, params, split_keys(jax.random.key(1), 1)[1][0], "local")
    assert structure.local_plates == ()
    assert set(structure.global_sites) >= {"mu", "a" if fn is crossed_model else "z"}


@pytest.mark.slow
def test_a_joint_guide_over_all_sites_leaves_nothing_to_weight():
    guide = AutoDiagonalNormal(model)  # one joint draw of all sites, outside the plate
    x = jnp.asarray(RNG.normal(size=100), jnp.float32)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.key(0), x))
    with pytest.warns(UserWarning, match="nothing is importance weighted"):
        loss = IWELBO(8, weighting="local").loss(jax.random.key(0), params, model, guide, x)
    # It is the ELBO: the same value as Trace_ELBO's for the same draw of the guide.
    elbo = Trace_ELBO().loss(jax.random.key(1), params, model, guide, x)
    assert abs(float(loss) - float(elbo)) < 0.05 * abs(float(elbo))


@pytest.mark.slow
def test_a_guide_drawing_global_sites_from_local_ones_is_refused():
    def backwards_guide(x, subsample=None):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(x, 1.0))
        numpyro.sample("mu", dist.Normal(jnp.mean(z), 0.5))

    with pytest.raises(ValueError, match="global draw or its density depends on a local"):
        IWELBO(8, weighting="local").loss(jax.random.key(0), {}, model, backwards_guide, X20)
    # The default weights such a guide jointly when it can, and says what that costs.
    with pytest.warns(JointWeightsWarning, match="falls towards the ELBO"):
        assert np.isfinite(IWELBO(8).loss(jax.random.key(0), {}, model, backwards_guide, X20))


@pytest.mark.slow
def test_subsampled_logistic_regression_runs_by_default():
    n, d = 1000, 3
    features = jnp.asarray(RNG.normal(size=(n, d)), jnp.float32)
    labels = jnp.asarray(RNG.random(n) < 0.5, jnp.float32)

    def regression(features, labels):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([d]).to_event(1))
        with numpyro.plate("data", n, subsample_size=50) as idx:
            numpyro.sample("y", dist.Bernoulli(logits=features[idx] @ w), obs=labels[idx])

    svi = SVI(regression, AutoNormal(regression), optax.adam(0.05), IWELBO(8))
    # No latent is local to the subsampled plate: no importance-weighted bound
    # minibatches without bias, the default is the ELBO, and IWELBO says so once.
    with pytest.warns(UnweightedBoundWarning, match="unbiased minibatch estimate") as record:
        result = svi.run(jax.random.key(0), 50, features, labels, progress_bar=False)
    assert len(record) == 1
    assert np.all(np.isfinite(result.losses))


@pytest.mark.slow
def test_discrete_global_site_gets_an_unbiased_score_function_gradient():
    x = X20[:6]

    def dmodel(x):
        c = numpyro.sample("c", dist.Bernoulli(0.3))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(c, 1.0))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def dguide(x):
        c = numpyro.sample("c", dist.Bernoulli(logits=numpyro.param("phi", 0.2)))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal((x + c) / 2, math.sqrt(0.5)))

    # Given c the local weights are exact, so the bound is
    # sum_c q(c) [log p(c) - log q(c) + sum_n log N(x_n | c, 2)]: differentiate exactly.
    def exact(phi):
        q1 = jax.nn.sigmoid(phi)
        total = 0.0
        for c, q in ((0.0, 1 - q1), (1.0, q1)):
            prior = math.log(0.3) if c else math.log(0.7)
            lik = jnp.sum(dist.Normal(c, math.sqrt(2.0)).log_prob(x))
            total = total + q * (prior - jnp.log(q) + lik)
        return total

    want = float(jax.grad(exact)(0.2))
    elbo = IWELBO(4, weighting="local")
    keys = jax.random.split(jax.random.key(0), 4000)
    grad = jax.jit(jax.vmap(jax.grad(lambda p, k: -elbo.loss(k, p, dmodel, dguide, x)), (None, 0)))
    got, se = mean_se(np.asarray(grad({"phi": jnp.asarray(0.2)}, keys)["phi"], np.float64))
    assert abs(got - want) < 3 * se, (got, want, se)


@pytest.mark.parametrize("estimator", ["reparam", "dreg"])
@pytest.mark.slow
def test_gradient_of_a_vmapped_loss(estimator):
    # Integer and key tracers closed over by the custom backward passes must not
    # escape a vmap under grad.
    params = poor_params(X20)
    keys = jax.random.split(jax.random.key(0), 3)
    elbo = IWELBO(4, gradient_estimator=estimator, weighting="local")

    def mean_loss(p):
        return jnp.mean(jax.vmap(lambda k: elbo.loss(k, p, model, guide, X20))(keys))

    outer = jax.grad(mean_loss)(params)
    inner = jax.vmap(jax.grad(lambda p, k: elbo.loss(k, p, model, guide, X20)), (None, 0))
    per_key = inner(params, keys)
    for name in params:
        np.testing.assert_allclose(outer[name], jnp.mean(per_key[name]), rtol=1e-4)


def test_nested_evidence_with_the_exact_posterior_has_zero_variance():
    ml = MarginalLikelihood(
        model, guide, params=exact_params(X20), num_particles=16, num_global_particles=8
    )
    est = ml(jax.random.key(0), X20)
    np.testing.assert_allclose(float(est.log_marginal), log_evidence(X20), atol=2e-4)
    assert float(est.stderr) < 1e-3
    assert est.local_ess["data"].shape == (20,)
    np.testing.assert_allclose(est.local_ess["data"], 16.0, rtol=1e-4)


@pytest.mark.slow
def test_nested_evidence_is_within_three_standard_errors_and_chunk_invariant():
    x = jnp.asarray(RNG.normal(0.7, math.sqrt(1 + D), size=200), jnp.float32)
    p = exact_params(x)  # off by half a posterior sd in mu, and in every local part
    params = {**p, "m": p["m"] + 0.5 * p["s"], "s": 1.2 * p["s"], "b": 0.9 * p["b"]}
    params["c"] = 1.2 * p["c"]
    kwargs = dict(params=params, num_particles=64, num_global_particles=400)
    est = MarginalLikelihood(model, guide, **kwargs)(jax.random.key(1), x)
    exact = log_evidence(x)
    assert float(est.k_hat) < 0.7, float(est.k_hat)
    assert abs(float(est.log_marginal) - exact) < 3 * float(est.stderr), (
        float(est.log_marginal),
        exact,
        float(est.stderr),
    )
    chunked = MarginalLikelihood(model, guide, chunk_size=7, **kwargs)(jax.random.key(1), x)
    np.testing.assert_allclose(float(chunked.log_marginal), float(est.log_marginal), rtol=1e-5)
    # Plain importance sampling with the same number of model evaluations weights the
    # 200 datapoints jointly: its weights have an infinite-variance tail.
    plain = MarginalLikelihood(model, guide, params=params, num_particles=64 * 400)
    assert float(plain(jax.random.key(1), x).k_hat) > 0.7


def test_nested_evidence_needs_global_latents():
    def local_only(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def local_guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(x / 2, 0.7))

    ml = MarginalLikelihood(local_only, local_guide, num_global_particles=4)
    with pytest.raises(ValueError, match="no global latent|every latent of this model is local"):
        ml(jax.random.key(0), X20)


@pytest.mark.slow
def test_local_weighting_is_spelled_as_on_the_objectives():
    # weighting="local" is the nested estimator num_global_particles implies; "auto"
    # follows the objectives' rule (20 datapoints with local latents: local), and a
    # model whose latents are all local is weighted jointly under "auto".
    p = exact_params(X20)
    spelled = MarginalLikelihood(
        model, guide, params=p, num_particles=16, weighting="local", num_global_particles=8
    )(jax.random.key(0), X20)
    implied = MarginalLikelihood(model, guide, params=p, num_particles=16, num_global_particles=8)(
        jax.random.key(0), X20
    )
    np.testing.assert_allclose(float(spelled.log_marginal), float(implied.log_marginal))
    auto = MarginalLikelihood(model, guide, params=p, num_particles=16, weighting="auto")
    est = auto(jax.random.key(0), X20)
    assert est.local_ess is not None  # nested, with the default S
    np.testing.assert_allclose(float(est.log_marginal), log_evidence(X20), atol=2e-4)

    def local_only(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def local_guide(x):
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    joint = MarginalLikelihood(local_only, local_guide, num_particles=4, weighting="auto")
    est = joint(jax.random.key(0), X20)
    assert est.local_ess is None
    exact = float(jnp.sum(dist.Normal(0.0, 2**0.5).log_prob(X20)))
    np.testing.assert_allclose(float(est.log_marginal), exact, rtol=1e-5)


def test_evaluator_options_are_refused_by_the_algorithm_that_lacks_them():
    with pytest.raises(ValueError, match="num_samples is not available with nested"):
        MarginalLikelihood(model, guide, weighting="local", num_samples=10)
    with pytest.raises(ValueError, match="annealing_steps is not yet available with nested"):
        MarginalLikelihood(model, guide, weighting="local", annealing_steps=3)
    with pytest.raises(ValueError, match="weighting='joint' there are none"):
        MarginalLikelihood(model, guide, weighting="joint", num_global_particles=3)
    with pytest.raises(ValueError, match="weighting"):
        MarginalLikelihood(model, guide, weighting="nested")
    for name in ("num_samples", "annealing_steps", "num_global_particles"):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive int, or None"):
            MarginalLikelihood(model, guide, **{name: 0})
    with pytest.raises(TypeError, match="vectorize_particles"):
        MarginalLikelihood(model, guide, vectorize_particles="vmap")
    # The annealing options are checked whether or not annealing is on.
    for bad in ({"leapfrog_steps": 0}, {"step_size": -0.1}, {"pilot_particles": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MarginalLikelihood(model, guide, **bad)
