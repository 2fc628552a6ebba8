"""NumPyro's own example models, as NumPyro writes them, through the evaluators.

The models below are written the way NumPyro's examples write them (``ucbadmit.py``'s
``glmm`` reads the number of departments with ``len(np.unique(dept))``;
``annotation.py``'s models read sizes with ``int(np.max(annotations)) + 1``): they need
their arguments' values while they are traced, which SVI, MCMC and Predictive allow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import expit
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.autoguide import AutoNormal
import pytest

from numpyro_iwae import IWELBO, MarginalLikelihood

# UC Berkeley admissions, 1973 (Bickel, Hammel & O'Connell, 1975): per department A-F,
# male then female rows, as NumPyro's UCBADMIT dataset holds them.
DEPT = np.repeat(np.arange(6), 2)
MALE = np.tile(np.array([1, 0]), 6)
APPLICATIONS = np.array([825, 108, 560, 25, 325, 593, 417, 375, 191, 393, 373, 341])
ADMIT = np.array([512, 89, 353, 17, 120, 202, 138, 131, 53, 94, 22, 24])


def glmm(dept, male, applications, admit=None):
    v_mu = numpyro.sample("v_mu", dist.Normal(0, jnp.array([4.0, 1.0])))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(2)))
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, concentration=2))
    scale_tril = sigma[..., jnp.newaxis] * L_Rho
    num_dept = len(np.unique(dept))  # a numpy function of an argument
    z = numpyro.sample("z", dist.Normal(jnp.zeros((num_dept, 2)), 1))
    v = jnp.dot(scale_tril, z.T).T
    logits = v_mu[0] + v[dept, 0] + (v_mu[1] + v[dept, 1]) * male
    if admit is None:
        probs = expit(logits)
        numpyro.sample("probs", dist.Delta(probs), obs=probs)
    numpyro.sample("admit", dist.Binomial(applications, logits=logits), obs=admit)


def glmm_sized(dept, male, applications, admit=None):
    """The same model with the size written in: traceable with array arguments."""
    v_mu = numpyro.sample("v_mu", dist.Normal(0, jnp.array([4.0, 1.0])))
    sigma = numpyro.sample("sigma", dist.HalfNormal(jnp.ones(2)))
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, concentration=2))
    scale_tril = sigma[..., jnp.newaxis] * L_Rho
    z = numpyro.sample("z", dist.Normal(jnp.zeros((6, 2)), 1))
    v = jnp.dot(scale_tril, z.T).T
    logits = v_mu[0] + v[dept, 0] + (v_mu[1] + v[dept, 1]) * male
    numpyro.sample("admit", dist.Binomial(applications, logits=logits), obs=admit)


def fitted_glmm_guide():
    guide = AutoNormal(glmm_sized)
    args = (DEPT, MALE, APPLICATIONS, ADMIT)
    svi = numpyro.infer.SVI(glmm_sized, guide, numpyro.optim.Adam(0.05), IWELBO(4))
    result = svi.run(jax.random.key(0), 300, *map(jnp.asarray, args), progress_bar=False)
    return guide, result.params


@pytest.mark.parametrize("as_jax", [False, True])
@pytest.mark.slow
def test_ucbadmit_glmm_as_numpyro_writes_it(as_jax):
    guide, params = fitted_glmm_guide()
    args = (DEPT, MALE, APPLICATIONS, ADMIT)
    if as_jax:
        args = tuple(map(jnp.asarray, args))
    key = jax.random.key(1)
    ml = MarginalLikelihood(glmm, guide, params=params, num_particles=2000)
    est = ml(key, *args)
    # The size read with numpy is the size written in: the same particles, the same
    # estimate as the traceable version of the model.
    ref = MarginalLikelihood(glmm_sized, guide, params=params, num_particles=2000)(key, *args)
    np.testing.assert_allclose(est.log_marginal, ref.log_marginal, rtol=1e-6)
    np.testing.assert_allclose(est.stderr, ref.stderr, rtol=1e-4)  # float rounding
    assert np.isfinite(est.log_marginal) and est.stderr < 1.0
    # Called again with equal arguments: the cached compilation, the same answer.
    again = ml(key, *args)
    np.testing.assert_array_equal(again.log_marginal, est.log_marginal)
    # Other data of the same shape: recompiled for its values, not a stale answer.
    other = ml(key, DEPT, MALE, APPLICATIONS, np.minimum(ADMIT + 5, APPLICATIONS))
    assert float(other.log_marginal) != float(est.log_marginal)


def multinomial(annotations):
    """annotation.py's first model (its enumerated site drawn by the guide below)."""
    num_classes = int(np.max(annotations)) + 1
    num_items, num_positions = annotations.shape
    with numpyro.plate("class", num_classes):
        zeta = numpyro.sample("zeta", dist.Dirichlet(jnp.ones(num_classes)))
    pi = numpyro.sample("pi", dist.Dirichlet(jnp.ones(num_classes)))
    with numpyro.plate("item", num_items, dim=-2):
        c = numpyro.sample("c", dist.Categorical(pi), infer={"enumerate": "parallel"})
        with numpyro.plate("position", num_positions):
            numpyro.sample("y", dist.Categorical(zeta[c]), obs=annotations)


ANNOTATIONS = np.array(
    [[1, 1, 1, 1, 1], [3, 3, 3, 0, 3], [1, 1, 2, 2, 1], [2, 2, 2, 3, 1], [0, 0, 0, 0, 0]]
)


def multinomial_guide(annotations):
    num_classes = int(np.max(annotations)) + 1
    with numpyro.plate("class", num_classes):
        numpyro.sample("zeta", dist.Dirichlet(jnp.full(num_classes, 2.0)))
    numpyro.sample("pi", dist.Dirichlet(jnp.full(num_classes, 2.0)))
    with numpyro.plate("item", annotations.shape[0], dim=-2):
        probs = jax.nn.one_hot(annotations[:, :1], num_classes) * 0.6 + 0.1
        numpyro.sample("c", dist.Categorical(probs))


def test_annotation_model_as_numpyro_writes_it():
    est = MarginalLikelihood(multinomial, multinomial_guide, num_particles=500)(
        jax.random.key(0), ANNOTATIONS
    )
    assert np.isfinite(est.log_marginal)

    # The model's enumerated site hidden from the guide (as TraceEnum_ELBO allows) is
    # summed out inside each weight (tests/core/test_enumeration.py checks the sums
    # against exact values). This guide, the Dirichlet priors' shape, is a poor
    # proposal, and k-hat says so.
    def continuous_guide(annotations):
        num_classes = int(np.max(annotations)) + 1
        with numpyro.plate("class", num_classes):
            numpyro.sample("zeta", dist.Dirichlet(jnp.full(num_classes, 2.0)))
        numpyro.sample("pi", dist.Dirichlet(jnp.full(num_classes, 2.0)))

    pytest.importorskip("funsor")
    summed = MarginalLikelihood(multinomial, continuous_guide, num_particles=500)(
        jax.random.key(0), ANNOTATIONS
    )
    assert np.isfinite(float(summed.log_marginal)) and float(summed.k_hat) > 0.7


def test_a_latent_in_python_control_flow_is_a_clear_error():
    def model(x):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        if z > 0:  # not traceable, whatever the arguments
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        numpyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="Python control flow"):
        MarginalLikelihood(model, guide, num_particles=10)(jax.random.key(0), np.zeros(3))
