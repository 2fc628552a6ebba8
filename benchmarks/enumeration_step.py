"""Time one SVI step of IWELBO(K) with enumerated model sites against NumPyro's
TraceEnum_ELBO(num_particles=K) on the same model and guide, side by side in one process.

Workloads (synthetic data, fixed seeds):
  mixture: three Gaussian components with global means and scale, an enumerated
           assignment per datapoint, N = 10,000, AutoNormal over the continuous sites;
  hmm:     a three-state chain of 50 steps written as a Python loop under ``markov``,
           Gaussian emissions with latent means, AutoNormal over the means.

Each step is ``jax.value_and_grad`` of the loss in the guide's parameters, compiled once;
rounds of the two methods are interleaved and the median seconds per step reported.

Run:  python benchmarks/enumeration_step.py          (about 2 minutes on 2 CPU cores)
      python benchmarks/enumeration_step.py --quick  (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.contrib.funsor import config_enumerate, markov
import numpyro.distributions as dist
from numpyro.infer import TraceEnum_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_iwae import IWELBO

HERE = Path(__file__).resolve().parent


@config_enumerate
def mixture(y):
    locs = numpyro.sample("locs", dist.Normal(0.0, 5.0).expand([3]).to_event(1))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(3) / 3))
        numpyro.sample("y", dist.Normal(locs[z], scale), obs=y)


TRANS = jnp.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])


@config_enumerate
def hmm(ys):
    locs = numpyro.sample("locs", dist.Normal(0.0, 5.0).expand([3]).to_event(1))
    x = 0
    for t in markov(range(ys.shape[0])):
        x = numpyro.sample(f"x_{t}", dist.Categorical(TRANS[x]))
        numpyro.sample(f"y_{t}", dist.Normal(locs[x], 1.0), obs=ys[t])


def data(name: str) -> jax.Array:
    rng = np.random.default_rng(0)
    if name == "mixture":
        return jnp.asarray(rng.normal(np.array([-3.0, 0.0, 3.0])[rng.integers(0, 3, 10_000)], 1.0))
    states = [0]
    for _ in range(49):
        states.append(rng.choice(3, p=np.asarray(TRANS)[states[-1]]))
    return jnp.asarray(rng.normal(np.array([-3.0, 0.0, 3.0])[states], 1.0))


def step_fn(elbo, model, guide, y, params):
    def loss(p, key):
        return elbo.loss(key, p, model, guide, y)

    fn = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(fn(params, jax.random.key(0)))
    return fn


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "enumeration_step.json")
    args = parser.parse_args(argv)
    rounds, steps, ks = (2, 3, (1, 8)) if args.quick else (args.rounds, args.steps, (1, 8, 32))
    rows = []
    for name, model in (("mixture", mixture), ("hmm", hmm)):
        y = data(name)
        hidden = ["z"] if name == "mixture" else [f"x_{t}" for t in range(y.shape[0])]
        guide = AutoNormal(numpyro.handlers.block(model, hide=hidden))
        svi = numpyro.infer.SVI(model, guide, numpyro.optim.Adam(0.01), TraceEnum_ELBO())
        params = svi.get_params(svi.init(jax.random.key(0), y))
        for k in ks:
            fns = {
                "IWELBO": step_fn(IWELBO(num_particles=k), model, guide, y, params),
                "TraceEnum_ELBO": step_fn(
                    TraceEnum_ELBO(num_particles=k, max_plate_nesting=1), model, guide, y, params
                ),
            }
            times = {m: [] for m in fns}
            for r in range(rounds):
                for m, fn in fns.items():
                    t0 = time.perf_counter()
                    for s in range(steps):
                        out = fn(params, jax.random.key(r * steps + s))
                    jax.block_until_ready(out)
                    times[m].append((time.perf_counter() - t0) / steps)
            med = {m: statistics.median(t) for m, t in times.items()}
            row = {
                "model": name,
                "k": k,
                **{f"{m}_ms": 1e3 * v for m, v in med.items()},
                "ratio": med["IWELBO"] / med["TraceEnum_ELBO"],
            }
            rows.append(row)
            print(
                f"{name:<8} K={k:<3} IWELBO {row['IWELBO_ms']:8.3f} ms  "
                f"TraceEnum_ELBO {row['TraceEnum_ELBO_ms']:8.3f} ms  ratio {row['ratio']:.2f}"
            )
    result = {
        "load_before": os.getloadavg()[0],
        "versions": {"jax": jax.__version__, "numpyro": numpyro.__version__},
        "rows": rows,
    }
    if not args.quick:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
