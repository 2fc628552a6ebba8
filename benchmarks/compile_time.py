"""Compile time of IWELBO's SVI step against NumPyro's RenyiELBO(alpha=0).

Neal's funnel (10-D) with an AutoNormal guide, as in ``step_time.py``: a 100-step
chunk of SVI updates inside one jitted ``lax.scan`` is traced, lowered and compiled
from a fresh ``SVI`` each time (nothing cached: a new Python function per repeat),
IWELBO and RenyiELBO alternating which goes first. Reported per K: the median over
repeats of each part (tracing to a jaxpr, lowering to StableHLO, XLA's compilation)
and of the total, and the median of the per-repeat ratio of totals with its
interquartile range and the share of repeats IWELBO compiled faster, in wall-clock
time and in the process's CPU time (which leaves out time the shared machine's other
tenants take). The number of instructions in the optimized HLO is given beside it.

Run:  python benchmarks/compile_time.py             (writes compile_time.json)
      python benchmarks/compile_time.py --repeats 3 --ks 10
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import time

import jax
from numpyro.infer import SVI, RenyiELBO
from numpyro.infer.autoguide import AutoNormal
import optax
from recording import new_record, save_record
from step_time import funnel

from numpyro_iwae import IWELBO

HERE = Path(__file__).resolve().parent
OBJECTIVES = {
    "iwelbo": lambda k: IWELBO(k),
    "renyi": lambda k: RenyiELBO(alpha=0, num_particles=k),
}


def compile_once(objective, steps: int = 100) -> dict:
    """Seconds to trace, lower and compile a fresh ``steps``-step SVI chunk."""
    svi = SVI(funnel, AutoNormal(funnel), optax.adam(1e-3), objective)
    state = svi.init(jax.random.key(0))

    def chunk(state):
        return jax.lax.scan(lambda s, _: svi.update(s), state, None, length=steps)

    c0, t0 = time.process_time(), time.perf_counter()
    traced = jax.jit(chunk).trace(state)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    c3, t3 = time.process_time(), time.perf_counter()
    text = compiled.as_text()
    instructions = sum(1 for line in text.splitlines() if " = " in line)
    return {
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "xla_s": t3 - t2,
        "total_s": t3 - t0,
        "cpu_s": c3 - c0,
        "instructions": instructions,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--out", type=Path, default=HERE / "compile_time.json")
    args = parser.parse_args(argv)
    result = new_record()
    for k in args.ks:
        runs = {name: [] for name in OBJECTIVES}
        for r in range(args.repeats):
            names = list(OBJECTIVES) if r % 2 == 0 else list(OBJECTIVES)[::-1]
            for name in names:
                runs[name].append(compile_once(OBJECTIVES[name](k)))
        row = {"k": k, "repeats": args.repeats}
        for name, samples in runs.items():
            for part in ("trace_s", "lower_s", "xla_s", "total_s", "cpu_s"):
                row[f"{name}_{part}"] = statistics.median(s[part] for s in samples)
            row[f"{name}_instructions"] = samples[0]["instructions"]
        for prefix, part in (("ratio", "total_s"), ("cpu_ratio", "cpu_s")):
            ratios = [a[part] / b[part] for a, b in zip(runs["iwelbo"], runs["renyi"])]
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            row[f"{prefix}_median"] = statistics.median(ratios)
            row[f"{prefix}_iqr"] = [quartiles[0], quartiles[2]]
            row[f"{prefix}_iwelbo_faster"] = sum(r < 1 for r in ratios) / len(ratios)
        result["rows"].append(row)
        print(
            f"K={k:<5} IWELBO {row['iwelbo_total_s']:.2f} s "
            f"({row['iwelbo_trace_s']:.2f} + {row['iwelbo_lower_s']:.2f} + "
            f"{row['iwelbo_xla_s']:.2f}; {row['iwelbo_instructions']} instructions)  "
            f"RenyiELBO {row['renyi_total_s']:.2f} s ({row['renyi_trace_s']:.2f} + "
            f"{row['renyi_lower_s']:.2f} + {row['renyi_xla_s']:.2f}; "
            f"{row['renyi_instructions']})  ratio {row['ratio_median']:.3f} "
            f"(IQR {row['ratio_iqr'][0]:.3f}-{row['ratio_iqr'][1]:.3f}, IWELBO faster in "
            f"{row['ratio_iwelbo_faster']:.0%}; process CPU time: "
            f"{row['cpu_ratio_median']:.3f}, IQR {row['cpu_ratio_iqr'][0]:.3f}-"
            f"{row['cpu_ratio_iqr'][1]:.3f})",
            flush=True,
        )
    return save_record(result, args.out)


if __name__ == "__main__":
    main()
