"""MiniLLM's PyTorch twin: the same Llama architecture, written independently, taking the same caches.

Parameters carry Hugging Face names, so `load_state_dict(convert.minillm_to_state_dict(jax_model))`
gives it a JAX model's weights.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half rotary embeddings. x: [B, N, T, D]; positions: [B, T]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, D]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, positions, cache, layer_idx, num_tokens):
        c, (batch, length, _) = self.c, x.shape
        q = self.q_proj(x).view(batch, length, c.num_heads, c.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)  # [B, K, T, D]
        v = self.v_proj(x).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rotate(q, positions, c.rope_theta), rotate(k, positions, c.rope_theta)
        if cache is None:
            kv_lens = num_tokens
        else:
            k, v = cache.update(layer_idx, k, v, num_tokens)
            kv_lens = cache.seq_lens(layer_idx)
        group = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, H, S, D]
        key_pos = torch.arange(k.shape[2])
        visible = (key_pos[None, None] <= positions[:, :, None]) & (key_pos[None, None] < kv_lens[:, None, None])
        scores = (q @ k.transpose(-1, -2)).float() * c.head_dim**-0.5
        scores = scores.masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
        out = scores.softmax(-1).to(v.dtype) @ v  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, cache, layer_idx, num_tokens):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, layer_idx, num_tokens)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TorchMiniLLM(nn.Module):
    """forward(input_ids [B, T], kv_cache=None, num_tokens=None) -> logits [B, T, V] float32."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def forward(self, input_ids, kv_cache=None, num_tokens=None):
        batch, length = input_ids.shape
        num_tokens = torch.full((batch,), length) if num_tokens is None else torch.as_tensor(num_tokens)
        starts = torch.zeros(batch, dtype=torch.long) if kv_cache is None else kv_cache.seq_lens(0)
        positions = starts[:, None] + torch.arange(length)[None]
        x = self.model.embed_tokens(input_ids)
        for layer_idx, layer in enumerate(self.model.layers):
            x = layer(x, positions, kv_cache, layer_idx, num_tokens)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (x @ head.T).float()
