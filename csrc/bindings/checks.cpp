// The input checks shared by every binding (see checks.h).
#include "bindings/checks.h"

#include "fastinfer/linear.h"

namespace fastinfer::bindings {

std::string py_repr(const py::handle& obj) { return py::repr(obj).cast<std::string>(); }

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

int check_devices(const std::vector<const TensorView*>& ts) {
  const TensorView& first = *ts.front();
  for (const TensorView* t : ts)
    if (!t->same_device(first))
      throw py::value_error(cat(t->name(), " is on ", t->device_str(), " but ", first.name(), " is on ", first.device_str()));
  if (first.is_cuda()) {
#if defined(FASTINFER_WITH_CUDA)
    check_cuda_device(first.device_id());
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

void check_disjoint(const TensorView& written, std::initializer_list<const TensorView*> others) {
  for (const TensorView* o : others)
    if (o && o != &written)
      check(!written.shares_memory_with(*o), written.name(), ": must not overlap ", o->name(),
            " (they share memory, and ", written.name(), " is written while ", o->name(), " is in use)");
}

void check_block_row(const TensorView& table, int b, int64_t len, int block_size, int64_t num_blocks) {
  const int64_t capacity = table.size(1) * block_size;
  check(len <= capacity, "sequence ", b, " has ", len, " keys but its block_table row holds only ", capacity, " (",
        table.size(1), " blocks of ", block_size, ")");
  const int32_t* row = table.data<const int32_t>() + b * table.stride(0);
  for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i)
    check(row[i] >= 0 && row[i] < num_blocks, "block_table[", b, ", ", i, "] = ", row[i], " is out of range [0, ",
          num_blocks, ")");
}

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


// ---- the quantised linear's operands (linear.cpp, decoder.cpp)

QType qtype_arg(const std::string& name) {
  if (name == "q8_0") return QType::kQ8_0;
  if (name == "q4_0") return QType::kQ4_0;
  if (name == "q4_1") return QType::kQ4_1;
  if (name == "q5_0") return QType::kQ5_0;
  if (name == "q4_k") return QType::kQ4_K;
  if (name == "q5_k") return QType::kQ5_K;
  if (name == "q6_k") return QType::kQ6_K;
  throw py::value_error(cat("qtype: expected one of 'q8_0', 'q4_0', 'q4_1', 'q5_0', 'q4_k', 'q5_k', 'q6_k' (the block formats "
                            "the quantised linear runs), got '", name, "'"));
}

const char* qtype_name(QType t) {
  static const char* const kNames[] = {"q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q5_0"};
  return kNames[static_cast<int>(t)];
}

void check_qk(int64_t k, const char* what, QType t) {
  const int e = qtype_block_elems(t);
  check(k > 0 && k % e == 0 && k <= kInt32Max, what, ": in_features must be a positive multiple of ", e, " (the ",
        qtype_name(t), e == kQBlock ? " block" : " super-block", "), got ", k);
}

void check_qpacked(const TensorView& packed, QType t, int64_t n, int64_t k) {
  check_qk(k, packed.name(), t);
  check_cpu(packed);
  if (!packed.is(dl::kUInt, 8)) throw py::type_error(cat(packed.name(), ": expected dtype uint8, got ", packed.dtype_str()));
  const int64_t want = qlinear_packed_bytes(n, k, t);
  check(packed.dim() == 1 && packed.size(0) == want, packed.name(), ": expected shape (", want, ",) for a packed (", n, ", ",
        k, ") weight, got ", packed.shape());
  check(packed.is_contiguous(), packed.name(), ": must be contiguous");
}

}  // namespace fastinfer::bindings
