"""Sweep the paged kernels' variants and launch parameters on the GPU, torch SDPA in the same run.

Decode: for each (batch, context) with 32/8 heads, head dim 128 (or `--heads`, for prefill too), bf16, block 16, GB/s (K and V
bytes over the median time) of the default kernel and of the variants in DECODE_VARIANTS (masking
only the last step, loads issued a step ahead, more splits, ...), as device time per call
(`timing.seconds_per_call`, torch alike) over enough input copies to miss the L2 cache; the
default also as wall clock in a jitted loop.
Prefill: tokens/s (device time per call, torch SDPA causal alike) of the configurations in
PREFILL_CONFIGS: query rows, blocks per step, warps, stages, launch order; jax's Pallas flash
attention (Triton lowering) at two tiles beside it, on the same q, K and V.
--previous MODULE: an earlier copy of the kernel file (same signatures), timed beside with its defaults.

Run: python benchmarks/tune_kernels.py --out FILE [--part decode|prefill|all] [--heads 32/8/128]
     [--variants NAME ...] [--options JSON]... [--wall NAME ...] [--shapes 32x2048 ...] [--previous MODULE]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from attention import L2_BYTES, gather_blocks, make_inputs, npkd
from jaxpaged.kernels import triton_decode
from timing import median_time_in_loop, seconds_per_call

DECODE_SHAPES = [(8, 8192), (32, 2048), (128, 512), (32, 8192), (128, 2048), (128, 8192), (1, 8192), (8, 2048)]
_PLAIN = {"transposed": False, "masked_loads": False}
_TML = {"transposed": True, "masked_loads": True}
DECODE_VARIANTS = {  # every flag that a variant is about is given, so a name means the same under other defaults
    "default": {},
    "prefetch": {"prefetch": True, **_PLAIN},
    "no_prefetch": {"prefetch": False, **_PLAIN},
    "mask_tail_only": {"mask_tail_only": True},
    "splits_x2": ("splits_x2", {}),
    "prefetch_blocks_per_step_2": {"prefetch": True, "blocks_per_step": 2, **_PLAIN},
    "transposed": {"transposed": True, "masked_loads": False},
    "transposed_prefetch": {"transposed": True, "masked_loads": False, "prefetch": True},
    "transposed_no_prefetch": {"transposed": True, "masked_loads": False, "prefetch": False},
    "transposed_mask_tail_only": {"transposed": True, "masked_loads": False, "prefetch": False, "mask_tail_only": True},
    "transposed_blocks_per_step_8": {"transposed": True, "masked_loads": False, "prefetch": False, "blocks_per_step": 8},
    "transposed_stages_3": {"transposed": True, "masked_loads": False, "prefetch": False, "num_stages": 3},
    "masked_loads": {"masked_loads": True, "transposed": False},
    "masked_loads_no_prefetch": {"masked_loads": True, "transposed": False, "prefetch": False},
    "masked_loads_stages_1": {"masked_loads": True, "transposed": False, "prefetch": False, "num_stages": 1},
    "masked_loads_stages_3": {"masked_loads": True, "transposed": False, "prefetch": False, "num_stages": 3},
    "transposed_masked_loads": {**_TML},
    "transposed_masked_loads_no_prefetch": {**_TML, "prefetch": False},
    "transposed_masked_loads_stages_1": {**_TML, "prefetch": False, "num_stages": 1},
    "transposed_masked_loads_stages_3": {**_TML, "prefetch": False, "num_stages": 3},
    "transposed_masked_loads_stages_4": {**_TML, "prefetch": False, "num_stages": 4},
    "transposed_masked_loads_prefetch": {**_TML, "prefetch": True},
    "transposed_masked_loads_warps_8": {**_TML, "prefetch": True, "num_warps": 8},
    "transposed_masked_loads_128_warps_8": {**_TML, "prefetch": True, "blocks_per_step": 8, "num_warps": 8},
    "transposed_masked_loads_evict_first": {**_TML, "prefetch": True, "eviction_policy": "evict_first"},
    "transposed_masked_loads_prefetch_blocks_per_step_2": {**_TML, "prefetch": True, "blocks_per_step": 2},
    "transposed_masked_loads_prefetch_mask_tail_only": {**_TML, "prefetch": True, "mask_tail_only": True},
    "transposed_masked_loads_prefetch_stages_1": {**_TML, "prefetch": True, "num_stages": 1},
    # K/V gathered as [chunk, D] rows (row_gather): the loads can go straight to the dots through shared memory
    # (the row variants without a stage count in their name ran with 2, the default then)
    "rows_prefetch": {"row_gather": True, "prefetch": True, **_PLAIN, "num_stages": 2},
    "rows_transposed_masked_loads_prefetch": {"row_gather": True, **_TML, "prefetch": True, "num_stages": 2},
    "rows_no_prefetch": {"row_gather": True, "prefetch": False, **_PLAIN, "num_stages": 2},
    "rows_masked_loads": {"row_gather": True, "prefetch": False, "transposed": False, "masked_loads": True,
                          "num_stages": 2},
    "rows_transposed_masked_loads": {"row_gather": True, **_TML, "prefetch": False, "num_stages": 2},
    "rows_transposed_masked_loads_stages_3": {"row_gather": True, **_TML, "prefetch": False, "num_stages": 3},
    # (stages 3 and 4 compile to the same two buffers as 2; 5 to three: 105 KB of shared memory, kernel_asm.py)
    "rows_transposed_masked_loads_stages_5": {"row_gather": True, **_TML, "prefetch": False, "num_stages": 5},
    "rows_transposed_masked_loads_128_warps_8": {"row_gather": True, **_TML, "prefetch": False, "blocks_per_step": 8,
                                                 "num_warps": 8, "num_stages": 2},
    # (7 and 8 compile to four buffers, 138 KB: one program per SM at head dim 128)
    "rows_transposed_masked_loads_stages_7": {"row_gather": True, **_TML, "prefetch": False, "num_stages": 7},
    "rows_transposed_masked_loads_stages_9": {"row_gather": True, **_TML, "prefetch": False, "num_stages": 9},
    "rows_transposed_masked_loads_stages_5_warps_8": {"row_gather": True, **_TML, "prefetch": False, "num_stages": 5,
                                                      "num_warps": 8},
    "rows_transposed_masked_loads_stages_5_blocks_per_step_2": {"row_gather": True, **_TML, "prefetch": False,
                                                                "num_stages": 5, "blocks_per_step": 2},
    "rows_transposed_masked_loads_stages_5_splits_x2": ("splits_x2", {"row_gather": True, **_TML, "prefetch": False,
                                                                      "num_stages": 5}),
    "rows_masked_loads_stages_5": {"row_gather": True, "prefetch": False, "transposed": False, "masked_loads": True,
                                   "num_stages": 5},
    "rows_masked_loads_stages_7": {"row_gather": True, "prefetch": False, "transposed": False, "masked_loads": True,
                                   "num_stages": 7},
    # head dim 64: more steps in flight, or 128-position steps, or two warps (more programs per SM)
    "rows_masked_loads_stages_9": {"row_gather": True, "prefetch": False, "transposed": False, "masked_loads": True,
                                   "num_stages": 9},
    "rows_masked_loads_128_stages_5": {"row_gather": True, "prefetch": False, "transposed": False,
                                       "masked_loads": True, "num_stages": 5, "blocks_per_step": 8},
    "rows_transposed_masked_loads_128_stages_5": {"row_gather": True, **_TML, "prefetch": False, "num_stages": 5,
                                                  "blocks_per_step": 8},
    "rows_masked_loads_stages_5_warps_2": {"row_gather": True, "prefetch": False, "transposed": False,
                                           "masked_loads": True, "num_stages": 5, "num_warps": 2},
    # the pools head-major, [L, K, N, P, D] (KNPD, the default since): a step's rows of one kv head are whole
    # contiguous blocks (P * D elements) instead of D-element pieces K * D apart; otherwise the defaults
    "rows_knpd": {"layout": "KNPD", "row_gather": True},
    "rows_knpd_128": {"layout": "KNPD", "row_gather": True, "blocks_per_step": 8},
    "rows_knpd_stages_7": {"layout": "KNPD", "row_gather": True, "num_stages": 7},
    "rows_knpd_splits_x2": ("splits_x2", {"layout": "KNPD", "row_gather": True}),
    "rows_knpd_one_split": {"layout": "KNPD", "row_gather": True, "num_splits": 1},
    "rows_one_split": {"row_gather": True, "num_splits": 1},
    "blocks_knpd": {"layout": "KNPD", "row_gather": False},
}
for _name, _options in DECODE_VARIANTS.items():  # a name means the same under later defaults:
    _options = _options[1] if isinstance(_options, tuple) else _options
    if _name not in ("default", "splits_x2"):
        if "rows" not in _name:  # the names without "rows" gather blocks,
            _options.setdefault("row_gather", False)
        if "knpd" not in _name:  # and those without "knpd" read the pools in the layout they were named in
            _options.setdefault("layout", "NPKD")
DECODE_VARIANTS.update({  # more splits than the default launch (a factor of its splits)
    "splits_x3": ("splits_x3", {}),
    "splits_x4": ("splits_x4", {}),
    "blocks": {"row_gather": False},
    "rows": {"row_gather": True},
    **{f"splits_{n}": {"num_splits": n} for n in (1, 2, 4, 6, 8)},  # a fixed number of splits
})
PREFILL_SHAPES = [(8, 0, 2048), (1, 0, 8192)]  # (batch, cached prefix, chunk); prefix 0: a whole prompt
PREFILL_CONFIGS = {  # name: options of paged_prefill_attention (the row gather throughout)
    "default": {},
    "light_first": {"heavy_first": False},
    "rows128_bps8_warps8_stages2": {"query_rows": 128, "blocks_per_step": 8, "num_warps": 8, "num_stages": 2},
    "rows128_bps4_warps8_stages3": {"query_rows": 128, "blocks_per_step": 4, "num_warps": 8, "num_stages": 3},
    "rows64_bps4_warps4_stages2": {"query_rows": 64, "blocks_per_step": 4, "num_warps": 4, "num_stages": 2},
    "rows64_bps8_warps4_stages2": {"query_rows": 64, "blocks_per_step": 8, "num_warps": 4, "num_stages": 2},
    "rows64_bps4_warps4_stages4": {"query_rows": 64, "blocks_per_step": 4, "num_warps": 4, "num_stages": 4},
    "splits1": {"num_splits": 1},
    "splits2": {"num_splits": 2},
    "splits4": {"num_splits": 4},
    "splits8": {"num_splits": 8},
}
# Variants timed as kernel options, then folded into the kernel or dropped (their options are gone; results
# in tune_kernels_prefill_{ids,q,loop,best}_H100.json): K/V rows from the step's block ids, and found a step
# ahead; q gathered as rows; V rows past the length loaded as zeros; all kept. One loop of masked steps, and
# the output stored as rows: dropped. The masked steps in the main loop with the masking behind a branch
# (`one_loop`, tune_kernels_prefill_one_loop_*_H100.json): 0.55-0.72x, dropped.
# jax's Pallas flash attention on the same q, K and V (contiguous, K and V repeated to the query heads):
# (block_q, block_k, warps, stages); 64, 64, 4, 3 was its best of eight at 32/8/128 (prefill_attention_H100*.json)
PREFILL_JAX_MHA = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 4, 2))
# (128 rows x 8 blocks, 8 warps, 2 stages, the default, compiles for sm_90 with register spills and 4 blocks
# without: kernel_asm.py)


def _torch_sdpa_time(sets, causal=False):
    import torch
    import torch.nn.functional as F

    def to_torch(x, seq_axis_first):
        t = torch.from_dlpack(x)
        return t.transpose(1, 2).contiguous() if seq_axis_first else t

    if causal and sets[0][0].shape[1] != sets[0][1].shape[1]:  # a chunk on a cached prefix: lower-right causal
        from torch.nn.attention.bias import causal_lower_right

        mask = {"attn_mask": causal_lower_right(sets[0][0].shape[1], sets[0][1].shape[1])}
    else:
        mask = {"is_causal": causal}
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **mask)  # noqa: E731
    torch_sets = [tuple(to_torch(x, True) for x in s) for s in sets]
    return seconds_per_call(sdpa, torch_sets, sync=lambda _: torch.cuda.synchronize())[0]


def tune_decode(rng, old_kernel, heads=32, kv_heads=8, head_dim=128, variants=None, shapes=DECODE_SHAPES,
                wall_variants=()):
    rows = []
    for batch, context in shapes:
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        copies = max(1, min(8, math.ceil(2 * L2_BYTES / kv_bytes)))
        sets = make_inputs(rng, batch, context, heads, kv_heads, head_dim, 16, copies)
        args = [(s["q"], s["pool_k"], s["pool_v"], s["layer"], s["tables"], s["lengths"]) for s in sets]
        npkd_args = None  # the same pools in the layout before, [1, N, P, K, D], made when a variant asks for them
        reference = np.asarray(triton_decode.paged_decode_attention(*args[0]), np.float32)
        bps = triton_decode.default_blocks_per_step(16, context // 16)
        auto_splits, _ = triton_decode.default_launch(batch, kv_heads, head_dim, context // 16 // bps)
        result = {"heads": f"{heads}/{kv_heads}/{head_dim}", "batch": batch, "context": context, "kv_bytes": kv_bytes,
                  "auto_splits": auto_splits, "one_per_sm": triton_decode.default_one_per_sm(batch * kv_heads),
                  "GBps": {}}

        def record(name, fn, timer=seconds_per_call, args=args):
            try:
                out = np.asarray(fn(*args[0]), np.float32)
                err = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                seconds, *kernels = timer(fn, args)
            except Exception as error:  # a configuration Triton can not compile
                print(f"  B{batch} S{context} {name}: {type(error).__name__}: {str(error)[:200]}")
                return
            result["GBps"][name] = kv_bytes / seconds / 1e9
            if kernels:
                result.setdefault("kernels_us_per_call", {})[name] = kernels[-1]
            result.setdefault("rel_err_vs_default", {})[name] = err

        for name, options in DECODE_VARIANTS.items():
            if variants and name not in variants:
                continue
            if isinstance(options, tuple):  # a multiple of the default splits ("splits_xF")
                factor = int(options[0].rsplit("x", 1)[1])
                options = {**options[1], "num_splits": auto_splits * factor}
            if options.get("num_splits", 0) > context // 16 // bps:
                continue
            if options.get("layout") == "NPKD" and npkd_args is None:
                npkd_args = [(q, npkd(k), npkd(v), *rest) for q, k, v, *rest in args]
            fn = functools.partial(triton_decode.paged_decode_attention, **options)
            record(name, fn, args=npkd_args if options.get("layout") == "NPKD" else args)
            if name in wall_variants:
                record(f"{name}_wall_in_jitted_loop", fn, timer=lambda fn, args: (median_time_in_loop(fn, args),),
                       args=npkd_args if options.get("layout") == "NPKD" else args)
        record("default_wall_in_jitted_loop", triton_decode.paged_decode_attention,
               timer=lambda fn, args: (median_time_in_loop(fn, args),))
        if old_kernel is not None:  # an earlier kernel file with the same signature, its defaults
            record("previous_kernel", old_kernel.paged_decode_attention)
        dense = [(s["q"][:, :, None], gather_blocks(s["pool_k"], s["tables"]), gather_blocks(s["pool_v"], s["tables"]))
                 for s in sets]
        result["GBps"]["torch_sdpa"] = kv_bytes / _torch_sdpa_time([(q.transpose(0, 2, 1, 3), k, v) for q, k, v in dense]) / 1e9
        del dense
        rows.append(result)
        gbps = result["GBps"]
        print(f"B{batch:>4} S{context:>5}: " + "  ".join(f"{k} {v:.0f}" for k, v in gbps.items()), flush=True)
    return rows


def _jax_mha(q, k, v, block_q, block_k, num_warps, num_stages):
    """jax's Pallas flash attention (Triton lowering), causal, on [B, S, H, D]; K and V have H heads."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha

    return pallas_mha.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, num_warps=num_warps,
                          num_stages=num_stages, block_sizes=pallas_mha.BlockSizes(block_q=block_q, block_k=block_k))


def prefill_inputs(batch, prefix, chunk, heads, kv_heads, head_dim):
    """Random bf16 q [B, T, H, D] and K, V [B, S, K, D] (S = prefix + chunk) appended to block-16 pools.

    Returns (q, k, v, kernel_args): kernel_args are paged_prefill_attention's positional arguments.
    """
    import jaxpaged as jp

    context = prefix + chunk
    config = jp.CacheConfig(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=batch * context // 16,
                            block_size=16, max_seqs=batch, dtype="bfloat16")
    state = jp.init_state(config)
    keys = jax.random.split(jax.random.key(batch), 3)
    k = jax.random.normal(keys[0], (batch, context, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[1], (batch, context, kv_heads, head_dim), jnp.bfloat16)
    q = jax.random.normal(keys[2], (batch, chunk, heads, head_dim), jnp.bfloat16)
    state, _ = jp.append(state, 0, jnp.arange(batch, dtype=jnp.int32), k, v)
    tables = state.table.block_ids[:batch]
    lengths = jnp.full((batch,), context, jnp.int32)
    positions = jnp.broadcast_to(prefix + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
    return q, k, v, (q, state.pools.k, state.pools.v, 0, tables, lengths, positions)


def tune_prefill(old_kernel, configs=None, heads=32, kv_heads=8, head_dim=128, shapes=PREFILL_SHAPES):
    rows = []
    for batch, prefix, chunk in shapes:
        context = prefix + chunk
        q, k, v, kernel_args = prefill_inputs(batch, prefix, chunk, heads, kv_heads, head_dim)
        args = [kernel_args]
        result = {"batch": batch, "prefix": prefix, "chunk": chunk, "context": context, "heads": heads,
                  "kv_heads": kv_heads, "head_dim": head_dim, "tokens_per_s": {}}
        reference = None
        kernels = {name: functools.partial(triton_decode.paged_prefill_attention, **options)
                   for name, options in PREFILL_CONFIGS.items() if configs is None or name in configs}
        if old_kernel is not None:  # an earlier kernel file with the same signature, its defaults
            kernels["previous_kernel"] = old_kernel.paged_prefill_attention
        for name, fn in kernels.items():
            try:
                out = np.asarray(fn(*args[0]), np.float32)
                reference = out if reference is None else reference
                err = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                seconds, _, top = seconds_per_call(fn, args)
            except Exception as error:
                print(f"  prefill B{batch} S{prefix}+{chunk} {name}: {type(error).__name__}: {str(error)[:200]}")
                continue
            result["tokens_per_s"][name] = batch * chunk / seconds
            result.setdefault("rel_err_vs_first", {})[name] = err
            result.setdefault("kernels_us_per_call", {})[name] = top
        group = heads // kv_heads
        repeated = (q, jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2))  # its K and V at H heads, not timed
        for tile in PREFILL_JAX_MHA if prefix == 0 else ():  # (its causal mask takes no cached prefix)
            fn = jax.jit(functools.partial(_jax_mha, **dict(zip(("block_q", "block_k", "num_warps", "num_stages"), tile))))
            name = "jax_mha_" + "_".join(map(str, tile))
            try:
                out = np.asarray(fn(*repeated), np.float32)
                result.setdefault("rel_err_vs_first", {})[name] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
                seconds, _, top = seconds_per_call(fn, [repeated])
            except Exception as error:
                print(f"  prefill B{batch} S{prefix}+{chunk} {name}: {type(error).__name__}: {str(error)[:200]}")
                continue
            result["tokens_per_s"][name] = batch * chunk / seconds
            result.setdefault("kernels_us_per_call", {})[name] = top
        del repeated
        result["tokens_per_s"]["torch_sdpa"] = batch * chunk / _torch_sdpa_time([(q, k, v)], causal=True)
        rows.append(result)
        print(f"prefill {heads}/{kv_heads}/{head_dim} B{batch} S{prefix}+{chunk}: " + "  ".join(f"{k} {v / 1e6:.2f}M" for k, v in result["tokens_per_s"].items()),
              flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/tune_kernels.json")
    parser.add_argument("--part", choices=("decode", "prefill", "all"), default="all")
    parser.add_argument("--heads", default="32/8/128", help="head shape: query heads/kv heads/head dim")
    parser.add_argument("--previous", help="module name of an earlier kernel file to time beside the current one")
    parser.add_argument("--variants", nargs="+", choices=list(DECODE_VARIANTS), metavar="NAME",
                        help="decode variants to time (default all; names in DECODE_VARIANTS)")
    parser.add_argument("--options", action="append", default=[], metavar="JSON",
                        help="a further decode variant as keyword arguments of paged_decode_attention, named by its "
                             "text (repeatable)")
    parser.add_argument("--wall", nargs="+", default=[], choices=list(DECODE_VARIANTS), metavar="NAME",
                        help="variants also timed as wall clock in a jitted loop (launches and gaps included)")
    parser.add_argument("--shapes", nargs="+", help="decode shapes as BATCHxCONTEXT (default: the eight in DECODE_SHAPES)")
    parser.add_argument("--prefill-configs", nargs="+", choices=list(PREFILL_CONFIGS), metavar="NAME",
                        help="prefill configurations to time (default all; names in PREFILL_CONFIGS)")
    parser.add_argument("--prefill-shapes", nargs="+", metavar="BxPREFIX+CHUNK",
                        help="prefill shapes, e.g. 1x7168+1024 (default 8x0+2048 1x0+8192)")
    args = parser.parse_args()
    old_kernel = importlib.import_module(args.previous) if args.previous else None
    rng = np.random.default_rng(0)
    for text in args.options:
        DECODE_VARIANTS[text] = json.loads(text)
    variants = args.variants + args.options if args.variants else None
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    heads, kv_heads, head_dim = (int(x) for x in args.heads.split("/"))
    if args.part in ("decode", "all"):
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes] if args.shapes else DECODE_SHAPES
        result["decode"] = tune_decode(rng, old_kernel, heads, kv_heads, head_dim, variants, shapes, args.wall)
    if args.part in ("prefill", "all"):
        shapes = [tuple(int(x) for x in re.split(r"[x+]", shape)) for shape in args.prefill_shapes or []] or PREFILL_SHAPES
        result["prefill"] = tune_prefill(old_kernel, args.prefill_configs, heads, kv_heads, head_dim, shapes)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
