"""Shared timing helpers for the benchmark scripts: medians of back-to-back calls, calls in a jitted
loop, and device time from profiler traces. (What a bandwidth is measured against: ceilings.py.)"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def median_time(fn, inputs, rounds=5, calls=20, sync=None):
    """Median seconds per call over `rounds` rounds of `calls` back-to-back calls, after warm-up.

    `inputs` is a list of argument tuples used in turn (rotate over copies to defeat caches).
    """
    sync = sync or jax.block_until_ready
    for args in inputs:  # warm-up: every input once
        sync(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*inputs[i % len(inputs)])
        sync(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


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


def device_events(trace_dir) -> list[tuple[float, float, str]]:
    """The device's events in a JAX profiler trace: (start µs, end µs, name), in order of start."""
    events = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True):
        with gzip.open(path) as f:
            trace = json.load(f)
        pids = {p["pid"]: p.get("args", {}).get("name", "") for p in trace["traceEvents"] if p.get("ph") == "M"
                and p.get("name") == "process_name"}
        for event in trace["traceEvents"]:
            if event.get("ph") == "X" and "/device:GPU" in pids.get(event.get("pid"), ""):
                events.append((event["ts"], event["ts"] + event.get("dur", 0), event["name"]))
    return sorted(events)


def device_kernel_times(trace_dir):
    """Device work in a JAX profiler trace: `kernel_times` of its `device_events`."""
    return kernel_times(device_events(trace_dir))


def kernel_times(events):
    """Device work of events in order of start (`device_events`).

    Returns ({name: total µs}, {name: count}, busy µs): busy is the length of the union of all the
    events' intervals, so work that overlaps (concurrent streams, or a CUDA-graph launch reported
    beside the kernels inside it) counts once, where the per-name totals count it twice.
    """
    totals, counts = collections.Counter(), collections.Counter()
    for start, end, name in events:
        totals[name] += end - start
        counts[name] += 1
    busy, reach = 0.0, float("-inf")
    for start, end, _ in events:
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return totals, counts, busy


def idle_gaps(events, longer_than: float = 0.0) -> collections.Counter:
    """The device's idle time between consecutive events (`device_events`), summed by the pair of
    kernels around each gap ("before -> after"), counting gaps longer than `longer_than` µs."""
    gaps, reach, last = collections.Counter(), float("-inf"), None
    for start, end, name in events:
        if last is not None and start - reach > longer_than:
            gaps[f"{last} -> {name}"] += start - reach
        if end >= reach:
            reach, last = end, name
    return gaps


def device_time(fn, inputs, calls=20, sync=None):
    """Device time per call: `calls` back-to-back calls (inputs in turn) under the profiler, after a
    warm-up call on every input. (With only the first two warmed up, the first path timed on fresh
    inputs took 0.2-0.4 us more per call than the same kernel timed after it, at the few-microsecond
    decode shapes of one H100 run: benchmarks/NOTES.md.)

    The time the GPU was busy with the calls' kernels and copies (overlaps counted once), so neither
    the host's dispatch nor the gaps between launches count: what is left is what the calls cost
    the device. Returns (seconds per call, {kernel name: µs per call}); (0.0, {}) if the profiler
    saw no device work.
    """
    sync = sync or jax.block_until_ready
    for args in inputs:  # every input once (the first path timed on fresh inputs ran slower)
        sync(fn(*args))
    trace_dir = tempfile.mkdtemp()
    try:
        jax.profiler.start_trace(trace_dir)
        for i in range(calls):
            out = fn(*inputs[i % len(inputs)])
        sync(out)
        jax.profiler.stop_trace()
        totals, _, busy = device_kernel_times(trace_dir)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    return busy / 1e6 / calls, {name: us / calls for name, us in totals.items()}


def seconds_per_call(fn, inputs, sync=None):
    """`device_time`'s seconds per call where the profiler sees the calls' device work, else
    `median_time`'s (wall clock); with the method used ("device" or "wall") and the five longest
    kernels ({name: µs per call})."""
    seconds, kernels = device_time(fn, inputs, sync=sync)
    top = dict(sorted(kernels.items(), key=lambda item: -item[1])[:5])
    if seconds > 0:
        return seconds, "device", top
    return median_time(fn, inputs, sync=sync), "wall", top
