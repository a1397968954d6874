"""What Triton makes of the paged kernels' variants, without a GPU: registers per thread, shared
memory per program, and the instructions that say how data moves (global loads, asynchronous
copies into shared memory, shared-memory traffic, mma.sync or Hopper's wgmma, barriers).

Each variant (a name in tune_kernels.DECODE_VARIANTS) is lowered for CUDA by jax on this machine,
its Triton IR compiled for sm_90 by the `triton` package, and the PTX assembled by the ptxas that
ships with it (`-v` reports registers and spills). The Triton inside jax's GPU build is not the
`triton` package, so the figures approximate what runs on the GPU: on an H100, Nsight Compute
reported the same shared memory (22,528 / 55,296 bytes with / without the loads a step ahead, a
variant since removed) and 220 / 124 registers where this gives 232 / 127 (triton 3.6.0, jax 0.10.2).
The launches are an H100's (`launch.H100`: its SM count and shared memory), whatever this machine is.

Run: pip install triton; python benchmarks/kernel_asm.py [--kernel decode|prefill|jax_mha] [--heads 32/8/128] [--shape 32x2048]
     [--dtype float32] [--variants NAME ...] [--options JSON ...] [--out-dir DIR]   (DIR keeps each variant's IR and PTX)
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from jaxpaged.kernels import launch
from jaxpaged.kernels.decode import paged_decode_attention
from jaxpaged.kernels.prefill import paged_prefill_attention
from tune_kernels import DECODE_VARIANTS, _jax_mha

JAX_MHA_DEFAULTS = {"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}  # its best on the H100

PATTERNS = {
    "ld.global.v4": r"ld\.global[\w.]*\.v4",
    "cp.async": r"cp\.async\.c[ag]",
    "st.shared": r"st\.shared",
    "ld.shared": r"ld\.shared",
    "ldmatrix": r"ldmatrix",
    "mma.sync": r"mma\.sync",
    "wgmma": r"wgmma\.mma_async",
    "bar.sync": r"bar\.sync",
    "ex2": r"ex2\.approx",
    "f32_math": r"(?m)^\s*(?:fma|mul|add|sub|neg|max|min|ex2|cvt\.ftz\.sat|div|rcp)[\w.]*\.f32\b",  # float arithmetic
}


def triton_ir(kernel: str, options: dict, heads: int, kv_heads: int, head_dim: int, batch: int, context: int,
              block_size: int = 16, dtype=jnp.bfloat16) -> tuple[str, int, int]:
    """The Triton IR (text) of the decode or prefill kernel for these shapes and options, lowered for
    CUDA here, with the num_warps and num_stages its launch passes to Triton. Prefill: T = context
    queries per sequence (a whole prompt)."""
    from jax._src.pallas.triton import pallas_call_registration as registration  # (private: the lowering hook)

    kept = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def lower_and_keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        kept.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    blocks = batch * context // block_size
    pool = jax.ShapeDtypeStruct((1, kv_heads, blocks, block_size, head_dim), dtype)
    tables = jax.ShapeDtypeStruct((batch, context // block_size), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if kernel == "jax_mha":  # the peer: jax's Pallas flash attention, K and V at the query heads
        q = jax.ShapeDtypeStruct((batch, context, heads, head_dim), dtype)
        fn, args = functools.partial(_jax_mha, **{**JAX_MHA_DEFAULTS, **options}), (q, q, q)
    elif kernel == "decode":
        q = jax.ShapeDtypeStruct((batch, heads, head_dim), dtype)
        attend = functools.partial(paged_decode_attention, **{"gpu": launch.H100, **options})
        fn, args = (lambda q, k, v, t, n: attend(q, k, v, 0, t, n)), (q, pool, pool, tables, lengths)
    else:
        q = jax.ShapeDtypeStruct((batch, context, heads, head_dim), dtype)
        positions = jax.ShapeDtypeStruct((batch, context), jnp.int32)
        attend = functools.partial(paged_prefill_attention, **{"gpu": launch.H100, **options})
        fn, args = (lambda q, k, v, t, n, p: attend(q, k, v, 0, t, n, p)), (q, pool, pool, tables, lengths, positions)
    registration.lowering.lower_jaxpr_to_triton_module = lower_and_keep
    try:
        traced = jax.jit(fn).trace(*args)
        traced.lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    params = _first_launch_params(traced.jaxpr.jaxpr)
    return kept[0], params.num_warps, params.num_stages  # the attention kernel (a merge kernel is lowered after it)


def _first_launch_params(jaxpr):
    """The Triton compiler params (warps, stages) of the first pallas_call in a jaxpr, jits searched."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            return eqn.params["compiler_params"]
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))  # jit, or a custom_vjp (jax's kernel)
        if inner is not None and (params := _first_launch_params(getattr(inner, "jaxpr", inner))) is not None:
            return params
    return None


def compile_ir(ir: str, num_warps: int, num_stages: int, keep_dir: str) -> dict:
    """Compile Triton IR for sm_90; registers and spills from ptxas, shared memory, instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(keep_dir, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ir)
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    for stage in ("ttgir", "ptx"):
        with open(os.path.join(keep_dir, f"kernel.{stage}"), "w") as f:
            f.write(kernel.asm[stage])
    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))[0]
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", os.path.join(keep_dir, "kernel.ptx"), "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    ptx = kernel.asm["ptx"]
    return {"registers": registers, "spill_bytes": spills, "shared_bytes": kernel.metadata.shared,
            **{name: len(re.findall(pattern, ptx)) for name, pattern in PATTERNS.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=("decode", "prefill", "jax_mha"), default="decode",
                        help="jax_mha: jax's Pallas flash attention, the prefill peer (options: block_q, block_k, "
                             "num_warps, num_stages)")
    parser.add_argument("--heads", default="32/8/128", help="query heads/kv heads/head dim")
    parser.add_argument("--shape", default="32x2048", help="BATCHxCONTEXT (sets the default launch)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="q and pools")
    parser.add_argument("--variants", nargs="+", default=["default", "blocks", "rows", "transposed", "untransposed"],
                        choices=[name for name, options in DECODE_VARIANTS.items() if isinstance(options, dict)],
                        help="decode variants (prefill: use --options)")
    parser.add_argument("--options", action="append", default=[], metavar="JSON",
                        help='a further variant as keyword arguments of paged_decode_attention, e.g. \'{"num_warps": 8}\'')
    parser.add_argument("--out-dir", help="keep each variant's Triton IR, TTGIR and PTX here")
    args = parser.parse_args()
    heads, kv_heads, head_dim = (int(x) for x in args.heads.split("/"))
    batch, context = (int(x) for x in args.shape.split("x"))
    variants = {name: DECODE_VARIANTS[name] for name in args.variants} if args.kernel == "decode" else {"default": {}}
    variants.update({text: json.loads(text) for text in args.options})
    rows = {}
    for name, options in variants.items():
        ir, warps, stages = triton_ir(args.kernel, options, heads, kv_heads, head_dim, batch, context,
                                      dtype=jnp.dtype(args.dtype))
        with tempfile.TemporaryDirectory() as scratch:
            keep_dir = os.path.join(args.out_dir, re.sub(r"\W+", "_", name).strip("_")) if args.out_dir else scratch
            os.makedirs(keep_dir, exist_ok=True)
            rows[name] = compile_ir(ir, warps, stages, keep_dir)
    columns = list(next(iter(rows.values())))
    print(f"{args.kernel}, {args.heads} heads, {args.shape}: Triton IR compiled by triton "
          + __import__("triton").__version__)
    width = max(len(name) for name in rows) + 2
    print(f"{'variant':<{width}}" + "".join(f"{c[:12]:>13}" for c in columns))
    for name, row in rows.items():
        print(f"{name:<{width}}" + "".join(f"{row[c]:>13}" for c in columns))
    if args.out_dir:
        with open(os.path.join(args.out_dir, "kernel_asm.json"), "w") as f:
            json.dump({"kernel": args.kernel, "heads": args.heads, "shape": args.shape, "jax": jax.__version__,
                       "triton": __import__("triton").__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
