"""Le et al.'s Gaussian mixture: reweighted wake-sleep against VIMCO and the plain
score-function estimator, for a discrete latent with K in {2, 5, 10, 20}.

The model (Le, Kosiorek, Siddharth, Teh & Wood, 2019, *Revisiting Reweighted
Wake-Sleep*, section 4.2): 20 components, z ~ Categorical(pi), x | z ~ N(10 z, 5^2),
true mixture weights proportional to c + 5 (c = 0..19); the model learns pi (softmax
of 20 logits, started uniform); the guide is an inference network q(z | x), a 1-16-16
tanh MLP giving 20 logits. The objectives:

- RWS: ReweightedWakeSleep(K) (wake-theta + wake-phi, insomnia 1);
- RWS with sleep: ReweightedWakeSleep(K, insomnia=0.5);
- defensive RWS: wake-wake with the particles drawn from 0.8 q(z | x) + 0.2 uniform
  (ReweightedWakeSleep(K, proposal=...));
- VIMCO: IWELBO(K), whose discrete site gets VIMCO's leave-one-out score function;
- score function: the IWAE bound's plain score-function gradient (learning signal =
  the bound itself, no baseline), written here as a small IWELBO subclass.

Each fit runs SVI (Adam, learning rate 0.003) on a fresh batch of 100 points drawn
from the true model at every step, with every method's steps timed; 100 times per fit
it records the model error ||softmax(logits) - pi_true||_2 and the inference error, the mean over
500 held-out points of ||p_theta(z | x) - q_phi(z | x)||_2 with the model's exact
posterior by enumeration. Writes benchmarks/gmm_rws.json and benchmarks/gmm_rws.png.

Run:  python benchmarks/gmm_rws.py               (20,000 steps per fit; minutes on 2 cores)
      python benchmarks/gmm_rws.py --quick       (a smoke run)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import time

import jax
from jax.example_libraries import stax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI
import optax

from numpyro_iwae import IWELBO, ReweightedWakeSleep
from numpyro_iwae.maths.bounds import iwae_bound
from numpyro_iwae.maths.surrogates import with_score_terms

HERE = Path(__file__).resolve().parent
C = 20
MEANS = 10.0 * jnp.arange(C)
SCALE = 5.0
PI_TRUE = (jnp.arange(C) + 5.0) / jnp.sum(jnp.arange(C) + 5.0)
NET = stax.serial(stax.Dense(16), stax.Tanh, stax.Dense(16), stax.Tanh, stax.Dense(C))


def model(x):
    logits = numpyro.param("logits", jnp.zeros(C))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(logits=logits))
        numpyro.sample("x", dist.Normal(MEANS[z], SCALE), obs=x)


def guide(x):
    net = numpyro.module("encoder", NET, (1, 1))
    with numpyro.plate("data", x.shape[0]):
        # Inputs scaled to about unit size for the tanh network.
        numpyro.sample("z", dist.Categorical(logits=net((x[:, None] - 100.0) / 50.0)))


DEFENSIVE = 0.2


def defensive_proposal(x):
    """The guide's q(z | x) mixed with 0.2 x uniform: the wake particles' proposal of
    defensive RWS."""
    net = numpyro.module("encoder", NET, (1, 1))
    probs = jax.nn.softmax(net((x[:, None] - 100.0) / 50.0), -1)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Categorical(probs=(1 - DEFENSIVE) * probs + DEFENSIVE / C))


class ScoreFunctionIWAE(IWELBO):
    """The IWAE bound with the plain score-function gradient for the discrete site:
    every particle's learning signal is the bound itself (no baseline)."""

    def element_bound(self, log_w, log_q_score, score):
        bound = iwae_bound(log_w)
        if not score:
            return bound
        signal = jnp.broadcast_to(bound, log_w.shape)
        return with_score_terms(bound, log_w, log_q_score, signal=signal)


def sample_data(key, n):
    k_z, k_x = jax.random.split(key)
    z = jax.random.categorical(k_z, jnp.log(PI_TRUE), shape=(n,))
    return MEANS[z] + SCALE * jax.random.normal(k_x, (n,))


def errors(params, x_test):
    """Model error and mean inference error (exact posterior by enumeration)."""
    pi = jax.nn.softmax(params["logits"])
    log_joint = jnp.log(pi) + dist.Normal(MEANS, SCALE).log_prob(x_test[:, None])
    posterior = jax.nn.softmax(log_joint, axis=-1)
    q = jax.nn.softmax(NET[1](params["encoder$params"], (x_test[:, None] - 100.0) / 50.0), -1)
    model_error = jnp.linalg.norm(pi - PI_TRUE)
    inference_error = jnp.mean(jnp.linalg.norm(posterior - q, axis=-1))
    return model_error, inference_error


def fit(elbo, x_test, steps, every, seed, batch=100):
    """SVI on a fresh batch of ``batch`` points from the true model at every step."""
    svi = SVI(model, guide, optax.adam(3e-3), elbo)
    state = svi.init(jax.random.key(seed), sample_data(jax.random.key(seed), batch))

    @jax.jit
    def chunk(state, key):
        def step(s, k):
            return svi.update(s, sample_data(k, batch))

        state, losses = jax.lax.scan(step, state, jax.random.split(key, every))
        return state, losses[-1]

    data_keys = jax.random.split(jax.random.key(1000 + seed), steps // every + 1)

    measure = jax.jit(errors)
    chunk(state, data_keys[0])[1].block_until_ready()  # compile outside the timing
    curve = {"step": [], "model_error": [], "inference_error": [], "loss": []}
    seconds = 0.0
    for i in range(steps // every + 1):
        if i:
            t0 = time.perf_counter()
            state, loss = chunk(state, data_keys[i])
            loss.block_until_ready()
            seconds += time.perf_counter() - t0
            curve["loss"].append(float(loss))
        m, e = measure(svi.get_params(state), x_test)
        curve["step"].append(i * every)
        curve["model_error"].append(float(m))
        curve["inference_error"].append(float(e))
    curve["seconds"] = seconds
    return curve


METHODS = {
    "RWS (wake-wake)": lambda k: ReweightedWakeSleep(k),
    "RWS (insomnia 0.5)": lambda k: ReweightedWakeSleep(k, insomnia=0.5),
    "RWS (defensive 0.2)": lambda k: ReweightedWakeSleep(k, proposal=defensive_proposal),
    "VIMCO": lambda k: IWELBO(k),
    "score function": lambda k: ScoreFunctionIWAE(k),
}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["ks"]
    fig, axes = plt.subplots(2, len(ks), figsize=(3.2 * len(ks), 5.6), sharex=True)
    axes = np.asarray(axes).reshape(2, len(ks))
    for j, k in enumerate(ks):
        for name in METHODS:
            c = result["curves"][f"{name}, K={k}"]
            axes[0, j].plot(c["step"], c["model_error"], label=name)
            axes[1, j].plot(c["step"], c["inference_error"], label=name)
        axes[0, j].set_title(f"K = {k}")
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("iteration")
    axes[0, 0].set_ylabel(r"model error $\|\pi - \pi_{true}\|$")
    axes[1, 0].set_ylabel(r"inference error $\|p(z|x) - q(z|x)\|$")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, two K (smoke run)")
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "gmm_rws.json")
    args = parser.parse_args(argv)
    steps, ks = (200, [2, 5]) if args.quick else (args.steps, [2, 5, 10, 20])
    x_test = sample_data(jax.random.key(101), 500)
    result = {"ks": ks, "steps": steps, "lr": 3e-3, "curves": {}}
    for k in ks:
        for name, make in METHODS.items():
            c = fit(make(k), x_test, steps, steps // 100, args.seed)
            result["curves"][f"{name}, K={k}"] = c
            print(
                f"K={k:<3} {name:<20} model error {c['model_error'][-1]:.4f}  "
                f"inference error {c['inference_error'][-1]:.4f}  "
                f"{1e3 * c['seconds'] / steps:.2f} ms/step",
                flush=True,
            )
    args.out.write_text(json.dumps(result))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
