"""The default weighting on the models users already have: an ordinary regression
(global latents next to a data plate of observations) is importance weighted
jointly, for every objective that takes ``weighting``.
"""

from __future__ import annotations

import math

from gaussians import log_evidence
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
import pytest

from numpyro_iwae import CIWAE, IWELBO, MIWAE, PIWAE, SUMO, RenyiELBO, ReweightedWakeSleep

N = 150
X = jnp.asarray(np.random.default_rng(4).normal(0.4, 1.0, size=N), jnp.float32)


def model(x):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


POST_PREC = 1.0 + N
POST_LOC = float(np.sum(np.asarray(X, np.float64))) / POST_PREC


def wide_guide(x):
    # The exact posterior mean with 3x its standard deviation.
    numpyro.sample("z", dist.Normal(POST_LOC, 3 * POST_PREC**-0.5))


def losses(objective, num_keys, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_keys)
    loss = jax.jit(jax.vmap(lambda k: objective.loss(k, {}, model, wide_guide, X)))
    return np.asarray(loss(keys), np.float64)


OBJECTIVES = {
    "IWELBO": lambda w: IWELBO(16, weighting=w),
    "RenyiELBO": lambda w: RenyiELBO(0.5, num_particles=16, weighting=w),
    "MIWAE": lambda w: MIWAE(8, 2, weighting=w),
    "CIWAE": lambda w: CIWAE(16, 0.5, weighting=w),
    "PIWAE": lambda w: PIWAE(8, 2, weighting=w),
    "SUMO": lambda w: SUMO(2, 8, weighting=w),
    "ReweightedWakeSleep": lambda w: ReweightedWakeSleep(16, weighting=w),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_default_is_the_joint_bound_for_global_latents_next_to_a_data_plate(name):
    make = OBJECTIVES[name]
    np.testing.assert_allclose(losses(make("auto"), 4), losses(make("joint"), 4), rtol=1e-6)


def test_default_bound_is_far_above_the_elbo_and_close_to_log_evidence():
    # The measurement: with the old default (local: the ELBO) IWELBO(32) was
    # 3 nats below log p(x); the joint bound is within a few hundredths of it.
    exact = log_evidence(np.asarray(X), np.ones(N), np.zeros(N), np.ones(N))
    iw = -losses(IWELBO(32), 400)
    elbo = -losses(IWELBO(1), 400, seed=1)
    trace_elbo = -np.asarray(
        jax.vmap(lambda k: Trace_ELBO().loss(k, {}, model, wide_guide, X))(
            jax.random.split(jax.random.key(2), 400)
        ),
        np.float64,
    )
    se = lambda v: v.std(ddof=1) / math.sqrt(v.size)  # noqa: E731
    # KL(q || p) of a Gaussian 3x too wide: log(1/3) + 9/2 - 1/2 = 2.90 nats.
    kl = math.log(1 / 3) + 4.0
    assert abs(elbo.mean() - (exact - kl)) < 3.5 * se(elbo)
    assert iw.mean() - elbo.mean() > 8 * math.hypot(se(iw), se(elbo))
    assert abs(elbo.mean() - trace_elbo.mean()) < 3.5 * math.hypot(se(elbo), se(trace_elbo))
    assert iw.mean() <= exact + 3 * se(iw)
    assert exact - iw.mean() < 0.1
