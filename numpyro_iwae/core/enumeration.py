r"""Discrete model sites summed out inside each particle's weight.

A model site marked for parallel enumeration (``infer={"enumerate": "parallel"}``, e.g.
by ``config_enumerate``) that the guide does not draw is summed out exactly: for the
guide's draw :math:`z_k`,

.. math::

    \log w_{k,n} = \log \sum_{y} p(x, z_k, y)_n - \log q(z_k \mid x)_n ,

per element :math:`n` of the plates the weight is formed over, the sum running over
every value of the enumerated sites :math:`y` in that element. The model runs under
NumPyro's ``enum`` handler (:mod:`numpyro.contrib.funsor`), which gives each enumerated
site a tensor dimension of its own; each site's log density becomes a factor with named
dimensions, and funsor's plated sum-product eliminates the enumerated sites and every plate
except those the weight is formed over (tensor variable elimination, Obermeyer et al.,
2019), as ``TraceEnum_ELBO`` contracts the model's side of its bound. A ``scan``'s time
dimension is summed out as a chain: each step contracted onto the state, then the steps
multiplied in sequence.

funsor is an optional dependency (``pip install numpyro_iwae[enum]``), imported only
when a model has enumerated sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.handlers import infer_config

from numpyro_iwae.core.plates import PlateStructure, Trace, sample_sites, site_log_prob

__all__ = ["require_funsor", "enumerated_log_p"]


def require_funsor() -> None:
    """Raise an ImportError that says what to install when funsor is missing."""
    try:
        import funsor  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Summing out enumerated sites needs funsor, as NumPyro's TraceEnum_ELBO does: "
            "pip install funsor (or numpyro_iwae[enum])."
        ) from err


def enumerated_log_p(
    model: Any,
    args: tuple,
    kwargs: Mapping[str, Any],
    structure: PlateStructure,
) -> tuple[tuple[jax.Array, ...], Trace]:
    """``log p`` per group with the enumerated sites summed out, and the trace.

    ``model`` is the model with parameters, guide values and key already applied; it is
    traced under NumPyro's ``enum`` handler with ``structure.enum_nesting`` plate
    dimensions. Every factor must lie in the group of the enumerated sites it depends on:
    an enumerated site shared by the elements of a plate that the weight is formed
    per element of cannot be summed out per element.
    """
    import funsor
    from numpyro.contrib.funsor import enum, plate_to_enum_plate, to_funsor
    from numpyro.contrib.funsor import trace as named_trace

    funsor.set_backend("jax")
    enumerated = frozenset(structure.enumerated)
    # Only the sites summed out are enumerated (a marked site the guide draws is not).
    model = infer_config(
        model, config_fn=lambda site: {} if site["name"] in enumerated else {"enumerate": None}
    )
    first_dim = -structure.enum_nesting - 1
    with plate_to_enum_plate(), enum(first_available_dim=first_dim):
        tr = named_trace(model).get_trace(*args, **kwargs)

    sites = sample_sites(tr)
    plates = frozenset(
        frame.name
        for site in sites.values()
        for frame in site["cond_indep_stack"]
        if frame.dim is not None
    )
    names = frozenset(n for site in sites.values() for n in site["infer"]["dim_to_name"].values())
    times = frozenset(n for n in names if n.startswith(_TIME))
    summed = names - plates - times  # every other named dimension is an enumerated site
    factors: list[list[Any]] = [[] for _ in range(structure.num_groups)]
    steps: dict[tuple[int, str], list[Any]] = {}  # (group, time): the factors of each step
    for name, site in sites.items():
        log_prob = site_log_prob(site, structure)
        dim_to_name = site["infer"]["dim_to_name"]
        if not dim_to_name:  # no plate and no enumerated site: a number
            log_prob = jnp.sum(log_prob)
        factor = to_funsor(log_prob, output=funsor.Real, dim_to_name=dim_to_name)
        group = structure.group_of(_unshifted(name))
        time = [n for n in dim_to_name.values() if n in times]
        if time:
            steps.setdefault((group, time[0]), []).append(factor)
        else:
            factors[group].append(factor)
    for (group, time), step_factors in steps.items():
        factors[group].append(_chain(step_factors, time, summed, plates, sites))

    mentions: dict[str, set[int]] = {}
    for group, group_factors in enumerate(factors):
        for factor in group_factors:
            for var in frozenset(factor.inputs) & summed:
                mentions.setdefault(_unshifted(var), set()).add(group)
    shared = sorted(var for var, groups in mentions.items() if len(groups) > 1)
    if shared:
        raise ValueError(_shared_message(shared))

    log_p = []
    for group, group_factors in enumerate(factors):
        kept = structure.group_plates(group)
        try:
            result = _contract(group_factors, (summed | plates) - frozenset(kept), plates)
        except ValueError as err:
            if "preserved var" in str(err):
                raise ValueError(_shared_message(sorted(enumerated))) from err
            raise
        log_p.append(_on_plates(result, kept, structure.group_shape(group)))
    return tuple(log_p), tr


def _contract(factors: list[Any], eliminate: frozenset, plates: frozenset) -> Any:
    """Sum out ``eliminate`` from the product of ``factors`` in the log semiring, the
    plates among them multiplied out (funsor's plated sum-product); ``None`` for no
    factors.
    """
    import funsor

    if not factors:
        return None
    with funsor.interpretations.lazy:
        lazy = funsor.sum_product.sum_product(
            funsor.ops.logaddexp, funsor.ops.add, factors, eliminate=eliminate, plates=plates
        )
    return funsor.optimizer.apply_optimizer(lazy)


def _on_plates(result: Any, kept: tuple[str, ...], shape: tuple[int, ...]) -> jax.Array:
    """A contracted factor as an array of ``shape`` over the ``kept`` plates (zeros for
    no factor; a kept plate the factors do not reach broadcasts).
    """
    if result is None:
        return jnp.zeros(shape)
    present = tuple(name for name in kept if name in result.inputs)
    data = result.align(present).data if present else result.data
    full = [size if name in present else 1 for name, size in zip(kept, shape)]
    return jnp.broadcast_to(jnp.reshape(data, full), shape)


_TIME, _PREV = "_time", "_PREV_"


def _unshifted(name: str) -> str:
    """The site a name refers to: ``_PREV_x`` (x one step back, in a ``scan``) is ``x``."""
    while name.startswith(_PREV):
        name = name[len(_PREV) :]
    return name


def _chain(
    step_factors: list[Any], time: str, summed: frozenset, plates: frozenset, sites: dict
) -> Any:
    """The factors of a ``scan``'s steps with its time dimension summed out: each step's
    factors contracted onto the chain's state (``_PREV_x``, ``x``) and the plates the
    chain lives in, then the steps multiplied in sequence (funsor's
    ``sequential_sum_product``), leaving a factor of the first and last states.
    """
    import funsor

    inputs = frozenset(v for f in step_factors for v in f.inputs)
    prevs = frozenset(v for v in inputs if v.startswith(_PREV))
    if any(v.startswith(_PREV + _PREV) for v in prevs):
        raise NotImplementedError(
            "A scan with history > 1 (a state depending on more than the previous step) "
            "is not summed out here yet; a Python loop under markov(history=...) is."
        )
    states = prevs | {_unshifted(v) for v in prevs}
    chain_plates = frozenset(
        frame.name
        for v in states
        if v in sites
        for frame in sites[v]["cond_indep_stack"]
        if frame.dim is not None
    )
    keep = states | chain_plates | {time}
    trans = _contract(step_factors, (summed | plates) - keep, plates)
    step = funsor.Variable(time, trans.inputs[time])
    return funsor.sum_product.sequential_sum_product(
        funsor.ops.logaddexp,
        funsor.ops.add,
        trans,
        step,
        {v: _unshifted(v) for v in prevs},
    )


def _shared_message(names: list[str]) -> str:
    return (
        f"Enumerated site(s) {names} are shared by the elements of a plate the "
        "importance weight is formed per element of (local weighting): summed out, they "
        "couple those elements. Use weighting='joint', or move the site(s) inside the plate."
    )
