"""The engine's decode call at one steady shape, in variants: wall time per step against the device's
busy time per step (the difference is time the GPU waited on the host).

Variants (padding[-steps][-sorted]): the decode batch padded to all table rows ("all") or to a power
of two of the running rows ("pow2"); the steps a call (default --steps); "sorted": the rows given
longest first (the decode kernel's programs start in row order), else in the table's order;
"allocate": each step's slots by `ops.allocate_slots` (the device allocator's path, its checks and
free list) instead of `ops.reserved_slots`, the runner's (`PagedKVState.host_blocks`). (A
fixed-count `fori_loop` in place of the `while_loop` was also timed once this way:
benchmarks/NOTES.md.) Run it under different XLA_FLAGS in separate processes to compare XLA's
options (command buffers, cuBLAS in place of XLA's own matrix-product kernels). The device time per
step is also split by kernel kind and by kernel, and the device's idle time between kernels by the
pair of kernels around each gap.

Run: python benchmarks/tune_engine_decode.py --out FILE.json [--model llama-1b] [--rows 128] [--context 800]
     python benchmarks/tune_engine_decode.py --out FILE.json --rows 256 32 --lengths 100 2048 --variants pow2 pow2-sorted
     python benchmarks/tune_engine_decode.py --out /tmp/t.json --model tiny --rows 8 --lengths 10 60 --calls 1  # CPU smoke run
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
from timing import device_events, idle_gaps, kernel_times  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 256], help="running sequences")
    parser.add_argument("--table-rows", type=int, default=256)
    parser.add_argument("--context", type=int, default=600, help="mean cached positions a row (U[ctx/2, 3ctx/2])")
    parser.add_argument("--lengths", type=int, nargs=2, metavar=("LOW", "HIGH"),
                        help="cached positions a row drawn from U[LOW, HIGH] instead (workload A's run from 100 to 2,048)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["all", "pow2", "pow2-1"])
    parser.add_argument("--top", type=int, default=12, help="kernels kept per run, by device time a step")
    args = parser.parse_args()

    config = preset(args.model)
    model = MiniLLM(config, rngs=nnx.Rngs(0))
    block = 16
    low, high = args.lengths or (args.context // 2, 3 * args.context // 2 - 1)
    per_row = -(-(high + 1 + args.steps) // (8 * block)) * 8  # a multiple of 8 blocks, as the engine's 2,048 positions
    cache = CacheConfig.from_model_config(config, num_blocks=args.table_rows * per_row, block_size=block,
                                          max_seqs=args.table_rows, max_blocks_per_seq=per_row, dtype=config.dtype)
    runner = Runner(model, cache)
    print(f"attention: {'kernel' if runner.kernels else 'reference'}, pool {cache.num_blocks} blocks")
    table = np.arange(args.table_rows * per_row, dtype=np.int32).reshape(args.table_rows, per_row)
    rng = np.random.default_rng(0)
    lens = rng.integers(low, high + 1, args.table_rows).astype(np.int32)
    results = {"device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""), "args": vars(args),
               "runs": []}
    for count in args.rows:
        longest_first = sorted(range(count), key=lambda r: -lens[r])
        params = [SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)] * count
        for variant in args.variants:
            padding, *rest = variant.split("-")
            steps = next((int(x) for x in rest if x.isdigit()), args.steps)
            rows = longest_first if "sorted" in rest else list(range(count))
            runner.state = runner.state.replace(host_blocks="allocate" not in rest)
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
            events = device_events(trace)  # the trace read once
            totals, counts, busy = kernel_times(events)
            kernels = sum(counts.values()) / args.calls / steps
            gaps = idle_gaps(events)
            kinds, per_step = {}, {name: us / 1e3 / args.calls / steps for name, us in totals.items()}
            for name, ms in per_step.items():
                kinds[kind(name)] = kinds.get(kind(name), 0.0) + ms
            shutil.rmtree(trace, ignore_errors=True)
            wall = float(np.median(walls)) / steps
            device = busy / 1e6 / args.calls / steps
            results["runs"].append({"rows": count, "variant": variant, "wall_ms_per_step": wall * 1e3,
                                    "device_ms_per_step": device * 1e3, "kinds_ms_per_step": kinds,
                                    "kernels_ms_per_step": dict(sorted(per_step.items(), key=lambda x: -x[1])[:args.top]),
                                    "kv_positions": int(lens[:count].sum()), "kernels_per_step": kernels,
                                    "idle_ms_per_step": sum(gaps.values()) / 1e3 / args.calls / steps,
                                    "idle_ms_per_step_by_gap": {pair: us / 1e3 / args.calls / steps for pair, us
                                                                in gaps.most_common(args.top)},
                                    "compile_s": compile_s,
                                    "tokens_per_second": count / wall})
            print(f"rows {count:4d} {variant:<12} wall {wall * 1e3:6.2f} ms/step, device {device * 1e3:6.2f} ms/step, "
                  f"{count / wall:8.0f} tok/s, {kernels:.0f} kernels/step (first call {compile_s:.1f} s); device ms/step by kind: "
                  f"{ {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda x: -x[1])} }", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
