"""Amortized VAEs on binarized MNIST: the IWAE paper's experiment (Burda et al., 2016).

Burda et al.'s architectures written as a NumPyro model and guide whose networks are
Flax NNX modules (``--network nnx``, the default; NumPyro's ``nnx_module``), Equinox
modules (``eqx``; ``eqx_module``) or ``jax.example_libraries.stax`` (``stax``;
``numpyro.module``: the parameters saved by runs before NNX, whose tags have no network):

* one stochastic layer: x -> 200 -> 200 -> z (50), tanh, and the mirror-image decoder;
* two stochastic layers: x -> 200 -> 200 -> z1 (100) -> 100 -> 100 -> z2 (50), and back;

Gaussian latents with standard deviation exp(network output), Bernoulli pixels.
They are fitted with the standard ELBO (``--objective elbo``; K > 1 averages K
single-particle ELBOs, Burda's "VAE" with k samples), IWELBO (``iwae``) or IWELBO
with the DReG or STL gradient (``dreg``, ``stl``), on statically or dynamically
binarized MNIST, with Adam (eps = 1e-4, as Burda et al.) and optionally their
learning-rate schedule (stage i = 0..7 lasts 3^i epochs at 1e-3 * 10^(-i/7): 3280
epochs in all).

The fit is scored on the whole test set: log p(x) estimated by
:class:`~numpyro_iwae.MarginalLikelihood` with K = 5000 particles per image, streamed
over particle chunks, with its standard error; the test ELBO and IWAE-K bounds; the
number of active latent units (Burda et al.: unit u is active when
Cov_x(E_{q(u|x)}[u]) > 0.01); and PNG grids of samples and reconstructions.

``--prior-proposal`` fits the simplest importance-weighted generative model
instead: a 2-D latent, a decoder, no encoder at all (the guide draws z from the
prior) and K = 128; it writes a PNG of the decoded latent grid.

Data: ``--data PATH`` is a directory holding ``binarized_mnist.npz`` (static
binarization, Larochelle & Murray's 50000/10000/10000 split, bit-packed) and/or
``mnist.npz`` (grayscale MNIST, for dynamic binarization), in the layout of
``../shared/data/README.md``; or the path of one such file.

Run:  python examples/vae.py --data ../shared/data --objective iwae --k 50 --minutes 5
      python examples/vae.py --data ../shared/data --layers 2 --objective dreg --epochs 10
      python examples/vae.py --data ../shared/data --prior-proposal --epochs 5
      python examples/vae.py --help
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
import functools
import importlib.util
import json
import math
from pathlib import Path
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
import optax

from numpyro_iwae import CIWAE, IWELBO, MIWAE, PIWAE, MarginalLikelihood

PIXELS = 784
OBJECTIVES = ("elbo", "iwae", "dreg", "stl", "miwae", "piwae", "ciwae")
BURDA_STAGES = 8  # stage i lasts 3**i epochs: 3280 epochs in all
ACTIVE_THRESHOLD = 1e-2  # Burda et al.'s activity threshold on Cov_x(E_q[u])


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    """Training and test images, (N, 784) float32 rows in row-major 28 x 28 order.

    ``train`` holds 0/1 pixels (static binarization) or Bernoulli means in [0, 1]
    (dynamic: a fresh binarization is drawn for every minibatch); ``test`` is
    always 0/1 (for dynamic binarization, one draw with a fixed seed).
    """

    train: np.ndarray
    test: np.ndarray
    dynamic: bool


def _find(path: Path, filename: str) -> Path:
    candidate = path / filename if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(
            f"{candidate} not found: --data must be a directory holding {filename} or that "
            "file itself (layout: ../shared/data/README.md)."
        )
    if candidate.name != filename:
        raise ValueError(f"{candidate} is not {filename}, the file this binarization reads.")
    return candidate


def _array(archive, name: str, shape_tail: tuple[int, ...], source: Path) -> np.ndarray:
    if name not in archive.files:
        raise ValueError(f"{source} has no array {name!r} (it has {sorted(archive.files)}).")
    a = archive[name]
    if a.dtype != np.uint8 or a.ndim != 1 + len(shape_tail) or a.shape[1:] != shape_tail:
        raise ValueError(
            f"{source}:{name} should be uint8 of shape (N, {', '.join(map(str, shape_tail))}); "
            f"it is {a.dtype} {a.shape}."
        )
    return a


def load_mnist(path: str | Path, binarization: str = "static", seed: int = 0) -> Data:
    """Binarized MNIST from ``binarized_mnist.npz`` or ``mnist.npz``.

    :param path: a directory holding the file, or the file itself.
    :param binarization: ``"static"`` reads the fixed binarization of Larochelle &
        Murray (train 50000, test 10000; the validation split is not used);
        ``"dynamic"`` reads grayscale MNIST (train 60000, test 10000) and keeps the
        training pixels as Bernoulli means.
    :param seed: seed of the test set's one binarization (dynamic only).
    """
    path = Path(path)
    if binarization == "static":
        source = _find(path, "binarized_mnist.npz")
        with np.load(source) as archive:
            train, test = (
                np.unpackbits(_array(archive, f"x_{s}_packed", (98,), source), axis=1, count=PIXELS)
                for s in ("train", "test")
            )
        return Data(train.astype(np.float32), test.astype(np.float32), dynamic=False)
    if binarization == "dynamic":
        source = _find(path, "mnist.npz")
        with np.load(source) as archive:
            train = _array(archive, "x_train", (PIXELS,), source).astype(np.float32) / 255.0
            test = _array(archive, "x_test", (PIXELS,), source).astype(np.float32) / 255.0
        rng = np.random.default_rng(seed)
        return Data(train, (rng.random(test.shape) < test).astype(np.float32), dynamic=True)
    raise ValueError(f"binarization must be 'static' or 'dynamic', not {binarization!r}.")


# ---------------------------------------------------------------- the networks


@dataclass(frozen=True)
class Architecture:
    """Stochastic layers z_1 .. z_L (z_1 next to the pixels) and the hidden widths.

    ``latents[i]`` is the size of z_{i+1}; ``hidden[i]`` the width of the two tanh
    layers between z_i and z_{i+1} (z_0 = x). ``encoder=False`` is the prior as
    proposal: the guide draws z from the prior.
    """

    latents: tuple[int, ...]
    hidden: tuple[int, ...]
    encoder: bool = True


ARCHITECTURES = {
    1: Architecture(latents=(50,), hidden=(200,)),
    2: Architecture(latents=(100, 50), hidden=(200, 100)),
}
PRIOR_PROPOSAL = Architecture(latents=(2,), hidden=(200,), encoder=False)


#: How the networks are written: Flax NNX (the default), Equinox, or
#: ``jax.example_libraries.stax`` (the parameters this example saved before NNX).
NETWORKS = ("nnx", "eqx", "stax")


@dataclass(frozen=True)
class Network:
    """One tanh MLP, ``size_in -> width -> width -> size_out``, written with ``kind``.

    ``module`` is what NumPyro's wrapper for that library takes: an initialized
    ``flax.nnx`` module (:func:`numpyro.contrib.module.nnx_module`), an Equinox
    module (:func:`~numpyro.contrib.module.eqx_module`), or a stax ``(init, apply)``
    pair (:func:`numpyro.module`).
    """

    kind: str
    module: Any
    size_in: int
    size_out: int

    def declare(self, name: str) -> Callable[[jax.Array], jax.Array]:
        """Register the network's parameters under ``name`` in the running model or
        guide and return it as a function of a (..., size_in) array."""
        if self.kind == "nnx":
            from numpyro.contrib.module import nnx_module

            return nnx_module(name, self.module)
        if self.kind == "eqx":
            from numpyro.contrib.module import eqx_module

            return _over_rows(eqx_module(name, self.module))
        return numpyro.module(name, self.module, (1, self.size_in))


def _over_rows(fn: Callable) -> Callable:
    """A function of one vector (an Equinox module) applied to every row of (..., d)."""

    def batched(h: jax.Array) -> jax.Array:
        out = jax.vmap(fn)(h.reshape(-1, h.shape[-1]))
        return out.reshape(h.shape[:-1] + out.shape[-1:])

    return batched


def _mlp(kind: str, size_in: int, width: int, size_out: int, key: jax.Array) -> Network:
    """Burda et al.'s network (two tanh layers of ``width``), each library's own
    way and with its own default initialization."""
    if kind == "nnx":
        from flax import nnx

        rngs = nnx.Rngs(params=key)
        module = nnx.Sequential(
            nnx.Linear(size_in, width, rngs=rngs),
            jnp.tanh,
            nnx.Linear(width, width, rngs=rngs),
            jnp.tanh,
            nnx.Linear(width, size_out, rngs=rngs),
        )
    elif kind == "eqx":
        import equinox as eqx

        module = eqx.nn.MLP(size_in, size_out, width, depth=2, activation=jnp.tanh, key=key)
    elif kind == "stax":
        from jax.example_libraries import stax

        module = stax.serial(
            stax.Dense(width), stax.Tanh, stax.Dense(width), stax.Tanh, stax.Dense(size_out)
        )
    else:
        raise ValueError(f"network must be one of {NETWORKS}, not {kind!r}.")
    return Network(kind, module, size_in, size_out)


def _below(arch: Architecture, i: int) -> int:
    """Size of the variable below layer i (the pixels for i = 0)."""
    return PIXELS if i == 0 else arch.latents[i - 1]


@functools.cache
def networks(arch: Architecture, kind: str = "nnx", seed: int = 0) -> dict[str, Network]:
    """``{name: Network}`` for every network of ``arch``, initialized from ``seed``
    (stax networks are initialized by ``SVI.init``'s key instead).

    ``decoder{i}`` maps z_{i+1} to the pixel logits (i = 0) or to the mean and log
    standard deviation of z_i; ``encoder{i}`` maps z_i (x for i = 0) to those of
    z_{i+1}.
    """
    nets, key = {}, jax.random.key(seed)
    for i, (latent, width) in enumerate(zip(arch.latents, arch.hidden, strict=True)):
        below = _below(arch, i)
        key, k_dec, k_enc = jax.random.split(key, 3)
        out = below if i == 0 else 2 * below
        nets[f"decoder{i}"] = _mlp(kind, latent, width, out, k_dec)
        if arch.encoder:
            nets[f"encoder{i}"] = _mlp(kind, below, width, 2 * latent, k_enc)
    return nets


def _gaussian(h: jax.Array) -> dist.Distribution:
    loc, log_scale = jnp.split(h, 2, axis=-1)
    return dist.Normal(loc, jnp.exp(log_scale)).to_event(1)


def make_vae(arch: Architecture, network: str = "nnx", seed: int = 0) -> tuple[Callable, Callable]:
    """The NumPyro model p(x, z_1..z_L) and guide q(z_1..z_L | x) of ``arch``, with
    the networks of :func:`networks` written in ``network`` (one of :data:`NETWORKS`).

    Both take a (B, 784) batch ``x`` and sample inside a plate ``"data"`` of size B,
    so IWELBO forms one bound per image.
    """
    nets = networks(arch, network, seed)
    depth = len(arch.latents)

    def module(name: str) -> Callable:
        return nets[name].declare(name)

    def model(x: jax.Array) -> None:
        decoders = [module(f"decoder{i}") for i in range(depth)]
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample(
                f"z{depth}", dist.Normal(0.0, 1.0).expand([arch.latents[-1]]).to_event(1)
            )
            for i in reversed(range(1, depth)):
                z = numpyro.sample(f"z{i}", _gaussian(decoders[i](z)))
            numpyro.sample("x", dist.Bernoulli(logits=decoders[0](z)).to_event(1), obs=x)

    def guide(x: jax.Array) -> None:
        if not arch.encoder:
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("z1", dist.Normal(0.0, 1.0).expand([arch.latents[0]]).to_event(1))
            return
        encoders = [module(f"encoder{i}") for i in range(depth)]
        h = x
        with numpyro.plate("data", x.shape[0]):
            for i in range(depth):
                h = numpyro.sample(f"z{i + 1}", _gaussian(encoders[i](h)))

    return model, guide


def apply_network(nets: dict[str, Network], params: dict, name: str, h: jax.Array) -> jax.Array:
    """Network ``name`` with the fitted ``params`` (as ``SVI.get_params`` returns
    them) applied to ``h``, outside any model: the wrapper reads its parameters
    from ``params`` as it would from the optimizer."""
    with numpyro.handlers.substitute(data=params):
        return nets[name].declare(name)(h)


def decode_mean(
    arch: Architecture, nets: dict[str, Network], params: dict, z: jax.Array
) -> jax.Array:
    """Pixel means sigmoid(logits) given the top latent ``z`` (layers below at their means)."""
    for i in reversed(range(1, len(arch.latents))):
        z = jnp.split(apply_network(nets, params, f"decoder{i}", z), 2, axis=-1)[0]
    return jax.nn.sigmoid(apply_network(nets, params, "decoder0", z))


def posterior_means(
    arch: Architecture,
    nets: dict[str, Network],
    params: dict,
    x: jax.Array,
    key: jax.Array,
    num_samples: int = 100,
) -> list[jax.Array]:
    r"""E_q[z_i | x] for every layer, shape (N, latents[i]) each.

    For z_1 this is the encoder's mean. For a deeper layer it is
    :math:`E_{q(z_{1:i-1}|x)}[\mu_i(z_{i-1})]`, averaged over ``num_samples``
    draws of the layers below.
    """
    out = []
    loc, log_scale = jnp.split(apply_network(nets, params, "encoder0", x), 2, axis=-1)
    out.append(loc)
    for i in range(1, len(arch.latents)):
        key, sub = jax.random.split(key)
        shape = (num_samples,) + loc.shape if i == 1 else loc.shape
        z = loc + jnp.exp(log_scale) * jax.random.normal(sub, shape)
        loc, log_scale = jnp.split(apply_network(nets, params, f"encoder{i}", z), 2, axis=-1)
        out.append(loc.mean(0))
    return out


def active_units(
    arch: Architecture,
    nets: dict[str, Network],
    params: dict,
    x: np.ndarray,
    key: jax.Array,
    batch: int = 1000,
) -> list[int]:
    r"""Burda et al.'s count of active units per stochastic layer.

    Unit u is active when :math:`A_u = \mathrm{Cov}_x(E_{q(u|x)}[u]) > 10^{-2}`,
    the variance over the images ``x`` of its posterior mean.
    """
    fn = jax.jit(lambda x, key: posterior_means(arch, nets, params, x, key))
    means = [fn(x[s : s + batch], jax.random.fold_in(key, s)) for s in range(0, len(x), batch)]
    layers = [np.concatenate([np.asarray(m[i]) for m in means]) for i in range(len(arch.latents))]
    return [int((m.var(axis=0) > ACTIVE_THRESHOLD).sum()) for m in layers]


# ---------------------------------------------------------------- training


def burda_schedule(base_lr: float, steps_per_epoch: int) -> optax.Schedule:
    """Burda et al.'s schedule: stage i = 0..7 lasts 3**i epochs at base_lr * 10**(-i/7)."""
    ends = [(3 ** (i + 1) - 1) // 2 * steps_per_epoch for i in range(BURDA_STAGES - 1)]
    return optax.piecewise_constant_schedule(base_lr, {end: 10 ** (-1 / 7) for end in ends})


def make_objective(objective: str, k: int, replicates: int = 1, beta: float = 0.5):
    """The ELBO object for ``--objective`` with K particles (M replicates for MIWAE and
    PIWAE, beta for CIWAE; Rainforth et al., 2018)."""
    if objective == "elbo":
        return IWELBO(1) if k == 1 else Trace_ELBO(num_particles=k)
    if objective == "miwae":
        return MIWAE(k, replicates)
    if objective == "piwae":
        return PIWAE(k, replicates)
    if objective == "ciwae":
        return CIWAE(k, beta)
    gradient = {"iwae": "reparam", "dreg": "dreg", "stl": "stl"}[objective]
    return IWELBO(k, gradient_estimator=gradient)


def train(
    svi: SVI,
    data: Data,
    *,
    batch_size: int,
    epochs: int,
    minutes: float | None,
    key: jax.Array,
    init_params: dict | None = None,
    progress: bool = True,
) -> tuple[dict, list[float], float]:
    """Fit with SVI, one jitted ``lax.scan`` per epoch over shuffled minibatches.

    Stops after ``epochs`` or before an epoch that would end past ``minutes`` of
    wall-clock time (the first epoch's compilation included). Starts from
    ``init_params`` when given. Returns the params, the mean training loss per
    image of each epoch and the minutes spent.
    """
    from tqdm.auto import tqdm

    n = len(data.train)
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training images.")
    num_batches = n // batch_size
    train_x = jnp.asarray(data.train)

    def binarize(x: jax.Array, key: jax.Array) -> jax.Array:
        return (jax.random.uniform(key, x.shape) < x).astype(x.dtype) if data.dynamic else x

    @jax.jit
    def epoch(state, train_x: jax.Array, key: jax.Array):
        key_perm, key_bin = jax.random.split(key)
        idx = jax.random.permutation(key_perm, n)[: num_batches * batch_size]

        def step(state, xs):
            i, k = xs
            return svi.update(state, binarize(train_x[i], k))

        xs = (idx.reshape(num_batches, batch_size), jax.random.split(key_bin, num_batches))
        state, losses = jax.lax.scan(step, state, xs)
        return state, losses.mean() / batch_size

    key_init, key = jax.random.split(key)
    state = svi.init(key_init, binarize(train_x[:batch_size], key_init), init_params=init_params)
    start, losses = time.perf_counter(), []
    # With a time budget the bar counts seconds of it, not epochs that will not run.
    timed = minutes is not None
    total = round(60 * minutes) if timed else epochs
    unit = "s" if timed else "epoch"
    bar = tqdm(total=total, desc="train", unit=unit, disable=not progress)
    for e in range(epochs):
        elapsed = time.perf_counter() - start
        if timed and e > 0 and elapsed + elapsed / e > 60 * minutes:
            break
        state, loss = epoch(state, train_x, jax.random.fold_in(key, e))
        losses.append(float(loss))
        if timed:
            bar.update(min(round(time.perf_counter() - start), total) - bar.n)
        else:
            bar.update(1)
        bar.set_postfix(epoch=e + 1, loss=f"{losses[-1]:.2f}")
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} in epoch {e + 1}.")
    bar.close()
    return svi.get_params(state), losses, (time.perf_counter() - start) / 60


def save_params(path: Path, params: dict) -> None:
    """Write params to ``path`` (.npz), one array per leaf, named by index and tree path."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(path, **{f"{i:04d} {jax.tree_util.keystr(p)}": v for i, (p, v) in enumerate(leaves)})


def fresh_params(model: Callable, guide: Callable) -> dict:
    """Newly initialized params of a model and guide of :func:`make_vae` (a template)."""
    svi = SVI(model, guide, optax.adam(0.0), IWELBO(2))
    return svi.get_params(svi.init(jax.random.key(0), jnp.zeros((2, PIXELS))))


def load_params(path: Path, template: dict) -> dict:
    """Params saved by :func:`save_params`, checked leaf by leaf against ``template``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    with np.load(path) as saved:
        names = sorted(saved.files)
        expected = [f"{i:04d} {jax.tree_util.keystr(p)}" for i, (p, _) in enumerate(leaves)]
        if names != expected:
            raise ValueError(
                f"{path} does not hold the parameters of this architecture and --network."
            )
        values = [saved[n] for n in names]
    for name, (_, t), v in zip(names, leaves, values, strict=True):
        if v.shape != t.shape:
            raise ValueError(f"{path}: {name} has shape {v.shape}, expected {t.shape}.")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in values])


# ---------------------------------------------------------------- evaluation


def test_log_likelihood(
    model: Callable,
    guide: Callable,
    params: dict,
    x: np.ndarray,
    key: jax.Array,
    *,
    num_particles: int = 5000,
    batch: int = 1000,
    chunk_size: int | None = None,
    progress: bool = True,
) -> dict:
    r"""Mean test log-likelihood per image by MarginalLikelihood, streamed over particles.

    The images are scored ``batch`` at a time (each batch's particles streamed in
    chunks); the standard error of the mean is
    :math:`\sqrt{\sum_b \mathrm{se}_b^2} / N` since images are independent.
    """
    from tqdm.auto import tqdm

    ml = MarginalLikelihood(
        model, guide, params=params, num_particles=num_particles, chunk_size=chunk_size
    )
    fn = jax.jit(lambda key, x: ml(key, x))
    pointwise, ess, k_hat, var = [], [], [], 0.0
    for s in tqdm(
        range(0, len(x), batch), desc=f"log p(x), K={num_particles}", disable=not progress
    ):
        est = fn(jax.random.fold_in(key, s), jnp.asarray(x[s : s + batch]))
        pointwise.append(np.asarray(est.pointwise))
        ess.append(np.asarray(est.ess))
        k_hat.append(np.asarray(est.k_hat))
        var += float(est.stderr) ** 2
    pointwise, ess, k_hat = (np.concatenate(a) for a in (pointwise, ess, k_hat))
    return {
        "log_likelihood": float(pointwise.mean()),
        "stderr": math.sqrt(var) / len(x),
        "ess_median": float(np.median(ess)),
        "k_hat_median": float(np.median(k_hat)),
        "k_hat_above_0.7": float((k_hat > 0.7).mean()),
        "pointwise": pointwise,
    }


def test_bound(
    model: Callable,
    guide: Callable,
    params: dict,
    x: np.ndarray,
    key: jax.Array,
    k: int,
    batch: int = 1000,
) -> float:
    """The IWAE bound L_K (the ELBO for K = 1) per image, one draw, over the images ``x``."""
    elbo = IWELBO(k)
    fn = jax.jit(lambda key, x: elbo.loss(key, params, model, guide, x))
    total = sum(
        float(fn(jax.random.fold_in(key, s), jnp.asarray(x[s : s + batch])))
        for s in range(0, len(x), batch)
    )
    return -total / len(x)


# ---------------------------------------------------------------- pictures


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """Tile (n, 784) images into one array, ``cols`` per row, 1-pixel gaps."""
    n = len(images)
    rows = -(-n // cols)
    grid = np.ones((rows * 29 + 1, cols * 29 + 1), np.float32)
    for i, img in enumerate(np.asarray(images)):
        r, c = divmod(i, cols)
        grid[1 + 29 * r : 29 * (r + 1), 1 + 29 * c : 29 * (c + 1)] = img.reshape(28, 28)
    return grid


def save_grid(grid: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(path, grid, cmap="gray_r", vmin=0.0, vmax=1.0)


def pictures(
    arch: Architecture,
    nets: dict[str, Network],
    params: dict,
    test: np.ndarray,
    key: jax.Array,
    out: Path,
    tag: str,
) -> list:
    """Write sample and reconstruction grids (or the latent grid for the prior proposal)."""
    written = []
    z = jax.random.normal(key, (100, arch.latents[-1]))
    save_grid(
        image_grid(np.asarray(decode_mean(arch, nets, params, z)), 10), out / f"{tag}_samples.png"
    )
    written.append(f"{tag}_samples.png")
    if arch.encoder:
        # Evenly spaced test images: the static test set's rows come grouped by digit.
        x = jnp.asarray(test[np.linspace(0, len(test) - 1, 50).astype(int)])
        z1 = jnp.split(apply_network(nets, params, "encoder0", x), 2, axis=-1)[0]
        recon = jax.nn.sigmoid(apply_network(nets, params, "decoder0", z1))
        pairs = np.stack(
            [np.asarray(x).reshape(5, 10, -1), np.asarray(recon).reshape(5, 10, -1)], 1
        )
        save_grid(image_grid(pairs.reshape(100, -1), 10), out / f"{tag}_reconstructions.png")
        written.append(f"{tag}_reconstructions.png")
    elif arch.latents[-1] == 2:
        from jax.scipy.special import ndtri

        ticks = ndtri(jnp.linspace(0.03, 0.97, 15))
        z = jnp.stack(jnp.meshgrid(ticks, -ticks, indexing="xy"), -1).reshape(-1, 2)
        grid = image_grid(np.asarray(decode_mean(arch, nets, params, z)), 15)
        save_grid(grid, out / f"{tag}_latent_grid.png")
        written.append(f"{tag}_latent_grid.png")
    return written


# ---------------------------------------------------------------- main


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
        epilog=(
            "The defaults are Burda et al.'s full protocol: 3280 epochs, then K = 5000 "
            "particles on each of the 10,000 test images. That takes days on a 2-core CPU. "
            "For a first run: --minutes 5 --test-size 1000 --eval-particles 500."
        ),
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data"),
        help="directory with binarized_mnist.npz / mnist.npz, or one of the files",
    )
    p.add_argument(
        "--binarization",
        choices=("static", "dynamic"),
        default="static",
        help="static: binarized_mnist.npz; dynamic: a fresh draw from mnist.npz per batch",
    )
    p.add_argument(
        "--layers", type=int, choices=sorted(ARCHITECTURES), default=1, help="stochastic layers"
    )
    p.add_argument(
        "--prior-proposal",
        action="store_true",
        help="2-D latent, no encoder: the guide samples z from the prior (K = 128)",
    )
    p.add_argument(
        "--network",
        choices=NETWORKS,
        default="nnx",
        help="how the networks are written: Flax NNX, Equinox, or stax (to load parameters "
        "saved by runs before NNX)",
    )
    p.add_argument("--objective", choices=OBJECTIVES, default="iwae", help="training objective")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="particles K (default 1 for elbo, 50 otherwise, 128 with --prior-proposal)",
    )
    p.add_argument(
        "--replicates", type=int, default=1, help="M: independent sets of K (miwae, piwae)"
    )
    p.add_argument("--beta", type=float, default=0.5, help="ciwae's weight of the ELBO")
    p.add_argument(
        "--bound-ks",
        type=int,
        nargs="*",
        default=[],
        help="further K for the one-draw test bounds L_K (L_1 and the training K always)",
    )
    p.add_argument("--epochs", type=int, default=3280, help="0: only evaluate --params")
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="start from parameters saved by an earlier run (*_params.npz)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="stop before an epoch that would end past this training time",
    )
    p.add_argument("--batch-size", type=int, default=20, help="images per SVI step")
    p.add_argument("--lr", type=float, default=1e-3, help="(initial) Adam learning rate")
    p.add_argument(
        "--schedule",
        choices=("constant", "burda"),
        default="burda",
        help="burda: stage i = 0..7 lasts 3^i epochs at lr * 10^(-i/7)",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on N training images drawn at random (with --seed); default all",
    )
    p.add_argument(
        "--test-size",
        type=int,
        default=None,
        help="score N test images drawn at random (with --seed; the files are sorted by "
        "digit, so the first N would be one digit); default all",
    )
    p.add_argument(
        "--eval-particles", type=int, default=5000, help="particles per test image for log p(x)"
    )
    p.add_argument("--eval-batch", type=int, default=1000, help="test images per evaluation call")
    p.add_argument("--seed", type=int, default=0, help="seed of training, subsets and scoring")
    p.add_argument("--out", type=Path, default=Path("out"), help="directory for the outputs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.k is None:
        args.k = 128 if args.prior_proposal else 1 if args.objective == "elbo" else 50
    if any(k < 1 for k in args.bound_ks):
        p.error("--bound-ks must be positive integers")
    if not (0.0 <= args.beta <= 1.0):
        p.error(f"--beta must lie in [0, 1], not {args.beta}")
    for name in ("k", "replicates", "batch_size", "eval_particles", "eval_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    for name in ("train_size", "test_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer")
    for name in ("lr", "minutes"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name} must be a positive number, not {value}")
    if args.epochs < 0 or (args.epochs == 0 and args.params is None):
        p.error("--epochs must be positive (or 0 with --params, to evaluate saved parameters)")
    library = {"nnx": "flax", "eqx": "equinox"}.get(args.network)
    if library is not None and importlib.util.find_spec(library) is None:
        p.error(
            f"--network {args.network} needs {library}: pip install 'numpyro_iwae[networks]' "
            "(or --network stax)"
        )
    if args.objective in ("iwae", "dreg", "stl", "ciwae") and args.k < 2:
        p.error(f"--objective {args.objective} needs --k >= 2 (K = 1 is the ELBO: use elbo)")
    return args


def random_rows(images: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """``n`` rows drawn without replacement (in their original order), or all rows."""
    if n is None or n >= len(images):
        return images
    rows = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return images[rows]


def network_tag(network: str) -> str:
    """The part of an output's tag that names the network (none for stax, as
    before NNX)."""
    return "" if network == "stax" else f"_{network}"


def network_of(path: Path) -> str:
    """The network of saved parameters, read from the file name that :func:`main`
    gave them (``vae_l1_nnx_...``; no network named: stax)."""
    parts = Path(path).name.split("_")
    return next((n for n in NETWORKS if n in parts), "stax")


def tag_of(args: argparse.Namespace) -> str:
    arch = "prior2d" if args.prior_proposal else f"l{args.layers}"
    resumed = "_resumed" if args.params is not None else ""
    extra = {"miwae": f"_m{args.replicates}", "piwae": f"_m{args.replicates}"}.get(
        args.objective, f"_b{args.beta:g}" if args.objective == "ciwae" else ""
    )
    network = network_tag(args.network)
    return f"vae_{arch}{network}_{args.objective}_k{args.k}{extra}_{args.binarization}{resumed}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    data = load_mnist(args.data, args.binarization, seed=args.seed)
    for name, have in (("train_size", len(data.train)), ("test_size", len(data.test))):
        if (getattr(args, name) or 0) > have:
            raise ValueError(
                f"--{name.replace('_', '-')} {getattr(args, name)}: only {have} images."
            )
    data = Data(
        random_rows(data.train, args.train_size, args.seed),
        random_rows(data.test, args.test_size, args.seed + 1),
        data.dynamic,
    )
    arch = PRIOR_PROPOSAL if args.prior_proposal else ARCHITECTURES[args.layers]
    model, guide = make_vae(arch, args.network, args.seed)
    steps_per_epoch = len(data.train) // args.batch_size
    lr = burda_schedule(args.lr, steps_per_epoch) if args.schedule == "burda" else args.lr
    objective = make_objective(args.objective, args.k, args.replicates, args.beta)
    svi = SVI(model, guide, optax.adam(lr, eps=1e-4), objective)
    key = jax.random.key(args.seed)
    k_train, k_eval, k_bound, k_units, k_pics = jax.random.split(key, 5)
    tag, progress = tag_of(args), not args.no_progress
    print(
        f"{tag}: {len(data.train)} training and {len(data.test)} test images, "
        f"latents {arch.latents}, {args.objective} with K = {args.k}"
    )

    init_params = None
    if args.params is not None:
        init_params = load_params(args.params, fresh_params(model, guide))
    params, losses, train_minutes = train(
        svi,
        data,
        batch_size=args.batch_size,
        epochs=args.epochs,
        minutes=args.minutes,
        key=k_train,
        init_params=init_params,
        progress=progress,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    save_params(args.out / f"{tag}_params.npz", params)
    print(
        f"trained {len(losses)} epochs in {train_minutes:.1f} min"
        + (f", final training loss {losses[-1]:.2f} nats per image" if losses else "")
    )

    start = time.perf_counter()
    evaluation = test_log_likelihood(
        model,
        guide,
        params,
        data.test,
        k_eval,
        num_particles=args.eval_particles,
        batch=args.eval_batch,
        progress=progress,
    )
    eval_minutes = (time.perf_counter() - start) / 60
    bounds = {
        f"L_{k}": test_bound(model, guide, params, data.test, jax.random.fold_in(k_bound, k), k)
        for k in sorted({1, args.k, *args.bound_ks})
    }
    nets = networks(arch, args.network, args.seed)
    units = active_units(arch, nets, params, data.test, k_units) if arch.encoder else None
    written = pictures(arch, nets, params, data.test, k_pics, args.out, tag)
    result = {
        "tag": tag,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "latents": list(arch.latents),
        "train_images": len(data.train),
        "test_images": len(data.test),
        "epochs": len(losses),
        "train_minutes": train_minutes,
        "train_loss": losses,
        "test_nll": -evaluation["log_likelihood"],
        "test_nll_stderr": evaluation["stderr"],
        "eval_particles": args.eval_particles,
        "eval_minutes": eval_minutes,
        "ess_median": evaluation["ess_median"],
        "k_hat_median": evaluation["k_hat_median"],
        "k_hat_above_0.7": evaluation["k_hat_above_0.7"],
        "test_bounds": bounds,
        "active_units": units,
        "pictures": written,
    }
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=2))
    trust = (
        "; k-hat above 0.7 for most images: the s.e. is not to be trusted (see the docs' "
        "'When the guide is poor')"
        if result["k_hat_median"] > 0.7
        else ""
    )
    print(
        f"test NLL {result['test_nll']:.2f} +- {result['test_nll_stderr']:.3f} nats "
        f"(median k-hat {result['k_hat_median']:.2f}, "
        f"{100 * result['k_hat_above_0.7']:.0f}% of images above 0.7{trust}; "
        f"K = {args.eval_particles}, {eval_minutes:.1f} min); bounds "
        + ", ".join(f"{k} = {v:.2f}" for k, v in bounds.items())
        + (f"; active units {units}" if units is not None else "")
    )
    print(f"wrote {args.out / (tag + '.json')} and {', '.join(written)}")
    result["pointwise"] = evaluation["pointwise"]
    return result


if __name__ == "__main__":
    main()
