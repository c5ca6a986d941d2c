// Bindings of the attention forward: fastinfer._C.AttentionOptions and attention_forward (dense,
// varlen and paged layouts, flash-attn's), and make_params, the checks every attention call shares.
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <vector>

#include "bindings/attention.h"
#include "bindings/bindings.h"
#include "fastinfer/cpu.h"

namespace fastinfer::bindings {

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

namespace {

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

}  // namespace

void bind_attention(py::module_& m) {
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
}

}  // namespace fastinfer::bindings
