"""A user's own model on jaxpaged's public API: a small GPT-2-style decoder (learned positions,
LayerNorm, multi-head attention, GELU MLP, tied output) with random weights.

It knows nothing of how a cache stores keys and values. Each step asks the cache for the new
tokens' positions (`begin_step`), and each attention layer makes one call (`attend`) that writes
its K/V and attends; the same code runs over the paged cache and the contiguous one.

    python examples/gpt2.py            # greedy tokens through both caches, side by side

Axis letters: B batch, T tokens, E width, H heads (= K kv heads here), D head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxpaged as jp


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 128  # V
    max_positions: int = 256  # learned position embeddings
    width: int = 64  # E
    num_layers: int = 2
    num_heads: int = 4  # H; every head has its own K and V
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:  # D
        return self.width // self.num_heads


class Block(nnx.Module):
    """Pre-LayerNorm attention and MLP with residuals."""

    def __init__(self, config: GPT2Config, rngs: nnx.Rngs):
        e, self.heads, self.head_dim = config.width, config.num_heads, config.head_dim
        self.ln_1, self.ln_2 = nnx.LayerNorm(e, rngs=rngs), nnx.LayerNorm(e, rngs=rngs)
        self.qkv = nnx.Linear(e, 3 * e, rngs=rngs)
        self.proj = nnx.Linear(e, e, rngs=rngs)
        self.fc, self.fc_out = nnx.Linear(e, 4 * e, rngs=rngs), nnx.Linear(4 * e, e, rngs=rngs)

    def __call__(self, x, cache, layer: int, step):
        batch, tokens, width = x.shape
        q, k, v = jnp.split(self.qkv(self.ln_1(x)), 3, axis=-1)
        q, k, v = (t.reshape(batch, tokens, self.heads, self.head_dim) for t in (q, k, v))  # [B, T, H, D]
        out, cache = cache.attend(layer, q, k, v, step)  # the cache protocol: write K/V, attend
        x = x + self.proj(out.reshape(batch, tokens, width))
        return x + self.fc_out(jax.nn.gelu(self.fc(self.ln_2(x)))), cache


class GPT2(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = nnx.Embed(config.vocab_size, config.width, rngs=rngs)
        self.wpe = nnx.Embed(config.max_positions, config.width, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.num_layers)])
        self.ln_f = nnx.LayerNorm(config.width, rngs=rngs)

    def __call__(self, input_ids, cache, *, seq_idx=None, num_tokens=None):
        """Logits [B, V] at each row's last real token of input_ids [B, T], and the new cache.

        cache: anything of the cache protocol (a `PagedKVState` with seq_idx [B], a
        `ContiguousKVState`, the seed's facades). num_tokens [B]: real tokens per row (right padding).
        """
        batch, tokens = input_ids.shape
        num_tokens = jnp.full((batch,), tokens, jnp.int32) if num_tokens is None else num_tokens
        cache, step = cache.begin_step(seq_idx, num_tokens, tokens)
        x = self.wte(input_ids) + self.wpe(step.positions)  # [B, T, E]: positions come from the cache
        for layer, block in enumerate(self.blocks):
            x, cache = block(x, cache, layer, step)
        last = jnp.take_along_axis(self.ln_f(x), jnp.maximum(num_tokens - 1, 0)[:, None, None], axis=1)[:, 0]
        return self.wte.attend(last), cache, step.ok


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def _step(graphdef, params, cache, input_ids, seq_idx, num_tokens):
    logits, cache, ok = nnx.merge(graphdef, params)(input_ids, cache, seq_idx=seq_idx, num_tokens=num_tokens)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache, ok


def greedy(model: GPT2, prompts: list[list[int]], max_new_tokens: int, cache: str = "paged") -> list[list[int]]:
    """Greedy tokens for each prompt: one prefill of the right-padded prompts, then one token a step."""
    c = model.config
    batch, width = len(prompts), max(len(p) for p in prompts)
    capacity = width + max_new_tokens
    if cache == "paged":
        config = jp.CacheConfig(num_layers=c.num_layers, num_kv_heads=c.num_heads, head_dim=c.head_dim, block_size=8,
                                num_blocks=batch * -(-capacity // 8), max_seqs=batch, dtype=c.dtype)
        state, seq_idx = jp.init_state(config), jnp.arange(batch, dtype=jnp.int32)
    else:
        state, seq_idx = jp.init_contiguous(c.num_layers, batch, c.num_heads, capacity, c.head_dim, c.dtype), None
    tokens = np.zeros((batch, width), np.int32)
    for b, prompt in enumerate(prompts):
        tokens[b, : len(prompt)] = prompt
    graphdef, params = nnx.split(model)
    lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    next_tokens, state, ok = _step(graphdef, params, state, jnp.asarray(tokens), seq_idx, lens)
    out = [next_tokens]
    for _ in range(max_new_tokens - 1):
        next_tokens, state, ok_step = _step(graphdef, params, state, next_tokens[:, None], seq_idx,
                                            jnp.ones((batch,), jnp.int32))
        ok &= ok_step
        out.append(next_tokens)
    if not bool(ok):
        raise RuntimeError("the cache ran out of room")
    return np.stack([np.asarray(t) for t in out], axis=1).tolist()


if __name__ == "__main__":
    gpt2 = GPT2(GPT2Config(), rngs=nnx.Rngs(0))
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7] * 11]
    for kind in ("paged", "contiguous"):
        print(f"{kind:>10}: {greedy(gpt2, prompts, max_new_tokens=12, cache=kind)}")
