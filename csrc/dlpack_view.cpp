#include "dlpack_view.h"

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

std::ostream& operator<<(std::ostream& os, ShapeOf s) { return os << s.t->shape_str(); }

}  // namespace fastinfer
