// Entry points of the CPU backend (csrc/cpu): what the binding layer calls once every input is
// checked. Framework-free; none of them allocates tensor memory or checks its parameters.
#pragma once
#include <cstdint>
#include <string>

#include "fastinfer/attention.h"
#include "fastinfer/attention_backward.h"
#include "fastinfer/decoder.h"
#include "fastinfer/linear.h"
#include "fastinfer/pointwise.h"
#include "fastinfer/qlinear.h"

namespace fastinfer::cpu {

constexpr int kMaxHeadDim = 256;  // head dims: multiples of 8 up to this
constexpr int kMaxThreads = 1024;  // upper bound of set_num_threads (and of FASTINFER_NUM_THREADS)

// Attention (attention_dispatch.cpp, kv_cache.cpp, attention_backward.cpp).
void attention_forward(const AttentionParams& p);
// Varlen: writes zeros (and lse +inf) to the rows of out outside every sequence, of total_q rows.
void zero_rows_outside(const AttentionParams& p, int64_t total_q);
void kv_write(const KVWriteParams& p);
// Writes dq, dk, dv (every element: rows outside all sequences of a varlen tensor get zeros).
void attention_backward(const AttentionBackwardParams& p);

// Packed linear (linear_dispatch.cpp).
void linear_forward(const LinearParams& p);
void linear_pack(const LinearPackParams& p);

// Quantised linear (qlinear_dispatch.cpp). qlinear_pack returns -1, or the first row of W holding a
// block whose scale or offset is not finite (nothing is packed then).
void qlinear_forward(const QLinearParams& p);
int64_t qlinear_pack(const QLinearPackParams& p);
// Rows ids[0..count) (each in [0, n)) of a packed (n, k) weight of type t, dequantised as gguf does:
// out (count, k) float32 (an embedding lookup in a quantised table).
void qlinear_rows(QType t, int64_t k, const void* packed, const int64_t* ids, int64_t count, float* out);

// Pointwise ops (pointwise_dispatch.cpp).
void rms_norm(const RmsNormParams& p);
void act_mul(const ActMulParams& p);
void rotary(const RotaryParams& p);

// Runs every layer and the final norm of one step (decoder_cpu.cpp, see decoder.h); writes the
// layers' keys and values into their caches.
void decoder_forward(const DecoderConfig& c, const DecoderStep& s);

// SIMD level (cpu_features.cpp): names as in isa_list.h ("scalar", "avx2", ...).
const char* active_isa_name();  // used by the kernels: the best one unless forced
const char* best_isa_name();    // the best this CPU supports and this build contains
// Forces a level by name ("auto" or a name of isa_list.h). Throws std::invalid_argument for
// an unknown name or a level this CPU lacks.
void set_isa(const std::string& name);

// Threads of the CPU kernels (thread_pool.cpp). n <= 0 restores the default
// (FASTINFER_NUM_THREADS, else the CPUs this process may use).
int num_threads();
void set_num_threads(int n);

}  // namespace fastinfer::cpu
