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

K is stored rotated (`encode`): each row times an orthonormal Hadamard matrix H [D, D] before it
is quantised. q . k = (q H) . (k H), so attention turns q by the same H and reads the rotated K as
it is (`jaxpaged.attention`). Why (DESIGN.md): K's error is what moves the model, and a few of K's
features are far larger than the rest and meet q's largest; the rotation spreads them over all D
(benchmarks/kv_quant_model.py: SmolLM2's perplexity with float8 K/V, +1.24% of the bfloat16
cache's with K as it is, +0.58% rotated). H is symmetric and its own inverse; the round trip's
error vector keeps its length, so ||k - decode(encode(k))|| is at most the bound above summed in
squares over the rotated row. V is stored as it is. Head dims that are not a power of two (no
Sylvester Hadamard matrix) are stored unrotated.

V's blocks are stored transposed, [D, P] each (`v_blocks`; the pools' shapes: `CacheConfig.pool_shapes`),
so a block's positions of one feature are contiguous. The decode kernel's product of the
probabilities with V then takes int8 V as it is, the positions being the product's reduction
axis: an int8 operand must be contiguous along it, and Triton turns 8-bit tiles only at a cost
(benchmarks/NOTES.md, "8-bit K/V on the GPU").

Axis letters: any leading axes, D head dim (the last axis).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# the 8-bit storage formats, and the largest value each holds (a row's max |x| maps to it)
QUANTIZED_DTYPES = {"int8": 127.0, "float8_e4m3fn": 448.0}
SCALE_DTYPE = jnp.float16  # of the scales: one per position and kv head
SCALE_MAX = float(jnp.finfo(SCALE_DTYPE).max)


def quantise(x: jax.Array, kv_dtype: str) -> tuple[jax.Array, jax.Array]:
    """x [..., D] (any float dtype) as 8-bit values [..., D] in kv_dtype and float16 scales [...].

    A row of zeros gets scale 0 and zeros back. A row holding a NaN or an infinity gets scale NaN
    and reads back as NaN throughout (a float pool would keep the value itself; 8 bits can not).
    """
    largest = QUANTIZED_DTYPES[kv_dtype]
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)  # [...]
    wide = jnp.where(jnp.isfinite(amax), up_to_float16(jnp.minimum(amax / largest, SCALE_MAX)), jnp.nan)
    scale = wide.astype(SCALE_DTYPE)  # exact: wide is a float16 value
    scaled = x / jnp.where(wide > 0, wide, 1.0)[..., None]
    scaled = jnp.clip(scaled, -largest, largest)  # x / scale may round just past it; float8 overflows to NaN
    if kv_dtype == "int8":
        scaled = round_half_even(scaled)
    return scaled.astype(jnp.dtype(kv_dtype)), scale


def round_half_even(x: jax.Array) -> jax.Array:
    """x [...] (float32, |x| < 2^23) rounded to the nearest integer, ties to even: `jnp.round`'s
    values (but +0.0 for its -0.0, the same int8), from floor and exact float32 steps, so that it
    also lowers inside a Pallas Triton kernel (the decode kernel quantises q for int8 products
    there), where `jnp.round`'s primitive has no lowering. (Adding and taking away 1.5 * 2^23 would
    do it in two steps, but XLA folds those away.)"""
    whole = jnp.floor(x)
    fraction = x - whole  # exact, in [0, 1)
    odd = whole - 2 * jnp.floor(whole * 0.5) == 1
    return jnp.where((fraction > 0.5) | ((fraction == 0.5) & odd), whole + 1, whole)


def v_blocks(values: jax.Array) -> jax.Array:
    """V's values [..., P, D] as an 8-bit pool holds them, each block transposed: [..., D, P]; and
    back (the same swap of the last two axes)."""
    return jnp.swapaxes(values, -1, -2)


def up_to_float16(x: jax.Array) -> jax.Array:
    """x [...] (float32, 0 <= x <= 65504) rounded up to the nearest float16 value, kept in float32.

    By integer and exact float32 operations, not by a round trip through float16: XLA may drop a
    float32 -> float16 -> float32 pair of conversions as "excess precision" (on a GPU it did, in some
    programs and not others, so the scales of one row differed between write paths). Normal float16
    values are the float32 values whose 13 low mantissa bits are zero, so rounding up adds 2^13 - 1
    to the bits and clears those 13 (a carry moves into the exponent, as it should); below 2^-14
    float16 steps evenly by 2^-24."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    normal = jax.lax.bitcast_convert_type((bits + np.uint32(0x1FFF)) & np.uint32(0xFFFFE000), jnp.float32)
    subnormal = jnp.ceil(x * np.float32(2.0**24)) * np.float32(2.0**-24)
    return jnp.where(x < np.float32(2.0**-14), subnormal, normal)


def dequantise(values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """values [..., D] (8-bit) times scale [...] (float16), in dtype. In float16 the product is held
    within its finite range: the scale, rounded up, may take 127 or 448 steps of it a little past
    the largest value written (65504 comes back as 65504, not inf)."""
    return _within(values.astype(jnp.float32) * scale.astype(jnp.float32)[..., None], dtype)


def _within(x: jax.Array, dtype) -> jax.Array:
    """x (float32) in dtype, held within float16's finite range where dtype is float16."""
    if jnp.dtype(dtype) == jnp.float16:
        x = jnp.clip(x, -SCALE_MAX, SCALE_MAX)
    return x.astype(dtype)


@functools.cache
def hadamard(head_dim: int) -> np.ndarray | None:
    """The orthonormal Sylvester Hadamard matrix [D, D] (entries +-1 / sqrt(D); symmetric, its own
    inverse), or None where D is not a power of two."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        return None
    h = np.ones((1, 1))
    while h.shape[0] < head_dim:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(head_dim)).astype(np.float32)


def rotate(x: jax.Array) -> jax.Array:
    """x [..., D] times `hadamard(D)`, in float32 (x unchanged, as float32, where D is not a power of
    two). Its own inverse.

    Computed as the fast Walsh-Hadamard transform: log2(D) stages of pairwise sums and differences,
    then one product by 1 / sqrt(D). Each output is the same fixed sequence of float32 additions in
    every program, so K written by any path (a chunk, one position, the model's step) rotates to the
    same bits; a matmul's summation order may depend on the program it is compiled into."""
    h = hadamard(x.shape[-1])
    x = x.astype(jnp.float32)
    if h is None:
        return x
    lead, d = x.shape[:-1], x.shape[-1]
    sign = np.array([1, -1], np.float32).reshape((1,) * (len(lead) + 1) + (2, 1))  # over [..., runs, 2, half]
    half = 1
    while half < d:  # pairs (a, b) = features (i, i + half) within each run of 2 * half: (a + b, a - b)
        pairs = x.reshape(*lead, d // (2 * half), 2, half)
        x = (pairs[..., ::-1, :] + sign * pairs).reshape(*lead, d)  # (b + a, a + -b): exact signs, one fusion
        half *= 2
    return x * np.float32(h[0, 0])


def encode(x: jax.Array, kv_dtype: str, rotated: bool) -> tuple[jax.Array, jax.Array]:
    """What an 8-bit pool holds for rows x [..., D]: `quantise` of x, of x rotated for K (rotated=True)."""
    return quantise(rotate(x) if rotated else x, kv_dtype)


def decode(values: jax.Array, scale: jax.Array, dtype, rotated: bool) -> jax.Array:
    """The rows that `encode` stored, [..., D] in dtype (K rotated back)."""
    if not rotated:
        return dequantise(values, scale, dtype)
    return _within(rotate(dequantise(values, scale, jnp.float32)), dtype)
