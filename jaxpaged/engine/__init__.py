"""The inference engine on the paged cache (in progress): so far the host-side block manager with
prefix caching and fork, and per-request sampling on the device."""

from jaxpaged.engine.block_manager import BlockManager, NoFreeBlocks, PrefixCacheStats, SeqBlocks, chain_hash
from jaxpaged.engine.sampling import SamplingParams, SamplingRows, sample

__all__ = ["BlockManager", "NoFreeBlocks", "PrefixCacheStats", "SamplingParams", "SamplingRows", "SeqBlocks",
           "chain_hash", "sample"]
