"""TemperedSMC's non-centred moves: the change of variables keeps p / q and adds the
Jacobian sum(log scale); the evidence is unchanged (the funnel's log Z = 0, a
linear-Gaussian hierarchy's closed form); sites that cannot be non-centred are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_iwae import TemperedSMC
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


def test_a_linear_gaussian_hierarchy_gives_its_closed_form_evidence():
    # mu ~ N(0, 1), theta_j ~ N(mu, 2^2), y_j ~ N(theta_j, 1): y ~ N(0, 11^T + 5 I).
    y = jnp.array([1.5, -0.3, 2.2, 0.8, -1.1])

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("j", y.shape[0]):
            theta = numpyro.sample("theta", dist.Normal(mu, 2.0))
            numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    cov = jnp.ones((5, 5)) + 5.0 * jnp.eye(5)
    exact = float(dist.MultivariateNormal(jnp.zeros(5), cov).log_prob(y))

    def guide(y):
        numpyro.sample("mu", dist.Normal(0.3, 0.5))
        with numpyro.plate("j", y.shape[0]):
            numpyro.sample("theta", dist.Normal(y / 2, 0.8))

    est = TemperedSMC(model, guide, num_particles=200, num_replicates=2, noncentred=("theta",))(
        jax.random.key(1), y
    )
    err = float(est.log_marginal) - exact
    assert abs(err) < 3 * float(est.stderr), (err, float(est.stderr))


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
