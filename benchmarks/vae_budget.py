"""The IWAE paper's MNIST table at an equal CPU budget: examples/vae.py, eight fits.

VAE (ELBO, K = 1), IWAE K = 5, IWAE K = 50 and IWAE-DReG K = 50, with one and two
stochastic layers, each trained for the same wall-clock minutes on this machine
(Burda et al.'s learning-rate schedule, batch 20, statically binarized MNIST) and
scored with K = 5000 particles on the whole test set. Every fit runs in its own
process, one after another (nothing else should run meanwhile: the budget is
wall-clock time), and writes its JSON, PNGs and parameters into --out; a fit whose
JSON is already there is not rerun, so an interrupted run resumes. The table in
benchmarks/vae_results.md (between the markers) is rebuilt from the JSON files.

With --equal-epochs, VAE and IWAE-5 are also retrained (into --out/equal_epochs) for
as many epochs as IWAE-50 reached, so the table can be read at equal epochs too.
With --convergence, every fit's bound is computed for K = 1, 5, 50, 500, 5000 on
1000 test images, to show how far the K = 5000 estimate has converged.

Run:  python benchmarks/vae_budget.py --minutes 5            (about 75 minutes, 2 cores)
      python benchmarks/vae_budget.py --equal-epochs --convergence   (about 25 more)
      python benchmarks/vae_budget.py --report-only          (rebuild the table)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import subprocess
import sys

from examples_loader import load_example
import jax
import numpy as np

from numpyro_iwae import MarginalLikelihood
from numpyro_iwae.maths.bounds import iwae_bound

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: (label, objective, K) in the order of Burda et al.'s table.
OBJECTIVES = [
    ("VAE", "elbo", 1),
    ("IWAE-5", "iwae", 5),
    ("IWAE-50", "iwae", 50),
    ("IWAE-50-DReG", "dreg", 50),
]
#: Burda et al. 2016, Table 1 (3280 epochs, dynamic binarization): test NLL in nats.
BURDA = {
    (1, "VAE"): 86.76,
    (1, "IWAE-5"): 85.54,
    (1, "IWAE-50"): 84.78,
    (2, "VAE"): 85.33,
    (2, "IWAE-5"): 83.89,
    (2, "IWAE-50"): 82.90,
}
#: A public TF2 reproduction of IWAE vs IWAE-DReG, K = 50, one layer.
REPRODUCTION = {(1, "IWAE-50"): 84.59, (1, "IWAE-50-DReG"): 84.32}
#: Particle counts of the convergence check.
CONVERGENCE_KS = (1, 5, 50, 500, 5000)
BEGIN, END = "<!-- vae_budget:begin -->", "<!-- vae_budget:end -->"


def tag(layers: int, objective: str, k: int, binarization: str, network: str) -> str:
    network = load_example("vae").network_tag(network)
    return f"vae_l{layers}{network}_{objective}_k{k}_{binarization}"


def fit(args: argparse.Namespace, layers: int, objective: str, k: int, out: Path, budget: list):
    """Run examples/vae.py for one fit in its own process, unless its JSON exists."""
    name = tag(layers, objective, k, args.binarization, args.network)
    if (out / f"{name}.json").exists():
        print(f"{out / name}: already done")
        return
    cmd = [sys.executable, str(ROOT / "examples" / "vae.py"), "--data", str(args.data)]
    cmd += ["--layers", str(layers), "--objective", objective, "--k", str(k), *budget]
    cmd += ["--binarization", args.binarization, "--network", args.network]
    cmd += ["--out", str(out), "--no-progress"]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def run_all(args: argparse.Namespace) -> None:
    """Every objective for --minutes; then, for equal epochs, the cheap objectives for
    as many epochs as IWAE-50 reached in its minutes."""
    for layers in args.layers:
        for _, objective, k in OBJECTIVES:
            fit(args, layers, objective, k, args.out, ["--minutes", str(args.minutes)])
    if args.equal_epochs:
        for layers in args.layers:
            epochs = load(args.out, layers, "IWAE-50", args.binarization, args.network)["epochs"]
            for _, objective, k in OBJECTIVES[:2]:
                fit(
                    args, layers, objective, k, args.out / "equal_epochs", ["--epochs", str(epochs)]
                )


def convergence(out: Path, data: Path, binarization: str, images: int = 1000) -> None:
    """The K-particle bound for K = 1 .. 5000 on ``images`` evenly spaced test images,
    from groups of K of one K = 5000 evaluation, for every fit in ``out``: how far
    the K = 5000 estimate has converged (writes ``<tag>_convergence.json``)."""
    vae = load_example("vae")
    test = vae.load_mnist(data, binarization).test
    x = jax.numpy.asarray(test[np.linspace(0, len(test) - 1, images).astype(int)])
    for path in sorted(out.glob("vae_l*_static.json")) + sorted(out.glob("vae_l*_dynamic.json")):
        target = out / f"{path.stem}_convergence.json"
        if target.exists():
            continue
        r = json.loads(path.read_text())
        arch = vae.ARCHITECTURES[int(path.stem.split("_")[1][1:])]
        model, guide = vae.make_vae(arch, vae.network_of(path))
        params = vae.load_params(out / f"{path.stem}_params.npz", vae.fresh_params(model, guide))
        ml = MarginalLikelihood(
            model, guide, params=params, num_particles=5000, return_log_weights=True
        )
        log_w = jax.jit(ml)(jax.random.key(1), x).log_weights
        bounds = {}
        for k in CONVERGENCE_KS:
            groups = log_w[: (5000 // k) * k].reshape(-1, k, images).swapaxes(0, 1)
            bounds[str(k)] = float(iwae_bound(groups).mean())
        target.write_text(json.dumps({"tag": r["tag"], "images": images, "bounds": bounds}))
        print(f"{path.stem}: " + ", ".join(f"L_{k} = {v:.2f}" for k, v in bounds.items()))


def load(out: Path, layers: int, label: str, binarization: str, network: str) -> dict | None:
    """The JSON of one fit, or None when it has not run."""
    _, objective, k = next(o for o in OBJECTIVES if o[0] == label)
    path = out / f"{tag(layers, objective, k, binarization, network)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def row(r: dict, layers: int, label: str, k: int) -> str:
    ref = BURDA.get((layers, label))
    ref = f"{ref:.2f}" if ref else "-"
    if (layers, label) in REPRODUCTION:
        ref += f" (reproduction: {REPRODUCTION[(layers, label)]:.2f})"
    b = r["test_bounds"]
    return (
        f"| {layers} | {label} | {r['epochs']} | {r['train_minutes']:.1f} "
        f"| **{r['test_nll']:.2f}** ± {r['test_nll_stderr']:.3f} | {-b['L_1']:.2f} "
        f"| {-b[f'L_{k}']:.2f} | {'/'.join(map(str, r['active_units']))} "
        f"| {r['k_hat_above_0.7']:.3f} | {ref} |"
    )


HEADER = [
    "| layers | objective | epochs | train min | test NLL (K = 5000) ± s.e. | test -ELBO "
    "| test -L_K | active units | share k-hat > 0.7 | Burda et al. (3280 epochs) |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def table(out: Path, binarization: str, network: str) -> str:
    """Markdown tables: equal minutes, then equal epochs where those fits exist."""
    minutes = list(HEADER)
    epochs = list(HEADER)
    for layers in (1, 2):
        for label, _, k in OBJECTIVES:
            r = load(out, layers, label, binarization, network)
            if r is not None:
                minutes.append(row(r, layers, label, k))
            if label in ("VAE", "IWAE-5"):
                r = load(out / "equal_epochs", layers, label, binarization, network)
            if r is not None:
                epochs.append(row(r, layers, label, k))
    text = "Equal training time (wall clock, compilation included):\n\n" + "\n".join(minutes)
    if len(epochs) > len(HEADER):
        text += "\n\nEqual epochs (VAE and IWAE-5 retrained for as many epochs as IWAE-50 "
        text += "reached in its minutes):\n\n" + "\n".join(epochs)
    conv = [
        "| fit | " + " | ".join(f"-L_{k}" for k in CONVERGENCE_KS) + " |",
        "|---|" + "---|" * len(CONVERGENCE_KS),
    ]
    for folder, note in ((out, ""), (out / "equal_epochs", ", equal epochs")):
        for path in sorted(folder.glob("vae_l*_convergence.json")):
            if load_example("vae").network_of(path) != network:
                continue
            c = json.loads(path.read_text())
            cells = " | ".join(f"{-c['bounds'][str(k)]:.2f}" for k in CONVERGENCE_KS)
            conv.append(f"| {c['tag']}{note} | {cells} |")
    if len(conv) > 2:
        text += (
            "\n\nConvergence in K on 1000 evenly spaced test images (groups of K of one "
            "K = 5000 evaluation; -L_5000 is the NLL estimate on those images):\n\n"
            + "\n".join(conv)
        )
    return text + "\n"


def write_table(out: Path, binarization: str, network: str, path: Path) -> bool:
    """Replace the generated block of ``path`` with the tables of ``network``'s fits;
    with none of them in ``out``, leave ``path`` as it is and return False."""
    if not any(load(out, n, o[0], binarization, network) for n in (1, 2) for o in OBJECTIVES):
        return False
    text = path.read_text() if path.exists() else f"{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table(out, binarization, network)}{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per fit")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--binarization", choices=("static", "dynamic"), default="static")
    parser.add_argument(
        "--network",
        choices=load_example("vae").NETWORKS,
        default="nnx",
        help="vae.py's --network (the recorded tables are stax fits, from before NNX)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "vae")
    parser.add_argument("--results-md", type=Path, default=HERE / "vae_results.md")
    parser.add_argument("--report-only", action="store_true", help="do not train")
    parser.add_argument(
        "--convergence",
        action="store_true",
        help="bound against K up to 5000 on 1000 test images, for every fit done",
    )
    parser.add_argument(
        "--equal-epochs",
        action="store_true",
        help="also retrain VAE and IWAE-5 for as many epochs as IWAE-50 reached",
    )
    args = parser.parse_args(argv)
    if not args.report_only:
        run_all(args)
    if args.convergence:
        for folder in (args.out, args.out / "equal_epochs"):
            if folder.is_dir():
                convergence(folder, args.data, args.binarization)
    if write_table(args.out, args.binarization, args.network, args.results_md):
        print(f"updated {args.results_md}")
    else:
        print(f"no {args.network} fits in {args.out}: {args.results_md} left as it is")


if __name__ == "__main__":
    main()
