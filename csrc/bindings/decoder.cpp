// Binding of the native CPU decoder stack: fastinfer._C.CpuDecoderConfig (sizes and constants),
// DecoderLayerWeights (one layer's tensors, by name) and CpuDecoder, which checks every weight once
// when built, every cache once when bound, and then runs a whole step per call.
#include <optional>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <deque>
#include <limits>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/checks.h"
#include "fastinfer/cpu.h"
#include "fastinfer/decoder.h"

namespace fastinfer::bindings {

namespace {

// fastinfer._C.CpuDecoderConfig: the stack's sizes and constants, each checked (by name) when built.
struct StackConfig {
  int64_t hidden, intermediate;
  int heads, kv_heads, head_dim;
  float norm_eps, softmax_scale;
  Activation act;
  std::string dtype;  // "float32" / "bfloat16" of the activations; "" = the first projection's

  StackConfig(const py::object& hidden_obj, const py::object& intermediate_obj, const py::object& heads_obj,
              const py::object& kv_heads_obj, const py::object& head_dim_obj, const py::object& norm_eps_obj,
              const py::object& softmax_scale_obj, const std::string& act_name, const std::string& dtype_name_)
      : dtype(dtype_name_) {
    check(dtype.empty() || dtype == "float32" || dtype == "bfloat16", "dtype: expected 'float32' or 'bfloat16', got '",
          dtype, "'");
    hidden = int_arg(hidden_obj, "hidden", 1, kInt32Max);
    intermediate = int_arg(intermediate_obj, "intermediate", 1, kInt32Max);
    heads = static_cast<int>(int_arg(heads_obj, "heads", 1, kInt32Max));
    kv_heads = static_cast<int>(int_arg(kv_heads_obj, "kv_heads", 1, kInt32Max));
    head_dim = static_cast<int>(int_arg(head_dim_obj, "head_dim", 1, kInt32Max));
    const double eps = float_arg(norm_eps_obj, "norm_eps"), scale = float_arg(softmax_scale_obj, "softmax_scale");
    check(heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
    check(head_dim % 8 == 0 && head_dim <= cpu::kMaxHeadDim, "head_dim must be a multiple of 8 up to ", cpu::kMaxHeadDim,
          ", got ", head_dim);
    check(act_name == "silu" || act_name == "gelu_tanh", "act: expected 'silu' or 'gelu_tanh', got '", act_name, "'");
    check(eps >= 0 && eps <= std::numeric_limits<float>::max(), "norm_eps: expected a finite number >= 0, got ", eps);
    check(std::isfinite(scale) && std::fabs(scale) <= std::numeric_limits<float>::max(),
          "softmax_scale: expected a finite float32 number, got ", scale);
    check(static_cast<int64_t>(heads + 2 * static_cast<int64_t>(kv_heads)) * head_dim <= kInt32Max,
          "heads, kv_heads, head_dim: (heads + 2 * kv_heads) * head_dim exceeds 2**31 - 1");
    norm_eps = static_cast<float>(eps);
    softmax_scale = static_cast<float>(scale);
    act = act_name == "silu" ? Activation::kSilu : Activation::kGeluTanh;
  }
};

// fastinfer._C.DecoderLayerWeights: the tensors of one pre-norm layer, by name. Held as given;
// CpuDecoder checks each one (naming layers[i].<field>) against the config when it is built.
struct LayerTensors {
  py::object input_norm, post_norm;  // (hidden,) float32 multipliers
  py::object qkv, o, gate_up, down;  // packed by linear_pack: q heads, k heads, v heads; o; gate, then up; down
  py::object qkv_bias, o_bias, gate_up_bias, down_bias;  // (n,) in the weights' dtype, or None
  int window_left = -1;  // sliding window (keys with q_pos - k_pos <= window_left); -1 = unbounded

  LayerTensors(const py::object& input_norm_, const py::object& post_norm_, const py::object& qkv_,
               const py::object& o_, const py::object& gate_up_, const py::object& down_, const py::object& qkv_bias_,
               const py::object& o_bias_, const py::object& gate_up_bias_, const py::object& down_bias_,
               const py::object& window_left_)
      : input_norm(input_norm_), post_norm(post_norm_), qkv(qkv_), o(o_), gate_up(gate_up_), down(down_),
        qkv_bias(qkv_bias_), o_bias(o_bias_), gate_up_bias(gate_up_bias_), down_bias(down_bias_) {
    for (auto [name, t] : {std::pair<const char*, const py::object*>{"input_norm", &input_norm}, {"post_norm", &post_norm},
                           {"qkv", &qkv}, {"o", &o}, {"gate_up", &gate_up}, {"down", &down}})
      check(!t->is_none(), "DecoderLayerWeights: missing '", name, "'");
    window_left = static_cast<int>(int_arg(window_left_, "window_left", -1, kInt32Max));
  }
};

// Holds the weights (and, once bound, the caches) of a Llama-style stack, checked once here,
// so that a step is one call: fastinfer.models.cpu_decoder builds it from a packed model.
class CpuDecoder {
 public:
  CpuDecoder(const StackConfig& config, const py::object& final_norm, const py::list& layers) {
    check(py::len(layers) > 0, "layers: expected at least one layer");
    DecoderConfig& c = config_;
    dtype_ = config.dtype;
    c.hidden = config.hidden;
    c.intermediate = config.intermediate;
    c.heads = config.heads;
    c.kv_heads = config.kv_heads;
    c.head_dim = config.head_dim;
    c.norm_eps = config.norm_eps;
    c.softmax_scale = config.softmax_scale;
    c.act = config.act;
    c.final_norm = norm_weight(final_norm, "final_norm");  // hidden is set: the norms' length
    const int64_t hidden = c.hidden, intermediate = c.intermediate;
    const int64_t qkv = static_cast<int64_t>(c.heads + 2 * c.kv_heads) * c.head_dim,
                  attn = static_cast<int64_t>(c.heads) * c.head_dim;
    for (size_t i = 0; i < py::len(layers); ++i) {
      const py::handle item = layers[i];
      if (!py::isinstance<LayerTensors>(item))
        throw py::type_error(cat("layers[", i, "]: expected a DecoderLayerWeights, got ",
                                 py::type::of(item).attr("__name__").cast<std::string>()));
      const LayerTensors& t = item.cast<const LayerTensors&>();
      DecoderLayerWeights w{};
      const std::string at = cat("layers[", i, "].");
      w.input_norm = norm_weight(t.input_norm, at + "input_norm");
      w.post_norm = norm_weight(t.post_norm, at + "post_norm");
      w.qkv = projection(t.qkv, t.qkv_bias, qkv, hidden, i == 0, at + "qkv");
      w.o = projection(t.o, t.o_bias, hidden, attn, false, at + "o");
      w.gate_up = projection(t.gate_up, t.gate_up_bias, 2 * intermediate, hidden, false, at + "gate_up");
      w.down = projection(t.down, t.down_bias, hidden, intermediate, false, at + "down");
      w.window_left = t.window_left;
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
               const py::object& table_obj, const py::object& slots_obj, const py::object& workspace_obj,
               const py::object& float_rows_obj) {
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

    // float_rows: (tokens,) bool or uint8, rows whose quantised projections keep float activations.
    const uint8_t* float_rows = nullptr;
    std::optional<TensorView> fr;
    if (!float_rows_obj.is_none()) {
      fr.emplace(float_rows_obj, "float_rows");
      check_cpu(*fr);
      if (!fr->is(dl::kBool, 8) && !fr->is(dl::kUInt, 8))
        throw py::type_error(cat("float_rows: expected dtype bool or uint8, got ", fr->dtype_str()));
      check_shape(*fr, {T});
      check(T <= 1 || fr->stride(0) == 1, "float_rows: must be contiguous");
      float_rows = fr->data<const uint8_t>();
    }
    DecoderStep s{T, batch, x.data(), out.data(), cos.data<const void>(), sin.data<const void>(), rows.data<const int64_t>(),
                  cq, ck, table.data<const int32_t>(), table.stride(0), slots.data<const int64_t>(), ws.data(), float_rows};
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
    if (py::hasattr(w_obj, "parts")) return parts_projection(w_obj, bias_obj, n, k, first, name);
    // A quantised projection is ops.QuantizedPacked: its uint8 `data` and its `qtype`.
    const bool quantized = py::hasattr(w_obj, "qtype") && py::hasattr(w_obj, "data");
    const py::object data_obj = quantized ? py::object(w_obj.attr("data")) : w_obj;
    TensorView w(data_obj, name.c_str());
    check_cpu(w);
    if (first) {
      check(!quantized || !dtype_.empty(), name, ": a quantised projection needs CpuDecoderConfig(dtype=...)");
      config_.dtype = !dtype_.empty() ? (dtype_ == "float32" ? DType::kFloat32 : DType::kBFloat16) : linear_dtype(w);
    }
    PackedProjection p{w.data<const void>(), nullptr, -1};
    if (quantized) {
      const QType t = qtype_arg(py::cast<std::string>(w_obj.attr("qtype")));
      check(k % kQBlock == 0, name, ": a quantised projection needs in_features a multiple of ", kQBlock, ", got ", k);
      check_qpacked(w, t, n, k);
      p.qtype = static_cast<int>(t);
    } else {
      check_packed(w, config_.dtype, n, k);
    }
    if (!bias_obj.is_none()) p.bias = projection_bias(bias_obj, n, name).bias;
    keep_.append(data_obj);
    return p;
  }

  // A projection's bias (n,), in the stack's dtype: checked, kept alive, and returned as `bias`.
  PackedProjection projection_bias(const py::object& bias_obj, int64_t n, const std::string& name) {
    const std::string bias_name = name + "_bias";
    TensorView b(bias_obj, bias_name.c_str());
    check_cpu(b);
    if (float_dtype(b) != config_.dtype)
      throw py::type_error(cat(bias_name, ": expected dtype ", dtype_name(config_.dtype), ", got ", b.dtype_str()));
    check_shape(b, {n});
    check(n <= 1 || b.stride(0) == 1, bias_name, ": must be contiguous");
    keep_.append(bias_obj);
    PackedProjection p{};
    p.bias = b.data<const void>();
    return p;
  }

  // ops.QuantizedParts: each part as its own projection of its rows, chained through `rest` (the parts after the
  // first live in parts_); the bias, checked whole, split among them.
  PackedProjection parts_projection(const py::object& w_obj, const py::object& bias_obj, int64_t n, int64_t k, bool first,
                                    const std::string& name) {
    const py::tuple parts = w_obj.attr("parts");
    check(py::len(parts) > 0, name, ": no parts");
    std::vector<PackedProjection> built;
    int64_t rows = 0;
    for (size_t i = 0; i < py::len(parts); ++i) {
      const py::object part = parts[i];
      check(py::hasattr(part, "qtype") && py::hasattr(part, "data") && py::hasattr(part, "out_features"), name,
            ".parts[", i, "]: expected a QuantizedPacked");
      const int64_t r = py::cast<int64_t>(part.attr("out_features"));
      check(r > 0 && rows + r <= n, name, ".parts[", i, "]: ", r, " outputs, past the projection's ", n);
      built.push_back(projection(part, py::none(), r, k, first && i == 0, cat(name, ".parts[", i, "]")));
      built.back().rows = r;
      rows += r;
    }
    check(rows == n, name, ": the parts hold ", rows, " outputs, expected ", n);
    if (!bias_obj.is_none()) {
      const PackedProjection whole = projection_bias(bias_obj, n, name);
      int64_t col = 0;
      for (PackedProjection& part : built) {
        part.bias = static_cast<const char*>(whole.bias) + dtype_size(config_.dtype) * col;
        col += part.rows;
      }
    }
    for (size_t i = built.size() - 1; i > 0; --i) {  // back to front: each part points at the stored next one
      parts_.push_back(built[i]);
      built[i - 1].rest = &parts_.back();
    }
    return built[0];
  }

  DecoderConfig config_{};
  std::deque<PackedProjection> parts_;  // the parts after the first of multi-part projections (stable addresses)
  std::string dtype_;  // StackConfig.dtype
  int64_t num_blocks_ = 0;
  py::list keep_;    // the weight tensors: alive as long as this object
  py::list caches_;  // the bound (k, v) pairs
};

}  // namespace

void bind_decoder(py::module_& m) {
  py::class_<StackConfig>(m, "CpuDecoderConfig", "Sizes and constants of a CpuDecoder stack, checked when built.")
      .def(py::init<const py::object&, const py::object&, const py::object&, const py::object&, const py::object&,
                    const py::object&, const py::object&, const std::string&, const std::string&>(),
           py::kw_only(), py::arg("hidden"), py::arg("intermediate"), py::arg("heads"), py::arg("kv_heads"),
           py::arg("head_dim"), py::arg("norm_eps"), py::arg("softmax_scale"), py::arg("act"),
           py::arg("dtype") = std::string())
      .def_readonly("hidden", &StackConfig::hidden)
      .def_readonly("intermediate", &StackConfig::intermediate)
      .def_readonly("heads", &StackConfig::heads)
      .def_readonly("kv_heads", &StackConfig::kv_heads)
      .def_readonly("head_dim", &StackConfig::head_dim)
      .def_readonly("norm_eps", &StackConfig::norm_eps)
      .def_readonly("softmax_scale", &StackConfig::softmax_scale)
      .def_property_readonly("act", [](const StackConfig& c) { return c.act == Activation::kSilu ? "silu" : "gelu_tanh"; });
  py::class_<LayerTensors>(m, "DecoderLayerWeights",
                           "The tensors of one pre-norm decoder layer (projections packed by linear_pack).")
      .def(py::init<const py::object&, const py::object&, const py::object&, const py::object&, const py::object&,
                    const py::object&, const py::object&, const py::object&, const py::object&, const py::object&,
                    const py::object&>(),
           py::kw_only(), py::arg("input_norm") = py::none(), py::arg("post_norm") = py::none(),
           py::arg("qkv") = py::none(), py::arg("o") = py::none(), py::arg("gate_up") = py::none(),
           py::arg("down") = py::none(), py::arg("qkv_bias") = py::none(), py::arg("o_bias") = py::none(),
           py::arg("gate_up_bias") = py::none(), py::arg("down_bias") = py::none(), py::arg("window_left") = -1)
      .def_readonly("input_norm", &LayerTensors::input_norm)
      .def_readonly("post_norm", &LayerTensors::post_norm)
      .def_readonly("qkv", &LayerTensors::qkv)
      .def_readonly("o", &LayerTensors::o)
      .def_readonly("gate_up", &LayerTensors::gate_up)
      .def_readonly("down", &LayerTensors::down)
      .def_readonly("qkv_bias", &LayerTensors::qkv_bias)
      .def_readonly("o_bias", &LayerTensors::o_bias)
      .def_readonly("gate_up_bias", &LayerTensors::gate_up_bias)
      .def_readonly("down_bias", &LayerTensors::down_bias)
      .def_readonly("window_left", &LayerTensors::window_left);
  py::class_<CpuDecoder>(m, "CpuDecoder",
                         "A Llama-style decoder stack on the CPU, one call per step (see fastinfer.models.cpu_decoder).")
      .def(py::init<const StackConfig&, const py::object&, const py::list&>(), py::arg("config"), py::arg("final_norm"),
           py::arg("layers"))
      .def("bind_caches", &CpuDecoder::bind_caches, py::arg("kv_caches"))
      .def("workspace_bytes", &CpuDecoder::workspace_bytes, py::arg("tokens"))
      .def("forward", &CpuDecoder::forward, py::arg("x"), py::arg("out"), py::arg("cos"), py::arg("sin"), py::arg("rows"),
           py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("block_table"), py::arg("slot_mapping"),
           py::arg("workspace"), py::arg("float_rows") = py::none());
}

}  // namespace fastinfer::bindings
