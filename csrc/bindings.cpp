// Every Python binding of fastinfer._C, and the one place where inputs are checked.
// Kernels below this layer trust their parameters completely.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "cpu/attention_backward.h"
#include "cpu/attention_cpu.h"
#include "cpu/cpu_features.h"
#include "cpu/decoder_cpu.h"
#include "cpu/linear_cpu.h"
#include "cpu/pointwise_cpu.h"
#include "cpu/thread_pool.h"
#include "dlpack_view.h"
#include "fastinfer/attention.h"
#include "fastinfer/attention_backward.h"
#include "fastinfer/decoder.h"

#if defined(FASTINFER_WITH_CUDA)
#include <cuda_runtime.h>

#include "cuda/attention_bwd.h"
#include "cuda/attention_cuda.h"
#include "cuda/cuda_runtime_info.h"
#endif

namespace py = pybind11;
using namespace fastinfer;

namespace {

// ---------------------------------------------------------------- checks
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

std::string py_repr(const py::handle& obj) { return py::repr(obj).cast<std::string>(); }

// A Python integer (int, numpy/torch integer scalar; not bool, not float) in [lo, hi]. pybind's own
// conversion of a C++ int parameter says only "incompatible function arguments" and names nothing.
int64_t int_arg(const py::handle& obj, const std::string& name, int64_t lo, int64_t hi) {
  if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
    throw py::type_error(cat(name, ": expected an int in [", lo, ", ", hi, "], got ", py_repr(obj), " (",
                             py::type::of(obj).attr("__name__").cast<std::string>(), ")"));
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  check(!overflow && v >= lo && v <= hi, name, ": expected an int in [", lo, ", ", hi, "], got ", py_repr(obj));
  return v;
}

// A real Python number (int or float, numpy scalars included; not bool) as a double.
double float_arg(const py::handle& obj, const std::string& name) {
  if (PyBool_Check(obj.ptr()) || !(PyFloat_Check(obj.ptr()) || PyIndex_Check(obj.ptr()) || py::hasattr(obj, "__float__")))
    throw py::type_error(cat(name, ": expected a number, got ", py_repr(obj), " (",
                             py::type::of(obj).attr("__name__").cast<std::string>(), ")"));
  const double v = PyFloat_AsDouble(obj.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(cat(name, ": expected a number representable as a float, got ", py_repr(obj)));
  }
  return v;
}

constexpr int64_t kInt32Max = 2147483647;

OptTensor view(const py::object& obj, const char* name) {
  if (obj.is_none()) return std::nullopt;
  return TensorView(obj, name);
}

DType float_dtype(const TensorView& t) {
  if (t.is(dl::kFloat, 32)) return DType::kFloat32;
  if (t.is(dl::kFloat, 16)) return DType::kFloat16;
  if (t.is(dl::kBfloat, 16)) return DType::kBFloat16;
  throw py::type_error(cat(t.name(), ": expected dtype float32, float16 or bfloat16, got ", t.dtype_str()));
}

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "float32" : d == DType::kFloat16 ? "float16" : "bfloat16";
}

void check_same_dtype(const TensorView& t, DType want) {
  if (float_dtype(t) != want)
    throw py::type_error(cat(t.name(), ": expected dtype ", dtype_name(want), " (same as q), got ", t.dtype_str()));
}

void check_rank(const TensorView& t, int rank, const char* layout) {
  check(t.dim() == rank, t.name(), ": expected ", rank, " dimensions ", layout, ", got shape ", t.shape());
}

void check_last_contiguous(const TensorView& t) {
  check(t.size(t.dim() - 1) <= 1 || t.stride(t.dim() - 1) == 1, t.name(),
        ": the last dimension must be contiguous (stride 1), got stride ", t.stride(t.dim() - 1),
        "; call .contiguous() first");
}

void check_shape(const TensorView& t, std::initializer_list<int64_t> want) {
  bool ok = t.dim() == static_cast<int>(want.size());
  int i = 0;
  for (int64_t w : want) ok = ok && (i < t.dim() && t.size(i++) == w);
  if (!ok) {
    std::ostringstream s;
    s << "(";
    i = 0;
    for (int64_t w : want) s << (i++ ? ", " : "") << w;
    s << (want.size() == 1 ? ",)" : ")");
    throw py::value_error(cat(t.name(), ": expected shape ", s.str(), ", got ", t.shape()));
  }
}

// Tensors of one call must live on one device. Returns the CUDA device id, or -1 for the CPU.
int check_devices(const std::vector<const TensorView*>& ts) {
  const TensorView& first = *ts.front();
  for (const TensorView* t : ts)
    if (!t->same_device(first))
      throw py::value_error(cat(t->name(), " is on ", t->device_str(), " but ", first.name(), " is on ", first.device_str()));
  if (first.is_cuda()) {
#if defined(FASTINFER_WITH_CUDA)
    return first.device_id();
#else
    throw py::value_error(cat(first.name(), " is on ", first.device_str(),
                              ": this build of fastinfer has no CUDA kernels (it was built without a CUDA compiler); "
                              "use CPU tensors or reinstall with FASTINFER_CUDA=on"));
#endif
  }
  if (!first.is_cpu()) throw py::value_error(cat(first.name(), ": unsupported device ", first.device_str()));
  return -1;
}

// Where and how a call runs. Index arrays on a GPU are not read by the host (that would
// synchronise): their values are bounded by the kernels instead, using these sizes.
struct Launch {
  int device = -1;        // CUDA device id, -1 = CPU
  uintptr_t stream = 0;   // cudaStream_t of the caller (torch's current stream)
  py::object workspace_alloc;  // callable(nbytes) -> device buffer, or None
  int64_t q_rows = 0, kv_rows = 0, block_table_cols = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0, seqlens_k_add = 0;
  bool on_host() const { return device < 0; }
};

#if defined(FASTINFER_WITH_CUDA)
// Runs a CUDA call on the tensors' device, restoring the caller's current device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (device != previous_) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};
#endif

// int32 vector of `len` elements, read by the kernels through a raw pointer.
const int32_t* index_vector(const OptTensor& t, int64_t len) {
  if (!t) return nullptr;
  if (!t->is(dl::kInt, 32)) throw py::type_error(cat(t->name(), ": expected dtype int32, got ", t->dtype_str()));
  check_shape(*t, {len});
  check(len <= 1 || t->stride(0) == 1, t->name(), ": must be contiguous");
  return t->data<const int32_t>();
}

// cu_seqlens (prefix sums of sequence lengths, flash-attn's layout): starts at 0, never decreases,
// and, where it indexes packed rows (total >= 0), ends inside them. Rows past the last entry are
// allowed (flash-attn accepts them: padded batches); the forward writes zeros there.
void check_cu_seqlens(const TensorView& t, const int32_t* cu, int64_t batch, int64_t total, const char* total_what) {
  check(cu[0] == 0, t.name(), "[0] must be 0 (cu_seqlens are prefix sums of the sequence lengths), got ", cu[0]);
  for (int64_t b = 0; b < batch; ++b)
    check(cu[b + 1] >= cu[b], t.name(), " must be non-decreasing, but ", t.name(), "[", b + 1, "] = ", cu[b + 1],
          " < ", t.name(), "[", b, "] = ", cu[b]);
  check(total < 0 || cu[batch] <= total, t.name(), "[-1] = ", cu[batch], " exceeds the ", total, " ", total_what);
}

// A tensor the kernels write: no two of its elements may share memory (a zero stride from
// expand(), or overlapping strides), as torch refuses in-place writes to such tensors.
void check_writable(const TensorView& t) {
  check(!t.overlaps_itself(), t.name(), ": this tensor is written, but some of its elements share memory (strides ",
        t.strides_str(), " for shape ", t.shape(), ", e.g. from expand()); pass a tensor with its own storage (.clone())");
}

// A written tensor must not share memory with any other operand of the call (null entries skipped).
void check_disjoint(const TensorView& written, std::initializer_list<const TensorView*> others) {
  for (const TensorView* o : others)
    if (o && o != &written)
      check(!written.shares_memory_with(*o), written.name(), ": must not overlap ", o->name(),
            " (they share memory, and ", written.name(), " is written while ", o->name(), " is in use)");
}

const TensorView* ptr(const OptTensor& t) { return t ? &*t : nullptr; }

// Sequence b's `len` keys fit its block_table row, and the blocks they use exist.
void check_block_row(const TensorView& table, int b, int64_t len, int block_size, int64_t num_blocks) {
  const int64_t capacity = table.size(1) * block_size;
  check(len <= capacity, "sequence ", b, " has ", len, " keys but its block_table row holds only ", capacity, " (",
        table.size(1), " blocks of ", block_size, ")");
  const int32_t* row = table.data<const int32_t>() + b * table.stride(0);
  for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i)
    check(row[i] >= 0 && row[i] < num_blocks, "block_table[", b, ", ", i, "] = ", row[i], " is out of range [0, ",
          num_blocks, ")");
}

// ---------------------------------------------------------------- attention
struct AttentionOptions {
  float softmax_scale = 0.f;
  float softcap = 0.f;
  int window_left = -1, window_right = -1;
  int num_splits = 0;
  int max_seqlen_q = 0, max_seqlen_k = 0;  // hints for GPU launches (0 = unknown); the CPU derives lengths itself
};

// The tensors of one attention call, viewed once. seqlens_k_override (lengths computed
// by the binding, e.g. after an append) replaces seqlens_k when set.
struct AttentionTensors {
  TensorView q, k, v, out;
  OptTensor lse, cu_q, cu_k, seqlens_k, kv_idx, block_table, alibi;
  const int32_t* seqlens_k_override = nullptr;
};

AttentionParams make_params(const AttentionTensors& in, const AttentionOptions& opt, Launch& launch) {
  const TensorView &q = in.q, &k = in.k, &v = in.v, &out = in.out;
  const OptTensor &lse = in.lse, &cu_q = in.cu_q, &cu_k = in.cu_k, &seqlens_k = in.seqlens_k, &kv_idx = in.kv_idx,
                  &block_table = in.block_table, &alibi = in.alibi;
  std::vector<const TensorView*> all = {&q, &k, &v, &out};
  for (const OptTensor* t : {&lse, &cu_q, &cu_k, &seqlens_k, &kv_idx, &block_table, &alibi})
    if (*t) all.push_back(&**t);
  launch.device = check_devices(all);
  const bool host = launch.on_host();  // index values can be checked here only when they live on the host

  const DType dtype = float_dtype(q);
  check_same_dtype(k, dtype);
  check_same_dtype(v, dtype);
  check_same_dtype(out, dtype);

  AttentionParams p{};
  p.dtype = dtype;
  const bool varlen_q = cu_q.has_value(), paged = block_table.has_value();
  if (varlen_q) check_rank(q, 3, "(total_q, nheads, headdim)");
  else check_rank(q, 4, "(batch, seqlen_q, nheads, headdim)");
  const int qd = q.dim();
  p.num_heads = static_cast<int>(q.size(qd - 2));
  p.head_dim = static_cast<int>(q.size(qd - 1));
  check(p.head_dim % 8 == 0 && p.head_dim >= 8 && p.head_dim <= cpu::kMaxHeadDim, "q: head dimension must be a multiple of 8 in [8, ",
        cpu::kMaxHeadDim, "], got ", p.head_dim);
  check(p.num_heads > 0, "q: number of heads must be positive");
  for (const TensorView* t : {&q, &k, &v, &out}) check_last_contiguous(*t);

  // Queries and output.
  if (varlen_q) {
    p.batch = static_cast<int>(cu_q->size(0) - 1);
    check(cu_q->dim() == 1 && cu_q->size(0) >= 1, "cu_seqlens_q: expected shape (batch + 1,), got ", cu_q->shape());
    p.cu_seqlens_q = index_vector(cu_q, p.batch + 1);
    if (host) check_cu_seqlens(*cu_q, p.cu_seqlens_q, p.batch, q.size(0), "rows of q");
    launch.q_rows = q.size(0);
    p.q_batch_stride = 0;
  } else {
    p.batch = static_cast<int>(q.size(0));
    p.seqlen_q = static_cast<int>(q.size(1));
    p.q_batch_stride = q.stride(0);
  }
  p.q = q.data();
  p.q_row_stride = q.stride(qd - 3);
  p.q_head_stride = q.stride(qd - 2);
  check(out.dim() == qd, "out: expected the shape of q ", q.shape(), ", got ", out.shape());
  for (int i = 0; i < qd; ++i)
    check(out.size(i) == q.size(i), "out: expected the shape of q ", q.shape(), ", got ", out.shape());
  p.out = out.data();
  p.o_batch_stride = varlen_q ? 0 : out.stride(0);
  p.o_row_stride = out.stride(qd - 3);
  p.o_head_stride = out.stride(qd - 2);

  // Keys and values.
  const char* kv_layout = paged ? "(num_blocks, block_size, nheads_k, headdim)"
                          : (cu_k && !paged) ? "(total_k, nheads_k, headdim)"
                                             : "(batch, seqlen_k, nheads_k, headdim)";
  const bool varlen_k = cu_k.has_value() && !paged;
  check_rank(k, varlen_k ? 3 : 4, kv_layout);
  check_rank(v, varlen_k ? 3 : 4, kv_layout);
  for (int i = 0; i < k.dim(); ++i)
    check(k.size(i) == v.size(i), v.name(), ": expected the shape of ", k.name(), " ", k.shape(), ", got ", v.shape());
  const int kd = k.dim();
  p.num_kv_heads = static_cast<int>(k.size(kd - 2));
  check(k.size(kd - 1) == p.head_dim, k.name(), ": head dimension ", k.size(kd - 1), " does not match q's ", p.head_dim);
  check(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0, "number of query heads (", p.num_heads,
        ") must be a multiple of the number of key/value heads (", p.num_kv_heads, ")");
  p.k = k.data();
  p.v = v.data();
  p.k_row_stride = k.stride(kd - 3);
  p.k_head_stride = k.stride(kd - 2);
  p.v_row_stride = v.stride(kd - 3);
  p.v_head_stride = v.stride(kd - 2);
  p.k_batch_stride = varlen_k ? 0 : k.stride(0);
  p.v_batch_stride = varlen_k ? 0 : v.stride(0);

  if (cu_k) {
    p.cu_seqlens_k = index_vector(cu_k, p.batch + 1);
    // paged: cu_seqlens_k only gives the lengths (the block table places the keys)
    if (host) check_cu_seqlens(*cu_k, p.cu_seqlens_k, p.batch, varlen_k ? k.size(0) : -1, "rows of k");
  }
  p.seqlens_k = in.seqlens_k_override ? in.seqlens_k_override : index_vector(seqlens_k, p.batch);
  launch.kv_rows = k.size(0);
  if (host && p.seqlens_k)
    for (int b = 0; b < p.batch; ++b) check(p.seqlens_k[b] >= 0, "cache_seqlens[", b, "] = ", p.seqlens_k[b], " is negative");

  int64_t capacity;  // keys a sequence may hold
  if (paged) {
    check(block_table->dim() == 2 && block_table->size(0) == p.batch, "block_table: expected shape (batch=", p.batch,
          ", max_blocks_per_seq), got ", block_table->shape());
    if (!block_table->is(dl::kInt, 32))
      throw py::type_error(cat("block_table: expected dtype int32, got ", block_table->dtype_str()));
    check(block_table->size(1) <= 1 || block_table->stride(1) == 1, "block_table: rows must be contiguous");
    check(p.seqlens_k || p.cu_seqlens_k, "a paged KV cache needs cache_seqlens (or cu_seqlens_k) to know each sequence's length");
    p.block_table = block_table->data<const int32_t>();
    p.block_table_stride = block_table->stride(0);
    p.block_size = static_cast<int>(k.size(1));
    check(p.block_size >= 1, k.name(), ": block_size must be >= 1");
    capacity = block_table->size(1) * p.block_size;
    launch.block_table_cols = block_table->size(1);
    for (int b = 0; host && b < p.batch; ++b) check_block_row(*block_table, b, p.k_len(b), p.block_size, k.size(0));
  } else if (varlen_k) {
    capacity = k.size(0);
  } else {
    capacity = k.size(1);
    p.seqlen_k = static_cast<int>(k.size(1));
    p.kv_batch_idx = index_vector(kv_idx, p.batch);
    if (p.kv_batch_idx) {
      for (int b = 0; host && b < p.batch; ++b)
        check(p.kv_batch_idx[b] >= 0 && p.kv_batch_idx[b] < k.size(0), "cache_batch_idx[", b, "] = ", p.kv_batch_idx[b],
              " is out of range [0, ", k.size(0), ")");
    } else {
      check(k.size(0) == p.batch, k.name(), ": batch size ", k.size(0), " does not match q's ", p.batch);
    }
    if (host && p.seqlens_k)
      for (int b = 0; b < p.batch; ++b)
        check(p.seqlens_k[b] <= capacity, "cache_seqlens[", b, "] = ", p.seqlens_k[b], " exceeds the cache length ", capacity);
  }
  check(!kv_idx || (!paged && !varlen_k), "cache_batch_idx only applies to a dense (non-paged) cache");
  (void)capacity;

  // Log-sum-exp output.
  if (lse) {
    if (!lse->is(dl::kFloat, 32)) throw py::type_error(cat(lse->name(), ": expected dtype float32, got ", lse->dtype_str()));
    if (varlen_q) {
      check_shape(*lse, {p.num_heads, q.size(0)});
      p.lse_batch_stride = 0;
      p.lse_head_stride = lse->stride(0);
      p.lse_row_stride = lse->stride(1);
    } else {
      check_shape(*lse, {p.batch, p.num_heads, p.seqlen_q});
      p.lse_batch_stride = lse->stride(0);
      p.lse_head_stride = lse->stride(1);
      p.lse_row_stride = lse->stride(2);
    }
    p.lse = lse->data<float>();
  }

  if (alibi) {
    if (!alibi->is(dl::kFloat, 32)) throw py::type_error(cat("alibi_slopes: expected dtype float32, got ", alibi->dtype_str()));
    if (alibi->dim() == 1) {
      check_shape(*alibi, {p.num_heads});
      p.alibi_batch_stride = 0;
    } else {
      check_shape(*alibi, {p.batch, p.num_heads});
      p.alibi_batch_stride = alibi->stride(0);
    }
    check_last_contiguous(*alibi);
    p.alibi_slopes = alibi->data<const float>();
  }

  // Written: out and lse, each on its own memory, apart from every input.
  check_writable(out);
  check_disjoint(out, {&q, &k, &v, ptr(lse), ptr(cu_q), ptr(cu_k), ptr(seqlens_k), ptr(kv_idx), ptr(block_table), ptr(alibi)});
  if (lse) {
    check_writable(*lse);
    check_disjoint(*lse, {&q, &k, &v, ptr(cu_q), ptr(cu_k), ptr(seqlens_k), ptr(kv_idx), ptr(block_table), ptr(alibi)});
  }

  check(std::isfinite(opt.softmax_scale), "softmax_scale must be finite, got ", opt.softmax_scale);
  // 1/softcap scales every score: it must be finite too.
  check(opt.softcap == 0.f || (opt.softcap > 0.f && std::isfinite(opt.softcap) && std::isfinite(1.f / opt.softcap)),
        "softcap must be >= 0 and finite (0 = off), with a finite inverse, got ", opt.softcap);
  check(opt.window_left >= -1 && opt.window_right >= -1, "window_size entries must be >= -1 (-1 = unbounded), got (",
        opt.window_left, ", ", opt.window_right, ")");
  check(opt.num_splits >= 0, "num_splits must be >= 0, got ", opt.num_splits);
  launch.max_seqlen_q = opt.max_seqlen_q;
  launch.max_seqlen_k = opt.max_seqlen_k;
  p.softmax_scale = opt.softmax_scale;
  p.softcap = opt.softcap;
  p.window_left = opt.window_left;
  p.window_right = opt.window_right;
  p.num_splits = opt.num_splits;
  return p;
}

#if defined(FASTINFER_WITH_CUDA)
cuda::AttentionExtras cuda_extras(const Launch& launch) {
  cuda::AttentionExtras x;
  x.q_rows = launch.q_rows;
  x.kv_rows = launch.kv_rows;
  x.block_table_cols = launch.block_table_cols;
  x.max_seqlen_q = launch.max_seqlen_q;
  x.max_seqlen_k = launch.max_seqlen_k;
  x.seqlens_k_add = launch.seqlens_k_add;
  return x;
}
#endif

void run_attention(const AttentionParams& p, const TensorView& q, const Launch& launch) {
  if (q.numel() == 0) return;
  if (launch.on_host()) {
    py::gil_scoped_release release;
    if (p.cu_seqlens_q) cpu::zero_rows_outside(p, launch.q_rows);  // padded varlen batches: no garbage rows
    if (p.batch > 0) cpu::attention_forward(p);
    return;
  }
  if (p.batch == 0 && !p.cu_seqlens_q) return;
#if defined(FASTINFER_WITH_CUDA)
  DeviceGuard guard(launch.device);
  const cuda::AttentionExtras x = cuda_extras(launch);
  // The split-KV workspace comes from the caller's allocator (torch's caching allocator on
  // the same stream), so it is ordered with the launch and never allocated by a kernel.
  const size_t need = cuda::attention_workspace_bytes(p, x, 0);
  py::object buffer;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  if (need > 0 && !launch.workspace_alloc.is_none()) {
    buffer = launch.workspace_alloc(need);
    TensorView view(buffer, "workspace");
    ws = view.data();
    ws_bytes = need;
  }
  py::gil_scoped_release release;
  cuda::attention_forward(p, x, ws, ws_bytes, reinterpret_cast<cudaStream_t>(launch.stream));
#endif
}

void attention_forward(const py::object& q, const py::object& k, const py::object& v, const py::object& out,
                       const py::object& lse, const py::object& cu_seqlens_q, const py::object& cu_seqlens_k,
                       const py::object& seqlens_k, const py::object& kv_batch_idx, const py::object& block_table,
                       const py::object& alibi_slopes, const AttentionOptions& opt, uintptr_t stream,
                       const py::object& workspace_alloc) {
  AttentionTensors in{TensorView(q, "q"),
                      TensorView(k, "k"),
                      TensorView(v, "v"),
                      TensorView(out, "out"),
                      view(lse, "softmax_lse"),
                      view(cu_seqlens_q, "cu_seqlens_q"),
                      view(cu_seqlens_k, "cu_seqlens_k"),
                      view(seqlens_k, "cache_seqlens"),
                      view(kv_batch_idx, "cache_batch_idx"),
                      view(block_table, "block_table"),
                      view(alibi_slopes, "alibi_slopes")};
  Launch launch;
  launch.stream = stream;
  launch.workspace_alloc = workspace_alloc;
  const AttentionParams p = make_params(in, opt, launch);
  run_attention(p, in.q, launch);
}

// ---------------------------------------------------------------- attention backward
// A gradient tensor: the shape and dtype of `like`, last dimension contiguous.
void check_grad(const TensorView& t, const TensorView& like, DType dtype) {
  check_same_dtype(t, dtype);
  check(t.dim() == like.dim(), t.name(), ": expected the shape of ", like.name(), " ", like.shape(), ", got ", t.shape());
  for (int i = 0; i < like.dim(); ++i)
    check(t.size(i) == like.size(i), t.name(), ": expected the shape of ", like.name(), " ", like.shape(), ", got ", t.shape());
  check_last_contiguous(t);
}

// Gradients dq, dk, dv of attention_forward (dense or varlen layouts) from dout, the forward's
// out and lse. Every check runs before anything is written.
void attention_backward(const py::object& dout, const py::object& q, const py::object& k, const py::object& v,
                        const py::object& out, const py::object& lse, const py::object& dq, const py::object& dk,
                        const py::object& dv, const py::object& cu_seqlens_q, const py::object& cu_seqlens_k,
                        const py::object& alibi_slopes, const AttentionOptions& opt, bool deterministic,
                        uintptr_t stream, const py::object& workspace_alloc) {
  check(!lse.is_none(), "lse: the forward's log-sum-exp is required (return_attn_probs=True / return_softmax_lse=True)");
  check(cu_seqlens_q.is_none() == cu_seqlens_k.is_none(),
        "cu_seqlens_q and cu_seqlens_k must be given together (varlen layout) or both omitted (dense layout)");
  AttentionTensors in{TensorView(q, "q"),
                      TensorView(k, "k"),
                      TensorView(v, "v"),
                      TensorView(out, "out"),
                      view(lse, "lse"),
                      view(cu_seqlens_q, "cu_seqlens_q"),
                      view(cu_seqlens_k, "cu_seqlens_k"),
                      std::nullopt,
                      std::nullopt,
                      std::nullopt,
                      view(alibi_slopes, "alibi_slopes")};
  TensorView g(dout, "dout"), gq(dq, "dq"), gk(dk, "dk"), gv(dv, "dv");
  Launch launch;
  launch.stream = stream;
  launch.workspace_alloc = workspace_alloc;
  AttentionBackwardParams bp{};
  bp.fwd = make_params(in, opt, launch);
  const AttentionParams& p = bp.fwd;
  const int device = check_devices({&in.q, &g, &gq, &gk, &gv});
  check(device == launch.device, "dout, dq, dk, dv must be on the device of q");
  check_grad(g, in.q, p.dtype);
  check_grad(gq, in.q, p.dtype);
  check_grad(gk, in.k, p.dtype);
  check_grad(gv, in.v, p.dtype);
  for (const TensorView* t : {&gq, &gk, &gv}) {
    check_writable(*t);
    check_disjoint(*t, {&gq, &gk, &gv, &g, &in.q, &in.k, &in.v, &in.out, ptr(in.lse), ptr(in.cu_q), ptr(in.cu_k), ptr(in.alibi)});
  }
  const int qd = in.q.dim(), kd = in.k.dim();
  const bool varlen = p.cu_seqlens_q != nullptr;
  bp.dout = g.data();
  bp.do_batch_stride = varlen ? 0 : g.stride(0);
  bp.do_row_stride = g.stride(qd - 3);
  bp.do_head_stride = g.stride(qd - 2);
  bp.dq = gq.data();
  bp.dq_batch_stride = varlen ? 0 : gq.stride(0);
  bp.dq_row_stride = gq.stride(qd - 3);
  bp.dq_head_stride = gq.stride(qd - 2);
  bp.dk = gk.data();
  bp.dk_batch_stride = varlen ? 0 : gk.stride(0);
  bp.dk_row_stride = gk.stride(kd - 3);
  bp.dk_head_stride = gk.stride(kd - 2);
  bp.dv = gv.data();
  bp.dv_batch_stride = varlen ? 0 : gv.stride(0);
  bp.dv_row_stride = gv.stride(kd - 3);
  bp.dv_head_stride = gv.stride(kd - 2);
  bp.total_q = varlen ? in.q.size(0) : 0;
  bp.total_k = varlen ? in.k.size(0) : 0;
  bp.deterministic = deterministic;
  if (in.q.numel() == 0 && in.k.numel() == 0) return;
  if (launch.on_host()) {
    py::gil_scoped_release release;
    cpu::attention_backward(bp);
    return;
  }
#if defined(FASTINFER_CUDA_BACKWARD)
  DeviceGuard guard(launch.device);
  const cuda::AttentionExtras x = cuda_extras(launch);
  const size_t need = cuda::attention_backward_workspace_bytes(bp, x);
  py::object buffer;
  void* ws = nullptr;
  if (need > 0) {
    check(!launch.workspace_alloc.is_none(), "attention_backward on a GPU needs workspace_alloc (", need, " bytes)");
    buffer = launch.workspace_alloc(need);
    TensorView wview(buffer, "workspace");
    ws = wview.data();
  }
  py::gil_scoped_release release;
  cuda::attention_backward(bp, x, ws, need, reinterpret_cast<cudaStream_t>(launch.stream));
#else
  throw py::value_error("attention_backward: this build has no CUDA backward kernels; use CPU tensors");
#endif
}

// ---------------------------------------------------------------- KV cache writes
struct CacheViews {
  KVWriteParams p{};
  int64_t num_slots;
};

CacheViews cache_params(const TensorView& key, const TensorView& value, const TensorView& k_cache, const TensorView& v_cache,
                        const char* src_layout) {
  check_devices({&key, &value, &k_cache, &v_cache});
  const DType dtype = float_dtype(k_cache);
  for (const TensorView* t : {&v_cache, &key, &value})
    if (float_dtype(*t) != dtype)
      throw py::type_error(cat(t->name(), ": expected dtype ", dtype_name(dtype), " (same as k_cache), got ", t->dtype_str()));
  check_rank(k_cache, 4, "(num_blocks, block_size, nheads_k, headdim)");
  for (int i = 0; i < 4; ++i)
    check(v_cache.size(i) == k_cache.size(i), "v_cache: expected the shape of k_cache ", k_cache.shape(), ", got ",
          v_cache.shape());
  const int kd = key.dim();
  for (int i = 0; i < kd; ++i)
    check(value.size(i) == key.size(i), value.name(), ": expected the shape of ", key.name(), " ", key.shape(), ", got ",
          value.shape());
  check(key.size(kd - 2) == k_cache.size(2) && key.size(kd - 1) == k_cache.size(3), key.name(), ": expected ", src_layout,
        " with nheads_k=", k_cache.size(2), " and headdim=", k_cache.size(3), ", got ", key.shape());
  for (const TensorView* t : {&key, &value, &k_cache, &v_cache}) check_last_contiguous(*t);
  for (const TensorView* t : {&k_cache, &v_cache}) {
    check_writable(*t);
    check_disjoint(*t, {&k_cache, &v_cache, &key, &value});
  }
  CacheViews c;
  KVWriteParams& p = c.p;
  p.dtype = dtype;
  p.num_kv_heads = static_cast<int>(k_cache.size(2));
  p.head_dim = static_cast<int>(k_cache.size(3));
  p.key = key.data();
  p.value = value.data();
  p.key_row_stride = key.stride(kd - 3);
  p.key_head_stride = key.stride(kd - 2);
  p.value_row_stride = value.stride(kd - 3);
  p.value_head_stride = value.stride(kd - 2);
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.k_block_stride = k_cache.stride(0);
  p.k_row_stride = k_cache.stride(1);
  p.k_head_stride = k_cache.stride(2);
  p.v_block_stride = v_cache.stride(0);
  p.v_row_stride = v_cache.stride(1);
  p.v_head_stride = v_cache.stride(2);
  p.block_size = static_cast<int>(k_cache.size(1));
  c.num_slots = k_cache.size(0) * k_cache.size(1);
  return c;
}

void reshape_and_cache(const py::object& key_obj, const py::object& value_obj, const py::object& k_cache_obj,
                       const py::object& v_cache_obj, const py::object& slot_obj, uintptr_t stream) {
  TensorView key(key_obj, "key"), value(value_obj, "value"), k_cache(k_cache_obj, "k_cache"), v_cache(v_cache_obj, "v_cache"),
      slots(slot_obj, "slot_mapping");
  check_rank(key, 3, "(num_tokens, nheads_k, headdim)");
  CacheViews c = cache_params(key, value, k_cache, v_cache, "(num_tokens, nheads_k, headdim)");
  const int device = check_devices({&key, &slots});
  if (!slots.is(dl::kInt, 64)) throw py::type_error(cat("slot_mapping: expected dtype int64, got ", slots.dtype_str()));
  check_shape(slots, {key.size(0)});
  check(key.size(0) <= 1 || slots.stride(0) == 1, "slot_mapping: must be contiguous");
  for (const TensorView* t : {&k_cache, &v_cache}) check_disjoint(*t, {&slots});
  const int64_t* slot = slots.data<const int64_t>();
  for (int64_t i = 0; device < 0 && i < key.size(0); ++i)  // on a GPU the kernel skips out-of-range slots instead
    check(slot[i] < c.num_slots, "slot_mapping[", i, "] = ", slot[i], " is out of range: the cache has ", c.num_slots,
          " slots (", k_cache.size(0), " blocks of ", k_cache.size(1), ")");
  c.p.num_tokens = static_cast<int>(key.size(0));
  c.p.slot_mapping = slot;
  if (c.p.num_tokens == 0) return;
  if (device < 0) {
    py::gil_scoped_release release;
    cpu::kv_write(c.p);
    return;
  }
#if defined(FASTINFER_WITH_CUDA)
  DeviceGuard guard(device);
  py::gil_scoped_release release;
  cuda::kv_write(c.p, c.num_slots, reinterpret_cast<cudaStream_t>(stream));
#endif
}

// flash_attn_with_kvcache's append: k_new[b, i] goes to position cache_seqlens[b] + i of
// sequence b. Validates everything and returns the slot of every new row; writes nothing.
std::vector<int64_t> plan_append(const TensorView& key, const TensorView& value, const TensorView& k_cache,
                                 const TensorView& v_cache, const int32_t* lens, const OptTensor& kv_idx,
                                 const OptTensor& block_table, CacheViews& c) {
  check_rank(key, 4, "(batch, seqlen_new, nheads_k, headdim)");
  c = cache_params(key, value, k_cache, v_cache, "(batch, seqlen_new, nheads_k, headdim)");
  const int64_t batch = key.size(0), snew = key.size(1);
  std::vector<int64_t> slots(batch * snew);
  if (block_table) {
    check(!kv_idx, "cache_batch_idx only applies to a dense (non-paged) cache");
    if (!block_table->is(dl::kInt, 32))
      throw py::type_error(cat("block_table: expected dtype int32, got ", block_table->dtype_str()));
    check(block_table->dim() == 2 && block_table->size(0) == batch, "block_table: expected shape (batch=", batch,
          ", max_blocks_per_seq), got ", block_table->shape());
    const int32_t* bt = block_table->data<const int32_t>();
    const int64_t bs = c.p.block_size, cap = block_table->size(1) * bs, nblocks = k_cache.size(0);
    for (int64_t b = 0; b < batch; ++b) {
      check(lens[b] >= 0 && lens[b] + snew <= cap, "cache_seqlens[", b, "] = ", lens[b], " plus ", snew,
            " new tokens exceeds the ", cap, " slots of its block_table row");
      for (int64_t i = 0; i < snew; ++i) {
        const int64_t pos = lens[b] + i;
        const int32_t blk = bt[b * block_table->stride(0) + (pos / bs) * block_table->stride(1)];
        check(blk >= 0 && blk < nblocks, "block_table[", b, ", ", pos / bs, "] = ", blk, " is out of range [0, ", nblocks, ")");
        slots[b * snew + i] = blk * bs + pos % bs;
      }
    }
  } else {
    // A dense cache is a paged one whose blocks are whole sequences.
    const int32_t* idx = index_vector(kv_idx, batch);
    const int64_t cap = k_cache.size(1);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t row = idx ? idx[b] : b;
      check(row >= 0 && row < k_cache.size(0), "cache_batch_idx[", b, "] = ", row, " is out of range [0, ", k_cache.size(0), ")");
      check(lens[b] >= 0 && lens[b] + snew <= cap, "cache_seqlens[", b, "] = ", lens[b], " plus ", snew,
            " new tokens exceeds the cache length ", cap);
      for (int64_t i = 0; i < snew; ++i) slots[b * snew + i] = row * cap + lens[b] + i;
    }
  }
  return slots;
}

void run_append(const TensorView& key, const TensorView& value, const CacheViews& c, const std::vector<int64_t>& slots) {
  const int64_t batch = key.size(0), snew = key.size(1);
  if (batch * snew == 0) return;
  py::gil_scoped_release release;
  // One write per sequence: the new rows of sequence b are strided by k.stride(1).
  for (int64_t b = 0; b < batch; ++b) {
    KVWriteParams p = c.p;
    p.key = static_cast<const char*>(c.p.key) + dtype_size(p.dtype) * b * key.stride(0);
    p.value = static_cast<const char*>(c.p.value) + dtype_size(p.dtype) * b * value.stride(0);
    p.num_tokens = static_cast<int>(snew);
    p.slot_mapping = slots.data() + b * snew;
    cpu::kv_write(p);
  }
}

#if defined(FASTINFER_WITH_CUDA)
void run_append_cuda(const TensorView& key, const TensorView& value, const TensorView& k_cache, const TensorView& v_cache,
                     const AttentionParams& p, const Launch& launch) {
  cuda::KVAppendParams a{};
  a.dtype = p.dtype;
  a.batch = static_cast<int>(key.size(0));
  a.seqlen_new = static_cast<int>(key.size(1));
  a.num_kv_heads = static_cast<int>(key.size(2));
  a.head_dim = static_cast<int>(key.size(3));
  a.k_new = key.data();
  a.v_new = value.data();
  a.k_new_batch_stride = key.stride(0);
  a.k_new_row_stride = key.stride(1);
  a.k_new_head_stride = key.stride(2);
  a.v_new_batch_stride = value.stride(0);
  a.v_new_row_stride = value.stride(1);
  a.v_new_head_stride = value.stride(2);
  a.k_cache = k_cache.data();
  a.v_cache = v_cache.data();
  a.k_batch_stride = k_cache.stride(0);
  a.k_row_stride = k_cache.stride(1);
  a.k_head_stride = k_cache.stride(2);
  a.v_batch_stride = v_cache.stride(0);
  a.v_row_stride = v_cache.stride(1);
  a.v_head_stride = v_cache.stride(2);
  a.seqlens = p.seqlens_k;
  a.kv_batch_idx = p.kv_batch_idx;
  a.block_table = p.block_table;
  a.block_table_stride = p.block_table_stride;
  a.block_size = p.block_size;
  a.cache_entries = k_cache.size(0);
  a.capacity = p.block_table ? launch.block_table_cols * p.block_size : k_cache.size(1);
  DeviceGuard guard(launch.device);
  py::gil_scoped_release release;
  cuda::kv_append(a, reinterpret_cast<cudaStream_t>(launch.stream));
}
#endif

// flash_attn_with_kvcache: every check (append and attention) runs before the cache is
// touched, so a rejected call leaves the cache as it was.
void attention_with_kvcache(const py::object& q, const py::object& k_cache, const py::object& v_cache, const py::object& out,
                            const py::object& k_new, const py::object& v_new, const py::object& lse,
                            const py::object& cache_seqlens, const py::object& cache_batch_idx,
                            const py::object& block_table, const py::object& alibi_slopes, const AttentionOptions& opt,
                            uintptr_t stream, const py::object& workspace_alloc) {
  AttentionTensors in{TensorView(q, "q"),
                      TensorView(k_cache, "k_cache"),
                      TensorView(v_cache, "v_cache"),
                      TensorView(out, "out"),
                      view(lse, "softmax_lse"),
                      std::nullopt,
                      std::nullopt,
                      view(cache_seqlens, "cache_seqlens"),
                      view(cache_batch_idx, "cache_batch_idx"),
                      view(block_table, "block_table"),
                      view(alibi_slopes, "alibi_slopes")};
  check(k_new.is_none() == v_new.is_none(), "k and v must be given together");
  check(!in.block_table || in.seqlens_k, "a paged KV cache (block_table) needs cache_seqlens");
  Launch launch;
  launch.stream = stream;
  launch.workspace_alloc = workspace_alloc;
  std::optional<TensorView> key, value;
  std::vector<int64_t> slots;
  std::vector<int32_t> lens_after;
  CacheViews cache;
  if (!k_new.is_none()) {
    key.emplace(k_new, "k");
    value.emplace(v_new, "v");
    check(in.seqlens_k.has_value(), "appending k/v needs cache_seqlens (where to write the new tokens)");
    check_rank(in.q, 4, "(batch, seqlen_q, nheads, headdim)");
    check_rank(*key, 4, "(batch, seqlen_new, nheads_k, headdim)");
    const bool host = check_devices({&in.q, &*key, &*in.seqlens_k}) < 0;
    check(in.q.size(0) == key->size(0), "k: batch size ", key->size(0), " does not match q's ", in.q.size(0));
    const int32_t* lens = index_vector(in.seqlens_k, key->size(0));
    if (host) {
      slots = plan_append(*key, *value, in.k, in.v, lens, in.kv_idx, in.block_table, cache);
      lens_after.assign(lens, lens + key->size(0));
      for (int32_t& n : lens_after) n += static_cast<int32_t>(key->size(1));
      in.seqlens_k_override = lens_after.data();
    } else {  // the kernels add seqlen_new to the device lengths and bound every write
      cache_params(*key, *value, in.k, in.v, "(batch, seqlen_new, nheads_k, headdim)");
      launch.seqlens_k_add = static_cast<int>(key->size(1));
    }
  }
  const AttentionParams p = make_params(in, opt, launch);
  if (key)  // the append writes the caches: nothing else of the call may live there
    for (const TensorView* t : {&in.k, &in.v})
      check_disjoint(*t, {&in.q, ptr(in.lse), ptr(in.seqlens_k), ptr(in.kv_idx), ptr(in.block_table), ptr(in.alibi)});
  if (key && launch.on_host()) run_append(*key, *value, cache, slots);
#if defined(FASTINFER_WITH_CUDA)
  if (key && !launch.on_host()) run_append_cuda(*key, *value, in.k, in.v, p, launch);
#endif
  run_attention(p, in.q, launch);
}

// ---------------------------------------------------------------- CPU linear
DType linear_dtype(const TensorView& t) {
  const DType d = float_dtype(t);
  if (d == DType::kFloat16)
    throw py::type_error(cat(t.name(), ": expected dtype float32 or bfloat16 (this CPU op has no float16 path), got float16"));
  return d;
}

void check_cpu(const TensorView& t) {
  check(t.is_cpu(), t.name(), ": the packed linear runs on the CPU (on a GPU, cuBLAS through torch is used), got a tensor on ",
        t.device_str());
}

void check_packed(const TensorView& packed, DType dtype, int64_t n, int64_t k) {
  check_cpu(packed);
  if (float_dtype(packed) != dtype)
    throw py::type_error(cat(packed.name(), ": expected dtype ", dtype_name(dtype), " (same as the weight/input), got ",
                             packed.dtype_str()));
  const int64_t want = linear_packed_numel(n, k, dtype);
  check(packed.dim() == 1 && packed.size(0) == want, packed.name(), ": expected shape (", want, ",) for a packed (", n,
        ", ", k, ") ", dtype_name(dtype), " weight, got ", packed.shape());
  check(packed.is_contiguous(), packed.name(), ": must be contiguous");
}

void linear_pack(const py::object& w_obj, const py::object& packed_obj) {
  TensorView w(w_obj, "weight"), packed(packed_obj, "packed");
  check_cpu(w);
  check_rank(w, 2, "(out_features, in_features)");
  check_last_contiguous(w);
  const DType dtype = linear_dtype(w);
  check_packed(packed, dtype, w.size(0), w.size(1));
  check_disjoint(packed, {&w});
  LinearPackParams p{dtype, w.size(0), w.size(1), w.data<const void>(), w.stride(0), packed.data<void>()};
  py::gil_scoped_release release;
  cpu::linear_pack(p);
}

void linear(const py::object& x_obj, const py::object& packed_obj, const py::object& bias_obj, const py::object& out_obj) {
  TensorView x(x_obj, "x"), packed(packed_obj, "packed_weight"), out(out_obj, "out");
  const OptTensor bias = view(bias_obj, "bias");
  check_cpu(x);
  check_rank(x, 2, "(num_tokens, in_features)");
  check_last_contiguous(x);
  const DType dtype = linear_dtype(x);
  check_cpu(out);
  check_rank(out, 2, "(num_tokens, out_features)");
  check_last_contiguous(out);
  const DType out_dtype = float_dtype(out);
  if (out_dtype != dtype && out_dtype != DType::kFloat32)
    throw py::type_error(cat("out: expected dtype ", dtype_name(dtype), " (same as x)",
                             dtype == DType::kFloat32 ? "" : " or float32", ", got ", out.dtype_str()));
  check(out.size(0) == x.size(0), "out: expected ", x.size(0), " rows (as x), got shape ", out.shape());
  const int64_t n = out.size(1), k = x.size(1);
  check_packed(packed, dtype, n, k);
  if (bias) {
    check_cpu(*bias);
    if (float_dtype(*bias) != dtype)
      throw py::type_error(cat("bias: expected dtype ", dtype_name(dtype), " (same as x), got ", bias->dtype_str()));
    check_shape(*bias, {n});
    check(n <= 1 || bias->stride(0) == 1, "bias: must be contiguous");
  }
  check_writable(out);
  check_disjoint(out, {&x, &packed, ptr(bias)});
  LinearParams p{dtype, out_dtype, x.size(0), n, k, x.data<const void>(), x.stride(0), packed.data<const void>(),
                 bias ? bias->data<const void>() : nullptr, out.data<void>(), out.stride(0)};
  py::gil_scoped_release release;
  cpu::linear_forward(p);
}

// ---------------------------------------------------------------- CPU pointwise ops
// x-like 2-D operand: CPU, float32/bfloat16 (= dtype if given), last dimension contiguous.
DType check_rows(const TensorView& t, int rank, const char* layout, const DType* dtype) {
  check_cpu(t);
  check_rank(t, rank, layout);
  check_last_contiguous(t);
  const DType d = linear_dtype(t);
  if (dtype && d != *dtype)
    throw py::type_error(cat(t.name(), ": expected dtype ", dtype_name(*dtype), " (same as x), got ", t.dtype_str()));
  return d;
}

void rms_norm(const py::object& x_obj, const py::object& weight_obj, double eps, const py::object& out_obj,
              const py::object& residual_obj) {
  TensorView x(x_obj, "x"), weight(weight_obj, "weight"), out(out_obj, "out");
  const OptTensor residual = view(residual_obj, "residual");
  const DType dtype = check_rows(x, 2, "(rows, dim)", nullptr);
  check_rows(out, 2, "(rows, dim)", &dtype);
  check_shape(out, {x.size(0), x.size(1)});
  check_cpu(weight);
  if (!weight.is(dl::kFloat, 32)) throw py::type_error(cat("weight: expected dtype float32, got ", weight.dtype_str()));
  check_shape(weight, {x.size(1)});
  check(x.size(1) <= 1 || weight.stride(0) == 1, "weight: must be contiguous");
  check(eps >= 0 && eps <= std::numeric_limits<float>::max(), "eps: must be >= 0 and finite (float32), got ", eps);
  check_writable(out);
  check_disjoint(out, {&x, &weight});
  if (residual) {
    check_rows(*residual, 2, "(rows, dim)", &dtype);
    check_shape(*residual, {x.size(0), x.size(1)});
    check_writable(*residual);  // residual += x in place
    check(!residual->shares_memory_with(x) && !residual->shares_memory_with(out), "residual: must not overlap x or out");
    check_disjoint(*residual, {&weight});
  }
  RmsNormParams p{dtype, x.size(0), x.size(1), x.data<const void>(), x.stride(0),
                  residual ? residual->data<void>() : nullptr, residual ? residual->stride(0) : 0,
                  weight.data<const float>(), static_cast<float>(eps), out.data<void>(), out.stride(0)};
  if (p.rows == 0 || p.dim == 0) return;
  py::gil_scoped_release release;
  cpu::rms_norm(p);
}

void act_and_mul(const py::object& x_obj, const py::object& out_obj, const std::string& act) {
  TensorView x(x_obj, "x"), out(out_obj, "out");
  const DType dtype = check_rows(x, 2, "(rows, 2 * dim)", nullptr);
  check_rows(out, 2, "(rows, dim)", &dtype);
  check(x.size(1) % 2 == 0, "x: the last dimension holds gate then up, so it must be even, got shape ", x.shape());
  check_shape(out, {x.size(0), x.size(1) / 2});
  check(act == "silu" || act == "gelu_tanh", "act: expected 'silu' or 'gelu_tanh', got '", act, "'");
  check_writable(out);
  check_disjoint(out, {&x});
  ActMulParams p{dtype, act == "silu" ? Activation::kSilu : Activation::kGeluTanh, x.size(0), x.size(1) / 2,
                 x.data<const void>(), x.stride(0), out.data<void>(), out.stride(0)};
  if (p.rows == 0 || p.dim == 0) return;
  py::gil_scoped_release release;
  cpu::act_mul(p);
}

void rotary_embedding(const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj,
                      const py::object& pos_obj) {
  TensorView x(x_obj, "x"), cos(cos_obj, "cos"), sin(sin_obj, "sin"), pos(pos_obj, "positions");
  const DType dtype = check_rows(x, 3, "(tokens, heads, head_dim)", nullptr);
  check(x.size(2) % 2 == 0, "x: head_dim must be even for rotary, got shape ", x.shape());
  const int64_t half = x.size(2) / 2;
  for (TensorView* t : {&cos, &sin}) {
    check_rows(*t, 2, "(positions, head_dim // 2)", &dtype);
    check(t->size(1) == half, t->name(), ": expected ", half, " columns (head_dim // 2), got shape ", t->shape());
    check(t->size(0) <= 1 || t->stride(0) == half, t->name(), ": must be contiguous");
  }
  check_shape(sin, {cos.size(0), half});
  check_cpu(pos);
  if (!pos.is(dl::kInt, 64)) throw py::type_error(cat("positions: expected dtype int64, got ", pos.dtype_str()));
  check_shape(pos, {x.size(0)});
  check(x.size(0) <= 1 || pos.stride(0) == 1, "positions: must be contiguous");
  check_writable(x);  // rotated in place
  check_disjoint(x, {&cos, &sin, &pos});
  const int64_t* position = pos.data<const int64_t>();
  for (int64_t i = 0; i < x.size(0); ++i)
    check(position[i] >= 0 && position[i] < cos.size(0), "positions[", i, "] = ", position[i],
          " is outside the cos/sin tables (", cos.size(0), " rows)");
  RotaryParams p{dtype, x.size(0), x.size(1), half, x.data<void>(), x.stride(0), x.stride(1),
                 cos.data<const void>(), sin.data<const void>(), position};
  if (p.tokens == 0 || p.heads == 0 || half == 0) return;
  py::gil_scoped_release release;
  cpu::rotary(p);
}


// ---------------------------------------------------------------- CPU decoder stack
// Holds the weights (and, once bound, the caches) of a Llama-style stack, checked once here,
// so that a step is one call: fastinfer.models.cpu_decoder builds it from a packed model.
class CpuDecoder {
 public:
  CpuDecoder(const py::object& hidden_obj, const py::object& intermediate_obj, const py::object& heads_obj,
             const py::object& kv_heads_obj, const py::object& head_dim_obj, const py::object& norm_eps_obj,
             const py::object& softmax_scale_obj, const std::string& act, const py::object& final_norm, const py::list& layers) {
    const int64_t hidden = int_arg(hidden_obj, "hidden", 1, kInt32Max), intermediate = int_arg(intermediate_obj, "intermediate", 1, kInt32Max);
    const int heads = static_cast<int>(int_arg(heads_obj, "heads", 1, kInt32Max)),
              kv_heads = static_cast<int>(int_arg(kv_heads_obj, "kv_heads", 1, kInt32Max)),
              head_dim = static_cast<int>(int_arg(head_dim_obj, "head_dim", 1, kInt32Max));
    const double norm_eps = float_arg(norm_eps_obj, "norm_eps"), softmax_scale = float_arg(softmax_scale_obj, "softmax_scale");
    check(heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
    check(head_dim % 8 == 0 && head_dim <= cpu::kMaxHeadDim, "head_dim must be a multiple of 8 up to ", cpu::kMaxHeadDim,
          ", got ", head_dim);
    check(act == "silu" || act == "gelu_tanh", "act: expected 'silu' or 'gelu_tanh', got '", act, "'");
    check(norm_eps >= 0 && norm_eps <= std::numeric_limits<float>::max(), "norm_eps: expected a finite number >= 0, got ", norm_eps);
    check(std::isfinite(softmax_scale) && std::fabs(softmax_scale) <= std::numeric_limits<float>::max(),
          "softmax_scale: expected a finite float32 number, got ", softmax_scale);
    check(static_cast<int64_t>(heads + 2 * static_cast<int64_t>(kv_heads)) * head_dim <= kInt32Max,
          "heads, kv_heads, head_dim: (heads + 2 * kv_heads) * head_dim exceeds 2**31 - 1");
    check(py::len(layers) > 0, "layers: expected at least one layer");
    DecoderConfig& c = config_;
    c.hidden = hidden;
    c.intermediate = intermediate;
    c.heads = heads;
    c.kv_heads = kv_heads;
    c.head_dim = head_dim;
    c.norm_eps = static_cast<float>(norm_eps);
    c.softmax_scale = static_cast<float>(softmax_scale);
    c.act = act == "silu" ? Activation::kSilu : Activation::kGeluTanh;
    c.final_norm = norm_weight(final_norm, "final_norm");  // hidden is set: the norms' length
    const int64_t qkv = static_cast<int64_t>(heads + 2 * kv_heads) * head_dim, attn = static_cast<int64_t>(heads) * head_dim;
    for (size_t i = 0; i < py::len(layers); ++i) {
      const py::dict d = layers[i].cast<py::dict>();
      auto get = [&](const char* key) -> py::object {
        check(d.contains(key), "layers[", i, "]: missing '", key, "'");
        return d[key];
      };
      DecoderLayerWeights w{};
      const std::string at = cat("layers[", i, "].");
      w.input_norm = norm_weight(get("input_norm"), at + "input_norm");
      w.post_norm = norm_weight(get("post_norm"), at + "post_norm");
      w.qkv = projection(get("qkv"), get("qkv_bias"), qkv, hidden, i == 0, at + "qkv");
      w.o = projection(get("o"), get("o_bias"), hidden, attn, false, at + "o");
      w.gate_up = projection(get("gate_up"), get("gate_up_bias"), 2 * intermediate, hidden, false, at + "gate_up");
      w.down = projection(get("down"), get("down_bias"), hidden, intermediate, false, at + "down");
      w.window_left = static_cast<int>(int_arg(get("window_left"), at + "window_left", -1, kInt32Max));
      c.layers.push_back(w);
    }
  }

  // The paged caches of every layer: (k, v) pairs, each (num_blocks, block_size, kv_heads, head_dim),
  // one dtype and one set of strides for all layers (views into one allocation, as the engine makes).
  void bind_caches(const py::list& kv_caches) {
    DecoderConfig& c = config_;
    check(py::len(kv_caches) == c.layers.size(), "kv_caches: ", py::len(kv_caches), " (k, v) pairs for ", c.layers.size(),
          " layers");
    caches_ = py::list();
    std::deque<std::string> names;  // the views below keep pointers to these
    std::vector<TensorView> views;  // every cache, then every weight: checked for shared memory at the end
    views.reserve(2 * c.layers.size() + py::len(keep_));
    for (size_t i = 0; i < c.layers.size(); ++i) {
      const py::tuple pair = kv_caches[i].cast<py::tuple>();
      check(pair.size() == 2, "kv_caches[", i, "]: expected a (k, v) pair");
      const char* k_name = names.emplace_back(cat("kv_caches[", i, "].k")).c_str();
      const char* v_name = names.emplace_back(cat("kv_caches[", i, "].v")).c_str();
      const TensorView& k = views.emplace_back(pair[0], k_name);
      const TensorView& v = views.emplace_back(pair[1], v_name);
      for (const TensorView* t : {&k, &v}) {
        check_writable(*t);
        check_cpu(*t);
        check_rank(*t, 4, "(num_blocks, block_size, kv_heads, head_dim)");
        check_last_contiguous(*t);
        if (float_dtype(*t) != c.dtype)
          throw py::type_error(cat(t->name(), ": expected dtype ", dtype_name(c.dtype), " (as the weights), got ", t->dtype_str()));
        check(t->size(2) == c.kv_heads && t->size(3) == c.head_dim, t->name(), ": expected (num_blocks, block_size, ",
              c.kv_heads, ", ", c.head_dim, "), got ", t->shape());
        check(t->size(0) == k.size(0) && t->size(1) == k.size(1), t->name(), ": expected the shape of ", k.name(), " ",
              k.shape(), ", got ", t->shape());
      }
      const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
      if (i == 0) {
        num_blocks_ = k.size(0);
        c.block_size = static_cast<int>(k.size(1));
        check(c.block_size >= 1 && num_blocks_ >= 1, "kv_caches[0]: needs at least one block of at least one slot");
        c.k_block_stride = ks[0], c.k_row_stride = ks[1], c.k_head_stride = ks[2];
        c.v_block_stride = vs[0], c.v_row_stride = vs[1], c.v_head_stride = vs[2];
      }
      check(k.size(0) == num_blocks_ && k.size(1) == c.block_size, "kv_caches[", i, "]: expected the shape of kv_caches[0], got ",
            k.shape());
      check(ks[0] == c.k_block_stride && ks[1] == c.k_row_stride && ks[2] == c.k_head_stride && vs[0] == c.v_block_stride &&
                vs[1] == c.v_row_stride && vs[2] == c.v_head_stride,
            "kv_caches[", i, "]: every layer's cache must have the strides of layer 0's");
    }
    // Each step writes every cache: none may share memory with another cache or with a weight.
    const size_t ncache = views.size();
    for (size_t i = 0; i < py::len(keep_); ++i) views.emplace_back(keep_[i], "a weight of this decoder");
    for (size_t i = 0; i < ncache; ++i)
      for (size_t j = i + 1; j < views.size(); ++j)
        check(!views[i].shares_memory_with(views[j]), views[i].name(), ": must not overlap ", views[j].name());
    for (size_t i = 0; i < c.layers.size(); ++i) {
      c.layers[i].k_cache = views[2 * i].data();
      c.layers[i].v_cache = views[2 * i + 1].data();
      caches_.append(kv_caches[i]);
    }
  }

  int64_t workspace_bytes(const py::object& tokens) const {
    return decoder_workspace_bytes(config_, int_arg(tokens, "tokens", 0, kInt32Max));
  }

  void forward(const py::object& x_obj, const py::object& out_obj, const py::object& cos_obj, const py::object& sin_obj,
               const py::object& rows_obj, const py::object& cu_q_obj, const py::object& cu_k_obj,
               const py::object& table_obj, const py::object& slots_obj, const py::object& workspace_obj) {
    const DecoderConfig& c = config_;
    check(py::len(caches_) == c.layers.size(), "bind_caches(kv_caches) must be called before forward");
    TensorView x(x_obj, "x"), out(out_obj, "out"), cos(cos_obj, "cos"), sin(sin_obj, "sin"), rows(rows_obj, "rows"),
        cu_q(cu_q_obj, "cu_seqlens_q"), cu_k(cu_k_obj, "cu_seqlens_k"), table(table_obj, "block_table"),
        slots(slots_obj, "slot_mapping"), ws(workspace_obj, "workspace");
    for (const TensorView* t : {&x, &out, &cos, &sin, &rows, &cu_q, &cu_k, &table, &slots, &ws}) check_cpu(*t);
    const int64_t T = x.size(0);
    for (TensorView* t : {&x, &out}) {
      check_rows(*t, 2, "(tokens, hidden)", &c.dtype);
      check_shape(*t, {T, c.hidden});
      check(t->is_contiguous(), t->name(), ": must be contiguous");
    }
    check_disjoint(out, {&x});
    for (TensorView* t : {&cos, &sin}) {
      check_rows(*t, 2, "(tokens, head_dim // 2)", &c.dtype);
      check_shape(*t, {T, c.head_dim / 2});
      check(t->is_contiguous(), t->name(), ": must be contiguous");
    }
    if (!rows.is(dl::kInt, 64)) throw py::type_error(cat("rows: expected dtype int64, got ", rows.dtype_str()));
    check_shape(rows, {T});
    check(T <= 1 || rows.stride(0) == 1, "rows: must be contiguous");
    for (int64_t i = 0; i < T; ++i)
      check(rows.data<const int64_t>()[i] >= 0 && rows.data<const int64_t>()[i] < T, "rows[", i, "] = ",
            rows.data<const int64_t>()[i], " is outside [0, ", T, ")");

    check(cu_q.dim() == 1 && cu_q.size(0) >= 1, "cu_seqlens_q: expected shape (batch + 1,), got ", cu_q.shape());
    const int batch = static_cast<int>(cu_q.size(0) - 1);
    const int32_t* cq = index_vector(cu_q, batch + 1);
    const int32_t* ck = index_vector(cu_k, batch + 1);
    check_cu_seqlens(cu_q, cq, batch, T, "tokens of x");
    check(cq[batch] == T, "cu_seqlens_q[-1] = ", cq[batch], " must equal the ", T, " tokens of x");
    check_cu_seqlens(cu_k, ck, batch, -1, "");
    if (!table.is(dl::kInt, 32)) throw py::type_error(cat("block_table: expected dtype int32, got ", table.dtype_str()));
    check(table.dim() == 2 && table.size(0) == batch, "block_table: expected shape (batch=", batch,
          ", max_blocks_per_seq), got ", table.shape());
    check(table.size(1) <= 1 || table.stride(1) == 1, "block_table: rows must be contiguous");
    for (int b = 0; b < batch; ++b) {
      const int64_t q_len = cq[b + 1] - cq[b], k_len = static_cast<int64_t>(ck[b + 1]) - ck[b];
      check(k_len >= q_len, "sequence ", b, " has ", q_len, " new tokens but only ", k_len,
            " keys (cu_seqlens_k counts the new tokens too)");
      check_block_row(table, b, k_len, c.block_size, num_blocks_);
    }
    if (!slots.is(dl::kInt, 64)) throw py::type_error(cat("slot_mapping: expected dtype int64, got ", slots.dtype_str()));
    check_shape(slots, {T});
    check(T <= 1 || slots.stride(0) == 1, "slot_mapping: must be contiguous");
    const int64_t num_slots = num_blocks_ * c.block_size;
    for (int64_t i = 0; i < T; ++i)
      check(slots.data<const int64_t>()[i] < num_slots, "slot_mapping[", i, "] = ", slots.data<const int64_t>()[i],
            " is out of range: the cache has ", num_slots, " slots");
    check(ws.is_contiguous(), "workspace: must be contiguous");
    const int64_t have = ws.numel() * (ws.is(dl::kUInt, 8) || ws.is(dl::kInt, 8) ? 1 : dtype_size(float_dtype(ws)));
    const int64_t need = decoder_workspace_bytes(config_, T);
    check(have >= need, "workspace: ", have, " bytes, ", need, " needed for ", T, " tokens");
    for (const TensorView* t : {&out, &ws}) check_disjoint(*t, {&x, &out, &cos, &sin, &rows, &cu_q, &cu_k, &table, &slots, &ws});

    DecoderStep s{T, batch, x.data(), out.data(), cos.data<const void>(), sin.data<const void>(), rows.data<const int64_t>(),
                  cq, ck, table.data<const int32_t>(), table.stride(0), slots.data<const int64_t>(), ws.data()};
    py::gil_scoped_release release;
    cpu::decoder_forward(c, s);
  }

 private:
  const float* norm_weight(const py::object& obj, const std::string& name) {
    TensorView w(obj, name.c_str());
    check_cpu(w);
    if (!w.is(dl::kFloat, 32)) throw py::type_error(cat(name, ": expected dtype float32, got ", w.dtype_str()));
    check_shape(w, {config_.hidden});
    check(w.is_contiguous(), name, ": must be contiguous");
    keep_.append(obj);
    return w.data<const float>();
  }

  PackedProjection projection(const py::object& w_obj, const py::object& bias_obj, int64_t n, int64_t k, bool first,
                              const std::string& name) {
    TensorView w(w_obj, name.c_str());
    check_cpu(w);
    if (first) config_.dtype = linear_dtype(w);
    check_packed(w, config_.dtype, n, k);
    PackedProjection p{w.data<const void>(), nullptr};
    if (!bias_obj.is_none()) {
      const std::string bias_name = name + "_bias";
      TensorView b(bias_obj, bias_name.c_str());
      check_cpu(b);
      if (float_dtype(b) != config_.dtype)
        throw py::type_error(cat(bias_name, ": expected dtype ", dtype_name(config_.dtype), ", got ", b.dtype_str()));
      check_shape(b, {n});
      check(n <= 1 || b.stride(0) == 1, bias_name, ": must be contiguous");
      p.bias = b.data<const void>();
      keep_.append(bias_obj);
    }
    keep_.append(w_obj);
    return p;
  }

  DecoderConfig config_{};
  int64_t num_blocks_ = 0;
  py::list keep_;    // the weight tensors: alive as long as this object
  py::list caches_;  // the bound (k, v) pairs
};

py::dict build_info() {
  py::dict d;
  d["version"] = FASTINFER_VERSION;
  d["compiler"] = FASTINFER_CXX_COMPILER;
  d["cuda_archs"] = std::string(FASTINFER_CUDA_ARCHS_STR);
#if defined(FASTINFER_WITH_CUDA)
  d["cuda_compiled"] = true;
  d["cuda_runtime_version"] = cuda::runtime_version();
  d["cuda_head_dims"] = std::string(cuda::compiled_head_dims());
#else
  d["cuda_compiled"] = false;
  d["cuda_runtime_version"] = py::none();
  d["cuda_head_dims"] = std::string();
#endif
  d["cpu_isa"] = cpu::isa_name(cpu::active_isa());
  d["cpu_isa_best"] = cpu::isa_name(cpu::best_isa());
  d["num_threads"] = cpu::num_threads();
  return d;
}

int cuda_device_count() {
#if defined(FASTINFER_WITH_CUDA)
  return cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastinfer native kernels (DLPack in, no libtorch)";

  // Setters check the value (with the field's name) instead of pybind's "incompatible function arguments".
  py::class_<AttentionOptions> options(m, "AttentionOptions");
  options.def(py::init<>());
  auto float_field = [&](const char* name, float AttentionOptions::*field) {
    options.def_property(name, [field](const AttentionOptions& o) { return o.*field; },
                         [field, name](AttentionOptions& o, const py::object& v) {
                           const double d = float_arg(v, name);
                           check(!std::isfinite(d) || std::fabs(d) <= std::numeric_limits<float>::max(), name,
                                 ": ", d, " is beyond the float32 range");
                           o.*field = static_cast<float>(d);
                         });
  };
  auto int_field = [&](const char* name, int AttentionOptions::*field, int64_t lo) {
    options.def_property(name, [field](const AttentionOptions& o) { return o.*field; },
                         [field, name, lo](AttentionOptions& o, const py::object& v) {
                           o.*field = static_cast<int>(int_arg(v, name, lo, kInt32Max));
                         });
  };
  float_field("softmax_scale", &AttentionOptions::softmax_scale);
  float_field("softcap", &AttentionOptions::softcap);
  int_field("window_left", &AttentionOptions::window_left, -1);
  int_field("window_right", &AttentionOptions::window_right, -1);
  int_field("num_splits", &AttentionOptions::num_splits, 0);
  int_field("max_seqlen_q", &AttentionOptions::max_seqlen_q, 0);
  int_field("max_seqlen_k", &AttentionOptions::max_seqlen_k, 0);

  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::kw_only(),
        py::arg("lse") = py::none(), py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(),
        py::arg("seqlens_k") = py::none(), py::arg("kv_batch_idx") = py::none(), py::arg("block_table") = py::none(),
        py::arg("alibi_slopes") = py::none(), py::arg("options"), py::arg("stream") = 0,
        py::arg("workspace_alloc") = py::none(),
        "Fused attention into `out` (and `lse`). Layouts follow flash-attn; see fastinfer.attention.\n"
        "GPU tensors: runs on `stream` (a cudaStream_t as int); split-KV scratch comes from workspace_alloc(nbytes).");
  m.def("attention_backward", &attention_backward, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::kw_only(),
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(), py::arg("alibi_slopes") = py::none(),
        py::arg("options"), py::arg("deterministic") = false, py::arg("stream") = 0, py::arg("workspace_alloc") = py::none(),
        "Gradients of attention_forward into dq, dk, dv (flash-attention backward: P recomputed from lse).\n"
        "Dense (batch, seqlen, nheads, headdim) or varlen (total, nheads, headdim) with cu_seqlens_q/k; lse is\n"
        "(batch, nheads, seqlen_q) or (nheads, total_q) float32. GPU tensors: runs on `stream`, scratch from\n"
        "workspace_alloc(nbytes). The CPU path is always deterministic; on a GPU deterministic=True avoids atomics.");
  m.def("reshape_and_cache", &reshape_and_cache, py::arg("key"), py::arg("value"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::kw_only(), py::arg("stream") = 0, "Write key/value rows into cache slots (negative slot = skip).");
  m.def("attention_with_kvcache", &attention_with_kvcache, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("out"), py::kw_only(), py::arg("k") = py::none(), py::arg("v") = py::none(), py::arg("lse") = py::none(),
        py::arg("cache_seqlens") = py::none(), py::arg("cache_batch_idx") = py::none(), py::arg("block_table") = py::none(),
        py::arg("alibi_slopes") = py::none(), py::arg("options"), py::arg("stream") = 0,
        py::arg("workspace_alloc") = py::none(),
        "flash_attn_with_kvcache: validate everything, append k/v at cache_seqlens, then attend.");

  m.def("linear_pack", &linear_pack, py::arg("weight"), py::arg("packed"),
        "Pack an (out_features, in_features) float32/bfloat16 weight into `packed` (1-D, linear_packed_numel elements).");
  m.def("linear_packed_numel", [](const py::object& n_obj, const py::object& k_obj, const std::string& dtype) {
    constexpr int64_t lo = std::numeric_limits<int64_t>::min(), hi = std::numeric_limits<int64_t>::max();
    const int64_t n = int_arg(n_obj, "linear_packed_numel: n", lo, hi), k = int_arg(k_obj, "linear_packed_numel: k", lo, hi);
    check(n >= 0 && k >= 0 && n <= kInt32Max && k <= kInt32Max, "linear_packed_numel: n and k must be in [0, 2**31-1], got n=", n,
          ", k=", k);
    check(dtype == "float32" || dtype == "bfloat16", "linear_packed_numel: dtype must be 'float32' or 'bfloat16', got ", dtype);
    return linear_packed_numel(n, k, dtype == "float32" ? DType::kFloat32 : DType::kBFloat16);
  }, py::arg("n"), py::arg("k"), py::arg("dtype"));
  m.def("linear", &linear, py::arg("x"), py::arg("packed_weight"), py::arg("bias"), py::arg("out"),
        "out = x @ W^T (+ bias) on the CPU with W packed by linear_pack; accumulates in float32.");
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        py::arg("residual") = py::none(),
        "out = RMSNorm(x) * weight (float32 weight); with residual: residual += x (rounded) first, then normalise it.");
  m.def("act_and_mul", &act_and_mul, py::arg("x"), py::arg("out"), py::arg("act"),
        "out = act(x[:, :d]) * x[:, d:], act 'silu' or 'gelu_tanh', with torch's per-op rounding.");
  m.def("rotary_embedding", &rotary_embedding, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("positions"),
        "Rotate-half rotary embedding of x (tokens, heads, head_dim) in place, cos/sin rows picked by positions.");
  py::class_<CpuDecoder>(m, "CpuDecoder",
                         "A Llama-style decoder stack on the CPU, one call per step (see fastinfer.models.cpu_decoder).")
      .def(py::init<const py::object&, const py::object&, const py::object&, const py::object&, const py::object&,
                    const py::object&, const py::object&, const std::string&, const py::object&, const py::list&>(),
           py::arg("hidden"), py::arg("intermediate"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("norm_eps"), py::arg("softmax_scale"), py::arg("act"), py::arg("final_norm"), py::arg("layers"))
      .def("bind_caches", &CpuDecoder::bind_caches, py::arg("kv_caches"))
      .def("workspace_bytes", &CpuDecoder::workspace_bytes, py::arg("tokens"))
      .def("forward", &CpuDecoder::forward, py::arg("x"), py::arg("out"), py::arg("cos"), py::arg("sin"), py::arg("rows"),
           py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("block_table"), py::arg("slot_mapping"),
           py::arg("workspace"));
  m.def("build_info", &build_info);
  m.def("cuda_device_count", &cuda_device_count, "Number of usable CUDA devices (0 without a driver or GPU).");
#if defined(FASTINFER_WITH_CUDA)
  m.def("cuda_probe_arch", [] {
    try {
      return fastinfer::cuda::probe_arch();
    } catch (const std::runtime_error& e) {
      throw py::value_error(e.what());
    }
  }, "Launch a trivial kernel; returns the __CUDA_ARCH__ of the code that ran.");
#endif
  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); });
  m.def("set_cpu_isa", [](const std::string& name) {
    try {
      cpu::set_isa(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("name"));
  m.def("num_threads", &cpu::num_threads);
  m.def("set_num_threads", [](const py::object& n) {
    cpu::set_num_threads(static_cast<int>(int_arg(n, "n", std::numeric_limits<int32_t>::min(), cpu::kMaxThreads)));
  }, py::arg("n"), "Threads of the CPU kernels (at most kMaxThreads); n <= 0 restores the default.");
}
