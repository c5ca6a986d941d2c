"""Fixed-size KV-cache blocks with reference counts and a hash-chained prefix cache.

A full block's hash is ``hash((parent_hash, tuple(its token ids)))`` with the previous block's hash as parent, so equal
hashes mean equal whole prefixes. Hashed blocks stay findable after their last user frees them; such free-but-cached
blocks are reused (and forgotten) least-recently-freed first, after blocks that never held a full prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence

_NO_PARENT = -1  # parent hash of a sequence's first block


@dataclass(slots=True)
class Block:
    """One cache block."""

    block_id: int  # index into the KV cache tensors
    ref_count: int = 0  # sequences whose block_table holds this block
    hash: int | None = None  # prefix hash once full and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the block's tokens when hashed (checked on lookup against hash collisions)


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache counters since the engine started."""

    queries: int = 0  # tokens of the sequences admitted (vLLM's definition: hit rate = hits / queries)
    hits: int = 0  # of those, tokens found in the cache
    block_queries: int = 0  # full blocks the admitted sequences looked up (all but the last token)
    block_hits: int = 0  # full blocks found in the cache


class BlockManager:
    """Owns every block; sequences only hold block ids in their block_table."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in reuse order: unhashed ones first, then cached ones least recently freed first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest full-block prefix of seq, leaving at least its last token to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._hash_full_blocks(seq, max_blocks)
        found: list[int] = []
        for i in range(max_blocks):
            block_id = self.hash_to_block.get(seq.block_hashes[i])
            if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(seq, i):
                break
            found.append(block_id)
        return found

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Give seq the cached blocks then enough new blocks for num_new_tokens more tokens; False (no change) if short.

        cached must come from find_cached_prefix on a sequence holding no blocks; its tokens count as computed.
        """
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        num_new_blocks = self.blocks_needed(num_computed + num_new_tokens) - len(seq.block_table) - len(cached)
        num_revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # cached blocks that sit in free
        if num_new_blocks + num_revived > len(self.free):
            return False
        if self.enable_prefix_caching and not seq.block_table:  # an admission: count its lookup once
            self.stats.queries += seq.num_tokens
            self.stats.hits += len(cached) * self.block_size
            self.stats.block_queries += (seq.num_tokens - 1) // self.block_size
            self.stats.block_hits += len(cached)
        for block_id in cached:
            self._take(block_id)
        seq.block_table.extend(cached)
        seq.num_computed_tokens = num_computed
        for _ in range(max(num_new_blocks, 0)):
            block_id = next(iter(self.free))
            self._take(block_id)
            self._forget(block_id)
            seq.block_table.append(block_id)
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, (num_computed + num_new_tokens) // self.block_size)
        return True

    def free_blocks(self, seq: Sequence) -> None:
        """Release seq's blocks (last block first, so a sequence's tail is evicted before its head)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def forget(self, block_ids: list[int]) -> None:
        """Drop blocks from the prefix cache (their KV is not trustworthy); their users keep them."""
        for block_id in block_ids:
            self._forget(block_id)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _forget(self, block_id: int) -> None:
        """Drop a reused block from the prefix cache (eviction)."""
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def _hash_full_blocks(self, seq: Sequence, num_blocks: int) -> None:
        """Extend seq.block_hashes to its first num_blocks full blocks."""
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else _NO_PARENT
            seq.block_hashes.append(hash((parent, self._block_tokens(seq, i))))

    def _register_full_blocks(self, seq: Sequence, num_full: int) -> None:
        """Make seq's first num_full blocks (full once this step ran) findable by later lookups."""
        self._hash_full_blocks(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                h = seq.block_hashes[i]
                block.hash, block.token_ids = h, self._block_tokens(seq, i)
                self.hash_to_block.setdefault(h, block.block_id)
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)
