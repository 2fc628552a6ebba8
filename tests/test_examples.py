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


def test_snr_example_smoke(tmp_path):
    snr = load("snr")
    argv = ["--ks", "1", "8", "--reps", "64", "--perturb", "0.05"]
    rows = snr.main(argv + ["--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "snr.png").stat().st_size > 0
    assert {r["estimator"] for r in rows} == {"reparam", "stl", "dreg"}
    # Same keys, same model gradient for every estimator.
    by_k = {(r["k"], r["estimator"]): r["snr_model_mu"] for r in rows}
    for k in (1, 8):
        assert abs(by_k[(k, "dreg")] - by_k[(k, "reparam")]) < 1e-3 * by_k[(k, "reparam")]
