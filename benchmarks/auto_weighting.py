"""What ``weighting="auto"`` should choose: joint, local and the ELBO measured side by side.

Two conjugate models with an exact log p(x), each at several data sizes N, each with two
fixed mean-field guides built from the exact posterior marginals:

- *global only*: mu ~ N(0, 1), x_n ~ N(mu, 1): an ordinary regression's shape (one global
  latent, a data plate of observations);
- *global + local*: mu ~ N(0, 1), z_n ~ N(mu, 0.8), x_n ~ N(z_n, 0.6): a latent per datapoint
  next to a global one (the shape of examples/hierarchical.py).

Guides: "wide" (every site at its exact posterior mean with 3x its posterior s.d.) and
"off-centre" (every site at its exact posterior s.d., the mean moved by 2 posterior s.d.).
Each bound (ELBO = IWELBO(1); IWELBO(K) joint; IWELBO(K) local) is the mean of the loss
over ``--keys`` independent keys, with its standard error. No training: the guides are fixed,
so the numbers isolate what the weighting does.

Run:  python benchmarks/auto_weighting.py            (writes auto_weighting.json)
      python benchmarks/auto_weighting.py --quick
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from recording import new_record, save_record

from numpyro_iwae import IWELBO

HERE = Path(__file__).resolve().parent
TAU, S = 0.8, 0.6


def global_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def local_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, TAU))
        numpyro.sample("x", dist.Normal(z, S), obs=x)


def gaussian_evidence(x: np.ndarray, noise_var: float) -> tuple[float, float, float]:
    """log p(x) and the posterior mean and s.d. of mu for x_n ~ N(mu, noise_var)."""
    x = np.asarray(x, np.float64)
    n = x.size
    log_det = n * math.log(noise_var) + math.log1p(n / noise_var)
    quad = (x @ x - x.sum() ** 2 / (noise_var + n)) / noise_var
    prec = 1 + n / noise_var
    return (
        -0.5 * (n * math.log(2 * math.pi) + log_det + quad),
        x.sum() / noise_var / prec,
        prec**-0.5,
    )


def make_guide(kind: str, x: np.ndarray, shape: str, width: float, shift: float):
    noise_var = 1.0 if kind == "global" else TAU**2 + S**2
    _, m_mu, s_mu = gaussian_evidence(x, noise_var)
    loc_mu, scale_mu = m_mu + shift * s_mu, width * s_mu
    if kind == "global":

        def guide(x):
            numpyro.sample("mu", dist.Normal(loc_mu, scale_mu))

        return guide
    prec = TAU**-2 + S**-2
    m_z = (TAU**-2 * m_mu + S**-2 * x) / prec
    s_z = np.sqrt(1 / prec + (TAU**-2 / prec) ** 2 * s_mu**2)
    loc_z, scale_z = jnp.asarray(m_z + shift * s_z), jnp.asarray(width * s_z)

    def guide(x):
        numpyro.sample("mu", dist.Normal(loc_mu, scale_mu))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc_z, scale_z))

    return guide


def mean_bound(objective, model, guide, x, keys):
    losses = jax.jit(jax.vmap(lambda k: objective.loss(k, {}, model, guide, x)))(keys)
    bounds = -np.asarray(losses, np.float64)
    return float(bounds.mean()), float(bounds.std(ddof=1) / math.sqrt(bounds.size))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=300, help="independent keys per bound")
    parser.add_argument("--particles", type=int, default=32, help="K")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[3, 10, 30, 100, 1000, 10000], help="N"
    )
    parser.add_argument("--quick", action="store_true", help="N = 10, 100 and 50 keys")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.keys = [10, 100], 50
    record = new_record()
    record.update(keys=args.keys, particles=args.particles)
    keys = jax.random.split(jax.random.key(0), args.keys)
    shapes = {"wide": (3.0, 0.0), "off-centre": (1.0, 2.0)}
    objectives = {
        "elbo": IWELBO(1),
        "joint": IWELBO(args.particles, weighting="joint"),
        "local": IWELBO(args.particles, weighting="local"),
    }
    header = f"{'model':>14} {'guide':>10} {'N':>6} {'exact':>12}" + "".join(
        f" {name:>20}" for name in objectives
    )
    print(header)
    for kind, model in (("global", global_model), ("global+local", local_model)):
        for n in args.sizes:
            x = np.asarray(jax.random.normal(jax.random.key(n), (n,)) * 1.3 + 0.5)
            noise_var = 1.0 if kind == "global" else TAU**2 + S**2
            exact = gaussian_evidence(x, noise_var)[0]
            for shape, (width, shift) in shapes.items():
                guide = make_guide(kind, x, shape, width, shift)
                row = {"model": kind, "guide": shape, "N": n, "exact": exact}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for name, objective in objectives.items():
                        row[name] = mean_bound(objective, model, guide, jnp.asarray(x), keys)
                record["rows"].append(row)
                print(
                    f"{kind:>14} {shape:>10} {n:>6} {exact:>12.3f}"
                    + "".join(
                        f" {row[k][0] - exact:>11.3f} +- {row[k][1]:<5.3f}" for k in objectives
                    ),
                    flush=True,
                )
    print("(columns after 'exact': bound - exact log p(x), +- one standard error)")
    save_record(
        record, HERE / ("auto_weighting_quick.json" if args.quick else "auto_weighting.json")
    )


if __name__ == "__main__":
    main()
