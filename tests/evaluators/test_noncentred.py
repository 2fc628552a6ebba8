"""Non-centred moves (TemperedSMC, AIS, BDMC): the change of variables keeps p / q and
adds the Jacobian sum(log scale); the evidence is unchanged (the funnel's log Z = 0, a
linear-Gaussian hierarchy's closed form, a sandwich around it); sites that cannot be
non-centred are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_iwae import BidirectionalMC, MarginalLikelihood, TemperedSMC
from numpyro_iwae.core.annealing import AnnealedDensity, NonCentredDensity
from numpyro_iwae.core.plates import plate_structure
from numpyro_iwae.core.program import Program, draw_data


def funnel():
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", 4):
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))


def funnel_guide():
    numpyro.sample("v", dist.Normal(-1.0, 0.5))
    with numpyro.plate("i", 4):
        numpyro.sample("x", dist.Normal(0.1, 0.6))


def densities(names):
    program = Program(funnel, funnel_guide, (), {})
    guide_tr = program.trace_guide({}, jax.random.key(0))
    model_tr = program.trace_model({}, jax.random.key(0), draw_data(guide_tr)[0])
    structure = plate_structure(model_tr, guide_tr)
    base = AnnealedDensity(program, {}, structure, jax.random.key(0))
    return base, NonCentredDensity(base, names, jax.random.key(1))


def test_the_change_of_variables_keeps_the_ratio_and_adds_the_jacobian():
    base, noncentred = densities(("x",))
    key = jax.random.key(2)
    u, w = base.init(key), noncentred.init(key)
    assert float(w["v"]) == float(u["v"])
    np.testing.assert_allclose(w["x"], u["x"] * jnp.exp(-u["v"] / 2), rtol=1e-6)
    back, log_scale = noncentred.centred(w, key)
    np.testing.assert_allclose(back["x"], u["x"], rtol=1e-5)
    # Four x_i of scale exp(v / 2): the Jacobian is 4 v / 2.
    np.testing.assert_allclose(log_scale, 2 * u["v"], rtol=1e-6)
    log_q, log_p = base.log_densities(u, key)
    log_q_nc, log_p_nc = noncentred.log_densities(w, key)
    np.testing.assert_allclose(log_q_nc, log_q + 2 * u["v"], rtol=1e-5)
    np.testing.assert_allclose(log_p_nc - log_q_nc, log_p - log_q, rtol=1e-5, atol=1e-5)
    # In the new coordinates the funnel is N(0, 3^2) x N(0, 1)^4.
    exact = dist.Normal(0.0, 3.0).log_prob(w["v"]) + dist.Normal(0.0, 1.0).log_prob(w["x"]).sum()
    np.testing.assert_allclose(log_p_nc, exact, rtol=1e-5)


def test_the_funnel_evidence_is_unchanged():
    # log Z = 0; a wrong Jacobian would shift it by O(1) (E[2 v] under the guide is -2).
    est = TemperedSMC(funnel, funnel_guide, num_particles=200, num_replicates=2, noncentred=("x",))(
        jax.random.key(0)
    )
    assert abs(float(est.log_marginal)) < 3 * float(est.stderr), (est.log_marginal, est.stderr)
    assert float(est.stderr) < 0.1


def test_annealed_importance_sampling_reaches_the_funnel_evidence_non_centred():
    # The guide misses the neck (v ~ N(-1, 0.5^2)), log Z = 0. The same runs in the
    # model's coordinates end low (jax 0.10.2, keys 0-2: -0.13 +- 0.06, -0.31 +- 0.05,
    # -0.26 +- 0.05): the moves cannot follow x's scale down the neck. Not asserted:
    # whether one key's centred run is confidently wrong depends on the random stream.
    est = MarginalLikelihood(
        funnel, funnel_guide, num_particles=100, annealing_steps=300, noncentred=("x",)
    )(jax.random.key(1))
    assert abs(float(est.log_marginal)) < 3 * float(est.stderr), (est.log_marginal, est.stderr)
    assert float(est.stderr) < 0.15


# mu ~ N(0, 1), theta_j ~ N(mu, 2^2), y_j ~ N(theta_j, 1): y ~ N(0, 11^T + 5 I).
Y = jnp.array([1.5, -0.3, 2.2, 0.8, -1.1])


def hierarchy(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("j", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, 2.0))
        numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def hierarchy_guide(y):
    numpyro.sample("mu", dist.Normal(0.3, 0.5))
    with numpyro.plate("j", y.shape[0]):
        numpyro.sample("theta", dist.Normal(y / 2, 0.8))


def hierarchy_evidence(y):
    cov = jnp.ones((5, 5)) + 5.0 * jnp.eye(5)
    return float(dist.MultivariateNormal(jnp.zeros(5), cov).log_prob(y))


@pytest.mark.parametrize(
    "evaluator",
    [
        TemperedSMC(
            hierarchy, hierarchy_guide, num_particles=200, num_replicates=2, noncentred=("theta",)
        ),
        MarginalLikelihood(
            hierarchy, hierarchy_guide, num_particles=100, annealing_steps=50, noncentred=("theta",)
        ),
    ],
    ids=["smc", "ais"],
)
def test_a_linear_gaussian_hierarchy_gives_its_closed_form_evidence(evaluator):
    est = evaluator(jax.random.key(1), Y)
    err = float(est.log_marginal) - hierarchy_evidence(Y)
    assert abs(err) < 3 * float(est.stderr), (err, float(est.stderr))


def test_the_sandwich_holds_the_closed_form_evidence_with_non_centred_moves():
    bdmc = BidirectionalMC(
        hierarchy,
        hierarchy_guide,
        annealing_steps=100,
        num_particles=32,
        num_chains=16,
        noncentred=("theta",),
    )
    out = bdmc(jax.random.key(2), Y)
    exact = hierarchy_evidence(out.simulation.observed["y"])
    lower, upper = out.lower, out.upper
    assert float(lower.log_marginal) - 3 * float(lower.stderr) < exact, (lower, exact)
    assert exact < float(upper.log_marginal) + 3 * float(upper.stderr), (upper, exact)


def test_reverse_runs_start_from_the_simulated_latents_non_centred():
    # One transition of a step too small to move: the reverse weight is the ratio at
    # the start, the same in either coordinates if the start is the simulated draw
    # (started from its centred values read as non-centred, it is off by 57 here).
    simulation = BidirectionalMC(hierarchy, hierarchy_guide).simulate(jax.random.key(3), Y)
    args, _ = simulation.arguments((Y,), {})

    def upper(noncentred):
        bdmc = BidirectionalMC(
            hierarchy,
            hierarchy_guide,
            annealing_steps=1,
            step_size=1e-6,
            num_particles=2,
            num_chains=2,
            noncentred=noncentred,
        )
        return float(bdmc.sandwich(jax.random.key(4), simulation, *args).upper.log_marginal)

    np.testing.assert_allclose(upper(("theta",)), upper(()), atol=1e-3)


def test_sites_that_cannot_be_non_centred_are_refused():
    def scale_model():
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("z", dist.Normal(0.0, s))

    def scale_guide():
        numpyro.sample("s", dist.LogNormal(0.0, 0.5))
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    for names, message in ((("s",), "loc-scale families"), (("y",), "not continuous random")):
        with pytest.raises(ValueError, match=message):
            TemperedSMC(scale_model, scale_guide, num_particles=4, noncentred=names)(
                jax.random.key(0)
            )

    def delta_guide():
        numpyro.sample("s", dist.Delta(1.0))
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="point masses"):
        TemperedSMC(scale_model, delta_guide, num_particles=4, noncentred=("z",))(jax.random.key(0))
    with pytest.raises(TypeError, match=r"write \('z',\)"):
        TemperedSMC(scale_model, scale_guide, noncentred="z")
    with pytest.raises(TypeError, match=r"write \('z',\)"):
        BidirectionalMC(scale_model, scale_guide, noncentred="z")
    with pytest.raises(ValueError, match="importance sampling"):
        MarginalLikelihood(scale_model, scale_guide, noncentred=("z",))
    with pytest.raises(ValueError, match="loc-scale families"):
        MarginalLikelihood(scale_model, scale_guide, annealing_steps=2, noncentred=("s",))(
            jax.random.key(0)
        )
