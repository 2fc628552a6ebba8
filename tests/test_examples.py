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
    argv = ["--steps", "200", "--ks", "5", "--estimators", "dreg", "--guides", "normal"]
    argv += ["--eval-particles", "1000", "--bound-ks", "1", "10", "--nuts-samples", "300"]
    result = funnel.main(argv + ["--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "funnel.json").read_text())
    assert (tmp_path / "funnel.png").stat().st_size > 0
    assert saved["log_z"] == 0.0 and len(saved["fits"]) == 2
    assert len(saved["nuts"]["v_quantiles"]) == len(saved["quantiles"])
    for fit in result["fits"]:
        assert not fit["diverged"]
        for key in ("log_z", "stderr", "ess", "k_hat", "v_quantiles", "bounds"):
            assert key in fit
        assert fit["log_z"] <= 4 * fit["stderr"] + 1e-6  # an estimate of log Z = 0 from below
        for mean, stderr in fit["bounds"].values():
            assert mean <= 4 * stderr  # a lower bound on log Z = 0
    assert "NUTS reference" in capsys.readouterr().out


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
