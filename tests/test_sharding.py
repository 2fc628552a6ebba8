"""Particles and data split over devices: tests/multidevice/ run in a subprocess with 8
host devices (XLA fixes the device count when JAX starts)."""

import os
from pathlib import Path
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from numpyro_iwae import shard_particles

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_on_eight_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            str(HERE / "multidevice"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=HERE.parent,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout, result.stdout[-3000:]


def test_one_device_mesh_is_plain_vmap():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("particles",))
    sharded = shard_particles(mesh)
    out = sharded(lambda x: x * 2.0, np.arange(5.0))
    np.testing.assert_allclose(out, np.arange(5.0) * 2.0)
    assert sharded.padded(5) == 5 and "num_shards=1" in repr(sharded)
    with pytest.raises(ValueError, match="not an axis"):
        shard_particles(mesh, "data")


@pytest.mark.slow
def test_two_processes_on_localhost():
    # The multi-host recipe as far as one machine goes: two processes of 4 host devices
    # joined by jax.distributed.initialize into one 8-device mesh.
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    worker = str(HERE / "multidevice" / "two_process_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), port],
            env=env,
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
        line = next(row for row in out.splitlines() if row.startswith("RESULT"))
        _, processes, devices, loss, plain, grad_diff = line.split()
        assert (int(processes), int(devices)) == (2, 8)
        np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)
        assert float(grad_diff) < 1e-5
