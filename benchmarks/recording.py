"""The record a benchmark writes: the machine's load around the run, the device,
the rows, saved as JSON beside the script."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax


def new_record() -> dict:
    """An empty record with the load average before the run (printed)."""
    record = {"load_before": os.getloadavg()[0], "device": str(jax.devices()[0]), "rows": []}
    print(f"load average before: {record['load_before']:.2f}", flush=True)
    return record


def versions() -> dict:
    """The Python, JAX and NumPyro versions a benchmark ran on."""
    import platform

    import numpyro

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
    }


def save_record(record: dict, path: Path) -> dict:
    """Add the load average after the run and write ``record`` to ``path``."""
    record["load_after"] = os.getloadavg()[0]
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return record
