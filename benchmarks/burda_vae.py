"""The IWAE paper's 784-200-200-50 VAE (tanh MLPs, Bernoulli pixels) with random weights,
as a NumPyro model and guide: the network the evaluation and scaling benchmarks run in
their child processes (which put this directory on ``PYTHONPATH``)."""

from __future__ import annotations

import jax
from jax.example_libraries import stax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist


def mlp(out: int):
    return stax.serial(stax.Dense(200), stax.Tanh, stax.Dense(200), stax.Tanh, stax.Dense(out))


def build():
    """``(model, guide, params, enc_apply, dec_apply)``; ``params`` holds the encoder's
    and decoder's random initial weights under NumPyro's module names."""
    enc_init, enc_apply = mlp(100)
    dec_init, dec_apply = mlp(784)
    _, enc = enc_init(jax.random.key(1), (1, 784))
    _, dec = dec_init(jax.random.key(2), (1, 50))

    def model(x):
        d = numpyro.module("decoder", (dec_init, dec_apply), (1, 50))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([50]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=d(z)).to_event(1), obs=x)

    def guide(x):
        e = numpyro.module("encoder", (enc_init, enc_apply), (1, 784))
        h = e(x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(h[:, :50], jnp.exp(h[:, 50:])).to_event(1))

    params = {"decoder$params": dec, "encoder$params": enc}
    return model, guide, params, (enc_apply, enc), (dec_apply, dec)


def child_env() -> dict:
    """The environment for a child process that imports this module."""
    import os
    from pathlib import Path

    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env
