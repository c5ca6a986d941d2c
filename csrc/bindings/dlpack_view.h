// Borrowed view of any object that speaks DLPack (torch, numpy, cupy, jax ...).
// The exporter's capsule is kept alive (and not consumed) for the view's lifetime,
// so the memory stays valid and the exporter's own destructor releases it.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <ostream>
#include <string>

namespace fastinfer {

// ABI of DLPack v0.x DLManagedTensor (the layout every exporter shares).
namespace dl {
enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kROCM = 10, kCUDAManaged = 13 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4, kBool = 6 };
struct Device { int32_t device_type; int32_t device_id; };
struct DataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};
}  // namespace dl

class TensorView;
// Formats a tensor's shape only when an error message is actually written.
struct ShapeOf {
  const TensorView* t;
};
std::ostream& operator<<(std::ostream& os, ShapeOf s);

class TensorView {
 public:
  // Throws TypeError naming `name` when obj has no usable __dlpack__.
  TensorView(pybind11::handle obj, const char* name);

  const char* name() const { return name_; }
  int dim() const { return t_->ndim; }
  int64_t size(int i) const { return t_->shape[i]; }
  int64_t stride(int i) const { return strides_[i]; }
  int64_t numel() const;
  bool is_cuda() const { return t_->device.device_type == dl::kCUDA || t_->device.device_type == dl::kCUDAManaged; }
  bool is_cpu() const { return t_->device.device_type == dl::kCPU || t_->device.device_type == dl::kCUDAHost; }
  int device_id() const { return t_->device.device_id; }
  std::string device_str() const;
  std::string dtype_str() const;
  std::string shape_str() const;
  std::string strides_str() const;
  ShapeOf shape() const { return {this}; }  // for messages: formatted lazily
  bool same_device(const TensorView& o) const {
    return t_->device.device_type == o.t_->device.device_type && t_->device.device_id == o.t_->device.device_id;
  }
  bool is(uint8_t code, uint8_t bits) const { return t_->dtype.code == code && t_->dtype.bits == bits && t_->dtype.lanes == 1; }
  bool is_contiguous() const;
  int64_t element_bytes() const { return (t_->dtype.bits * t_->dtype.lanes + 7) / 8; }
  // Two index tuples reach one element: a zero stride (expand()) or strides that interleave.
  bool overlaps_itself() const;
  // Some byte of this tensor is also a byte of `o` (exact for views with the same strides and
  // element size, such as the K and V halves of one cache; by address range otherwise).
  bool shares_memory_with(const TensorView& o) const;
  template <class T = void>
  T* data() const {
    return reinterpret_cast<T*>(static_cast<char*>(t_->data) + t_->byte_offset);
  }

 private:
  pybind11::object capsule_;
  const dl::Tensor* t_ = nullptr;
  int64_t strides_[8];
  const char* name_;
};

}  // namespace fastinfer
