"""Requests as plain objects: a request's samples are sequences; what the user gets back are outputs.

A `Sequence` is one stream of tokens the engine runs: its prompt, what it generated, its blocks
(`SeqBlocks`), its row in the device's block table, and how many of its positions the cache holds.
A request with n > 1 has n sequences that share the prompt's blocks.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxpaged.engine.block_manager import SeqBlocks
from jaxpaged.engine.detokenize import IncrementalText
from jaxpaged.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its blocks given back; it will recompute)
    RUNNING = "running"  # holds blocks and a table row
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)  # compared by identity: a sequence is one object wherever it is listed
class Sequence:
    """One sample of a request: the tokens the engine runs and where their K/V live."""

    request: Request
    index: int  # which of the request's n samples
    seed: int  # this sample's random stream
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    blocks: SeqBlocks | None = None
    row: int | None = None  # row of the device's block table while running
    num_computed: int = 0  # positions whose K/V the cache holds
    finish_reason: str | None = None
    num_preemptions: int = 0
    text: IncrementalText | None = None  # the output's text, where the engine has a tokenizer
    stop_searched: int = 0  # how much of the text was searched for stop strings
    stop_at: int | None = None  # where a stop string starts in the text: the output's text ends there

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_token_ids + self.output

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.request.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output)

    @property
    def prefilling(self) -> bool:
        """Whether positions before the last token still need computing (a prompt, or a recompute)."""
        return not self.output or self.num_computed < self.num_tokens - 1


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    sequences: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(seq.status is Status.FINISHED for seq in self.sequences)


@dataclasses.dataclass
class CompletionOutput:
    """One of a request's n completions."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"; None while running
    logprobs: list[dict[int, float]] | None = None  # per token: the most likely tokens' log-probabilities


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    """What a request produced (so far, from `Engine.step`; all of it, from `LLM.generate`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
