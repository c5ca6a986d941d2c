// Framework-free description of a projection y = x @ W^T (+ bias) on the CPU whose weight W stays
// quantised in memory: GGUF's block formats, repacked once at load, read as they are at every call.
//
// Supported block formats (GGUF's own bytes in, per row of W):
//   q8_0: 34-byte blocks of 32: f16 d, 32 int8 q;           w = d * q
//   q4_0: 18-byte blocks of 32: f16 d, 16 bytes of nibbles; w = d * (q - 8)
//   q4_1: 20-byte blocks of 32: f16 d, f16 m, 16 bytes;      w = d * q + m
//   q5_0: 22-byte blocks of 32: f16 d, 4 bytes qh, 16 bytes; w = d * (q - 16), q = 5 bits: the nibble, and
//         bit j of qh (little-endian uint32) is bit 4 of element j (llama.cpp's choice for rows whose size
//         is not a multiple of 256, where a K-quant cannot go)
//   (a nibble byte j holds element j in its low half and element j + 16 in its high half)
//   K-quants, super-blocks of 256 elements = 8 sub-blocks s of 32 (q6_k: 16 scales of 16):
//   q4_k: 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales sc[8] and mins m[8], 128 bytes qs;
//         w = (d * sc[s]) * q - dmin * m[s], q = 4 bits: qs byte 32 g + j holds element 64 g + j
//         (sub-block 2 g) in its low half and 64 g + 32 + j (sub-block 2 g + 1) in its high half
//   q5_k: 176 bytes: d, dmin, 12 bytes of scales, 32 bytes qh, 128 bytes qs; as q4_k with a fifth
//         bit: bit s of qh byte j is bit 4 of element 32 s + j
//   q6_k: 210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales sc, f16 d; w = (d * sc[e / 16]) * (q - 32),
//         q = 6 bits: element 128 h + 32 t + j has its low 4 bits in ql byte 64 h + 32 (t & 1) + j
//         (low half for t < 2, high half for t >= 2) and its top 2 bits at bit 2 t of qh byte 32 h + j
//
// Packed layout: outputs in panels of kLinearPanel (64) rows, zero-padded to whole panels, as the
// float linear; a panel is 8 sub-panels of kQRows (8) rows, each one contiguous stream of packed
// blocks, one per GGUF block of the inputs (32 inputs; 256 for the K-quants), that hold the 8 rows:
//   q8_0/q4_0/q4_1/q5_0, per 32-block: the 8 rows' values (q8: 32 bytes each, q4/q5: GGUF's 16 nibble
//     bytes each) interleaved 4 bytes at a time (bytes 4c..4c+3 of row r at 32 c + 4 r), then their
//     8 f16 scales d, then (q4/q5) their 8 f16 offsets m (q4_0: m = -8 d; q5_0: m = -16 d), then (q5)
//     their 8 qh words [row] (8 x 24 bytes: GGUF's 22 + the offset).
//   K-quants, per super-block: GGUF's value bytes in runs of 8 x 32 bytes, a run interleaving 32 bytes
//     of each row 4 at a time ([c 0..7][row 0..7][4]: bytes 4 c .. 4 c + 3 of each row), then the
//     scales, one byte each, [sub-block][row], and the f16 d (and dmin) [row]:
//   q4_k (8 x 148 bytes, GGUF's 144 + 4: the 6-bit scales and mins unpacked to a byte each): qs, 4
//     runs (qs bytes 32 g .. 32 g + 31: sub-blocks 2 g and 2 g + 1); sc [s 0..7][row] u8; m [s][row]
//     u8; d [row]; dmin [row]
//   q5_k (8 x 180 bytes, GGUF's 176 + 4): qs as q4_k; qh, 1 run; then sc, m, d, dmin as q4_k
//   q6_k (8 x 210 bytes, GGUF's size): per half h (elements 128 h ..): 3 runs: ql bytes 64 h .. + 31,
//     ql bytes 64 h + 32 .. + 63, qh bytes 32 h .. + 31; then sc [s 0..7][half 0..1][row] int8 (the
//     scales of elements 32 s .. 32 s + 15 and 32 s + 16 .. 32 s + 31), d [row]
// One activation block thus feeds 8 output rows from one contiguous stream, and a thread's panels
// are contiguous memory; a K-quant run gives, per 32-byte load, 4 consecutive values of each row.
//
// The activations are quantised on the fly to int8 per 32-block (scale = max|x| / 127, round to
// nearest), as ggml does; the dot products are exact integer sums, scaled once per block (per
// 32-block also for the K-quants, whose offsets -dmin m and -32 d sc are applied through the
// activations' per-block and per-16 sums). The levels: scalar, AVX2 (maddubs + madd), AVX-VNNI and
// AVX-512 VNNI (vpdpbusd), and AMX-INT8 tiles for whole groups of 16 rows of the 32-block formats,
// whose float operations after the exact sums are the VNNI kernel's, so a row's result is the same
// whichever runs it.
#pragma once
#include <cstdint>

#include "fastinfer/linear.h"

namespace fastinfer {

enum class QType : int { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kQ4_K = 3, kQ5_K = 4, kQ6_K = 5, kQ5_0 = 6 };

constexpr int kQBlock = 32;   // elements per activation block, and per q8_0/q4_0/q4_1 block
constexpr int kQSuper = 256;  // elements per K-quant super-block
constexpr int kQRows = 8;     // rows of a sub-panel

FI_ALWAYS_INLINE bool qtype_is_k(QType t) { return t == QType::kQ4_K || t == QType::kQ5_K || t == QType::kQ6_K; }
// Elements of one GGUF block of `t`: k must be a multiple of it.
FI_ALWAYS_INLINE int qtype_block_elems(QType t) { return qtype_is_k(t) ? kQSuper : kQBlock; }

// Bytes of one GGUF block of `t` (qtype_block_elems(t) elements).
FI_ALWAYS_INLINE int64_t qtype_block_bytes(QType t) {
  constexpr int64_t kBytes[] = {34, 18, 20, 144, 176, 210, 22};
  return kBytes[static_cast<int>(t)];
}
// q8_0/q4_0/q4_1/q5_0: bytes of one row's values in a packed block (q5_0: its nibbles; the fifth bits come
// after the scales); whether it has offsets m.
FI_ALWAYS_INLINE int qtype_value_bytes(QType t) { return t == QType::kQ8_0 ? 32 : 16; }
FI_ALWAYS_INLINE bool qtype_has_offset(QType t) { return t != QType::kQ8_0; }
// q5_0: where a packed block's fifth bits start (after the values and the 8 d and 8 m).
constexpr int kQ5HighOffset = kQRows * 16 + 2 * kQRows * 2;
// Bytes of one packed block (one GGUF block of each of a sub-panel's 8 rows), layout above.
FI_ALWAYS_INLINE int64_t qpacked_block_bytes(QType t) {
  constexpr int64_t kRowBytes[] = {34, 20, 20, 148, 180, 210, 24};
  return kQRows * kRowBytes[static_cast<int>(t)];
}
// Bytes of the packed weight of an (n, k) matrix (k a multiple of qtype_block_elems(t)).
FI_ALWAYS_INLINE int64_t qlinear_packed_bytes(int64_t n, int64_t k, QType t) {
  return linear_panels(n) * (kLinearPanel / kQRows) * (k / qtype_block_elems(t)) * qpacked_block_bytes(t);
}

// How a call treats its activations x.
enum class QActivations : int {
  // Quantised to int8 per 32-block on the fly (above): integer dot products, what a decode step
  // streaming the weights wants.
  kInt8 = 0,
  // Kept as they are: each 8-row sub-panel of W is dequantised once per call (to bf16 where the CPU
  // has bf16 dot products and x is bf16, else to float32) and multiplied by every row with float
  // accumulation, as the dequantised model computes; with AMX-BF16 and float32 x (32-block formats),
  // x is split exactly into three bf16 parts and multiplied by the integer q on the tile unit, then
  // scaled (float32 accuracy). For prompt rows: a batch of them amortises the dequantisation, and the
  // float activations keep the next token the dequantised model's.
  kFloat = 1,
};

struct QLinearParams {
  QType qtype;
  DType dtype;          // of x and bias: float32 or bfloat16
  DType out_dtype;      // of out: dtype, or float32
  int64_t m, n, k;      // x (m, k), W (n, k), out (m, n); k a multiple of qtype_block_elems(qtype)
  const void* x;        // row i at x + i * x_row_stride, elements contiguous
  int64_t x_row_stride;
  const void* w_packed;  // qlinear_packed_bytes(n, k, qtype) bytes, layout above
  const void* bias;     // (n,) or null
  void* out;            // row i at out + i * out_row_stride
  int64_t out_row_stride;
  QActivations act = QActivations::kInt8;  // see QActivations; a row's result never depends on the other rows
};

struct QLinearPackParams {
  QType qtype;
  int64_t n, k;
  const void* raw;      // row j: k / qtype_block_elems GGUF blocks at raw + j * raw_row_stride bytes
  int64_t raw_row_stride;
  void* packed;         // qlinear_packed_bytes(n, k, qtype) bytes
};

}  // namespace fastinfer
