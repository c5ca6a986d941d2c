// The input checks shared by every binding: each raises TypeError/ValueError with a message that
// names the argument. Kernels below the binding layer trust their parameters completely.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "bindings/dlpack_view.h"
#include "fastinfer/attention.h"
#include "fastinfer/qlinear.h"

namespace fastinfer::bindings {

namespace py = pybind11;

template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

template <class... Args>
void check(bool ok, const Args&... msg) {
  if (!ok) throw py::value_error(cat(msg...));
}

using OptTensor = std::optional<TensorView>;
constexpr int64_t kInt32Max = 2147483647;

std::string py_repr(const py::handle& obj);
// A Python integer (int, numpy/torch integer scalar; not bool, not float) in [lo, hi]. pybind's own
// conversion of a C++ int parameter says only "incompatible function arguments" and names nothing.
int64_t int_arg(const py::handle& obj, const std::string& name, int64_t lo, int64_t hi);
// A real Python number (int or float, numpy scalars included; not bool) as a double.
double float_arg(const py::handle& obj, const std::string& name);

OptTensor view(const py::object& obj, const char* name);  // None -> nullopt
inline const TensorView* ptr(const OptTensor& t) { return t ? &*t : nullptr; }

DType float_dtype(const TensorView& t);  // float32, float16 or bfloat16, else TypeError
const char* dtype_name(DType d);
void check_same_dtype(const TensorView& t, DType want);
void check_rank(const TensorView& t, int rank, const char* layout);
void check_last_contiguous(const TensorView& t);
void check_shape(const TensorView& t, std::initializer_list<int64_t> want);
// Tensors of one call must live on one device. Returns the CUDA device id, or -1 for the CPU.
// A CUDA device that cannot run this build's kernels raises RuntimeError (check_cuda_device).
int check_devices(const std::vector<const TensorView*>& ts);

// cuda_device.cpp. Why a device of compute capability major.minor cannot run kernels compiled for
// `archs` (a CMake CUDA_ARCHITECTURES list joined by commas, e.g. "80,90a"), or "" when it can.
std::string cuda_arch_problem(int device, const std::string& name, int major, int minor, const std::string& archs);
#if defined(FASTINFER_WITH_CUDA)
std::string cuda_device_problem(int device);  // cuda_arch_problem of a device of this machine (cached)
void check_cuda_device(int device);           // std::runtime_error(cuda_device_problem) unless it is ""
#endif

// int32 vector of `len` elements, read by the kernels through a raw pointer (null for nullopt).
const int32_t* index_vector(const OptTensor& t, int64_t len);
// cu_seqlens (prefix sums of sequence lengths, flash-attn's layout): starts at 0, never decreases,
// and, where it indexes packed rows (total >= 0), ends inside them.
void check_cu_seqlens(const TensorView& t, const int32_t* cu, int64_t batch, int64_t total, const char* total_what);
// A tensor the kernels write: no two of its elements may share memory.
void check_writable(const TensorView& t);
// A written tensor must not share memory with any other operand of the call (null entries skipped).
void check_disjoint(const TensorView& written, std::initializer_list<const TensorView*> others);
// Sequence b's `len` keys fit its block_table row, and the blocks they use exist.
void check_block_row(const TensorView& table, int b, int64_t len, int block_size, int64_t num_blocks);

// The CPU-only ops (linear, pointwise, decoder).
DType linear_dtype(const TensorView& t);  // float32 or bfloat16
void check_cpu(const TensorView& t);
// A weight packed by linear_pack for an (n, k) matrix of `dtype`.
void check_packed(const TensorView& packed, DType dtype, int64_t n, int64_t k);
// x-like operand: CPU, float32/bfloat16 (= *dtype if given), `rank` dimensions, last one contiguous.
DType check_rows(const TensorView& t, int rank, const char* layout, const DType* dtype);

// The quantised linear: a qtype name ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"), in_features a
// positive multiple of its block (qtype_block_elems), and a packed weight of qlinear_packed_bytes(n, k, t)
// uint8 (check_qpacked checks k too).
QType qtype_arg(const std::string& name);
const char* qtype_name(QType t);
void check_qk(int64_t k, const char* what, QType t);
void check_qpacked(const TensorView& packed, QType t, int64_t n, int64_t k);

}  // namespace fastinfer::bindings
