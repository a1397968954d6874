"""The scheduler: which sequences run in the next step, and how many tokens each.

A step is either a prefill step (with or without decodes) or a decode step, and its plan is data:
- `PrefillPlan`: chunks of prompts (or of a preempted sequence's tokens, recomputed), at most
  `max_num_batched_tokens` tokens in all. Sequences already part-way through their prompt continue
  first; then waiting ones are admitted first come, first served, while a table row, the token
  budget and the pool allow. A long prompt is split over steps (chunked prefill). With `mix`, every
  running sequence whose tokens are all computed takes one decode step in the same call (a mixed
  batch: its token counts against the budget first, and its block is reserved before any prompt is
  admitted, as vLLM schedules running requests before waiting ones), so decodes never stall
  behind prompts.
- `DecodePlan`: every running sequence whose tokens are all computed, for `decode_steps` tokens in
  one device call; their blocks for all those steps are reserved now.
When the pool is short, the newest running sequence is preempted (its blocks given back; it
recomputes later, from the front of the queue, and samples the same tokens, its random stream
being keyed by token index).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from jaxpaged.engine.block_manager import BlockManager, NoFreeBlocks
from jaxpaged.engine.request import Sequence, Status


@dataclasses.dataclass
class PrefillPlan:
    seqs: list[Sequence]
    starts: list[int]  # first position of each chunk
    counts: list[int]  # tokens of each chunk
    copies: list[tuple[int, int]]  # block copies to make first (copy on write, for the decodes)
    decodes: list[Sequence] = dataclasses.field(default_factory=list)  # one decode step each, same call

    def completes(self, i: int) -> bool:
        """Whether chunk i reaches its sequence's last token (then it samples the next one)."""
        return self.starts[i] + self.counts[i] == self.seqs[i].num_tokens


@dataclasses.dataclass
class DecodePlan:
    """A decode call: its sequences, longest context first. They are the call's rows in that order,
    and the decode kernel's programs start in row order (each kv head's in turn), so the longest
    contexts start first and the shortest fill the end of the call instead of one long row running
    on while the other SMs idle (the longest-processing-time-first rule)."""

    seqs: list[Sequence]
    steps: int  # decode steps in the device call
    copies: list[tuple[int, int]]  # (source, destination) blocks to copy before the step (copy on write)


class Scheduler:
    """Owns the waiting queue, the running set, the table rows and the block manager.

    Args:
      block_manager: the pool's blocks.
      max_num_seqs: running sequences at most (rows of the device's block table).
      max_num_batched_tokens: tokens a prefill step computes at most.
      chunk_tile: a chunk's tokens count against that budget in whole tiles of this many, as the
        runner packs them (`jaxpaged.engine.runner.pack_chunks`); a chunk that does not end its
        prompt is whole tiles.
      max_blocks_per_seq: M, the block table's width.
      decode_steps: tokens each decode call generates per sequence.
      mix: decode the running sequences in prefill steps too (the model needs `mixed_step`).
    """

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_blocks_per_seq: int, decode_steps: int, mix: bool = False, chunk_tile: int = 1):
        self.blocks = block_manager
        self.chunk_tile = chunk_tile
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.decode_steps, self.mix = decode_steps, mix
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.table = np.full((max_num_seqs, max_blocks_per_seq), block_manager.num_blocks, np.int32)  # [B, M]
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # -- plans

    def schedule(self) -> PrefillPlan | DecodePlan | None:
        """The next step's plan, or None when nothing can run."""
        if self.mix and (self.waiting or any(seq.prefilling for seq in self.running)):
            decodes, copies = self._reserve(1)
            plan = self._prefill(self.max_num_batched_tokens - len(decodes))
            if plan is not None:
                plan.decodes, plan.copies = decodes, copies
                return plan
        return self._prefill(self.max_num_batched_tokens) or self._decode()

    def _prefill(self, budget: int) -> PrefillPlan | None:
        plan = PrefillPlan([], [], [], [])
        for seq in self.running:
            if seq.prefilling and budget >= self.chunk_tile:
                budget -= self._add_chunk(plan, seq, budget)
        while self.waiting and self._free_rows and budget >= self.chunk_tile:
            seq = self.waiting[0]
            try:
                seq.blocks = self.blocks.allocate_prompt(seq.tokens)
            except NoFreeBlocks:
                break  # first come, first served: no one overtakes the head of the queue
            self.waiting.popleft()
            seq.status, seq.row, seq.num_computed = Status.RUNNING, self._free_rows.pop(), seq.blocks.num_cached
            self.running.append(seq)
            self.write_row(seq)
            budget -= self._add_chunk(plan, seq, budget)
        return plan if plan.seqs else None

    def _add_chunk(self, plan: PrefillPlan, seq: Sequence, budget: int) -> int:
        """The sequence's next chunk, as much as `budget` (at least one tile) takes. Returns its cost:
        its tokens padded to whole tiles, as the runner packs them; a chunk that does not end the
        prompt is whole tiles."""
        tile = self.chunk_tile
        count = seq.num_tokens - seq.num_computed
        cost = -(-count // tile) * tile
        if cost > budget:
            count = cost = budget // tile * tile
        plan.seqs.append(seq)
        plan.starts.append(seq.num_computed)
        plan.counts.append(count)
        return cost

    def _decode(self) -> DecodePlan | None:
        seqs, copies = self._reserve(self.decode_steps)
        return DecodePlan(seqs, self.decode_steps, copies) if seqs else None

    def _reserve(self, decode_steps: int) -> tuple[list[Sequence], list[tuple[int, int]]]:
        """Blocks for `decode_steps` more tokens of every running sequence whose tokens are all
        computed, preempting the newest running sequences where the pool is short. Returns those
        sequences still running, and the block copies (copy on write) to make first."""
        copies = []
        for seq in list(self.running):  # oldest first; preemption takes the newest
            if seq.status is not Status.RUNNING or seq.prefilling:
                continue
            steps = min(decode_steps, seq.request.params.max_tokens - len(seq.output))
            while True:
                try:
                    copies += self.blocks.grow(seq.blocks, seq.num_tokens - 1 + steps, seq.num_tokens - 1)
                    self.write_row(seq)
                    break
                except NoFreeBlocks:
                    victim = self.running[-1]
                    self.preempt(victim)
                    if victim is seq:
                        break
        decoding = [s for s in self.running if not s.prefilling]
        decoding.sort(key=lambda s: -s.num_computed)  # longest first: see `DecodePlan`
        return decoding, copies

    # -- changes of status

    def preempt(self, seq: Sequence) -> None:
        """Gives a running sequence's blocks and row back; it waits at the front to recompute."""
        self._release(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Starts `child` on its parent's blocks (shared) in a row of its own; False when no row is free."""
        if not self._free_rows:
            return False
        child.blocks = self.blocks.fork(parent.blocks)
        child.status, child.row, child.num_computed = Status.RUNNING, self._free_rows.pop(), parent.num_computed
        self.running.append(child)
        self.write_row(child)
        return True

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.blocks)
        self.table[seq.row] = self.blocks.num_blocks
        self._free_rows.append(seq.row)
        self.running.remove(seq)
        seq.blocks, seq.row = None, None

    def write_row(self, seq: Sequence) -> None:
        """The sequence's blocks into its row of the table."""
        row = self.table[seq.row]
        row[:] = self.blocks.num_blocks
        row[: len(seq.blocks.blocks)] = seq.blocks.blocks

    def check(self) -> None:
        """The integrity check: the block manager's, and the table rows equal the sequences' blocks."""
        self.blocks.check([seq.blocks for seq in self.running])
        for seq in self.running:
            held = self.table[seq.row]
            assert list(held[held < self.blocks.num_blocks]) == seq.blocks.blocks, "a table row disagrees"
        rows = [seq.row for seq in self.running]
        assert len(set(rows)) == len(rows) and not set(rows) & set(self._free_rows)
        assert all(seq.blocks is None for seq in self.waiting)
