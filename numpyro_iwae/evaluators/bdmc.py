r"""Bidirectional Monte Carlo: :math:`\log p(x)` sandwiched between a lower and an upper
bound on data simulated from the model (Grosse, Ghahramani & Adams 2015, *Sandwiching the
marginal likelihood using bidirectional Monte Carlo*, arXiv:1511.02543; Grosse, Ancha &
Roy 2016, NeurIPS).

On data :math:`x \sim p(x \mid z^*)`, :math:`z^* \sim p(z)` drawn from the model, the
latents :math:`z^*` are an exact draw from the posterior :math:`p(z \mid x)`. Annealed
importance sampling from the guide to the posterior gives weights with
:math:`\mathbb E[w] = p(x)`, so :math:`\mathbb E[\log \frac1K \sum_k w_k] \le \log p(x)`;
annealing *in reverse*, from :math:`z^*` along the same path back to the guide, gives
weights with :math:`\mathbb E[w^{\mathrm{rev}}] = 1 / p(x)`, so

.. math::

    \mathbb E\Big[-\log \frac1K \sum_k w^{\mathrm{rev}}_k\Big] \ge \log p(x).

The gap between the two bounds bounds each one's error, on this model and these settings
(T, the kernel): a user chooses T on simulated data where the gap is small, then trusts
the forward estimate on real data. The reverse chains share the one exact draw, so their
standard error measures the chains' spread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
from numpyro.handlers import condition

from numpyro_iwae._jax import Static, check_positive_int
from numpyro_iwae.core.simulate import Simulation, simulate
from numpyro_iwae.evaluators.annealed import (
    annealed_run,
    annealed_setup,
    check_hmc_options,
    check_noncentred,
    moved_density,
    pilot_step_sizes,
)
from numpyro_iwae.evaluators.base import DEFAULT_MEMORY_BUDGET, Evaluator
from numpyro_iwae.evaluators.marginal import MarginalLikelihood
from numpyro_iwae.evaluators.results import LogMarginalEstimate
from numpyro_iwae.evaluators.smc import replicate_estimate
from numpyro_iwae.maths.ais import sigmoid_schedule

__all__ = ["BidirectionalMC", "EvidenceSandwich"]


class EvidenceSandwich(NamedTuple):
    r"""What :class:`BidirectionalMC` returns: :math:`\log p(x)` of simulated data
    between two stochastic bounds.

    Attributes:
        lower: AIS from the guide (:class:`~numpyro_iwae.MarginalLikelihood` with
            ``annealing_steps``): a lower bound in expectation.
        upper: reverse AIS from the simulated latents: an upper bound in expectation;
            ``log_marginal``/``pointwise`` are :math:`-\log \frac1K \sum_k
            w^{\mathrm{rev}}_k`, ``ess`` the reverse weights' effective number,
            ``k_hat`` NaN.
        gap: ``upper.log_marginal - lower.log_marginal``.
        pointwise_gap: the same per element (per simulated datapoint where the plates
            allow it).
        simulation: the simulated data and latents
            (:class:`~numpyro_iwae.core.simulate.Simulation`).

    """

    lower: LogMarginalEstimate
    upper: LogMarginalEstimate
    gap: jax.Array
    pointwise_gap: jax.Array
    simulation: Simulation


class _ReverseAnnealing(Evaluator):
    """Reverse AIS from fixed latents, through the evaluators' checks and compilation."""

    def __init__(self, owner: BidirectionalMC, model: Any, latents: dict) -> None:
        super().__init__(
            model,
            owner.guide,
            params=owner.params,
            mutable_state=owner.mutable_state,
            memory_budget=owner.memory_budget,
            vectorize_particles=owner._vectorize,
        )
        self.owner, self.latents = owner, latents

    def _evaluate_traced(
        self, rng_key: jax.Array, values: dict, dynamic: list, static: Static
    ) -> tuple[LogMarginalEstimate, dict[str, jax.Array]]:
        owner = self.owner
        density, (model_key, _), nan_data = annealed_setup(self, rng_key, values, dynamic, static)
        missing = sorted(set(density.sites) - set(self.latents))
        if missing:
            raise ValueError(
                f"The guide draws {missing}, which the model's simulation did not produce: "
                "reverse annealing starts from the model's latents in the guide's "
                "coordinates, so every random draw of the guide must be a latent site of "
                "the model of the same name (AutoNormal and hand-written guides are; "
                "AutoContinuous guides draw '_auto_latent')."
            )
        u_star = {n: t.inv(self.latents[n]) for n, t in density.transforms.items()}
        if owner.noncentred:
            density = moved_density(density, owner.noncentred, model_key)
            u_star = density.noncentre(u_star, model_key)
        betas = sigmoid_schedule(owner.annealing_steps + 1)
        pilot_key = jax.random.fold_in(rng_key, 7)
        step_sizes = pilot_step_sizes(
            density,
            model_key,
            pilot_key,
            betas,
            owner.step_size,
            owner.leapfrog_steps,
            owner.pilot_particles,
        )

        def chain(key: jax.Array) -> jax.Array:
            run = annealed_run(
                density,
                model_key,
                key,
                u_star,
                betas[::-1],
                step_sizes[::-1],
                owner.leapfrog_steps,
            )
            return run.log_w

        log_w = self._vectorize(
            chain, jax.random.split(jax.random.fold_in(rng_key, 3), owner.num_chains)
        )
        return upper_estimate(log_w), nan_data


def upper_estimate(log_w_reverse: jax.Array) -> LogMarginalEstimate:
    r"""The upper bound from K reverse log weights per element, ``(K, *elements)``:
    :math:`-\log \frac1K \sum_k w_k`, with the delta-method standard error of the mean
    weight (NaN for one chain): the replicates' estimate of
    :func:`~numpyro_iwae.evaluators.smc.replicate_estimate`, negated.
    """
    est = replicate_estimate(log_w_reverse)
    return est._replace(log_marginal=-est.log_marginal, pointwise=-est.pointwise)


class BidirectionalMC:
    r"""Sandwich :math:`\log p(x)` of data simulated from the model between AIS from the
    guide (lower) and reverse AIS from the simulated latents (upper); see the module.

    ``BidirectionalMC(model, guide, params=params, annealing_steps=T)(rng_key, *args,
    **kwargs)``, called with the arguments the model was fitted with, simulates data by
    running the model with its observed sites drawn (the arguments say which sites are
    observed, not what), conditions the model on them, replaces the data in the
    arguments by the simulated data (so an amortized guide encodes what the model is
    conditioned on; :meth:`~numpyro_iwae.core.simulate.Simulation.arguments`), and
    returns an :class:`EvidenceSandwich`. To run several settings on the same data, call
    :meth:`simulate` once and :meth:`sandwich` for each.

    :param model: NumPyro model whose observations are sample sites with distributions.
    :param guide: NumPyro guide whose random draws are continuous latent sites of the
        model, under the same names.
    :param params: values of the ``param`` sites (``svi_result.params``): the model's are
        used to simulate.
    :param mutable_state: values of the ``mutable`` sites.
    :param annealing_steps: T, the transitions of each forward and reverse run (the
        same sigmoidal schedule both ways).
    :param num_particles: K, forward AIS runs.
    :param num_chains: reverse AIS runs (all from the one exact draw).
    :param leapfrog_steps: leapfrog steps per HMC transition.
    :param step_size: the initial HMC step size; one pilot from the guide adapts it per
        transition, as :class:`~numpyro_iwae.MarginalLikelihood` does, and both
        directions use the result.
    :param pilot_particles: runs of the pilot.
    :param noncentred: loc-scale sites whose moves run non-centred, both ways, as
        :class:`~numpyro_iwae.MarginalLikelihood`'s ``noncentred``: the reverse runs
        start from the simulated latents in those coordinates.
    :param memory_budget: as for :class:`~numpyro_iwae.MarginalLikelihood`.
    :param vectorize_particles: how particles are mapped (``True``: :func:`jax.vmap`).

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> from numpyro_iwae import BidirectionalMC
        >>> def model(y):
        ...     z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("y", dist.Normal(z, 0.5), obs=y)
        >>> def guide(y):  # ignores y: too wide for most data, off centre
        ...     numpyro.sample("z", dist.Normal(0.0, 0.5))
        >>> bdmc = BidirectionalMC(model, guide, annealing_steps=200, num_particles=64)
        >>> out = bdmc(jax.random.key(0), 0.0)  # y observed; its value is simulated
        >>> y = out.simulation.observed["y"]
        >>> exact = float(dist.Normal(0.0, 1.25**0.5).log_prob(y))  # y ~ N(0, 1 + 0.5^2)
        >>> lower, upper = out.lower, out.upper
        >>> bool(lower.log_marginal - 3 * lower.stderr < exact)
        True
        >>> bool(exact < upper.log_marginal + 3 * upper.stderr)
        True

    """

    def __init__(
        self,
        model: Any,
        guide: Any,
        *,
        params: dict[str, Any] | None = None,
        mutable_state: dict[str, Any] | None = None,
        annealing_steps: int = 100,
        num_particles: int = 100,
        num_chains: int = 16,
        leapfrog_steps: int = 5,
        step_size: float = 0.1,
        pilot_particles: int = 16,
        noncentred: Sequence[str] = (),
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        vectorize_particles: Any = True,
    ) -> None:
        self.model, self.guide = model, guide
        self.params = {} if params is None else dict(params)
        self.mutable_state = {} if mutable_state is None else dict(mutable_state)
        self.annealing_steps = check_positive_int(annealing_steps, "annealing_steps")
        self.num_particles = check_positive_int(num_particles, "num_particles")
        self.num_chains = check_positive_int(num_chains, "num_chains")
        self.leapfrog_steps, self.step_size, self.pilot_particles = check_hmc_options(
            leapfrog_steps, step_size, pilot_particles
        )
        self.noncentred = check_noncentred(noncentred)
        self.memory_budget = check_positive_int(memory_budget, "memory_budget")
        self._vectorize = vectorize_particles

    def simulate(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> Simulation:
        """Data and latents from one run of the model with ``params`` (see
        :func:`~numpyro_iwae.core.simulate.simulate`).
        """
        return simulate(self.model, {**self.params, **self.mutable_state}, rng_key, *args, **kwargs)

    def sandwich(
        self, rng_key: jax.Array, simulation: Simulation, *args: Any, **kwargs: Any
    ) -> EvidenceSandwich:
        """Both bounds for the simulated data, the model and guide called with ``args``
        (holding the simulated data where the guide reads it:
        ``simulation.arguments(args, kwargs)``).
        """
        _warn_on_other_data(simulation, args, kwargs)
        model = condition(self.model, data=simulation.observed)
        lower_key, upper_key = jax.random.split(rng_key)
        lower = MarginalLikelihood(
            model,
            self.guide,
            params=self.params,
            mutable_state=self.mutable_state,
            num_particles=self.num_particles,
            annealing_steps=self.annealing_steps,
            leapfrog_steps=self.leapfrog_steps,
            step_size=self.step_size,
            pilot_particles=self.pilot_particles,
            noncentred=self.noncentred,
            memory_budget=self.memory_budget,
            vectorize_particles=self._vectorize,
        )(lower_key, *args, **kwargs)
        reverse = _ReverseAnnealing(self, model, simulation.latents)
        upper = reverse._score(upper_key, args, kwargs)
        return EvidenceSandwich(
            lower=lower,
            upper=upper,
            gap=upper.log_marginal - lower.log_marginal,
            pointwise_gap=upper.pointwise - lower.pointwise,
            simulation=simulation,
        )

    def __call__(self, rng_key: jax.Array, *args: Any, **kwargs: Any) -> EvidenceSandwich:
        """Simulate data with ``args`` and sandwich their ``log p(x)``.

        :return: an :class:`EvidenceSandwich`.
        """
        sim_key, key = jax.random.split(rng_key)
        simulation = self.simulate(sim_key, *args, **kwargs)
        args, kwargs = simulation.arguments(args, kwargs)
        return self.sandwich(key, simulation, *args, **kwargs)


def _warn_on_other_data(simulation: Simulation, args: tuple, kwargs: dict) -> None:
    """Warn when an argument has an observed site's shape but other values: a guide
    that reads it would encode data the model is not conditioned on.
    """
    leaves = [x for x in jax.tree.leaves((args, kwargs)) if hasattr(x, "shape")]
    for name, value in simulation.observed.items():
        for leaf in leaves:
            if jnp.shape(leaf) == jnp.shape(value) and jnp.size(value) > 1:
                if not bool(jnp.all(jnp.asarray(leaf) == value)):
                    warnings.warn(
                        f"An argument has the shape of the observed site '{name}' "
                        f"{tuple(jnp.shape(value))} but not its simulated values. The model "
                        "is conditioned on the simulated data; if the guide reads the data "
                        "from its arguments, pass simulation.observed in their place "
                        "(BidirectionalMC.sandwich).",
                        stacklevel=3,
                    )
                    return
