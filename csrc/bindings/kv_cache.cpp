// Bindings of the KV-cache writes: reshape_and_cache (rows into slots) and attention_with_kvcache
// (flash_attn_with_kvcache: append at cache_seqlens, then attend; every check before any write).
#include <pybind11/pybind11.h>

#include <optional>
#include <vector>

#include "bindings/attention.h"
#include "bindings/bindings.h"
#include "fastinfer/cpu.h"

namespace fastinfer::bindings {

namespace {

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

}  // namespace

void bind_kv_cache(py::module_& m) {
  m.def("reshape_and_cache", &reshape_and_cache, py::arg("key"), py::arg("value"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::kw_only(), py::arg("stream") = 0, "Write key/value rows into cache slots (negative slot = skip).");
  m.def("attention_with_kvcache", &attention_with_kvcache, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("out"), py::kw_only(), py::arg("k") = py::none(), py::arg("v") = py::none(), py::arg("lse") = py::none(),
        py::arg("cache_seqlens") = py::none(), py::arg("cache_batch_idx") = py::none(), py::arg("block_table") = py::none(),
        py::arg("alibi_slopes") = py::none(), py::arg("options"), py::arg("stream") = 0,
        py::arg("workspace_alloc") = py::none(),
        "flash_attn_with_kvcache: validate everything, append k/v at cache_seqlens, then attend.");

}

}  // namespace fastinfer::bindings
