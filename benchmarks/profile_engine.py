"""Where the engine's time goes on the GPU: workload A under the JAX profiler, device kernels
aggregated by name and by kind, the device's busy time against the wall, and the wall time of
prefill and decode calls.

Run: python benchmarks/profile_engine.py --out-dir DIR [--model llama-1b] [--num-requests 128]
     python benchmarks/profile_engine.py --out-dir /tmp/p --model tiny --num-requests 6 --max-len 64  # CPU smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

import jax
from flax import nnx

from jaxpaged.engine import LLM
from jaxpaged.engine.bench import params_for, workload_a_requests
from jaxpaged.models.config import preset
from jaxpaged.models.llama import MiniLLM

sys.path.insert(0, os.path.dirname(__file__))
from engine import runner_arguments, runner_options  # noqa: E402
from timing import device_kernel_times  # noqa: E402

KINDS = (  # first match wins
    ("attention", r"jaxpaged|paged|flash|attention"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|matmul|dot|xmma|sm90"),
    ("copy", r"copy|memcpy|memset|dynamic.update.slice|scatter"),
    ("sort/top-k", r"sort|topk|top_k"),
    ("reduction", r"reduce"),
    ("fusion", r"fusion"),
)


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=1024, help="prompts and outputs of U[100, this] tokens")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--top", type=int, default=25, help="kernels printed")
    parser.add_argument("--no-overlap", action="store_true", help="read each decode call before starting the next")
    runner_arguments(parser)
    args = parser.parse_args()

    model = MiniLLM(preset(args.model), rngs=nnx.Rngs(0))
    prompts, outputs = workload_a_requests(model.config, args.num_requests, 100, args.max_len)
    engine_args = dict(block_size=16, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       decode_steps=args.decode_steps, max_model_len=2 * args.max_len, overlap=not args.no_overlap,
                       **runner_options(args))
    LLM(model, **engine_args).generate(prompts, params_for(outputs), use_tqdm=False)  # compiles every shape
    engine = LLM(model, **engine_args).engine
    calls = collections.defaultdict(list)  # wall seconds of the runner's calls, by kind
    for name in ("prefill", "decode", "chain", "results"):  # decode and chain start a call; results waits for it
        method = getattr(engine.runner, name)

        def timed(*a, _method=method, _name=name, **k):
            start = time.perf_counter()
            out = _method(*a, **k)
            calls[_name].append(time.perf_counter() - start)
            return out

        setattr(engine.runner, name, timed)
    for i, (prompt, params) in enumerate(zip(prompts, params_for(outputs))):
        engine.add_request(str(i), prompt, params)
    suffix = ("_no_overlap" if args.no_overlap else "") + {"on": "_scanned", "off": "_unrolled", "prefill": "_scanned_prefill"}.get(
        args.scan_layers, "")  # of the trace's folder and the result file
    trace_dir = os.path.join(args.out_dir, "engine_trace" + suffix)
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    totals, counts, busy = device_kernel_times(trace_dir)
    by_kind = collections.Counter()
    for name, us in totals.items():
        by_kind[kind(name)] += us
    stats = engine.stats()
    result = {"device": jax.devices()[0].device_kind, "model": args.model, "args": vars(args), "wall_s": wall,
              "device_busy_s": busy / 1e6, "generated_tokens": stats.generated_tokens,
              "decode_steps": stats.decode_steps, "calls": {k: {"count": len(v), "seconds": sum(v)}
                                                            for k, v in calls.items()},
              "kinds_us": dict(by_kind), "kernels_us": dict(totals), "counts": dict(counts)}
    name = f"profile_engine_{args.model}{suffix}.json"
    with open(os.path.join(args.out_dir, name), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}, {args.model}, {args.num_requests} requests: wall {wall:.2f} s, device busy "
          f"{busy / 1e6:.2f} s, {stats.generated_tokens / wall:.0f} out tok/s, {stats.decode_steps} decode steps")
    for name, times in calls.items():
        print(f"  {name}: {len(times)} calls, {sum(times):.2f} s wall")
    print("by kind (device ms):", {k: round(v / 1e3, 1) for k, v in by_kind.most_common()})
    for name, us in totals.most_common(args.top):
        print(f"{us / 1e3:9.1f} ms {counts[name]:7d}x  {kind(name):<10} {name[:100]}")


if __name__ == "__main__":
    main()
