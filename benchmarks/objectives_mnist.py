"""Rainforth et al.'s MNIST table at an equal CPU budget: IWAE, PIWAE, MIWAE, CIWAE
and the VAE, each given 64 particles per image and the same minutes of training.

Tighter Variational Bounds are Not Necessarily Better (Rainforth, Kosiorek, Le,
Maddison, Igl, Wood & Teh, 2018, ICML) compare, on MNIST with Burda et al.'s
architecture: IWAE (K = 64), PIWAE (M = 8, K = 8), MIWAE (M = 8, K = 8), CIWAE
(beta = 0.5, K = 64) and the VAE (64 particles); columns IWAE-64 (the test bound
L_64), log p_hat (K = 5000) and their difference, an estimate of -KL(Q || P) that
says how good the inference network is. Each fit here is ``examples/vae.py`` (one
stochastic layer, batch 20, Burda et al.'s learning-rate schedule, statically
binarized MNIST, seed 0) trained for ``--minutes`` of wall-clock time, one after
another in its own process; scoring uses a seeded random subset of the test set.
A fit whose JSON exists is not rerun. The table goes to
benchmarks/objectives_mnist.md (between the markers).

Run:  python benchmarks/objectives_mnist.py --minutes 4 --test-size 2000   (about 30 min)
      python benchmarks/objectives_mnist.py --report-only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import subprocess
import sys

from examples_loader import load_example

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: (label, vae.py arguments, Rainforth et al.'s log p_hat on MNIST).
FITS = [
    ("IWAE (K = 64)", ["--objective", "iwae", "--k", "64"], -84.52),
    ("PIWAE (M = 8, K = 8)", ["--objective", "piwae", "--k", "8", "--replicates", "8"], -84.46),
    ("MIWAE (M = 8, K = 8)", ["--objective", "miwae", "--k", "8", "--replicates", "8"], -84.97),
    ("CIWAE (beta = 0.5, K = 64)", ["--objective", "ciwae", "--k", "64", "--beta", "0.5"], -85.24),
    ("VAE (64 particles)", ["--objective", "elbo", "--k", "64"], -86.21),
]
#: The fits' tags without the network (stax, the recorded table; vae.py's network_tag).
TAGS = [
    "iwae_k64_static",
    "piwae_k8_m8_static",
    "miwae_k8_m8_static",
    "ciwae_k64_b0.5_static",
    "elbo_k64_static",
]


def tags(network: str) -> list[str]:
    suffix = load_example("vae").network_tag(network)
    return [f"vae_l1{suffix}_{t}" for t in TAGS]


BEGIN, END = "<!-- objectives_mnist:begin -->", "<!-- objectives_mnist:end -->"


def run_fits(args: argparse.Namespace) -> None:
    for (label, extra, _), tag in zip(FITS, tags(args.network)):
        if (args.out / f"{tag}.json").exists():
            print(f"{label}: already done")
            continue
        cmd = [sys.executable, str(ROOT / "examples" / "vae.py"), "--data", str(args.data)]
        cmd += [*extra, "--minutes", str(args.minutes), "--test-size", str(args.test_size)]
        cmd += ["--bound-ks", "64", "--network", args.network]
        cmd += ["--out", str(args.out), "--no-progress"]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)


def table(out: Path, network: str) -> str:
    rows = [
        "| objective | epochs | train min | IWAE-64 (test L_64) | log p_hat (K = 5000) "
        "± s.e. | IWAE-64 - log p_hat | Rainforth et al. log p_hat |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, _, paper), tag in zip(FITS, tags(network)):
        path = out / f"{tag}.json"
        if not path.exists():
            rows.append(f"| {label} | not run | | | | | {paper} |")
            continue
        r = json.loads(path.read_text())
        l64, log_p = r["test_bounds"]["L_64"], -r["test_nll"]
        rows.append(
            f"| {label} | {r['epochs']} | {r['train_minutes']:.1f} | {l64:.2f} "
            f"| **{log_p:.2f}** ± {r['test_nll_stderr']:.3f} | {l64 - log_p:.2f} | {paper} |"
        )
    done = [out / f"{t}.json" for t in tags(network) if (out / f"{t}.json").exists()]
    first = json.loads(done[0].read_text()) if done else None
    if first is not None:
        rows.append("")
        rows.append(
            f"Scored on {first['test_images']} test images drawn at random (seeded); "
            "Rainforth et al.'s numbers are for the full protocol (3280 epochs, all 10,000)."
        )
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per fit")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument(
        "--network",
        choices=load_example("vae").NETWORKS,
        default="nnx",
        help="vae.py's --network (the recorded table is of stax fits, from before NNX)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "objectives_mnist")
    parser.add_argument("--results-md", type=Path, default=HERE / "objectives_mnist.md")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        run_fits(args)
    if not any((args.out / f"{t}.json").exists() for t in tags(args.network)):
        print(f"no {args.network} fits in {args.out}: {args.results_md} left as it is")
        return
    text = args.results_md.read_text() if args.results_md.exists() else f"{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.results_md.write_text(f"{head}{BEGIN}\n{table(args.out, args.network)}{END}{tail}")
    print(table(args.out, args.network))


if __name__ == "__main__":
    main()
