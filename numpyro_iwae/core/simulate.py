r"""Data simulated from the model itself: one run with every observed site drawn from its
distribution instead of taking its ``obs``.

The run's latent values are then an exact draw from the posterior given the simulated
data (the joint :math:`p(z) p(x \mid z)` read the other way round), which is what
bidirectional Monte Carlo (:mod:`numpyro_iwae.evaluators.bdmc`) starts its reverse
annealing from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from numpyro.handlers import seed, substitute, trace
from numpyro.primitives import Messenger

__all__ = ["Unconditioned", "swap_observations", "Simulation", "simulate"]


class Unconditioned(Messenger):
    """Draw the model's observed sites from their distributions, remembering each site's
    given value (the object the model passed as ``obs``) in ``given``.

    :raises ValueError: at a factor (``numpyro.factor``), which has no distribution.
    """

    def __init__(self, fn: Callable) -> None:
        self.given: dict[str, Any] = {}
        super().__init__(fn)

    def process_message(self, msg: dict[str, Any]) -> None:
        """Release an observed site (its value drawn downstream), after recording it."""
        if msg["type"] == "sample" and msg["is_observed"]:
            if type(msg["fn"]).__name__ == "Unit":
                raise ValueError(
                    f"Site '{msg['name']}' is a factor (numpyro.factor): it has no "
                    "distribution to simulate data from. Simulated data needs a model "
                    "whose observations are all sample sites with a distribution."
                )
            self.given[msg["name"]] = msg["value"]
            msg["value"], msg["is_observed"] = None, False


class Simulation(NamedTuple):
    """One run of the model with its observations drawn.

    Attributes:
        observed: the simulated value of every observed site, ``{site: value}``
            (condition the model on them with :func:`numpyro.handlers.condition`).
        latents: the model's latent values in that run: an exact posterior draw given
            ``observed``.
        given: the values the observed sites had in the arguments (replaced).

    """

    observed: dict[str, jax.Array]
    latents: dict[str, jax.Array]
    given: dict[str, Any]

    def arguments(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args`` and ``kwargs`` with the simulated data in place of the given data
        (:func:`swap_observations`), so that a guide reading the data from its
        arguments sees what the model is conditioned on.
        """
        args, kwargs, _ = swap_observations(self.observed, self.given, args, kwargs)
        return args, kwargs


def swap_observations(
    drawn: Mapping[str, Any], given: Mapping[str, Any], args: tuple, kwargs: Mapping[str, Any]
) -> tuple[tuple, dict[str, Any], list[str]]:
    """``args`` and ``kwargs`` with every argument that the model passed unchanged as an
    observed site's ``obs`` (the same object, ``given[site]``) replaced by the value
    ``drawn[site]``, cast to the argument's dtype; also the sites no argument held (their
    value was indexed, reshaped or computed).
    """
    leaves, treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
    unmatched = []
    for name, original in given.items():
        found = [i for i, leaf in enumerate(leaves) if leaf is original]
        if not found:
            unmatched.append(name)
        for i in found:
            leaves[i] = jnp.asarray(drawn[name], jnp.result_type(leaves[i]))
    new_args, new_kwargs = jax.tree.unflatten(treedef, leaves)
    return new_args, new_kwargs, unmatched


def simulate(
    model: Callable, params: Mapping[str, Any], key: jax.Array, *args: Any, **kwargs: Any
) -> Simulation:
    """Run ``model(*args, **kwargs)`` with ``params`` substituted and every observed site
    drawn from its distribution. The arguments say which sites are observed (their
    ``obs``); their values are not used.

    >>> import jax, numpyro, numpyro.distributions as dist
    >>> def model(y):
    ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    ...     numpyro.sample("y", dist.Normal(z, 0.1), obs=y)
    >>> sim = simulate(model, {}, jax.random.key(0), 5.0)  # y is observed, not its value
    >>> bool(abs(sim.observed["y"] - sim.latents["z"]) < 1.0)  # drawn, not 5.0
    True

    :raises ValueError: if an observed site is a factor, or nothing is observed.
    """
    unobserved = Unconditioned(substitute(model, data=dict(params)))
    tr = trace(seed(unobserved, key)).get_trace(*args, **kwargs)
    if not unobserved.given:
        raise ValueError(
            "The model observes nothing with these arguments, so there are no data to "
            "simulate: pass the data arguments you fit with (their values are replaced)."
        )
    observed = {n: tr[n]["value"] for n in unobserved.given}
    latents = {
        n: s["value"]
        for n, s in tr.items()
        if s["type"] == "sample" and n not in observed and not s["is_observed"]
    }
    return Simulation(observed, latents, unobserved.given)
