// Bindings of the CPU packed linear: linear_pack (weight into panels, once at load),
// linear_packed_numel, and linear (out = x @ W^T + bias).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>

#include "bindings/bindings.h"
#include "bindings/checks.h"
#include "fastinfer/cpu.h"

namespace fastinfer::bindings {

namespace {

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

// The operands every linear checks alike: x (m, k) and out (m, n), CPU, rows contiguous, float32/bfloat16
// (out: x's dtype or float32); the optional bias (n,) in x's dtype. The weight is checked by the caller
// (between the shapes and the bias, so errors come in argument order).
struct LinearOperands {
  DType dtype, out_dtype;
  int64_t n, k;
};

LinearOperands check_linear_rows(const TensorView& x, const TensorView& out) {
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
  return {dtype, out_dtype, out.size(1), x.size(1)};
}

void check_linear_bias(const OptTensor& bias, const LinearOperands& o) {
  if (!bias) return;
  check_cpu(*bias);
  if (float_dtype(*bias) != o.dtype)
    throw py::type_error(cat("bias: expected dtype ", dtype_name(o.dtype), " (same as x), got ", bias->dtype_str()));
  check_shape(*bias, {o.n});
  check(o.n <= 1 || bias->stride(0) == 1, "bias: must be contiguous");
}

void linear(const py::object& x_obj, const py::object& packed_obj, const py::object& bias_obj, const py::object& out_obj) {
  TensorView x(x_obj, "x"), packed(packed_obj, "packed_weight"), out(out_obj, "out");
  const OptTensor bias = view(bias_obj, "bias");
  const LinearOperands o = check_linear_rows(x, out);
  const DType dtype = o.dtype, out_dtype = o.out_dtype;
  const int64_t n = o.n, k = o.k;
  check_packed(packed, dtype, n, k);
  check_linear_bias(bias, o);
  check_writable(out);
  check_disjoint(out, {&x, &packed, ptr(bias)});
  LinearParams p{dtype, out_dtype, x.size(0), n, k, x.data<const void>(), x.stride(0), packed.data<const void>(),
                 bias ? bias->data<const void>() : nullptr, out.data<void>(), out.stride(0)};
  py::gil_scoped_release release;
  cpu::linear_forward(p);
}

void qlinear_pack(const py::object& raw_obj, const std::string& qtype, const py::object& k_obj, const py::object& packed_obj,
                  const std::string& name) {
  const QType t = qtype_arg(qtype);
  TensorView raw(raw_obj, "raw"), packed(packed_obj, "packed");
  const int64_t k = int_arg(k_obj, "k", 0, kInt32Max);
  const std::string who = name.empty() ? std::string("raw") : name;
  check_qk(k, who.c_str(), t);
  check_cpu(raw);
  if (!raw.is(dl::kUInt, 8)) throw py::type_error(cat(who, ": expected the raw GGUF blocks as uint8, got ", raw.dtype_str()));
  check_rank(raw, 2, "(out_features, bytes per row)");
  check_last_contiguous(raw);
  const int64_t n = raw.size(0), blocks = k / qtype_block_elems(t), row_bytes = blocks * qtype_block_bytes(t);
  check(n <= kInt32Max, who, ": too many rows (", n, ")");
  check(raw.size(1) == row_bytes, who, ": a ", qtype, " row of ", k, " values is ", row_bytes, " bytes (", blocks,
        " blocks of ", qtype_block_bytes(t), "), got ", raw.size(1), " bytes per row");
  check_qpacked(packed, t, n, k);
  check_writable(packed);
  check_disjoint(packed, {&raw});
  QLinearPackParams p{t, n, k, raw.data<const void>(), raw.stride(0), packed.data<void>()};
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = cpu::qlinear_pack(p);
  }
  check(bad < 0, who, ": row ", bad, " holds a ", qtype, " block whose scale or offset is not finite (a corrupt block)");
}

void qlinear(const py::object& x_obj, const py::object& packed_obj, const std::string& qtype, const py::object& bias_obj,
             const py::object& out_obj, const std::string& activations) {
  const QType t = qtype_arg(qtype);
  check(activations == "int8" || activations == "float", "activations: expected 'int8' or 'float', got '", activations,
        "'");
  TensorView x(x_obj, "x"), packed(packed_obj, "packed_weight"), out(out_obj, "out");
  const OptTensor bias = view(bias_obj, "bias");
  const LinearOperands o = check_linear_rows(x, out);
  const DType dtype = o.dtype, out_dtype = o.out_dtype;
  const int64_t n = o.n, k = o.k;
  check_qk(k, "x", t);
  check_qpacked(packed, t, n, k);
  check_linear_bias(bias, o);
  check_writable(out);
  check_disjoint(out, {&x, &packed, ptr(bias)});
  QLinearParams p{t, dtype, out_dtype, x.size(0), n, k, x.data<const void>(), x.stride(0), packed.data<const void>(),
                  bias ? bias->data<const void>() : nullptr, out.data<void>(), out.stride(0),
                  activations == "float" ? QActivations::kFloat : QActivations::kInt8};
  py::gil_scoped_release release;
  cpu::qlinear_forward(p);
}

void qlinear_rows(const py::object& packed_obj, const std::string& qtype, const py::object& n_obj,
                  const py::object& k_obj, const py::object& ids_obj, const py::object& out_obj) {
  const QType t = qtype_arg(qtype);
  TensorView packed(packed_obj, "packed_weight"), ids(ids_obj, "ids"), out(out_obj, "out");
  const int64_t n = int_arg(n_obj, "n", 0, kInt32Max), k = int_arg(k_obj, "k", 1, kInt32Max);
  check_qpacked(packed, t, n, k);
  check_cpu(ids);
  if (!ids.is(dl::kInt, 64)) throw py::type_error(cat("ids: expected dtype int64, got ", ids.dtype_str()));
  check_rank(ids, 1, "(count,)");
  const int64_t count = ids.size(0);
  check(count <= 1 || ids.stride(0) == 1, "ids: must be contiguous");
  const int64_t* id = ids.data<const int64_t>();
  for (int64_t i = 0; i < count; ++i)
    check(id[i] >= 0 && id[i] < n, "ids: row ", id[i], " (at ", i, ") is outside [0, ", n, ")");
  check_cpu(out);
  if (float_dtype(out) != DType::kFloat32) throw py::type_error(cat("out: expected dtype float32, got ", out.dtype_str()));
  check_shape(out, {count, k});
  if (count == 0) return;
  check(out.is_contiguous(), "out: must be contiguous");
  check_writable(out);
  check_disjoint(out, {&packed, &ids});
  py::gil_scoped_release release;
  cpu::qlinear_rows(t, k, packed.data<const void>(), id, count, out.data<float>());
}

}  // namespace

void bind_linear(py::module_& m) {
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
  m.def("qlinear_pack", &qlinear_pack, py::arg("raw"), py::arg("qtype"), py::arg("k"), py::arg("packed"),
        py::arg("name") = std::string(),
        "Repack a GGUF-quantised (out_features, k) weight, given as its raw blocks (uint8, one row of blocks per "
        "output), into `packed` (uint8, qlinear_packed_bytes bytes). `name` names the tensor in errors.");
  m.def("qlinear_packed_bytes", [](const py::object& n_obj, const py::object& k_obj, const std::string& qtype) {
    const QType t = qtype_arg(qtype);
    const int64_t n = int_arg(n_obj, "qlinear_packed_bytes: n", 0, kInt32Max);
    const int64_t k = int_arg(k_obj, "qlinear_packed_bytes: k", 0, kInt32Max);
    check_qk(k, "qlinear_packed_bytes", t);
    return qlinear_packed_bytes(n, k, t);
  }, py::arg("n"), py::arg("k"), py::arg("qtype"));
  m.def("qlinear", &qlinear, py::arg("x"), py::arg("packed_weight"), py::arg("qtype"), py::arg("bias"), py::arg("out"),
        py::arg("activations") = "int8",
        "out = x @ W^T (+ bias) on the CPU with W quantised (packed by qlinear_pack); activations='int8': x is "
        "quantised to int8 per 32-block on the fly; 'float': each sub-panel of W is dequantised and x kept.");
  m.def("qlinear_rows", &qlinear_rows, py::arg("packed_weight"), py::arg("qtype"), py::arg("n"), py::arg("k"),
        py::arg("ids"), py::arg("out"),
        "out (count, k) float32 = rows ids (int64, each in [0, n)) of a packed quantised (n, k) weight, dequantised "
        "as gguf does (an embedding lookup in a quantised table).");
}

}  // namespace fastinfer::bindings
