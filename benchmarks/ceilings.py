"""What a bandwidth figure is measured against: the card's specified memory bandwidth, keyed by the
device name JAX reports, with the bandwidth of XLA's own device copy and reduction measured beside.

The specified bandwidth is the only ceiling the benchmarks report against. A measured copy is a
peer, not a ceiling: it reads and writes (an elementwise pass, counted as bytes read + written),
and a kernel that only reads can beat it (on an H100 the decode kernel reads K and V at up to 104%
of the copy's rate measured in the same run; BENCHMARKS.md). XLA's read-only reduction is recorded
too, as a second peer that reads without writing.

Run: python benchmarks/ceilings.py   (prints the device's specified, copy and sum bandwidths)
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jaxpaged.engine.bench import device_name
from timing import median_time

# The vendor's specified memory bandwidth in bytes/s (decimal TB/s), keyed by
# `jax.devices()[0].device_kind` exactly as the CUDA driver names the card. Only data-sheet values;
# a card missing here has "no spec" and its figures are reported against the measured copy alone.
SPEC_BANDWIDTH_BPS = {
    "NVIDIA H200": 4.8e12,  # H200 SXM, 141 GB HBM3e
    "NVIDIA H200 NVL": 4.8e12,
    "NVIDIA H100 80GB HBM3": 3.35e12,  # H100 SXM5
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "NVIDIA A100 80GB PCIe": 1.935e12,
    "NVIDIA A100-PCIE-40GB": 1.555e12,
    "NVIDIA L40S": 0.864e12,
    "NVIDIA A10G": 0.6e12,
    "NVIDIA A10": 0.6e12,
    "NVIDIA L4": 0.3e12,
    "Tesla T4": 0.32e12,
    "Tesla V100-SXM2-16GB": 0.9e12,
    "Tesla V100-SXM2-32GB": 0.9e12,
}


def spec_bandwidth(device_kind: str) -> float | None:
    """The specified memory bandwidth in bytes/s of the card named `device_kind`, None if unknown."""
    return SPEC_BANDWIDTH_BPS.get(device_kind.strip())


def copy_bandwidth(size_bytes: int = 2**31) -> float:
    """Bytes/s of XLA's elementwise pass over a bf16 buffer of `size_bytes`, counting bytes read
    plus bytes written (a peer to compare against, not a ceiling: see the module docstring)."""
    x = jnp.ones((size_bytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    return 2 * size_bytes / median_time(copy, [(x,)])


def sum_bandwidth(size_bytes: int = 2**31) -> float:
    """Bytes/s of XLA's `jnp.sum` over a bf16 buffer of `size_bytes` (read only, float32 sum)."""
    x = jnp.ones((size_bytes // 2,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    return size_bytes / median_time(total, [(x,)])


def measure(size_bytes: int = 2**31) -> dict:
    """The device's name, its specified bandwidth (None if unknown) and the measured copy and sum
    bandwidths, in bytes/s: what a result file records beside its own figures."""
    name = device_name()
    return {"device": name, "spec_bandwidth_Bps": spec_bandwidth(name), "copy_Bps": copy_bandwidth(size_bytes),
            "sum_Bps": sum_bandwidth(size_bytes)}


def rate(bytes_per_s: float) -> str:
    """A bandwidth in TB/s, or in GB/s below 0.1 TB/s (a CPU's)."""
    return f"{bytes_per_s / 1e12:.2f} TB/s" if bytes_per_s >= 1e11 else f"{bytes_per_s / 1e9:.1f} GB/s"


def describe(ceilings: dict) -> str:
    """One line: the specified bandwidth (or "no spec") and the measured peers beside it."""
    spec = ceilings.get("spec_bandwidth_Bps")
    of_spec = lambda bps: f", {bps / spec:.0%} of spec" if spec else ""  # noqa: E731
    peers = f"XLA copy {rate(ceilings['copy_Bps'])} (read + write{of_spec(ceilings['copy_Bps'])})"
    if ceilings.get("sum_Bps"):
        peers += f", XLA sum {rate(ceilings['sum_Bps'])} (read{of_spec(ceilings['sum_Bps'])})"
    spec_text = f"specified {rate(spec)}" if spec else "no spec for this card"
    return f"{ceilings['device']}: {spec_text}; measured {peers}"


def share(bytes_per_s: float, ceilings: dict) -> tuple[float, str]:
    """`bytes_per_s` as a share of the specified bandwidth, or of the measured copy where the card
    has no spec, with which of the two it is ("spec" or "copy")."""
    spec = ceilings.get("spec_bandwidth_Bps")
    return (bytes_per_s / spec, "spec") if spec else (bytes_per_s / ceilings["copy_Bps"], "copy")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=2048, help="buffer size of the copy and the sum (default 2048)")
    args = parser.parse_args()
    ceilings = measure(args.size_mib * 2**20)
    print(describe(ceilings))
    print(json.dumps(ceilings))


if __name__ == "__main__":
    main()
