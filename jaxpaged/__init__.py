"""jaxpaged: a paged KV cache whose state is immutable arrays and pytrees, changed by jitted pure functions."""

from jaxpaged import ops
from jaxpaged.attention import attend, paged_attention
from jaxpaged.cache import (
    Block,
    BlockAllocator,
    CacheFullError,
    DoubleFreeError,
    KVCache,
    OutOfBlocksError,
    PagedKVCache,
    PagedKVCacheAdapter,
    UnknownSequenceError,
    create_paged_kv_cache,
)
from jaxpaged.config import CacheConfig
from jaxpaged.contiguous import ContiguousKVState, contiguous_append, contiguous_read, init_contiguous
from jaxpaged.ops import allocate_blocks, allocate_slots, append, free_blocks, free_seqs, gather_kv, reserve, write_slots
from jaxpaged.parallel import make_mesh
from jaxpaged.protocol import IMPLS, KVCacheProtocol, NoCache, Step
from jaxpaged.state import BlockAllocatorState, BlockTable, KVPools, PagedKVState, init_state
from jaxpaged.stats import MemoryStats, contiguous_memory_stats, paged_memory_stats

__all__ = [
    "attend", "paged_attention",
    "Block", "BlockAllocator", "BlockAllocatorState", "BlockTable", "CacheConfig", "CacheFullError",
    "ContiguousKVState", "DoubleFreeError", "IMPLS", "KVCacheProtocol", "NoCache", "Step", "KVCache", "KVPools", "MemoryStats", "OutOfBlocksError",
    "PagedKVCache", "PagedKVCacheAdapter", "PagedKVState", "UnknownSequenceError", "allocate_blocks", "allocate_slots",
    "append",
    "contiguous_append", "contiguous_memory_stats", "contiguous_read", "create_paged_kv_cache", "free_blocks",
    "free_seqs", "gather_kv", "init_contiguous", "init_state", "make_mesh", "ops", "paged_memory_stats", "reserve",
    "write_slots",
]
