"""Cost of the zero-weight guard on the VAE step (issue 10, item 9's bar: <= 5%).

IWELBO's SVI step on Burda et al.'s VAEs (as in ``step_time.py``: random binary
images, random initial weights) with the guard (``weights.zero_weight_safe``) against
the same step with the guard replaced by the identity while the step is traced
(``step_time.without_guard``), both compiled in one process. Each round times a short
chunk of steps (about ``--round-seconds``) of each, in alternating order; reported per
configuration: the median of the per-round ratio with its interquartile range, and
the ratio of the two 10th-percentile times (noise only adds time, so the fastest
rounds compare the computations).

Run:  python benchmarks/guard_cost.py                (writes guard_cost.json)
      python benchmarks/guard_cost.py --rounds 30 --layers 1 --batches 20 --ks 5
"""

from __future__ import annotations

import argparse
from pathlib import Path
import time

import jax
import jax.numpy as jnp
import numpy as np
from recording import new_record, save_record
from step_time import PIXELS, svi_stepper, vae_example, without_guard

from numpyro_iwae import IWELBO

HERE = Path(__file__).resolve().parent


def guard_ratio(layers: int, batch: int, k: int, rounds: int, round_s: float) -> dict:
    model, guide = vae_example.make_vae(vae_example.ARCHITECTURES[layers])
    x = (jax.random.uniform(jax.random.key(1), (batch, PIXELS)) < 0.3).astype(jnp.float32)
    steppers = {
        "guard": svi_stepper(model, guide, IWELBO(k), x),
        "no_guard": without_guard(svi_stepper(model, guide, IWELBO(k), x)),
    }
    probe = steppers["guard"]
    probe.run(2)
    start = time.perf_counter()
    probe.run(2)
    steps = max(1, round(round_s / ((time.perf_counter() - start) / 2)))
    for stepper in steppers.values():
        stepper.run(steps)  # compile the timed chunk length
    times = {name: [] for name in steppers}
    for r in range(rounds):
        for name in list(steppers)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            steppers[name].run(steps)
            times[name].append((time.perf_counter() - start) / steps)
    guard, bare = np.array(times["guard"]), np.array(times["no_guard"])
    ratios = guard / bare
    return {
        "layers": layers,
        "batch": batch,
        "k": k,
        "steps_per_round": steps,
        "guard_ms": float(np.median(guard) * 1e3),
        "no_guard_ms": float(np.median(bare) * 1e3),
        "ratio_median": float(np.median(ratios)),
        "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
        "ratio_p10": float(np.percentile(guard, 10) / np.percentile(bare, 10)),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--round-seconds", type=float, default=0.03)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--out", type=Path, default=HERE / "guard_cost.json")
    args = parser.parse_args(argv)
    result = new_record()
    for layers in args.layers:
        for batch in args.batches:
            for k in args.ks:
                row = guard_ratio(layers, batch, k, args.rounds, args.round_seconds)
                result["rows"].append(row)
                print(
                    f"layers {layers} batch {batch:<4} K={k:<3} guard {row['guard_ms']:.3f} ms, "
                    f"without {row['no_guard_ms']:.3f} ms: ratio {row['ratio_median']:.3f} "
                    f"(IQR {row['ratio_iqr'][0]:.3f}-{row['ratio_iqr'][1]:.3f}; "
                    f"10th percentiles {row['ratio_p10']:.3f})",
                    flush=True,
                )
    return save_record(result, args.out)


if __name__ == "__main__":
    main()
