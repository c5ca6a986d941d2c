// Binding of the attention backward: dq, dk, dv from dout and the forward's out and lse
// (dense or varlen layouts), checked with the forward's checks (make_params) plus the gradients'.
#include <pybind11/pybind11.h>

#include "bindings/attention.h"
#include "bindings/bindings.h"
#include "fastinfer/attention_backward.h"
#include "fastinfer/cpu.h"

namespace fastinfer::bindings {

namespace {

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

}  // namespace

void bind_backward(py::module_& m) {
  m.def("attention_backward", &attention_backward, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::kw_only(),
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(), py::arg("alibi_slopes") = py::none(),
        py::arg("options"), py::arg("deterministic") = false, py::arg("stream") = 0, py::arg("workspace_alloc") = py::none(),
        "Gradients of attention_forward into dq, dk, dv (flash-attention backward: P recomputed from lse).\n"
        "Dense (batch, seqlen, nheads, headdim) or varlen (total, nheads, headdim) with cu_seqlens_q/k; lse is\n"
        "(batch, nheads, seqlen_q) or (nheads, total_q) float32. GPU tensors: runs on `stream`, scratch from\n"
        "workspace_alloc(nbytes). The CPU path is always deterministic; on a GPU deterministic=True avoids atomics.");
}

}  // namespace fastinfer::bindings
