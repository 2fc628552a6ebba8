import math

import jax
import numpy as np
import pytest


def bound_stats(elbo, params, model, guide, *args, reps=2000, seed=0, **kwargs):
    """Mean and standard error of the bound ``-elbo.loss`` over ``reps`` keys."""
    keys = jax.random.split(jax.random.key(seed), reps)
    fn = jax.jit(jax.vmap(lambda k: -elbo.loss(k, params, model, guide, *args, **kwargs)))
    values = np.asarray(fn(keys), np.float64)
    return values.mean(), values.std(ddof=1) / math.sqrt(reps)


@pytest.fixture
def stats():
    return bound_stats
