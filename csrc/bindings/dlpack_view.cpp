#include "bindings/dlpack_view.h"

#include <algorithm>
#include <sstream>

namespace py = pybind11;

namespace fastinfer {

TensorView::TensorView(py::handle obj, const char* name) : name_(name) {
  py::object cap;
  if (PyCapsule_CheckExact(obj.ptr())) {  // an exported capsule (the Python layer's fast path for torch)
    cap = py::reinterpret_borrow<py::object>(obj);
  } else if (!py::hasattr(obj, "__dlpack__"))
    throw py::type_error(std::string(name) + ": expected a tensor or array supporting DLPack (torch.Tensor, numpy.ndarray, ...), got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  else {
    try {
      cap = obj.attr("__dlpack__")();
    } catch (py::error_already_set& e) {
      throw py::type_error(std::string(name) + ": could not export through DLPack: " + e.what());
    }
  }
  if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
    throw py::type_error(std::string(name) + ": expected an unconsumed 'dltensor' DLPack capsule");
  auto* managed = static_cast<dl::ManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  capsule_ = std::move(cap);
  t_ = &managed->dl_tensor;
  if (t_->ndim > 8) throw py::value_error(std::string(name) + ": more than 8 dimensions are not supported");
  int64_t expected = 1;
  for (int i = t_->ndim - 1; i >= 0; --i) {
    strides_[i] = t_->strides ? t_->strides[i] : expected;
    expected *= t_->shape[i];
  }
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < t_->ndim; ++i) n *= t_->shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = t_->ndim - 1; i >= 0; --i) {
    if (t_->shape[i] != 1 && strides_[i] != expected) return false;
    expected *= t_->shape[i];
  }
  return true;
}

namespace {

struct Dim {
  int64_t size, stride;  // stride in bytes, >= 0
};

// Dimensions of size > 1, by decreasing |stride|, strides in bytes.
int sorted_dims(const dl::Tensor& t, const int64_t* strides, int64_t esz, Dim* out) {
  int n = 0;
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] > 1) out[n++] = {t.shape[i], (strides[i] < 0 ? -strides[i] : strides[i]) * esz};
  std::sort(out, out + n, [](const Dim& a, const Dim& b) { return a.stride > b.stride; });
  return n;
}

// Is there an offset sum_d c_d * stride_d with |c_d| < size_d equal to `delta`? dims sorted by
// decreasing stride, each stride larger than the span of the dims after it (no self-overlap),
// so at most two values of c_d fit at each level.
bool reachable(const Dim* d, int n, const int64_t* rest_span, int64_t delta) {
  if (n == 0) return delta == 0;
  const int64_t s = d->stride, lo_c = -(d->size - 1), hi_c = d->size - 1;
  // c in [ceil((delta - span) / s), floor((delta + span) / s)]
  auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); };
  const int64_t c0 = std::max(lo_c, -floor_div(-(delta - rest_span[0]), s)), c1 = std::min(hi_c, floor_div(delta + rest_span[0], s));
  for (int64_t c = c0; c <= c1; ++c)
    if (reachable(d + 1, n - 1, rest_span + 1, delta - c * s)) return true;
  return false;
}

}  // namespace

bool TensorView::overlaps_itself() const {
  if (numel() <= 1) return false;
  Dim d[8];
  const int n = sorted_dims(*t_, strides_, 1, d);
  int64_t span = 0;  // largest offset reachable by the smaller dims
  for (int i = n - 1; i >= 0; --i) {
    if (d[i].stride <= span) return true;
    span += (d[i].size - 1) * d[i].stride;
  }
  return false;
}

bool TensorView::shares_memory_with(const TensorView& o) const {
  if (numel() == 0 || o.numel() == 0) return false;
  auto range = [](const TensorView& t, const char** lo, const char** hi) {
    const char* base = t.data<const char>();
    int64_t neg = 0, pos = 0;
    for (int i = 0; i < t.dim(); ++i) {
      const int64_t off = (t.size(i) - 1) * t.stride(i) * t.element_bytes();
      (off < 0 ? neg : pos) += off;
    }
    *lo = base + neg;
    *hi = base + pos + t.element_bytes();  // one past the last byte
  };
  const char *a0, *a1, *b0, *b1;
  range(*this, &a0, &a1);
  range(o, &b0, &b1);
  if (a1 <= b0 || b1 <= a0) return false;
  // Interleaved views of one buffer (K and V of a cache laid out [block, head, 2, row, dim]):
  // same element size and strides, so an element of one sits at `delta` from one of the other
  // only if delta is a difference of two offsets of the same layout.
  const int64_t esz = element_bytes();
  bool same_layout = esz == o.element_bytes() && dim() == o.dim() && !overlaps_itself();
  for (int i = 0; same_layout && i < dim(); ++i) same_layout = size(i) == o.size(i) && stride(i) == o.stride(i);
  if (!same_layout) return true;
  const int64_t delta = b0 - a0;
  if (delta % esz != 0) return true;  // misaligned aliasing: treat as shared
  Dim d[8];
  const int n = sorted_dims(*t_, strides_, esz, d);
  int64_t rest[9];
  rest[n] = 0;
  for (int i = n - 1; i >= 0; --i) rest[i] = rest[i + 1] + (d[i].size - 1) * d[i].stride;
  int64_t rest_after[9];
  for (int i = 0; i < n; ++i) rest_after[i] = rest[i + 1];
  return reachable(d, n, rest_after, delta);
}

std::string TensorView::device_str() const {
  if (is_cpu()) return "cpu";
  if (is_cuda()) return "cuda:" + std::to_string(device_id());
  return "device type " + std::to_string(t_->device.device_type);
}

std::string TensorView::dtype_str() const {
  const auto& d = t_->dtype;
  std::string base;
  switch (d.code) {
    case dl::kInt: base = "int"; break;
    case dl::kUInt: base = "uint"; break;
    case dl::kFloat: base = "float"; break;
    case dl::kBfloat: base = "bfloat"; break;
    case dl::kBool: return "bool";
    default: base = "type" + std::to_string(d.code) + "_"; break;
  }
  return base + std::to_string(d.bits) + (d.lanes != 1 ? "x" + std::to_string(d.lanes) : "");
}

std::string TensorView::shape_str() const {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < t_->ndim; ++i) s << (i ? ", " : "") << t_->shape[i];
  if (t_->ndim == 1) s << ",";
  s << ")";
  return s.str();
}

std::string TensorView::strides_str() const {
  std::ostringstream s;
  s << "(";
  for (int i = 0; i < t_->ndim; ++i) s << (i ? ", " : "") << strides_[i];
  if (t_->ndim == 1) s << ",";
  s << ")";
  return s.str();
}

std::ostream& operator<<(std::ostream& os, ShapeOf s) { return os << s.t->shape_str(); }

}  // namespace fastinfer
