"""Scaling over devices: MarginalLikelihood (K = 5000) and the VAE step (IWELBO, K = 50)
with 1, 2 and 8 devices.

Each device count runs in its own process (XLA fixes the host device count when JAX
starts: XLA_FLAGS=--xla_force_host_platform_device_count=D on a CPU machine; on a GPU
machine the real devices, up to D). The network is the IWAE paper's 784-200-200-50 VAE
(random weights, synthetic binary data):

- evaluation: log p(x) of N datapoints with K = 5000 particles, the data placed with a
  NamedSharding over the plate's axis (data parallelism), the chunk chosen by the memory
  budget per device; and the same with the particles of each chunk split by
  shard_particles (particle parallelism);
- training: one jitted SVI step of IWELBO(50) on a batch of 96 (divisible by 8),
  particles split by shard_particles, and data split by a sharded batch.

Every row reports the estimate or loss, so equality across device counts is visible, the
time (median of 3 evaluations or 30 steps after a compiling call), the process's peak
resident memory, and XLA's temporary memory per device of the compiled evaluation at a
fixed chunk.

On a CPU machine the host devices share its cores: with 2 cores, 8 devices cannot be
faster than 2, and memory is one process's for all devices. What it shows there is
that the numbers agree, that the chunk grows with the devices under a per-device
budget, and what splitting costs.

Run:  python benchmarks/scaling.py            (about 2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

from burda_vae import child_env

HERE = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from numpyro.infer import SVI
    import optax
    from burda_vae import build
    from numpyro_iwae import IWELBO, MarginalLikelihood, shard_particles

    devices, n, k, repeats = (int(a) for a in sys.argv[1:5])
    budget = int(sys.argv[5])
    assert len(jax.devices()) >= devices, jax.devices()
    mesh = Mesh(np.array(jax.devices()[:devices]), ("d",))

    model, guide, params, _, _ = build()

    rng = np.random.default_rng(0)
    x = jnp.asarray((rng.random((n, 784)) < 0.2).astype(np.float32))
    on_mesh = NamedSharding(mesh, P("d"))
    x_split = jax.device_put(x, on_mesh)

    def timed(fn, repeats=repeats):
        out = fn()
        jax.block_until_ready(out)  # compiles
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t)
        return out, float(np.median(times))

    rows = []
    for mode in ("data", "particles"):
        vec = shard_particles(mesh) if mode == "particles" else True
        data = x_split if mode == "data" else x
        ml = MarginalLikelihood(
            model, guide, params=params, num_particles=k, memory_budget=budget,
            vectorize_particles=vec,
        )
        est, seconds = timed(lambda: ml(jax.random.key(0), data))
        rows.append({
            "task": "evaluate", "mode": mode, "devices": devices, "n": n, "k": k,
            "log_marginal": float(est.log_marginal), "seconds": seconds,
            "chunk": ml.chunk_size_used,
            "points_per_s": n / seconds,
        })

    # Per-device memory of the compiled evaluation at a fixed chunk of 100 particles:
    # XLA's own accounting of the SPMD program each device runs.
    for mode in ("data", "particles"):
        vec = shard_particles(mesh) if mode == "particles" else True
        data = x_split if mode == "data" else x
        ml = MarginalLikelihood(
            model, guide, params=params, num_particles=k, chunk_size=100,
            vectorize_particles=vec,
        )
        compiled = ml.lower(jax.random.key(0), data).compile()
        memory = compiled.memory_analysis()
        rows.append({
            "task": "memory", "mode": mode, "devices": devices, "n": n, "k": k, "chunk": 100,
            "temp_mib_per_device": memory.temp_size_in_bytes / 2**20,
            "seconds": float("nan"),
        })

    batch = x[:96]  # divisible by 1, 2 and 8 devices
    for mode in ("particles", "data"):
        vec = shard_particles(mesh) if mode == "particles" else True
        data = batch if mode == "particles" else jax.device_put(batch, on_mesh)
        svi = SVI(model, guide, optax.adam(1e-3), IWELBO(50, vectorize_particles=vec))
        state = svi.init(jax.random.key(0), data)
        update = jax.jit(svi.update)
        (state2, loss), seconds = timed(lambda: update(state, data), 10 * repeats)
        rows.append({
            "task": "step", "mode": mode, "devices": devices, "batch": 96, "k": 50,
            "loss": float(loss), "seconds": seconds,
        })
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 2**20
    for row in rows:
        row["peak_rss_gib"] = peak
    print("ROWS", json.dumps(rows))
    """
)


def run(devices: int, n: int, k: int, repeats: int, budget: int, gpu: bool) -> list[dict]:
    env = child_env()
    if not gpu:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    args = [sys.executable, "-c", CHILD, str(devices), str(n), str(k), str(repeats), str(budget)]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-4000:])
    line = next(r for r in out.stdout.splitlines() if r.startswith("ROWS "))
    return json.loads(line[5:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--n", type=int, default=200, help="datapoints evaluated")
    parser.add_argument("--k", type=int, default=5000, help="evaluation particles")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--budget", type=int, default=2**28, help="memory budget per device (bytes)"
    )
    parser.add_argument("--gpu", action="store_true", help="use the machine's own devices")
    parser.add_argument("--out", type=Path, default=HERE / "scaling.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    rows = []
    for d in args.devices:
        rows += run(d, args.n, args.k, args.repeats, args.budget, args.gpu)
    print(f"load average at start {load:.2f}")
    header = ("task", "mode", "devices", "value", "seconds", "chunk", "RSS GiB", "temp MiB/dev")
    widths = (-9, -10, 8, 14, 9, 7, 9, 13)
    print("".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths)))
    for r in rows:
        value = r.get("log_marginal", r.get("loss", float("nan")))
        chunk = r.get("chunk", "")
        temp = r.get("temp_mib_per_device", float("nan"))
        print(
            f"{r['task']:<9}{r['mode']:<10}{r['devices']:>8}{value:>14.3f}{r['seconds']:>9.3f}"
            f"{chunk!s:>7}{r['peak_rss_gib']:>9.2f}{temp:>13.1f}"
        )
    result = {"load_average": load, "config": {k: str(v) for k, v in vars(args).items()}}
    result["rows"] = rows
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
