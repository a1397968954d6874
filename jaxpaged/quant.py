"""8-bit K/V storage: the formats, and quantising and dequantising with one scale per token and kv head.

A quantized pool holds each position's D features of one kv head in 8 bits beside one float16
scale: scale = max |x| over those D features divided by the format's largest value (127 for int8,
448 for float8_e4m3fn), rounded to float16, and the values are x / scale rounded to the format.
(float16, not float32: 2 bytes per position and kv head instead of 4, which takes an 8-bit pool at
D = 64 from 1.88x to 1.94x the positions of a bfloat16 pool; its 11-bit precision costs nothing the
8-bit values would keep. The scale is rounded up, so max |x| / scale never passes the format's
largest value and the bounds below hold with the stored scale, also where it is a float16
subnormal (rows of max |x| below 127 x 2^-14: coarser steps there, still within s / 2). A scale
past float16's range, 65504 (|x| beyond 8.3 million for int8), saturates there.) Each position's scale is
fixed when it is written, so a block never re-scales as it fills (DESIGN.md says why this
granularity: benchmarks/kv_quant_error.py measured it against one scale per block and kv head).

Error bounds of one round trip, per element x of a row whose scale is s (tests/test_kv_quant.py):
- int8: |x - dequantise(quantise(x))| <= s / 2 (rounding to the nearest integer step of s).
- float8_e4m3fn (3 mantissa bits): <= |x| / 16 where x / s is a normal float8 number
  (|x| >= 2^-6 s), and <= 2^-10 s below it (half the subnormal step 2^-9).
Both up to float32 rounding of x / s and of the product back, with s the stored float16 scale.

Axis letters: any leading axes, D head dim (the last axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# the 8-bit storage formats, and the largest value each holds (a row's max |x| maps to it)
QUANTIZED_DTYPES = {"int8": 127.0, "float8_e4m3fn": 448.0}
SCALE_DTYPE = jnp.float16  # of the scales: one per position and kv head
SCALE_MAX = float(jnp.finfo(SCALE_DTYPE).max)


def quantise(x: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array]:
    """x [..., D] (any float dtype) as 8-bit values [..., D] in kv_dtype and float16 scales [...].

    A row of zeros gets scale 0 and zeros back.
    """
    largest = QUANTIZED_DTYPES[kv_dtype]
    x = x.astype(jnp.float32)
    exact = jnp.minimum(jnp.max(jnp.abs(x), axis=-1) / largest, SCALE_MAX)  # [...]
    scale = exact.astype(SCALE_DTYPE)
    scale = jnp.where(scale.astype(jnp.float32) < exact, jnp.nextafter(scale, SCALE_DTYPE(jnp.inf)), scale)  # up
    wide = scale.astype(jnp.float32)
    scaled = x / jnp.where(wide > 0, wide, 1.0)[..., None]
    scaled = jnp.clip(scaled, -largest, largest)  # x / scale may round just past it; float8 overflows to NaN
    if kv_dtype == "int8":
        scaled = jnp.round(scaled)
    return scaled.astype(jnp.dtype(kv_dtype)), scale


def dequantise(values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """values [..., D] (8-bit) times scale [...] (float16), in dtype."""
    return (values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)
