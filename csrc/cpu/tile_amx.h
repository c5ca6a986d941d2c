// AMX tile kernel (bf16 on CPUs with AMX-BF16).
#pragma once
#include "cpu/amx_tiles.h"
#include "cpu/tile_common.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
namespace fastinfer::cpu::FI_ISA_NS {
namespace {

// ---- AMX: S^T = K.Q^T and O = P.V on the tile unit; softmax stays vertical in AVX-512.
//   A operands are plain row-major bf16 (keys, or probabilities), B operands are
//   "VNNI" pairs: Q^T pairs of d (packed once per tile), V pairs of keys (pack_v_bf16).
// Loaded per job: another library (oneDNN in torch) may have configured the tiles differently.
inline void amx_configure() {
  AmxTileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit words.
inline void transpose16_u32(const uint32_t* src, int64_t sstride, uint32_t* dst, int64_t dstride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_loadu_si512(src + i * sstride));
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_si512(dst + i * dstride, _mm512_castps_si512(_mm512_shuffle_f32x4(t[i], t[i + 8], 0x88)));
    _mm512_storeu_si512(dst + (i + 8) * dstride, _mm512_castps_si512(_mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd)));
  }
}

// RB row blocks of 16 rows. Needs bf16 and head_dim % 32 == 0.
template <int RB>
void run_tile_amx(const AttentionParams& p, const TileJob& job, float* scratch) {
  constexpr int R = RB * kLanes;
  const int D = p.head_dim, group = p.num_heads / p.num_kv_heads;
  const int b = job.b, hk = job.kv_head, sq = p.q_len(b), sk = p.k_len(b);
  const int nrows = job.row_end - job.row_begin;

  uint32_t* q32 = reinterpret_cast<uint32_t*>(scratch);  // Q^T pairs: [d/2][R]
  float* s = scratch + ScratchLayout::kQ;                  // S^T: [key][R]
  float* o = s + ScratchLayout::kS;                        // O: [R][D]
  uint16_t* kbuf = reinterpret_cast<uint16_t*>(o + ScratchLayout::kO);                       // keys [kBlockN][D]
  uint32_t* vbuf = reinterpret_cast<uint32_t*>(o + ScratchLayout::kO + ScratchLayout::kKV);  // value pairs [kBlockN/2][D]
  float* m = o + ScratchLayout::kO + 2 * ScratchLayout::kKV;
  float* l = m + kMaxRows;
  float* ipos = l + kMaxRows;
  float* slope = ipos + kMaxRows;
  uint32_t* pt = reinterpret_cast<uint32_t*>(slope + kMaxRows + 2 * kMaxHeadDim);  // P^T pairs [kBlockN/2][R]
  uint32_t* pa = pt + ScratchLayout::kPPack;                                         // P rows [R][kBlockN/2]

  const char* qbase = static_cast<const char*>(p.q);
  for (int r = 0; r < R; ++r) {
    const int row = job.row_begin + std::min(r, nrows - 1);
    const int t = row / group, h = hk * group + row % group;
    ipos[r] = static_cast<float>(t + sk - sq);
    slope[r] = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    const char* qrow = qbase + 2 * (p.q_row_offset(b, t, p.q_batch_stride, p.q_row_stride) + h * p.q_head_stride);
    for (int pp = 0; pp < D / 2; ++pp) q32[pp * R + r] = load_u32(qrow + 4 * pp);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  std::fill(o, o + R * D, 0.f);
  amx_configure();

  const float imin = ipos[0], imax = ipos[nrows - 1];
  KeyTiles tiles(p, job);
  VecF alpha[RB];
  alignas(64) float alpha_row[R];
  for (int j0 = job.kv_begin; j0 < job.kv_end; j0 += kBlockN) {
    const int n = std::min(kBlockN, job.kv_end - j0), npad = (n + 31) & ~31;
    const uint16_t* kt = job.k_staged ? static_cast<const uint16_t*>(job.k_staged) + static_cast<int64_t>(j0) * D : nullptr;
    const uint32_t* vp = job.v_staged ? static_cast<const uint32_t*>(job.v_staged) + static_cast<int64_t>(j0 / 2) * D : nullptr;
    if (!job.k_staged) {
      const void* const* kr;
      const void* const* vr;
      tiles.start(j0, &kr, &vr);
      for (int jj = 0; jj < npad; ++jj) copy_row(kbuf + jj * D, kr[jj], 2 * D);
      pack_v_bf16(vr, npad, D, vbuf);
      kt = kbuf;
      vp = vbuf;
    }

    // S^T[key][row] = K . Q^T, two 16-key blocks at a time.
    for (int kb = 0; kb < npad / 16; kb += 2) {
      _tile_zero(0);
      _tile_zero(1);
      if constexpr (RB == 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int c = 0; c < D / 32; ++c) {
        _tile_loadd(4, kt + (kb * 16) * D + c * 32, 2 * D);
        _tile_loadd(5, kt + (kb * 16 + 16) * D + c * 32, 2 * D);
        _tile_loadd(6, q32 + (c * 16) * R, 4 * R);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if constexpr (RB == 2) {
          _tile_loadd(7, q32 + (c * 16) * R + 16, 4 * R);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, s + (kb * 16) * R, 4 * R);
      _tile_stored(1, s + (kb * 16 + 16) * R, 4 * R);
      if constexpr (RB == 2) {
        _tile_stored(2, s + (kb * 16) * R + 16, 4 * R);
        _tile_stored(3, s + (kb * 16 + 16) * R + 16, 4 * R);
      }
    }
    const bool need_mask = (p.window_right >= 0 && j0 + n - 1 > imin + p.window_right) ||
                           (p.window_left >= 0 && j0 < imax - p.window_left);
    online_softmax<RB>(p, j0, n, npad, s, m, l, ipos, slope, need_mask, alpha);

    // P^T -> bf16 pairs -> P rows (A operand); V -> pairs (B operand).
    pack_p_bf16<RB>(s, npad, pt);
    for (int mb = 0; mb < npad / 32; ++mb)
      for (int rb = 0; rb < RB; ++rb)
        transpose16_u32(pt + (mb * 16) * R + rb * 16, R, pa + (rb * 16) * (kBlockN / 2) + mb * 16, kBlockN / 2);
    // Rescale O only when some row's max moved (rare after the first tiles).
    __mmask16 moved = 0;
    for (int rb = 0; rb < RB; ++rb) {
      vstore(alpha_row + rb * kLanes, alpha[rb]);
      moved |= _mm512_cmp_ps_mask(alpha[rb].v, _mm512_set1_ps(1.f), _CMP_NEQ_UQ);
    }
    if (moved)
      for (int r = 0; r < R; ++r) {
        const __m512 a = _mm512_set1_ps(alpha_row[r]);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(a, _mm512_loadu_ps(o + r * D + d)));
      }
    // O[row][d] += P . V, two 16-wide d blocks at a time.
    for (int db = 0; db < D / 16; db += 2) {
      _tile_loadd(0, o + db * 16, 4 * D);
      _tile_loadd(1, o + db * 16 + 16, 4 * D);
      if constexpr (RB == 2) {
        _tile_loadd(2, o + 16 * D + db * 16, 4 * D);
        _tile_loadd(3, o + 16 * D + db * 16 + 16, 4 * D);
      }
      for (int kh = 0; kh < npad / 32; ++kh) {
        _tile_loadd(4, pa + kh * 16, 4 * (kBlockN / 2));
        _tile_loadd(6, vp + (kh * 16) * D + db * 16, 4 * D);
        _tile_loadd(7, vp + (kh * 16) * D + db * 16 + 16, 4 * D);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if constexpr (RB == 2) {
          _tile_loadd(5, pa + 16 * (kBlockN / 2) + kh * 16, 4 * (kBlockN / 2));
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, o + db * 16, 4 * D);
      _tile_stored(1, o + db * 16 + 16, 4 * D);
      if constexpr (RB == 2) {
        _tile_stored(2, o + 16 * D + db * 16, 4 * D);
        _tile_stored(3, o + 16 * D + db * 16 + 16, 4 * D);
      }
    }
  }
  _tile_release();
  store_tile(p, job, o, D, 1, m, l);
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS
#endif
