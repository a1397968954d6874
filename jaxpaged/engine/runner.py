"""The model runner: the engine's device side. Each plan becomes one jitted call over the paged pools.

The host's block manager owns the blocks; before each call the runner writes the scheduler's block
table and lengths into the device state (a few KiB), so the pure ops find every block they need
already in the table and never allocate (the state's `host_blocks`: a decode step only checks that
its positions lie in the row's blocks; the device allocator is left empty, so a prefill call's
allocation would report ok=False, and the runner raises). A prefill call runs a ragged batch of
chunks and samples for the rows whose chunk ends their tokens, and where it is given decode rows,
their next tokens too (the model's `mixed_step`: one pass over both); a decode call runs `steps`
decode steps in one `lax.while_loop`, sampling and checking each row's stop conditions on the
device.

Every device call runs on one launcher thread, in the order the host asked for them. XLA drives a
`while_loop` from the host (it reads the loop's predicate after each step), so the thread that
starts a decode call is held until its last step has run; on the launcher thread that hold costs the
host nothing: it schedules, reads the last call's tokens and queues the next call while the device
computes. Only the launcher touches the paged state.

Shapes are padded so that compilations stay few (padding rows write nothing and see nothing): a
decode call's rows are a power of two of the running ones; a prefill call's chunks are packed one
after another on one token axis, each in whole tiles (`pack_chunks`: the model's token-wise work
runs on the real tokens, and its attention on tiles, each a row of the prefill kernel), the packed
length a power of two and nothing else varying; decode rows in a prefill call are all the table's
rows.

Axis letters: B rows, C chunk slots (the table's rows), T chunk tokens, Np packed tokens, Bt tiles, S samples, V vocab, R logprobs per token, L layers, M blocks per row.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import os
import time
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged import checks
from jaxpaged.attention import choose_impl
from jaxpaged.config import CacheConfig, bucket
from jaxpaged.engine.sampling import SamplingParams, SamplingRows, sample
from jaxpaged.kernels.launch import prefill_tile_tokens
from jaxpaged.parallel import device_config
from jaxpaged.state import BlockTable, PagedKVState, init_state

MAX_STOP_IDS = 8  # stop token ids per row on the device (EOS among them)
NO_STOP = 2**30  # padding of a row's stop ids: matches no token, dropped by scatters
COMPILE_THREADS = 16  # programs `warm_up` compiles at once (at most the host's cores)
MIN_READ_BOUND = 256  # positions the reference path reads at least: a gather this short costs little


def _banned(stop_ids, generated, min_tokens, vocab: int):
    """[B, V]: each row's stop ids while it has fewer than min_tokens tokens (as vLLM, they may not be drawn)."""
    rows = jnp.arange(stop_ids.shape[0])[:, None]
    young = jnp.where((generated < min_tokens)[:, None], stop_ids, NO_STOP)
    return jnp.zeros((stop_ids.shape[0], vocab), bool).at[rows, young].set(True, mode="drop")


def _switches(params: list[SamplingParams]) -> dict:
    """The sampler's static switches for a batch: only the work some row needs."""
    asked = [p.logprobs for p in params if p.logprobs is not None]
    return dict(filtered=any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params),
                penalised=any(p.repetition_penalty != 1 for p in params),
                random=any(p.temperature > 0 for p in params), banning=any(p.min_tokens > 0 for p in params),
                num_logprobs=max(asked) if asked else None)


def _with_table(state: PagedKVState, table, lens) -> PagedKVState:
    """The host's block table [B, M] and lengths [B] in the state (every layer's lengths alike). A row
    without blocks has no positions (a chained call's lengths come from the device, where a row the
    host has since released keeps its last length)."""
    lens = jnp.broadcast_to(jnp.where(table[:, 0] < state.config.num_blocks, lens, 0), state.table.seq_lens.shape)
    return state.replace(table=BlockTable(block_ids=table, seq_lens=lens))


def _prefill(graphdef, treedef, leaves, state, table, lens, chunks: PackedChunks, sample_rows, rows: SamplingRows,
             min_tokens, stop_ids, seen, decode=None, *, impl, max_len, filtered, penalised, random, banning,
             num_logprobs):
    """One chunk per table row of `chunks` (packed: `pack_chunks`, or padded rows [C, T] for a
    model without `mixed_step`); samples S tokens from the chunks sample_rows [S] (a chunk may
    repeat: n > 1).

    decode: None, or (last tokens [Bd], their block-table rows [Bd], active [Bd]): those rows take a
    decode step in the same pass and sample first: rows [Bd + S].
    """
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    state = _with_table(state, table, lens)
    if chunks.tile_row is not None:
        last_tokens, decode_idx, active = (None, None, None) if decode is None else decode
        logits, state, ok = model.mixed_step(last_tokens, chunks.tokens, state, seq_idx=chunks.seq_idx,
                                             num_tokens=chunks.num_tokens, tile_row=chunks.tile_row,
                                             tile_start=chunks.tile_start, last_at=chunks.last_at, active=active,
                                             decode_idx=decode_idx, max_len=max_len, impl=impl)
    else:
        logits, state, ok = model.step(chunks.tokens, state, seq_idx=chunks.seq_idx, num_tokens=chunks.num_tokens,
                                       max_len=max_len, logit_index=chunks.last_at, impl=impl)
    decoded = 0 if decode is None else decode[0].shape[0]
    logits = jnp.concatenate([logits[:decoded], logits[decoded:][sample_rows]])
    banned = _banned(stop_ids, rows.token_indices, min_tokens, logits.shape[-1]) if banning else None
    out = sample(logits, rows, seen, banned, filtered=filtered, penalised=penalised, random=random,
                 num_logprobs=num_logprobs)
    return state, ok, out


def _decode(graphdef, treedef, leaves, state, table, lens, last_tokens, seq_idx, active, rows: SamplingRows,
            max_tokens, min_tokens, stop_ids, seen, *, impl, max_len, steps, filtered, penalised, random, banning,
            num_logprobs):
    """Up to `steps` decode steps; a row stops at a stop id (after min_tokens) or at max_tokens.

    The steps run as a `while_loop` that ends early once no row is active (a fixed-count `fori_loop`
    was 2% faster a step on an H200 at 128 rows: benchmarks/NOTES.md; the early end wins it back).

    Returns (state, ok, outputs, carry): outputs are tokens [steps, B], emitted [steps, B],
    logprob [steps, B], top ids and logprobs [steps, B, R]; carry is what a following call
    continues from: (last tokens [B], active [B], rows, seen).
    """
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    state = _with_table(state, table, lens)
    batch = last_tokens.shape[0]
    zeros, width = jnp.zeros((steps, batch)), num_logprobs or 0
    outputs = (zeros.astype(jnp.int32), zeros.astype(bool), zeros, jnp.zeros((steps, batch, width), jnp.int32),
               jnp.zeros((steps, batch, width)))

    def cond(carry):
        i, _, _, active, *_ = carry
        return (i < steps) & jnp.any(active)

    def body(carry):
        i, state, last, active, rows, seen, all_ok, outputs = carry
        logits, state, ok = model.decode_step(last, state, active=active, seq_idx=seq_idx, max_len=max_len, impl=impl)
        banned = _banned(stop_ids, rows.token_indices, min_tokens, logits.shape[-1]) if banning else None
        token, logprob, top_ids, top_logprobs = sample(logits, rows, seen, banned, filtered=filtered,
                                                       penalised=penalised, random=random, num_logprobs=num_logprobs)
        token = jnp.where(active, token, last)
        generated = rows.token_indices + active  # tokens in each row's output after this step
        stopped = jnp.any(token[:, None] == stop_ids, axis=-1)  # drawn only past min_tokens
        new_outputs = tuple(o.at[i].set(x) for o, x in zip(outputs, (token, active, logprob, top_ids, top_logprobs)))
        if penalised:
            seen = seen.at[jnp.arange(batch), token].set(True)
        rows = rows.replace(token_indices=generated)
        still = active & ~stopped & (generated < max_tokens)
        return i + 1, state, token, still, rows, seen, all_ok & ok, new_outputs

    carry = (jnp.asarray(0), state, last_tokens, active, rows, seen, jnp.asarray(True), outputs)
    _, state, last, active, rows, seen, ok, outputs = jax.lax.while_loop(cond, body, carry)
    return state, ok, outputs, (last, active, rows, seen)


_SWITCHES = ("impl", "max_len", "filtered", "penalised", "random", "banning", "num_logprobs")


@functools.lru_cache(maxsize=8)
def _compiled(prefill_structure, decode_structure, compiler_options: tuple):
    """The prefill and decode calls, each jitted with its model structure (graphdef, treedef) bound:
    a structure is hashed once here, not at every call (a 16-layer model's takes milliseconds on the
    host), and the parameters pass as a flat list of arrays. With them, the programs compiled ahead
    of time (`Runner.warm_up`), by program key: shared by every runner of the structures and
    options, as jit's own cache is. compiler_options: XLA's (name, value) pairs for both calls."""
    options = dict(compiler_options) or None
    return (jax.jit(functools.partial(_prefill, *prefill_structure), static_argnames=_SWITCHES,
                    donate_argnames=("state",), compiler_options=options),
            jax.jit(functools.partial(_decode, *decode_structure), static_argnames=_SWITCHES + ("steps",),
                    donate_argnames=("state",), compiler_options=options),
            {})


def scan_plan(model, scan_layers: bool | str | None, mesh=None) -> tuple[bool, bool]:
    """Whether prefill calls and decode calls run the model's scanned view (`MiniLLM.scanned`: one
    layer body compiled instead of L) rather than its unrolled layers.

    scan_layers: True or False for both; "prefill" for prefill calls alone; None (default) for the
    backend's choice: both on the CPU, prefill alone on a GPU without a mesh, neither elsewhere. A
    scanned call copies each layer's weights out of the [L, ...] stack: once per call in a prefill
    call, but in every step of a decode call's loop. On an H200 (llama-1b, workload A,
    benchmarks/NOTES.md), compiling every program ahead took 58 s with prefill scanned (154 s
    unrolled, an earlier run) and A ran 33,827 output tokens/s; in another call, every call scanned
    compiled in 48 s but ran A at 11,195, where the unrolled engine ran 33,366. (On a mesh a mixed call attends group by group,
    whose pool copies in a scanned loop were not measured there.) A model without layers to stack
    (no `scanned`, or a view already scanned) runs as it is: (False, False)."""
    if scan_layers is not None and scan_layers != "prefill" and not isinstance(scan_layers, bool):
        raise ValueError(f'scan_layers: True, False, "prefill" or None, got {scan_layers!r}')
    if not hasattr(model, "scanned") or not isinstance(getattr(model, "layers", None), nnx.List):
        return False, False
    if scan_layers is None:
        backend = jax.default_backend()
        return backend == "cpu" or (backend == "gpu" and mesh is None), backend == "cpu"
    if scan_layers == "prefill":
        return True, False
    return scan_layers, scan_layers


def scanned_bytes(model, plan: tuple[bool, bool]) -> int:
    """Device bytes (one device's share) of the stacked layer weights a runner with this plan keeps
    beside the model's own: nothing where no call is scanned."""
    if not any(plan):
        return 0
    leaves = jax.tree.leaves(nnx.state(model.layers))
    return sum(leaf.addressable_shards[0].data.nbytes if hasattr(leaf, "addressable_shards") else leaf.nbytes
               for leaf in leaves)


@functools.partial(jax.jit, donate_argnames=("state",))
def _copy_blocks(state: PagedKVState, sources, destinations) -> PagedKVState:
    """Copies whole blocks of every layer and head (copy on write), with their scales where the pools
    are 8-bit; padding pairs use N, dropped."""

    def copy(pool):
        if pool is None:
            return None
        return pool.at[:, :, destinations].set(pool.at[:, :, sources].get(mode="fill", fill_value=0), mode="drop")

    pools = state.pools
    return state.replace(pools=pools.replace(k=copy(pools.k), v=copy(pools.v), k_scale=copy(pools.k_scale),
                                             v_scale=copy(pools.v_scale)))


@dataclasses.dataclass
class DecodeCall:
    """A decode call on its way: what it was given, and its result once the launcher has run it."""

    count: int  # rows that decode (the first of the batch's B)
    fixed: tuple  # (seq_idx, max_tokens, min_tokens, stop ids): the same in a chained call
    options: dict  # the jitted call's static arguments
    future: concurrent.futures.Future  # -> (ok, outputs, carry), device arrays; carry is what a
    #                                    chained call continues from: (last tokens, active, sampling rows, seen)


class Runner:
    """Holds the model's parameters and the paged state on the device, and runs plans on its launcher
    thread (the module's docstring says why).

    Args:
      model: a model with `step(tokens, cache, seq_idx=, num_tokens=, max_len=, logit_index=, impl=)`,
        `decode_step(last_tokens, cache, active=, seq_idx=, max_len=, impl=)` and a `config`
        (MiniLLM); if it has `scanned()`, the calls `scan_plan` names run the scanned view.
      cache_config: the pool's geometry (max_seqs = table rows).
      impl: paged attention's path.
      scan_layers: run the scanned view in every call (True), in none (False), in prefill calls
        alone ("prefill"), or (None, default) in every call on the CPU and in prefill calls alone
        on a GPU without a mesh (`scan_plan`).
      launcher_thread: make the device calls on the launcher thread; False makes them on the caller's
        (a decode call then holds it until its loop has run: for comparison).
      mesh: the pools sharded over kv heads on its tensor axis (the model's weights on it already).
      max_tile: a packed prefill's tile holds at most this many tokens (rounded down to a power of
        two): the engine's token budget, which a chunk's whole tiles must fit.
      min_prefill_tokens, min_decode_rows: the smallest prefill call, in packed tokens, and the
        smallest decode call, in rows (each rounded up to a power of two): fewer programs to compile
        (`buckets`), smaller calls padded up to them.
      compiler_options: XLA options for every call's compilation ({name: value}, as
        `jax.jit(compiler_options=)`); None: XLA's defaults.
    """

    def __init__(self, model, cache_config: CacheConfig, *, impl: str = "auto", scan_layers: bool | str | None = None,
                 launcher_thread: bool = True, mesh=None, max_tile: int | None = None, min_prefill_tokens: int = 16,
                 min_decode_rows: int = 8, compiler_options: dict | None = None):
        self.scan = scan_plan(model, scan_layers, mesh)
        self.compiler_options = dict(compiler_options or {})
        views = {scan: nnx.split(model.scanned() if scan else model) for scan in set(self.scan)}  # one stack at most
        (prefill_graph, prefill_params), (decode_graph, decode_params) = (views[scan] for scan in self.scan)
        self.prefill_leaves, prefill_tree = jax.tree.flatten(prefill_params)
        self.decode_leaves, decode_tree = jax.tree.flatten(decode_params)
        self._prefill, self._decode, self._executables = _compiled((prefill_graph, prefill_tree),
                                                                   (decode_graph, decode_tree),
                                                                   tuple(sorted(self.compiler_options.items())))
        self._mesh = mesh
        self.config, self.impl = cache_config, impl
        self.kernels = choose_impl(impl, device_config(cache_config, mesh)) == "kernel"  # they read by length
        self.tile_tokens = None  # a packed prefill's tile; None: padded rows (a model without mixed_step)
        if hasattr(model, "mixed_step"):
            tile = prefill_tile_tokens(model.config.num_heads, cache_config.num_kv_heads)  # the pools' kv heads
            self.tile_tokens = min(tile, 1 << (max_tile.bit_length() - 1)) if max_tile else tile
        min_prefill_tokens = checks.check_int(min_prefill_tokens, "min_prefill_tokens", low=1)
        self.min_prefill_tokens = bucket(max(min_prefill_tokens, 16, self.tile_tokens or 16))
        self.min_decode_rows = bucket(checks.check_int(min_decode_rows, "min_decode_rows", low=1))
        self._sticky = dict(filtered=False, random=False, banning=False)
        state = init_state(cache_config, mesh)
        self.state = state.replace(allocator=state.allocator.replace(num_free=jnp.zeros((), jnp.int32)),
                                   host_blocks=True)
        self.idle_seconds = 0.0  # the launcher's waits for the host between two calls
        self.programs: set[tuple] = set()  # each call's (kind, shapes, static switches): one compilation each
        self._last_end: float | None = None
        self._failure: BaseException | None = None
        self._launcher = None
        if launcher_thread:
            self._launcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxpaged-launcher")
            weakref.finalize(self, self._launcher.shutdown, wait=False)

    def _launch(self, call) -> concurrent.futures.Future:
        """Queues call() (which may read and replace self.state) on the launcher thread, which waits
        for its outputs on the device before it takes the next (so that the time it waits for the
        host is time the device had nothing to do). After a call that failed, every later one fails
        too: the state may have been given up to it."""

        def run():
            begin = time.perf_counter()
            if self._last_end is not None:
                self.idle_seconds += begin - self._last_end
            try:
                if self._failure is not None:
                    raise RuntimeError("an earlier device call failed; the engine's state is lost") from self._failure
                return jax.block_until_ready(call())  # held until the device is done: idle is idle
            except BaseException as failure:
                self._failure = self._failure or failure
                raise
            finally:
                self._last_end = time.perf_counter()

        if self._launcher is not None:
            return self._launcher.submit(run)
        done = concurrent.futures.Future()
        try:
            done.set_result(run())
        except Exception as failure:  # noqa: BLE001 - handed to whoever reads the result, as the thread's are
            done.set_exception(failure)
        return done

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Queues whole-block copies (source, destination) for the calls that follow."""
        if copies:
            padded = bucket(len(copies))
            pairs = np.full((2, padded), self.config.num_blocks, np.int32)
            pairs[:, : len(copies)] = np.asarray(copies, np.int32).T

            def copy():
                self.state = _copy_blocks(self.state, pairs[0], pairs[1])
                return self.state

            self._launch(copy)

    def prefill(self, table, lens, rows, chunks, sample_rows, params, seeds, token_indices, min_tokens, stop_ids,
                seen=None, decode: DecodeRows | None = None):
        """Runs one chunk per row and samples; with `decode`, a decode step of other rows in the same pass.

        Args:
          table, lens: the scheduler's block table [B_all, M] and each row's computed positions [B_all].
          rows: the table rows of the chunks; chunks: their token lists.
          sample_rows: for each sample, the index (into rows) of the chunk it samples after.
          params, seeds, token_indices, min_tokens, stop_ids: each sample's SamplingParams, seed,
            output index, min_tokens and stop token ids.
          seen: [S, V] bool of each sample's seen tokens, where some sample has a repetition penalty.
          decode: rows that take one decode step in the same pass (the model's `mixed_step`).

        Returns numpy (tokens, logprob, top ids, top logprobs): [S] (and [S, R]) for the samples; with
        `decode`, a pair of those, the samples' and the decode rows' ([Bd]).
        """
        packed = pack_chunks(chunks, rows, self.config.max_seqs, self.tile_tokens, self.min_prefill_tokens)
        rows_cap = self.config.max_seqs  # one shape (the warm-up's), unless forks pass the table's rows
        samples = rows_cap if len(sample_rows) <= rows_cap else bucket(len(sample_rows))
        sampled = np.zeros(samples, np.int32)
        sampled[: len(sample_rows)] = sample_rows
        columns = _sampling_arrays(params, seeds, token_indices, min_tokens, stop_ids, seen, samples)
        longest = max(lens[r] + len(c) for r, c in zip(rows, chunks))
        decoded, decode_inputs = 0, None
        if decode is not None:  # its rows first, as many as the table's (one shape: fewer compilations)
            decoded = self.config.max_seqs
            decode_inputs, columns = decode.inputs(decoded, self.config.max_seqs, columns)
            params = params + decode.params
            longest = max([longest] + [lens[r] + 1 for r in decode.rows])
        switches = self._switches(params)
        ok, out = self._call_prefill(np.array(table), lens.astype(np.int32), packed, sampled, columns, decode_inputs,
                                     switches, self._read_bound(longest))
        self._check(ok)
        sampled_out = tuple(x[decoded:decoded + len(sample_rows)] for x in out)
        if decode is None:
            return sampled_out
        return sampled_out, tuple(x[: len(decode.rows)] for x in out)

    def _call_prefill(self, table, lens, packed: PackedChunks, sampled, columns, decode_inputs, switches, max_len):
        """Runs a prefill call on the launcher; returns numpy (ok, (tokens, logprob, top ids, top logprobs))."""
        key, args, statics = self._prefill_program(table, lens, packed, sampled, columns, decode_inputs, switches,
                                                   max_len)

        def run():
            self.state, ok, out = self._program(self._prefill, key, (self.prefill_leaves, self.state, *args), statics)
            return ok, out

        return jax.device_get(self._launch(run).result())  # one transfer

    def _prefill_program(self, table, lens, packed, sampled, columns, decode_inputs, switches, max_len):
        """A prefill call's program key, its arguments after the parameters and the state, and its
        static arguments."""
        sampling, min_tokens, stop_ids, seen = columns
        decoded = 0 if decode_inputs is None else decode_inputs[0].shape[0]
        key = ("prefill", table.shape, packed.tokens.shape, sampled.shape[0], decoded, max_len, *switches.items())
        self.programs.add(key)
        args = (table, lens, packed, sampled, sampling, min_tokens, stop_ids, seen if switches["penalised"] else None,
                decode_inputs)
        return key, args, dict(impl=self.impl, max_len=max_len, **switches)

    def _program(self, jitted, key, args, statics):
        """Runs program `key`: its executable compiled ahead (`warm_up`) where there is one, else the
        jitted function (compiled at its first call)."""
        executable = self._executables.get(self._executable_key(key))
        if executable is not None:
            try:
                return executable(*args)
            except TypeError as mismatch:  # raised before it runs: the arguments are not what it was built for
                warnings.warn(f"a program compiled ahead did not take its call's arguments; jit compiles it: "
                              f"{mismatch}", RuntimeWarning, stacklevel=2)
                del self._executables[self._executable_key(key)]
        return jitted(*args, **statics)

    def _executable_key(self, key):
        return key, self.config, self._mesh  # the pools' shapes and placement are the state's

    def warm_up(self, max_num_batched_tokens: int, decode_steps: int, mixed: bool, sampling: bool = False,
                progress=None) -> int:
        """Compiles ahead every program the engine's calls can need with the sampler's switches as
        they are now (greedy, until a request asks for more), and with `sampling` with random draws
        on too (the switch that any request with temperature > 0 turns on): a prefill call for each
        power of two of packed tokens up to the budget's (with and without decode rows where
        `mixed`), and a decode call for each power of two of rows, all on padding rows. Each is
        traced here and compiled on a pool of threads while the next is traced (XLA compiles without
        the interpreter lock), the decode programs first, whose unrolled layers take the longest.
        On an H200 (16 cores) llama-1b's 26 programs, the prefill programs scanned, took 41-60 s so
        in four runs at 8 threads; in one session 52 s at 8 threads and 45 s at 16, where the longest
        program alone took 42-44 s (`benchmarks/warm_up.py`); 154 s with every program unrolled,
        196 s unrolled and one by one. The calls run the compiled executables. On the reference
        attention path only the shortest read bound is covered (the kernels read by length and have
        one). progress: called after each program. Returns the programs compiled."""
        self._launch(lambda: None).result()  # nothing in flight: the state is the runner's own
        c = self.config
        table = np.full((c.max_seqs, c.max_blocks_per_seq), c.num_blocks, np.int32)
        lens = np.zeros(c.max_seqs, np.int32)
        now = self._switches([])
        switch_sets = [now] + ([dict(now, random=True)] if sampling and not now["random"] else [])
        samples = c.max_seqs
        columns = _sampling_arrays([], [], [], [], [], None, samples)
        packed_sizes, decode_sizes = self.buckets(max_num_batched_tokens)
        programs = []  # (jitted, key, arguments, static arguments)
        no_rows = DecodeRows([], [], [], [], [], [], [])
        for switches, size in itertools.product(switch_sets, packed_sizes):
            for decoded in ((0, c.max_seqs) if mixed else (0,)):
                packed = pack_chunks([[0] * size], [c.max_seqs], c.max_seqs, self.tile_tokens, size)  # its shapes
                decode_inputs, cols = no_rows.inputs(decoded, c.max_seqs, columns) if decoded else (None, columns)
                programs.append((self._prefill, self.prefill_leaves, *self._prefill_program(
                    table, lens, packed, np.zeros(samples, np.int32), cols, decode_inputs, switches,
                    self._read_bound(1))))
        for switches, rows in itertools.product(switch_sets, decode_sizes):
            fixed, carry = _decode_arrays([], [], [], [], [], [], [], [], None, rows, c.max_seqs)
            options = dict(impl=self.impl, max_len=self._read_bound(1), steps=decode_steps, **switches)
            programs.append((self._decode, self.decode_leaves, *self._decode_program(table, lens, carry, fixed, options),
                             options))
        compiling = {}  # future -> executable key
        with concurrent.futures.ThreadPoolExecutor(min(COMPILE_THREADS, os.cpu_count() or 1)) as pool:
            for jitted, leaves, key, args, statics in reversed(programs):  # decode first: the longest to compile
                key = self._executable_key(key)
                if key not in self._executables and key not in compiling.values():
                    compiling[pool.submit(jitted.lower(leaves, self.state, *args, **statics).compile)] = key
            for done in concurrent.futures.as_completed(compiling):
                self._executables[compiling[done]] = done.result()
                progress and progress()
        return len(compiling)

    def buckets(self, max_num_batched_tokens: int) -> tuple[list[int], list[int]]:
        """The shapes the engine's calls take: the packed token counts of a prefill call (powers of
        two from `min_prefill_tokens` up to the budget's) and the row counts of a decode call
        (`decode_rows`). `warm_up` compiles a program for each (twice for prefill where calls mix in
        decode rows; again with random draws)."""
        largest = bucket(max_num_batched_tokens, minimum=self.min_prefill_tokens)
        packed = [1 << k for k in range(self.min_prefill_tokens.bit_length() - 1, largest.bit_length())]
        rows = sorted({self.decode_rows(1 << k) for k in range(self.config.max_seqs.bit_length() + 1)})
        return packed, rows

    def decode(self, table, lens, rows, last_tokens, params, seeds, token_indices, min_tokens, stop_ids, max_tokens,
               steps: int, seen=None) -> DecodeCall:
        """Queues up to `steps` decode steps for the given rows (each a running sequence); the device
        runs them while the host goes on. `results(call)` waits for what they produced.

        Args:
          table, lens: the scheduler's block table [B_all, M] and each row's computed positions [B_all].
          rows: the table rows that decode; last_tokens: each one's last token.
          params, seeds, token_indices, min_tokens, stop_ids, max_tokens: per row, as `prefill`'s samples.
          seen: [B, V] bool of each row's seen tokens, where some row has a repetition penalty.
        """
        count = len(rows)
        batch = self.decode_rows(count)
        switches = self._switches(params)
        fixed, carry = _decode_arrays(rows, last_tokens, params, seeds, token_indices, min_tokens, stop_ids, max_tokens,
                                      seen if switches["penalised"] else None, batch, self.config.max_seqs)
        options = dict(impl=self.impl, max_len=self._read_bound(max(lens[r] for r in rows) + steps), steps=steps,
                       **switches)
        table, lens = np.array(table), lens.astype(np.int32)  # copies: the host goes on changing its own
        return DecodeCall(count, fixed, options, self._launch(lambda: self._run_decode(table, lens, carry, fixed,
                                                                                        options)))

    def decode_rows(self, count: int) -> int:
        """The rows a decode call of `count` running rows computes: a power of two (a few shapes, and
        no attention for empty rows), at least `min_decode_rows`, at most the table's. (Three
        quarters of the table as one more size was slower on workload A: benchmarks/NOTES.md.)"""
        return min(bucket(count, minimum=self.min_decode_rows), self.config.max_seqs)

    def chain(self, call: DecodeCall, table, alive, longest: int) -> DecodeCall:
        """Queues the next `steps` steps of the same rows, from where `call` leaves them on the device
        (nothing read back): the host can read `call`'s results while these run.

        Args:
          table: the block table [B_all, M], with blocks reserved for these steps too.
          alive: [B] bool, the rows the host still runs (one it finished or aborted stops here).
          longest: the most positions a row can hold after these steps.
        """
        alive = _column(alive, call.fixed[0].shape[0], bool, False)
        options = dict(call.options, max_len=self._read_bound(longest))
        table = np.array(table)

        def run():  # `call` has run: the launcher takes calls in order
            last, active, rows, seen = call.future.result()[2]
            lens = self.state.table.seq_lens[0]  # a row the host has since released keeps its last length
            return self._run_decode(table, lens, (last, active & alive, rows, seen), call.fixed, options)

        return dataclasses.replace(call, options=options, future=self._launch(run))

    def _run_decode(self, table, lens, carry, fixed, options):
        key, args = self._decode_program(table, lens, carry, fixed, options)
        self.state, ok, outputs, carry = self._program(self._decode, key, (self.decode_leaves, self.state, *args), options)
        return ok, outputs, carry

    def _decode_program(self, table, lens, carry, fixed, options):
        """A decode call's program key and its arguments after the parameters and the state."""
        seq_idx, max_tokens, min_tokens, stop_ids = fixed
        key = ("decode", table.shape, seq_idx.shape, *options.items())
        self.programs.add(key)
        last, active, rows, seen = carry
        return key, (table, lens, last, seq_idx, active, rows, max_tokens, min_tokens, stop_ids, seen)

    def results(self, call: DecodeCall):
        """Waits for a decode call. Returns numpy (tokens [steps, B], emitted [steps, B], logprob
        [steps, B], top ids and top logprobs [steps, B, R]) for the B rows given."""
        ok, outputs, _ = call.future.result()
        ok, outputs = jax.device_get((ok, outputs))  # one transfer
        self._check(ok)
        return tuple(x[:, :call.count] for x in outputs)

    def _read_bound(self, positions: int) -> int:
        """The static bound on positions the reference path gathers: a power of two (few compilations)
        covering the longest row after the call, at least MIN_READ_BOUND (short requests share one
        program) and at most the table's M * P (the kernels take that alone)."""
        if self.kernels:
            return self.config.max_seq_len
        return min(bucket(positions, minimum=max(self.config.block_size, MIN_READ_BOUND)), self.config.max_seq_len)

    def _switches(self, params: list[SamplingParams]) -> dict:
        """The sampler's switches for a call: what these rows need, and the top-k/top-p/min-p filter,
        random draws and the min_tokens ban once any call needed them (a switch only adds work that is
        exact for rows that do not use it, so keeping it on saves a compilation each time a batch's
        mix of requests changes)."""
        switches = _switches(params)
        for name in ("filtered", "random", "banning"):
            self._sticky[name] = switches[name] = switches[name] or self._sticky[name]
        return switches

    @staticmethod
    def _check(ok) -> None:
        if not bool(ok):
            raise RuntimeError("internal error: a step needed a block the scheduler did not reserve")


@dataclasses.dataclass
class DecodeRows:
    """Running rows that take one decode step inside a prefill call (a mixed batch)."""

    rows: list[int]  # block-table rows
    last_tokens: list[int]
    params: list[SamplingParams]
    seeds: list[int]
    token_indices: list[int]
    min_tokens: list[int]
    stop_ids: list[tuple[int, ...]]
    seen: np.ndarray | None = None  # [Bd, V] bool, where some row has a repetition penalty

    def inputs(self, count: int, num_rows: int, sample_columns):
        """The rows' inputs padded to `count` rows: ((last tokens, table rows (num_rows: padding),
        active), each [count]), and the sampler's columns (`_sampling_arrays`), theirs before the
        samples' `sample_columns`."""
        inputs = (_column(self.last_tokens, count, np.int32), _column(self.rows, count, np.int32, num_rows),
                  _column([True] * len(self.rows), count, bool, False))
        columns = _sampling_arrays(self.params, self.seeds, self.token_indices, self.min_tokens, self.stop_ids,
                                   self.seen, count)
        return inputs, jax.tree.map(lambda *x: np.concatenate(x), columns, sample_columns)


def _decode_arrays(rows, last_tokens, params, seeds, token_indices, min_tokens, stop_ids, max_tokens, seen,
                   batch: int, num_rows: int):
    """A decode call's inputs padded to `batch` rows: (fixed, carry) as `DecodeCall` and `_decode`
    take them; table rows past the given ones are num_rows (padding), inactive."""
    sampling, min_tokens, stop_ids, seen = _sampling_arrays(params, seeds, token_indices, min_tokens, stop_ids, seen,
                                                            batch)
    fixed = (_column(rows, batch, np.int32, num_rows), _column(max_tokens, batch, np.int32), min_tokens, stop_ids)
    carry = (_column(last_tokens, batch, np.int32), _column([True] * len(rows), batch, bool, False), sampling, seen)
    return fixed, carry


def _sampling_arrays(params, seeds, token_indices, min_tokens, stop_ids, seen, count: int):
    """The sampler's per-row inputs for `count` rows: (SamplingRows, min_tokens [count], stop ids
    [count, MAX_STOP_IDS], seen [count, V] or None)."""
    return (SamplingRows.build(params, seeds, token_indices, count), _column(min_tokens, count, np.int32),
            _stop_table(stop_ids, count), None if seen is None else _pad_rows(seen, count))


@dataclasses.dataclass
class PackedChunks:
    """A prefill call's chunks as the device takes them (numpy int32; `pack_chunks`).

    Packed (a model with `mixed_step`): tokens [Np], each chunk starting a tile of Q tokens;
    tile_row and tile_start [Bt = Np / Q], each tile's chunk (C for padding) and first token in it;
    last_at [C], where each chunk's last token lies. Padded rows (another model): tokens [C, T],
    last_at [C] the last token's column, tile_row and tile_start None. Both: seq_idx [C] (the
    table's row count for padding) and num_tokens [C].
    """

    tokens: np.ndarray
    seq_idx: np.ndarray
    num_tokens: np.ndarray
    last_at: np.ndarray
    tile_row: np.ndarray | None = None
    tile_start: np.ndarray | None = None


jax.tree_util.register_dataclass(PackedChunks, data_fields=[f.name for f in dataclasses.fields(PackedChunks)],
                                 meta_fields=[])


def pack_chunks(chunks: list[list[int]], rows: list[int], num_rows: int, tile_tokens: int | None,
                minimum: int = 16) -> PackedChunks:
    """The chunks of table rows `rows` for one prefill call, in C = num_rows chunk slots.

    With tile_tokens Q: packed one after another, each padded to whole tiles of Q, the packed
    length Np a power of two (at least `minimum`, 16 and Q): the call's shapes depend on Np alone,
    so a run compiles one prefill program per power of two of its token count, whatever the
    chunks' lengths and number. Without: rows [C, T], T the longest chunk's power of two (at least 16).
    """
    lengths = [len(c) for c in chunks]
    seq_idx = np.full(num_rows, num_rows, np.int32)
    seq_idx[: len(rows)] = rows
    num_tokens = np.zeros(num_rows, np.int32)
    num_tokens[: len(rows)] = lengths
    last_at = np.zeros(num_rows, np.int32)
    if tile_tokens is None:
        tokens = np.zeros((num_rows, bucket(max(lengths), minimum=16)), np.int32)
        for b, chunk in enumerate(chunks):
            tokens[b, : len(chunk)] = chunk
        last_at[: len(rows)] = np.maximum(np.asarray(lengths) - 1, 0)
        return PackedChunks(tokens, seq_idx, num_tokens, last_at)
    tiles = [-(-n // tile_tokens) for n in lengths]
    tokens = np.zeros(bucket(sum(tiles) * tile_tokens, minimum=max(minimum, 16, tile_tokens)), np.int32)
    tile_row = np.full(tokens.shape[0] // tile_tokens, num_rows, np.int32)
    tile_start = np.zeros_like(tile_row)
    tile = 0
    for b, (chunk, count) in enumerate(zip(chunks, tiles)):
        start = tile * tile_tokens
        tokens[start:start + len(chunk)] = chunk
        last_at[b] = start + len(chunk) - 1
        tile_row[tile:tile + count] = b
        tile_start[tile:tile + count] = np.arange(count) * tile_tokens
        tile += count
    return PackedChunks(tokens, seq_idx, num_tokens, last_at, tile_row, tile_start)


def _column(values, rows: int, dtype, fill=0) -> np.ndarray:
    values = list(values)
    return np.asarray(values + [fill] * (rows - len(values)), dtype)


def _stop_table(stop_ids: list[tuple[int, ...]], rows: int) -> np.ndarray:
    """[rows, MAX_STOP_IDS] int32, NO_STOP past each row's ids."""
    table = np.full((rows, MAX_STOP_IDS), NO_STOP, np.int32)
    for i, ids in enumerate(stop_ids):
        table[i, : len(ids)] = ids[:MAX_STOP_IDS]
    return table


def _pad_rows(seen: np.ndarray, rows: int) -> np.ndarray:
    return np.pad(seen, ((0, rows - seen.shape[0]), (0, 0)))
