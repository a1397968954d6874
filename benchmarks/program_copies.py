"""The large copies in the engine's compiled programs: for each program the warm-up compiles (a few
buckets), the instructions of XLA's optimised HLO that copy an array of at least --min-mib MiB
(copy, copy-start, dynamic-slice, and fusions named for them), with their bytes, for scanned and
unrolled layers side by side. A copy of a pool in a program is a pool's bytes moved on every call:
what this looks for. (Scatters into the pools are updates in place, not copies, and are not listed;
the result files written before that change list them too.)

Run: python benchmarks/program_copies.py --model llama-1b --out program_copies.json
     python benchmarks/program_copies.py --model tiny --min-mib 0 --num-blocks 64      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
from flax import nnx

from jaxpaged.engine import Engine
from jaxpaged.engine.bench import device_name
from jaxpaged.models.config import preset
from jaxpaged.models.llama import MiniLLM

BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
         "f32": 4, "s64": 8, "u64": 8, "f64": 8}
SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn)\[([\d,]*)\]")
COPYING = re.compile(r"= .*?\b(copy|copy-start|dynamic-slice|fusion)\(")


def shape_bytes(text: str) -> int:
    """Bytes of the first array shape in an HLO instruction's result."""
    found = SHAPE.search(text)
    if not found:
        return 0
    dims = [int(d) for d in found.group(2).split(",") if d]
    return BYTES.get(found.group(1), 4) * int(np.prod(dims, dtype=np.int64))


def large_copies(hlo: str, min_bytes: int) -> list[dict]:
    """Copy-like instructions (copies, dynamic slices, and fusions named for them) of at least
    min_bytes, in every computation of an optimised module."""
    found = []
    for line in hlo.splitlines():
        line = line.strip()
        match = COPYING.search(line)
        if not match:
            continue
        op = match.group(1)
        if op == "fusion" and not re.search(r"calls=%?[\w.-]*(copy|dynamic.slice)", line):
            continue
        size = shape_bytes(line.split("=", 1)[1])
        if size >= min_bytes:
            found.append({"op": op, "bytes": size, "hlo": line[:240]})
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1024, help="the prefill calls' packed tokens (one bucket)")
    parser.add_argument("--rows", type=int, default=256, help="table rows, and the decode calls' rows")
    parser.add_argument("--min-mib", type=float, default=16)
    parser.add_argument("--out", default="program_copies.json")
    args = parser.parse_args()
    model = MiniLLM(preset(args.model), rngs=nnx.Rngs(0))
    result = {"device": device_name(), "args": vars(args), "programs": {}}
    for scan in (False, True):
        engine = Engine(model, block_size=16, num_blocks=args.num_blocks, max_num_seqs=args.rows,
                        max_num_batched_tokens=args.tokens, min_prefill_tokens=args.tokens,
                        min_decode_rows=args.rows, decode_steps=4, scan_layers=scan, max_model_len=2048)
        engine.warm_up(sampling=False)
        for (program, config, _), executable in engine.runner._executables.items():
            if config != engine.cache_config:
                continue
            rows = f" with {program[4]} decode rows" if program[0] == "prefill" and program[4] else ""
            name = f"{'scanned' if scan else 'unrolled'} {program[0]} {program[2]}{rows}"
            copies = sorted(large_copies(executable.as_text(), int(args.min_mib * 2**20)), key=lambda c: -c["bytes"])
            total = sum(c["bytes"] for c in copies)
            result["programs"][name] = {"count": len(copies), "bytes": total, "largest": copies[:8]}
            print(f"{name}: {len(copies)} copies of >= {args.min_mib} MiB, {total / 2**30:.2f} GiB")
            for c in copies[:4]:
                print(f"    {c['bytes'] / 2**20:9.1f} MiB  {c['hlo'][:160]}")
        del engine
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
