"""Where TemperedSMC's funnel estimate falls short: each tempering step's log increment
against quadrature, and how far the HMC moves carry a particle at the end of the path.

On the 10-D funnel with the ELBO's AutoNormal fit every tempered target
gamma_beta = q^(1 - beta) p^beta has a normalizing constant computable by 1-D quadrature
in v (the x_i integrals are Gaussian), so each step's term of log Z-hat
(``SMCResult.log_increments``) can be held against the exact log Z_{beta_t} - log
Z_{beta_{t-1}}. Then exact draws from the funnel itself (beta = 1) are moved by the
same kind of sweeps (whitened by the draws' standard deviations, a transition at the
cloud's step size and one whose step size follows the state): their distribution must
not drift (the kernel leaves p invariant), and the correlation of v with its start says
how far the moves carry a particle in v.

Run:  python benchmarks/smc_funnel_steps.py        (about 10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from examples_loader import load_example
import jax
import jax.numpy as jnp
from jax.scipy.stats import norm
import numpy as np
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
from recording import versions

from numpyro_iwae.maths.ais import hmc_transition
from numpyro_iwae.maths.smc import LOCAL_SPREAD, tempered_smc

HERE = Path(__file__).resolve().parent
#: The quadrature grid in v: the tempered targets' mass lies well inside it.
GRID = np.linspace(-80.0, 80.0, 400_001)


def exact_log_z(beta: float, guide: dict) -> float:
    """log of the normalizing constant of q^(1 - beta) p^beta (q normalized, p the funnel)."""
    a, b = 1.0 - beta, beta
    mv, sv, mx, sx = guide["v_loc"], guide["v_scale"], guide["x_loc"], guide["x_scale"]
    v = GRID
    log_v = a * norm_logpdf(v, mv, sv) + b * norm_logpdf(v, 0.0, 3.0)
    var = np.exp(v)[:, None]  # x_i | v ~ N(0, e^v)
    precision = a / sx**2 + b / var
    mean = (a * mx / sx**2) / precision
    log_x = (
        -0.5 * a * np.log(2 * np.pi * sx**2)
        - 0.5 * b * np.log(2 * np.pi * var)
        + 0.5 * np.log(2 * np.pi / precision)
        - 0.5 * (a * mx**2 / sx**2 - precision * mean**2)
    )
    f = log_v + log_x.sum(axis=1)
    top = f.max()
    return float(top + np.log(np.trapezoid(np.exp(f - top), v)))


def norm_logpdf(x: np.ndarray, loc: float, scale: float) -> np.ndarray:
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)


def element_sum(tree: dict) -> jax.Array:
    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))


def element_expand(a: jax.Array, tree: dict) -> dict:
    return jax.tree.map(lambda leaf: jnp.broadcast_to(a, leaf.shape), tree)


def funnel_log_p(u: dict) -> jax.Array:
    return norm.logpdf(u["v"], 0.0, 3.0) + jnp.sum(norm.logpdf(u["x"], 0.0, jnp.exp(u["v"] / 2)))


def increments(args, guide: dict) -> dict:
    g = {k: jnp.asarray(v, jnp.float32) for k, v in guide.items()}

    def densities(u: dict) -> tuple[jax.Array, jax.Array]:
        log_q = norm.logpdf(u["v"], g["v_loc"], g["v_scale"]) + jnp.sum(
            norm.logpdf(u["x"], g["x_loc"], g["x_scale"])
        )
        return log_q, funnel_log_p(u)

    def noncentred_densities(w: dict) -> tuple[jax.Array, jax.Array]:
        # The state holds x / exp(v / 2); both densities gain the Jacobian 9 v / 2.
        log_q, log_p = densities({"v": w["v"], "x": jnp.exp(w["v"] / 2) * w["x"]})
        return log_q + 4.5 * w["v"], log_p + 4.5 * w["v"]

    @jax.jit
    def run(key: jax.Array):
        kv, kx, k = jax.random.split(key, 3)
        u0 = {
            "v": g["v_loc"] + g["v_scale"] * jax.random.normal(kv, (args.particles,)),
            "x": g["x_loc"] + g["x_scale"] * jax.random.normal(kx, (args.particles, 9)),
        }
        if args.noncentred:
            u0 = {"v": u0["v"], "x": u0["x"] * jnp.exp(-u0["v"] / 2)[:, None]}
        return tempered_smc(
            k,
            u0,
            noncentred_densities if args.noncentred else densities,
            element_sum,
            element_expand,
            target_ess=args.target_ess,
            num_moves=args.moves,
            num_leapfrog=args.leapfrog,
        )

    cache: dict[float, float] = {}

    def log_z_at(beta: float) -> float:
        if beta not in cache:
            cache[beta] = exact_log_z(beta, guide)
        return cache[beta]

    runs = []
    for seed in range(args.runs):
        result = run(jax.random.key(seed))
        steps = int(result.schedule.num_steps)
        betas = np.concatenate([[0.0], np.asarray(result.schedule.betas[:steps], np.float64)])
        got = np.asarray(result.log_increments[:steps], np.float64)
        exact = np.array([log_z_at(b1) - log_z_at(b0) for b0, b1 in zip(betas[:-1], betas[1:])])
        error = np.cumsum(got - exact)
        # The cumulative error where 1 - beta first falls below each mark.
        marks = {}
        for gap in (1e-1, 1e-2, 1e-3, 1e-4, 0.0):
            at = int(np.argmax(1.0 - betas[1:] <= gap))
            marks[f"1-beta<={gap:g}"] = float(error[at])
        w = np.exp(np.asarray(result.log_w, np.float64))
        v = np.asarray(result.u["v"], np.float64)  # v is held as it is either way
        row = {
            "seed": seed,
            "log_z": float(result.log_z),
            "stderr": float(np.sqrt(result.relative_variance)),
            "steps": steps,
            "cumulative_error": marks,
            "final_p_v_above_4": float(np.sum(w * (v > 4))),
            "final_p_v_below_-4": float(np.sum(w * (v < -4))),
        }
        runs.append(row)
        print(
            f"run {seed}: log Z {row['log_z']:+.4f} ± {row['stderr']:.4f}  {steps} steps  "
            "error accrued by "
            + ", ".join(f"{k} {e:+.4f}" for k, e in marks.items())
            + f"  P(v>4) {row['final_p_v_above_4']:.4f} (exact 0.0912)",
            flush=True,
        )
    return {"runs": runs}


def mixing(args) -> dict:
    """Exact funnel draws moved by SMC-style sweeps at beta = 1."""
    n = args.mixing_draws
    kv, kx, km = jax.random.split(jax.random.key(100), 3)
    v = 3.0 * jax.random.normal(kv, (n,))
    u = {"v": v, "x": jnp.exp(v / 2)[:, None] * jax.random.normal(kx, (n, 9))}
    scale = jax.tree.map(lambda leaf: jnp.std(leaf, axis=0), u)

    def log_p(w: dict) -> jax.Array:
        return funnel_log_p(jax.tree.map(jnp.multiply, w, scale))

    @jax.jit
    def sweep(w: dict, key: jax.Array) -> tuple[dict, jax.Array]:
        accepts = []
        for k, spread in zip(jax.random.split(key), (None, LOCAL_SPREAD)):
            w, a = jax.vmap(
                lambda kk, ww, spread=spread: hmc_transition(
                    kk,
                    ww,
                    log_p,
                    jnp.asarray(args.mixing_step),
                    args.leapfrog,
                    element_sum,
                    element_expand,
                    spread,
                )
            )(jax.random.split(k, n), w)
            accepts.append(jnp.mean(a))
        return w, jnp.stack(accepts)

    # Statistics of v with their exact values and standard errors over n exact draws.
    tails = [("P(v>4)", 4.0, 0.0912), ("P(v<-4)", -4.0, 0.0912), ("P(v>6)", 6.0, 0.0228)]

    def stats(v: jax.Array) -> dict:
        out = {"mean v": (float(jnp.mean(v)), 0.0, 3 / math.sqrt(n))}
        out["E v^2"] = (float(jnp.mean(v**2)), 9.0, 9 * math.sqrt(2 / n))
        for name, cut, p in tails:
            frac = jnp.mean(v > cut) if cut > 0 else jnp.mean(v < cut)
            out[name] = (float(frac), p, math.sqrt(p * (1 - p) / n))
        return out

    w = jax.tree.map(jnp.divide, u, scale)
    rows = []
    keys = jax.random.split(km, args.mixing_sweeps)
    for i in range(args.mixing_sweeps):
        w, accept = sweep(w, keys[i])
        if (i + 1) % args.mixing_every == 0:
            v_now = w["v"] * scale["v"]
            row = {
                "sweeps": i + 1,
                "acceptance": np.asarray(accept).round(3).tolist(),
                "corr_v_with_start": float(jnp.corrcoef(v, v_now)[0, 1]),
                "z": {k: (s - e) / d for k, (s, e, d) in stats(v_now).items()},
            }
            rows.append(row)
            print(
                f"{row['sweeps']:4d} sweeps: corr(v, v_0) {row['corr_v_with_start']:.3f}  z "
                + " ".join(f"{k} {z:+.2f}" for k, z in row["z"].items()),
                flush=True,
            )
    start = {k: (s - e) / d for k, (s, e, d) in stats(v).items()}
    return {"start_z": start, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--fit-steps", type=int, default=3000)
    parser.add_argument("--particles", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--moves", type=int, default=10, help="sweeps per temperature")
    parser.add_argument("--leapfrog", type=int, default=30)
    parser.add_argument("--target-ess", type=float, default=0.99)
    parser.add_argument(
        "--noncentred", action="store_true", help="the SMC runs on (v, x / exp(v / 2))"
    )
    parser.add_argument("--mixing-draws", type=int, default=20_000)
    parser.add_argument("--mixing-sweeps", type=int, default=300)
    parser.add_argument("--mixing-every", type=int, default=50)
    parser.add_argument("--mixing-step", type=float, default=0.1, help="the runs' final step size")
    parser.add_argument("--skip-mixing", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "smc_funnel_steps.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    funnel = load_example("funnel").funnel
    guide = AutoNormal(funnel)
    svi = SVI(funnel, guide, optax.adam(5e-3), Trace_ELBO())
    params = svi.run(jax.random.key(0), args.fit_steps, progress_bar=False).params
    fitted = {
        f"{site}_{part}": np.asarray(params[f"{site}_auto_{part}"], np.float64)
        for site in ("v", "x")
        for part in ("loc", "scale")
    }
    print(f"exact log Z at beta = 1 by quadrature: {exact_log_z(1.0, fitted):+.2e}")
    result = {
        "load_average": load,
        "versions": versions(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "guide": {k: v.tolist() for k, v in fitted.items()},
        "increments": increments(args, fitted),
        "mixing": None if args.skip_mixing else mixing(args),
    }
    print(f"load average at start {load:.2f}")
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
