"""The networks users write: a Flax NNX encoder with BatchNorm (mutable state) in the guide
and an Equinox decoder in the model, through NumPyro's ``nnx_module`` and ``eqx_module``,
trained by IWELBO and the family under ``jax.checking_leaks()`` (NumPyro users keep
hitting tracer leaks there: pyro-ppl/numpyro#1999, #2162) and scored by the evaluators."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI
import optax
import pytest

from numpyro_iwae import (
    CIWAE,
    IWELBO,
    MIWAE,
    PIWAE,
    SUMO,
    MarginalLikelihood,
    RenyiELBO,
    ReweightedWakeSleep,
)

nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")
from numpyro.contrib.module import eqx_module, nnx_module  # noqa: E402

D, H, Z = 6, 8, 2
X = jnp.asarray(np.random.default_rng(0).normal(size=(16, D)), jnp.float32)


class Encoder(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(D, H, rngs=rngs)
        self.norm = nnx.BatchNorm(H, rngs=rngs)  # batch statistics: mutable state
        self.out = nnx.Linear(H, 2 * Z, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.tanh(self.norm(self.hidden(x)))
        loc, raw = jnp.split(self.out(h), 2, -1)
        return loc, jax.nn.softplus(raw) + 1e-3


ENCODER = Encoder(nnx.Rngs(0))
DECODER = eqx.nn.MLP(Z, D, H, 1, key=jax.random.key(1))


def model(x):
    decoder = eqx_module("decoder", DECODER)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([Z]).to_event(1))
        numpyro.sample("x", dist.Normal(jax.vmap(decoder)(z), 0.5).to_event(1), obs=x)


def guide(x):
    loc, scale = nnx_module("encoder", ENCODER)(x)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


OBJECTIVES = {
    "iwelbo": lambda: IWELBO(4),
    "iwelbo-dreg": lambda: IWELBO(4, gradient_estimator="dreg"),
    "miwae": lambda: MIWAE(2, 2),
    "ciwae": lambda: CIWAE(4, 0.5),
    "piwae": lambda: PIWAE(2, 2),
    "renyi": lambda: RenyiELBO(0.5, 4),
    "rws": lambda: ReweightedWakeSleep(4),
    "sumo": lambda: SUMO(max_terms=8),
}


# checking_leaks disables JAX's caches, so each objective costs 20-110 s to compile on 2
# cores: they run with the slow tests; the evaluator's test below runs with the fast ones.
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_nnx_and_equinox_networks_train_without_leaks(name):
    with jax.checking_leaks():
        svi = SVI(model, guide, optax.adam(1e-2), OBJECTIVES[name]())
        state = svi.init(jax.random.key(0), X)
        before = svi.get_params(state)
        stats_before = state.mutable_state["encoder$state"]["state"]["norm"]["mean"]
        for _ in range(2):
            state, loss = svi.update(state, X)
        assert np.isfinite(float(loss))
    after = svi.get_params(state)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
    assert any(jax.tree.leaves(moved["encoder$params"]))
    if name != "rws":  # wake-sleep's model update is its wake phase: the decoder too
        assert any(jax.tree.leaves(moved["decoder$params"]))
    # BatchNorm's running mean keeps its shape (no particle axis) and moves.
    stats = state.mutable_state["encoder$state"]["state"]["norm"]["mean"]
    assert stats.shape == (H,) and bool(jnp.any(stats != stats_before))


def test_the_evaluator_reads_the_networks_and_their_state():
    svi = SVI(model, guide, optax.adam(1e-2), IWELBO(4))
    result = svi.run(jax.random.key(0), 20, X, progress_bar=False)
    holder = result.state.mutable_state["encoder$state"]
    before = holder["state"]["norm"]["mean"]
    with jax.checking_leaks():
        est = MarginalLikelihood(
            model,
            guide,
            params=result.params,
            mutable_state=result.state.mutable_state,
            num_particles=64,
        )(jax.random.key(1), X)
    assert est.pointwise.shape == (16,) and np.all(np.isfinite(np.asarray(est.pointwise)))
    # The module wrote its state into a copy, not into the caller's mutable_state.
    assert holder["state"]["norm"]["mean"] is before
