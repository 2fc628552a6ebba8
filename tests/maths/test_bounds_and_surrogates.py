"""maths.bounds and maths.surrogates: bound values and their gradients on plain arrays."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_iwae.maths.bounds import iwae_bound, normalized_weights


def test_bound_is_log_mean_weight_per_element():
    log_w = jnp.log(jnp.array([[1.0, 2.0], [3.0, 6.0], [8.0, 1.0]]))
    expected = np.log(np.array([12.0, 9.0]) / 3)
    np.testing.assert_allclose(iwae_bound(log_w), expected, rtol=1e-6)


def test_bound_is_stable_for_large_log_weights():
    log_w = jnp.array([-1000.0, -1000.0 + math.log(3.0)])
    np.testing.assert_allclose(iwae_bound(log_w), -1000.0 + math.log(2.0), rtol=1e-7)


def test_gradient_is_normalized_weights():
    log_w = jnp.array([[0.3, -2.0], [1.2, 0.0], [-0.5, 4.0]])
    grad = jax.grad(lambda lw: jnp.sum(iwae_bound(lw)))(log_w)
    np.testing.assert_allclose(grad, jax.nn.softmax(log_w, axis=0), rtol=1e-6)
    np.testing.assert_allclose(normalized_weights(log_w), jax.nn.softmax(log_w, axis=0), rtol=1e-6)


def test_dead_particles_and_dead_elements():
    log_w = jnp.array([[-jnp.inf, -jnp.inf], [0.0, -jnp.inf]])
    value = iwae_bound(log_w)
    assert np.isclose(value[0], -math.log(2.0)) and value[1] == -jnp.inf
    grad = jax.grad(lambda lw: jnp.sum(jnp.where(jnp.isfinite(iwae_bound(lw)), iwae_bound(lw), 0)))(
        log_w
    )
    np.testing.assert_array_equal(grad, [[0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(normalized_weights(log_w), [[0.0, 0.0], [1.0, 0.0]])


def test_gradient_of_dead_element_is_zero_not_nan():
    log_w = jnp.full((3,), -jnp.inf)
    assert float(jax.grad(lambda lw: iwae_bound(lw))(log_w).sum()) == 0.0
