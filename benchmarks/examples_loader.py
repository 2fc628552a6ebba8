"""Load an example script (examples/NAME.py) as a module, so a benchmark runs the
example's own model and networks."""

from __future__ import annotations

import importlib.util
from pathlib import Path
import sys
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """``examples/{name}.py`` as a module (registered in ``sys.modules`` so that its
    dataclasses can find it)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
