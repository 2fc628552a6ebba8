"""Signal-to-noise ratio of IWAE gradient estimators as the number of particles grows.

Reproduces the qualitative result of Rainforth et al. (2018, *Tighter Variational
Bounds are Not Necessarily Better*, ICML, section 4) on their Gaussian model,
z ~ N(mu, I), x | z ~ N(z, I) in D = 20 dimensions, with the amortized guide
q(z | x) = N(A x + b, 2/3 I) perturbed from its optimum (by 0.01 as Rainforth et
al., and by 0.05, where the plain gradient's fall stays above the noise floor of
a few thousand draws): the SNR |E g| / sd(g) of
the guide-parameter gradient *falls* like 1/sqrt(K) for the plain IWAE gradient
("reparam"), *rises* like sqrt(K) for DReG (Tucker et al. 2019), and STL's rises
too while its mean drifts from the true gradient (it is biased for K > 1). The
model-parameter gradient is the same for every estimator and its SNR rises.

Run:  python examples/snr.py --out out       (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_iwae import IWELBO

D = 20
ESTIMATORS = ("reparam", "stl", "dreg")


def model(x):
    mu = numpyro.param("mu", jnp.zeros(D))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        numpyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def guide(x):
    a = numpyro.param("A", jnp.eye(D) / 2)
    b = numpyro.param("b", jnp.zeros(D))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Normal(x @ a.T + b, jnp.sqrt(2.0 / 3.0)).to_event(1))


def setup(seed: int, num_data: int, perturb: float):
    """Data from the model and parameters near the optimum, as Rainforth et al."""
    k_mu, k_x, k_a, k_b, k_m = jax.random.split(jax.random.key(seed), 5)
    true_mu = jax.random.normal(k_mu, (D,))
    z = true_mu + jax.random.normal(k_x, (num_data, D))
    x = z + jax.random.normal(jax.random.fold_in(k_x, 1), (num_data, D))
    # The optimal encoder is A = I / 2, b = mu / 2; perturb it and the model slightly.
    params = {
        "A": jnp.eye(D) / 2 + perturb * jax.random.normal(k_a, (D, D)),
        "b": true_mu / 2 + perturb * jax.random.normal(k_b, (D,)),
        "mu": true_mu + perturb * jax.random.normal(k_m, (D,)),
    }
    return x, params


def gradient_fn(elbo: IWELBO, x: jax.Array):
    """Gradient of the bound for a batch of keys, jitted."""

    def one(params, key):
        return jax.grad(lambda p: -elbo.loss(key, p, model, guide, x))(params)

    return jax.jit(jax.vmap(one, (None, 0)))


def snr(grads: np.ndarray) -> float:
    """Mean over components of |mean| / std across draws."""
    return float(np.mean(np.abs(grads.mean(0)) / grads.std(0, ddof=1)))


def measure(ks, reps, seed=0, perturb=0.05, progress=True, num_data=1):
    x, params = setup(seed, num_data, perturb)
    rows = []
    jobs = [(k, e) for k in ks for e in ESTIMATORS]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="SNR")
    for k, estimator in jobs:
        grad = gradient_fn(IWELBO(k, gradient_estimator=estimator), x)
        g = grad(params, jax.random.split(jax.random.key(seed + 1), reps))
        rows.append(
            {
                "k": k,
                "estimator": estimator,
                "snr_guide_b": snr(np.asarray(g["b"]).reshape(reps, -1)),
                "snr_guide_A": snr(np.asarray(g["A"]).reshape(reps, -1)),
                "snr_model_mu": snr(np.asarray(g["mu"]).reshape(reps, -1)),
                "mean_grad_b": np.asarray(g["b"]).mean(0).tolist(),
            }
        )
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return rows


def plot(rows, path: Path, reps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    perturbs = sorted({r["perturb"] for r in rows})
    fig, axes = plt.subplots(
        len(perturbs), 2, figsize=(10, 3.6 * len(perturbs)), constrained_layout=True, squeeze=False
    )
    styles = {"reparam": ("C0", "o"), "stl": ("C2", "s"), "dreg": ("C3", "^")}
    # A zero-mean gradient estimated from `reps` draws shows |mean| / sd of about
    # sqrt(2 / (pi * reps)): SNRs near this floor are indistinguishable from 0.
    floor = np.sqrt(2 / (np.pi * reps))
    for row_axes, perturb in zip(axes, perturbs):
        for ax, key, title in (
            (row_axes[0], "snr_guide_b", "guide parameter b (encoder bias)"),
            (row_axes[1], "snr_model_mu", "model parameter mu"),
        ):
            for est in ESTIMATORS:
                pts = [
                    (r["k"], r[key])
                    for r in rows
                    if r["estimator"] == est and r["perturb"] == perturb
                ]
                ks, vals = zip(*pts)
                color, marker = styles[est]
                ax.loglog(ks, vals, marker=marker, color=color, label=est)
            ax.axhline(floor, color="gray", ls=":", label=f"noise floor ({reps} draws)")
            ax.set_xlabel("K (particles)")
            ax.set_ylabel("SNR = |E g| / sd(g)")
            ax.set_title(f"{title}, parameters perturbed by {perturb}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        "Gradient signal-to-noise ratio vs K (Gaussian model of Rainforth et al. 2018, D=20)"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10, 30, 100, 300, 1000])
    parser.add_argument("--reps", type=int, default=2000, help="gradient draws per point")
    parser.add_argument(
        "--perturb",
        type=float,
        nargs="+",
        default=[0.01, 0.05],
        help="std of the perturbation of the parameters from their optimum (one row each)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for perturb in args.perturb:
        for r in measure(args.ks, args.reps, args.seed, perturb, not args.no_progress):
            rows.append({**r, "perturb": perturb})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "snr.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "snr.png", args.reps)
    for perturb in args.perturb:
        print(f"perturbation {perturb}: SNR of the guide (b) and model (mu) gradients")
        print(f"{'K':>6} " + " ".join(f"{e + ' guide':>14} {e + ' model':>14}" for e in ESTIMATORS))
        for k in args.ks:
            cells = []
            for e in ESTIMATORS:
                r = next(
                    r
                    for r in rows
                    if r["k"] == k and r["estimator"] == e and r["perturb"] == perturb
                )
                cells.append(f"{r['snr_guide_b']:>14.3f} {r['snr_model_mu']:>14.3f}")
            print(f"{k:>6} " + " ".join(cells))
    print(f"wrote {args.out / 'snr.png'} and {args.out / 'snr.json'}")
    return rows


if __name__ == "__main__":
    main()
