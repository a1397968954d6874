"""The engine: requests in, tokens out, step by step (`Engine`), and vLLM's offline API on top (`LLM`).

One `Engine.step()` is: the scheduler plans (jaxpaged.engine.scheduler: prompt chunks, with a decode
step of the running sequences in the same call, or several decode steps), the runner executes the
plan in one jitted call (jaxpaged.engine.runner), and the engine appends the sampled tokens, checks each
sequence's stop conditions, names the blocks that filled up for the prefix cache, and gives back the
blocks of whatever finished. A request with n > 1 samples forks when its prompt is done: the samples
share the prompt's blocks and each draws its first token from the same logits with its own seed.

Sample j of a request with seed s draws as a request with seed s + j would alone: each token's key
is (seed, index of the token in the output), whatever else is in the batch or how often the
sequence was preempted.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as SequenceType

import jax
import numpy as np

from jaxpaged.config import CacheConfig
from jaxpaged.engine.block_manager import BlockManager, NoFreeBlocks
from jaxpaged.engine.detokenize import IncrementalText, first_stop
from jaxpaged.engine.request import (
    CompletionOutput,
    Request,
    RequestMetrics,
    RequestOutput,
    Sequence,
    Status,
)
from jaxpaged.engine.runner import DecodeRows, Runner, scan_plan, scanned_bytes
from jaxpaged.engine.sampling import SamplingParams
from jaxpaged.engine.scheduler import DecodePlan, PrefillPlan, Scheduler
from jaxpaged.kernels.launch import addressable_blocks
from jaxpaged.parallel import check_placed, replicas, tensor_parallel


MAX_LOGPROBS = 20  # most log-probabilities a request may ask for per token (as vLLM's default)


@dataclasses.dataclass
class EngineStats:
    running: int
    waiting: int
    preemptions: int  # so far
    used_blocks: int
    peak_used_blocks: int  # the most blocks held at once so far (counted when a step has reserved its blocks)
    total_blocks: int
    prefix_hit_rate: float
    generated_tokens: int
    tokens_per_second: float  # generated tokens over the time spent in steps
    step_seconds: float  # wall time inside step()
    device_seconds: float  # of it, waiting for the runner's calls
    device_idle_seconds: float  # the runner's launcher waiting for the host between two calls
    decode_steps: int  # decode steps the device ran
    kv_positions_read: int  # cached positions the decode steps attended over, summed over rows and steps
    overlapped_calls: int  # decode calls started before the host read the previous one (overlap)
    mixed_steps: int  # prefill calls that also took a decode step of the running sequences
    programs: int  # distinct device programs (call kind, shapes, switches) run so far: one compilation each

    def format(self) -> str:
        return (f"running {self.running}, waiting {self.waiting}, preempted {self.preemptions}, "
                f"blocks {self.used_blocks}/{self.total_blocks}, prefix hits {self.prefix_hit_rate:.0%}, "
                f"{self.tokens_per_second:.1f} tokens/s")


class Engine:
    """Continuous batching over a paged pool; the lower level of `LLM`, and what a server drives.

    Args:
      model: a model with `config` and `step(...)` over the cache protocol (`MiniLLM`).
      tokenizer: for text prompts, stop strings and output text; None takes token ids only.
      block_size: P.
      num_blocks: N; default what `gpu_memory_utilization` of the device's free memory holds, at most
        room for every row at max_model_len (all of that where the device does not say: the CPU), and
        on a GPU at most what the kernels address (2^31 elements in each of the K and V pools).
      max_num_seqs: sequences running at once.
      max_num_batched_tokens: prompt tokens one prefill step computes at most.
      max_model_len: longest prompt + output; default the model's context.
      enable_prefix_caching: share full prompt blocks across requests.
      seed: draws the seeds of requests that give none.
      impl: paged attention's path ("auto", "kernel", "reference").
      scan_layers: run the model's layers as one scanned body (fast to compile) in every call (True),
        in none (False), in prefill calls alone ("prefill"), or (None, default) in every call on the
        CPU and in prefill calls alone on a GPU without a mesh (`runner.scan_plan`; the stacked copy
        of the layer weights is taken out of the pool's memory).
      decode_steps: decode steps per device call.
      kv_dtype: "int8" or "float8_e4m3fn" for 8-bit pools with scales (`CacheConfig.kv_dtype`);
        default the model's dtype.
      overlap: while the plan stays the same, start the next decode call before reading the last
        one's tokens (the host's work then overlaps the device's).
      mixed_batches: in a step that prefills, the running sequences take a decode step in the
        same call (the model's `mixed_step`; a model without one alternates prefill and decode).
      min_prefill_tokens, min_decode_rows: the smallest prefill and decode calls (`Runner`): raising
        them pads small calls and leaves fewer programs to compile (`warm_up`).
      launcher_thread: the runner makes its device calls on a thread of its own (DESIGN.md); False
        makes them on the caller's, for comparison.
      check_integrity: run the block-ownership check after every step (tests).
      compiler_options: XLA options for the runner's compilations (`Runner`); None: XLA's defaults.
      mesh: a device mesh with a tensor axis (`jaxpaged.parallel.make_mesh(T)`) that the model's
        weights already lie on (`jaxpaged.models.parallel.shard_model`, or a loader's `mesh=`): the
        pools are sharded over kv heads, the host's block manager is unchanged (DESIGN.md).
    """

    def __init__(self, model, tokenizer=None, *, block_size: int = 16, num_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, seed: int = 0,
                 impl: str = "auto", scan_layers: bool | str | None = None, decode_steps: int = 8,
                 overlap: bool = True, mixed_batches: bool = True, kv_dtype: str | None = None,
                 launcher_thread: bool = True, check_integrity: bool = False, mesh=None, min_prefill_tokens: int = 16,
                 min_decode_rows: int = 8, compiler_options: dict | None = None):
        if mesh is not None:
            if replicas(mesh) > 1:
                raise ValueError("mesh: the engine takes a tensor axis only (data-parallel replicas: one engine each)")
            check_placed(model, mesh)
        config = model.config
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        blocks_per_seq = -(-self.max_model_len // block_size)
        shape = CacheConfig.from_model_config(config, num_blocks=1, block_size=block_size, dtype=config.dtype,
                                              kv_dtype=kv_dtype)
        if num_blocks is None:  # what fits, but no more than every row at max_model_len can use
            devices = tensor_parallel(mesh)  # a device holds its kv heads of each block
            reserved = scanned_bytes(model, scan_plan(model, scan_layers, mesh))  # the runner's stacked copy, made later
            fit = _blocks_that_fit(shape.bytes_per_block // devices, gpu_memory_utilization, reserved)
            num_blocks = min(fit or max_num_seqs * blocks_per_seq, max_num_seqs * blocks_per_seq)
            if impl != "reference" and jax.default_backend() == "gpu":  # as many as the kernels address
                elements = block_size * shape.num_layers * shape.num_kv_heads * shape.head_dim // devices  # a block, one pool
                num_blocks = addressable_blocks(num_blocks, elements, shape.itemsize, shape.head_dim)
        self.cache_config = CacheConfig.from_model_config(
            config, num_blocks=num_blocks, block_size=block_size, max_seqs=max_num_seqs,
            max_blocks_per_seq=blocks_per_seq, dtype=config.dtype, kv_dtype=kv_dtype)
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: at least 1, got {max_num_batched_tokens}")
        self.runner = Runner(model, self.cache_config, impl=impl, scan_layers=scan_layers,
                             launcher_thread=launcher_thread, mesh=mesh, max_tile=max_num_batched_tokens,
                             min_prefill_tokens=min_prefill_tokens, min_decode_rows=min_decode_rows,
                             compiler_options=compiler_options)
        tile = self.runner.tile_tokens or 1
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching),
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   max_blocks_per_seq=self.cache_config.max_blocks_per_seq,
                                   decode_steps=decode_steps, mix=mixed_batches and hasattr(model, "mixed_step"),
                                   chunk_tile=tile)
        self.eos_token_ids = tuple(config.eos_token_ids) or tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.check_integrity, self.overlap = check_integrity, overlap
        self._inflight = None  # (sequences, decode call, steps) started and not yet read
        self.requests: dict[str, Request] = {}
        self._seeds = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._busy_seconds, self._generated = 0.0, 0
        self._device_seconds, self._decode_steps, self._kv_positions_read, self._overlapped_calls = 0.0, 0, 0, 0
        self._mixed_steps = 0
        self._peak_blocks = 0

    def warm_up(self, use_tqdm: bool = False, sampling: bool = True) -> int:
        """Compiles, before any request, every program this engine's steps can need for greedy
        requests and, with `sampling`, for requests that draw at random (temperature > 0: OpenAI's
        default) (`Runner.warm_up`: a prefill program per power of two of packed tokens up to the
        token budget, with and without decode rows, and a decode program per power of two of rows,
        compiled on parallel threads), so that a server does not stall on a compilation mid-run.
        The sampler's other switches (top-k/top-p/min-p filtering, min_tokens, logprobs, repetition
        penalty) compile their programs when a request first needs them. Returns the programs
        compiled."""
        import tqdm

        s = self.scheduler
        with tqdm.tqdm(desc="compiling", unit="program", disable=not use_tqdm) as bar:
            return self.runner.warm_up(s.max_num_batched_tokens, s.decode_steps, s.mix, sampling,
                                       progress=lambda: bar.update())

    # -- requests

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None) -> Request:
        """Queues a request. Raises ValueError (naming the field) for an empty prompt, a token id outside
        the vocabulary, n past max_num_seqs, more than MAX_LOGPROBS logprobs, a prompt plus max_tokens
        past the context or the pool, or a duplicate id; the engine is unchanged then."""
        params = SamplingParams() if params is None else params
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        text = prompt if isinstance(prompt, str) else None
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; give token ids")
            token_ids = self.tokenizer.encode(text)
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("prompt: empty")
        vocab = self.model.config.vocab_size
        outside = [t for t in token_ids if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"prompt: token id {outside[0]} is outside the vocabulary [0, {vocab})")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n: at most {self.scheduler.max_num_seqs} (the sequences the engine runs at once), "
                             f"got {params.n}")
        if params.logprobs is not None and params.logprobs > min(MAX_LOGPROBS, vocab):
            raise ValueError(f"logprobs: at most {min(MAX_LOGPROBS, vocab)} per token, got {params.logprobs}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"max_tokens: the prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                             f"is {total}, past the context of {self.max_model_len}")
        needed = self.scheduler.blocks.blocks_for(total)
        if needed > self.cache_config.num_blocks:
            raise ValueError(f"prompt: {total} positions need {needed} blocks, the pool has "
                             f"{self.cache_config.num_blocks}; it can never run")
        request = Request(request_id, text, token_ids, params)
        seed = int(self._seeds.integers(2**31)) if params.seed is None else params.seed
        request.sequences = [Sequence(request, j, seed + j,
                                      text=None if self.tokenizer is None else IncrementalText(self.tokenizer))
                             for j in range(params.n)]
        self.requests[request_id] = request
        self.scheduler.add(request.sequences[0])  # the other samples fork from it when its prompt is done
        return request

    def abort_request(self, request_id: str) -> RequestOutput:
        """Ends a request now; its blocks go back to the pool. Returns what it produced (the samples
        still running end with finish_reason "abort"). Raises KeyError for an unknown id."""
        request = self.requests.get(str(request_id))
        if request is None:
            raise KeyError(f"request_id {request_id!r}: no such request in the engine")
        for seq in request.sequences:
            if seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")
        request.finish_time = time.perf_counter()
        del self.requests[request.request_id]
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- a step

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns the requests that produced tokens in it (finished ones
        for the last time: they leave the engine)."""
        start = time.perf_counter()
        if self._inflight is not None:  # decode steps started in the last step
            touched = self._finish_decode(*self._inflight)
        else:
            plan = self.scheduler.schedule()
            if plan is None:
                return []
            self._note_peak()
            touched = self._prefill(plan) if isinstance(plan, PrefillPlan) else self._decode(plan)
        if self.check_integrity:
            self.scheduler.check()
        outputs = []
        for request in dict.fromkeys(touched):
            if request.request_id not in self.requests:
                continue  # it finished or was aborted in an earlier step
            outputs.append(self._output(request))
            if request.finished:
                request.finish_time = time.perf_counter()
                outputs[-1].metrics.finish_time = request.finish_time
                del self.requests[request.request_id]
        self._busy_seconds += time.perf_counter() - start
        return outputs

    def _lens(self) -> np.ndarray:
        lens = np.zeros(self.cache_config.max_seqs, np.int32)
        for seq in self.scheduler.running:
            lens[seq.row] = seq.num_computed
        return lens

    def _prefill(self, plan: PrefillPlan) -> list[Request]:
        samples, sample_rows = [], []
        for i, seq in enumerate(plan.seqs):
            if plan.completes(i):
                forks = seq.request.sequences if self._forks_now(seq) else [seq]
                samples += forks
                sample_rows += [i] * len(forks)
        start = time.perf_counter()
        self.runner.copy_blocks(plan.copies)
        seen = self._seen(samples + plan.decodes)  # both groups' or neither
        decode = None
        if plan.decodes:
            decode = DecodeRows([s.row for s in plan.decodes], [s.last_token for s in plan.decodes],
                                *self._sampling_columns(plan.decodes), seen=None if seen is None else seen[len(samples):])
        out = self.runner.prefill(
            self.scheduler.table, self._lens(), [s.row for s in plan.seqs],
            [s.tokens[start:start + count] for s, start, count in zip(plan.seqs, plan.starts, plan.counts)],
            sample_rows, *self._sampling_columns(samples), seen=None if seen is None else seen[: len(samples)],
            decode=decode)
        self._device_seconds += time.perf_counter() - start
        (tokens, logprobs, top_ids, top_logprobs), decoded = out if decode else (out, None)
        if decode:
            self._mixed_steps += 1
            self._decode_steps += 1
            for j, seq in enumerate(plan.decodes):  # each one token, computed on what it held
                self._kv_positions_read += seq.num_computed + 1
                seq.num_computed += 1
                self._append(seq, [int(decoded[0][j])], *(x[j:j + 1] for x in decoded[1:]))
                self._cache_blocks(seq)
        for seq, count in zip(plan.seqs, plan.counts):
            seq.num_computed += count
        for seq in samples:  # the siblings start on the prompt's blocks before anyone can finish
            if seq.index > 0 and seq.blocks is None and not seq.output and not self.scheduler.fork(
                    seq.request.sequences[0], seq):
                self.scheduler.add(seq)  # no row now: it recomputes its prompt later (prefix cached)
        for j, seq in enumerate(samples):
            self._append(seq, [int(tokens[j])], logprobs[j:j + 1], top_ids[j:j + 1], top_logprobs[j:j + 1])
        for seq in plan.seqs:
            self._cache_blocks(seq)
        return [seq.request for seq in plan.decodes + plan.seqs]

    def _forks_now(self, seq: Sequence) -> bool:
        """Whether this completed prompt is a request's first sample, its siblings not started yet."""
        return seq.index == 0 and not seq.output and all(
            s.status is Status.WAITING and s.blocks is None and not s.output for s in seq.request.sequences[1:])

    def _decode(self, plan: DecodePlan) -> list[Request]:
        start = time.perf_counter()
        self.runner.copy_blocks(plan.copies)
        seqs = plan.seqs
        call = self.runner.decode(
            self.scheduler.table, self._lens(), [s.row for s in seqs], [s.last_token for s in seqs],
            *self._sampling_columns(seqs), [s.request.params.max_tokens for s in seqs], plan.steps,
            seen=self._seen(seqs))
        self._device_seconds += time.perf_counter() - start
        return self._finish_decode(seqs, call, plan.steps)

    def _finish_decode(self, seqs: list[Sequence], call, steps: int) -> list[Request]:
        """Starts the next steps of the same rows where it may (`_chain`), then reads this call's
        tokens: the host does its part of a step while the device runs the next."""
        self._inflight = self._chain(seqs, call, steps) if self.overlap else None
        start = time.perf_counter()
        tokens, emitted, logprobs, top_ids, top_logprobs = self.runner.results(call)
        self._device_seconds += time.perf_counter() - start
        self._decode_steps += int(emitted.any(axis=1).sum())
        counts = emitted.sum(axis=0).tolist()  # a row emits in its first steps only: it stops, never pauses
        for b, (seq, count, row_tokens) in enumerate(zip(seqs, counts, tokens.T.tolist())):
            self._kv_positions_read += count * seq.num_computed + count * (count + 1) // 2
            seq.num_computed += count
            self._append(seq, row_tokens[:count], logprobs[:count, b], top_ids[:count, b], top_logprobs[:count, b])
            self._cache_blocks(seq)
        return [seq.request for seq in seqs]

    def _chain(self, seqs: list[Sequence], call, steps: int):
        """The same rows' next `steps` steps, started now, or None where the plan may change instead:
        requests wait to be admitted, a sequence is prefilling, enough rows finished for a smaller
        batch, or the pool can't reserve the blocks of both calls' steps (no preemption here)."""
        scheduler, blocks = self.scheduler, self.scheduler.blocks
        alive = [seq.status is Status.RUNNING for seq in seqs]
        if scheduler.waiting or sum(alive) < len(scheduler.running) or not any(alive):
            return None
        if self.runner.decode_rows(sum(alive)) < self.runner.decode_rows(len(seqs)):
            return None
        if all(seq.request.params.max_tokens - len(seq.output) <= steps for seq, live in zip(seqs, alive) if live):
            return None  # this call ends every row
        longest = 0
        for seq, live in zip(seqs, alive):
            if not live:
                continue
            ahead = min(2 * steps, seq.request.params.max_tokens - len(seq.output))  # this call's and the next's
            positions = seq.num_computed + ahead
            if blocks.shares_tail(seq.blocks, positions, seq.num_computed):
                return None
            try:
                blocks.grow(seq.blocks, positions, seq.num_computed)
            except NoFreeBlocks:
                return None  # the blocks already grown stay with their sequences: the next plan uses them
            scheduler.write_row(seq)
            longest = max(longest, positions)
        self._overlapped_calls += 1
        self._note_peak()
        start = time.perf_counter()
        chained = self.runner.chain(call, scheduler.table, alive, longest)
        self._device_seconds += time.perf_counter() - start
        return seqs, chained, steps

    def _note_peak(self) -> None:
        self._peak_blocks = max(self._peak_blocks, self.scheduler.blocks.num_used_blocks)

    def _sampling_columns(self, seqs: list[Sequence]):
        """(params, seeds, token indices, min_tokens, stop ids) of each sequence, for the runner."""
        params = [s.request.params for s in seqs]
        return (params, [s.seed for s in seqs], [len(s.output) for s in seqs], [p.min_tokens for p in params],
                [self._stop_ids(p) for p in params])

    def _seen(self, seqs: list[Sequence]) -> np.ndarray | None:
        """[S, V] bool: the tokens in each sequence so far, where one of them has a repetition penalty."""
        if all(s.request.params.repetition_penalty == 1 for s in seqs):
            return None
        seen = np.zeros((len(seqs), self.model.config.vocab_size), bool)
        for i, seq in enumerate(seqs):
            seen[i, seq.tokens] = True
        return seen

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        return tuple(params.stop_token_ids) + (() if params.ignore_eos else self.eos_token_ids)

    def _append(self, seq: Sequence, tokens: list[int], logprobs, top_ids, top_logprobs) -> None:
        """Adds a sequence's new tokens up to the first stop; finishes it where one is reached."""
        params = seq.request.params
        if seq.request.first_token_time is None and tokens:
            seq.request.first_token_time = time.perf_counter()
        stops = set(self._stop_ids(params))
        for i, token in enumerate(tokens):
            if seq.status is Status.FINISHED:
                return
            self._generated += 1
            if token in stops and len(seq.output) >= params.min_tokens:
                self.scheduler.finish(seq, "stop")  # the stop token itself is not part of the output
                return
            seq.output.append(token)
            if params.logprobs is not None:
                seq.logprobs.append({int(t): float(p) for t, p in zip(top_ids[i][:params.logprobs],
                                                                    top_logprobs[i][:params.logprobs])}
                                    | {token: float(logprobs[i])})
            if params.stop and len(seq.output) > params.min_tokens and self._stop_string(seq) is not None:
                self.scheduler.finish(seq, "stop")
            elif len(seq.output) >= params.max_tokens:
                self.scheduler.finish(seq, "length")

    def _stop_string(self, seq: Sequence) -> int | None:
        """Where the first stop string starts in the sequence's text, if one has appeared (the text
        decoded and searched only where it grew)."""
        seq.text.update(seq.output)
        seq.stop_at = first_stop(seq.text.text, seq.request.params.stop, seq.stop_searched)
        seq.stop_searched = len(seq.text.text)
        return seq.stop_at

    def _cache_blocks(self, seq: Sequence) -> None:
        """Names the sequence's newly full blocks for the prefix cache (its token list built only then)."""
        blocks = self.scheduler.blocks
        if (blocks.enable_prefix_caching and seq.status is Status.RUNNING
                and seq.blocks.num_named < seq.num_computed // blocks.block_size):
            blocks.cache_full_blocks(seq.blocks, seq.tokens, seq.num_computed)

    def _output(self, request: Request) -> RequestOutput:
        completions = []
        for seq in request.sequences:
            text = ""
            if seq.text is not None:
                seq.text.update(seq.output, final=seq.status is Status.FINISHED)
                text = seq.text.text[:seq.stop_at]
            completions.append(CompletionOutput(seq.index, text, list(seq.output), seq.finish_reason,
                                                list(seq.logprobs) if request.params.logprobs is not None else None))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             request.finished, RequestMetrics(request.arrival_time, request.first_token_time,
                                                              request.finish_time))

    # -- statistics

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           preemptions=self.scheduler.num_preemptions, used_blocks=blocks.num_used_blocks, peak_used_blocks=self._peak_blocks,
                           total_blocks=blocks.num_blocks, prefix_hit_rate=blocks.stats.hit_rate,
                           generated_tokens=self._generated,
                           tokens_per_second=self._generated / self._busy_seconds if self._busy_seconds else 0.0,
                           step_seconds=self._busy_seconds, device_seconds=self._device_seconds,
                           device_idle_seconds=self.runner.idle_seconds,
                           decode_steps=self._decode_steps, kv_positions_read=self._kv_positions_read,
                           overlapped_calls=self._overlapped_calls, mixed_steps=self._mixed_steps,
                           programs=len(self.runner.programs))


def _blocks_that_fit(bytes_per_block: int, utilisation: float, reserved: int = 0) -> int | None:
    """Blocks that fit in `utilisation` of the device's free memory less `reserved` bytes, or None
    where the device does not say."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    free = stats["bytes_limit"] * utilisation - stats.get("bytes_in_use", 0) - reserved
    return max(int(free // bytes_per_block), 1)


class LLM:
    """vLLM's offline API on the engine.

    Args:
      model: a model object (with `tokenizer`), a preset name (random weights; no tokenizer), a GGUF
        file or a Hugging Face checkpoint directory.
      tokenizer: the model object's tokenizer.
      dtype: parameter dtype when loading.
      tensor_parallel_size: T devices that split every layer (vLLM's name): the model is loaded
        straight into its shards (or a model object placed on them; its heads laid out where T does
        not divide its kv heads) and the pools sharded over kv heads (`Engine`'s mesh).
      Everything else as `Engine`.
    """

    def __init__(self, model, tokenizer=None, *, dtype: str | None = None, tensor_parallel_size: int = 1,
                 **engine_args):
        mesh = engine_args.pop("mesh", None)  # a model object already on it (`Engine`'s mesh)
        if tensor_parallel_size != 1:
            from jaxpaged.parallel import make_mesh

            if mesh is not None:
                raise ValueError("tensor_parallel_size: give it or a mesh, not both")
            mesh = make_mesh(tensor_parallel_size)
        if isinstance(model, str):
            model, tokenizer = _load(model, dtype, mesh)
        elif mesh is not None:
            from jaxpaged.models.parallel import shard_model

            model = shard_model(model, mesh)
        self.engine = Engine(model, tokenizer, mesh=mesh, **engine_args)

    def generate(self, prompts: str | list[int] | SequenceType, sampling_params=None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs of every prompt (strings or token-id lists), in the order given.

        sampling_params: one SamplingParams for all, or one per prompt.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        ids = [self.engine.add_request(None, prompt, p).request_id for prompt, p in zip(prompts, params)]
        done = {}
        import tqdm

        with tqdm.tqdm(total=len(ids), desc="requests", disable=not use_tqdm, leave=False) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        done[output.request_id] = output
                        bar.update(1)
                bar.set_postfix_str(self.engine.stats().format(), refresh=False)
        return [done[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """generate() on conversations, each rendered by the tokenizer's chat template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([tokenizer.apply_chat_template(c) for c in conversations], sampling_params, use_tqdm)


def _load(name: str, dtype: str | None, mesh=None):
    """A preset name (random weights) or a model file or directory; on `mesh`, in its shards."""
    from jaxpaged.models.checkpoint import load_model, preset_model
    from jaxpaged.models.config import PRESETS

    if name in PRESETS:
        return preset_model(name, dtype, mesh=mesh), None
    return load_model(name, dtype or "float32", mesh=mesh)
