"""JAX plumbing shared by every layer: argument validation, how particles are
vectorized, and every use of JAX's internals (jaxprs, closure hoisting, custom rules).

Nothing here knows about NumPyro or about importance weights.
"""

from __future__ import annotations

from collections.abc import Callable
import hashlib
import math
import numbers
import os
import sys
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr, Literal, jaxpr_as_fun
import jax.numpy as jnp
import numpy as np

try:  # public from JAX 0.11
    from jax.interpreters.partial_eval import convert_constvars_jaxpr as _convert_constvars_jaxpr
except ImportError:  # JAX 0.10
    from jax._src.interpreters.partial_eval import (
        convert_constvars_jaxpr as _convert_constvars_jaxpr,
    )

__all__ = [
    "check_positive_int",
    "check_vectorize",
    "NO_FORWARD_MODE",
    "call_backward_defined",
    "hoist_closure",
    "nbytes",
    "peak_bytes",
    "Static",
    "split_static",
    "CONCRETIZATION_ERRORS",
    "vmap_map",
    "lax_map",
    "num_shards",
    "check_real",
    "VectorizeFn",
    "jaxpr_dependencies",
    "jaxpr_reaches",
    "map_particles",
    "LIBRARY_DIRS",
    "caller_stacklevel",
]


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, or raise naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return int(value)


def check_vectorize(vectorize_particles: Any) -> VectorizeFn:
    """Return how particles are mapped: ``True`` is :func:`jax.vmap`, ``False``
    :func:`jax.lax.map`, a callable ``f(fn, xs)`` itself; a TypeError otherwise.
    """
    if vectorize_particles is True:
        return vmap_map
    if vectorize_particles is False:
        return lax_map
    if not callable(vectorize_particles):
        raise TypeError(
            "`vectorize_particles` must be True (jax.vmap), False (jax.lax.map) or a "
            f"callable f(fn, xs) such as shard_particles(mesh), got {vectorize_particles!r}."
        )
    return vectorize_particles


#: How JAX refuses forward-mode differentiation of a ``custom_vjp`` function.
NO_FORWARD_MODE = "can't apply forward-mode autodiff"


def call_backward_defined(
    fn: Callable, *args: Any, fallback: Callable | None = None, what: str = ""
) -> Any:
    """``fn(*args)`` for a ``fn`` defined by a custom backward pass (``custom_vjp``).

    Under forward-mode differentiation (``SVI.run(...,
    forward_mode_differentiation=True)``, NumPyro's way to fit models with
    ``lax.while_loop``) JAX cannot differentiate such a function: there
    ``fallback(*args)`` is returned instead, or, without a fallback, a ValueError
    says that ``what`` has no forward-mode derivative.
    """
    try:
        return fn(*args)
    except TypeError as err:
        if NO_FORWARD_MODE not in str(err):
            raise
        if fallback is None:
            raise ValueError(
                f"{what} is defined by a custom backward pass, which has no forward-mode "
                "derivative, so it cannot run under forward_mode_differentiation=True. "
                "Use gradient_estimator='reparam' or 'stl', or reverse mode."
            ) from None
        return fallback(*args)


def hoist_closure(fn: Callable, *args: Any) -> tuple[Callable, list[Any]]:
    """Like :func:`jax.closure_convert`, but hoisting *every* traced value ``fn``
    closes over, whatever its dtype, so a ``custom_vjp`` around the converted
    function never closes over a tracer. (``closure_convert`` leaves integer and
    key tracers in the closure; under ``vmap`` they escape, e.g. in
    ``jax.grad`` of a ``vmap``-ped loss.) Concrete constants stay in the closure.

    Returns ``(converted, hoisted)``: ``converted(*args, *hoisted)`` equals
    ``fn(*args)``.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    traced = [isinstance(c, jax.core.Tracer) for c in closed.consts]
    hoisted = [c for c, t in zip(closed.consts, traced) if t]
    kept = [c for c, t in zip(closed.consts, traced) if not t]
    # The consts become leading inputs of a jaxpr that holds none: the closed jaxpr
    # holds the hoisted tracers (and from JAX 0.11 the open one does too), and a
    # custom_vjp's backward pass that kept either alive would leak them past their
    # trace.
    jaxpr = _convert_constvars_jaxpr(closed.jaxpr)
    del closed
    out_tree = jax.tree.structure(out_shape)
    num_args = len(args)

    def converted(*args_and_hoisted: Any) -> Any:
        args, lifted = args_and_hoisted[:num_args], iter(args_and_hoisted[num_args:])
        kept_iter = iter(kept)
        consts = [next(lifted) if t else next(kept_iter) for t in traced]
        out = jaxpr_as_fun(ClosedJaxpr(jaxpr, []))(*consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, out)

    return converted, hoisted


def nbytes(var: Any) -> int:
    aval = var.aval
    if not (hasattr(aval, "shape") and hasattr(aval, "dtype")):
        return 0
    return math.prod(aval.shape) * aval.dtype.itemsize


def peak_bytes(jaxpr: Any) -> int:
    """Peak total size of the arrays alive at once while a jaxpr runs in order.

    A value is alive from the equation that makes it to its last use; a nested
    jaxpr (``jit``, ``custom_vjp``, ...) adds its own peak while its equation runs.
    XLA fuses and reuses buffers, so the true peak is lower (for the MNIST VAE see
    ``benchmarks/RESULTS.md``): an upper bound, cheap to compute (no compilation).
    """
    last: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if not isinstance(var, Literal):
                last[var] = i
    for var in jaxpr.outvars:
        if not isinstance(var, Literal):
            last[var] = len(jaxpr.eqns)
    live = {var: nbytes(var) for var in [*jaxpr.invars, *jaxpr.constvars]}
    current = peak = sum(live.values())
    for i, eqn in enumerate(jaxpr.eqns):
        inner = 0
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    inner = max(inner, peak_bytes(sub))
        made = {var: nbytes(var) for var in eqn.outvars}
        peak = max(peak, current + max(inner, sum(made.values())))
        live.update(made)
        current += sum(made.values())
        for var in eqn.invars:
            if not isinstance(var, Literal) and last.get(var) == i and var in live:
                current -= live.pop(var)
    return peak


class Static:
    """The non-array leaves of the call's arguments and their tree structure:
    static under ``jit`` (hashed by value, arrays by their contents, anything else
    unhashable by identity).
    """

    def __init__(self, treedef: Any, leaves: tuple, slots: tuple[bool, ...]) -> None:
        self.treedef, self.leaves, self.slots = treedef, leaves, slots
        self._cached_key: tuple | None = None

    def _key(self) -> tuple:
        if self._cached_key is None:
            self._cached_key = self._compute_key()
        return self._cached_key

    def _compute_key(self) -> tuple:
        def one(v: Any) -> Any:
            if isinstance(v, (jax.Array, np.ndarray, np.generic)):
                array = np.asarray(v)
                digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
                return ("array", array.shape, str(array.dtype), digest)
            try:
                hash(v)
            except TypeError:
                return ("id", id(v))
            return (type(v), v)

        return (self.treedef, self.slots, tuple(one(v) for v in self.leaves))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Static) and self._key() == other._key()

    def merge(self, dynamic: list) -> Any:
        dyn, stat = iter(dynamic), iter(self.leaves)
        leaves = [next(dyn) if is_array else next(stat) for is_array in self.slots]
        return jax.tree.unflatten(self.treedef, leaves)


def split_static(tree: Any, concrete: bool = False) -> tuple[list, Static]:
    """The array leaves of ``tree`` (dynamic under ``jit``) and the rest (static).
    With ``concrete=True`` every leaf is static, arrays keyed by their contents.
    """
    leaves, treedef = jax.tree.flatten(tree)
    slots = tuple(
        not concrete and isinstance(v, (jax.Array, np.ndarray, np.generic)) for v in leaves
    )
    dynamic = [v for v, is_array in zip(leaves, slots) if is_array]
    static = tuple(v for v, is_array in zip(leaves, slots) if not is_array)
    return dynamic, Static(treedef, static, slots)


#: What JAX raises when traced code needs a concrete value (``np.unique(x)``,
#: ``int(x)``, ``if x:`` on a tracer).
CONCRETIZATION_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def vmap_map(fn: Callable, xs: Any) -> Any:
    return jax.vmap(fn)(xs)


def lax_map(fn: Callable, xs: Any) -> Any:
    return jax.lax.map(fn, xs)


def chunked(vectorize: VectorizeFn, chunk: int) -> VectorizeFn:
    """``vectorize`` (an ``f(fn, xs)`` particle map) applied ``chunk`` particles at a
    time, one chunk after another (:func:`jax.lax.map` over the chunks; the last is
    padded with repeats of the first particles, whose results are dropped). Each
    particle's result is the one ``vectorize`` gives it alone.
    """

    def mapped(fn: Callable, xs: Any) -> Any:
        n = jax.tree.leaves(xs)[0].shape[0]
        if chunk >= n:
            return vectorize(fn, xs)
        num = -(-n // chunk)
        pad = num * chunk - n

        def split(x: jax.Array) -> jax.Array:
            x = jnp.concatenate([x, x[:pad]]) if pad else x
            return x.reshape((num, chunk) + x.shape[1:])

        out = jax.lax.map(lambda c: vectorize(fn, c), jax.tree.map(split, xs))
        return jax.tree.map(lambda y: y.reshape((num * chunk,) + y.shape[2:])[:n], out)

    return mapped


def num_shards(x: Any) -> int:
    """Into how many pieces an array is split across devices (1 if replicated)."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or not hasattr(sharding, "shard_shape") or not np.ndim(x):
        return 1
    shard = sharding.shard_shape(np.shape(x))
    return max(1, math.prod(np.shape(x)) // max(1, math.prod(shard)))


def check_real(
    value: float, name: str, low: float | None = None, high: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite real number, got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value!r}.")
    return float(value)


VectorizeFn = Callable[[Callable, jax.Array], Any]


def jaxpr_dependencies(jaxpr: Any) -> list[set[int]]:
    """For each output of a jaxpr, the indices of the inputs it depends on
    (conservatively: every output of an equation depends on all of its inputs).
    """
    deps: dict[Any, frozenset[int]] = {v: frozenset([i]) for i, v in enumerate(jaxpr.invars)}
    for eqn in jaxpr.eqns:
        found = frozenset().union(
            *(deps.get(v, frozenset()) for v in eqn.invars if not isinstance(v, Literal))
        )
        if found:
            for v in eqn.outvars:
                deps[v] = found
    return [set() if isinstance(v, Literal) else set(deps.get(v, ())) for v in jaxpr.outvars]


def jaxpr_reaches(jaxpr: Any) -> list[bool]:
    """For each output of a jaxpr, whether it depends on any input."""
    return [bool(d) for d in jaxpr_dependencies(jaxpr)]


def map_particles(vectorize: VectorizeFn, fn: Callable, xs: Any) -> Any:
    if jax.tree.leaves(xs)[0].shape[0] == 1:  # no particle map: avoids batch-of-one work
        out = fn(jax.tree.map(lambda v: v[0], xs))
        return jax.tree.map(lambda v: jnp.expand_dims(jnp.asarray(v), 0), out)
    return vectorize(fn, xs)


LIBRARY_DIRS = tuple(
    os.path.dirname(m.__file__) + os.sep
    for m in (sys.modules["jax"], sys.modules["numpyro"], sys.modules[__name__.split(".")[0]])
)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside
    this package, NumPyro and JAX: the user's line.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level
