// Tile kernels of the CPU attention backward, compiled once per SIMD level (each
// attention_backward_<isa>.cpp defines FI_ISA_NS). Every matmul runs in float32 on
// tiles converted from the input dtype; see attention_backward.h for the two passes.
//
// Layouts (R = 16 or 32 query rows, N = up to 64 keys, Dp = head_dim padded to 16):
//   S^T[j][r]  = K[j] . Q[r]     and   dP^T[j][r] = V[j] . dO[r]   rows in vector lanes (qk_f32)
//   P^T[j][r]  = 2^(S'[j][r] - lse2[r]),   dS^T[j][r] = P^T[j][r] (dP^T[j][r] - delta[r]) (tanh' for softcap)
//   dV[j] += sum_r P^T[j][r] dO[r],  dK[j] += sum_r dS^T[j][r] Q[r],  dQ[r] += sum_j dS^T[j][r] K[j]
// The last three are rank-1 updates with head_dim in the vector lanes (outer_acc).
#pragma once
#include <algorithm>
#include <limits>

#include "cpu/attention_backward.h"
#include "cpu/tile_common.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

inline int pad16(int d) { return (d + 15) & ~15; }

// Views of one worker's scratch (BwdScratchLayout).
struct BwdBuffers {
  float *qt, *dot, *q, *dout, *dq, *k, *v, *dk, *dv, *s, *dp, *lse2, *delta, *pos, *slope;
  explicit BwdBuffers(float* base) {
    using L = BwdScratchLayout;
    qt = base;
    dot = qt + L::kRowT;
    q = dot + L::kRowT;
    dout = q + L::kRow;
    dq = dout + L::kRow;
    k = dq + L::kRow;
    v = k + L::kKey;
    dk = v + L::kKey;
    dv = dk + L::kKey;
    s = dv + L::kKey;
    dp = s + L::kScore;
    lse2 = dp + L::kScore;
    delta = lse2 + kBwdRows;
    pos = delta + kBwdRows;
    slope = pos + kBwdRows;
  }
};

// C[x][0:Dp) += sum_y A(x, y) * B[y][0:Dp), A(x, y) = a[x*sx + y*sy]; XB rows of C, DV vectors of head dims.
template <int XB, int DV>
inline void outer_block(float* c, int ldc, const float* a, int sx, int sy, int Y, const float* b, int ldb) {
  VecF acc[XB][DV];
  for (int xx = 0; xx < XB; ++xx)
    for (int dv = 0; dv < DV; ++dv) acc[xx][dv] = vload(c + xx * ldc + dv * kLanes);
  for (int y = 0; y < Y; ++y) {
    VecF bv[DV];
    for (int dv = 0; dv < DV; ++dv) bv[dv] = vload(b + y * ldb + dv * kLanes);
    for (int xx = 0; xx < XB; ++xx) {
      const VecF av = vset1(a[xx * sx + y * sy]);
      for (int dv = 0; dv < DV; ++dv) acc[xx][dv] = vfma(av, bv[dv], acc[xx][dv]);
    }
  }
  for (int xx = 0; xx < XB; ++xx)
    for (int dv = 0; dv < DV; ++dv) vstore(c + xx * ldc + dv * kLanes, acc[xx][dv]);
}

// C (X x Dp) += A (X x Y) . B (Y x Dp); X a multiple of 4.
inline void outer_acc(float* c, int X, const float* a, int sx, int sy, int Y, const float* b, int Dp) {
  constexpr int XB = kWide ? 4 : 2;
  const int nv = Dp / kLanes;
  for (int x0 = 0; x0 < X; x0 += XB) {
    float* cx = c + x0 * Dp;
    const float* ax = a + x0 * sx;
    int v0 = 0;
    if constexpr (kWide) {
      for (; v0 + 4 <= nv; v0 += 4) outer_block<XB, 4>(cx + v0 * kLanes, Dp, ax, sx, sy, Y, b + v0 * kLanes, Dp);
      if (nv - v0 == 3) outer_block<XB, 3>(cx + v0 * kLanes, Dp, ax, sx, sy, Y, b + v0 * kLanes, Dp), v0 += 3;
    }
    for (; v0 + 2 <= nv; v0 += 2) outer_block<XB, 2>(cx + v0 * kLanes, Dp, ax, sx, sy, Y, b + v0 * kLanes, Dp);
    if (v0 < nv) outer_block<XB, 1>(cx + v0 * kLanes, Dp, ax, sx, sy, Y, b + v0 * kLanes, Dp);
  }
}

inline void store_row(void* dst, DType dt, const float* src, int D, float mul) {
  switch (dt) {
    case DType::kFloat32: {
      float* o = static_cast<float*>(dst);
      for (int d = 0; d < D; ++d) o[d] = src[d] * mul;
      break;
    }
    case DType::kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(dst);
      for (int d = 0; d < D; ++d) o[d] = f32_to_f16(src[d] * mul);
      break;
    }
    case DType::kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(dst);
      for (int d = 0; d < D; ++d) o[d] = f32_to_bf16(src[d] * mul);
      break;
    }
  }
}

// Packed rows [r0, r1) of the task's (b, kv head) -> Q, dO (rows and transposed) and row info;
// rows past r1 up to R are zeros with lse2 = +inf, so they contribute nothing.
template <int RV>
void load_rows(const AttentionBackwardParams& bp, const BwdTask& task, int r0, int r1, BwdBuffers& w) {
  constexpr int R = RV * kLanes;
  const AttentionParams& p = bp.fwd;
  const int D = p.head_dim, Dp = pad16(D), group = p.num_heads / p.num_kv_heads, esz = dtype_size(p.dtype);
  const int dt = static_cast<int>(p.dtype), b = task.b, shift = p.k_len(b) - p.q_len(b);
  for (int i = 0; i < R; ++i) {
    float* qr = w.q + i * Dp;
    float* dr = w.dout + i * Dp;
    const int r = r0 + i;
    if (r < r1) {
      const int t = r / group, h = task.kv_head * group + r % group;
      const char* qs = static_cast<const char*>(p.q) + esz * (p.q_row_offset(b, t, p.q_batch_stride, p.q_row_stride) + h * p.q_head_stride);
      const char* ds = static_cast<const char*>(bp.dout) +
                       esz * (p.q_row_offset(b, t, bp.do_batch_stride, bp.do_row_stride) + h * bp.do_head_stride);
      row_to_f32(qs, dt, qr, D);
      row_to_f32(ds, dt, dr, D);
      std::fill(qr + D, qr + Dp, 0.f);
      std::fill(dr + D, dr + Dp, 0.f);
      w.lse2[i] = task.lse2[r];
      w.delta[i] = task.delta[r];
      w.pos[i] = static_cast<float>(t + shift);
      w.slope[i] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    } else {
      std::fill(qr, qr + Dp, 0.f);
      std::fill(dr, dr + Dp, 0.f);
      w.lse2[i] = std::numeric_limits<float>::infinity();
      w.delta[i] = w.pos[i] = w.slope[i] = 0.f;
    }
  }
  for (int d = 0; d < Dp; ++d)
    for (int i = 0; i < R; ++i) {
      w.qt[d * R + i] = w.q[i * Dp + d];
      w.dot[d * R + i] = w.dout[i * Dp + d];
    }
}

// Keys/values [j0, j0 + n) of (b, kv head) as float rows; rows n..npad are zeros.
inline void load_keys(const AttentionParams& p, int b, int hk, int j0, int n, int npad, BwdBuffers& w) {
  const int D = p.head_dim, Dp = pad16(D), esz = dtype_size(p.dtype), dt = static_cast<int>(p.dtype);
  const char* kbase = static_cast<const char*>(p.k) + esz * hk * p.k_head_stride;
  const char* vbase = static_cast<const char*>(p.v) + esz * hk * p.v_head_stride;
  for (int jj = 0; jj < npad; ++jj) {
    float* kr = w.k + jj * Dp;
    float* vr = w.v + jj * Dp;
    if (jj < n) {
      row_to_f32(kbase + esz * p.kv_row_offset(b, j0 + jj, p.k_batch_stride, p.k_row_stride), dt, kr, D);
      row_to_f32(vbase + esz * p.kv_row_offset(b, j0 + jj, p.v_batch_stride, p.v_row_stride), dt, vr, D);
      std::fill(kr + D, kr + Dp, 0.f);
      std::fill(vr + D, vr + Dp, 0.f);
    } else {
      std::fill(kr, kr + Dp, 0.f);
      std::fill(vr, vr + Dp, 0.f);
    }
  }
}

// One (row tile, key tile) pair: w.s <- P^T, w.dp <- dS^T (dS with respect to the scaled,
// capped score; the caller applies softmax_scale when it stores dQ/dK).
template <int RV>
void probs_and_dscores(const AttentionParams& p, int j0, int n, int npad, bool need_mask, BwdBuffers& w) {
  constexpr int R = RV * kLanes;
  const int Dp = pad16(p.head_dim);
  qk_f32<RV>(w.qt, w.k, npad, Dp, w.s);
  qk_f32<RV>(w.dot, w.v, npad, Dp, w.dp);
  const float inf = std::numeric_limits<float>::infinity();
  const bool plain = p.softcap == 0.f && p.alibi_slopes == nullptr;
  const VecF scale = vset1(plain ? p.softmax_scale * kLog2e : p.softmax_scale);
  const VecF log2e = vset1(kLog2e), one = vset1(1.f);
  const VecF cap = vset1(p.softcap), inv_cap = vset1(p.softcap > 0.f ? 1.f / p.softcap : 0.f);
  VecF pos[RV], lo[RV], hi[RV], sl[RV], l2[RV], dl[RV];
  for (int rv = 0; rv < RV; ++rv) {
    pos[rv] = vload(w.pos + rv * kLanes);
    lo[rv] = p.window_left >= 0 ? vsub(pos[rv], vset1(static_cast<float>(p.window_left))) : vset1(-inf);
    hi[rv] = p.window_right >= 0 ? vadd(pos[rv], vset1(static_cast<float>(p.window_right))) : vset1(inf);
    sl[rv] = vload(w.slope + rv * kLanes);
    l2[rv] = vload(w.lse2 + rv * kLanes);
    dl[rv] = vload(w.delta + rv * kLanes);
  }
  for (int jj = 0; jj < n; ++jj) {
    const VecF jv = vset1(static_cast<float>(j0 + jj));
    for (int rv = 0; rv < RV; ++rv) {
      VecF x = vmul(vload(w.s + jj * R + rv * kLanes), scale);
      VecF dcap = one;  // d(softcap * tanh(x / softcap)) / dx
      if (!plain) {
        if (p.softcap > 0.f) {
          const VecF th = vtanh(vmul(x, inv_cap));
          x = vmul(th, cap);
          dcap = vsub(one, vmul(th, th));
        }
        if (p.alibi_slopes) x = vsub(x, vmul(sl[rv], vabs(vsub(pos[rv], jv))));
        x = vmul(x, log2e);
      }
      if (need_mask) x = vselect_range(x, jv, lo[rv], hi[rv], -inf);
      const VecF pr = vexp2(vsub(x, l2[rv]));
      VecF ds = vmul(pr, vsub(vload(w.dp + jj * R + rv * kLanes), dl[rv]));
      if (p.softcap > 0.f) ds = vmul(ds, dcap);
      vstore(w.s + jj * R + rv * kLanes, pr);
      vstore(w.dp + jj * R + rv * kLanes, ds);
    }
  }
  for (int jj = n; jj < npad; ++jj)
    for (int rv = 0; rv < RV; ++rv) {
      vstore(w.s + jj * R + rv * kLanes, vzero());
      vstore(w.dp + jj * R + rv * kLanes, vzero());
    }
}

// True when every (row, key) pair of rows with positions [ia, ib] and keys [j0, j1] is inside the window
// (int64: a window up to INT_MAX must not wrap).
inline bool inside_window(const AttentionParams& p, int ia, int ib, int j0, int j1) {
  return (p.window_left < 0 || j0 >= int64_t(ib) - p.window_left) && (p.window_right < 0 || j1 <= int64_t(ia) + p.window_right);
}

// Pass 1: dK, dV of keys [task.begin, task.end), summed over every query row of the GQA group.
template <int RV>
void dkdv_tile(const AttentionBackwardParams& bp, const BwdTask& task, int t_lo, int t_hi, float* scratch) {
  constexpr int R = RV * kLanes;
  const AttentionParams& p = bp.fwd;
  BwdBuffers w(scratch);
  const int D = p.head_dim, Dp = pad16(D), group = p.num_heads / p.num_kv_heads, esz = dtype_size(p.dtype);
  const int b = task.b, hk = task.kv_head, shift = p.k_len(b) - p.q_len(b);
  const int j0 = task.begin, n = task.end - task.begin, npad = (n + 7) & ~7;
  load_keys(p, b, hk, j0, n, npad, w);
  std::fill(w.dk, w.dk + npad * Dp, 0.f);
  std::fill(w.dv, w.dv + npad * Dp, 0.f);
  const int rend = (t_hi + 1) * group;
  for (int r0 = t_lo * group; r0 < rend; r0 += R) {
    const int r1 = std::min(rend, r0 + R);
    load_rows<RV>(bp, task, r0, r1, w);
    const bool mask = !inside_window(p, r0 / group + shift, (r1 - 1) / group + shift, j0, j0 + n - 1);
    probs_and_dscores<RV>(p, j0, n, npad, mask, w);
    outer_acc(w.dv, npad, w.s, R, 1, R, w.dout, Dp);  // dV[j] += sum_r P^T[j][r] dO[r]
    outer_acc(w.dk, npad, w.dp, R, 1, R, w.q, Dp);    // dK[j] += sum_r dS^T[j][r] Q[r]
  }
  for (int jj = 0; jj < n; ++jj) {
    char* dk = static_cast<char*>(bp.dk) + esz * (p.kv_row_offset(b, j0 + jj, bp.dk_batch_stride, bp.dk_row_stride) + hk * bp.dk_head_stride);
    char* dv = static_cast<char*>(bp.dv) + esz * (p.kv_row_offset(b, j0 + jj, bp.dv_batch_stride, bp.dv_row_stride) + hk * bp.dv_head_stride);
    store_row(dk, p.dtype, w.dk + jj * Dp, D, p.softmax_scale);
    store_row(dv, p.dtype, w.dv + jj * Dp, D, 1.f);
  }
}

void dkdv_entry(const AttentionBackwardParams& bp, const BwdTask& task, float* scratch) {
  const AttentionParams& p = bp.fwd;
  const int group = p.num_heads / p.num_kv_heads, sq = p.q_len(task.b), shift = p.k_len(task.b) - sq;
  // Query positions i' = t + shift that see a key of [begin, end): i' in [begin - right, end - 1 + left]
  // (in int64: a window up to INT_MAX must not wrap).
  const int64_t wl = p.window_left, wr = p.window_right;
  const int t_lo = static_cast<int>(std::clamp<int64_t>(wr >= 0 ? task.begin - wr - shift : 0, 0, sq));
  const int t_hi = static_cast<int>(std::clamp<int64_t>(wl >= 0 ? task.end - 1 + wl - shift : sq - 1, -1, sq - 1));
  const int rows = t_hi >= t_lo ? (t_hi - t_lo + 1) * group : 0;
  if (rows > kLanes) return dkdv_tile<2>(bp, task, t_lo, t_hi, scratch);
  return dkdv_tile<1>(bp, task, t_lo, rows > 0 ? t_hi : t_lo - 1, scratch);
}

// Pass 2: dQ of packed rows [task.begin, task.end).
template <int RV>
void dq_tile(const AttentionBackwardParams& bp, const BwdTask& task, float* scratch) {
  constexpr int R = RV * kLanes;
  const AttentionParams& p = bp.fwd;
  BwdBuffers w(scratch);
  const int D = p.head_dim, Dp = pad16(D), group = p.num_heads / p.num_kv_heads, esz = dtype_size(p.dtype);
  const int b = task.b, hk = task.kv_head, sk = p.k_len(b), shift = sk - p.q_len(b);
  const int r0 = task.begin, r1 = task.end;
  load_rows<RV>(bp, task, r0, r1, w);
  std::fill(w.dq, w.dq + R * Dp, 0.f);
  const int ia = r0 / group + shift, ib = (r1 - 1) / group + shift;
  // Window edges in int64 (a window up to INT_MAX must not wrap), clamped to the keys.
  const int lo = p.window_left >= 0 ? static_cast<int>(std::clamp<int64_t>(int64_t(ia) - p.window_left, 0, sk)) : 0;
  const int hi = p.window_right >= 0 ? static_cast<int>(std::clamp<int64_t>(int64_t(ib) + p.window_right + 1, 0, sk)) : sk;
  for (int j0 = lo; j0 < hi; j0 += kBwdKeys) {
    const int n = std::min(kBwdKeys, hi - j0), npad = (n + 7) & ~7;
    load_keys(p, b, hk, j0, n, npad, w);
    probs_and_dscores<RV>(p, j0, n, npad, !inside_window(p, ia, ib, j0, j0 + n - 1), w);
    outer_acc(w.dq, R, w.dp, 1, R, npad, w.k, Dp);  // dQ[r] += sum_j dS^T[j][r] K[j]
  }
  for (int r = r0; r < r1; ++r) {
    const int t = r / group, h = hk * group + r % group;
    char* dst = static_cast<char*>(bp.dq) + esz * (p.q_row_offset(b, t, bp.dq_batch_stride, bp.dq_row_stride) + h * bp.dq_head_stride);
    store_row(dst, p.dtype, w.dq + (r - r0) * Dp, D, p.softmax_scale);
  }
}

void dq_entry(const AttentionBackwardParams& bp, const BwdTask& task, float* scratch) {
  if (task.end - task.begin > kLanes) return dq_tile<2>(bp, task, scratch);
  return dq_tile<1>(bp, task, scratch);
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS

namespace fastinfer::cpu {
// This level's kernels (backward_kernels_<suffix>, declared in attention_backward.h).
BackwardKernels FI_ISA_CAT(backward_kernels_, FI_ISA_NS)() { return {&FI_ISA_NS::dkdv_entry, &FI_ISA_NS::dq_entry}; }
}  // namespace fastinfer::cpu
