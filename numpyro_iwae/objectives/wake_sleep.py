r"""Reweighted wake-sleep (Bornschein & Bengio, 2015; Le, Kosiorek, Siddharth, Teh &
Wood, 2019, *Revisiting Reweighted Wake-Sleep for Models with Stochastic Control
Flow*, UAI) as a NumPyro ``ELBO``.

The model and the guide get different objectives: the model's parameters ascend the
importance-weighted bound (wake-:math:`\theta`), the guide's parameters descend an
estimate of :math:`\mathrm{KL}(p_\theta(z \mid x) \,\|\, q_\phi(z \mid x))` from the
same particles (wake-:math:`\phi`), from samples of the model (sleep-:math:`\phi`),
or a mixture of the two. Neither needs a path through the sampled values, so discrete
and branching guides are trained without a score-function estimator of the bound.

"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.util import log_density

from numpyro_iwae._jax import check_positive_int, check_real, map_particles
from numpyro_iwae.core.plates import PlateStructure, accumulate, sample_sites
from numpyro_iwae.core.program import ModelOutput, Program
from numpyro_iwae.core.simulate import Unconditioned, swap_observations
from numpyro_iwae.core.stages import log_ratio
from numpyro_iwae.maths.bounds import iwae_bound
from numpyro_iwae.maths.surrogates import wake_phi_surrogate, zero_valued
from numpyro_iwae.objectives.base import (
    Objective,
    Particles,
    refuse_global_sites,
    total_objective,
    zero_weight_log_w,
)

__all__ = ["SleepInputs", "default_sleep_inputs", "ReweightedWakeSleep"]


#: ``sleep_inputs(observations, args, kwargs) -> (args, kwargs)``: the guide's
#: arguments for observations drawn from the model (site name -> value).
SleepInputs = Callable[[dict[str, jax.Array], tuple, dict[str, Any]], tuple[tuple, dict]]


def default_sleep_inputs(
    observations: dict[str, jax.Array],
    originals: dict[str, Any],
    args: tuple,
    kwargs: Mapping[str, Any],
) -> tuple[tuple, dict[str, Any]]:
    """The guide's arguments for observations drawn from the model: every argument
    that the model passed unchanged as an observed site's ``obs`` is replaced by the
    value drawn for that site. An observed site whose value is not an argument (it
    was indexed, reshaped, computed) is an error: say how with ``sleep_inputs``.
    """
    new_args, new_kwargs, unmatched = swap_observations(observations, originals, args, kwargs)
    if unmatched:
        raise ValueError(
            "ReweightedWakeSleep's sleep phase (insomnia < 1) runs the guide on "
            "observations drawn from the model, but the observed site "
            f"{unmatched[0]!r} does not take its value unchanged from an argument of the "
            "model (it is indexed, reshaped or computed), so the guide's arguments "
            "for a drawn value are unknown. Pass sleep_inputs=f(observations, args, "
            "kwargs) -> (args, kwargs), or use insomnia=1."
        )
    return new_args, new_kwargs


class ReweightedWakeSleep(Objective):
    r"""Reweighted wake-sleep (Le et al., 2019) as a NumPyro ``ELBO`` for ``SVI``.

    From K particles :math:`z_k \sim q_\phi(z \mid x)` with weights
    :math:`w_k = p_\theta(x, z_k) / q_\phi(z_k \mid x)` and :math:`\tilde w_k = w_k /
    \sum_j w_j`, per plate element:

    - **wake-**:math:`\theta`: the model's parameters get the gradient of the
      importance-weighted bound, :math:`\sum_k \tilde w_k \nabla_\theta \log
      p_\theta(x, z_k)`;
    - **wake-**:math:`\phi`: the guide's parameters ascend
      :math:`\sum_k \tilde w_k \nabla_\phi \log q_\phi(z_k \mid x)` at fixed
      :math:`z_k`, the self-normalized estimate of :math:`-\nabla_\phi
      \mathrm{KL}(p_\theta(z \mid x) \,\|\, q_\phi(z \mid x))`
      (:func:`~numpyro_iwae.maths.surrogates.wake_phi_surrogate`); it keeps improving as
      K grows and needs no reparameterization;
    - **sleep-**:math:`\phi`: the guide's parameters ascend :math:`\log
      q_\phi(z \mid x)` at :math:`(x, z) \sim p_\theta` (``num_sleep_particles``
      draws of the whole model, its observed sites sampled), an estimate of
      :math:`-\nabla_\phi \mathbb E_{p_\theta(x)} \mathrm{KL}(p_\theta(z \mid x)
      \,\|\, q_\phi)`;

    mixed as ``insomnia`` x wake-:math:`\phi` + (1 - ``insomnia``) x
    sleep-:math:`\phi`. Unlike Pyro's class, each plate element has its own weights
    and a subsampled plate is scaled by N/B outside every ``logsumexp``, as
    :class:`~numpyro_iwae.IWELBO` does (``weighting`` as there; global latent sites
    under local weighting are refused, since wake-:math:`\phi` needs weights over
    every site it trains). :meth:`loss` returns the negative importance-weighted
    bound, whatever surrogate carries the gradients.

    The sleep phase calls the guide with the drawn observations in place of the
    data: by default every model argument passed unchanged as an observed site's
    ``obs`` is replaced by the value drawn for that site (an error names the site
    otherwise); ``sleep_inputs`` says how in other cases. A guide that does not
    read the data (``AutoNormal``) is fitted towards the prior by the sleep phase.

    :param num_particles: K.
    :param insomnia: weight of wake-:math:`\phi` against sleep-:math:`\phi`, in
        [0, 1]; 1 (default) is wake-wake.
    :param gradient_estimator: ``"wake"`` (default): wake-:math:`\phi` as above;
        ``"wake_dreg"``: its doubly reparameterized form (RWS-DReG, not IWELBO's
        ``"dreg"``) for the reparameterized sites,
        :math:`\sum_k (\tilde w_k - \tilde w_k^2) \frac{\partial \log w_k}{\partial
        z_k} \frac{\partial z_k}{\partial \phi}` (Tucker, Lawson, Gu & Maddison,
        2019), the same gradient in expectation; discrete sites keep the score form.
        Its variance is lower near the posterior (0 at the exact one) and can be
        higher far from it (measured in :doc:`objectives`).
    :param num_sleep_particles: draws of the model per step for sleep-:math:`\phi`
        (default K).
    :param sleep_inputs: ``f(observations, args, kwargs) -> (args, kwargs)``, the
        guide's arguments for observations drawn from the model (site name ->
        value); default as described above.
    :param proposal: a guide-like callable (same arguments, sites and plates as the
        guide, reading the guide's parameters) that draws the wake particles instead
        of the guide: **defensive importance sampling** (Hesterberg, 1995; Le et al.,
        2019), e.g. the guide's distribution mixed with a broad one so that a guide
        that has collapsed onto part of the posterior still proposes the rest. The
        weights become :math:`w_k = p_\theta(x, z_k) / r(z_k \mid x)` for the
        proposal :math:`r` (its parameters get no gradient), wake-:math:`\phi`
        trains the guide's own :math:`\log q_\phi` at the proposal's draws, and
        :meth:`loss` is the bound under :math:`r`. Not with ``"wake_dreg"``.
    :param vectorize_particles: as for :class:`~numpyro_iwae.IWELBO`.
    :param weighting: as for :class:`~numpyro_iwae.IWELBO`.

    Example:
        >>> import jax, jax.numpy as jnp, optax, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import SVI
        >>> from numpyro_iwae import ReweightedWakeSleep
        >>> def model(x):
        ...     probs = numpyro.param("probs", jnp.ones(3) / 3, constraint=dist.constraints.simplex)
        ...     z = numpyro.sample("z", dist.Categorical(probs))
        ...     numpyro.sample("x", dist.Normal(jnp.array([-2.0, 0.0, 2.0])[z], 1.0), obs=x)
        >>> def guide(x):
        ...     logits = numpyro.param("logits", jnp.zeros(3))
        ...     numpyro.sample("z", dist.Categorical(logits=logits))
        >>> svi = SVI(model, guide, optax.adam(0.05), ReweightedWakeSleep(num_particles=10))
        >>> result = svi.run(jax.random.key(0), 300, 2.0, progress_bar=False)
        >>> int(jnp.argmax(result.params["logits"]))
        2

    """

    estimators = ("wake", "wake_dreg")
    renamed_estimators = {"score": "wake", "dreg": "wake_dreg"}
    squared_weight_estimators = ("wake_dreg",)
    repr_fields = ("num_particles", "insomnia", "gradient_estimator", "weighting")

    def __init__(
        self,
        num_particles: int = 8,
        insomnia: float = 1.0,
        *,
        gradient_estimator: str = "wake",
        num_sleep_particles: int | None = None,
        sleep_inputs: SleepInputs | None = None,
        proposal: Callable | None = None,
        vectorize_particles: bool | Callable = True,
        weighting: str = "auto",
    ) -> None:
        self.insomnia = check_real(insomnia, "insomnia", 0.0, 1.0)
        if num_sleep_particles is not None:
            num_sleep_particles = check_positive_int(num_sleep_particles, "num_sleep_particles")
        if sleep_inputs is not None and not callable(sleep_inputs):
            raise TypeError(f"`sleep_inputs` must be callable, got {sleep_inputs!r}.")
        super().__init__(
            num_particles,
            gradient_estimator=gradient_estimator,
            vectorize_particles=vectorize_particles,
            weighting=weighting,
        )
        self.num_sleep_particles = num_sleep_particles or self.num_particles
        self.sleep_inputs = sleep_inputs
        if proposal is not None and not callable(proposal):
            raise TypeError(f"`proposal` must be callable, got {proposal!r}.")
        if proposal is not None and self.gradient_estimator == "wake_dreg":
            raise ValueError(
                "ReweightedWakeSleep(gradient_estimator='wake_dreg') needs particles "
                "reparameterized from the guide; it cannot use a separate `proposal`."
            )
        self.proposal = proposal

    def draw_path(self) -> str:
        """``"stl"``: log q at stopped parameters; the fixed-z score is log q minus it."""
        return "stl"

    def check_structure(self, structure: PlateStructure) -> None:
        """Refuse global sites under local weighting."""
        refuse_global_sites(
            structure,
            "ReweightedWakeSleep",
            "it trains the guide on self-normalized weights over every site it draws, "
            "and global sites are drawn once per step, with no weights. Use "
            "weighting='joint' (not possible with a subsampled plate), or IWELBO.",
        )

    def objective(
        self, rng_key: jax.Array, param_map: dict[str, Any], program: Program
    ) -> tuple[jax.Array, ModelOutput]:
        """The importance-weighted bound, whose gradient is reweighted wake-sleep's
        (see the class).
        """
        sg = jax.lax.stop_gradient
        if self.proposal is None:
            particles = self.particles(rng_key, param_map, program)
        else:
            particles = self._particles_from_proposal(rng_key, param_map, program)
        draw, structure = particles.draw, particles.structure
        dreg = self.gradient_estimator == "wake_dreg"
        if dreg:
            log_p, log_p_theta, output = self.two_paths(particles)
        else:
            values = jax.tree.map(sg, draw.values)
            log_p_theta, output = particles.model_fn(values, particles.params)
            log_p = log_p_theta
        # The model's log weights: gradient for theta only.
        stopped = jax.tree.map(sg, (draw.log_q_rep, draw.log_q_score))
        log_w = zero_weight_log_w(log_ratio(log_p_theta, *stopped), output, structure)
        # Per group: log q's gradient at fixed z (value 0), split into reparameterized
        # and discrete sites, and the path log weights for RWS-DReG.
        parts = tuple(
            (
                zero_valued(q - qp),
                zero_valued(s),
                w_path if dreg else None,
            )
            for q, qp, s, w_path in zip(
                draw.log_q_rep,
                draw.log_q_rep_path,
                draw.log_q_score,
                log_ratio(log_p, draw.log_q_rep_path, stopped[1]),
            )
        )
        insomnia = self.insomnia

        def element(log_w: jax.Array, part: tuple, score: bool) -> jax.Array:
            fixed_rep, fixed_score, log_w_path = part
            if log_w_path is None:
                wake = wake_phi_surrogate(log_w, fixed_rep + fixed_score)
            else:
                wake = wake_phi_surrogate(log_w, fixed_rep, log_w_path, fixed_score)
            return iwae_bound(log_w) + insomnia * wake

        objective = total_objective(log_w, parts, structure, element)
        if insomnia < 1:
            sleep = self._sleep_log_q(jax.random.fold_in(rng_key, 1), param_map, program)
            objective = objective + (1 - insomnia) * zero_valued(sleep)
        return objective, output

    def _particles_from_proposal(
        self, rng_key: jax.Array, param_map: dict[str, jax.Array], program: Program
    ) -> Particles:
        """Particles from ``self.proposal`` (its density and values stopped) with the
        guide's log density at them as ``log_q_rep`` (live in the guide's parameters)
        and the proposal's as ``log_q_rep_path``: the surrogate then differentiates
        the guide's density at fixed values, and the weights use the proposal's.
        """
        sg = jax.lax.stop_gradient
        proposal_program = Program(program.model, self.proposal, program.args, program.kwargs)
        draw, model_fn, structure, model_params = self.particles(
            rng_key, param_map, proposal_program
        )
        values, plates = jax.tree.map(sg, (draw.values, draw.plates))

        def guide_log_q(particle: tuple) -> tuple:
            particle_values, particle_plates = particle
            guide = substitute(
                seed(program.guide, jax.random.key(0)),
                data={**param_map, **particle_values, **particle_plates},
            )
            tr = trace(guide).get_trace(*program.args, **program.kwargs)
            sites = sample_sites(tr)
            if set(sites) != set(values):
                raise ValueError(
                    "ReweightedWakeSleep's `proposal` must draw the guide's sites, got "
                    f"{sorted(values)} from the proposal and {sorted(sites)} from the guide."
                )
            return accumulate(list(sites.values()), structure)

        log_q = map_particles(self.vectorize_particles_fn, guide_log_q, (values, plates))
        log_r = tuple(sg(q + s) for q, s in zip(draw.log_q_rep, draw.log_q_score))
        zeros = tuple(jnp.zeros_like(r) for r in log_r)
        # log_q_rep - log_q_rep_path: the guide's log q at fixed z, minus the proposal's
        # (stopped); with log_q_score = 0 the weights are p / r.
        draw = draw._replace(
            values=values,
            log_q_rep=tuple(q - sg(q) + r for q, r in zip(log_q, log_r)),
            log_q_rep_path=log_r,
            log_q_score=zeros,
        )
        return Particles(draw, model_fn, structure, model_params)

    def _sleep_log_q(
        self, rng_key: jax.Array, param_map: dict[str, jax.Array], program: Program
    ) -> jax.Array:
        r"""Mean over ``num_sleep_particles`` draws :math:`(x, z) \sim p_\theta` of
        :math:`\log q_\phi(z \mid x)` (each site scaled as in ``Trace_ELBO``), with
        the draws' values stopped so that only :math:`\phi` gets a gradient.
        """
        sg = jax.lax.stop_gradient

        def one(key: jax.Array) -> jax.Array:
            model_key, guide_key = jax.random.split(key)
            unconditioned = Unconditioned(substitute(program.model, data=param_map))
            tr = trace(seed(unconditioned, model_key)).get_trace(*program.args, **program.kwargs)
            drawn = {
                name: sg(site["value"])
                for name, site in tr.items()
                if site["type"] in ("sample", "plate") and name not in unconditioned.given
            }
            observations = {name: sg(tr[name]["value"]) for name in unconditioned.given}
            if self.sleep_inputs is None:
                args, kwargs = default_sleep_inputs(
                    observations, unconditioned.given, program.args, program.kwargs
                )
            else:
                args, kwargs = self.sleep_inputs(
                    observations, tuple(program.args), dict(program.kwargs)
                )
            guide = substitute(seed(program.guide, guide_key), data=drawn)
            log_q, _ = log_density(guide, args, kwargs, param_map)
            return log_q

        keys = jax.random.split(rng_key, self.num_sleep_particles)
        return jnp.mean(self.vectorize_particles_fn(one, keys))
