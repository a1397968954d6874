"""The inference engine on the paged cache (in progress): the host-side block manager with prefix
caching and fork so far."""

from jaxpaged.engine.block_manager import BlockManager, NoFreeBlocks, PrefixCacheStats, SeqBlocks, chain_hash

__all__ = ["BlockManager", "NoFreeBlocks", "PrefixCacheStats", "SeqBlocks", "chain_hash"]
