// Bindings of the CPU pointwise ops of a decoder layer: rms_norm (with the fused residual add),
// act_and_mul (gated activation) and rotary_embedding (in place).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>

#include "bindings/bindings.h"
#include "bindings/checks.h"
#include "fastinfer/cpu.h"

namespace fastinfer::bindings {

namespace {

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

}  // namespace

void bind_pointwise(py::module_& m) {
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        py::arg("residual") = py::none(),
        "out = RMSNorm(x) * weight (float32 weight); with residual: residual += x (rounded) first, then normalise it.");
  m.def("act_and_mul", &act_and_mul, py::arg("x"), py::arg("out"), py::arg("act"),
        "out = act(x[:, :d]) * x[:, d:], act 'silu' or 'gelu_tanh', with torch's per-op rounding.");
  m.def("rotary_embedding", &rotary_embedding, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("positions"),
        "Rotate-half rotary embedding of x (tokens, heads, head_dim) in place, cos/sin rows picked by positions.");
}

}  // namespace fastinfer::bindings
