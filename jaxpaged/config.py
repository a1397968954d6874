"""Cache geometry: one frozen, hashable config that every static size of the state comes from.

Axis letters: L layers, N blocks in the pool, P block size, K kv heads, D head dim,
B sequence slots in the block table, M blocks per sequence (block-table width).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpaged.checks import check_int

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
KV_DTYPES = SUPPORTED_DTYPES + ("float8_e4m3fn", "int8")  # the pools' storage; the 8-bit ones carry scales
QUANTIZED_KV_DTYPES = ("float8_e4m3fn", "int8")
SCALE_ITEMSIZE = 2  # one float16 scale per position and kv head of an 8-bit pool


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= n and >= minimum: the padded size that keys a compilation."""
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


def _dtype_name(dtype: Any) -> str:
    """Normalises 'bfloat16', jnp.bfloat16, np.dtype('float16') ... to a canonical name."""
    import jax.numpy as jnp  # local: keep the module import cheap

    name = jnp.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported cache dtype {name!r}; choose one of {SUPPORTED_DTYPES}")
    return name


def _kv_dtype_name(kv_dtype: Any, dtype: str) -> str | None:
    """The pools' storage type: None (the cache dtype itself) or one of the 8-bit formats."""
    if kv_dtype is None:
        return None
    import jax.numpy as jnp

    try:
        name = jnp.dtype(kv_dtype).name
    except TypeError:
        name = str(kv_dtype)
    if name not in KV_DTYPES:
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r}; choose one of {KV_DTYPES}")
    if name in QUANTIZED_KV_DTYPES:
        return name
    if name != dtype:
        raise ValueError(f"kv_dtype {name!r} differs from the cache dtype {dtype!r}: a float kv_dtype must equal "
                         f"dtype (set dtype instead), or be 8-bit, one of {QUANTIZED_KV_DTYPES}")
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Static geometry of a paged KV cache.

    Frozen and hashable, so it can be a static argument of a jitted function and a static
    field of the state pytrees.
    """

    num_layers: int  # L: transformer layers, each with its own K and V pool
    num_kv_heads: int  # K: key/value heads per layer
    head_dim: int  # D: features per head
    num_blocks: int  # N: blocks in the pool, shared by all sequences
    block_size: int = 16  # P: token positions per block, a power of two
    max_seqs: int = 32  # B: sequence slots (rows) in the block table
    max_blocks_per_seq: int | None = None  # M: block-table width; None means num_blocks
    dtype: str = "float32"  # K/V as written and read back: float32, float16 or bfloat16
    # storage of the pools: None (dtype itself), or float8_e4m3fn or int8 with one float16 scale per
    # position and kv head (jaxpaged/quant.py); a float name equal to dtype is the same as None
    kv_dtype: str | None = None

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size", "max_seqs"):
            object.__setattr__(self, name, check_int(getattr(self, name), f"CacheConfig.{name}", low=1))
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"CacheConfig.block_size must be a power of two, got {self.block_size}")
        width = self.num_blocks if self.max_blocks_per_seq is None else self.max_blocks_per_seq
        width = check_int(width, "CacheConfig.max_blocks_per_seq", low=1)
        object.__setattr__(self, "max_blocks_per_seq", min(width, self.num_blocks))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "kv_dtype", _kv_dtype_name(self.kv_dtype, self.dtype))

    @classmethod
    def from_model_config(cls, model_config: Any, **overrides: Any) -> CacheConfig:
        """Builds a cache config from any model config that names its layers, kv heads and head dim.

        Accepts the field names used by this project's `ModelConfig` (`num_layers`, `num_kv_heads`,
        `head_dim`) and the Hugging Face spellings (`num_hidden_layers`, `num_key_value_heads`,
        `hidden_size / num_attention_heads`). `overrides` set or replace any field.
        """
        if isinstance(model_config, CacheConfig):
            return dataclasses.replace(model_config, **overrides)

        def first(*names):
            for name in names:
                value = getattr(model_config, name, None)
                if value is not None:
                    return value
            return None

        fields = {
            "num_layers": first("num_layers", "num_hidden_layers", "n_layers", "n_layer"),
            "num_kv_heads": first("num_kv_heads", "num_key_value_heads", "n_kv_heads"),
            "head_dim": first("head_dim"),
            "dtype": first("cache_dtype", "dtype"),
        }
        if fields["num_kv_heads"] is None:
            fields["num_kv_heads"] = first("num_heads", "num_attention_heads", "n_heads")
        if fields["head_dim"] is None:
            width, heads = first("hidden_size", "dim", "n_embd"), first("num_heads", "num_attention_heads", "n_heads")
            if width is not None and heads:
                fields["head_dim"] = width // heads
        fields = {k: v for k, v in fields.items() if v is not None}
        fields.update(overrides)
        missing = {"num_layers", "num_kv_heads", "head_dim", "num_blocks"} - fields.keys()
        if missing:
            raise ValueError(f"cannot build a CacheConfig from {type(model_config).__name__}: missing {sorted(missing)}")
        return cls(**fields)

    @property
    def jnp_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def quantized(self) -> bool:
        """Whether the pools hold 8-bit values with scales."""
        return self.kv_dtype is not None

    @property
    def pool_dtype(self):
        """The element type of the pools: kv_dtype where given, else dtype."""
        import jax.numpy as jnp

        return jnp.dtype(self.kv_dtype or self.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes of one pool element (1 for the 8-bit formats)."""
        return self.pool_dtype.itemsize

    @property
    def pool_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The K and V pools' shapes: [L, K, N, P, D] each, except that 8-bit pools hold V's blocks
        transposed, [L, K, N, D, P] (`jaxpaged.quant.v_blocks`: the decode kernel's int8 p . V reads
        V with a block's positions contiguous)."""
        k = (self.num_layers, self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)
        return k, (*k[:3], self.head_dim, self.block_size) if self.quantized else k

    @property
    def max_seq_len(self) -> int:
        """Most positions one sequence can hold: M * P."""
        return self.max_blocks_per_seq * self.block_size

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K plus V for one position across all layers, their scales included (8-bit pools)."""
        per_head = self.head_dim * self.itemsize + (SCALE_ITEMSIZE if self.quantized else 0)
        return 2 * self.num_layers * self.num_kv_heads * per_head

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token

    @property
    def pool_bytes(self) -> int:
        """Bytes reserved by the K and V pools of all layers (and their scales)."""
        return self.num_blocks * self.bytes_per_block
