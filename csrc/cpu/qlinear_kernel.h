// Kernels of the quantised CPU linear (fastinfer/qlinear.h), compiled once per SIMD level inside
// linear_<isa>.cpp (this header is included by linear_kernel.h): quantise the activations to int8
// per 32-block, the int8 dot products of one 64-output panel against every row (the same kernel for
// every batch size, so a row's result never depends on the rest of the batch), and rows of a packed
// weight dequantised (embedding lookups). The dot kernels are in qlinear_dot32.h (q8_0, q4_0, q4_1)
// and qlinear_kquant.h (q4_k, q5_k, q6_k); the float-activation kernel in qlinear_float.h.
#pragma once
#include <cmath>

#include "cpu/qlinear_cpu.h"
#include "cpu/qlinear_dot32.h"
#include "cpu/qlinear_kquant.h"
#include "cpu/qlinear_float.h"
#include "cpu/scratch.h"
#include "cpu/qlinear_amx.h"

namespace fastinfer::cpu::FI_ISA_NS {
namespace {

inline float x_at(const void* row, DType t, int64_t i) {
  return t == DType::kFloat32 ? static_cast<const float*>(row)[i] : bf16_to_f32(static_cast<const uint16_t*>(row)[i]);
}

// Row i of x -> int8 per 32-block: q = round(x / d) with d = max|x| / 127; da = d, as = d * sum(q),
// hs = the sums of q over the block's elements 0..15 and 16..31 (q6_k's offsets).
void qlinear_quantize(const QLinearParams& p, int8_t* qa, float* da, float* as, int32_t* hs) {
  const int64_t nb = p.k / kQBlock, esz = dtype_size(p.dtype);
  for (int64_t i = 0; i < p.m; ++i) {
    const char* row = static_cast<const char*>(p.x) + esz * i * p.x_row_stride;
    for (int64_t b = 0; b < nb; ++b) {
      float v[kQBlock], amax = 0.f;
      for (int j = 0; j < kQBlock; ++j) {
        v[j] = x_at(row, p.dtype, b * kQBlock + j);
        amax = std::max(amax, std::fabs(v[j]));
      }
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = qa + i * p.k + b * kQBlock;
      int half[2] = {0, 0};
      for (int j = 0; j < kQBlock; ++j) {
        q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
        half[j / 16] += q[j];
      }
      da[i * nb + b] = d;
      as[i * nb + b] = d * static_cast<float>(half[0] + half[1]);
      hs[2 * (i * nb + b)] = half[0];
      hs[2 * (i * nb + b) + 1] = half[1];
    }
  }
}

// All m rows of `out` for the outputs of sub-panels sub0 .. sub0 + subs - 1 (8 rows each), from the quantised
// activations. With AMX-INT8, whole groups of 16 rows run on the tile unit (bit for bit dot32's results).
void qlinear_panel(const QLinearParams& p, int64_t sub0, int64_t subs, const int8_t* qa, const float* da,
                   const float* as, const int32_t* hs) {
  if (qtype_is_k(p.qtype)) return kquant_panel(p, sub0, subs, qa, da, as, hs);
  constexpr int kChunk = 64;  // activation rows per pass over the panel's sub-panels
  const int64_t nb = p.k / kQBlock, sub_bytes = nb * qpacked_block_bytes(p.qtype);
  const uint8_t* base = static_cast<const uint8_t*>(p.w_packed) + sub0 * sub_bytes;
  auto store = [&](int64_t sub, int64_t i0, int64_t m, float (*out)[kQRows]) { store_sub_panel(p, sub, i0, m, out); };
  int64_t done = 0;
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
  done = amx_panel(p, sub0, subs, qa, da, as, store);
#endif
  for (int64_t i0 = done; i0 < p.m; i0 += kChunk) {
    const int64_t m = std::min<int64_t>(kChunk, p.m - i0);
    QRow rows[kChunk];
    for (int64_t i = 0; i < m; ++i) rows[i] = {qa + (i0 + i) * p.k, da + (i0 + i) * nb, as + (i0 + i) * nb};
    int64_t s = 0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    const int32_t* hsum[kChunk];
    for (int64_t i = 0; i < m; ++i) hsum[i] = hs + 2 * (i0 + i) * nb;
    for (; s + 2 <= subs && (sub0 + s + 1) * kQRows < p.n; s += 2) {  // two sub-panels that both hold outputs
      float out[kChunk][2 * kQRows], half[kChunk][kQRows];
      dot32_pair_all(p.qtype, base + s * sub_bytes, base + (s + 1) * sub_bytes, nb, rows, hsum, m, out);
      for (int h = 0; h < 2; ++h) {
        for (int64_t i = 0; i < m; ++i) std::memcpy(half[i], out[i] + kQRows * h, sizeof(half[i]));
        store(sub0 + s + h, i0, m, half);
      }
    }
#endif
    for (; s < subs; ++s) {
      if ((sub0 + s) * kQRows >= p.n) break;
      float out[kChunk][kQRows];
      dot32_all(p.qtype, base + s * sub_bytes, nb, rows, m, out);
      store(sub0 + s, i0, m, out);
    }
  }
}

// Rows ids of a packed (n, k) weight as float32, w = d q + m as qlinear_dequantize (K-quants: ksub).
void qlinear_rows(QType t, int64_t k, const void* packed, const int64_t* ids, int64_t count, float* out) {
  const int64_t nb = k / qtype_block_elems(t), sub_bytes = nb * qpacked_block_bytes(t);
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t* sub = static_cast<const uint8_t*>(packed) + ids[i] / kQRows * sub_bytes;
    const int r = static_cast<int>(ids[i] % kQRows);
    float* o = out + i * k;
    if (qtype_is_k(t)) {
      KSub w;
      for (int64_t sb = 0; sb < nb; ++sb)
        for (int s = 0; s < kQSuper / kQBlock; ++s) {
          ksub(t, sub + sb * qpacked_block_bytes(t), r, s, w);
          for (int j = 0; j < kQBlock; ++j)
            o[sb * kQSuper + s * kQBlock + j] = w.scale[j / 16] * static_cast<float>(w.q[j]) - w.offset;
        }
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = sub + b * qpacked_block_bytes(t);
      const uint16_t* scales = reinterpret_cast<const uint16_t*>(blk + kQRows * qtype_value_bytes(t));
      const float d = f16_to_f32(scales[r]), m = qtype_has_offset(t) ? f16_to_f32(scales[kQRows + r]) : 0.f;
      uint32_t qh = 0;  // q5_0: the fifth bits
      if (t == QType::kQ5_0) std::memcpy(&qh, blk + kQ5HighOffset + 4 * r, 4);
      for (int j = 0; j < kQBlock; ++j) {
        const int e = j & 15, at = 32 * (e / 4) + 4 * r + e % 4;  // interleaved 4 bytes at a time
        const int q = t == QType::kQ8_0 ? reinterpret_cast<const int8_t*>(blk)[32 * (j / 4) + 4 * r + j % 4]
                                        : ((blk[at] >> (j < 16 ? 0 : 4)) & 15) | int((qh >> j) & 1) << 4;
        o[b * kQBlock + j] = d * static_cast<float>(q) + m;
      }
    }
  }
}

}  // namespace
}  // namespace fastinfer::cpu::FI_ISA_NS

namespace fastinfer::cpu {
// This level's quantised-linear kernels (qlinear_kernels_<suffix>, declared in qlinear_cpu.h).
QLinearKernels FI_ISA_CAT(qlinear_kernels_, FI_ISA_NS)() {
  return {&FI_ISA_NS::qlinear_quantize, &FI_ISA_NS::qlinear_panel, &FI_ISA_NS::qlinear_rows,
          &FI_ISA_NS::qlinear_float_panel, FI_ISA_NS::qlinear_float_reads_bf16(), &FI_ISA_NS::qlinear_float_prep_bytes,
          &FI_ISA_NS::qlinear_float_prep};
}
}  // namespace fastinfer::cpu
