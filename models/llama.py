"""MiniLLM: a Llama-family decoder in flax.nnx that takes a KV cache in and returns it.

Architecture: token embedding, L blocks of (RMSNorm, grouped-query attention with rotary position
embeddings, RMSNorm, SwiGLU MLP), a final RMSNorm and a tied or separate output projection. Qwen3
adds an RMSNorm over each head of q and k before the rotary embedding (`ModelConfig.qk_norm`).

The model knows no cache's internals: each attention layer makes one call of the cache protocol
(`jaxpaged.protocol`), so every cache serves it the same way.
- `model(input_ids)`: one causal pass over the whole sequence, no cache; returns logits.
- `model(input_ids, kv_cache=cache)` with a stateful `KVCache` or `PagedKVCacheAdapter` (the seed's
  one-liner): the facade is updated in place; returns logits.
- `model.step(input_ids, cache, ...)` with a pure `PagedKVState` (ragged batch, block-table rows) or
  `ContiguousKVState`: returns (logits, new cache, ok). This is the path jitted generation uses.

Axis letters: B batch, T tokens, S cached positions, V vocab, E width, F MLP width,
H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxpaged.protocol import NoCache, Step, attend_each
from jaxpaged.models.config import ModelConfig


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, normalised in float32 and scaled in the model dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.broadcast_to(self.weight[...], x.shape) * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embeddings in the rotate-half layout. x: [B, T, N, D]; positions: [B, T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Linear(nnx.Module):
    """x @ kernel, no bias: x [..., I], kernel [I, *O] -> [..., *O].

    O is one axis for a plain projection, and several for projections of one input held side by
    side: the MLP's gate and up as [E, 2, F], attention's q, k and v as [E, K, G + 2, D] (each kv
    head's G query heads, then its k and its v). One matrix product then reads them all; with
    separate weights XLA's GPU compiler merges the products itself but concatenates the weights
    inside its own matrix-product kernel every call: on an H200 llama-1b's decode step at 256 rows
    took 4.50 ms that way, 4.10 ms side by side (benchmarks/NOTES.md). Each output axis stays an
    axis of the weight, so a mesh splits one of them (F, or the kv heads K) and every device keeps
    whole parts of each projection (`jaxpaged.models.parallel.param_spec`).

    On a GPU a single row ([1, 1, E]: batch-1 decode) is multiplied as two, the second zeros
    (`two_rows`; default: on a GPU backend). XLA's GPU compiler rewrites a vector-matrix product
    whose operands hold fewer than 10M elements (its dot strength reduction: llama-1b's q, k, v and
    o projections, every projection of SmolLM2-135M) into a multiply fusion that writes the
    weight-sized product and a reduction that reads it back; with two rows it stays one GEMM
    fusion. On an H100 that took batch-1 decode from 515 to 674 tokens/s for llama-1b and from 618
    to 747 for SmolLM2's shape (bfloat16, random weights; benchmarks/NOTES.md). On the CPU the
    two-row product is the slower one (2.3x a 2048 x 2048 float32 matrix-vector product), so it
    stays one row there.
    """

    def __init__(self, in_features: int, out_shape: int | tuple[int, ...], *, dtype=jnp.float32,
                 two_rows: bool | None = None, rngs: nnx.Rngs):
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                                 out_axis=tuple(range(1, 1 + len(out_shape))))  # flax's lecun_normal
        self.kernel = nnx.Param(init(rngs.params(), (in_features, *out_shape), jnp.dtype(dtype)))
        self.two_rows = jax.default_backend() == "gpu" if two_rows is None else two_rows

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        x = x.astype(kernel.dtype)
        padded = self.two_rows and math.prod(x.shape[:-1]) == 1
        rows = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0))) if padded else x  # [2, I] or x
        y = jax.lax.dot_general(rows, kernel, (((rows.ndim - 1,), (0,)), ((), ())))  # [..., *O]
        return y[:1].reshape(*x.shape[:-1], *kernel.shape[1:]) if padded else y


def _linear(in_features: int, out_shape: int | tuple[int, ...], config: ModelConfig, rngs: nnx.Rngs) -> Linear:
    return Linear(in_features, out_shape, dtype=config.dtype, rngs=rngs)


@struct.dataclass
class MixedStep:
    """A step of two groups of rows at once (the engine's mixed batch): `decode` rows of one token
    each and prefill chunks, their Steps from `begin_step` and `begin_packed_step`. The token-wise
    work (norms, projections, MLP) runs on the tokens of both as one flat [1, Bd + Np, E] array, each
    weight read once: the decode rows' tokens, then the chunks' packed one after another, each chunk
    padded to whole tiles of Q tokens. Attention runs per group, after both groups' K/V are written
    (the cache's `attend_groups`, where it has one): a decode row is never padded to a chunk, and
    the chunks' q, k and v are their packed tokens viewed as tiles [Bt, Q] (a reshape, no gather),
    each tile a row of the prefill kernel reading its chunk's blocks."""

    decode: Step | None  # positions [Bd, 1]; None where no row decodes
    prefill: Step  # the tiles: positions [Bt, Q]

    @property
    def decoded(self) -> int:
        """Decode rows: the flat axis's first Bd tokens (static)."""
        return 0 if self.decode is None else self.decode.positions.shape[0]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        self.config = c
        # [E, K, G + 2, D]: each kv head's G query heads, then its k and its v
        self.qkv_proj = _linear(c.hidden_size, (c.num_kv_heads, c.group_size + 2, c.head_dim), c, rngs)
        self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, c, rngs)
        if c.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, jnp.dtype(c.dtype))
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, jnp.dtype(c.dtype))

    def __call__(self, x, cache, layer, step: Step | MixedStep):
        """x [B, T, E] with a Step, or every token of a MixedStep's two groups as [1, N, E]."""
        qkv = self.qkv_proj(x)  # [B, T, K, G + 2, D]
        batch, num_tokens, *_, head_dim = qkv.shape
        q = qkv[..., :-2, :].reshape(batch, num_tokens, -1, head_dim)  # [B, T, H, D]: head h reads kv head h // G
        k, v = qkv[..., -2, :], qkv[..., -1, :]  # [B, T, K, D]
        if not isinstance(step, MixedStep):
            out, cache = self._attend(q, k, v, cache, layer, step)
            return self.o_proj(out), cache
        decoded, tiles, tile_tokens = step.decoded, *step.prefill.positions.shape
        groups = [] if step.decode is None else [(*(y[0, :decoded, None] for y in (q, k, v)), step.decode)]
        groups.append((*(y[0, decoded:].reshape(tiles, tile_tokens, *y.shape[2:]) for y in (q, k, v)),
                       step.prefill))  # [Bt, Q, H or K, D]
        groups = [self._heads(*group) for group in groups]
        if hasattr(cache, "attend_groups"):  # every group's K/V written, then each group's attention
            outs, cache = cache.attend_groups(layer, groups)
        else:
            outs, cache = attend_each(cache, layer, groups)
        flat = [out.reshape(-1, out.shape[-2] * out.shape[-1]) for out in outs]  # [Bd, H * D], [Np, H * D]
        return self.o_proj(jnp.concatenate(flat)[None]), cache

    def _attend(self, q, k, v, cache, layer, step: Step):
        """Attention of one group of rows: q [B, T, H, D], k and v [B, T, K, D] -> [B, T, H * D]."""
        batch, num_tokens = q.shape[:2]
        out, cache = cache.attend(layer, *self._heads(q, k, v, step))  # the cache protocol: write K/V, attend
        return out.reshape(batch, num_tokens, -1), cache

    def _heads(self, q, k, v, step: Step):
        """q [B, T, H, D], k and v [B, T, K, D] normed (Qwen3) and rotated at the step's positions;
        with the step, the arguments of the cache's `attend`."""
        c = self.config
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, step.positions, c.rope_theta), apply_rope(k, step.positions, c.rope_theta)
        return q, k, v, step


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.gate_up_proj = _linear(config.hidden_size, (2, config.intermediate_size), config, rngs)  # [E, 2, F]
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, config, rngs)

    def __call__(self, x):
        gate_up = self.gate_up_proj(x)  # [..., 2, F]
        return self.down_proj(jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :])


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, cache, layer, step: Step):
        attn_out, cache = self.self_attn(self.input_layernorm(x), cache, layer, step)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _stack_layers(layers: nnx.List) -> DecoderLayer:
    """L decoder layers as one DecoderLayer whose parameters carry a leading [L] axis (for lax.scan)."""
    split = [nnx.split(layer) for layer in layers]
    stacked = jax.tree.map(lambda *per_layer: jnp.stack(per_layer), *[state for _, state in split])
    return nnx.merge(split[0][0], stacked)


class MiniLLM(nnx.Module):
    """The Llama-family decoder. Build with `MiniLLM(config, rngs=nnx.Rngs(seed))`; load weights with
    jaxpaged.models.weights. Its parameter tree is the same on every backend: `layers` is a list of
    L decoder layers (a checkpoint saved anywhere loads anywhere); `scanned()` gives a stacked view
    for compiling one layer body instead of L.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_embeddings else _linear(config.hidden_size, config.vocab_size, config, rngs)

    def scanned(self) -> MiniLLM:
        """A view of this model with its layers stacked into one [L, ...] DecoderLayer, run by
        `lax.scan` inside jit with a pure cache: compile time does not grow with L (on a 2-core CPU,
        SmolLM2's 30 layers compile about 3x faster), at the cost of one copy of the layers' weights,
        made here, once. Its parameter tree differs from the model's: use it, never save it."""
        view = nnx.merge(*nnx.split(self))  # a new module sharing the arrays
        view.layers = _stack_layers(self.layers)
        return view

    def _logits(self, x):
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)

    def _run(self, input_ids, cache, step: Step, logit_index):
        x = self.embed_tokens(input_ids)  # [B, T, E]
        if isinstance(self.layers, nnx.List):  # layers kept apart: an unrolled loop, no weight slicing
            for layer, block in enumerate(self.layers):
                x, cache = block(x, cache, layer, step)
        else:  # the scanned() view: one traced layer body over [L, ...] weights

            def body(carry, per_layer):
                x, cache = carry
                params, layer = per_layer
                return nnx.merge(layer_def, params)(x, cache, layer, step), None

            layer_def, layer_params = nnx.split(self.layers)
            layers = (layer_params, jnp.arange(self.config.num_layers, dtype=jnp.int32))
            (x, cache), _ = jax.lax.scan(body, (x, cache), layers)
        x = self.norm(x)
        if isinstance(step, MixedStep):  # the flat token axis: the tokens we sample from, [S, E]
            x = x[0, logit_index]
        elif logit_index is not None:  # only the rows we sample from: [B, E]
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]
        return self._logits(x), cache

    def __call__(self, input_ids: jax.Array, kv_cache: Any = None, num_tokens: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) of input_ids [B, T].

        Without a cache, one causal pass. With a `KVCache` or `PagedKVCacheAdapter`, the tokens
        follow what the cache holds, and the cache is updated in place (the seed's one-liner).
        num_tokens: optional [B] valid tokens per row (right padding).
        """
        num_tokens = None if num_tokens is None else jnp.asarray(num_tokens, jnp.int32)
        return self.step(input_ids, NoCache() if kv_cache is None else kv_cache, num_tokens=num_tokens)[0]

    def step(self, input_ids: jax.Array, cache: Any, *, seq_idx: jax.Array | None = None,
             num_tokens: jax.Array | None = None, max_len: int | None = None, logit_index: jax.Array | None = None,
             impl: str = "auto"):
        """One step over any cache of the cache protocol (jaxpaged.protocol): append the tokens' K/V in
        every layer and attend. With a pure cache (`PagedKVState`, `ContiguousKVState`) it is a pure
        function, the path jitted generation takes.

        Args:
          input_ids: [B, T] int32; row b continues the sequence in block-table row seq_idx[b].
          cache: a `PagedKVState`, `ContiguousKVState`, `KVCache`, `PagedKVCacheAdapter` or `NoCache`.
          seq_idx: [B] int32 block-table rows (paged only; padding rows = max_seqs).
          num_tokens: [B] int32 valid tokens per row (right padding); default T.
          max_len: static bound on positions read from the paged cache.
          logit_index: [B] int32; if given, logits only at that token of each row: [B, V].
          impl: paged attention's path, "auto", "kernel" or "reference" (`jaxpaged.attention.choose_impl`).

        Returns:
          (logits [B, T, V] or [B, V] float32, cache, ok). ok is False when the cache had no room for
          the tokens; the cache is then unchanged and the logits are not to be used.
        """
        batch, length = input_ids.shape
        num_tokens = jnp.full((batch,), length, jnp.int32) if num_tokens is None else num_tokens
        cache, step = cache.begin_step(seq_idx, num_tokens, length, max_len=max_len, impl=impl)
        logits, cache = self._run(input_ids, cache, step, logit_index)
        return logits, cache, step.ok

    def mixed_step(self, last_tokens: jax.Array | None, tokens: jax.Array, cache: Any, *, seq_idx: jax.Array,
                   num_tokens: jax.Array, tile_row: jax.Array, tile_start: jax.Array, last_at: jax.Array,
                   active: jax.Array | None = None, decode_idx: jax.Array | None = None, max_len: int | None = None,
                   impl: str = "auto"):
        """Prefill chunks packed on one token axis, and a decode step of other rows in the same pass
        (`MixedStep`); the token-wise work runs on the chunks' tokens (each padded to whole tiles), not
        on chunks padded to the longest, and no shape depends on the longest chunk.

        Args:
          last_tokens: [Bd] int32, each decode row's last token, or None for no decode rows; active: [Bd]
            bool (inactive rows write nothing); decode_idx: [Bd] int32, their block-table rows.
          tokens: [Np] int32, the chunks' tokens one after another, each chunk starting a tile of Q =
            Np / Bt tokens (`jaxpaged.engine.runner.pack_chunks`).
          seq_idx: [C] int32, the chunks' block-table rows (padding rows = max_seqs); num_tokens: [C]
            int32 tokens per chunk.
          tile_row: [Bt] int32, the chunk of each tile (C or more: a padding tile); tile_start: [Bt]
            int32, the tile's first token counted in its chunk (a multiple of Q).
          last_at: [C] int32, where each chunk's last token lies in `tokens`.
          max_len, impl: as `step`.

        Returns:
          (logits [Bd + C, V] float32: the decode rows', then each chunk's at its last token, cache, ok).
        """
        ok, decode, decoded = jnp.asarray(True), None, 0
        if last_tokens is not None:
            cache, decode = cache.begin_step(decode_idx, active.astype(jnp.int32), 1, max_len=max_len, impl=impl)
            ok, decoded = decode.ok, last_tokens.shape[0]
        packed = tokens.shape[0]
        cache, prefill = cache.begin_packed_step(seq_idx, num_tokens, tile_row, tile_start, packed // tile_row.shape[0],
                                                 packed, max_len=max_len, impl=impl)
        ids = tokens if last_tokens is None else jnp.concatenate([last_tokens, tokens])
        logit_index = jnp.concatenate([jnp.arange(decoded), decoded + jnp.clip(last_at, 0, packed - 1)])
        logits, cache = self._run(ids[None], cache, MixedStep(decode, prefill), logit_index)
        return logits, cache, ok & prefill.ok

    def decode_step(self, last_tokens: jax.Array, cache: Any, *, active: jax.Array, seq_idx: jax.Array | None = None,
                    max_len: int | None = None, impl: str = "auto"):
        """One decode step: each active row feeds its last token; inactive rows write nothing.

        Args:
          last_tokens: [B] int32. active: [B] bool. The rest as `step`.

        Returns:
          (logits [B, V] float32, cache, ok).
        """
        return self.step(last_tokens[:, None], cache, seq_idx=seq_idx, num_tokens=active.astype(jnp.int32),
                         max_len=max_len, logit_index=jnp.zeros(last_tokens.shape, jnp.int32), impl=impl)
