"""Why Equinox's VAE step trails the hand-written one: the decoder's gradient on all
K x B particles as one (K B, d) matrix (the hand-written step) against a vmap over the K
particles of (B, d) batches (as NumPyro's particle vmap presents them), per network.

Run:  python benchmarks/network_layout.py     (writes benchmarks/network_layout.json)
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import time

import jax
import jax.numpy as jnp
from recording import new_record, save_record
from step_time import PIXELS, vae_example

HERE = Path(__file__).resolve().parent


def median_ms(fn, arg, repeats: int) -> float:
    jax.block_until_ready(fn(arg))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "network_layout.json")
    args = parser.parse_args(argv)
    arch = vae_example.ARCHITECTURES[1]
    z = jax.random.normal(jax.random.key(0), (args.k, args.batch, arch.latents[0]))
    result = new_record()
    for kind in ("nnx", "eqx", "stax"):
        nets = vae_example.networks(arch, kind)
        params = vae_example.fresh_params(*vae_example.make_vae(arch, kind))

        def decoder(p, z, nets=nets):
            return vae_example.apply_network(nets, p, "decoder0", z)

        def flat(p, decoder=decoder):
            return jnp.sum(decoder(p, z.reshape(-1, z.shape[-1])) ** 2)

        def per_particle(p, decoder=decoder):
            return jnp.sum(jax.vmap(lambda zk: decoder(p, zk))(z) ** 2)

        row = {"network": kind, "k": args.k, "batch": args.batch, "pixels": PIXELS}
        for name, fn in (("flat_ms", flat), ("vmapped_ms", per_particle)):
            row[name] = median_ms(jax.jit(jax.grad(fn)), params, args.repeats)
        row["ratio"] = row["vmapped_ms"] / row["flat_ms"]
        result["rows"].append(row)
        print(
            f"{kind:4}: one (K B, d) matrix {row['flat_ms']:.3f} ms, vmap over K "
            f"{row['vmapped_ms']:.3f} ms ({row['ratio']:.2f}x)",
            flush=True,
        )
    return save_record(result, args.out)


if __name__ == "__main__":
    main()
