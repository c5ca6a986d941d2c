// The CUDA flash-attention forward kernel (FlashAttention-2 structure, mma.sync m16n8k16
// tensor-core instructions, sm_80 and later), instantiated per head dim in
// attention_fwd_hdim<D>.cu.
//
// Work decomposition. Rows of one (sequence b, kv head hk) are GQA-packed: row r is
// query position t = r / group of query head hk*group + r % group, so every key/value
// tile loaded into shared memory serves all query heads that read it (a decode step of
// a 32/8-head model has 4 rows per kv head, not 1). A block owns kBlockM = 16*kWarpsM
// rows ("m-block") and walks its key range in tiles of kBlockN keys through a
// kStages-deep cp.async pipeline. Warp (wm, wn) computes rows [16wm, 16wm+16) against
// keys [wn*kWarpN, (wn+1)*kWarpN) of every tile with its own online-softmax state;
// with kWarpsN > 1 (the decode configuration: one m-block of 16 rows, the warps split
// each tile) the warps' states are merged through shared memory at the end.
//
// Per tile, per warp:  S = Q K^T (ldmatrix from shared memory, fp32 accumulators),
// scores -> log2 units (scale, softcap, ALiBi, window/causal/length mask), running max
// and sum per row (4-lane quad reductions), P (fp16/bf16, straight from the S registers)
// times V (ldmatrix.trans) into fp32 O accumulators.
//
// Split-KV: with num_splits > 1 each block takes one contiguous share of its key range
// and writes a normalised partial O and its log-sum-exp (log2 units) to the workspace;
// combine_splits_kernel (attention_cuda.cu) merges them.
//
// Every loaded row is either real data or zeros (cp.async zero-fill), so padding rows and
// keys are finite; keys past the range are masked to -inf. Rows that see no key end with
// l = 0 and are written as zeros with lse = +inf; NaN or +inf scores (from non-finite inputs) give
// NaN rows with lse NaN, as softmax does (see the end of fwd_mblock).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/attention_fwd.h"
#include "cuda/cuda_utils.cuh"

namespace fastinfer::cuda::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D_, int kWarpsM_, int kWarpsN_, int kBlockN_, int kStages_, int kMinBlocks_>
struct FwdConfig {
  static constexpr int D = D_;
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kWarps = kWarpsM * kWarpsN, kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarpsM, kBlockN = kBlockN_;
  static constexpr int kWarpN = kBlockN / kWarpsN;  // keys of a tile per warp
  static constexpr int kStages = kStages_, kMinBlocks = kMinBlocks_;
  // Shared-memory rows: an XOR swizzle of the 16-byte chunks (row & 7) when a row is a
  // multiple of 128 bytes, else 16 bytes of padding (an odd number of chunks per row);
  // either way ldmatrix's 8 rows and cp.async's row segments hit 8 different bank groups.
  static constexpr bool kSwizzle = D % 64 == 0;
  static constexpr int kStride = kSwizzle ? D : D + 8;  // elements per shared-memory row
  static constexpr int kChunks = D / 8;                 // 16-byte chunks per row
  static constexpr int kQElems = kBlockM * kStride;
  static constexpr int kKVElems = kBlockN * kStride;  // one K (or V) tile of one stage
  static constexpr int kMergeRecord = D / 2 + 4;      // floats per lane: O fragments, m[2], l[2]
  static constexpr int kMergeBytes = (kWarpsN - 1) * kWarpsM * 32 * kMergeRecord * 4;
  static constexpr int kKVBytes = kStages * 2 * kKVElems * 2;
  static constexpr int kSmemBytes = kQElems * 2 + (kKVBytes > kMergeBytes ? kKVBytes : kMergeBytes);

  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  static_assert(kWarpN % 16 == 0, "each warp needs whole 16-key mma steps");
  static_assert(kStages >= 2, "the pipeline needs two stages");
};

template <class Cfg>
__device__ __forceinline__ int smem_off(int row, int chunk) {
  if constexpr (Cfg::kSwizzle) return row * Cfg::kStride + ((chunk ^ (row & 7)) << 3);
  else return row * Cfg::kStride + (chunk << 3);
}

// Shared-memory byte offsets of one lane's ldmatrix rows for 16-column step k (chunks 2k and
// 2k+1, this lane's half picked by `hi`). Swizzled: chunk (2k + hi) ^ (row & 7) with k = 4q + r is
// 8q + ((2r + hi) ^ (row & 7)), so four base registers plus immediates cover every k (the
// compiler would otherwise keep one register per (k, tile) pair live across the key loop).
// Rows may then move by multiples of 8 through immediates too: the swizzle depends on row & 7.
template <class Cfg>
struct FragAddr {
  static constexpr int kBases = Cfg::kSwizzle ? 4 : 1;
  uint32_t base[kBases];
  __device__ __forceinline__ FragAddr(int row, int hi) {
#pragma unroll
    for (int r = 0; r < kBases; ++r)
      base[r] = 2u * static_cast<uint32_t>(row * Cfg::kStride +
                                           ((Cfg::kSwizzle ? ((2 * r + hi) ^ (row & 7)) : hi) << 3));
  }
  __device__ __forceinline__ uint32_t operator()(int k) const {  // k: a compile-time constant after unrolling
    if constexpr (Cfg::kSwizzle) return base[k & 3] + 128u * static_cast<uint32_t>(k >> 2);
    else return base[0] + 32u * static_cast<uint32_t>(k);
  }
};

// 8 elements global -> shared. Aligned: cp.async, zero-filled when !valid. Otherwise
// (a view whose pointer or strides are not 16-byte multiples) plain 2-byte loads and one
// 16-byte shared store; the pipeline's barrier makes either visible before use.
__device__ __forceinline__ void copy_chunk(void* dst, const void* src, bool valid, bool aligned) {
  if (aligned) {
    cp_async_16(smem_addr(dst), src, valid);
  } else {
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (valid) {
      const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = uint32_t(s[2 * i]) | (uint32_t(s[2 * i + 1]) << 16);
    }
    *static_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Lengths and bases of sequence b, clamped so that no device value can index out of bounds.
struct SeqInfo {
  int sq, sk;
  int64_t q_base;   // global row of query 0: varlen cu_seqlens_q[b], dense b*seqlen_q
  int64_t k_base;   // varlen (non-paged) k: cu_seqlens_k[b]
  int64_t kv_bidx;  // dense k: cache batch entry
  bool kv_ok;       // dense k: kv_bidx in [0, kv_rows)
};

__device__ __forceinline__ SeqInfo seq_info(const FwdArgs& a, int b) {
  const AttentionParams& p = a.p;
  SeqInfo s;
  if (p.cu_seqlens_q) {
    const int64_t c0 = p.cu_seqlens_q[b], c1 = p.cu_seqlens_q[b + 1];
    s.q_base = c0;
    s.sq = static_cast<int>(min(max(c1 - c0, int64_t(0)), min(a.q_rows, int64_t(kMaxLen))));
  } else {
    s.q_base = int64_t(b) * p.seqlen_q;
    s.sq = p.seqlen_q;
  }
  int64_t klen;
  if (p.seqlens_k) klen = int64_t(p.seqlens_k[b]) + a.seqlens_k_add;
  else if (p.cu_seqlens_k) klen = int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
  else klen = p.seqlen_k;
  s.sk = static_cast<int>(min(max(klen, int64_t(0)), int64_t(a.k_capacity)));
  s.k_base = (p.cu_seqlens_k && !p.block_table) ? int64_t(p.cu_seqlens_k[b]) : 0;
  s.kv_bidx = p.kv_batch_idx ? int64_t(p.kv_batch_idx[b]) : int64_t(b);
  s.kv_ok = s.kv_bidx >= 0 && s.kv_bidx < a.kv_rows;
  return s;
}

// Key rows [n0, n0 + kBlockN) of (b, hk) into one stage; rows >= hi (or outside their tensor) become zeros.
template <class Cfg, class T>
__device__ __forceinline__ void load_kv_tile(const FwdArgs& a, const SeqInfo& si, int b, int hk, int n0, int hi,
                                             T* sK, T* sV) {
  const AttentionParams& p = a.p;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
#pragma unroll
  for (int i0 = 0; i0 < Cfg::kBlockN * Cfg::kChunks; i0 += Cfg::kThreads) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    if ((Cfg::kBlockN * Cfg::kChunks) % Cfg::kThreads != 0 && i >= Cfg::kBlockN * Cfg::kChunks) break;
    const int r = i / Cfg::kChunks, c = i % Cfg::kChunks, j = n0 + r;
    bool valid = j < hi;
    int64_t ko = 0, vo = 0;
    if (valid) {
      if (p.block_table) {
        const int bi = static_cast<int>(a.block_div.div(static_cast<uint32_t>(j)));
        const int jr = j - bi * p.block_size;
        const int64_t blk = p.block_table[int64_t(b) * p.block_table_stride + bi];
        valid = blk >= 0 && blk < a.kv_rows;
        ko = blk * p.k_batch_stride + int64_t(jr) * p.k_row_stride;
        vo = blk * p.v_batch_stride + int64_t(jr) * p.v_row_stride;
      } else if (p.cu_seqlens_k) {
        const int64_t row = si.k_base + j;
        valid = row >= 0 && row < a.kv_rows;
        ko = row * p.k_row_stride;
        vo = row * p.v_row_stride;
      } else {
        valid = si.kv_ok;
        ko = si.kv_bidx * p.k_batch_stride + int64_t(j) * p.k_row_stride;
        vo = si.kv_bidx * p.v_batch_stride + int64_t(j) * p.v_row_stride;
      }
      ko += int64_t(hk) * p.k_head_stride + c * 8;
      vo += int64_t(hk) * p.v_head_stride + c * 8;
    }
    copy_chunk(sK + smem_off<Cfg>(r, c), valid ? kbase + ko : kbase, valid, a.kv_aligned);
    copy_chunk(sV + smem_off<Cfg>(r, c), valid ? vbase + vo : vbase, valid, a.kv_aligned);
  }
}

// Global element offset of query/output row t of sequence b (head 0), or -1 when the row is out of bounds.
__device__ __forceinline__ int64_t q_row_offset(const FwdArgs& a, const SeqInfo& si, int b, int t, int64_t batch_stride,
                                                int64_t row_stride) {
  if (a.p.cu_seqlens_q) {
    const int64_t gr = si.q_base + t;
    return (gr >= 0 && gr < a.q_rows) ? gr * row_stride : -1;
  }
  return int64_t(b) * batch_stride + int64_t(t) * row_stride;
}

// One m-block: rows [row0, row0 + kBlockM) of (b, hk), keys of split `split`.
template <class Cfg, class T>
__device__ __forceinline__ void fwd_mblock(const FwdArgs& a, const SeqInfo& si, int b, int hk, int split, int row0,
                                           int rows, T* sQ, T* sKV) {
  constexpr int D = Cfg::D, BM = Cfg::kBlockM, BN = Cfg::kBlockN, kChunks = Cfg::kChunks;
  constexpr int NT = Cfg::kWarpN / 8;  // 8-key score tiles per warp
  constexpr int DT = D / 8;            // 8-column output tiles
  const AttentionParams& p = a.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % Cfg::kWarpsM, wn = warp / Cfg::kWarpsM;
  const int group = a.group;
  const int nrows = min(BM, rows - row0);
  const int off = si.sk - si.sq;  // query t sits at position t + off (bottom-right aligned)
  const int pmin = row0 / group + off, pmax = (row0 + nrows - 1) / group + off;

  // Keys any row of the block may see, then this split's share (whole tiles).
  int lo = 0, hi = si.sk;
  // (int64, once per block: no window can wrap it. Per key, the int32 tests below rely on the host's
  // bound: windows are normalised or at most kMaxLen, positions within +-kMaxLen.)
  if (a.window_left >= 0) lo = static_cast<int>(max(int64_t(0), int64_t(pmin) - a.window_left));
  if (a.window_right >= 0) hi = static_cast<int>(min(int64_t(si.sk), int64_t(pmax) + a.window_right + 1));
  hi = max(hi, lo);
  if (a.num_splits > 1) {
    const int per = (hi - lo + a.num_splits - 1) / a.num_splits;
    const int chunk = (per + BN - 1) / BN * BN;
    const int s_lo = min(hi, lo + split * chunk);
    hi = min(hi, s_lo + chunk);
    lo = s_lo;
  }
  const int ntiles = (hi - lo + BN - 1) / BN;

  // Q tile (zeros for rows past the end), then the first kStages-1 key/value tiles.
  {
    const T* qbase = static_cast<const T*>(p.q);
    for (int i = tid; i < BM * kChunks; i += Cfg::kThreads) {
      const int r = i / kChunks, c = i % kChunks, pr = row0 + r;
      bool valid = r < nrows;
      const T* src = qbase;
      if (valid) {
        const int t = pr / group, h = hk * group + (pr - t * group);
        const int64_t o = q_row_offset(a, si, b, t, p.q_batch_stride, p.q_row_stride);
        valid = o >= 0;
        if (valid) src = qbase + o + int64_t(h) * p.q_head_stride + c * 8;
      }
      copy_chunk(sQ + smem_off<Cfg>(r, c), src, valid, a.q_aligned);
    }
    cp_async_commit();
  }
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < ntiles) {
      T* st = sKV + s * 2 * Cfg::kKVElems;
      load_kv_tile<Cfg, T>(a, si, b, hk, lo + s * BN, hi, st, st + Cfg::kKVElems);
    }
    cp_async_commit();
  }

  // This thread's two rows: g and g + 8 of the warp's 16 (mma accumulator layout).
  const int g = lane >> 2, tq = lane & 3;
  const bool has_alibi = p.alibi_slopes != nullptr;
  const bool softcap = a.softcap_log2 != 0.f;
  int ipos[2];
  float slope[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int pr = row0 + wm * 16 + g + 8 * i;
    const int t = pr / group, h = hk * group + (pr - t * group);
    ipos[i] = t + off;
    slope[i] = has_alibi ? p.alibi_slopes[int64_t(b) * p.alibi_batch_stride + h] * kLog2e : 0.f;
  }
  const bool warp_active = row0 + wm * 16 < rows;

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  // ldmatrix rows/chunks of this lane: A (Q) and trans-B (V) share one pattern, B (K) another.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;
  const int k_row = (lane & 7) + ((lane >> 4) & 1) * 8, k_chunk = (lane >> 3) & 1;
  const FragAddr<Cfg> q_addr(wm * 16 + a_row, a_chunk), k_addr(wn * Cfg::kWarpN + k_row, k_chunk),
      v_addr(wn * Cfg::kWarpN + a_row, a_chunk);
  constexpr uint32_t kRow16 = 16u * Cfg::kStride * 2u;  // bytes of 16 shared-memory rows
  const uint32_t sQ_u = smem_addr(sQ), sKV_u = smem_addr(sKV);

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<Cfg::kStages - 2>();  // Q and tile `it` have landed (for this thread) ...
    __syncthreads();                    // ... for every thread; and stage (it-1) % kStages is free
    {
      const int nx = it + Cfg::kStages - 1;
      if (nx < ntiles) {
        T* st = sKV + (nx % Cfg::kStages) * 2 * Cfg::kKVElems;
        load_kv_tile<Cfg, T>(a, si, b, hk, lo + nx * BN, hi, st, st + Cfg::kKVElems);
      }
      cp_async_commit();
    }
    if (!warp_active) continue;
    const uint32_t sK_u = sKV_u + static_cast<uint32_t>((it % Cfg::kStages) * 2 * Cfg::kKVElems * 2);
    const uint32_t sV_u = sK_u + Cfg::kKVElems * 2;
    const int n0 = lo + it * BN;

    // S = Q K^T for this warp's keys.
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4];
      ldmatrix_x4(qa, sQ_u + q_addr(kk));
#pragma unroll
      for (int nn = 0; nn < NT / 2; ++nn) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sK_u + k_addr(kk) + nn * kRow16);
        mma_16816<T>(s[2 * nn], qa, kb[0], kb[1]);
        mma_16816<T>(s[2 * nn + 1], qa, kb[2], kb[3]);
      }
    }

    // Scores in log2 units; masking only where the tile crosses the range end or a window edge.
    const bool need_mask = n0 + BN > hi || (a.window_right >= 0 && n0 + BN - 1 > pmin + a.window_right) ||
                           (a.window_left >= 0 && n0 < pmax - a.window_left);
    const int jw = n0 + wn * Cfg::kWarpN + 2 * tq;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, j = jw + nt * 8 + (e & 1);
        float x = s[nt][e];
        x = softcap ? a.softcap_log2 * tanhf(x * a.score_scale) : x * a.score_scale;
        if (has_alibi) x -= slope[i] * static_cast<float>(abs(ipos[i] - j));
        if (need_mask) {
          const bool visible = j < hi && (a.window_left < 0 || j >= ipos[i] - a.window_left) &&
                               (a.window_right < 0 || j <= ipos[i] + a.window_right);
          if (!visible) x = -INFINITY;
        }
        s[nt][e] = x;
      }

    // Online softmax: row max over the quad (4 lanes hold one row), rescale, exponentiate.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
    float alpha[2], mu[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float mn = fmaxf(m[i], mx[i]);
      mu[i] = mn == -INFINITY ? 0.f : mn;  // a row with no key yet: exp2(-inf - 0) = 0, never NaN
      alpha[i] = fast_exp2(m[i] - mu[i]);
      m[i] = mn;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = fast_exp2(s[nt][e] - mu[e >> 1]);
        s[nt][e] = pe;
        rs[e >> 1] += pe;
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + rs[i];  // per-lane partial sums; quad-reduced at the end
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P V: the S accumulators of two 8-key tiles are the A fragment of one 16-key step.
#pragma unroll
    for (int kk = 0; kk < Cfg::kWarpN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sV_u + v_addr(dp) + kk * kRow16);
        mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
        mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }

  // Warps that split the keys of the same rows: merge into warp (wm, 0). All warps hold
  // the same fragment positions, so lane L's registers merge with lane L's registers.
  if constexpr (Cfg::kWarpsN > 1) {
    constexpr int R = Cfg::kMergeRecord;
    __syncthreads();  // every warp is done reading the key/value stages
    float* sm = reinterpret_cast<float*>(sKV);
    if (wn > 0) {
      float* rec = sm + (((wn - 1) * Cfg::kWarpsM + wm) * 32 + lane) * R;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) rec[dt * 4 + e] = o[dt][e];
      rec[D / 2 + 0] = m[0];
      rec[D / 2 + 1] = m[1];
      rec[D / 2 + 2] = l[0];
      rec[D / 2 + 3] = l[1];
    }
    __syncthreads();
    if (wn == 0) {
      for (int w = 1; w < Cfg::kWarpsN; ++w) {
        const float* rec = sm + (((w - 1) * Cfg::kWarpsM + wm) * 32 + lane) * R;
        float c0[2], c1[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float mo = rec[D / 2 + i], lo_w = rec[D / 2 + 2 + i];
          const float mn = fmaxf(m[i], mo);
          const float mu = mn == -INFINITY ? 0.f : mn;
          c0[i] = fast_exp2(m[i] - mu);
          c1[i] = fast_exp2(mo - mu);
          l[i] = l[i] * c0[i] + lo_w * c1[i];
          m[i] = mn;
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[dt][e] = o[dt][e] * c0[e >> 1] + rec[dt * 4 + e] * c1[e >> 1];
      }
    }
  }

  // Softmax semantics for non-finite scores (the CPU twin: store_tile / merge_splits): l is NaN when a
  // score was NaN or +inf (+inf - +inf), and 0 when no visible key scored above -inf. NaN l: a NaN row.
  // l == 0: zeros (lse +inf) when the row sees no key in [lo, hi) (flash-attn's fully masked row), NaN
  // when it does (softmax over -inf alone). A split partial records the latter as lse -FLT_MAX, so that
  // the combine can tell it from a split without visible keys (-inf).
  // inv: the output scale; lse2: what is stored, the natural-log lse (num_splits == 1) or the partial's
  // log2 lse.
  float inv[2], lse2[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int vis_lo = a.window_left >= 0 ? max(lo, ipos[i] - a.window_left) : lo;
    const int vis_hi = a.window_right >= 0 ? min(hi - 1, ipos[i] + a.window_right) : hi - 1;
    const bool sees = vis_lo <= vis_hi;
    const bool nan_row = a.num_splits == 1 && (l[i] != l[i] || (l[i] == 0.f && sees));
    inv[i] = nan_row ? nan_f() : l[i] > 0.f ? 1.f / l[i] : 0.f;
    const float lse_log2 = m[i] + log2f(l[i]);
    if (a.num_splits == 1) lse2[i] = nan_row ? nan_f() : l[i] > 0.f ? lse_log2 * kLn2 : INFINITY;
    else lse2[i] = l[i] != l[i] ? l[i] : l[i] > 0.f ? lse_log2 : sees ? -FLT_MAX : -INFINITY;
  }

  if (a.num_splits == 1) {
    // Output: through shared memory (the Q tile's space), then 16-byte row segments.
    __syncthreads();  // every warp is done with Q (and with the merge records)
    T* sO = sQ;
    if (wn == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = wm * 16 + g + 8 * i;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
          *reinterpret_cast<uint32_t*>(sO + smem_off<Cfg>(r, dt) + 2 * tq) =
              pack2<T>(o[dt][2 * i] * inv[i], o[dt][2 * i + 1] * inv[i]);
        const int pr = row0 + r;
        if (p.lse && tq == 0 && pr < rows) {
          const int t = pr / group, h = hk * group + (pr - t * group);
          const int64_t ro = q_row_offset(a, si, b, t, 0, 1);  // varlen: global row; dense: t
          if (ro >= 0)
            p.lse[int64_t(b) * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + ro * p.lse_row_stride] = lse2[i];
        }
      }
    }
    __syncthreads();
    T* obase = static_cast<T*>(p.out);
    for (int i = tid; i < nrows * kChunks; i += Cfg::kThreads) {
      const int r = i / kChunks, c = i % kChunks, pr = row0 + r;
      const int t = pr / group, h = hk * group + (pr - t * group);
      const int64_t ro = q_row_offset(a, si, b, t, p.o_batch_stride, p.o_row_stride);
      if (ro < 0) continue;
      T* dst = obase + ro + int64_t(h) * p.o_head_stride + c * 8;
      const T* src = sO + smem_off<Cfg>(r, c);
      if (a.o_aligned) {
        FI_CHECK_ALIGNED(dst, 16, "output store");
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = src[e];
      }
    }
  } else if (wn == 0) {
    // Split partials: normalised O and lse (log2), fp32, row (global q row, head).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int pr = row0 + wm * 16 + g + 8 * i;
      if (pr >= rows) continue;
      const int t = pr / group, h = hk * group + (pr - t * group);
      if (q_row_offset(a, si, b, t, 0, 1) < 0) continue;
      const int64_t rec = (int64_t(split) * a.ws_rows + si.q_base + t) * p.num_heads + h;
      float* dst = a.ws_o + rec * D;
      FI_CHECK_ALIGNED(dst, 8, "split partial store");
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<float2*>(dst + dt * 8 + 2 * tq) = make_float2(o[dt][2 * i] * inv[i], o[dt][2 * i + 1] * inv[i]);
      if (tq == 0) a.ws_lse[rec] = lse2[i];
    }
  }
}

// Varlen: rows of out outside every sequence ([0, cu[0]) and [cu[batch], q_rows)) get zeros and lse +inf,
// never uninitialised memory (the host cannot check cu_seqlens_q on the device without a sync).
template <class T>
__device__ void zero_rows_outside(const FwdArgs& a) {
  const AttentionParams& p = a.p;
  const int64_t q0 = min(max(int64_t(p.cu_seqlens_q[0]), int64_t(0)), a.q_rows);
  const int64_t q1 = min(max(int64_t(p.cu_seqlens_q[p.batch]), q0), a.q_rows);
  const int64_t n = (a.q_rows - (q1 - q0)) * p.num_heads;
  const T zero = from_float<T>(0.f);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t row = i / p.num_heads;
    const int h = static_cast<int>(i - row * p.num_heads);
    if (row >= q0) row += q1 - q0;
    T* dst = static_cast<T*>(p.out) + row * p.o_row_stride + int64_t(h) * p.o_head_stride;
    for (int e = 0; e < p.head_dim; ++e) dst[e] = zero;
    if (p.lse) p.lse[int64_t(h) * p.lse_head_stride + row * p.lse_row_stride] = INFINITY;
  }
}

template <class Cfg, class T>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) attention_fwd_kernel(const FwdArgs a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = sQ + Cfg::kQElems;
  // blockIdx.x = ((b * num_kv_heads + hk) * num_splits + split) * num_m_slots + slot: the
  // m-blocks of one (sequence, kv head) are neighbours, so they share its keys in L2.
  int idx = static_cast<int>(blockIdx.x);
  const int slot = idx % a.num_m_slots;
  idx /= a.num_m_slots;
  const int split = idx % a.num_splits;
  idx /= a.num_splits;
  const int hk = idx % a.p.num_kv_heads, b = idx / a.p.num_kv_heads;
  if (a.p.cu_seqlens_q && blockIdx.x == 0) zero_rows_outside<T>(a);
  const SeqInfo si = seq_info(a, b);
  const int rows = si.sq * a.group;
  const int nmb = (rows + Cfg::kBlockM - 1) / Cfg::kBlockM;
  // Last m-block first: under a causal mask it has the most keys.
  for (int mi = slot; mi < nmb; mi += a.num_m_slots) {
    __syncthreads();  // shared memory of the previous m-block is free
    fwd_mblock<Cfg, T>(a, si, b, hk, split, (nmb - 1 - mi) * Cfg::kBlockM, rows, sQ, sKV);
  }
}

template <class Cfg, class T>
FwdKernel make_fwd_kernel() {
  static_assert(Cfg::kMergeBytes <= Cfg::kKVBytes || Cfg::kWarpsN == 1, "merge records must fit the K/V stages");
  FwdKernel k;
  k.fn = reinterpret_cast<const void*>(&attention_fwd_kernel<Cfg, T>);
  k.threads = Cfg::kThreads;
  k.smem_bytes = Cfg::kSmemBytes;
  k.block_m = Cfg::kBlockM;
  k.block_n = Cfg::kBlockN;
  return k;
}

}  // namespace fastinfer::cuda::detail
