// CUDA attention backward kernels (FlashAttention-2 structure, mma.sync m16n8k16 with fp32
// accumulators; sm_80 and later). Included once, by attention_bwd.cu.
//
// dK/dV kernel: a block of 4 warps owns 64 keys of one (sequence, kv head); warp w owns keys
// [16w, 16w+16). For each tile of BM GQA-packed query rows that can see those keys:
//   S^T = K Q^T and dP^T = V dO^T                (A: K/V rows, B: Q/dO rows, from shared memory)
//   P^T = 2^(S'^T - lse2),  dS^T = P^T (dP^T - delta) * tanh'   (in registers, fp32)
//   dV += P^T dO,  dK += dS^T Q                  (A: P^T/dS^T straight from the accumulator
//                                                 registers as fp16/bf16, B: dO/Q columns)
// dQ kernel: a block of W warps owns 16W packed rows; warp w owns 16 of them. For each key tile:
//   S = Q K^T, dP = dO V^T, P, dS as above, dQ += dS K.
// Shared-memory rows are padded by 8 elements (16 bytes), so the fragment loads of 8 rows x
// 4 lanes spread over the banks. Fragment loads are plain 32-bit (or two 16-bit) shared loads,
// not ldmatrix: simpler, and the kernels have not been tuned on a GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/cuda_utils.cuh"
#include "fastinfer/attention_backward.h"

namespace fastinfer::cuda::detail {

constexpr float kBwdLog2e = 1.4426950408889634f;

// Passed by value to every backward kernel; pointers are device pointers.
struct BwdArgs {
  AttentionBackwardParams bp;
  int group;                      // num_heads / num_kv_heads
  int window_left, window_right;  // -1 = unbounded
  int64_t q_rows, kv_rows;        // varlen bounds: q.size(0), k.size(0)
  float* delta;                   // workspace: [q row (dense b*seqlen_q + t, varlen global row)][num_heads]
  int64_t delta_rows;
  bool aligned;                   // every tensor's base pointer and strides allow 16-byte vector accesses
};

struct BwdSeq {
  int sq, sk;
  int64_t q_base, k_base;  // first global row (varlen), b*seqlen_q (dense q) / 0 (dense k)
};

__device__ __forceinline__ BwdSeq bwd_seq(const BwdArgs& a, int b) {
  const AttentionParams& p = a.bp.fwd;
  BwdSeq s;
  if (p.cu_seqlens_q) {
    const int64_t c0 = p.cu_seqlens_q[b], c1 = p.cu_seqlens_q[b + 1];
    s.q_base = c0;
    s.sq = static_cast<int>(min(max(c1 - c0, int64_t(0)), a.q_rows));
  } else {
    s.q_base = int64_t(b) * p.seqlen_q;
    s.sq = p.seqlen_q;
  }
  if (p.cu_seqlens_k) {
    const int64_t c0 = p.cu_seqlens_k[b], c1 = p.cu_seqlens_k[b + 1];
    s.k_base = c0;
    s.sk = static_cast<int>(min(max(c1 - c0, int64_t(0)), a.kv_rows));
  } else {
    s.k_base = 0;
    s.sk = p.seqlen_k;
  }
  return s;
}

// Element offset (head 0) of query-layout row t of sequence b, or -1 outside the tensor (varlen).
__device__ __forceinline__ int64_t bwd_q_off(const BwdArgs& a, const BwdSeq& s, int b, int t, int64_t bstride,
                                             int64_t rstride) {
  if (a.bp.fwd.cu_seqlens_q) {
    const int64_t gr = s.q_base + t;
    return gr >= 0 && gr < a.q_rows ? gr * rstride : -1;
  }
  return int64_t(b) * bstride + int64_t(t) * rstride;
}
__device__ __forceinline__ int64_t bwd_k_off(const BwdArgs& a, const BwdSeq& s, int b, int j, int64_t bstride,
                                             int64_t rstride) {
  if (a.bp.fwd.cu_seqlens_k) {
    const int64_t gr = s.k_base + j;
    return gr >= 0 && gr < a.kv_rows ? gr * rstride : -1;
  }
  return int64_t(b) * bstride + int64_t(j) * rstride;
}

// Rows [0, nrows) of a tile in shared memory (row stride D + 8); row_ptr(r) gives the global row or null (zeros).
template <int D, class T, class RowPtr>
__device__ __forceinline__ void bwd_load_tile(T* dst, int nrows, bool aligned, RowPtr row_ptr) {
  constexpr int S = D + 8, C = D / 8;
  for (int i = static_cast<int>(threadIdx.x); i < nrows * C; i += static_cast<int>(blockDim.x)) {
    const int r = i / C, ch = i - (i / C) * C;
    const T* src = row_ptr(r);
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (src) {
      if (aligned) {
        w = *reinterpret_cast<const uint4*>(src + ch * 8);
      } else {
        const uint16_t* h = reinterpret_cast<const uint16_t*>(src + ch * 8);
        w = make_uint4(h[0] | uint32_t(h[1]) << 16, h[2] | uint32_t(h[3]) << 16, h[4] | uint32_t(h[5]) << 16,
                       h[6] | uint32_t(h[7]) << 16);
      }
    }
    *reinterpret_cast<uint4*>(dst + r * S + ch * 8) = w;
  }
}

// mma fragments from a row-major shared tile X (row stride S), g = lane / 4, c = lane % 4.
// A (16x16) = X[m0.., k0..]
template <int S, class T>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const T* X, int m0, int k0, int g, int c) {
  const T* p0 = X + (m0 + g) * S + k0 + 2 * c;
  const T* p1 = p0 + 8 * S;
  a[0] = *reinterpret_cast<const uint32_t*>(p0);
  a[1] = *reinterpret_cast<const uint32_t*>(p1);
  a[2] = *reinterpret_cast<const uint32_t*>(p0 + 8);
  a[3] = *reinterpret_cast<const uint32_t*>(p1 + 8);
}
// B (16x8) with B(k, n) = X[n0 + n][k0 + k] (X rows are the n index).
template <int S, class T>
__device__ __forceinline__ void frag_b_rows(uint32_t& b0, uint32_t& b1, const T* X, int n0, int k0, int g, int c) {
  const T* p = X + (n0 + g) * S + k0 + 2 * c;
  b0 = *reinterpret_cast<const uint32_t*>(p);
  b1 = *reinterpret_cast<const uint32_t*>(p + 8);
}
// B (16x8) with B(k, n) = X[k0 + k][n0 + n] (X rows are the k index).
template <int S, class T>
__device__ __forceinline__ void frag_b_cols(uint32_t& b0, uint32_t& b1, const T* X, int k0, int n0, int g, int c) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(X + (k0 + 2 * c) * S + n0 + g);
  b0 = uint32_t(p[0]) | uint32_t(p[S]) << 16;
  b1 = uint32_t(p[8 * S]) | uint32_t(p[9 * S]) << 16;
}

// Both products of one tile pass: s = A1 B1 and dp = A2 B2 (16 rows of this warp x NT n-tiles of 8, over
// KT k-steps of 16), with A from rows m0.. of a row-major tile and B(k, n) = rows n of the other tile.
template <int S, int NT, int KT, class T>
__device__ __forceinline__ void two_products(float (&s)[NT][4], float (&dp)[NT][4], const T* A1, const T* B1,
                                             const T* A2, const T* B2, int m0, int g, int c) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    uint32_t a1[4], a2[4];
    frag_a<S>(a1, A1, m0, kt * 16, g, c);
    frag_a<S>(a2, A2, m0, kt * 16, g, c);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0, b1;
      frag_b_rows<S>(b0, b1, B1, nt * 8, kt * 16, g, c);
      mma_16816<T>(s[nt], a1, b0, b1);
      frag_b_rows<S>(b0, b1, B2, nt * 8, kt * 16, g, c);
      mma_16816<T>(dp[nt], a2, b0, b1);
    }
  }
}

// Probability and score gradient of one (row, key) pair from the raw dot products.
struct RowInfo {
  float lse2, delta, slope;
  int ipos;  // query position in key coordinates (t + sk - sq)
};
__device__ __forceinline__ void prob_and_dscore(const BwdArgs& a, const RowInfo& r, int j, int sk, float s, float dp,
                                                float& p_out, float& ds_out) {
  const AttentionParams& p = a.bp.fwd;
  const bool visible = j < sk && (a.window_left < 0 || j >= r.ipos - a.window_left) &&
                       (a.window_right < 0 || j <= r.ipos + a.window_right);
  float x = s * p.softmax_scale, dcap = 1.f;
  if (p.softcap > 0.f) {
    const float th = tanhf(x / p.softcap);
    x = p.softcap * th;
    dcap = 1.f - th * th;
  }
  if (p.alibi_slopes) x -= r.slope * fabsf(static_cast<float>(r.ipos - j));
  const float pr = visible ? fast_exp2(x * kBwdLog2e - r.lse2) : 0.f;
  p_out = pr;
  ds_out = pr * (dp - r.delta) * dcap;
}

// Row info of packed rows [r0, r0 + n) into shared arrays (n..BM: lse2 = +inf, nothing else used).
template <int BM>
__device__ __forceinline__ void bwd_load_row_info(const BwdArgs& a, const BwdSeq& si, int b, int hk, int r0, int n,
                                                  float* sL, float* sD, float* sSl, int* sPos) {
  const AttentionParams& p = a.bp.fwd;
  for (int i = static_cast<int>(threadIdx.x); i < BM; i += static_cast<int>(blockDim.x)) {
    float l2 = INFINITY, d = 0.f, sl = 0.f;
    int pos = 0;
    if (i < n) {
      const int r = r0 + i, t = r / a.group, h = hk * a.group + (r - t * a.group);
      pos = t + si.sk - si.sq;
      if (bwd_q_off(a, si, b, t, 0, 1) >= 0) {
        const int64_t row = p.cu_seqlens_q ? si.q_base + t : t;
        l2 = p.lse[int64_t(b) * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + row * p.lse_row_stride] * kBwdLog2e;
        d = a.delta[(si.q_base + t) * p.num_heads + h];
        if (p.alibi_slopes) sl = p.alibi_slopes[int64_t(b) * p.alibi_batch_stride + h];
      }
    }
    sL[i] = l2;
    sD[i] = d;
    sSl[i] = sl;
    sPos[i] = pos;
  }
}

// Shared memory of both tile kernels: Q, dO (BM rows each), K, V (BN rows each) of 16-bit elements at row
// stride S, then per query row the log2 LSE, delta, ALiBi slope and key-coordinate position.
constexpr int bwd_smem_bytes(int S, int BM, int BN) { return (2 * BM + 2 * BN) * S * 2 + 4 * BM * 4; }
template <int S, int BM, int BN, class T>
struct BwdSmem {
  static_assert(sizeof(T) == 2, "fp16/bf16 tiles");
  T *q, *g, *k, *v;
  float *lse2, *delta, *slope;
  int* pos;
  __device__ explicit BwdSmem(unsigned char* raw)
      : q(reinterpret_cast<T*>(raw)), g(q + BM * S), k(g + BM * S), v(k + BN * S),
        lse2(reinterpret_cast<float*>(v + BN * S)), delta(lse2 + BM), slope(delta + BM),
        pos(reinterpret_cast<int*>(slope + BM)) {}
};

// Q and dO rows r0 .. r0 + n of kv head hk (row r = query t * group + head offset) into sQ / sG, and their
// LSE, delta, ALiBi slope and position; rows past n and rows outside the sequence load as zeros.
template <int D, int BM, class T>
__device__ __forceinline__ void bwd_load_q_rows(T* sQ, T* sG, const BwdArgs& a, const BwdSeq& si, int b, int hk,
                                                int r0, int n, float* sL, float* sD, float* sSl, int* sPos) {
  const AttentionParams& p = a.bp.fwd;
  const int group = a.group;
  const T* qbase = static_cast<const T*>(p.q);
  const T* gbase = static_cast<const T*>(a.bp.dout);
  bwd_load_tile<D, T>(sQ, BM, a.aligned, [&](int i) -> const T* {
    if (i >= n) return nullptr;
    const int r = r0 + i, t = r / group, h = hk * group + (r - t * group);
    const int64_t o = bwd_q_off(a, si, b, t, p.q_batch_stride, p.q_row_stride);
    return o >= 0 ? qbase + o + int64_t(h) * p.q_head_stride : nullptr;
  });
  bwd_load_tile<D, T>(sG, BM, a.aligned, [&](int i) -> const T* {
    if (i >= n) return nullptr;
    const int r = r0 + i, t = r / group, h = hk * group + (r - t * group);
    const int64_t o = bwd_q_off(a, si, b, t, a.bp.do_batch_stride, a.bp.do_row_stride);
    return o >= 0 ? gbase + o + int64_t(h) * a.bp.do_head_stride : nullptr;
  });
  bwd_load_row_info<BM>(a, si, b, hk, r0, n, sL, sD, sSl, sPos);
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Two values of output columns (col, col + 1) of a gradient row.
template <class T>
__device__ __forceinline__ void store2(T* dst, float x, float y, bool aligned) {
  if (aligned) {
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x, y);
  } else {
    dst[0] = from_float<T>(x);
    dst[1] = from_float<T>(y);
  }
}

// ---------------------------------------------------------------- delta = rowsum(dO * O)
template <class T>
__global__ void attention_bwd_delta_kernel(const BwdArgs a) {
  const AttentionParams& p = a.bp.fwd;
  const int64_t n = a.delta_rows * p.num_heads;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.num_heads;
    const int h = static_cast<int>(i - row * p.num_heads);
    int64_t oo, go;
    if (p.cu_seqlens_q) {
      oo = row * p.o_row_stride;
      go = row * a.bp.do_row_stride;
    } else {
      const int64_t b = row / p.seqlen_q, t = row - b * p.seqlen_q;
      oo = b * p.o_batch_stride + t * p.o_row_stride;
      go = b * a.bp.do_batch_stride + t * a.bp.do_row_stride;
    }
    const T* o = static_cast<const T*>(p.out) + oo + int64_t(h) * p.o_head_stride;
    const T* g = static_cast<const T*>(a.bp.dout) + go + int64_t(h) * a.bp.do_head_stride;
    float acc = 0.f;
    for (int d = 0; d < p.head_dim; ++d) acc += to_float(o[d]) * to_float(g[d]);
    a.delta[i] = acc;
  }
}

// ---------------------------------------------------------------- dK, dV
template <int D, int BM>
struct DkdvConfig {
  static constexpr int S = D + 8, BN = 64, kThreads = 128;
  static constexpr int kSmemBytes = bwd_smem_bytes(S, BM, BN);
  static_assert(D % 16 == 0 && BM % 16 == 0, "16-element mma steps");
};

template <int D, int BM, class T>
__global__ void __launch_bounds__(128) attention_bwd_dkdv_kernel(const BwdArgs a) {
  using Cfg = DkdvConfig<D, BM>;
  constexpr int S = Cfg::S, BN = Cfg::BN, KT = D / 16, DT = D / 8, NT = BM / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const BwdSmem<S, BM, BN, T> sm(smem_raw);
  T *sQ = sm.q, *sG = sm.g, *sK = sm.k, *sV = sm.v;  // sG: dO
  float *sL = sm.lse2, *sD = sm.delta, *sSl = sm.slope;
  int* sPos = sm.pos;

  const AttentionParams& p = a.bp.fwd;
  const int kb = static_cast<int>(blockIdx.x), hk = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const BwdSeq si = bwd_seq(a, b);
  const int n0 = kb * BN;
  if (n0 >= si.sk) return;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int group = a.group, shift = si.sk - si.sq, nk = min(BN, si.sk - n0);

  const T* kbase = static_cast<const T*>(p.k) + int64_t(hk) * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + int64_t(hk) * p.v_head_stride;
  bwd_load_tile<D, T>(sK, BN, a.aligned, [&](int r) -> const T* {
    const int64_t o = r < nk ? bwd_k_off(a, si, b, n0 + r, p.k_batch_stride, p.k_row_stride) : -1;
    return o >= 0 ? kbase + o : nullptr;
  });
  bwd_load_tile<D, T>(sV, BN, a.aligned, [&](int r) -> const T* {
    const int64_t o = r < nk ? bwd_k_off(a, si, b, n0 + r, p.v_batch_stride, p.v_row_stride) : -1;
    return o >= 0 ? vbase + o : nullptr;
  });

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  // Query positions that see a key of [n0, n0 + nk): i' in [n0 - right, n0 + nk - 1 + left]
  // (int64, once per block: no window can wrap it, normalised by the host or not).
  const int64_t wl = a.window_left, wr = a.window_right;
  const int t_lo = static_cast<int>(max(int64_t(0), wr >= 0 ? n0 - wr - shift : int64_t(0)));
  const int t_hi = static_cast<int>(min(int64_t(si.sq - 1), wl >= 0 ? n0 + nk - 1 + wl - shift : int64_t(si.sq - 1)));
  const int r_beg = t_lo * group, r_end = t_hi >= t_lo ? (t_hi + 1) * group : r_beg;
  for (int r0 = r_beg; r0 < r_end; r0 += BM) {
    const int nr = min(BM, r_end - r0);
    __syncthreads();  // the previous row tile is no longer read
    bwd_load_q_rows<D, BM, T>(sQ, sG, a, si, b, hk, r0, nr, sL, sD, sSl, sPos);
    __syncthreads();

    float s[NT][4], dp[NT][4];
    two_products<S, NT, KT, T>(s, dp, sK, sQ, sV, sG, warp * 16, g, c);  // S^T = K Q^T, dP^T = V dO^T
    // s[nt][e] is (key n0 + 16 warp + g + 8 (e / 2), row r0 + 8 nt + 2c + e % 2).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ri = nt * 8 + 2 * c + (e & 1);
        const RowInfo info{sL[ri], sD[ri], sSl[ri], sPos[ri]};
        prob_and_dscore(a, info, n0 + warp * 16 + g + 8 * (e >> 1), si.sk, s[nt][e], dp[nt][e], s[nt][e], dp[nt][e]);
      }
    // dV += P^T dO and dK += dS^T Q; the accumulators of n-tiles 2t, 2t+1 are the A fragment of k-step t.
#pragma unroll
    for (int t = 0; t < BM / 16; ++t) {
      const uint32_t ap[4] = {pack2<T>(s[2 * t][0], s[2 * t][1]), pack2<T>(s[2 * t][2], s[2 * t][3]),
                              pack2<T>(s[2 * t + 1][0], s[2 * t + 1][1]), pack2<T>(s[2 * t + 1][2], s[2 * t + 1][3])};
      const uint32_t as[4] = {pack2<T>(dp[2 * t][0], dp[2 * t][1]), pack2<T>(dp[2 * t][2], dp[2 * t][3]),
                              pack2<T>(dp[2 * t + 1][0], dp[2 * t + 1][1]), pack2<T>(dp[2 * t + 1][2], dp[2 * t + 1][3])};
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        uint32_t b0, b1;
        frag_b_cols<S>(b0, b1, sG, t * 16, dt * 8, g, c);
        mma_16816<T>(dv[dt], ap, b0, b1);
        frag_b_cols<S>(b0, b1, sQ, t * 16, dt * 8, g, c);
        mma_16816<T>(dk[dt], as, b0, b1);
      }
    }
  }

  // dk[dt][e] is (key n0 + 16 warp + g + 8 (e / 2), column 8 dt + 2c + e % 2).
  T* dkb = static_cast<T*>(a.bp.dk) + int64_t(hk) * a.bp.dk_head_stride;
  T* dvb = static_cast<T*>(a.bp.dv) + int64_t(hk) * a.bp.dv_head_stride;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int jj = warp * 16 + g + 8 * i;
    if (jj >= nk) continue;
    const int64_t ko = bwd_k_off(a, si, b, n0 + jj, a.bp.dk_batch_stride, a.bp.dk_row_stride);
    const int64_t vo = bwd_k_off(a, si, b, n0 + jj, a.bp.dv_batch_stride, a.bp.dv_row_stride);
    if (ko < 0 || vo < 0) continue;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      store2<T>(dkb + ko + dt * 8 + 2 * c, dk[dt][2 * i] * p.softmax_scale, dk[dt][2 * i + 1] * p.softmax_scale, a.aligned);
      store2<T>(dvb + vo + dt * 8 + 2 * c, dv[dt][2 * i], dv[dt][2 * i + 1], a.aligned);
    }
  }
}

// ---------------------------------------------------------------- dQ
template <int D, int W, int BN>
struct DqConfig {
  static constexpr int S = D + 8, BM = 16 * W, kThreads = 32 * W;
  static constexpr int kSmemBytes = bwd_smem_bytes(S, BM, BN);
  static_assert(D % 16 == 0 && BN % 16 == 0, "16-element mma steps");
};

template <int D, int W, int BN, class T>
__global__ void __launch_bounds__(32 * W) attention_bwd_dq_kernel(const BwdArgs a) {
  using Cfg = DqConfig<D, W, BN>;
  constexpr int S = Cfg::S, BM = Cfg::BM, KT = D / 16, DT = D / 8, NT = BN / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const BwdSmem<S, BM, BN, T> sm(smem_raw);
  T *sQ = sm.q, *sG = sm.g, *sK = sm.k, *sV = sm.v;  // sG: dO
  float *sL = sm.lse2, *sD = sm.delta, *sSl = sm.slope;
  int* sPos = sm.pos;

  const AttentionParams& p = a.bp.fwd;
  const int mb = static_cast<int>(blockIdx.x), hk = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
  const BwdSeq si = bwd_seq(a, b);
  const int group = a.group, rows = si.sq * group, r0 = mb * BM;
  if (r0 >= rows) return;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int nr = min(BM, rows - r0), shift = si.sk - si.sq;

  bwd_load_q_rows<D, BM, T>(sQ, sG, a, si, b, hk, r0, nr, sL, sD, sSl, sPos);
  __syncthreads();
  RowInfo info[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int ri = warp * 16 + g + 8 * i;
    info[i] = RowInfo{sL[ri], sD[ri], sSl[ri], sPos[ri]};
  }

  float dq[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;

  const int ia = r0 / group + shift, ib = (r0 + nr - 1) / group + shift;
  // Keys any row of the block sees (int64, once per block: no window can wrap it).
  const int lo = a.window_left >= 0 ? static_cast<int>(max(int64_t(0), int64_t(ia) - a.window_left)) : 0;
  const int hi = a.window_right >= 0 ? static_cast<int>(min(int64_t(si.sk), int64_t(ib) + a.window_right + 1)) : si.sk;
  const T* kbase = static_cast<const T*>(p.k) + int64_t(hk) * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + int64_t(hk) * p.v_head_stride;
  for (int n0 = lo; n0 < hi; n0 += BN) {
    const int nk = min(BN, hi - n0);
    __syncthreads();  // the previous key tile is no longer read
    bwd_load_tile<D, T>(sK, BN, a.aligned, [&](int r) -> const T* {
      const int64_t o = r < nk ? bwd_k_off(a, si, b, n0 + r, p.k_batch_stride, p.k_row_stride) : -1;
      return o >= 0 ? kbase + o : nullptr;
    });
    bwd_load_tile<D, T>(sV, BN, a.aligned, [&](int r) -> const T* {
      const int64_t o = r < nk ? bwd_k_off(a, si, b, n0 + r, p.v_batch_stride, p.v_row_stride) : -1;
      return o >= 0 ? vbase + o : nullptr;
    });
    __syncthreads();

    float s[NT][4], dp[NT][4];
    two_products<S, NT, KT, T>(s, dp, sQ, sK, sG, sV, warp * 16, g, c);  // S = Q K^T, dP = dO V^T
    // s[nt][e] is (row r0 + 16 warp + g + 8 (e / 2), key n0 + 8 nt + 2c + e % 2); keys >= n0 + nk are masked
    // (j < hi <= sk, and the window test).
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + nt * 8 + 2 * c + (e & 1);
        prob_and_dscore(a, info[e >> 1], j, hi, s[nt][e], dp[nt][e], s[nt][e], dp[nt][e]);
      }
#pragma unroll
    for (int t = 0; t < BN / 16; ++t) {
      const uint32_t as[4] = {pack2<T>(dp[2 * t][0], dp[2 * t][1]), pack2<T>(dp[2 * t][2], dp[2 * t][3]),
                              pack2<T>(dp[2 * t + 1][0], dp[2 * t + 1][1]), pack2<T>(dp[2 * t + 1][2], dp[2 * t + 1][3])};
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        uint32_t b0, b1;
        frag_b_cols<S>(b0, b1, sK, t * 16, dt * 8, g, c);
        mma_16816<T>(dq[dt], as, b0, b1);
      }
    }
  }

  T* dqb = static_cast<T*>(a.bp.dq);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int ri = warp * 16 + g + 8 * i;
    if (ri >= nr) continue;
    const int r = r0 + ri, t = r / group, h = hk * group + (r - t * group);
    const int64_t o = bwd_q_off(a, si, b, t, a.bp.dq_batch_stride, a.bp.dq_row_stride);
    if (o < 0) continue;
    T* dst = dqb + o + int64_t(h) * a.bp.dq_head_stride;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      store2<T>(dst + dt * 8 + 2 * c, dq[dt][2 * i] * p.softmax_scale, dq[dt][2 * i + 1] * p.softmax_scale, a.aligned);
  }
}

// ---------------------------------------------------------------- varlen: rows outside every sequence
template <class T>
__global__ void attention_bwd_zero_outside_kernel(const BwdArgs a) {
  const AttentionParams& p = a.bp.fwd;
  const int D = p.head_dim;
  const int64_t q0 = min(max(int64_t(p.cu_seqlens_q[0]), int64_t(0)), a.q_rows);
  const int64_t q1 = min(max(int64_t(p.cu_seqlens_q[p.batch]), q0), a.q_rows);
  const int64_t k0 = min(max(int64_t(p.cu_seqlens_k[0]), int64_t(0)), a.kv_rows);
  const int64_t k1 = min(max(int64_t(p.cu_seqlens_k[p.batch]), k0), a.kv_rows);
  const int64_t nq = (a.q_rows - (q1 - q0)) * p.num_heads, nk = (a.kv_rows - (k1 - k0)) * p.num_kv_heads;
  const T zero = from_float<T>(0.f);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nq + nk; i += int64_t(gridDim.x) * blockDim.x) {
    if (i < nq) {
      int64_t row = i / p.num_heads;
      const int h = static_cast<int>(i - row * p.num_heads);
      if (row >= q0) row += q1 - q0;
      T* d = static_cast<T*>(a.bp.dq) + row * a.bp.dq_row_stride + int64_t(h) * a.bp.dq_head_stride;
      for (int e = 0; e < D; ++e) d[e] = zero;
    } else {
      int64_t row = (i - nq) / p.num_kv_heads;
      const int h = static_cast<int>((i - nq) - row * p.num_kv_heads);
      if (row >= k0) row += k1 - k0;
      T* dk = static_cast<T*>(a.bp.dk) + row * a.bp.dk_row_stride + int64_t(h) * a.bp.dk_head_stride;
      T* dv = static_cast<T*>(a.bp.dv) + row * a.bp.dv_row_stride + int64_t(h) * a.bp.dv_head_stride;
      for (int e = 0; e < D; ++e) dk[e] = dv[e] = zero;
    }
  }
}

}  // namespace fastinfer::cuda::detail
