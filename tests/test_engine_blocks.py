"""BlockManager: allocation, reference counts, hash-chained prefix cache, LRU eviction; SchedulerConfig checks."""

from __future__ import annotations

import pytest

from fastinfer.engine import CacheConfig, SamplingParams, SchedulerConfig
from fastinfer.engine.block_manager import BlockManager
from fastinfer.engine.scheduler import Scheduler
from fastinfer.engine.sequence import Sequence

_ids = iter(range(10**9))


def seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", list(tokens), len(tokens), SamplingParams())


def admit(bm: BlockManager, s: Sequence) -> list[int]:
    """What the scheduler does for a waiting sequence: prefix lookup, then blocks for all its tokens."""
    cached = bm.find_cached_prefix(s)
    assert bm.allocate(s, s.num_tokens - s.num_computed_tokens - len(cached) * bm.block_size, cached)
    return cached


def test_allocate_append_free_refcounts():
    bm = BlockManager(4, 3, enable_prefix_caching=False)
    a = seq([1, 2, 3, 4])
    assert bm.allocate(a, 4) and len(a.block_table) == 2 and bm.num_free_blocks == 2
    a.num_computed_tokens = 4
    a.token_ids += [5, 6]
    assert bm.allocate(a, 2) and len(a.block_table) == 2  # fits the partly used block
    a.num_computed_tokens = 6
    a.token_ids.append(7)
    assert bm.allocate(a, 1) and len(a.block_table) == 3
    b = seq(list(range(7)))
    assert not bm.allocate(b, 7) and b.block_table == [] and bm.num_free_blocks == 1  # refused without change
    assert bm.allocate(b, 3)
    assert sorted(a.block_table + b.block_table) == [0, 1, 2, 3]
    bm.free_blocks(a)
    assert a.block_table == [] and bm.num_free_blocks == 3
    assert [blk.ref_count for blk in bm.blocks] == [1 if i in b.block_table else 0 for i in range(4)]
    bm.free_blocks(b)
    assert bm.num_free_blocks == 4 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_shared_prefix_of_three_blocks_hits():
    bm = BlockManager(16, 2)
    prefix = [7, 8, 9, 10, 11, 12]
    a, b = seq(prefix + [1, 2, 3]), seq(prefix + [4])
    assert admit(bm, a) == []
    cached = admit(bm, b)
    assert cached == a.block_table[:3] and b.num_computed_tokens == 6 and b.block_table[:3] == cached
    assert bm.stats.block_hits == 3 and bm.stats.hits == 6
    assert bm.stats.block_queries == 4 + 3 and bm.stats.queries == 9 + 7
    assert [bm.blocks[i].ref_count for i in cached] == [2, 2, 2]
    bm.free_blocks(a)
    assert [bm.blocks[i].ref_count for i in cached] == [1, 1, 1]
    bm.free_blocks(b)
    assert bm.num_free_blocks == 16


def test_never_hits_the_whole_prompt():
    bm = BlockManager(8, 2)
    a = seq([1, 2, 3, 4])
    admit(bm, a)
    bm.free_blocks(a)
    b = seq([1, 2, 3, 4])
    assert len(admit(bm, b)) == 1 and b.num_computed_tokens == 2  # the last block is recomputed for its logits
    c = seq([1, 2, 3, 4, 5])
    assert len(admit(bm, c)) == 2 and c.num_computed_tokens == 4


def test_block_size_one_and_disabled_cache():
    bm = BlockManager(5, 1)
    a = seq([3, 1, 4])
    admit(bm, a)
    b = seq([3, 1, 5])
    assert len(admit(bm, b)) == 2 and b.num_computed_tokens == 2
    off = BlockManager(6, 1, enable_prefix_caching=False)
    admit(off, seq([3, 1, 4]))
    assert admit(off, seq([3, 1, 4])) == [] and off.stats.queries == 0


def test_chained_hash_needs_the_same_parent():
    bm = BlockManager(8, 2)
    admit(bm, seq([1, 2, 3, 4, 9]))
    assert admit(bm, seq([5, 6, 3, 4, 9])) == []  # same second block, different first block: no hit


def test_eviction_is_lru_and_tail_first():
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] (hashed) + [5] (partial)
    admit(bm, a)
    a_blocks = list(a.block_table)
    bm.free_blocks(a)
    b = seq([7, 8, 9, 10, 11])  # needs 3 blocks: the never-used one, a's partial one, then a's tail block
    admit(bm, b)
    assert set(b.block_table) == {3, a_blocks[2], a_blocks[1]}
    bm.free_blocks(b)  # b's blocks are now more recently freed than a's head block
    c = seq([1, 2, 6])
    assert admit(bm, c) == [a_blocks[0]]  # a's head survived
    bm.free_blocks(c)
    d = seq([9, 9, 9, 9, 9, 9, 9])  # 4 blocks: evicts everything, a's head (least recent) included
    admit(bm, d)
    bm.free_blocks(d)
    assert bm.find_cached_prefix(seq([1, 2, 6])) == []
    assert bm.find_cached_prefix(seq([7, 8, 9, 10, 11])) == []


def test_lru_order_between_sequences():
    bm = BlockManager(4, 2)
    a, b = seq([1, 2, 0]), seq([3, 4, 0])
    admit(bm, a)
    admit(bm, b)
    bm.free_blocks(a)
    bm.free_blocks(b)  # a's full block was freed first: it is evicted first
    admit(bm, seq([5, 6, 7]))  # 2 blocks: both partial (unhashed) blocks go first
    assert bm.find_cached_prefix(seq([1, 2, 0])) != [] and bm.find_cached_prefix(seq([3, 4, 0])) != []
    admit(bm, seq([8]))
    assert bm.find_cached_prefix(seq([1, 2, 0])) == [] and bm.find_cached_prefix(seq([3, 4, 0])) != []


def test_reviving_cached_free_blocks_counts_against_free_space():
    bm = BlockManager(3, 2)
    a = seq([1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free_blocks(a)
    b = seq([1, 2, 3, 4, 6, 7, 8])  # 2 cached blocks + 2 new: 4 > 3 blocks, refused with nothing taken
    cached = bm.find_cached_prefix(b)
    assert len(cached) == 2 and not bm.allocate(b, 3, cached)
    assert bm.num_free_blocks == 3 and b.block_table == [] and b.num_computed_tokens == 0


@pytest.mark.parametrize(
    "field,value",
    [("max_num_seqs", 0), ("max_num_batched_tokens", -1), ("max_model_len", 1.5), ("block_size", 0),
     ("num_blocks", True), ("enable_prefix_caching", 1)],
)
def test_scheduler_config_validation(field, value):
    config = SchedulerConfig if field in SchedulerConfig.__dataclass_fields__ else CacheConfig
    with pytest.raises(ValueError, match=field):
        config(**{field: value})
    scheduler = Scheduler(SchedulerConfig(max_model_len=100), CacheConfig(block_size=4, num_blocks=10))
    assert scheduler.max_seq_len == 40


def test_stats_count_admissions_not_retries():
    bm = BlockManager(2, 2)
    a = seq([1, 2, 3, 4])
    admit(bm, a)
    b = seq([1, 2, 5])
    cached = bm.find_cached_prefix(b)
    assert bm.allocate(b, 1, cached) is False  # 1 shared + 1 new block: no room
    assert bm.stats.queries == 4 and bm.stats.block_queries == 1 and bm.stats.hits == 0
    bm.free_blocks(a)
    assert bm.allocate(b, 1, bm.find_cached_prefix(b))
    assert (bm.stats.queries, bm.stats.hits, bm.stats.block_queries, bm.stats.block_hits) == (7, 2, 2, 1)
