"""Bad inputs raise a clear exception that names the argument, and lose nothing.

Every case runs against a fresh set of inputs (`t`); afterwards every tensor in
`t` (inputs, caches, pre-poisoned outputs, index tensors) must be bit-for-bit
what it was before the rejected call ("bad input loses nothing").
"""

from __future__ import annotations

import types

import pytest
import torch

import fastinfer
from fastinfer import _C, ops
from reference import assert_unchanged, check_rejected, randn, snapshot

B, SQ, SK, H, HK, D = 2, 3, 5, 4, 2, 16
BS, NBLK = 4, 6  # paged cache: block size, number of blocks


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


@pytest.fixture
def t(gen):
    ns = types.SimpleNamespace()
    ns.q = randn((B, SQ, H, D), torch.float32, gen)
    ns.k = randn((B, SK, HK, D), torch.float32, gen)
    ns.v = randn((B, SK, HK, D), torch.float32, gen)
    # varlen: two sequences, 6 query rows, 8 key rows
    ns.qv = randn((6, H, D), torch.float32, gen)
    ns.kv_ = randn((8, HK, D), torch.float32, gen)
    ns.vv = randn((8, HK, D), torch.float32, gen)
    ns.cu_q, ns.cu_k = i32(0, 2, 6), i32(0, 3, 8)
    # dense cache (B, 8, HK, D) and new tokens
    ns.kc = randn((B, 8, HK, D), torch.float32, gen)
    ns.vc = randn((B, 8, HK, D), torch.float32, gen)
    ns.knew = randn((B, 3, HK, D), torch.float32, gen)
    ns.vnew = randn((B, 3, HK, D), torch.float32, gen)
    ns.lens = i32(2, 4)
    # paged cache (NBLK, BS, HK, D); sequence b owns blocks table[b]
    ns.pk = randn((NBLK, BS, HK, D), torch.float32, gen)
    ns.pv = randn((NBLK, BS, HK, D), torch.float32, gen)
    ns.table = i32(4, 1, 0, 5).reshape(2, 2)
    # reshape_and_cache sources
    ns.key = randn((3, HK, D), torch.float32, gen)
    ns.value = randn((3, HK, D), torch.float32, gen)
    ns.slots = torch.tensor([0, 9, 2])
    # raw kernel outputs, poisoned
    ns.out = torch.full((B, SQ, H, D), float("nan"))
    ns.lse = torch.full((B, H, SQ), float("nan"))
    return ns


def opts(scale=0.25):
    o = _C.AttentionOptions()
    o.softmax_scale = scale
    return o






fa = fastinfer.flash_attn_func
fv = fastinfer.flash_attn_varlen_func
fkv = fastinfer.flash_attn_with_kvcache

# (id, call, exception, regex the message must match: it names the offending argument)
CASES = [
    # ---- dtypes
    ("q_int", lambda t: fa(t.q.int(), t.k, t.v), TypeError, r"^q: expected dtype float32, float16 or bfloat16, got int32"),
    ("q_bool", lambda t: fa(t.q.bool(), t.k, t.v), TypeError, r"^q: expected dtype .* got bool"),
    ("q_float64", lambda t: fa(t.q.double(), t.k, t.v), TypeError, r"^q: expected dtype .* got float64"),
    ("k_dtype_differs", lambda t: fa(t.q.half(), t.k, t.v.half()), TypeError,
     r"^k: expected dtype float16 \(same as q\), got float32"),
    ("v_dtype_differs", lambda t: fa(t.q.bfloat16(), t.k.bfloat16(), t.v), TypeError,
     r"^v: expected dtype bfloat16 \(same as q\), got float32"),
    # ---- ranks and shapes
    ("q_rank3", lambda t: fa(t.q[0], t.k, t.v), ValueError, r"^q: expected 4 dimensions"),
    ("q_rank5", lambda t: fa(t.q[None], t.k, t.v), ValueError, r"^q: expected 4 dimensions"),
    ("q_rank2", lambda t: fa(t.q[0, 0], t.k, t.v), ValueError, r"^q: expected"),
    ("k_rank3", lambda t: fa(t.q, t.k[0], t.v), ValueError, r"^k: expected 4 dimensions"),
    ("v_shape", lambda t: fa(t.q, t.k, t.v[:, :4]), ValueError, r"^v: expected the shape of k"),
    ("k_headdim", lambda t: fa(t.q, t.k[..., :8], t.v[..., :8]), ValueError,
     r"^k: head dimension 8 does not match q's 16"),
    ("nheads_not_multiple", lambda t: fa(t.q[:, :, :3], t.k, t.v), ValueError,
     r"number of query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
    ("more_kv_heads", lambda t: fa(t.q[:, :, :1], t.k, t.v), ValueError, r"number of query heads \(1\)"),
    ("headdim_12", lambda t: fa(t.q[..., :12], t.k[..., :12], t.v[..., :12]), ValueError,
     r"^q: head dimension must be a multiple of 8 in \[8, 256\], got 12"),
    ("headdim_264", lambda t: fa(*(torch.zeros(1, 2, 1, 264) for _ in range(3))), ValueError,
     r"^q: head dimension must be a multiple of 8 in \[8, 256\], got 264"),
    ("batch_mismatch", lambda t: fa(t.q, t.k[:1], t.v[:1]), ValueError, r"^k: batch size 1 does not match q's 2"),
    # ---- strides
    ("q_last_stride", lambda t: fa(torch.zeros(B, SQ, H, 2 * D)[..., ::2], t.k, t.v), ValueError,
     r"^q: the last dimension must be contiguous \(stride 1\), got stride 2"),
    ("k_last_stride", lambda t: fa(t.q, torch.zeros(B, SK, HK, 2 * D)[..., ::2], t.v), ValueError,
     r"^k: the last dimension must be contiguous"),
    ("v_last_stride", lambda t: fa(t.q, t.k, torch.zeros(B, SK, HK, D, 3)[..., 0]), ValueError,
     r"^v: the last dimension must be contiguous"),
    # ---- options
    ("alibi_shape_h", lambda t: fa(t.q, t.k, t.v, alibi_slopes=torch.ones(H + 1)), ValueError,
     r"^alibi_slopes: expected shape \(4,\), got \(5,\)"),
    ("alibi_shape_bh", lambda t: fa(t.q, t.k, t.v, alibi_slopes=torch.ones(B + 1, H)), ValueError,
     r"^alibi_slopes: expected shape \(2, 4\), got \(3, 4\)"),
    ("alibi_rank3", lambda t: fa(t.q, t.k, t.v, alibi_slopes=torch.ones(1, B, H)), ValueError, r"^alibi_slopes: expected shape"),
    ("window_left_neg", lambda t: fa(t.q, t.k, t.v, window_size=(-2, -1)), ValueError,
     r"^window_size: expected two ints in \[-1, 2\*\*31-1\] \(-1 = unbounded\), got \(-2, -1\)"),
    ("window_right_neg", lambda t: fa(t.q, t.k, t.v, window_size=(3, -7)), ValueError, r"^window_size: expected two ints"),
    ("window_not_pair", lambda t: fa(t.q, t.k, t.v, window_size=(1, 2, 3)), ValueError, r"^window_size: expected two ints"),
    ("softcap_neg", lambda t: fa(t.q, t.k, t.v, softcap=-1.0), ValueError, r"^softcap must be >= 0"),
    ("softcap_inf", lambda t: fa(t.q, t.k, t.v, softcap=float("inf")), ValueError, r"^softcap must be >= 0"),
    ("scale_nan", lambda t: fa(t.q, t.k, t.v, softmax_scale=float("nan")), ValueError, r"^softmax_scale must be finite"),
    ("dropout", lambda t: fa(t.q, t.k, t.v, dropout_p=0.1), NotImplementedError, r"^dropout_p=0.1"),
    ("dropout_varlen", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, t.cu_k, 4, 5, dropout_p=0.5), NotImplementedError,
     r"^dropout_p"),
    # ---- not tensors
    ("k_list", lambda t: fa(t.q, t.k.tolist(), t.v), TypeError,
     r"^k: expected a tensor or array supporting DLPack .* got list"),
    ("v_list", lambda t: fa(t.q, t.k, t.v.tolist()), TypeError, r"^v: expected a tensor or array supporting DLPack"),
    # ---- varlen
    ("cu_q_not_monotone", lambda t: fv(t.qv, t.kv_, t.vv, i32(0, 4, 2), t.cu_k, 4, 5), ValueError,
     r"^cu_seqlens_q must be non-decreasing, but cu_seqlens_q\[2\] = 2 < cu_seqlens_q\[1\] = 4"),
    ("cu_k_not_monotone", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, i32(0, 5, 4), 4, 5), ValueError,
     r"^cu_seqlens_k must be non-decreasing"),
    ("cu_q_past_end", lambda t: fv(t.qv, t.kv_, t.vv, i32(0, 2, 7), t.cu_k, 5, 5), ValueError,
     r"^cu_seqlens_q\[-1\] = 7 exceeds the 6 rows of q"),
    ("cu_k_past_end", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, i32(0, 3, 9), 4, 6), ValueError,
     r"^cu_seqlens_k\[-1\] = 9 exceeds the 8 rows of k"),
    ("cu_q_negative_start", lambda t: fv(t.qv, t.kv_, t.vv, i32(-1, 2, 6), t.cu_k, 4, 5), ValueError,
     r"^cu_seqlens_q\[0\] must be 0 \(cu_seqlens are prefix sums of the sequence lengths\), got -1"),
    ("cu_k_wrong_length", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, i32(0, 8), 4, 8), ValueError,
     r"^cu_seqlens_k: expected shape \(3,\), got \(2,\)"),
    ("cu_q_2d", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q[None], t.cu_k, 4, 5), ValueError, r"^cu_seqlens_q: expected shape"),
    ("cu_q_empty", lambda t: fv(t.qv, t.kv_, t.vv, i32(), t.cu_k, 4, 5), ValueError, r"^cu_seqlens_q: expected shape"),
    ("cu_q_strided", lambda t: fv(t.qv, t.kv_, t.vv, i32(0, 9, 2, 9, 6)[::2], t.cu_k, 4, 5), ValueError,
     r"^cu_seqlens_q: must be contiguous"),
    ("varlen_q_rank4", lambda t: fv(t.qv[None], t.kv_, t.vv, t.cu_q, t.cu_k, 4, 5), ValueError,
     r"^q: expected 3 dimensions \(total_q, nheads, headdim\)"),
    ("varlen_k_rank4", lambda t: fv(t.qv, t.kv_[None], t.vv[None], t.cu_q, t.cu_k, 4, 5), ValueError,
     r"^k: expected 3 dimensions \(total_k, nheads_k, headdim\)"),
    # ---- paged varlen
    ("block_table_entry_range", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, i32(0, 3, 8), 4, 5, block_table=i32(4, 1, 9, 5).reshape(2, 2)),
     ValueError, r"^block_table\[1, 0\] = 9 is out of range \[0, 6\)"),
    ("block_table_entry_negative", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, i32(0, 3, 8), 4, 5, block_table=i32(-1, 1, 0, 5).reshape(2, 2)),
     ValueError, r"^block_table\[0, 0\] = -1 is out of range"),
    ("block_table_too_short", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, i32(0, 3, 12), 4, 9, block_table=t.table), ValueError,
     r"^sequence 1 has 9 keys but its block_table row holds only 8"),
    ("block_table_shape", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, t.cu_k, 4, 5, block_table=t.table[:1]), ValueError,
     r"^block_table: expected shape \(batch=2, max_blocks_per_seq\), got \(1, 2\)"),
    ("block_table_strided_rows", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, t.cu_k, 4, 5, block_table=i32(*range(8)).reshape(2, 4)[:, ::2]),
     ValueError, r"^block_table: rows must be contiguous"),
    # ---- kv cache
    ("append_past_dense_cache", lambda t: fkv(t.q, t.kc, t.vc, t.knew, t.vnew, cache_seqlens=i32(2, 6)), ValueError,
     r"^cache_seqlens\[1\] = 6 plus 3 new tokens exceeds the cache length 8"),
    ("append_past_block_table", lambda t: fkv(t.q, t.pk, t.pv, t.knew, t.vnew, cache_seqlens=i32(0, 6), block_table=t.table),
     ValueError, r"^cache_seqlens\[1\] = 6 plus 3 new tokens exceeds the 8 slots of its block_table row"),
    ("append_block_out_of_range", lambda t: fkv(t.q, t.pk, t.pv, t.knew, t.vnew, cache_seqlens=i32(0, 3), block_table=i32(4, 1, 0, 6).reshape(2, 2)),
     ValueError, r"^block_table\[1, 1\] = 6 is out of range \[0, 6\)"),
    ("cache_seqlens_past_cache", lambda t: fkv(t.q, t.kc, t.vc, cache_seqlens=i32(2, 9)), ValueError,
     r"^cache_seqlens\[1\] = 9 exceeds the cache length 8"),
    ("cache_seqlens_past_block_table", lambda t: fkv(t.q, t.pk, t.pv, cache_seqlens=i32(9, 0), block_table=t.table), ValueError,
     r"^sequence 0 has 9 keys but its block_table row holds only 8"),
    ("cache_seqlens_negative", lambda t: fkv(t.q, t.kc, t.vc, cache_seqlens=i32(-1, 0)), ValueError,
     r"^cache_seqlens\[0\] = -1 is negative"),
    ("cache_seqlens_negative_append", lambda t: fkv(t.q, t.kc, t.vc, t.knew, t.vnew, cache_seqlens=i32(1, -1)), ValueError,
     r"^cache_seqlens\[1\] = -1"),
    ("cache_seqlens_shape", lambda t: fkv(t.q, t.kc, t.vc, cache_seqlens=i32(1, 2, 3)), ValueError,
     r"^cache_seqlens: expected shape \(2,\), got \(3,\)"),
    ("cache_batch_idx_range", lambda t: fkv(t.q, t.kc, t.vc, cache_seqlens=t.lens, cache_batch_idx=i32(0, 2)), ValueError,
     r"^cache_batch_idx\[1\] = 2 is out of range \[0, 2\)"),
    ("cache_batch_idx_range_append", lambda t: fkv(t.q, t.kc, t.vc, t.knew, t.vnew, cache_seqlens=t.lens, cache_batch_idx=i32(1, 2)),
     ValueError, r"^cache_batch_idx\[1\] = 2 is out of range \[0, 2\)"),
    ("cache_batch_idx_negative", lambda t: fkv(t.q, t.kc, t.vc, cache_batch_idx=i32(-1, 0)), ValueError,
     r"^cache_batch_idx\[0\] = -1 is out of range"),
    ("cache_batch_idx_with_paged", lambda t: fkv(t.q, t.pk, t.pv, cache_seqlens=t.lens, block_table=t.table, cache_batch_idx=i32(0, 1)),
     ValueError, r"^cache_batch_idx only applies to a dense \(non-paged\) cache"),
    ("cache_batch_idx_with_paged_append", lambda t: fkv(t.q, t.pk, t.pv, t.knew, t.vnew, cache_seqlens=t.lens, block_table=t.table,
                                                        cache_batch_idx=i32(0, 1)),
     ValueError, r"^cache_batch_idx only applies to a dense \(non-paged\) cache"),
    ("paged_without_seqlens", lambda t: fkv(t.q, t.pk, t.pv, block_table=t.table), ValueError, r"needs cache_seqlens"),
    ("append_without_seqlens", lambda t: fkv(t.q, t.kc, t.vc, t.knew, t.vnew), ValueError, r"needs cache_seqlens"),
    ("k_without_v", lambda t: fkv(t.q, t.kc, t.vc, t.knew, cache_seqlens=t.lens), ValueError, r"^k and v must be given together"),
    ("append_heads", lambda t: fkv(t.q, t.kc, t.vc, t.knew[:, :, :1], t.vnew[:, :, :1], cache_seqlens=t.lens), ValueError,
     r"^k: expected \(batch, seqlen_new, nheads_k, headdim\) with nheads_k=2 and headdim=16"),
    ("append_dtype", lambda t: fkv(t.q, t.kc, t.vc, t.knew.half(), t.vnew.half(), cache_seqlens=t.lens), TypeError,
     r"^k: expected dtype float32 \(same as k_cache\), got float16"),
    ("append_v_shape", lambda t: fkv(t.q, t.kc, t.vc, t.knew, t.vnew[:, :2], cache_seqlens=t.lens), ValueError,
     r"^v: expected the shape of k"),
    ("append_rank", lambda t: fkv(t.q, t.kc, t.vc, t.knew[0], t.vnew[0], cache_seqlens=t.lens), ValueError,
     r"^k: expected 4 dimensions"),
    ("append_v_cache_shape", lambda t: fkv(t.q, t.kc, t.vc[:, :7], t.knew, t.vnew, cache_seqlens=t.lens), ValueError,
     r"^v_cache: expected the shape of k_cache"),
    ("append_block_table_shape", lambda t: fkv(t.q, t.pk, t.pv, t.knew, t.vnew, cache_seqlens=t.lens, block_table=t.table[:1]),
     ValueError, r"^block_table: expected shape"),
    ("rotary", lambda t: fkv(t.q, t.kc, t.vc, rotary_cos=torch.ones(8, D // 2), rotary_sin=torch.ones(8, D // 2)),
     NotImplementedError, r"^rotary_cos/rotary_sin"),
    ("rotary_sin_only", lambda t: fkv(t.q, t.kc, t.vc, rotary_sin=torch.ones(8, D // 2)), NotImplementedError, r"rotary"),
    ("cache_leftpad", lambda t: fkv(t.q, t.kc, t.vc, cache_leftpad=i32(0, 0)), NotImplementedError, r"^cache_leftpad"),
    ("num_splits_negative", lambda t: fkv(t.q, t.kc, t.vc, num_splits=-1), ValueError, r"^num_splits: expected an int in \[0, "),
    # ---- reshape_and_cache
    ("slot_out_of_range", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk, t.pv, torch.tensor([0, 24, 2])), ValueError,
     r"^slot_mapping\[1\] = 24 is out of range: the cache has 24 slots \(6 blocks of 4\)"),
    ("slot_mapping_length", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk, t.pv, t.slots[:2]), ValueError,
     r"^slot_mapping: expected shape \(3,\), got \(2,\)"),
    ("slot_key_rank", lambda t: ops.reshape_and_cache(t.key[None], t.value[None], t.pk, t.pv, t.slots), ValueError,
     r"^key: expected 3 dimensions"),
    ("slot_cache_rank", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk[0], t.pv[0], t.slots), ValueError,
     r"^k_cache: expected 4 dimensions"),
    ("slot_key_heads", lambda t: ops.reshape_and_cache(t.key[:, :1], t.value[:, :1], t.pk, t.pv, t.slots), ValueError,
     r"^key: expected \(num_tokens, nheads_k, headdim\) with nheads_k=2"),
    ("slot_value_shape", lambda t: ops.reshape_and_cache(t.key, t.value[:2], t.pk, t.pv, t.slots), ValueError,
     r"^value: expected the shape of key"),
    ("slot_dtype", lambda t: ops.reshape_and_cache(t.key.half(), t.value.half(), t.pk, t.pv, t.slots), TypeError,
     r"^key: expected dtype float32 \(same as k_cache\), got float16"),
    ("slot_v_cache_shape", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk, t.pv[:5], t.slots), ValueError,
     r"^v_cache: expected the shape of k_cache"),
    ("slot_cache_list", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk.tolist(), t.pv, t.slots), TypeError,
     r"^k_cache: expected a tensor or array supporting DLPack"),
    ("slot_key_last_stride", lambda t: ops.reshape_and_cache(torch.zeros(3, HK, 2 * D)[..., ::2], t.value, t.pk, t.pv, t.slots),
     ValueError, r"^key: the last dimension must be contiguous"),
    # ---- raw kernel entry point
    ("C_out_shape", lambda t: _C.attention_forward(t.q, t.k, t.v, t.out[:, :2], options=opts()), ValueError,
     r"^out: expected the shape of q \(2, 3, 4, 16\), got \(2, 2, 4, 16\)"),
    ("C_out_rank", lambda t: _C.attention_forward(t.q, t.k, t.v, t.out[0], options=opts()), ValueError,
     r"^out: expected the shape of q"),
    ("C_out_dtype", lambda t: _C.attention_forward(t.q, t.k, t.v, t.out.half(), options=opts()), TypeError,
     r"^out: expected dtype float32 \(same as q\), got float16"),
    ("C_out_last_stride", lambda t: _C.attention_forward(t.q, t.k, t.v, torch.zeros(B, SQ, H, 2 * D)[..., ::2], options=opts()),
     ValueError, r"^out: the last dimension must be contiguous"),
    ("C_lse_shape", lambda t: _C.attention_forward(t.q, t.k, t.v, t.out, lse=t.lse.transpose(1, 2), options=opts()), ValueError,
     r"^softmax_lse: expected shape \(2, 4, 3\), got \(2, 3, 4\)"),
    ("C_lse_dtype", lambda t: _C.attention_forward(t.q, t.k, t.v, t.out, lse=t.lse.double(), options=opts()), TypeError,
     r"^softmax_lse: expected dtype float32, got float64"),
    ("C_lse_varlen_shape", lambda t: _C.attention_forward(t.qv, t.kv_, t.vv, torch.empty_like(t.qv), lse=t.lse,
                                                          cu_seqlens_q=t.cu_q, cu_seqlens_k=t.cu_k, options=opts()),
     ValueError, r"^softmax_lse: expected shape \(4, 6\)"),
    ("C_block_table_int64", lambda t: _C.attention_forward(t.q, t.pk, t.pv, t.out, seqlens_k=t.lens, block_table=t.table.long(),
                                                           options=opts()),
     TypeError, r"^block_table: expected dtype int32, got int64"),
    ("C_cu_seqlens_int64", lambda t: _C.attention_forward(t.qv, t.kv_, t.vv, torch.empty_like(t.qv), cu_seqlens_q=t.cu_q.long(),
                                                          cu_seqlens_k=t.cu_k, options=opts()),
     TypeError, r"^cu_seqlens_q: expected dtype int32, got int64"),
    ("C_seqlens_float", lambda t: _C.attention_forward(t.q, t.kc, t.vc, t.out, seqlens_k=t.lens.float(), options=opts()),
     TypeError, r"^cache_seqlens: expected dtype int32, got float32"),
    ("C_alibi_float64", lambda t: _C.attention_forward(t.q, t.k, t.v, t.out, alibi_slopes=torch.ones(H, dtype=torch.float64),
                                                       options=opts()),
     TypeError, r"^alibi_slopes: expected dtype float32, got float64"),
    ("C_slot_mapping_int32", lambda t: _C.reshape_and_cache(t.key, t.value, t.pk, t.pv, t.slots.int()), TypeError,
     r"^slot_mapping: expected dtype int64, got int32"),
    ("C_requires_grad", lambda t: _C.attention_forward(t.q.clone().requires_grad_(), t.k, t.v, t.out, options=opts()), TypeError,
     r"^q: could not export through DLPack"),
    ("C_q_list", lambda t: _C.attention_forward(t.q.tolist(), t.k, t.v, t.out, options=opts()), TypeError,
     r"^q: expected a tensor or array supporting DLPack"),
    ("C_out_none", lambda t: _C.attention_forward(t.q, t.k, t.v, None, options=opts()), TypeError,
     r"^out: expected a tensor or array supporting DLPack"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(t, call, exc, match):
    check_rejected(t, call, exc, match)


# ----------------------------------------------------------------------------- regressions

# Gaps this suite found in the first version of the Python layer (fixed in 065e1db).
REGRESSIONS = [
    # A non-DLPack q used to raise AttributeError ('list' object has no attribute 'shape').
    ("q_list", lambda t: fa(t.q.tolist(), t.k, t.v), TypeError, r"^q: expected a tensor or array supporting DLPack"),
    ("kvcache_q_list", lambda t: fkv(t.q.tolist(), t.kc, t.vc), TypeError, r"^q: expected a tensor or array"),
    ("varlen_q_list", lambda t: fv(t.qv.tolist(), t.kv_, t.vv, t.cu_q, t.cu_k, 4, 5), TypeError, r"^q: "),
    # Head dim 0 used to raise ZeroDivisionError from the default softmax_scale.
    ("headdim_0", lambda t: fa(*(torch.zeros(1, 2, 1, 0) for _ in range(3))), ValueError, r"^q: head dimension"),
    # Index inputs of a float dtype used to be truncated silently to integers.
    ("cu_seqlens_float", lambda t: fv(t.qv, t.kv_, t.vv, torch.tensor([0.0, 2.0, 6.0]), t.cu_k, 4, 5), TypeError,
     r"^cu_seqlens_q"),
    ("cu_seqlens_fractional_list", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, [0, 3.5, 8], 4, 5), TypeError, r"^cu_seqlens_k"),
    ("cu_seqlens_bool", lambda t: fv(t.qv, t.kv_, t.vv, t.cu_q, torch.tensor([False, True, True]), 4, 5), TypeError,
     r"^cu_seqlens_k"),
    ("block_table_float", lambda t: fkv(t.q, t.pk, t.pv, cache_seqlens=t.lens, block_table=t.table.float()), TypeError,
     r"^block_table"),
    ("block_table_float_varlen", lambda t: fv(t.qv, t.pk, t.pv, t.cu_q, t.cu_k, 4, 5, block_table=t.table.double()),
     TypeError, r"^block_table"),
    ("cache_seqlens_float", lambda t: fkv(t.q, t.kc, t.vc, cache_seqlens=t.lens.float()), TypeError, r"^cache_seqlens"),
    ("cache_batch_idx_float", lambda t: fkv(t.q, t.kc, t.vc, cache_batch_idx=torch.tensor([1.0, 0.0])), TypeError,
     r"^cache_batch_idx"),
    ("slot_mapping_float", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk, t.pv, t.slots.float()), TypeError,
     r"^slot_mapping"),
    ("slot_mapping_float_numpy", lambda t: ops.reshape_and_cache(t.key, t.value, t.pk, t.pv, t.slots.numpy().astype("f4")),
     TypeError, r"^slot_mapping"),
    # Errors about the cache used to name it 'k'/'v', which are other arguments (the new tokens).
    ("kvcache_cache_headdim", lambda t: fkv(t.q, t.kc[..., :8], t.vc[..., :8]), ValueError, r"^k_cache"),
    ("kvcache_cache_dtype", lambda t: fkv(t.q, t.kc.half(), t.vc.half()), TypeError, r"^k_cache"),
    ("kvcache_cache_list", lambda t: fkv(t.q, t.kc.tolist(), t.vc), TypeError, r"^k_cache"),
    ("kvcache_v_cache_shape", lambda t: fkv(t.q, t.kc, t.vc[:, :7]), ValueError, r"^v_cache"),
    # New tokens for a different number of sequences than q has.
    ("append_batch_mismatch", lambda t: fkv(t.q, t.kc, t.vc, t.knew[:1], t.vnew[:1], cache_seqlens=i32(2)), ValueError,
     r"^k: batch size 1 does not match q's 2"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in REGRESSIONS], ids=[c[0] for c in REGRESSIONS])
def test_bad_input_regressions(t, call, exc, match):
    before = snapshot(t)
    with pytest.raises(exc, match=match):
        call(t)
    assert_unchanged(t, before)


# A rejected flash_attn_with_kvcache call must not have appended anything: every argument,
# including the ones only the attention reads, is checked before the cache is written.
# (The first version appended first and validated the attention arguments afterwards.)
REJECTED_AFTER_APPEND = [
    ("alibi_shape", dict(alibi_slopes=torch.ones(H + 1)), ValueError, r"^alibi_slopes: expected shape"),
    ("window_invalid", dict(window_size=(-2, -1)), ValueError, r"^window_size"),
    ("window_not_pair", dict(window_size=(1,)), ValueError, r"^window_size"),
    ("softcap_negative", dict(softcap=-1.0), ValueError, r"^softcap"),
    ("scale_inf", dict(softmax_scale=float("inf")), ValueError, r"^softmax_scale"),
    ("num_splits_negative", dict(num_splits=-1), ValueError, r"^num_splits"),
    ("q_headdim", dict(q=lambda t: t.q[..., :8].contiguous()), ValueError, r"head dimension"),
    ("q_dtype", dict(q=lambda t: t.q.half()), TypeError, r"dtype float16"),
    ("q_nheads", dict(q=lambda t: t.q[:, :, :3].contiguous()), ValueError, r"number of query heads \(3\)"),
    ("q_last_stride", dict(q=lambda t: torch.zeros(B, SQ, H, 2 * D)[..., ::2]), ValueError, r"^q: the last dimension"),
]


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("bad,exc,match", [pytest.param(*c[1:], id=c[0]) for c in REJECTED_AFTER_APPEND] + [
    pytest.param(dict(q=lambda t: t.q[0]), ValueError, r"^q: expected 4 dimensions", id="q_rank"),
])
def test_rejected_kvcache_call_does_not_append(t, layout, bad, exc, match):
    bad = dict(bad)
    q = bad.pop("q")(t) if "q" in bad else t.q
    kc, vc, table = (t.kc, t.vc, None) if layout == "dense" else (t.pk, t.pv, t.table)
    before = snapshot(t)
    with pytest.raises(exc, match=match):
        fkv(q, kc, vc, t.knew, t.vnew, cache_seqlens=t.lens, block_table=table, **bad)
    assert_unchanged(t, before)


def test_C_attention_with_kvcache_validates_before_writing(t):
    # The raw binding behind flash_attn_with_kvcache: a bad lse shape is found before the append.
    before = snapshot(t)
    o = _C.AttentionOptions()
    o.softmax_scale = 0.25
    with pytest.raises(ValueError, match=r"^softmax_lse: expected shape"):
        _C.attention_with_kvcache(t.q, t.kc, t.vc, t.out, k=t.knew, v=t.vnew, lse=t.lse[:, :, :2],
                                  cache_seqlens=t.lens, options=o)
    assert_unchanged(t, before)


# ----------------------------------------------------------------------------- global settings


@pytest.mark.parametrize("name", ["sse9", "AVX2", "avx512bf16", " scalar"])
def test_unknown_isa(name):
    before = fastinfer.get_cpu_isa()
    with pytest.raises(ValueError, match=r"unknown CPU ISA .*expected one of auto, scalar, avx2, avx_vnni, avx512, avx512_bf16"):
        fastinfer.set_cpu_isa(name)
    assert fastinfer.get_cpu_isa() == before


def test_isa_not_a_string():
    with pytest.raises(TypeError):
        fastinfer.set_cpu_isa(2)


def test_inputs_accepted_after_errors(t):
    # A rejected call leaves no state behind: the next good call works.
    with pytest.raises(ValueError):
        fa(t.q, t.k, t.v, window_size=(-3, 0))
    out = fa(t.q, t.k, t.v)
    assert not torch.isnan(out).any()
