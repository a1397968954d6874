"""The engine's decode call at one steady shape, in variants: wall time per step against the device's
busy time per step (the difference is time the GPU waited on the host).

Variants (padding[-steps]): the decode batch padded to all table rows ("all") or to a power of two
of the running rows ("pow2"); the steps a call (default --steps). (A fixed-count `fori_loop` in
place of the `while_loop` was also timed once this way: benchmarks/NOTES.md.) Run it
under different XLA_FLAGS in separate processes to compare XLA's options (command buffers, cuBLAS in
place of XLA's own matrix-product kernels). The device time per step is also split by kernel kind.

Run: python benchmarks/tune_engine_decode.py --out FILE.json [--model llama-1b] [--rows 128] [--context 800]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jaxpaged.config import CacheConfig
from jaxpaged.engine.runner import Runner
from jaxpaged.engine.sampling import SamplingParams
from jaxpaged.models.config import preset
from jaxpaged.models.llama import MiniLLM

sys.path.insert(0, os.path.dirname(__file__))
from profile_engine import kind  # noqa: E402
from timing import device_kernel_times  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 256], help="running sequences")
    parser.add_argument("--table-rows", type=int, default=256)
    parser.add_argument("--context", type=int, default=600, help="mean cached positions a row (U[ctx/2, 3ctx/2])")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["all", "pow2", "pow2-1"])
    args = parser.parse_args()

    config = preset(args.model)
    model = MiniLLM(config, rngs=nnx.Rngs(0))
    block = 16
    per_row = -(-(3 * args.context // 2 + args.steps) // block)
    cache = CacheConfig.from_model_config(config, num_blocks=args.table_rows * per_row, block_size=block,
                                          max_seqs=args.table_rows, max_blocks_per_seq=per_row, dtype=config.dtype)
    runner = Runner(model, cache)
    print(f"attention: {'kernel' if runner.kernels else 'reference'}, pool {cache.num_blocks} blocks")
    table = np.arange(args.table_rows * per_row, dtype=np.int32).reshape(args.table_rows, per_row)
    rng = np.random.default_rng(0)
    lens = rng.integers(args.context // 2, 3 * args.context // 2, args.table_rows).astype(np.int32)
    results = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""), "args": vars(args),
               "runs": []}
    for count in args.rows:
        rows = list(range(count))
        params = [SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)] * count
        for variant in args.variants:
            padding, *steps = variant.split("-")
            steps = int(steps[0]) if steps else args.steps
            call_args = (table, lens, rows, [1] * count, params, [0] * count, [0] * count, [0] * count, [()] * count,
                         [10**6] * count, steps)
            runner.min_decode_rows = args.table_rows if padding == "all" else 8
            start = time.perf_counter()
            runner.results(runner.decode(*call_args))
            compile_s = time.perf_counter() - start
            runner.results(runner.decode(*call_args))
            walls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                runner.results(runner.decode(*call_args))
                walls.append(time.perf_counter() - start)
            trace = tempfile.mkdtemp()
            jax.profiler.start_trace(trace)
            for _ in range(args.calls):
                runner.results(runner.decode(*call_args))
            jax.profiler.stop_trace()
            totals, _, busy = device_kernel_times(trace)
            kinds = {}
            for name, us in totals.items():
                kinds[kind(name)] = kinds.get(kind(name), 0.0) + us / 1e3 / args.calls / steps
            shutil.rmtree(trace, ignore_errors=True)
            wall = float(np.median(walls)) / steps
            device = busy / 1e6 / args.calls / steps
            results["runs"].append({"rows": count, "variant": variant, "wall_ms_per_step": wall * 1e3,
                                    "device_ms_per_step": device * 1e3, "kinds_ms_per_step": kinds,
                                    "compile_s": compile_s,
                                    "tokens_per_second": count / wall})
            print(f"rows {count:4d} {variant:<12} wall {wall * 1e3:6.2f} ms/step, device {device * 1e3:6.2f} ms/step, "
                  f"{count / wall:8.0f} tok/s (first call {compile_s:.1f} s); device ms/step by kind: "
                  f"{ {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda x: -x[1])} }", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
