"""Shared timing helpers for the benchmark scripts: medians of back-to-back calls, and the device copy ceiling."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def median_time(fn, inputs, rounds=5, calls=20, sync=None):
    """Median seconds per call over `rounds` rounds of `calls` back-to-back calls, after warm-up.

    `inputs` is a list of argument tuples used in turn (rotate over copies to defeat caches).
    """
    sync = sync or jax.block_until_ready
    for args in inputs[:2]:
        sync(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*inputs[i % len(inputs)])
        sync(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def copy_ceiling(size_bytes=2**31) -> float:
    """Bytes per second of a device-to-device pass over a buffer, counting bytes read plus written."""
    x = jnp.ones((size_bytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    return 2 * size_bytes / median_time(copy, [(x,)])


def median_time_in_loop(fn, inputs, reps=20, rounds=5):
    """Median seconds per call of a JAX function run `reps` times inside one jitted loop.

    One dispatch per round instead of per call, so small shapes measure the device, not the host.
    Each iteration's first argument depends on the previous output (by an exact +0), so XLA can
    neither hoist nor merge the calls.
    """

    @jax.jit
    def looped(*args):
        def body(_, carry):
            out = fn(args[0] + carry.astype(args[0].dtype), *args[1:])
            return carry + 0 * jnp.ravel(out)[0].astype(jnp.float32)

        return jax.lax.fori_loop(0, reps, body, jnp.zeros((), jnp.float32))

    return median_time(looped, inputs, rounds=rounds, calls=1) / reps
