"""The inference engine on the paged cache: continuous batching, chunked prefill, prefix caching,
preemption by recompute, parallel sampling by fork, multi-step decode (`Engine`), and vLLM's offline
API on top (`LLM`)."""

from jaxpaged.engine.block_manager import BlockManager, NoFreeBlocks, PrefixCacheStats, SeqBlocks, chain_hash
from jaxpaged.engine.engine import LLM, Engine, EngineStats
from jaxpaged.engine.request import CompletionOutput, RequestMetrics, RequestOutput
from jaxpaged.engine.sampling import SamplingParams, SamplingRows, sample

__all__ = ["LLM", "BlockManager", "CompletionOutput", "Engine", "EngineStats", "NoFreeBlocks", "PrefixCacheStats",
           "RequestMetrics", "RequestOutput", "SamplingParams", "SamplingRows", "SeqBlocks", "chain_hash", "sample"]
