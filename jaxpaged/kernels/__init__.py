"""GPU kernels that read the block pools directly (Pallas, Triton lowering), one concept a file:
`decode` and `prefill` (the kernels), `merge` (their split merges), `launch` (which shapes they take
and their default launches, from the GPU's numbers), `common` (what both kernels share).

Why the Triton lowering: it runs on the jax this project supports on GPUs (0.10 and 0.11, where it
is deprecated but present), it is what jax's own paged kernel uses, so the comparison is like for
like, and its ref gathers (`pool_ref[block_ids]`) express a page-table read in one line. A Mosaic
GPU version would replace `decode` and `prefill`; `launch` and the reference stay.

Nothing here imports the Triton lowering until a kernel is called: jax deprecated Pallas's Triton
backend in 0.11 and will remove it, so a caller asks `unavailable_reason()` first and takes the
reference path where it says why the kernels can not run.
"""

from __future__ import annotations

import functools

import jax

from jaxpaged.kernels.launch import supported

__all__ = ["paged_decode_attention", "paged_prefill_attention", "supported", "unavailable_reason"]


def _import_lowering() -> None:
    """Import Pallas's Triton lowering (ImportError where this jax has none)."""
    from jax.experimental.pallas import triton  # noqa: F401


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernels can not run with this jax, in one line, or None where they can (the Triton
    lowering imports). Asked once per process; the kernels themselves run on a GPU (or anywhere in
    Pallas interpret mode)."""
    try:
        _import_lowering()
    except ImportError as error:
        return f"this jax ({jax.__version__}) has no Pallas Triton lowering ({error})"
    return None


def paged_decode_attention(q, k_pool, v_pool, layer, block_tables, lengths, **options):
    """`decode.paged_decode_attention`: q [B, H, D] over the pools [L, K, N, P, D] -> [B, H, D]."""
    from jaxpaged.kernels import decode

    return decode.paged_decode_attention(q, k_pool, v_pool, layer, block_tables, lengths, **options)


def paged_prefill_attention(q, k_pool, v_pool, layer, block_tables, lengths, q_positions, **options):
    """`prefill.paged_prefill_attention`: q [B, T, H, D] over the pools [L, K, N, P, D] -> [B, T, H, D]."""
    from jaxpaged.kernels import prefill

    return prefill.paged_prefill_attention(q, k_pool, v_pool, layer, block_tables, lengths, q_positions, **options)
