"""Run the decode kernel variants and torch SDPA a few times each on one shape, for a profiler to read.

Meant to run under Nsight Compute on the GPU, e.g.
  ncu --kernel-name regex:"jaxpaged|flash" --section LaunchStats --section Occupancy \
      --section SpeedOfLight --section WarpStateStats python benchmarks/profile_kernel.py --batch 32 --context 2048
Each variant runs `--calls` times after it compiles; nothing is timed here.

With `--device-time` it instead prints each variant's device time per call (`timing.device_time`)
and the kernels that make it up.
"""

from __future__ import annotations

import argparse
import functools

import jax
import numpy as np

from attention import gather_blocks, make_inputs
from jaxpaged.kernels.triton_decode import paged_decode_attention
from timing import device_time

VARIANTS = {"default": {}, "prefetch": {"prefetch": True}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--torch", action="store_true", help="also run torch SDPA on a contiguous copy")
    parser.add_argument("--device-time", action="store_true", help="print each variant's device time per call and its kernels")
    args = parser.parse_args()
    s = make_inputs(np.random.default_rng(0), args.batch, args.context, 32, 8, 128, 16, 1)[0]
    if args.device_time:
        for name in args.variants:
            trace_calls(functools.partial(paged_decode_attention, **VARIANTS[name]), s, name)
        return
    for name in args.variants:
        fn = functools.partial(paged_decode_attention, **VARIANTS[name])
        for _ in range(args.calls):
            jax.block_until_ready(fn(s["q"], s["pool_k"], s["pool_v"], s["layer"], s["tables"], s["lengths"]))
        print("ran", name, flush=True)
    if args.torch:
        import torch
        import torch.nn.functional as F

        dense = [gather_blocks(s[p], s["tables"]) for p in ("pool_k", "pool_v")]
        k, v = (torch.from_dlpack(x).transpose(1, 2).contiguous() for x in dense)
        q = torch.from_dlpack(s["q"])[:, :, None]
        for _ in range(args.calls):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch.cuda.synchronize()
        print("ran torch_sdpa", flush=True)


def trace_calls(fn, s, name, calls=20):
    seconds, kernels = device_time(fn, [(s["q"], s["pool_k"], s["pool_v"], s["layer"], s["tables"], s["lengths"])], calls)
    print(f"{name}: {seconds * 1e6:.1f} us of device time per call")
    for kernel, us in sorted(kernels.items(), key=lambda item: -item[1])[:8]:
        print(f"  {us:9.1f} us  {kernel[:100]}")


if __name__ == "__main__":
    main()
