"""The cache protocol: the two calls a model's attention makes of any KV cache.

A model step over a cache makes one call before its layers and one in each layer:

    cache, step = cache.begin_step(seq_idx, num_tokens, num_chunk_tokens, max_len=..., impl=...)
    for layer in ...:
        out, cache = cache.attend(layer, q, k, v, step)    # writes k, v; attends q over the row

`begin_step` makes room for the step's tokens once for every layer (a paged cache takes blocks and
fixes the slots each token lands in) and returns a `Step`: the positions of the new tokens and
whatever each layer needs to write and read them. `attend` writes one layer's K and V for those
tokens and returns causal attention of q over everything the row holds. A model needs nothing
else, and knows no cache's internals: `examples/gpt2.py` is a second model family on it. (One
optional call: `PagedKVState.attend_groups(layer, [(q, k, v, step), ...])`, for a step of two
groups of rows, the engine's decode rows and prefill chunks, writes every group's K and V before
any group's attention (on a mesh, group by group); a model falls back to `attend` per group where
a cache lacks it.)

Implementations: `PagedKVState` and `ContiguousKVState` (pytrees: usable inside `jax.jit` and
`lax.scan`, each call returns a new cache), `KVCache` and `PagedKVCacheAdapter` (the seed's stateful
facades: eager, changed in place, they return themselves), and `NoCache` below (one causal pass
over the tokens given, nothing kept).

Axis letters: B sequences in the step, T tokens per sequence, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct

IMPLS = ("auto", "kernel", "reference")


@struct.dataclass
class Step:
    """What every layer of one model step needs to know about the cache.

    `positions` are the new tokens' positions in their sequences (row b's tokens continue from
    what row b already holds; padding tokens get -1, which see nothing); `num_tokens` says how
    many of the T are real (the rest is right padding); `ok` is False when the cache had no room,
    and then nothing was written. `slots` is the paged cache's slot mapping (None for other caches).
    """

    seq_idx: jax.Array | None  # [B] int32 block-table rows (paged); None where rows are the batch
    positions: jax.Array  # [B, T] int32
    num_tokens: jax.Array  # [B] int32
    ok: jax.Array  # [] bool
    slots: jax.Array | None = None  # [B, T] int32 flat pool slots (paged)
    max_len: int | None = struct.field(pytree_node=False, default=None)  # static bound on positions read
    impl: str = struct.field(pytree_node=False, default="auto")  # attention path: see IMPLS


def new_positions(starts: jax.Array, num_tokens: jax.Array, num_chunk_tokens: int) -> jax.Array:
    """Positions [B, T] of T new tokens after each row's starts [B]; a token past its row's
    num_tokens [B] (right padding, or the token of a decode row that is not active) gets -1, which
    sees nothing, so attention reads no K/V for it (an engine row that finished early in a
    multi-step decode call would otherwise read its whole context in every step left)."""
    offsets = jnp.arange(num_chunk_tokens, dtype=jnp.int32)[None, :]
    return jnp.where(offsets < num_tokens[:, None], starts[:, None] + offsets, -1)


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def attend_each(cache, layer, groups):
    """`attend` for each group of rows of one step, one after another: groups is a list of (q, k, v,
    Step). Returns ([out [B, T, H, D] per group], cache). (What `PagedKVState.attend_groups` does
    in one write and then the reads, for a cache without it.)"""
    outs = []
    for group in groups:
        out, cache = cache.attend(layer, *group)
        outs.append(out)
    return outs, cache


class KVCacheProtocol(Protocol):
    """What a model needs of a KV cache (see the module docstring)."""

    def begin_step(self, seq_idx: jax.Array | None, num_tokens: jax.Array, num_chunk_tokens: int, *,
                   max_len: int | None = None, impl: str = "auto") -> tuple[Any, Step]:
        """Makes room for num_tokens [B] new tokens per row (T = num_chunk_tokens, static) in every layer.

        Returns (cache, step); when step.ok is False the cache is unchanged and the layers' writes drop.
        """
        ...

    def attend(self, layer: Any, q: jax.Array, k: jax.Array, v: jax.Array, step: Step) -> tuple[jax.Array, Any]:
        """Writes k, v [B, T, K, D] of the step's tokens into `layer`, then attends q [B, T, H, D]
        causally over the row's cached positions. Returns (out [B, T, H, D], cache)."""
        ...


class NoCache:
    """The protocol with nothing kept: each call is one causal pass over the tokens it is given."""

    def begin_step(self, seq_idx, num_tokens, num_chunk_tokens: int, *, max_len=None, impl="auto"):
        starts = jnp.zeros(num_tokens.shape, jnp.int32)
        return self, Step(seq_idx=seq_idx, positions=new_positions(starts, num_tokens, num_chunk_tokens),
                          num_tokens=num_tokens, ok=jnp.asarray(True), max_len=max_len, impl=check_impl(impl))

    def attend(self, layer, q, k, v, step: Step):
        from jaxpaged.attention import attend

        return attend(q, k, v, step.positions, step.num_tokens), self
