// Standalone GPU self-test of the CUDA attention / KV-cache API (attention_cuda.h), independent of
// the Python bindings: random cases over every layout and option, compared with a float64 reference
// written here from AttentionParams' own semantics (the host helpers q_len, k_len, kv_row_offset).
// Outputs are NaN-poisoned, padded views check that nothing outside them is written.
//
//   fastinfer_cuda_selftest [--cases N] [--max-fixed N] [--edge-only] [--seed S] [--quick]     exit 0 = all passed
// --max-fixed limits the per-head-dim fixed cases; the edge cases (issue 21) always run, alone with --edge-only.
//
// Built only on request: cmake --build <dir> --target fastinfer_cuda_selftest (see bench/gpu_suite.sh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/attention_cuda.h"

using fastinfer::AttentionParams;
using fastinfer::DType;
using fastinfer::KVWriteParams;
namespace fc = fastinfer::cuda;

namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(3);
  }
}

uint16_t to_bits(float x, DType t) {
  if (t == DType::kFloat16) {
    __half h = __float2half_rn(x);
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
  }
  __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
double from_bits(uint16_t u, DType t) {
  if (t == DType::kFloat16) {
    __half h;
    std::memcpy(&h, &u, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &u, 2);
  return __bfloat162float(h);
}
uint16_t nan_bits(DType t) { return t == DType::kFloat16 ? 0x7E00 : 0x7FC0; }

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    ck(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    if (n) ck(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  explicit Dev(size_t bytes) : n(bytes) { ck(cudaMalloc(&p, std::max<size_t>(bytes, 1)), "cudaMalloc"); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) ck(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
};

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t s) : g(s) {}
  int uni(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); }  // inclusive
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
  template <class C>
  auto pick(const C& c) { return c[uni(0, static_cast<int>(c.size()) - 1)]; }
};

enum class KV { kDense, kVarlen, kPaged };

struct Case {
  DType dt = DType::kBFloat16;
  int D = 128, H = 4, Hk = 1;
  std::vector<int> lq, lk;
  bool varlen_q = false;
  KV kv = KV::kDense;
  int block_size = 16;
  bool seqlens_k = false, batch_idx = false;  // dense cache extras
  int wl = -1, wr = -1;
  float softcap = 0.f;
  int alibi = 0;  // 0 none, 1 (H,), 2 (B, H)
  int num_splits = 0;
  int pad = 0, off = 0;  // row padding and view offset (elements): off % 8 != 0 makes every view unaligned
  int max_q_hint = 0, max_k_hint = 0;
  float scale = 0.f;
  int poison = 0;    // non-finite key elements: 0 none, 1 +inf, 2 NaN, 3 -inf (a few random ones)
  int trailing = 0;  // varlen q: rows past cu_seqlens_q[-1] (outside every sequence: zeros, lse +inf)

  std::string str() const {
    char buf[512];
    std::string lqs, lks;
    for (size_t i = 0; i < lq.size(); ++i) lqs += (i ? "," : "") + std::to_string(lq[i]);
    for (size_t i = 0; i < lk.size(); ++i) lks += (i ? "," : "") + std::to_string(lk[i]);
    std::snprintf(buf, sizeof buf,
                  "%s D=%d H=%d Hk=%d lq=[%s]%s lk=[%s] kv=%s bs=%d seqlens=%d bidx=%d win=(%d,%d) softcap=%g alibi=%d "
                  "splits=%d pad=%d off=%d hints=(%d,%d) poison=%d trailing=%d",
                  dt == DType::kFloat16 ? "fp16" : "bf16", D, H, Hk, lqs.c_str(), varlen_q ? "(varlen)" : "", lks.c_str(),
                  kv == KV::kDense ? "dense" : kv == KV::kVarlen ? "varlen" : "paged", block_size, seqlens_k, batch_idx,
                  wl, wr, softcap, alibi, num_splits, pad, off, max_q_hint, max_k_hint, poison, trailing);
    return buf;
  }
};

struct Failure {
  std::string what;
};

void expect(bool ok, const std::string& what) {
  if (!ok) throw Failure{what};
}

// Runs one attention case on the GPU and compares with a float64 reference. Returns max errors; the raw
// output and lse buffers (as downloaded, poison included) go to got_out / got_lse when given.
void run_attention_case(const Case& c, Rng& rng, double* worst_out, double* worst_lse,
                        std::vector<uint16_t>* got_out = nullptr, std::vector<float>* got_lse = nullptr) {
  const int B = static_cast<int>(c.lq.size()), D = c.D, H = c.H, Hk = c.Hk, group = H / Hk;
  const int W = D + c.pad;  // elements per (row, head) in storage
  const DType dt = c.dt;
  auto rnd_vec = [&](size_t n) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = to_bits(static_cast<float>(rng.normal()), dt);
    return v;
  };

  // Queries / outputs: dense (B, Sq, H, W) or varlen (total, H, W); the view starts at `off`.
  const int sq_dense = c.varlen_q ? 0 : c.lq[0];
  std::vector<int32_t> cu_q(B + 1, 0), cu_k(B + 1, 0);
  for (int b = 0; b < B; ++b) cu_q[b + 1] = cu_q[b] + c.lq[b];
  for (int b = 0; b < B; ++b) cu_k[b + 1] = cu_k[b] + c.lk[b];
  const int64_t q_rows = c.varlen_q ? cu_q[B] + c.trailing : int64_t(B) * sq_dense;
  const size_t q_elems = static_cast<size_t>(q_rows) * H * W + c.off + 8;
  std::vector<uint16_t> hq = rnd_vec(q_elems), hout(q_elems, nan_bits(dt));

  // Keys/values.
  int64_t kv_rows = 0;
  std::vector<int32_t> table, seqlens(B), bidx(B);
  int cols = 0, cap = 0, Bc = B;
  size_t kv_elems;
  if (c.kv == KV::kPaged) {
    int nblocks = 0;
    std::vector<int> nb(B);
    for (int b = 0; b < B; ++b) {
      nb[b] = std::max(1, (c.lk[b] + c.block_size - 1) / c.block_size);
      cols = std::max(cols, nb[b]);
      nblocks += nb[b];
    }
    nblocks += 3;
    std::vector<int32_t> perm(nblocks);
    for (int i = 0; i < nblocks; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng.g);
    table.assign(static_cast<size_t>(B) * cols, -1);
    int at = 0;
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < nb[b]; ++i) table[b * cols + i] = perm[at++];
    kv_rows = nblocks;
    kv_elems = static_cast<size_t>(nblocks) * c.block_size * Hk * W;
  } else if (c.kv == KV::kVarlen) {
    kv_rows = cu_k[B];
    kv_elems = static_cast<size_t>(kv_rows) * Hk * W;
  } else {
    cap = 0;
    for (int b = 0; b < B; ++b) cap = std::max(cap, c.lk[b]);
    if (c.seqlens_k) cap += rng.uni(0, 9);  // a cache longer than the keys in use
    Bc = c.batch_idx ? B + 2 : B;
    kv_rows = Bc;
    kv_elems = static_cast<size_t>(Bc) * cap * Hk * W;
    for (int b = 0; b < B; ++b) seqlens[b] = c.lk[b];
    for (int b = 0; b < B; ++b) bidx[b] = b;
    if (c.batch_idx) {
      std::vector<int32_t> perm(Bc);
      for (int i = 0; i < Bc; ++i) perm[i] = i;
      std::shuffle(perm.begin(), perm.end(), rng.g);
      for (int b = 0; b < B; ++b) bidx[b] = perm[b];
    }
  }
  kv_elems += c.off + 8;
  std::vector<uint16_t> hk = rnd_vec(kv_elems), hv = rnd_vec(kv_elems);
  if (c.poison) {  // a few non-finite key elements anywhere (some fall in unused rows or padding)
    const bool f16 = dt == DType::kFloat16;
    const uint16_t bits = c.poison == 1 ? (f16 ? 0x7C00 : 0x7F80) : c.poison == 2 ? nan_bits(dt) : (f16 ? 0xFC00 : 0xFF80);
    for (int i = 0; i < 3; ++i) hk[rng.uni(0, static_cast<int>(kv_elems) - 1)] = bits;
  }
  std::vector<float> slopes;
  if (c.alibi) {
    slopes.resize(static_cast<size_t>(c.alibi == 2 ? B : 1) * H);
    for (auto& s : slopes) s = static_cast<float>(0.01 + 0.5 * std::abs(rng.normal()) / 2);
  }
  const size_t lse_n = static_cast<size_t>(c.varlen_q ? H * q_rows : int64_t(B) * H * sq_dense) + 1;

  Dev<uint16_t> dq(hq), dk(hk), dv(hv), dout(hout);
  Dev<float> dlse(std::vector<float>(lse_n, std::numeric_limits<float>::quiet_NaN()));
  Dev<int32_t> dcuq(cu_q), dcuk(cu_k), dtable(table.empty() ? std::vector<int32_t>{0} : table), dseq(seqlens), dbidx(bidx);
  Dev<float> dslopes(slopes.empty() ? std::vector<float>{0.f} : slopes);

  AttentionParams p{};
  p.dtype = dt;
  p.batch = B;
  p.num_heads = H;
  p.num_kv_heads = Hk;
  p.head_dim = D;
  p.q = dq.p + c.off;
  p.out = dout.p + c.off;
  p.q_head_stride = p.o_head_stride = W;
  p.q_row_stride = p.o_row_stride = int64_t(H) * W;
  if (c.varlen_q) {
    p.cu_seqlens_q = dcuq.p;
  } else {
    p.seqlen_q = sq_dense;
    p.q_batch_stride = p.o_batch_stride = int64_t(sq_dense) * H * W;
  }
  p.k = dk.p + c.off;
  p.v = dv.p + c.off;
  p.k_head_stride = p.v_head_stride = W;
  p.k_row_stride = p.v_row_stride = int64_t(Hk) * W;
  if (c.kv == KV::kPaged) {
    p.block_table = dtable.p;
    p.block_table_stride = cols;
    p.block_size = c.block_size;
    p.k_batch_stride = p.v_batch_stride = int64_t(c.block_size) * Hk * W;
    if (rng.uni(0, 1)) p.seqlens_k = dseq.p;  // lengths from seqlens_k (= lk) ...
    else p.cu_seqlens_k = dcuk.p;             // ... or from cu_seqlens_k
  } else if (c.kv == KV::kVarlen) {
    p.cu_seqlens_k = dcuk.p;
  } else {
    p.seqlen_k = cap;
    p.k_batch_stride = p.v_batch_stride = int64_t(cap) * Hk * W;
    if (c.seqlens_k) p.seqlens_k = dseq.p;
    if (c.batch_idx) p.kv_batch_idx = dbidx.p;
  }
  p.lse = dlse.p;
  if (c.varlen_q) {
    p.lse_batch_stride = 0;
    p.lse_head_stride = q_rows;
    p.lse_row_stride = 1;
  } else {
    p.lse_batch_stride = int64_t(H) * sq_dense;
    p.lse_head_stride = sq_dense;
    p.lse_row_stride = 1;
  }
  if (c.alibi) {
    p.alibi_slopes = dslopes.p;
    p.alibi_batch_stride = c.alibi == 2 ? H : 0;
  }
  p.softmax_scale = c.scale > 0.f ? c.scale : 1.f / std::sqrt(static_cast<float>(D));
  p.softcap = c.softcap;
  p.window_left = c.wl;
  p.window_right = c.wr;
  p.num_splits = c.num_splits;

  fc::AttentionExtras x;
  x.q_rows = c.varlen_q ? q_rows : 0;
  x.kv_rows = kv_rows;
  x.block_table_cols = cols;
  x.max_seqlen_q = c.max_q_hint;
  x.max_seqlen_k = c.max_k_hint;
  const size_t ws_bytes = fc::attention_workspace_bytes(p, x, 0);
  Dev<char> ws(ws_bytes);
  fc::attention_forward(p, x, ws.p, ws_bytes, nullptr);
  ck(cudaGetLastError(), "attention_forward");
  ck(cudaDeviceSynchronize(), "attention_forward (sync)");
  const std::vector<uint16_t> gout = dout.get();
  const std::vector<float> glse = dlse.get();
  if (got_out) *got_out = gout;
  if (got_lse) *got_lse = glse;

  // Reference, with the host copies of every index array.
  AttentionParams hp = p;
  hp.cu_seqlens_q = c.varlen_q ? cu_q.data() : nullptr;
  hp.cu_seqlens_k = p.cu_seqlens_k ? cu_k.data() : nullptr;
  hp.seqlens_k = p.seqlens_k ? seqlens.data() : nullptr;
  hp.kv_batch_idx = p.kv_batch_idx ? bidx.data() : nullptr;
  hp.block_table = p.block_table ? table.data() : nullptr;
  const double scale = p.softmax_scale, ninf = -std::numeric_limits<double>::infinity();
  std::vector<char> touched(q_elems, 0);
  std::vector<double> s, o(D);
  // Rounding of P to fp16/bf16 before P.V and of the output: absolute + relative bounds.
  const double atol = dt == DType::kFloat16 ? 2e-3 : 1.2e-2, rtol = dt == DType::kFloat16 ? 2e-3 : 1.6e-2;
  const double tol_lse = 2e-3;
  for (int b = 0; b < B; ++b) {
    const int sq = hp.q_len(b), sk = hp.k_len(b);
    for (int t = 0; t < sq; ++t)
      for (int h = 0; h < H; ++h) {
        const int hh = h / group;
        const int64_t qo = c.off + hp.q_row_offset(b, t, p.q_batch_stride, p.q_row_stride) + int64_t(h) * W;
        const int64_t pos = int64_t(t) + sk - sq;
        const double slope = c.alibi ? slopes[(c.alibi == 2 ? b * H : 0) + h] : 0.0;
        s.assign(sk, ninf);
        double mx = ninf;
        bool seen = false, bad = false;  // softmax: a NaN or +inf score, or only -inf ones, gives NaN
        for (int j = 0; j < sk; ++j) {
          if (c.wl >= 0 && j < pos - c.wl) continue;
          if (c.wr >= 0 && j > pos + c.wr) continue;
          seen = true;
          const int64_t ko = c.off + hp.kv_row_offset(b, j, p.k_batch_stride, p.k_row_stride) + int64_t(hh) * W;
          double acc = 0;
          for (int d = 0; d < D; ++d) acc += from_bits(hq[qo + d], dt) * from_bits(hk[ko + d], dt);
          acc *= scale;
          if (c.softcap > 0) acc = c.softcap * std::tanh(acc / c.softcap);
          acc -= slope * std::abs(static_cast<double>(pos - j));
          bad = bad || std::isnan(acc) || acc == -ninf;
          s[j] = acc;
          mx = std::max(mx, acc);
        }
        bad = bad || (seen && mx == ninf);
        if (bad) {
          const int64_t qo = c.off + hp.q_row_offset(b, t, p.q_batch_stride, p.q_row_stride) + int64_t(h) * W;
          for (int d = 0; d < D; ++d) {
            touched[qo + d] = 1;
            expect(std::isnan(from_bits(gout[qo + d], dt)), "a row with a NaN/+inf score (or only -inf ones) must be NaN");
          }
          const int64_t row = c.varlen_q ? cu_q[b] + t : t;
          expect(std::isnan(glse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride]),
                 "the lse of a NaN row must be NaN");
          continue;
        }
        std::fill(o.begin(), o.end(), 0.0);
        double sum = 0;
        if (mx != ninf)
          for (int j = 0; j < sk; ++j) {
            if (s[j] == ninf) continue;
            const double w = std::exp(s[j] - mx);
            sum += w;
            const int64_t vo = c.off + hp.kv_row_offset(b, j, p.v_batch_stride, p.v_row_stride) + int64_t(hh) * W;
            for (int d = 0; d < D; ++d) o[d] += w * from_bits(hv[vo + d], dt);
          }
        for (int d = 0; d < D; ++d) {
          const double ref = sum > 0 ? o[d] / sum : 0.0, got = from_bits(gout[qo + d], dt);
          touched[qo + d] = 1;
          expect(!std::isnan(got), "out[b=" + std::to_string(b) + ",t=" + std::to_string(t) + ",h=" + std::to_string(h) +
                                        ",d=" + std::to_string(d) + "] is NaN (never written?)");
          if (sum == 0) expect(got == 0.0, "a row that sees no key must be exactly 0");
          *worst_out = std::max(*worst_out, std::abs(got - ref));
          expect(std::abs(got - ref) <= atol + rtol * std::abs(ref), "out error " + std::to_string(std::abs(got - ref)) + " at b=" +
                                                     std::to_string(b) + " t=" + std::to_string(t) + " h=" +
                                                     std::to_string(h) + " d=" + std::to_string(d));
        }
        const int64_t row = c.varlen_q ? cu_q[b] + t : t;
        const float gl = glse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride];
        if (sum == 0) {
          expect(std::isinf(gl) && gl > 0, "lse of a row without keys must be +inf, got " + std::to_string(gl));
        } else {
          const double rl = mx + std::log(sum);
          *worst_lse = std::max(*worst_lse, std::abs(gl - rl));
          expect(std::abs(gl - rl) <= tol_lse * std::max(1.0, std::abs(rl)),
                 "lse error " + std::to_string(std::abs(gl - rl)) + " at b=" + std::to_string(b) + " t=" +
                     std::to_string(t) + " h=" + std::to_string(h));
        }
      }
  }
  for (int64_t row = c.varlen_q ? cu_q[B] : q_rows; row < q_rows; ++row)  // outside every sequence
    for (int h = 0; h < H; ++h) {
      const int64_t qo = c.off + row * p.q_row_stride + int64_t(h) * W;
      for (int d = 0; d < D; ++d) {
        touched[qo + d] = 1;
        expect(from_bits(gout[qo + d], dt) == 0.0, "a row outside every sequence must be 0, row " + std::to_string(row));
      }
      const float gl = glse[h * p.lse_head_stride + row * p.lse_row_stride];
      expect(std::isinf(gl) && gl > 0, "the lse of a row outside every sequence must be +inf");
    }
  for (size_t i = 0; i < q_elems; ++i)
    if (!touched[i]) expect(gout[i] == nan_bits(dt), "an element outside the output view was written at " + std::to_string(i));
}

// reshape_and_cache and the kvcache append against host-computed expectations.
void run_cache_case(Rng& rng, DType dt, int esz_pad) {
  const int T = rng.uni(1, 70), Hk = rng.uni(1, 3), D = rng.pick(std::vector<int>{64, 128, 72});
  const int bs = rng.pick(std::vector<int>{1, 5, 16, 256}), nblocks = (T + bs - 1) / bs + 2, W = D + esz_pad;
  const int64_t num_slots = int64_t(nblocks) * bs;
  std::vector<uint16_t> key(static_cast<size_t>(T) * Hk * W), val(key.size()), kc(static_cast<size_t>(num_slots) * Hk * W),
      vc(kc.size());
  for (auto* v : {&key, &val, &kc, &vc})
    for (auto& x : *v) x = to_bits(static_cast<float>(rng.normal()), dt);
  std::vector<int64_t> slots(T);
  std::vector<int64_t> perm(num_slots);
  for (int64_t i = 0; i < num_slots; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng.g);
  for (int i = 0; i < T; ++i) slots[i] = perm[i];
  for (int i = 0; i < T; i += 7) slots[i] = -1;                     // padding tokens
  if (T > 3) slots[3] = num_slots + 5 + rng.uni(0, 1000000);         // out of range: skipped
  Dev<uint16_t> dkey(key), dval(val), dkc(kc), dvc(vc);
  Dev<int64_t> dslots(slots);
  KVWriteParams p{};
  p.dtype = dt;
  p.num_tokens = T;
  p.num_kv_heads = Hk;
  p.head_dim = D;
  p.key = dkey.p;
  p.value = dval.p;
  p.key_row_stride = p.value_row_stride = int64_t(Hk) * W;
  p.key_head_stride = p.value_head_stride = W;
  p.k_cache = dkc.p;
  p.v_cache = dvc.p;
  p.k_block_stride = p.v_block_stride = int64_t(bs) * Hk * W;
  p.k_row_stride = p.v_row_stride = int64_t(Hk) * W;
  p.k_head_stride = p.v_head_stride = W;
  p.block_size = bs;
  p.slot_mapping = dslots.p;
  fc::kv_write(p, num_slots, nullptr);
  ck(cudaDeviceSynchronize(), "kv_write");
  std::vector<uint16_t> wk = kc, wv = vc;
  for (int i = 0; i < T; ++i) {
    if (slots[i] < 0 || slots[i] >= num_slots) continue;
    for (int h = 0; h < Hk; ++h)
      for (int d = 0; d < D; ++d) {
        wk[(slots[i] * Hk + h) * W + d] = key[(static_cast<size_t>(i) * Hk + h) * W + d];
        wv[(slots[i] * Hk + h) * W + d] = val[(static_cast<size_t>(i) * Hk + h) * W + d];
      }
  }
  expect(dkc.get() == wk && dvc.get() == wv, "kv_write: cache contents differ (bs=" + std::to_string(bs) + ")");

  // Append into a paged cache through block tables with unique, shuffled (sometimes invalid) entries.
  const int B = rng.uni(1, 4), snew = rng.uni(1, 5), nb2 = 4 * B + 2;
  std::vector<uint16_t> kc2(static_cast<size_t>(nb2) * bs * Hk * W);
  for (auto& x : kc2) x = to_bits(static_cast<float>(rng.normal()), dt);
  std::vector<int32_t> lens(B), table(static_cast<size_t>(B) * 4), blocks(nb2);
  for (int i = 0; i < nb2; ++i) blocks[i] = i;
  std::shuffle(blocks.begin(), blocks.end(), rng.g);
  for (int b = 0; b < B; ++b) {
    lens[b] = rng.uni(-1, 3 * bs);  // -1: skipped; positions past the 4 blocks of a row: skipped
    for (int i = 0; i < 4; ++i) table[b * 4 + i] = rng.uni(0, 9) ? blocks[b * 4 + i]
                                                   : rng.uni(0, 1) ? nb2 + rng.uni(0, 1000) : -rng.uni(1, 1000);  // invalid ids
  }
  std::vector<uint16_t> knew(static_cast<size_t>(B) * snew * Hk * W);
  for (auto& x : knew) x = to_bits(static_cast<float>(rng.normal()), dt);
  Dev<uint16_t> dknew(knew), dkc2(kc2), dvc2(kc2);
  Dev<int32_t> dlens(lens), dtable(table);
  fc::KVAppendParams a{};
  a.dtype = dt;
  a.batch = B;
  a.seqlen_new = snew;
  a.num_kv_heads = Hk;
  a.head_dim = D;
  a.k_new = a.v_new = dknew.p;
  a.k_new_batch_stride = a.v_new_batch_stride = int64_t(snew) * Hk * W;
  a.k_new_row_stride = a.v_new_row_stride = int64_t(Hk) * W;
  a.k_new_head_stride = a.v_new_head_stride = W;
  a.k_cache = dkc2.p;
  a.v_cache = dvc2.p;
  a.k_batch_stride = a.v_batch_stride = int64_t(bs) * Hk * W;
  a.k_row_stride = a.v_row_stride = int64_t(Hk) * W;
  a.k_head_stride = a.v_head_stride = W;
  a.seqlens = dlens.p;
  a.block_table = dtable.p;
  a.block_table_stride = 4;
  a.block_size = bs;
  a.cache_entries = nb2;
  a.capacity = int64_t(4) * bs;
  fc::kv_append(a, nullptr);
  ck(cudaDeviceSynchronize(), "kv_append");
  std::vector<uint16_t> want = kc2;
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < snew; ++i) {
      const int64_t pos = int64_t(lens[b]) + i;
      if (lens[b] < 0 || pos >= a.capacity) continue;
      const int32_t blk = table[b * 4 + pos / bs];
      if (blk < 0 || blk >= nb2) continue;
      for (int h = 0; h < Hk; ++h)
        for (int d = 0; d < D; ++d)
          want[((blk * int64_t(bs) + pos % bs) * Hk + h) * W + d] = knew[((static_cast<size_t>(b) * snew + i) * Hk + h) * W + d];
    }
  expect(dkc2.get() == want && dvc2.get() == want, "kv_append (paged): cache contents differ");
}

Case random_case(Rng& rng, const std::vector<int>& dims, bool quick) {
  static const std::vector<int> edge = {1, 7, 17, 63, 65, 113, 257};
  Case c;
  c.dt = rng.uni(0, 1) ? DType::kFloat16 : DType::kBFloat16;
  c.D = rng.pick(dims);
  c.Hk = rng.pick(std::vector<int>{1, 2});
  c.H = c.Hk * rng.pick(std::vector<int>{1, 2, 4, 8});
  const int B = rng.uni(1, quick ? 2 : 4);
  c.varlen_q = rng.uni(0, 2) == 0;
  const int kvk = rng.uni(0, 2);
  c.kv = kvk == 0 ? KV::kDense : kvk == 1 ? KV::kVarlen : KV::kPaged;
  c.block_size = rng.pick(std::vector<int>{1, 3, 16, 256});
  const bool decode = rng.uni(0, 2) == 0;
  auto len = [&](bool q) {
    if (q && decode) return rng.uni(1, 4);
    const int r = rng.uni(0, 5);
    return r == 0 ? 0 : r <= 3 ? rng.pick(edge) : rng.uni(1, quick ? 300 : 1200);
  };
  const int dense_sq = len(true);
  for (int b = 0; b < B; ++b) {
    c.lq.push_back(c.varlen_q ? len(true) : dense_sq);
    c.lk.push_back(len(false));
  }
  if (c.kv == KV::kDense) {
    c.seqlens_k = rng.uni(0, 1);
    c.batch_idx = rng.uni(0, 2) == 0;
    if (!c.seqlens_k)  // a dense cache without seqlens_k uses all of its keys
      for (auto& n : c.lk) n = c.lk[0];
  }
  const int w = rng.uni(0, 5);
  if (w == 1) c.wr = 0;                                     // causal
  if (w == 2) c.wl = rng.uni(0, 80), c.wr = 0;              // causal sliding window
  if (w == 3) c.wl = rng.uni(0, 40), c.wr = rng.uni(0, 40);  // two-sided
  if (w == 4) c.wl = -1, c.wr = rng.uni(0, 5);
  if (rng.uni(0, 3) == 0) c.softcap = rng.pick(std::vector<float>{0.5f, 5.f, 30.f});
  c.alibi = rng.uni(0, 3) == 0 ? rng.uni(1, 2) : 0;
  c.num_splits = rng.pick(std::vector<int>{0, 0, 1, 3, 8});
  if (rng.uni(0, 4) == 0) c.pad = rng.uni(1, 9), c.off = rng.uni(1, 7);  // unaligned views
  if (c.varlen_q && rng.uni(0, 1)) c.max_q_hint = rng.uni(1, 300);       // possibly wrong hints
  if (rng.uni(0, 1)) c.max_k_hint = rng.uni(1, 3000);
  if (rng.uni(0, 5) == 0) c.poison = rng.uni(1, 3);
  if (c.varlen_q && rng.uni(0, 3) == 0) c.trailing = rng.uni(1, 5);
  return c;
}

std::vector<Case> fixed_cases(const std::vector<int>& dims) {
  std::vector<Case> cs;
  for (int D : dims)
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
      Case c;  // prefill, causal
      c.dt = dt, c.D = D, c.H = 4, c.Hk = 2, c.lq = {257}, c.lk = {257}, c.wr = 0;
      cs.push_back(c);
      Case d;  // decode GQA 32/8, paged bs 16, split-KV
      d.dt = dt, d.D = D, d.H = 32, d.Hk = 8, d.lq = {1, 1, 1}, d.lk = {1000, 17, 0}, d.kv = KV::kPaged, d.block_size = 16;
      cs.push_back(d);
      Case e = d;  // same, explicit splits
      e.num_splits = 4;
      cs.push_back(e);
      Case f;  // varlen with zero-length sequences, window, softcap, alibi
      f.dt = dt, f.D = D, f.H = 8, f.Hk = 2, f.varlen_q = true, f.kv = KV::kVarlen, f.lq = {9, 0, 130, 3},
      f.lk = {40, 3, 130, 0}, f.wl = 20, f.wr = 0, f.softcap = 5.f, f.alibi = 2;
      cs.push_back(f);
      Case g;  // unaligned everything, batch 1 long keys (auto split)
      g.dt = dt, g.D = D, g.H = 4, g.Hk = 1, g.lq = {2}, g.lk = {2500}, g.pad = 3, g.off = 1;
      cs.push_back(g);
      Case i = d;  // +inf keys in a split decode (NaN rows), trailing rows of a varlen prefill
      i.poison = 1;
      cs.push_back(i);
      Case j = f;
      j.poison = 2, j.trailing = 3;
      cs.push_back(j);
    }
  return cs;
}

// Edge cases (issue 21): paths the fixed cases above do not reach, one dtype per head dim.
std::vector<Case> edge_cases(const std::vector<int>& dims) {
  std::vector<Case> cs;
  for (size_t di = 0; di < dims.size(); ++di) {
    const int D = dims[di];
    const DType dt = di % 2 ? DType::kFloat16 : DType::kBFloat16;
    const int bm = D == 256 ? 64 : 128, bn = D == 256 ? 32 : 64;  // prefill rows x keys (attention_fwd_hdim*.cu)
    Case m;  // varlen without a max_seqlen_q hint: one block loops over several row blocks of sequence 0
    m.dt = dt, m.D = D, m.H = 4, m.Hk = 1, m.varlen_q = true, m.kv = KV::kVarlen, m.lq = {300, 1, 0},
    m.lk = {300, 1, 0}, m.wr = 0;
    cs.push_back(m);
    Case h = m;  // a hint too small: the decode shape (16-row blocks, warps split the keys) loops instead
    h.max_q_hint = 1, h.wr = -1;
    cs.push_back(h);
    Case t;  // every row and key count at a tile edge, in one varlen call (and a sequence with one key)
    t.dt = dt, t.D = D, t.H = 1, t.Hk = 1, t.varlen_q = true, t.kv = KV::kVarlen, t.lq = {bm - 1, bm, bm + 1, 1},
    t.lk = {bn - 1, bn, 2 * bn + 1, 1}, t.wr = 0;
    cs.push_back(t);
    Case n;  // row blocks with no key tile at all: causal with fewer keys than queries; split-KV over 2 tiles
    n.dt = dt, n.D = D, n.H = 2, n.Hk = 1, n.lq = {3 * bm + 5}, n.lk = {bn + 3}, n.wr = 0, n.num_splits = 8;
    cs.push_back(n);
    Case z;  // lengths 0 and 1 for queries and keys
    z.dt = dt, z.D = D, z.H = 2, z.Hk = 2, z.varlen_q = true, z.kv = KV::kVarlen, z.lq = {0, 1, 1, 0},
    z.lk = {1, 0, 1, 0};
    cs.push_back(z);
    Case p;  // an odd page size: pages never line up with key tiles
    p.dt = dt, p.D = D, p.H = 8, p.Hk = 2, p.lq = {3, 3}, p.lk = {2 * bn + 5, bn - 1}, p.kv = KV::kPaged,
    p.block_size = std::vector<int>{1, 3, 7, 33}[di % 4];
    cs.push_back(p);
  }
  return cs;
}

}  // namespace

// Windows at or past the sequence ends (issue 21). `exact`: the window excludes no key of any sequence and
// the host's length bounds (AttentionExtras sizes, k_capacity) turn it into -1, so the launch must be the
// unbounded call's, bit for bit (wl_unbounded, wr_unbounded); every run is also checked against the reference.
struct WindowCase {
  Case c;
  bool exact;
  int wl_unbounded = -1, wr_unbounded = -1;
};

std::vector<WindowCase> window_cases(const std::vector<int>& dims) {
  constexpr int kMax = std::numeric_limits<int>::max();
  std::vector<WindowCase> ws;
  for (size_t di = 0; di < dims.size(); ++di) {
    Case c;
    c.dt = di % 2 ? DType::kBFloat16 : DType::kFloat16;
    c.D = dims[di], c.H = 2, c.Hk = 1;
    Case a = c;  // causal with the largest left window (the CPU's 13-off gradients): fewer queries than keys
    a.lq = {37}, a.lk = {70}, a.wl = kMax, a.wr = 0;
    ws.push_back({a, true, -1, 0});
    Case b = c;  // the largest right window, more queries than keys
    b.lq = {70}, b.lk = {37}, b.wl = -1, b.wr = kMax;
    ws.push_back({b, true});
    Case e = c;  // exactly at the thresholds: left seqlen_k - 1, right seqlen_q - 1
    e.lq = {33}, e.lk = {65}, e.wl = 64, e.wr = 32;
    ws.push_back({e, true});
    Case f = e;  // one below: the first window that excludes a key (reference only)
    f.wl = 63, f.wr = 31;
    ws.push_back({f, false});
    Case v = c;  // varlen q and k, INT_MAX - 1 and INT_MAX (bounds: q_rows, kv_rows)
    v.varlen_q = true, v.kv = KV::kVarlen, v.lq = {37, 1, 0, 70}, v.lk = {70, 130, 5, 37}, v.wl = kMax - 1, v.wr = kMax;
    ws.push_back({v, true});
    Case w = v;  // past the ends of some sequences, not of the longest (reference only)
    w.wl = 69, w.wr = 36;
    ws.push_back({w, false});
    Case d = c;  // paged decode, split-KV: a right window 0 on one query is unbounded too
    d.H = 4, d.lq = {1, 1, 1}, d.lk = {300, 17, 0}, d.kv = KV::kPaged, d.block_size = 16, d.num_splits = 4;
    d.wl = kMax, d.wr = 0;
    ws.push_back({d, true});
    Case k = c;  // a dense cache with seqlens_k and kv_batch_idx (flash_attn_with_kvcache's layout)
    k.lq = {4, 4}, k.lk = {40, 17}, k.seqlens_k = true, k.batch_idx = true, k.wl = kMax, k.wr = kMax;
    ws.push_back({k, true});
  }
  return ws;
}

int main(int argc, char** argv) {
  int n_random = 300, max_fixed = 1 << 30;
  uint64_t seed = 1234;
  bool quick = false, edge_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--cases") && i + 1 < argc) n_random = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--max-fixed") && i + 1 < argc) max_fixed = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (!std::strcmp(argv[i], "--quick")) quick = true, n_random = std::min(n_random, 40);
    else if (!std::strcmp(argv[i], "--edge-only")) edge_only = true;
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "no CUDA device\n");
    return 2;
  }
  std::vector<int> dims;
  for (const char* s = fc::compiled_head_dims(); *s;) {
    dims.push_back(std::atoi(s));
    while (*s && *s != ',') ++s;
    if (*s == ',') ++s;
  }
  std::printf("head dims compiled: %s\n", fc::compiled_head_dims());
  std::vector<Case> cases = edge_only ? std::vector<Case>{} : fixed_cases(dims);
  if (static_cast<int>(cases.size()) > max_fixed) cases.resize(std::max(max_fixed, 0));
  for (const Case& c : edge_cases(dims)) cases.push_back(c);
  Rng rng(seed);
  for (int i = 0; i < n_random; ++i) cases.push_back(random_case(rng, dims, quick));

  int failed = 0;
  double worst_out = 0, worst_lse = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    Rng crng(seed * 7919 + i);
    try {
      run_attention_case(cases[i], crng, &worst_out, &worst_lse);
    } catch (const Failure& f) {
      ++failed;
      std::printf("FAIL case %zu: %s\n  %s\n", i, cases[i].str().c_str(), f.what.c_str());
    } catch (const std::exception& e) {
      ++failed;
      std::printf("ERROR case %zu: %s\n  %s\n", i, cases[i].str().c_str(), e.what());
    }
  }
  int window_failed = 0;
  const std::vector<WindowCase> wcases = window_cases(dims);
  for (size_t i = 0; i < wcases.size(); ++i) {
    const WindowCase& w = wcases[i];
    try {
      std::vector<uint16_t> out_w, out_u;
      std::vector<float> lse_w, lse_u;
      Rng r1(seed * 4099 + i);
      run_attention_case(w.c, r1, &worst_out, &worst_lse, &out_w, &lse_w);
      if (w.exact) {
        Case u = w.c;
        u.wl = w.wl_unbounded, u.wr = w.wr_unbounded;
        Rng r2(seed * 4099 + i);  // the same inputs
        run_attention_case(u, r2, &worst_out, &worst_lse, &out_u, &lse_u);
        expect(out_w == out_u && lse_w.size() == lse_u.size() &&
                   std::memcmp(lse_w.data(), lse_u.data(), lse_w.size() * sizeof(float)) == 0,
               "out/lse differ from the unbounded call's, window (" + std::to_string(u.wl) + "," +
                   std::to_string(u.wr) + ")");
      }
    } catch (const Failure& f) {
      ++window_failed;
      std::printf("FAIL window case %zu: %s\n  %s\n", i, w.c.str().c_str(), f.what.c_str());
    } catch (const std::exception& e) {
      ++window_failed;
      std::printf("ERROR window case %zu: %s\n  %s\n", i, w.c.str().c_str(), e.what());
    }
  }
  int cache_failed = 0;
  for (int i = 0; i < (quick ? 8 : 40); ++i) {
    Rng crng(seed * 31 + i);
    try {
      run_cache_case(crng, i % 2 ? DType::kFloat16 : DType::kBFloat16, i % 3 == 0 ? 3 : 0);
    } catch (const Failure& f) {
      ++cache_failed;
      std::printf("FAIL cache case %d: %s\n", i, f.what.c_str());
    }
  }
  // Unsupported configurations raise std::invalid_argument.
  int api_failed = 0;
  {
    AttentionParams p{};
    p.dtype = DType::kFloat32, p.batch = 1, p.num_heads = 1, p.num_kv_heads = 1, p.head_dim = 64, p.seqlen_q = 1;
    try {
      fc::attention_forward(p, nullptr, 0, nullptr);
      ++api_failed;
      std::printf("FAIL: float32 was not rejected\n");
    } catch (const std::invalid_argument& e) {
      std::printf("float32 rejected: %s\n", e.what());
    }
    p.dtype = DType::kBFloat16, p.head_dim = 80;
    try {
      fc::attention_forward(p, nullptr, 0, nullptr);
      ++api_failed;
      std::printf("FAIL: head_dim 80 was not rejected\n");
    } catch (const std::invalid_argument& e) {
      std::printf("head_dim 80 rejected: %s\n", e.what());
    }
  }
  std::printf("attention cases: %zu, failed %d (worst |out err| %.3g, |lse err| %.3g); window cases: %zu, failed %d; "
              "cache cases failed %d; api %d\n",
              cases.size(), failed, worst_out, worst_lse, wcases.size(), window_failed, cache_failed, api_failed);
  return failed || window_failed || cache_failed || api_failed ? 1 : 0;
}
