"""The README's first command: examples/funnel.py runs and reports bounds <= log Z = 0."""

import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_funnel_example_smoke(tmp_path, capsys):
    funnel = load("funnel")
    argv = ["--steps", "300", "--train-k", "1", "5", "--eval-k", "1", "10"]
    argv += ["--eval-particles", "2000", "--no-progress", "--out", str(tmp_path)]
    result = funnel.main(argv)
    saved = json.loads((tmp_path / "funnel.json").read_text())
    assert saved["log_z"] == 0.0 and len(saved["fits"]) == 2
    for fit in result["fits"]:
        for mean, stderr in fit["bounds"].values():
            assert mean <= 4 * stderr  # a lower bound on log Z = 0
    assert "bound K=10" in capsys.readouterr().out
