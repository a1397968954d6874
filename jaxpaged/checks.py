"""Argument checks shared by the pure ops and the facades: every rule on shapes, dtypes, indices and counts.

Two kinds, for the two places a wrong argument can be seen:
- host checks run in Python on what is known before any device work (static shapes and dtypes,
  static sizes, Python ints, the facades' concrete arguments) and raise an error that names the
  argument and its allowed range, before anything changes;
- in-jit checks are cheap vector operations on the small index arrays ([B] or [B, M], never the
  pools): they turn what Python cannot see (a traced index) into a padding row or a refusal.

Axis letters: B rows of a batch, T tokens in a chunk, K kv heads, D head dim.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- host checks


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, low: int = 0) -> int:
    """value as an int; raises TypeError unless it is an integer, ValueError if it is below `low`."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_index(value: Any, size: int, name: str) -> int:
    """value as an int in [0, size); raises IndexError (TypeError for a non-integer) naming the range."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int in [0, {size}), got {value!r}")
    if not 0 <= value < size:
        raise IndexError(f"{name} must be an int in [0, {size}), got {value!r}")
    return int(value)


def _shape_text(axes: str, sizes: dict) -> str:
    return "[" + ", ".join(f"{axis}={sizes[axis]}" if axis in sizes else axis for axis in axes) + "]"


def _has_shape(x: Any, axes: str, sizes: dict) -> bool:
    return len(x.shape) == len(axes) and all(x.shape[i] == sizes[axis] for i, axis in enumerate(axes) if axis in sizes)


def check_kv(k: Any, v: Any, axes: str, dtype: Any, **sizes: int) -> tuple[jax.Array, jax.Array]:
    """k and v as jax arrays, after checking they share one shape laid out as `axes` (e.g. "BTKD"),
    with the given sizes (e.g. K=2), in exactly `dtype`: never a silent cast.

    Raises TypeError for a non-array or another dtype, ValueError for a shape.
    """
    dtype = jnp.dtype(dtype)
    for name, x in (("k", k), ("v", v)):
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if jnp.dtype(x.dtype) != dtype:
            raise TypeError(f"{name} has dtype {x.dtype}, the cache holds {dtype.name}")
    if not _has_shape(k, axes, sizes):
        raise ValueError(f"k must be {_shape_text(axes, sizes)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    return jnp.asarray(k), jnp.asarray(v)


def check_index_array(x: Any, name: str, axes: str | None, **sizes: int) -> None:
    """Raises unless x holds integers laid out as `axes` (e.g. "B", sizes B=3; None: any shape).

    Only the static shape and dtype are read, so x may be traced. TypeError for a non-integer
    dtype, ValueError for a shape.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None or jnp.dtype(dtype) == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {getattr(dtype, 'name', type(x).__name__)}")
    if axes is not None and not _has_shape(x, axes, sizes):
        raise ValueError(f"{name} must be {_shape_text(axes, sizes)}, got shape {tuple(x.shape)}")


def num_tokens_array(num_tokens: Any, batch: int, chunk: int) -> jax.Array:
    """A facade's num_tokens read on the host: [B] ints >= 0 (None means all T), clipped to T.

    Raises TypeError for non-integers, ValueError for another shape or a negative count.
    """
    if num_tokens is None:
        return jnp.full((batch,), chunk, jnp.int32)
    values = np.asarray(num_tokens)
    check_index_array(values, "num_tokens", "B", B=batch)
    if values.size and values.min() < 0:
        raise ValueError(f"num_tokens must be >= 0 (valid tokens per row; more than T={chunk} is clipped), "
                         f"got {values.tolist()}")
    return jnp.asarray(np.minimum(values, chunk), jnp.int32)


def check_not_donated(state: Any, name: str) -> None:
    """Raises ValueError if `state` was donated to an earlier jitted call (its buffers are deleted)."""
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.is_deleted():
            raise ValueError(f"{name} was donated to an earlier call, which deleted its buffers; "
                             f"pass the {name} that call returned")


def guard(jitted: Callable, num_layers: Callable[[Any], int] | None = None) -> Callable:
    """`jitted` (whose first argument is the state) behind host checks made on each call from Python:
    the state is not a donated one, and a `layer` argument given as a Python int lies in
    [0, num_layers(state)) (IndexError otherwise). A traced layer is left to the op's in-jit rule.

    The result forwards `lower`, `trace`, `eval_shape`, `clear_cache` and `_cache_size` to `jitted`.
    """
    parameters = list(inspect.signature(jitted).parameters.values())
    state_name = parameters[0].name
    layer = next(((i, p.default) for i, p in enumerate(parameters) if p.name == "layer"), None)

    @functools.wraps(jitted)
    def call(*args, **kwargs):
        state = args[0] if args else kwargs[state_name]
        check_not_donated(state, state_name)
        if layer is not None:
            position, default = layer
            value = args[position] if len(args) > position else kwargs.get("layer", default)
            if not isinstance(value, jax.Array):
                check_index(value, num_layers(state), "layer")
        return jitted(*args, **kwargs)

    for attribute in ("lower", "trace", "eval_shape", "clear_cache", "_cache_size"):
        setattr(call, attribute, getattr(jitted, attribute))
    return call


# ----------------------------------------------------------------------------- in-jit checks


def in_range(index: Any, size: int) -> Any:
    """Whether 0 <= index < size: a Python bool for a Python int, a bool array otherwise."""
    if is_int(index):
        return 0 <= index < size
    return (index >= 0) & (index < size)


def padding_rows(seq_idx: jax.Array, num_rows: int) -> jax.Array:
    """seq_idx [B] with every index that names no row (negative, or num_rows and above) made num_rows,
    the padding row: reads through it are empty and writes through it are dropped."""
    return jnp.where(in_range(seq_idx, num_rows), seq_idx, num_rows)


def repeats_a_row(rows: jax.Array, num_rows: int) -> jax.Array:
    """Whether a real row appears twice in rows [B] (padding rows, index num_rows, may repeat).

    A count per row of the table, O(B + rows): no [B, B] comparison."""
    counts = jnp.zeros((num_rows,), jnp.int32).at[rows].add(1, mode="drop", wrap_negative_indices=False)
    return jnp.any(counts > 1)
