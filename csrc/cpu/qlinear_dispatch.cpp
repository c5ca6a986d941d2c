// ISA-independent driver of the quantised CPU linear: quantises the activations once per call (or,
// QActivations::kFloat, keeps them), runs tasks of whole 8-row sub-panels on the thread pool, and
// repacks GGUF blocks into the panel layout of qlinear.h.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/cpu_features.h"
#include "cpu/qlinear_cpu.h"
#include "cpu/scratch.h"
#include "cpu/thread_pool.h"

namespace fastinfer::cpu {

namespace {

QLinearKernels pick_kernels() {
#define FI_ISA_ROW(suffix, Enum, name, arch, flags, att, bwd, lin, pw, pred) FI_ISA_ENTRY(arch, lin, qlinear_kernels_##suffix)
  static constexpr QLinearKernels (*kTable[])() = {FI_CPU_ISAS(FI_ISA_ROW)};
#undef FI_ISA_ROW
  return pick_isa(kTable)();
}

struct QActScratch;  // the quantised activations (calling thread)

bool finite_f16(uint16_t h) { return (h & 0x7c00) != 0x7c00; }

float f16_value(uint16_t h) {
  const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  const float a = exp == 0 ? std::ldexp(static_cast<float>(man), -24)
                           : exp == 31 ? (man ? NAN : INFINITY) : std::ldexp(static_cast<float>(man | 0x400), exp - 25);
  return (h & 0x8000) ? -a : a;
}

// float -> half, rounding to nearest (used for -8 d of q4_0, which is exact unless it overflows).
uint16_t f32_to_f16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const float a = std::fabs(f);
  if (a == 0.f) return sign;
  if (!(a < 65520.f)) return static_cast<uint16_t>(sign | 0x7c00);
  int e;
  std::frexp(a, &e);  // a = mantissa * 2^e, mantissa in [0.5, 1)
  if (e - 1 < -14) return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(std::ldexp(a, 24))));
  int mant = static_cast<int>(std::nearbyint(std::ldexp(a, 11 - e)));  // [1024, 2048]
  if (mant == 2048) mant = 1024, ++e;
  return static_cast<uint16_t>(sign | ((e - 1 + 15) << 10) | (mant - 1024));
}

// One row's GGUF K-quant super-block `src` into row r of a sub-panel's packed super-block `dst` (qlinear.h):
// runs of 32 value bytes interleaved with the other rows' 4 bytes at a time, the scales a byte each.
void pack_k_row(QType t, const uint8_t* src, uint8_t* dst, int r) {
  auto interleave = [r](uint8_t* run, const uint8_t* bytes) {  // 32 bytes -> a run of 8 rows x 32 bytes
    for (int c = 0; c < 8; ++c) std::memcpy(run + (c * kQRows + r) * 4, bytes + 4 * c, 4);
  };
  if (t == QType::kQ6_K) {  // ql[128], qh[64], int8 scales[16], f16 d
    for (int h = 0; h < 2; ++h) {
      uint8_t* half = dst + 768 * h;
      interleave(half, src + 64 * h);
      interleave(half + 256, src + 64 * h + 32);
      interleave(half + 512, src + 128 + 32 * h);
    }
    for (int i = 0; i < 16; ++i) dst[1536 + 16 * (i / 2) + 8 * (i % 2) + r] = src[192 + i];
    std::memcpy(dst + 1536 + 128 + 2 * r, src + 208, 2);
    return;
  }
  // q4_k: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, qs[128]; q5_k: qh[32] before qs
  const bool q5 = t == QType::kQ5_K;
  const uint8_t* sm = src + 4;  // gguf's get_scale_min
  uint8_t* sc = dst + (q5 ? 1280 : 1024);
  for (int j = 0; j < 8; ++j) {
    const int s = j < 4 ? sm[j] & 63 : (sm[j + 4] & 15) | ((sm[j - 4] >> 6) << 4);
    const int m = j < 4 ? sm[j + 4] & 63 : (sm[j + 4] >> 4) | ((sm[j] >> 6) << 4);
    sc[8 * j + r] = static_cast<uint8_t>(s);
    sc[64 + 8 * j + r] = static_cast<uint8_t>(m);
  }
  std::memcpy(sc + 128 + 2 * r, src, 2);
  std::memcpy(sc + 144 + 2 * r, src + 2, 2);
  const uint8_t* qs = src + (q5 ? 48 : 16);
  for (int g = 0; g < 4; ++g) interleave(dst + 256 * g, qs + 32 * g);
  if (q5) interleave(dst + 1024, src + 16);
}

struct QFloatScratch;  // a worker's dequantised sub-panel (float activations)
struct QFloatPrep;     // x prepared for the float kernels, once per call (calling thread)

// Tasks of whole sub-panels, about 8 per thread (a panel at most): 9 panels on 2 threads would leave
// one thread a panel behind, and small projections are most of a decode step.
template <class Fn>
void for_sub_panels(const QLinearParams& p, int64_t macs_inline, Fn&& fn) {
  const int threads = num_threads();
  const int64_t subs = linear_panels(p.n) * (kLinearPanel / kQRows);
  const int64_t per_task = std::clamp<int64_t>(subs / (8 * int64_t(threads)), 1, kLinearPanel / kQRows);
  const int64_t tasks = (subs + per_task - 1) / per_task;
  auto run = [&](int64_t task, int) { fn(task * per_task, std::min(per_task, subs - task * per_task)); };
  if (threads == 1 || p.m * p.n * p.k < macs_inline) {
    for (int64_t t = 0; t < tasks; ++t) run(t, 0);
  } else {
    parallel_for(tasks, run);
  }
}

void qlinear_forward_float(const QLinearParams& p, const QLinearKernels& kern) {
  const float* xf = nullptr;
  if (p.dtype == DType::kBFloat16 && !kern.float_reads_bf16) {  // float copies of the rows, once per call
    float* buf = reinterpret_cast<float*>(thread_scratch<QActScratch>(sizeof(float) * p.m * p.k));
    for (int64_t i = 0; i < p.m; ++i) {
      const uint16_t* row = static_cast<const uint16_t*>(p.x) + i * p.x_row_stride;
      for (int64_t j = 0; j < p.k; ++j) {
        const uint32_t u = uint32_t(row[j]) << 16;
        std::memcpy(buf + i * p.k + j, &u, 4);
      }
    }
    xf = buf;
  }
  auto run = [&](const QLinearParams& q, const void* prep) {
    for_sub_panels(q, int64_t(1) << 16, [&](int64_t sub0, int64_t subs) {
      float* scratch = reinterpret_cast<float*>(thread_scratch<QFloatScratch>(sizeof(float) * qfloat_scratch_floats(q.k)));
      kern.float_panel(q, sub0, subs, xf, prep, scratch);
    });
  };
  if (kern.float_prep_bytes(p) == 0) return run(p, nullptr);  // (a level with prep reads float32 x: xf is null)
  // x prepared once per slab of rows, shared by the tasks; slabs bound its memory on long prompts (a row's
  // result is the same in any slab).
  constexpr int64_t kSlabRows = 256;
  for (int64_t i0 = 0; i0 < p.m; i0 += kSlabRows) {
    QLinearParams q = p;
    q.m = std::min(kSlabRows, p.m - i0);
    q.x = static_cast<const char*>(p.x) + dtype_size(p.dtype) * i0 * p.x_row_stride;
    q.out = static_cast<char*>(p.out) + dtype_size(p.out_dtype) * i0 * p.out_row_stride;
    void* prep = thread_scratch<QFloatPrep>(kern.float_prep_bytes(q));
    kern.float_prep(q, prep);
    run(q, prep);
  }
}

}  // namespace

void qlinear_forward(const QLinearParams& p) {
  if (p.m == 0 || p.n == 0) return;
  const QLinearKernels kern = pick_kernels();
  if (p.act == QActivations::kFloat) return qlinear_forward_float(p, kern);
  const int64_t nb = p.k / kQBlock;
  // One path for every batch size: a row's result does not depend on what else is in the batch.
  char* buf = thread_scratch<QActScratch>(p.m * p.k + 4 * sizeof(float) * p.m * nb + 64);
  int8_t* qa = reinterpret_cast<int8_t*>(buf);
  float* da = reinterpret_cast<float*>(buf + (p.m * p.k + 63) / 64 * 64);
  float* as = da + p.m * nb;
  int32_t* hs = reinterpret_cast<int32_t*>(as + p.m * nb);
  kern.quantize(p, qa, da, as, hs);
  for_sub_panels(p, int64_t(1) << 16,
                 [&](int64_t sub0, int64_t subs) { kern.panel(p, sub0, subs, qa, da, as, hs); });
}

void qlinear_rows(QType t, int64_t k, const void* packed, const int64_t* ids, int64_t count, float* out) {
  if (count == 0) return;
  const QLinearKernels kern = pick_kernels();
  if (count * k < (int64_t(1) << 16) || num_threads() == 1) return kern.rows(t, k, packed, ids, count, out);
  parallel_for(count, [&](int64_t i, int) { kern.rows(t, k, packed, ids + i, 1, out + i * k); });
}

int64_t qlinear_pack(const QLinearPackParams& p) {
  const int64_t nb = p.k / qtype_block_elems(p.qtype), pb = qpacked_block_bytes(p.qtype), sub_bytes = nb * pb;
  const int64_t vb = qtype_value_bytes(p.qtype), block_bytes = qtype_block_bytes(p.qtype), subs = kLinearPanel / kQRows;
  const bool kq = qtype_is_k(p.qtype);
  // A scale or offset that is not finite would poison every output: refuse the tensor instead.
  for (int64_t row = 0; row < p.n; ++row) {
    const uint8_t* src = static_cast<const uint8_t*>(p.raw) + row * p.raw_row_stride;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = src + b * block_bytes;
      uint16_t d, m = 0;
      std::memcpy(&d, blk + (p.qtype == QType::kQ6_K ? 208 : 0), 2);
      if (p.qtype == QType::kQ4_1 || p.qtype == QType::kQ4_K || p.qtype == QType::kQ5_K) std::memcpy(&m, blk + 2, 2);
      if (!finite_f16(d) || !finite_f16(m)) return row;
      if (p.qtype == QType::kQ4_0 && !finite_f16(f32_to_f16(-8.f * f16_value(d)))) return row;
      if (p.qtype == QType::kQ5_0 && !finite_f16(f32_to_f16(-16.f * f16_value(d)))) return row;
    }
  }
  if (kq) {
    parallel_for(linear_panels(p.n) * subs, [&](int64_t task, int) {
      uint8_t* dst = static_cast<uint8_t*>(p.packed) + task * sub_bytes;
      std::memset(dst, 0, sub_bytes);  // padding rows of the last panel: zero weights
      for (int r = 0; r < kQRows && task * kQRows + r < p.n; ++r) {
        const uint8_t* src = static_cast<const uint8_t*>(p.raw) + (task * kQRows + r) * p.raw_row_stride;
        for (int64_t b = 0; b < nb; ++b) pack_k_row(p.qtype, src + b * block_bytes, dst + b * pb, r);
      }
    });
    return -1;
  }
  parallel_for(linear_panels(p.n) * subs, [&](int64_t task, int) {
    uint8_t* dst = static_cast<uint8_t*>(p.packed) + task * sub_bytes;
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* values = dst + b * pb;
      uint16_t* d = reinterpret_cast<uint16_t*>(values + kQRows * vb);
      uint16_t* m = d + kQRows;
      for (int r = 0; r < kQRows; ++r) {
        const int64_t row = task * kQRows + r;
        if (row >= p.n) {  // padding rows of the last panel: zero weights
          for (int64_t c = 0; c < vb / 4; ++c) std::memset(values + 32 * c + 4 * r, 0, 4);
          d[r] = 0;
          if (qtype_has_offset(p.qtype)) m[r] = 0;
          if (p.qtype == QType::kQ5_0) std::memset(values + kQ5HighOffset + 4 * r, 0, 4);
          continue;
        }
        const uint8_t* blk = static_cast<const uint8_t*>(p.raw) + row * p.raw_row_stride + b * block_bytes;
        std::memcpy(&d[r], blk, 2);
        const uint8_t* q = blk + (p.qtype == QType::kQ4_1 ? 4 : p.qtype == QType::kQ5_0 ? 6 : 2);
        if (p.qtype == QType::kQ4_0) m[r] = f32_to_f16(-8.f * f16_value(d[r]));
        if (p.qtype == QType::kQ5_0) {  // m = -16 d; the fifth bits, GGUF's qh word as it is
          m[r] = f32_to_f16(-16.f * f16_value(d[r]));
          std::memcpy(values + kQ5HighOffset + 4 * r, blk + 2, 4);
        }
        if (p.qtype == QType::kQ4_1) std::memcpy(&m[r], blk + 2, 2);
        // 4 bytes at a time, the 8 rows side by side (qlinear.h): bytes 4c..4c+3 of row r at 32 c + 4 r
        for (int64_t c = 0; c < vb / 4; ++c) std::memcpy(values + 32 * c + 4 * r, q + 4 * c, 4);
      }
    }
  });
  return -1;
}

}  // namespace fastinfer::cpu
