"""The classic contiguous KV cache as a pytree and pure jitted functions: the baseline the paged cache is measured against.

Axis letters: L layers, B batch rows, K kv heads, S max positions, T tokens in a chunk, D head dim.

The paged ops' rules hold here too (`jaxpaged.ops`): num_tokens is clipped to [0, T]; a layer
given as a Python int outside [0, L) raises IndexError, a traced one refuses the append (ok=False,
nothing changed) and reads as empty; a donated state passed again raises ValueError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxpaged import checks
from jaxpaged.protocol import Step, check_impl, new_positions


@struct.dataclass
class ContiguousKVState:
    """Preallocated K and V, [B, K, S, D] per layer, and positions written per layer and row."""

    k: jax.Array  # [L, B, K, S, D]
    v: jax.Array  # [L, B, K, S, D]
    seq_lens: jax.Array  # [L, B] int32

    # -- the cache protocol (jaxpaged.protocol): what a model's attention calls; batch row b is row b

    def begin_step(self, seq_idx, num_tokens, num_chunk_tokens: int, *, max_len=None, impl="auto"):
        """The new tokens' positions after each row's length; ok is False when a row would pass S."""
        starts = self.seq_lens[0]  # [B]
        ok = jnp.all(starts + jnp.clip(num_tokens, 0, num_chunk_tokens) <= self.k.shape[3])
        return self, Step(seq_idx=None, positions=new_positions(starts, num_tokens, num_chunk_tokens),
                          num_tokens=num_tokens, ok=ok, max_len=max_len, impl=check_impl(impl))

    def attend(self, layer, q, k, v, step: Step):
        """Appends k, v [B, T, K, D] to `layer`, then attends q [B, T, H, D] over the rows (reference path)."""
        from jaxpaged.attention import attend

        state, _ = contiguous_append(self, layer, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), step.num_tokens)
        k_all, v_all, seq_lens = contiguous_read(state, layer)  # [B, K, S, D]
        return attend(q, jnp.swapaxes(k_all, 1, 2), jnp.swapaxes(v_all, 1, 2), step.positions, seq_lens), state


def init_contiguous(num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, dtype) -> ContiguousKVState:
    """Zeroed buffers for `batch_size` rows of up to `max_len` positions."""
    shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
    return ContiguousKVState(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), seq_lens=jnp.zeros((num_layers, batch_size), jnp.int32)
    )


def _num_layers(state: ContiguousKVState) -> int:
    return state.k.shape[0]


@functools.partial(checks.guard, num_layers=_num_layers)
@functools.partial(jax.jit, donate_argnames=("state",))
def contiguous_append(state: ContiguousKVState, layer, k: jax.Array, v: jax.Array, num_tokens=None):
    """Writes k, v [B, K, T, D] after each row's length in `layer`. DONATES state.

    Args:
      layer: [] int; a Python int must lie in [0, L).
      num_tokens: [B] int32 valid tokens per row (the rest is padding); default T. Clipped to [0, T].

    Returns:
      (state, ok); ok is False, and nothing changes, when a row would pass max_len or a traced
      layer is out of range.
    """
    num_layers, batch, heads, max_len, head_dim = state.k.shape
    k, v = checks.check_kv(k, v, "BKTD", state.k.dtype, B=batch, K=heads, D=head_dim)
    chunk = k.shape[2]
    if num_tokens is None:
        num_tokens = jnp.full((batch,), chunk, jnp.int32)
    checks.check_index_array(num_tokens, "num_tokens", "B", B=batch)
    num_tokens = jnp.clip(num_tokens, 0, chunk)
    layer_ok = checks.in_range(layer, num_layers)
    layer = jnp.where(layer_ok, layer, 0)
    starts = state.seq_lens[layer]  # [B]
    ok = layer_ok & jnp.all(starts + num_tokens <= max_len)
    t = jnp.arange(chunk, dtype=jnp.int32)[None, :]
    positions = jnp.where((t < num_tokens[:, None]) & ok, starts[:, None] + t, max_len)  # [B, T]; max_len is dropped
    rows = jnp.arange(batch)[:, None]
    new_k = state.k.at[layer, rows, :, positions].set(jnp.swapaxes(k, 1, 2), mode="drop")
    new_v = state.v.at[layer, rows, :, positions].set(jnp.swapaxes(v, 1, 2), mode="drop")
    seq_lens = state.seq_lens.at[layer].add(jnp.where(ok, num_tokens, 0))
    return ContiguousKVState(k=new_k, v=new_v, seq_lens=seq_lens), ok


@functools.partial(checks.guard, num_layers=_num_layers)
@jax.jit
def contiguous_read(state: ContiguousKVState, layer):
    """One layer's K and V, [B, K, S, D] each, zero past each row's length, and seq_lens [B].

    A layer given as a Python int must lie in [0, L) (IndexError); a traced one out of range reads
    as empty.
    """
    layer_ok = checks.in_range(layer, state.k.shape[0])
    layer = jnp.where(layer_ok, layer, 0)
    seq_lens = jnp.where(layer_ok, state.seq_lens[layer], 0)
    positions = jnp.arange(state.k.shape[3])
    live = (positions[None, :] < seq_lens[:, None])[:, None, :, None]  # [B, 1, S, 1]
    k, v = state.k[layer], state.v[layer]
    return jnp.where(live, k, jnp.zeros_like(k)), jnp.where(live, v, jnp.zeros_like(v)), seq_lens
