"""What the decode and prefill kernels share: the softmax scale, where a loop step's K/V rows are
(`load_ids`) and their loads, the online-softmax update (plain and transposed), the layer index as
the kernels take it, the pools as they read them, and the input checks.

Both kernels read K and V straight from jaxpaged's head-major pools, [L, K, N, P, D], viewed flat
as rows of positions ([L * K * N * P, D]) or whole blocks ([L * K * N, P, D]), each program finding
its layer's and kv head's blocks through the block table. The softmax works in base 2 (`update`).

Axis letters: B sequences, H query heads, K kv heads, G = H / K, D head dim, L layers,
N blocks per layer, P block size, M blocks per sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpaged.kernels.launch import pool_addressable

MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # the running max's start: finite, below any logit


def softmax_scale(head_dim: int) -> float:
    """1 / sqrt(D) times log2(e): the kernels' softmax works in base 2 (`update`)."""
    return head_dim**-0.5 * 1.4426950408889634


def load_ids(step, tables_ref, layer_base, *, blocks_per_step: int, num_blocks: int, row_gather: int = 0,
              rows_from_blocks: bool = False, heads: int = 1):
    """Where loop step `step`'s K/V are: its blocks' indices in the pool as the kernel sees it
    ([blocks]), or with row_gather = P, the pool viewed as rows of positions, its positions' rows
    ([blocks * P]). layer_base: the pool index of block 0 of this program's layer (and head). The
    sentinel N reads a real block, then is masked. rows_from_blocks (prefill): the rows come from the
    step's block ids, loaded once each, rather than from one table load per position (decode's way:
    with rows from block ids decode ran 0.94-0.95x on an H100 at five of six head-dim-64 shapes with
    128 sequences, 0.97-1.02x at the other 19; tune_decode_ids_*_H100.json). heads (decode's packed
    kv heads, row gather, head-major pools): the rows of `heads` consecutive kv heads, head i's
    positions at [i * chunk, (i + 1) * chunk) ([heads * blocks * P]); layer_base is the first head's."""
    if not row_gather or rows_from_blocks:
        ids = tables_ref[pl.ds(step * blocks_per_step, blocks_per_step)]
        ids = layer_base + jnp.minimum(ids, num_blocks - 1)
        if not row_gather:
            return ids
        return (ids[:, None] * row_gather + jnp.arange(row_gather)[None, :]).reshape(blocks_per_step * row_gather)
    positions = step * blocks_per_step * row_gather + jnp.arange(blocks_per_step * row_gather)
    blocks = tables_ref[positions // row_gather]  # each block id, once per position
    rows = (layer_base + jnp.minimum(blocks, num_blocks - 1)) * row_gather + positions % row_gather
    if heads == 1:
        return rows
    head_rows = num_blocks * row_gather  # one kv head's rows in a layer
    return (rows[None, :] + jnp.arange(heads)[:, None] * head_rows).reshape(heads * rows.shape[0])


def load_kv(ids, k_ref, v_ref, *, live=None):
    """K and V of float pools at `ids` (blocks or rows, from `load_ids`): two [chunk, D] tiles.

    live: None, or [chunk] bool; V rows that are not live then load as zeros (a masked load, so
    no select sits between the load and the dot).
    """
    if live is None:
        return k_ref[ids].reshape(-1, k_ref.shape[-1]), v_ref[ids].reshape(-1, v_ref.shape[-1])
    # (a GPU-only path: interpret mode can not load a gather through `plgpu.load`)
    k = plgpu.load(k_ref.at[ids])
    shape = v_ref.at[ids].shape  # [blocks, P, D], or [blocks * P, D] for row ids
    v = plgpu.load(v_ref.at[ids], mask=jnp.broadcast_to(live.reshape(*shape[:-1], 1), shape), other=0.0)
    return k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])


def load_kv8(block_ids, k_ref, v_ref, scale_refs, *, block_size: int, live=None, dtype=None):
    """One loop step's K and V from 8-bit pools, as `pool_view` and `scale_view` give them, at the
    step's blocks (`load_ids` without row_gather: [blocks] block ids).

    K comes as [chunk, D], its rows the positions; V transposed, [D, chunk], each block's P positions
    of a feature one contiguous load (`jaxpaged.quant.v_blocks`); each position's K and V scale as
    [chunk] float32 each, applied by `update` to the logits and the probabilities ([rows, chunk]:
    with 16 query rows, a quarter to an eighth of the multiplies that scaling the [chunk, D] tiles
    would take). live: None, or [chunk] bool: V's scales past the length read as 0, so those
    positions weigh nothing (8-bit values are finite). dtype: what the tiles become for the
    products, or None to keep them 8-bit (int8 products).

    Returns (k, v_t, (k_scales, v_scales)).
    """
    head_dim = k_ref.shape[-1]
    rows = (block_ids[:, None] * block_size + jnp.arange(block_size)[None, :]).reshape(-1)  # [chunk]
    k = k_ref[rows]
    features = jnp.arange(head_dim)[:, None, None] * block_size + jnp.arange(block_size)[None, None, :]  # [D, 1, P]
    v_t = v_ref[block_ids[None, :, None], features].reshape(head_dim, rows.shape[0])  # [D, blocks, P] -> [D, chunk]
    k_scales, v_scales = (ref[rows].astype(jnp.float32) for ref in scale_refs)
    if live is not None:
        v_scales = jnp.where(live, v_scales, 0.0)
    if dtype is not None:
        k, v_t = k.astype(dtype), v_t.astype(dtype)
    return k, v_t, (k_scales, v_scales)


def live_positions(step, length, chunk: int, heads: int = 1):
    """[chunk] bool: which positions of loop step `step` are before the length; with packed kv heads,
    [heads * chunk], head i's at [i * chunk, (i + 1) * chunk)."""
    if heads == 1:
        return step * chunk + jnp.arange(chunk) < length
    return step * chunk + jnp.arange(heads * chunk) % chunk < length


def same_head(heads: int, chunk: int, rows: int, group: int, transposed: bool = False):
    """[rows, heads * chunk] bool (transposed: [heads * chunk, rows]): whether query row r (query
    head r % G of packed kv head r // G) and K/V row c (packed kv head c // chunk) share a kv head.
    Rows past heads * G match nothing."""
    q_head, kv_head = jnp.arange(rows) // group, jnp.arange(heads * chunk) // chunk
    return kv_head[:, None] == q_head[None, :] if transposed else q_head[:, None] == kv_head[None, :]


def update(carry, q, k, v, step, length, q_pos, *, scale: float, masked: bool = True, v_zeroed: bool = False,
            heads: int = 1, group: int = 1, row_scales=None, q_scale=None, v_t: bool = False):
    """The online-softmax update of both kernels with one loop step's K/V tiles ([chunk, D] each;
    v_t: V given transposed, [D, chunk], as 8-bit pools' `load_kv8` gives it).

    scale: the softmax scale times log2(e): the running max is kept in base-2 units, so each
    probability is one fused multiply-add and one `exp2` (the hardware's ex2), where `exp` of the
    scaled logits compiles to a longer libdevice sequence.
    q_pos: [rows] positions of the queries (causal limit), each below the length (or -1: sees nothing),
      or None for decode (the length is the limit).
    masked: whether the chunk may reach past the length (or the causal limit). If so, positions at or
    past the length get probability 0 and their V rows are zeroed, so NaN or another sequence's data in
    an unused slot can not reach the output; a chunk known to be inside both limits skips that work.
    Masked logits are -inf and the running max starts finite (`MASK`), so a masked position's
    probability is exp2(-inf) = 0 even in a row that sees nothing in the chunk (its max stays put).
    v_zeroed: the V rows past the length were loaded as zeros already.
    heads, group (decode): k and v hold `heads` packed kv heads' chunks one after another
    ([heads * chunk, D]), and query row r belongs to kv head r // G (G = group); a row sees only
    its own kv head's positions (`same_head`), so every step masks.
    row_scales: None, or the K and V scales of the chunk's rows (8-bit pools: `load_kv8`), applied to
    the logits' columns and to the probabilities before the product with V.
    q_scale: None, or [rows] float32, the scales of q's rows where q is int8 (int8 q . k products,
    int32 logits), applied to the logits' rows. int8 V takes int8 weights (`weigh`).
    """
    o, m, l = carry
    chunk = k.shape[0] // heads
    logits = plgpu.dot(q, k.T).astype(jnp.float32)  # [rows, heads * chunk], unscaled (int32 from int8 operands)
    if row_scales is not None:
        logits = logits * row_scales[0][None, :]
    if q_scale is not None:
        logits = logits * q_scale[:, None]
    if heads > 1:
        live = live_positions(step, length, chunk, heads)
        logits = jnp.where(live[None, :] & same_head(heads, chunk, q.shape[0], group), logits, -jnp.inf)
        if not v_zeroed:
            v = jnp.where(live[:, None], v, jnp.zeros_like(v))
    elif masked:
        positions = step * chunk + jnp.arange(chunk)
        live = positions < length
        visible = live[None, :] if q_pos is None else positions[None, :] <= q_pos[:, None]  # (q_pos < length)
        logits = jnp.where(visible, logits, -jnp.inf)
        if not v_zeroed:
            v = jnp.where(live[None, :] if v_t else live[:, None], v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, logits.max(axis=-1) * scale)
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(logits * scale - m_new[:, None])
    weights = p if row_scales is None else p * row_scales[1][None, :]
    o = o * correction[:, None] + weigh(weights, v.T if v_t else v)
    return o, m_new, l * correction + p.sum(axis=-1)


def weigh(weights, v):
    """weights [rows, chunk] (float32, >= 0) times V [chunk, D]: [rows, D] float32. With int8 V the
    weights are rounded onto 0..127 against their row's largest, int8 x int8 into int32, and scaled
    back: each weight off by at most half a step, 1/254 of its row's largest in the step
    (benchmarks/kv_quant_model.py --int8-products measures what that costs a model)."""
    if v.dtype != jnp.int8:
        return plgpu.dot(weights.astype(v.dtype), v).astype(jnp.float32)
    top = weights.max(axis=-1)
    steps = jnp.where(top > 0, 127.0 / top, 0.0)
    rounded = (weights * steps[:, None] + 0.5).astype(jnp.int32).astype(jnp.int8)
    return plgpu.dot(rounded, v).astype(jnp.float32) * (top / 127.0)[:, None]


def update_transposed(carry, q_t, k, v, step, length, *, scale: float, masked: bool = True, v_zeroed: bool = False,
                       heads: int = 1, group: int = 1):
    """Decode's `update` computed transposed: logits^T = K q^T ([chunk, rows]) and o^T += V^T p^T
    ([D, rows]), so the chunk (a step's 64 positions or more), not the 16 query rows, is the M side of both dots:
    compiled for sm_90 they become Hopper's warpgroup MMA, which needs M >= 64, where `update`'s
    become mma.sync (benchmarks/kernel_asm.py). Where it is faster: `launch.default_transposed`.

    carry: o^T [D, rows] and the running max and sum [rows]; q_t: q^T [D, rows]. heads, group: as
    for `update`. (Float pools only: 8-bit ones take the plain products, `launch.QUANTIZED_DEFAULTS`.)
    """
    o_t, m, l = carry
    chunk = k.shape[0] // heads
    logits = plgpu.dot(k, q_t).astype(jnp.float32)  # [heads * chunk, rows], unscaled
    if masked or heads > 1:
        live = live_positions(step, length, chunk, heads)
        visible = live[:, None] if heads == 1 else live[:, None] & same_head(heads, chunk, q_t.shape[1], group, True)
        logits = jnp.where(visible, logits, -jnp.inf)
        if not v_zeroed:
            v = jnp.where(live[:, None], v, jnp.zeros_like(v))
    m_new = jnp.maximum(m, logits.max(axis=0) * scale)
    correction = jnp.exp2(m - m_new)
    p = jnp.exp2(logits * scale - m_new[None, :])
    o_t = o_t * correction[None, :] + plgpu.dot(v.T, p.astype(v.dtype))
    return o_t, m_new, l * correction + p.sum(axis=0)


def program_layer_base(layer_ref, num_blocks: int, num_layers: int, kv_heads: int, heads: int = 1):
    """Where block 0 of the layer in layer_ref ([1] int32, clamped into the pools' layers) and of this
    program's (first) kv head (grid axis 1, counting packs of `heads` kv heads) lies in the pools
    viewed flat (`pool_view`). Computed in the kernel: outside it, it would be one more launch per
    call."""
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)
    return (layer * kv_heads + pl.program_id(1) * heads) * num_blocks


def empty_carry(rows: int, head_dim: int):
    """The online softmax before any step: o [rows, D] zeros, the running max at MASK, the sum 0."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def check_inputs(q, k_pool, block_tables, lengths, q_positions=None, *, kv_heads: int):
    """Clear errors for inputs that the kernels would otherwise read out of bounds or group wrongly."""
    if not pool_addressable(k_pool.size, k_pool.dtype.itemsize, k_pool.shape[-1]):
        raise ValueError(f"a pool of {k_pool.size:,} elements of {k_pool.dtype} {tuple(k_pool.shape)} is beyond the "
                         "kernels' offsets (8-bit pools: fewer than 2^31 elements or more than 2^32; at most 2^31 - 1 "
                         "rows of D): use the reference path (jaxpaged.attention) or another number of blocks")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be floats (float32, float16 or bfloat16), got {q.dtype}")
    batch, heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    if head_dim != k_pool.shape[-1] or heads % kv_heads:
        raise ValueError(f"q {q.shape} does not fit pools {k_pool.shape}: the head dims must agree and the "
                         f"query heads must be a multiple of the {kv_heads} kv heads")
    expected = {"block_tables": (block_tables, (batch, block_tables.shape[-1])), "lengths": (lengths, (batch,))}
    if q_positions is not None:
        expected["q_positions"] = (q_positions, q.shape[:2])
    for name, (x, shape) in expected.items():
        if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers of shape {shape} (from q {q.shape}), got {x.dtype}{list(x.shape)}")


def check_scales(k_pool, k_scale, v_scale) -> bool:
    """Whether the pools are 8-bit (then their scales must be given, [L, K, N, P] each, float); a
    clear error for scales missing, unasked or of the wrong shape."""
    quantized = k_pool.dtype.itemsize == 1
    if quantized and k_pool.dtype.name not in ("int8", "float8_e4m3fn"):
        raise ValueError(f"8-bit pools are int8 or float8_e4m3fn (jaxpaged.quant), not {k_pool.dtype}")
    given = k_scale is not None and v_scale is not None
    if quantized != given or (k_scale is None) != (v_scale is None):
        raise ValueError(f"pools of {k_pool.dtype} take k_scale and v_scale {'both' if quantized else 'neither'}")
    if given and any(scale.shape != k_pool.shape[:-1] or not jnp.issubdtype(scale.dtype, jnp.floating)
                     for scale in (k_scale, v_scale)):
        raise ValueError(f"k_scale and v_scale must be floats of shape {tuple(k_pool.shape[:-1])} (the pools' "
                         f"[L, K, N, P]), got {k_scale.dtype}{list(k_scale.shape)} and "
                         f"{v_scale.dtype}{list(v_scale.shape)}")
    return quantized


def layer_operand(layer) -> jax.Array:
    """The layer index as the kernels take it, [1] int32; a clear error for one that is not a scalar
    integer. (The kernels clamp it into the pools' layers, as the reference path's gather does.)"""
    layer = jnp.asarray(layer)
    if layer.shape != () or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise ValueError(f"layer must be a scalar integer, got {layer.dtype}{list(layer.shape)}")
    return layer.astype(jnp.int32).reshape(1)


def scale_view(k_scale, v_scale):
    """The scales of 8-bit pools ([L, K, N, P] each) as the kernels read them, flat ([L * K * N * P],
    one per row of `pool_view`'s K), and their BlockSpec (whole, to every program). (`check_scales`
    checked their shapes.)"""
    shape = (k_scale.size,)
    spec = pl.BlockSpec(shape, lambda _, h, __: (0,))
    return (k_scale.reshape(shape), v_scale.reshape(shape)), spec


def pool_view(k_pool, v_pool, row_gather: bool):
    """The pools as the kernels read them, their BlockSpecs (the whole pools to every program), and
    the static sizes (L, K, N, P).

    Float pools, [L, K, N, P, D] (jaxpaged's, head-major), are read flat, as [L * K * N * P, D] rows
    of positions (row_gather) or [L * K * N, P, D] blocks, the kernel finding its layer's and kv
    head's blocks (`program_layer_base`). 8-bit pools give K as rows of positions and V, whose blocks
    are stored transposed ([L, K, N, D, P]: `jaxpaged.quant.v_blocks`), as [L * K * N, D * P] blocks
    (`load_kv8`: row indices stay far below 2^31). Every view is a free reshape.
    """
    if k_pool.ndim != 5:
        raise ValueError(f"pools must be [L, K, N, P, D], got {tuple(k_pool.shape)}")
    num_layers, kv_heads, num_blocks, block_size, head_dim = k_pool.shape
    quantized = k_pool.dtype.itemsize == 1
    v_shape = (*k_pool.shape[:3], head_dim, block_size) if quantized else k_pool.shape
    if tuple(v_pool.shape) != v_shape or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"k_pool and v_pool differ: {tuple(k_pool.shape)} {k_pool.dtype}, {tuple(v_pool.shape)} "
                         f"{v_pool.dtype}; v_pool must be {v_shape} {k_pool.dtype}"
                         + (" (8-bit V's blocks transposed, jaxpaged.quant.v_blocks)" if quantized else ""))
    total = num_layers * kv_heads * num_blocks
    if quantized:
        shapes = (total * block_size, head_dim), (total, head_dim * block_size)
    else:
        shapes = ((total * block_size, head_dim) if row_gather else (total, block_size, head_dim),) * 2
    specs = tuple(pl.BlockSpec(shape, lambda _, h, __, n=len(shape): (0,) * n) for shape in shapes)
    pools = (k_pool.reshape(shapes[0]), v_pool.reshape(shapes[1]))
    return pools, specs, (num_layers, kv_heads, num_blocks, block_size)
