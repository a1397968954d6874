"""The kernels' launch rules: which shapes they take (`supported`), and the default grid, tile and
pipeline depth of a call, as pure functions of the shapes and of the GPU's numbers (`Gpu`: its SM
count and shared memory per block), so they run and are tested on any machine. `this_gpu` reads
those numbers from the device jax runs on.

The defaults were measured on an H100 SXM (132 SMs, 227 KiB of shared memory per block; the H200
has the same SMs): the program counts below are that card's, scaled by the SM count of the card
the kernels run on. Where a number is missing (a CPU, an unknown card, a jax that does not expose
it), a rule falls back to a safe choice, said in its docstring. Nothing here imports the Triton
lowering.

Axis letters: B sequences, H query heads, K kv heads, G = H / K, D head dim, N blocks per layer,
P block size, M blocks per sequence.
"""

from __future__ import annotations

import dataclasses
import functools

from jaxpaged.checks import check_int

MIN_ROWS = 16  # Triton's smallest dot tile
DECODE_STEP_BYTES = 32 * 1024  # K and V of one decode loop step (`default_step_positions`)
TUNED_SM_COUNT = 132  # the SMs of the cards the defaults were measured on (H100 SXM; H200 alike)
_TUNED_WAVE = 256  # programs: about two per SM of the tuned card

# Shared memory a block may use (opt-in), by CUDA compute capability (CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability"); jax exposes no such attribute.
_SHARED_MEMORY_PER_BLOCK = {(7, 0): 96 * 1024, (7, 2): 48 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024,
                            (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024,
                            (10, 0): 227 * 1024, (10, 3): 227 * 1024, (12, 0): 99 * 1024}
# What Triton allocates beyond the K/V stages of a decode step (q, o and the softmax state): 105 KB
# with three 32 KiB steps in flight, 138 KB with four (benchmarks/kernel_asm.py, sm_90).
_DECODE_SHARED_MEMORY_SLACK = 16 * 1024


@dataclasses.dataclass(frozen=True)
class Gpu:
    """The numbers of a GPU that the launch rules use (None: unknown, the rules' safe fallback).

    Attributes:
      sm_count: streaming multiprocessors.
      shared_memory_per_block: bytes of shared memory one program may use.
    """

    sm_count: int | None = None
    shared_memory_per_block: int | None = None


H100 = Gpu(sm_count=132, shared_memory_per_block=227 * 1024)  # the card the defaults were tuned on


@functools.cache
def this_gpu() -> Gpu:
    """The numbers of jax's first device: its SM count (`core_count`) and, from its compute
    capability, the shared memory per block; each None where the device does not say (a CPU, a
    backend without the attribute, a capability not in the table)."""
    import jax

    device = jax.devices()[0]
    sm_count = getattr(device, "core_count", None)
    try:
        capability = tuple(int(x) for x in str(device.compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        capability = None
    return Gpu(sm_count=sm_count if isinstance(sm_count, int) and sm_count > 0 else None,
               shared_memory_per_block=_SHARED_MEMORY_PER_BLOCK.get(capability))


def programs_per_wave(sm_count: int | None) -> int:
    """About two programs per SM: 256 on the tuned card's 132 SMs, scaled by the SM count (the tuned
    card's when unknown)."""
    return _TUNED_WAVE * (sm_count or TUNED_SM_COUNT) // TUNED_SM_COUNT


def supported(head_dim: int, block_size: int, pool_size: int = 0, itemsize: int = 2) -> bool:
    """Whether the kernels take this shape (pool_size: elements of one whole K or V pool, all layers,
    of itemsize bytes each: `pool_addressable`); the caller falls back to the reference otherwise."""
    return head_dim in (64, 128, 256) and block_size >= 8 and pool_addressable(pool_size, itemsize, head_dim)


def pool_addressable(size: int, itemsize: int, head_dim: int) -> bool:
    """Whether the kernels can address every element of a pool of `size` elements of `itemsize` bytes.

    Pallas's Triton lowering computes a ref's element offsets in 64 bits when the array passes 2^32
    bytes and in signed 32 bits otherwise, so a pool is addressable below 2^31 elements or above
    2^32 bytes: bfloat16 and float32 pools of any size, 8-bit pools except between 2^31 and 2^32
    elements (offsets past 2^31 in 32 bits). The kernels' own row indices are int32: at most 2^31 - 1
    rows of D (tests/test_kernels.py checks both on a GPU)."""
    return (size < 2**31 or size * itemsize > 2**32) and size // head_dim < 2**31


def addressable_blocks(num_blocks: int, block_elements: int, itemsize: int, head_dim: int) -> int:
    """The most blocks, up to num_blocks, of a pool that the kernels address (`pool_addressable`),
    a block holding block_elements elements of itemsize bytes (all layers and kv heads of one pool)."""
    for name, value, low in (("num_blocks", num_blocks, 0), ("block_elements", block_elements, 1),
                             ("itemsize", itemsize, 1), ("head_dim", head_dim, 1)):
        check_int(value, name, low)
    below_rows_limit, below_2_31 = (2**31 * head_dim - 1) // block_elements, (2**31 - 1) // block_elements
    return next(n for n in (num_blocks, below_rows_limit, below_2_31)
                if n <= num_blocks and pool_addressable(n * block_elements, itemsize, head_dim))


def default_splits(programs: int, steps: int, sm_count: int | None) -> int:
    """The decode kernel's default splits per sequence and kv head (`programs`: sequences x kv-head
    programs): enough for about one wave of programs (`programs_per_wave`), never more than the
    `steps` loop steps. Measured on an H100 with bfloat16 (benchmarks/tune_kernels.py,
    attention.py): the faster choice at the shapes of the attention benchmark. Twice as many, up to
    two waves, while each split keeps at least 64 steps, paid only with the block gather (the
    default before the row gather): with the row gather one split read 2,822-3,020 GB/s against
    2,718-2,959 doubled at the three shapes where it applied (32 x 8192 at 32/8/128 and 32/8/64
    heads, 128 x 8192 at 9/3/64; same run, rows from NPKD pools), and 2,933-3,015 against
    2,903-2,951 from head-major pools."""
    return max(1, min(steps, -(-programs_per_wave(sm_count) // programs)))


def default_row_gather(steps: int, splits: int) -> bool:
    """Whether the decode kernel gathers rows of positions (rather than whole blocks): where a split
    walks more than one loop step. Rows pay by keeping several steps' loads in flight (`default_stages`);
    with one step per split there is nothing to overlap. Measured on an H100 with bfloat16, both forced
    in the same run (benchmarks/attention.py): rows took 1.00-1.06x the block gather's time at the seven
    shapes where each split walks one step (batch 1 with 512 and 2048 positions at 32/8/128, 32/8/64 and
    9/3/64 heads, and 9/3/64 x 8 x 512), and 0.84-0.97x at all 29 others."""
    return -(-steps // splits) > 1


def default_loads_ahead(programs: int, row_bytes: int, row_gather: bool, sm_count: int | None) -> bool:
    """Whether the block gather issues each step's loads a step ahead, its K/V tiles carried in
    registers (the row gather overlaps its loads through Triton's pipeline instead): with rows of
    <= 128 bytes (head dim 64 in 16 bits) always; with 256-byte rows (head dim 128) within about one
    wave (the tiles leave room for two programs a SM); with wider rows never.
    Measured on an H200 with bfloat16 (tune_kernels.py --ab, the kernel file before against one
    without it), at the shapes where each split walks one step: 32/8/128 x 1 x 512 545 GB/s against
    419, 1 x 2048 1,205 against 887; 9/3/64 x 1 x 512 121 against 110, 1 x 2048 424 against 389,
    8 x 512 774 against 666 (1.10-1.36x)."""
    if row_gather:
        return False
    return row_bytes <= 128 or (row_bytes <= 256 and programs <= programs_per_wave(sm_count))


def default_transposed(programs: int, row_bytes: int, row_gather: bool, splits: int, sm_count: int | None) -> bool:
    """Whether the decode kernel computes the transposed products (`programs`: the whole grid).

    Row gather: with rows wider than 128 bytes (head dim 128 in 16 bits), and with narrower rows
    when the sequences alone make more than two waves (> 512 programs on the tuned card, one split).
    Measured on an H100 with bfloat16, same runs (tune_kernels.py): at 32/8/128 heads 2,746-3,038
    GB/s against 2,709-3,011 without at the six shapes of >= 64k positions (9% ahead at 32 x 8192,
    within 1% either way at the other five); at head dim 64, +2-6% at 32/8/64 x 128 sequences
    (1,024 programs), 1-4% slower at up to 512 programs (32/8/64 x 32 and fewer sequences) and 1-7%
    slower at every 9/3/64 shape (384 programs, or 768 in two splits at 128 x 8192).
    Block gather (by default only where each split walks one step), with its loads issued a step
    ahead (`default_loads_ahead`; tune_kernels_decode_transposed_H100.json): with head dim 64 in 16
    bits beyond one wave, with 16-bit head dim 128 within one wave, else not. +3-6% at 32/8/128
    heads (32 x 2048, 8 x 8192) and at 32/8/64 x 128 sequences; 2-3% slower at 32/8/64 x 32
    sequences (256 programs).
    """
    wave = programs_per_wave(sm_count)
    if row_gather:
        return row_bytes > 128 or (programs > 2 * wave and splits == 1)
    return programs > wave if row_bytes <= 128 else row_bytes <= 256 and programs <= wave


def default_stages(row_gather: bool, step_bytes: int, one_per_sm: bool, shared_memory_per_block: int | None) -> int:
    """Triton's num_stages for the decode loop: with the row gather, 5 (Triton then keeps three steps'
    K and V tiles in flight in shared memory: 105 KB at head dim 128 in bfloat16), or 7 with one
    program per SM (`default_one_per_sm`: four steps, about 106 KB at head dim 64, 138 KB at 128),
    where a step's tiles take at most 32 KiB and the stages fit the block's shared memory; else 2
    (also where the shared memory is unknown).

    Measured on an H100 with bfloat16 at 32/8/128 heads and the six shapes of >= 64k positions
    (tune_kernels.py, same runs): with 5 stages the row gather read 2,742-3,030 GB/s against
    2,555-2,978 with 2 (two steps in flight) and 2,519-2,937 for the block gather with its loads a
    step ahead; in another run 2,746-3,038 against 2,578-3,014 with 7 (four steps, 138 KB: one
    program per SM).
    """
    def fits(steps_in_flight):
        needed = steps_in_flight * step_bytes + _DECODE_SHARED_MEMORY_SLACK
        return shared_memory_per_block is not None and needed <= shared_memory_per_block

    if not row_gather or step_bytes > DECODE_STEP_BYTES:
        return 2
    if one_per_sm and fits(4):
        return 7
    return 5 if fits(3) else 2


def default_one_per_sm(programs: int, sm_count: int | None) -> bool:
    """Whether the decode kernel, left to its defaults (no num_splits), gives each sequence and kv
    head one program (no split, so no merge launch), on an SM of its own, and loop steps of 32 KiB
    of K and V (128 positions at head dim 64 in 16 bits, 64 at 128) with 7 stages: where the
    sequences and kv heads alone make from 96 programs up to one per SM (132 on an H100; 96 scaled
    by the SM count elsewhere). Fewer leave too many SMs idle; more put two programs on some SMs and
    one on others. Never where the SM count is unknown.

    Measured on an H100 with bfloat16 against the split launch (tune_kernels.py, same runs): 1.01-1.25x
    its bandwidth at all 11 shapes with 96 or 128 programs (9/3/64 heads x 32 sequences at 512,
    2,048 and 8,192 positions; 32/8/64 and 32/8/128 x 12 sequences at 2,048 and x 16 at 512, 2,048
    and 8,192), e.g. 2,400 against 2,225 GB/s at 9/3/64 x 32 x 2,048; 0.86-0.93x at 64 programs,
    1.01x and 0.96x at 72, 0.95x at 144, 1.01x and 0.98x at 192, and 0.86-1.01x against the one
    split of 64 positions and 5 stages at 256 programs and more.
    """
    if sm_count is None:
        return False
    return 96 * sm_count // TUNED_SM_COUNT <= programs <= sm_count


def default_heads_per_program(programs: int, kv_heads: int, group: int, positions: int, sm_count: int | None) -> int:
    """How many kv heads the decode kernel packs into one program by default: where the sequences
    and kv heads make at least two waves of programs (512 on the tuned card) and the block table
    holds at most 512 positions, the largest power of two up to 4 that divides K, keeps the packed
    query rows (heads x G) within one 16-row tile and leaves at least a wave of programs; else 1.
    The programs of such short contexts each read little (128 KiB of K and V at head dim 64, 512
    positions) and pay their prologue and epilogue as often; packed, each reads 2-4 times as much
    with the same tile.

    Measured on an H100 with bfloat16 (tune_kernels.py, tune_kernels_decode_packed_*_H100.json): in
    one run, against the kernel file before at its defaults, at 32/8/64 heads with 128 sequences
    of 128, 256 and 512 positions 2,258 / 2,561 / 2,755 GB/s against 2,011 / 2,383 / 2,705 (1.12x,
    1.07x, 1.02x), 256 x 256 1.03x, 64 x 512 (2 heads) 1.01x; at 32/8/128, 128 x 256 1.03x, 128 x 512
    1.01x, 64 x 512 1.02x. In the sweeps before: beyond 512 positions it stopped paying (0.98-1.01x
    at 2,048 and 8,192 with 128 sequences); with fewer programs it cost (32 x 512 at 32/8/64: 0.97x
    with 2 heads, 0.84-0.87x with 4); 8 heads (32 query rows) were never ahead of 4.
    """
    wave = programs_per_wave(sm_count)
    if programs < 2 * wave or positions > 512:
        return 1
    heads = 1
    while (heads < 4 and kv_heads % (2 * heads) == 0 and 2 * heads * group <= MIN_ROWS
           and programs // (2 * heads) >= wave):
        heads *= 2
    return heads


def default_step_positions(row_bytes: int, one_per_sm: bool) -> int:
    """Positions a decode loop step covers (all of a program's packed kv heads together): 32 KiB of K
    and V (`DECODE_STEP_BYTES`), or with the split launch at least 64 positions: 128 at head dim
    64 in 16 bits, 64 at 128 and 256. With one program per SM, 32 KiB at every head dim.

    Measured on an H200 with bfloat16 (tune_kernels.py, 128 positions a step against 64, same runs):
    at 32/8/64 heads 1.01-1.05x at the attention benchmark's three shapes
    (tune_kernels_decode_step_32_8_64_H200.json), 0.99-1.00x at 9/3/64 (..._9_3_64_H200.json); on
    rows of U[100, 2,048] positions, as workload A's decode calls hold them, 1.04x at 256 rows,
    1.12-1.17x at 128, 1.04-1.10x at 64, 1.21x at 32, 0.97x at 8 (four splits)
    (tune_kernels_decode_ragged*_H200.json). 64 had been the fastest at the H100's even shapes."""
    if one_per_sm:
        return DECODE_STEP_BYTES // (2 * row_bytes)
    return max(64, DECODE_STEP_BYTES // (2 * row_bytes))


def default_blocks_per_step(block_size: int, max_blocks: int, positions: int = 64) -> int:
    """Blocks per loop step covering `positions` positions (decode: `default_step_positions`),
    dividing the block-table width."""
    blocks = max(1, positions // block_size)
    while max_blocks % blocks:
        blocks //= 2
    return blocks


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """How the decode kernel runs one call: its grid is (B, K / heads_per_program, splits)."""

    splits: int  # programs per sequence and kv-head group; more than 1 adds the merge launch
    heads_per_program: int  # kv heads packed into one program
    one_per_sm: bool  # one program per sequence and kv-head group, 32 KiB steps (`default_one_per_sm`)
    blocks_per_step: int  # blocks gathered per loop step
    row_gather: bool  # K/V gathered as rows of positions, else as whole blocks
    loads_ahead: bool  # the block gather's loads issued a step ahead (`default_loads_ahead`)
    transposed: bool  # the products computed transposed (`default_transposed`)
    num_stages: int  # Triton's software-pipelining depth
    rows: int  # query rows of a program's tile (heads_per_program x G, padded to >= 16, a power of two)


# The decode kernel on 8-bit pools: the plain products (q K^T, p V) of one kv head's rows, 64 positions
# a step, 5 pipeline stages; int8 pools multiply int8 operands (q and the weights quantised per row),
# float8 pools float16 ones (Hopper converts float8 to float16 in one packed instruction). Measured on
# an H200 at 32/8/128 heads against the bfloat16 kernel's default launch (benchmarks/NOTES.md, "8-bit
# K/V on the GPU"). A prototype, with V's blocks transposed, int8 products and 64 positions a step, ran
# 1.62-1.64x it at 128 x 8192 with 3 stages, 1.79x with 5, 1.80x with 6 and 1.77x with 7. Other choices
# at that shape: 128 positions a step 1.22-1.34x, the transposed products 1.21x, and V's tile turned in
# registers rather than gathered as [D, blocks, P] 1.20-1.23x. In this kernel (tune_kv_quant_H200.json)
# 6 and 7 stages, 32 and 128 positions, 8 warps and converted tiles won at some small shapes and lost at
# others; none won at every shape.
MIN_INT8_STEP = 32  # positions a step that int8 p . V products take: on an H200 a 16-position step's were wrong
QUANTIZED_DEFAULTS = {"step_positions": 64, "num_stages": 5, "dot_dtype": {"int8": "int8", "float8_e4m3fn": "float16"}}


def decode_launch(batch: int, num_heads: int, kv_heads: int, head_dim: int, block_size: int, max_blocks: int,
                  itemsize: int, gpu: Gpu, *, num_splits: int | None = None, blocks_per_step: int | None = None,
                  heads_per_program: int | None = None, row_gather: bool | None = None,
                  transposed: bool | None = None, num_stages: int | None = None) -> DecodeLaunch:
    """The decode kernel's launch for a call: each choice the caller gives (as for
    `paged_decode_attention`), the rules above for the rest.

    Args:
      batch, num_heads, kv_heads, head_dim, block_size: B, H, K, D and P of the call.
      max_blocks: M, the block-table width; itemsize: bytes of one K/V element.
      gpu: the card's numbers (`this_gpu`, or `H100` for the tuned card's launch anywhere).

    Raises:
      ValueError: for a heads_per_program or blocks_per_step the kernel can not take.
    """
    row_bytes = head_dim * itemsize
    group = num_heads // kv_heads
    if heads_per_program is None:
        heads_per_program = 1 if row_gather is False else default_heads_per_program(
            batch * kv_heads, kv_heads, group, max_blocks * block_size, gpu.sm_count)
    if heads_per_program < 1 or kv_heads % heads_per_program or heads_per_program & (heads_per_program - 1):
        raise ValueError(f"heads_per_program={heads_per_program} must be a power of two dividing the "
                         f"{kv_heads} kv heads")
    packed = heads_per_program > 1
    if packed and row_gather is False:
        raise ValueError("heads_per_program > 1 takes the row gather")
    kv_groups = kv_heads // heads_per_program  # programs per sequence and split
    one_per_sm = num_splits is None and default_one_per_sm(batch * kv_groups, gpu.sm_count)
    num_splits = 1 if one_per_sm else num_splits
    blocks_per_step = blocks_per_step or default_blocks_per_step(block_size, max_blocks,
                                                                 default_step_positions(row_bytes, one_per_sm)
                                                                 // heads_per_program)
    if max_blocks % blocks_per_step:
        raise ValueError(f"the block-table width {max_blocks} must be a multiple of blocks_per_step={blocks_per_step}")
    steps = max_blocks // blocks_per_step
    splits = num_splits or default_splits(batch * kv_groups, steps, gpu.sm_count)
    if row_gather is None:
        row_gather = packed or default_row_gather(steps, splits)
    if transposed is None:
        transposed = default_transposed(batch * kv_groups * splits, row_bytes, row_gather, splits, gpu.sm_count)
    step_bytes = 2 * heads_per_program * blocks_per_step * block_size * row_bytes
    num_stages = num_stages or default_stages(row_gather, step_bytes, one_per_sm, gpu.shared_memory_per_block)
    rows = max(MIN_ROWS, 1 << (heads_per_program * group - 1).bit_length())
    loads_ahead = default_loads_ahead(batch * kv_groups * splits, row_bytes, row_gather, gpu.sm_count)
    return DecodeLaunch(splits=splits, heads_per_program=heads_per_program, one_per_sm=one_per_sm,
                        blocks_per_step=blocks_per_step, row_gather=row_gather, loads_ahead=loads_ahead,
                        transposed=transposed, num_stages=num_stages, rows=rows)


def default_prefill_splits(programs: int, steps: int, row_bytes: int, sm_count: int | None) -> int:
    """Splits of the positions each query block sees. By shared memory an H100 holds 4 programs of
    the default tile a SM at K/V rows of <= 128 bytes (head dim 64 in 16 bits: 57 KB each), 2 at
    wider rows (114 KB); `full` counts that over the SMs (the tuned card's 132 when unknown), and on
    the card the registers allow as many (128 a thread at head dim 64, Nsight Compute,
    ncu_prefill_regs_8x2048_9_3_64_H100.txt; 146 before the lighter mask, which allowed 3). With a
    third of `full` or fewer programs (query blocks x kv heads x sequences), enough splits to fill
    it, each keeping >= 8 of the `steps` loop steps (the table's capacity), at most 8; else 1.
    Measured on an H100 (tune_kernels_prefill_splits_*_H100.json, 9/3/64 heads): 147 programs over
    a 7k prefix, 4 splits 1.47x one; 75 over 3.5k, 4 splits 1.59x, 8 1.54x; and at 32/8/128, 256
    programs over 3.5k, 2 splits 0.88x one, so that one is not split."""
    full = (sm_count or TUNED_SM_COUNT) * (4 if row_bytes <= 128 else 2)
    if 3 * programs > full:
        return 1
    return max(1, min(8, -(-full // programs), steps // 8))


PREFILL_QUERY_ROWS = 64  # rows (tokens x query heads of one kv head) of the prefill kernel's default tile


def prefill_tile_tokens(num_heads: int, kv_heads: int) -> int:
    """The tokens of a packed prefill's tiles (`PagedKVState.begin_packed_step`): the most that one
    program of the prefill kernel's default tile holds (64 rows of G query heads each), rounded down
    to a power of two, at least 8. Each tile is a row of the kernel, so a tile of this size fills
    its program's rows (G = 4: 16 tokens x 4 heads) where a wider one would need two programs and a
    narrower one leaves rows empty; a chunk pads to whole tiles (fewer than Q tokens each)."""
    group = max(num_heads // kv_heads, 1)
    tokens = max(PREFILL_QUERY_ROWS // group, 1)
    return max(8, 1 << (tokens.bit_length() - 1))
