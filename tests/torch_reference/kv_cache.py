"""The classic contiguous KV cache in PyTorch: [B, K, max_len, D] preallocated per layer."""

from __future__ import annotations

import torch


class KVCache:
    """`update(layer_idx, k, v)` appends k, v [B, K, T, D] and returns the layer's K/V so far, [B, K, S, D].

    Rows may hold different lengths (num_tokens [B] valid tokens per row, the rest padding); S is the
    longest row and shorter rows read as zeros past their length.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.lengths = torch.zeros((num_layers, batch_size), dtype=torch.long)
        self.max_len = max_len

    def seq_lens(self, layer_idx: int = 0) -> torch.Tensor:
        return self.lengths[layer_idx].clone()

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, num_tokens=None):
        batch, _, chunk, _ = k.shape
        counts = [chunk] * batch if num_tokens is None else [int(n) for n in num_tokens]
        starts = self.lengths[layer_idx].tolist()
        if any(s + n > self.max_len for s, n in zip(starts, counts)):
            raise RuntimeError(f"a row would pass max_len={self.max_len}")
        for b, (start, n) in enumerate(zip(starts, counts)):
            self.k[layer_idx][b, :, start:start + n] = k[b, :, :n]
            self.v[layer_idx][b, :, start:start + n] = v[b, :, :n]
            self.lengths[layer_idx, b] += n
        longest = int(self.lengths[layer_idx].max())
        return self.k[layer_idx][:, :, :longest].clone(), self.v[layer_idx][:, :, :longest].clone()
