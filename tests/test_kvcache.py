"""flash_attn_with_kvcache (dense and paged caches, appends, split-KV), paged varlen
attention and ops.reshape_and_cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastinfer
from fastinfer import ops
from conftest import DTYPE_IDS, DTYPES, dtypes
from reference import (alibi_slopes, attention_ref, attention_ref_paged, attention_ref_varlen, check, cu_seqlens,
                       expected_append, kvcache_ref, paged_cache,
                       gather_paged, randn)


# ----------------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------------- dense cache


@dtypes
@pytest.mark.parametrize("batch_idx", [False, True], ids=["rows", "batch_idx"])
@pytest.mark.parametrize("snew", [0, 1, 3], ids=lambda n: f"new{n}")
@pytest.mark.parametrize("sq,causal", [(1, False), (4, True), (4, False)], ids=["decode", "q4_causal", "q4_full"])
def test_dense_cache(gen, dtype, batch_idx, snew, sq, causal):
    B, Bc, Sc, H, Hk, D = 3, 5, 40, 4, 2, 32
    q = randn((B, sq, H, D), dtype, gen)
    kc, vc = randn((Bc, Sc, Hk, D), dtype, gen), randn((Bc, Sc, Hk, D), dtype, gen)
    lens = torch.tensor([0, 17, Sc - snew], dtype=torch.int32)
    idx = torch.tensor([3, 0, 4], dtype=torch.int32) if batch_idx else None
    if not batch_idx:
        kc, vc = kc[:B].clone(), vc[:B].clone()
    knew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    vnew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    want_k, want_v = expected_append(kc, knew, lens, idx), expected_append(vc, vnew, lens, idx)
    lens_before = lens.clone()

    out, lse = fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, cache_batch_idx=idx,
                                                 causal=causal, return_softmax_lse=True)
    assert torch.equal(lens, lens_before), "cache_seqlens must not be modified"
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), "cache contents after the append"
    check(out, lse, kvcache_ref(q, kc, vc, lens + snew, batch_idx=idx, causal=causal))


@dtypes
def test_dense_cache_defaults(gen, dtype):
    # No cache_seqlens: every key of the cache is used; an int cache_seqlens applies to all sequences.
    q = randn((2, 3, 4, 64), dtype, gen)
    kc, vc = randn((2, 33, 4, 64), dtype, gen), randn((2, 33, 4, 64), dtype, gen)
    out = fastinfer.flash_attn_with_kvcache(q, kc, vc, causal=True)
    check(out, None, kvcache_ref(q, kc, vc, [33, 33], causal=True))
    out = fastinfer.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=20)
    check(out, None, kvcache_ref(q, kc, vc, [20, 20]))


@dtypes
def test_dense_cache_options(gen, dtype):
    B, H, Hk, D = 2, 8, 2, 48
    q = randn((B, 5, H, D), dtype, gen)
    kc, vc = randn((B, 90, Hk, D), dtype, gen), randn((B, 90, Hk, D), dtype, gen)
    knew, vnew = randn((B, 5, Hk, D), dtype, gen), randn((B, 5, Hk, D), dtype, gen)
    lens = torch.tensor([60, 85], dtype=torch.int32)
    slopes = alibi_slopes(H, B, gen)
    kw = dict(causal=True, window_size=(20, -1), softcap=10.0, softmax_scale=0.2)
    out, lse = fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, alibi_slopes=slopes,
                                                 return_softmax_lse=True, **kw)
    check(out, lse, kvcache_ref(q, kc, vc, lens + 5, alibi=slopes, **kw))


def test_dense_cache_numpy(np_rng):
    q = np_rng.standard_normal((2, 1, 4, 16)).astype(np.float16)
    kc = np_rng.standard_normal((2, 12, 1, 16)).astype(np.float16)
    vc = np_rng.standard_normal((2, 12, 1, 16)).astype(np.float16)
    knew = np_rng.standard_normal((2, 2, 1, 16)).astype(np.float16)
    vnew = np_rng.standard_normal((2, 2, 1, 16)).astype(np.float16)
    want_k = kc.copy()
    want_k[0, 3:5], want_k[1, 10:12] = knew[0], knew[1]
    out = fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=np.array([3, 10]))
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    np.testing.assert_array_equal(kc, want_k)
    kt, vt = torch.from_numpy(kc), torch.from_numpy(vc)
    check(out, None, kvcache_ref(torch.from_numpy(q), kt, vt, [5, 12]))


# ----------------------------------------------------------------------------- paged cache


@dtypes
@pytest.mark.parametrize("block_size", [1, 3, 16, 256])
@pytest.mark.parametrize("snew,sq,causal", [(0, 1, False), (1, 1, False), (5, 5, True)],
                         ids=["no_append", "decode_append", "prefill_chunk"])
def test_paged_cache(gen, dtype, block_size, snew, sq, causal):
    B, H, Hk, D = 3, 4, 2, 32
    lens = torch.tensor([0, 45, 300], dtype=torch.int32)
    kc, vc, table = paged_cache(gen, dtype, (lens + snew).tolist(), block_size, Hk, D)
    q = randn((B, sq, H, D), dtype, gen)
    knew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    vnew = randn((B, snew, Hk, D), dtype, gen) if snew else None
    want_k = expected_append(kc, knew, lens, block_table=table)
    want_v = expected_append(vc, vnew, lens, block_table=table)
    table_before = table.clone()

    out, lse = fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, block_table=table,
                                                 causal=causal, return_softmax_lse=True)
    assert torch.equal(table, table_before)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), "cache contents after the append"
    check(out, lse, kvcache_ref(q, kc, vc, lens + snew, block_table=table, causal=causal))


@dtypes
def test_decode_gqa_32_8(gen, dtype):
    # A Llama-style decode step: 32 query heads over 8 kv heads, head dim 128, paged cache.
    B, H, Hk, D, bs = 2, 32, 8, 128, 16
    lens = torch.tensor([300, 77], dtype=torch.int32)
    kc, vc, table = paged_cache(gen, dtype, (lens + 1).tolist(), bs, Hk, D)
    q = randn((B, 1, H, D), dtype, gen)
    knew, vnew = randn((B, 1, Hk, D), dtype, gen), randn((B, 1, Hk, D), dtype, gen)
    out, lse = fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, block_table=table,
                                                 causal=True, return_softmax_lse=True)
    check(out, lse, kvcache_ref(q, kc, vc, lens + 1, block_table=table, causal=True))


# ----------------------------------------------------------------------------- split-KV


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("layout", ["dense", "paged16"])
@pytest.mark.parametrize("extra", [{}, {"window_size": (700, -1)}, {"causal": True, "softcap": 5.0}],
                         ids=["plain", "window", "causal_softcap"])
@pytest.mark.parametrize("num_splits", [0, 1, 3, 8])
def test_num_splits(gen, dtype, layout, extra, num_splits):
    # Batch 1, a long cache and few query rows: one tile, so split-KV is what keeps threads busy.
    H, Hk, D, n = 4, 1, 64, 2500
    q = randn((1, 2, H, D), dtype, gen)
    if layout == "dense":
        kc, vc = randn((1, 2600, Hk, D), dtype, gen), randn((1, 2600, Hk, D), dtype, gen)
        table = None
    else:
        kc, vc, table = paged_cache(gen, dtype, [n], 16, Hk, D)
    lens = torch.tensor([n], dtype=torch.int32)
    out, lse = fastinfer.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, num_splits=num_splits,
                                                 return_softmax_lse=True, **extra)
    check(out, lse, kvcache_ref(q, kc, vc, lens, block_table=table, **extra))


@pytest.mark.parametrize("num_splits", [0, 2, 3, 8, 64])
def test_split_matches_unsplit(gen, num_splits):
    q = randn((1, 1, 8, 64), torch.float32, gen)
    kc, vc = randn((1, 3000, 2, 64), torch.float32, gen), randn((1, 3000, 2, 64), torch.float32, gen)
    base = fastinfer.flash_attn_with_kvcache(q, kc, vc, num_splits=1)
    out = fastinfer.flash_attn_with_kvcache(q, kc, vc, num_splits=num_splits)
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- paged varlen attention


@dtypes
@pytest.mark.parametrize("block_size", [1, 3, 16, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_paged(gen, dtype, block_size, causal):
    lq, lk = [1, 0, 13, 6], [20, 7, 300, 0]
    H, Hk, D = 4, 1, 32
    kc, vc, table = paged_cache(gen, dtype, lk, block_size, Hk, D)
    q = randn((sum(lq), H, D), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                   block_table=table, return_attn_probs=True)
    check(out, lse, lambda upcast: attention_ref_paged(q, kc, vc, cu_q, lk, table, causal=causal, upcast=upcast))


@dtypes
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("window", [-1, 40], ids=["full", "window40"])
def test_large_decode_batch(cpu_isa, gen, dtype, block_size, window):
    # Enough decode work for the pool: runs of jobs per task with KV prefetching. The cache is the
    # engine's CPU layout (per block and head: keys then values), handed over as strided views.
    lk = [1, 0, 300, 77, 129, 64, 5, 250] * 5
    H, Hk, D = 6, 2, 64
    nblk = [max(1, -(-n // block_size)) for n in lk]
    num_blocks = sum(nblk) + 2
    kv = randn((num_blocks, Hk, 2, block_size, D), dtype, gen)
    kc, vc = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.full((len(lk), max(nblk)), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[at:at + n]
        at += n
    lq = [1 if n else 0 for n in lk]
    q = randn((sum(lq), H, D), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 1, max(lk), causal=True,
                                                   window_size=(window, 0), block_table=table,
                                                   return_attn_probs=True)
    check(out, lse, lambda upcast: attention_ref_paged(q, kc, vc, cu_q, lk, table, causal=True,
                                                       window_size=(window, 0), upcast=upcast))
    # The same keys packed along the first axis (varlen, no table): the prefetcher's strided branch.
    k = torch.cat([gather_paged(kc, table[b], n) for b, n in enumerate(lk)])
    v = torch.cat([gather_paged(vc, table[b], n) for b, n in enumerate(lk)])
    dense, dense_lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lk), causal=True,
                                                           window_size=(window, 0), return_attn_probs=True)
    assert torch.equal(dense, out) and torch.equal(dense_lse, lse)


# ----------------------------------------------------------------------------- reshape_and_cache


@dtypes
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_reshape_and_cache(gen, dtype, block_size, slot_dtype):
    T, Hk, D = 23, 2, 24
    num_blocks = (T + block_size - 1) // block_size + 3
    key, value = randn((T, Hk, D), dtype, gen), randn((T, Hk, D), dtype, gen)
    kc, vc = randn((num_blocks, block_size, Hk, D), dtype, gen), randn((num_blocks, block_size, Hk, D), dtype, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[torch.randperm(T, generator=gen)[:5]] = -1  # five tokens are padding: skipped
    want_k, want_v = kc.clone(), vc.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // block_size, s % block_size] = key[i]
            want_v[s // block_size, s % block_size] = value[i]
    ops.reshape_and_cache(key, value, kc, vc, slots.to(slot_dtype))
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_reshape_and_cache_strided_sources(gen):
    # key/value sliced out of a fused projection (T, 3, Hk, D): rows are not contiguous.
    fused = randn((10, 3, 2, 16), torch.float16, gen)
    key, value = fused[:, 1], fused[:, 2]
    kc, vc = torch.zeros(4, 4, 2, 16, dtype=torch.float16), torch.zeros(4, 4, 2, 16, dtype=torch.float16)
    slots = torch.arange(15, 5, -1)
    ops.reshape_and_cache(key, value, kc, vc, slots)
    flat_k, flat_v = kc.reshape(16, 2, 16), vc.reshape(16, 2, 16)
    assert torch.equal(flat_k[slots], key) and torch.equal(flat_v[slots], value)
    assert torch.all(flat_k[:6] == 0) and torch.all(flat_v[:6] == 0)


def test_reshape_and_cache_numpy(np_rng):
    key = np_rng.standard_normal((4, 1, 8)).astype(np.float32)
    kc = np.zeros((2, 3, 1, 8), np.float32)
    vc = np.zeros((2, 3, 1, 8), np.float32)
    ops.reshape_and_cache(key, key * 2, kc, vc, np.array([5, -1, 0, 2], dtype=np.int32))
    np.testing.assert_array_equal(kc[1, 2], key[0])
    np.testing.assert_array_equal(kc[0, 0], key[2])
    np.testing.assert_array_equal(vc[0, 2], key[3] * 2)
    assert np.count_nonzero(kc.reshape(6, -1).any(axis=1)) == 3


@dtypes
@pytest.mark.parametrize("block_size", [1, 3, 16, 256])
def test_round_trip_reshape_and_cache_then_paged_attention(gen, dtype, block_size):
    # Prefill: write each sequence's keys with reshape_and_cache into randomly ordered blocks,
    # then attend through the block table: the same as dense varlen attention on the keys.
    lens = [5, 70, 1, 33]
    H, Hk, D = 8, 2, 64
    k, v = randn((sum(lens), Hk, D), dtype, gen), randn((sum(lens), Hk, D), dtype, gen)
    q = randn((sum(lens), H, D), dtype, gen)
    kc, vc, table = paged_cache(gen, dtype, lens, block_size, Hk, D)
    slots = torch.cat([
        table[b, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
        for b, n in enumerate(lens)])
    ops.reshape_and_cache(k, v, kc, vc, slots)
    cu = cu_seqlens(lens)
    paged_out, paged_lse, _ = fastinfer.flash_attn_varlen_func(q, kc, vc, cu, cu, 70, 70, causal=True,
                                                               block_table=table, return_attn_probs=True)
    dense_out, dense_lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu, cu, 70, 70, causal=True,
                                                               return_attn_probs=True)
    # Same keys in the same order, same tiles: identical results.
    assert torch.equal(paged_out, dense_out) and torch.equal(paged_lse, dense_lse)
    check(paged_out, paged_lse, lambda upcast: attention_ref_varlen(q, k, v, cu, cu, causal=True, upcast=upcast))


# ----------------------------------------------------------------------------- strided caches and tables


@dtypes
def test_paged_cache_views_of_a_fused_kv_cache(gen, dtype):
    # vLLM-style storage: one (num_blocks, 2, block_size, Hk, D) tensor, k and v are strided views;
    # the block table is a column slice of a wider table; the new k/v come out of a fused projection.
    B, H, Hk, D, bs = 2, 4, 2, 32, 5
    lens = torch.tensor([7, 17], dtype=torch.int32)
    num_blocks = 12
    kv = randn((num_blocks, 2, bs, Hk, D), dtype, gen)
    kc, vc = kv[:, 0], kv[:, 1]
    wide = torch.randperm(num_blocks, generator=gen).to(torch.int32)[:10].reshape(2, 5)
    table = wide[:, :4]  # rows of 4 entries, row stride 5
    assert table.stride() == (5, 1)
    proj = randn((B, 2, 3, Hk, D), dtype, gen)  # (batch, new tokens, k|v|other, Hk, D)
    knew, vnew = proj[:, :, 0], proj[:, :, 1]
    q = randn((B, 2, H, D), dtype, gen)
    want = kv.clone()
    want[:, 0] = expected_append(kc, knew, lens, block_table=table)
    want[:, 1] = expected_append(vc, vnew, lens, block_table=table)
    out, lse = fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens, block_table=table,
                                                 causal=True, return_softmax_lse=True)
    assert torch.equal(kv, want), "only the appended slots of the fused cache may change"
    check(out, lse, kvcache_ref(q, kc, vc, lens + 2, block_table=table, causal=True))

    # The same fused cache through reshape_and_cache and paged varlen attention.
    key, value = randn((3, Hk, D), dtype, gen), randn((3, Hk, D), dtype, gen)
    slots = torch.tensor([int(table[0, 1]) * bs + 4, -1, int(table[1, 0]) * bs])
    want = kv.clone()
    want[slots[0] // bs, 0, slots[0] % bs] = key[0]
    want[slots[0] // bs, 1, slots[0] % bs] = value[0]
    want[slots[2] // bs, 0, 0], want[slots[2] // bs, 1, 0] = key[2], value[2]
    ops.reshape_and_cache(key, value, kc, vc, slots)
    assert torch.equal(kv, want)
    q2 = randn((5, H, D), dtype, gen)
    cu_q, seqlens = cu_seqlens([1, 4]), [10, 20]
    out = fastinfer.flash_attn_varlen_func(q2, kc, vc, cu_q, cu_seqlens(seqlens), 4, 20, block_table=table)
    check(out, None, lambda upcast: attention_ref_paged(q2, kc, vc, cu_q, seqlens, table, upcast=upcast))


@dtypes
def test_dense_cache_transposed_view(gen, dtype):
    # A cache stored (batch, Hk, seqlen, D) and viewed as (batch, seqlen, Hk, D).
    storage_k, storage_v = randn((2, 2, 30, 64), dtype, gen), randn((2, 2, 30, 64), dtype, gen)
    kc, vc = storage_k.transpose(1, 2), storage_v.transpose(1, 2)
    q = randn((2, 1, 8, 64), dtype, gen)
    knew, vnew = randn((2, 1, 2, 64), dtype, gen), randn((2, 1, 2, 64), dtype, gen)
    lens = torch.tensor([0, 29], dtype=torch.int32)
    want_k, want_v = expected_append(kc, knew, lens), expected_append(vc, vnew, lens)
    out = fastinfer.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=lens)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    check(out, None, kvcache_ref(q, kc, vc, lens + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("sq", [1, 3, 9], ids=lambda n: f"q{n}")
def test_varlen_long_keys_split(gen, dtype, sq):
    # Few tiles and thousands of keys: the automatic split-KV engages in the varlen path too,
    # where the log-sum-exp rows are indexed through cu_seqlens_q.
    lq, lk = [sq, 1], [3000, 700]
    H, Hk, D = 4, 1, 64
    q = randn((sum(lq), H, D), dtype, gen)
    k, v = randn((sum(lk), Hk, D), dtype, gen), randn((sum(lk), Hk, D), dtype, gen)
    cu_q, cu_k = cu_seqlens(lq), cu_seqlens(lk)
    out, lse, _ = fastinfer.flash_attn_varlen_func(q, k, v, cu_q, cu_k, sq, 3000, causal=True, return_attn_probs=True)
    check(out, lse, lambda upcast: attention_ref_varlen(q, k, v, cu_q, cu_k, causal=True, upcast=upcast))


@pytest.mark.parametrize("num_splits", [0, 3, 8])
@pytest.mark.parametrize("sq,nheads", [(1, 8), (5, 4), (9, 8)], ids=["rows8", "rows20", "rows72"])
def test_num_splits_every_tile_kind(cpu_isa, gen, num_splits, sq, nheads):
    # Split-KV partial results from each tile kernel (few-rows, 16-row, 32-row) merge correctly.
    dtype = torch.bfloat16
    q = randn((1, sq, nheads, 64), dtype, gen)
    kc, vc = randn((1, 1500, 1, 64), dtype, gen), randn((1, 1500, 1, 64), dtype, gen)
    out, lse = fastinfer.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1400, num_splits=num_splits, causal=True,
                                                 return_softmax_lse=True)
    check(out, lse, kvcache_ref(q, kc, vc, [1400], causal=True))
