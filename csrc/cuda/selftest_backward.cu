// Self-test of the CUDA attention backward (attention_bwd.h) against a float64 reference written
// here from the flash-attention formulas. Runs on a GPU, or on the CPU emulator under ASan/UBSan
// (csrc/cuda/emu/run_emulated_backward.sh). Outputs are NaN-poisoned; padded, offset views check
// that nothing outside them is written and exercise the unaligned load path.
//
//   fastinfer_cuda_selftest_backward [--cases N] [--seed S]        exit 0 = all passed
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

#include "cuda/attention_bwd.h"

using fastinfer::AttentionBackwardParams;
using fastinfer::AttentionParams;
using fastinfer::DType;
namespace fc = fastinfer::cuda;

namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error in %s: %s\n", what, cudaGetErrorString(e));
    std::exit(3);
  }
}
uint16_t to_bits(double x, DType t) {
  uint16_t u;
  if (t == DType::kFloat16) {
    __half h = __float2half_rn(static_cast<float>(x));
    std::memcpy(&u, &h, 2);
  } else {
    __nv_bfloat16 h = __float2bfloat16_rn(static_cast<float>(x));
    std::memcpy(&u, &h, 2);
  }
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

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    ck(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    if (n) ck(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
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
  int uni(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
  template <class C>
  auto pick(const C& c) { return c[uni(0, static_cast<int>(c.size()) - 1)]; }
};

struct Case {
  DType dt = DType::kBFloat16;
  int D = 64, H = 2, Hk = 1;
  std::vector<int> lq, lk;
  bool varlen = false;
  int wl = -1, wr = -1;
  float softcap = 0.f;
  bool alibi = false;
  int pad = 0, off = 0;  // extra elements per row, and a view offset (off % 8 != 0: unaligned views)
  std::string str() const {
    std::string a, b;
    for (size_t i = 0; i < lq.size(); ++i) a += (i ? "," : "") + std::to_string(lq[i]);
    for (size_t i = 0; i < lk.size(); ++i) b += (i ? "," : "") + std::to_string(lk[i]);
    char buf[384];
    std::snprintf(buf, sizeof buf, "%s D=%d H=%d Hk=%d lq=[%s] lk=[%s] %s win=(%d,%d) softcap=%g alibi=%d pad=%d off=%d",
                  dt == DType::kFloat16 ? "fp16" : "bf16", D, H, Hk, a.c_str(), b.c_str(), varlen ? "varlen" : "dense",
                  wl, wr, softcap, int(alibi), pad, off);
    return buf;
  }
};

// A (rows, heads, D) tensor with row stride heads*D + pad, starting `off` elements into its buffer.
struct Layout {
  int64_t rows, heads, D, pad, off;
  int64_t row_stride() const { return heads * D + pad; }
  int64_t size() const { return off + rows * row_stride() + 8; }
  int64_t at(int64_t r, int64_t h, int64_t d) const { return off + r * row_stride() + h * D + d; }
};

// Returns the worst error relative to the largest reference gradient (at least 1e-2). The raw dq, dk and dv
// buffers (as downloaded, poison included) are appended to `grads` when given.
double run_case(const Case& c, Rng& rng, std::vector<uint16_t>* grads = nullptr) {
  const int B = static_cast<int>(c.lq.size()), D = c.D, H = c.H, Hk = c.Hk, group = H / Hk;
  std::vector<int> cq(B + 1, 0), ckk(B + 1, 0);
  for (int b = 0; b < B; ++b) cq[b + 1] = cq[b] + c.lq[b], ckk[b + 1] = ckk[b] + c.lk[b];
  const int Sq = c.lq[0], Sk = c.lk[0];  // dense: all equal
  const int64_t tq = c.varlen ? cq[B] + 2 : int64_t(B) * Sq, tk = c.varlen ? ckk[B] + 3 : int64_t(B) * Sk;  // varlen: trailing rows
  auto qrow = [&](int b, int t) { return c.varlen ? int64_t(cq[b]) + t : int64_t(b) * Sq + t; };
  auto krow = [&](int b, int j) { return c.varlen ? int64_t(ckk[b]) + j : int64_t(b) * Sk + j; };
  const Layout LQ{tq, H, D, c.pad, c.off}, LK{tk, Hk, D, c.pad, c.off};
  auto rnd = [&](const Layout& L, double scale) {
    std::vector<uint16_t> v(L.size(), to_bits(NAN, c.dt));
    for (int64_t r = 0; r < L.rows; ++r)
      for (int64_t h = 0; h < L.heads; ++h)
        for (int64_t d = 0; d < D; ++d) v[L.at(r, h, d)] = to_bits(rng.normal() * scale, c.dt);
    return v;
  };
  std::vector<uint16_t> q = rnd(LQ, 1.5), k = rnd(LK, 1.5), v = rnd(LK, 1.0), g = rnd(LQ, 1.0);
  auto val = [&](const std::vector<uint16_t>& x, const Layout& L, int64_t r, int64_t h, int64_t d) {
    return from_bits(x[L.at(r, h, d)], c.dt);
  };
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<float> slopes(H);
  for (int h = 0; h < H; ++h) slopes[h] = c.alibi ? static_cast<float>(std::pow(2.0, -8.0 * (h + 1) / H)) : 0.f;

  // Reference forward (out, lse) and backward, float64, from the rounded inputs.
  std::vector<double> dq(tq * H * D, 0.0), dk(tk * Hk * D, 0.0), dv(tk * Hk * D, 0.0);
  std::vector<uint16_t> out(LQ.size(), to_bits(0.0, c.dt));
  std::vector<float> lse(static_cast<size_t>(H) * tq, 0.f);  // dense (B, H, Sq) or varlen (H, total_q); both = [h][row] per b
  for (int b = 0; b < B; ++b) {
    const int sq = c.lq[b], sk = c.lk[b];
    for (int t = 0; t < sq; ++t)
      for (int h = 0; h < H; ++h) {
        const int hk = h / group, ipos = t + sk - sq;
        std::vector<double> s(sk), dcap(sk, 1.0);
        std::vector<bool> vis(sk);
        double mx = -INFINITY;
        for (int j = 0; j < sk; ++j) {
          vis[j] = (c.wl < 0 || j >= int64_t(ipos) - c.wl) && (c.wr < 0 || j <= int64_t(ipos) + c.wr);  // windows up to INT_MAX
          double x = 0;
          for (int d = 0; d < D; ++d) x += val(q, LQ, qrow(b, t), h, d) * val(k, LK, krow(b, j), hk, d);
          x *= scale;
          if (c.softcap > 0) {
            const double th = std::tanh(x / c.softcap);
            x = c.softcap * th;
            dcap[j] = 1 - th * th;
          }
          x -= slopes[h] * std::abs(ipos - j);
          s[j] = x;
          if (vis[j]) mx = std::max(mx, x);
        }
        double sum = 0;
        for (int j = 0; j < sk; ++j) sum += vis[j] ? std::exp(s[j] - mx) : 0.0;
        const double l = sum > 0 ? mx + std::log(sum) : INFINITY;
        const int64_t lrow = c.varlen ? qrow(b, t) : t;
        lse[c.varlen ? h * tq + lrow : (int64_t(b) * H + h) * Sq + t] = static_cast<float>(l);
        std::vector<double> o(D, 0.0), p(sk, 0.0);
        for (int j = 0; j < sk; ++j) p[j] = vis[j] && sum > 0 ? std::exp(s[j] - l) : 0.0;
        for (int j = 0; j < sk; ++j)
          for (int d = 0; d < D; ++d) o[d] += p[j] * val(v, LK, krow(b, j), hk, d);
        // delta from the output as stored (rounded), the one the kernel is given: with few visible keys
        // dp - delta cancels, and delta from the unrounded output would charge out's rounding to the kernel.
        double delta = 0;
        for (int d = 0; d < D; ++d) {
          out[LQ.at(qrow(b, t), h, d)] = to_bits(o[d], c.dt);
          delta += val(out, LQ, qrow(b, t), h, d) * val(g, LQ, qrow(b, t), h, d);
        }
        for (int j = 0; j < sk; ++j) {
          if (p[j] == 0) continue;
          double dp = 0;
          for (int d = 0; d < D; ++d) dp += val(g, LQ, qrow(b, t), h, d) * val(v, LK, krow(b, j), hk, d);
          const double ds = p[j] * (dp - delta) * dcap[j] * scale;
          for (int d = 0; d < D; ++d) {
            dv[(krow(b, j) * Hk + hk) * D + d] += p[j] * val(g, LQ, qrow(b, t), h, d);
            dk[(krow(b, j) * Hk + hk) * D + d] += ds * val(q, LQ, qrow(b, t), h, d);
            dq[(qrow(b, t) * H + h) * D + d] += ds * val(k, LK, krow(b, j), hk, d);
          }
        }
      }
  }

  Dev<uint16_t> q_d(q), k_d(k), v_d(v), g_d(g), o_d(out);
  Dev<float> lse_d(lse), slope_d(slopes);
  const uint16_t poison = to_bits(NAN, c.dt);
  Dev<uint16_t> dq_d(std::vector<uint16_t>(LQ.size(), poison)), dk_d(std::vector<uint16_t>(LK.size(), poison)),
      dv_d(std::vector<uint16_t>(LK.size(), poison));
  Dev<int32_t> cq_d(cq), ck_d(ckk);

  AttentionBackwardParams bp{};
  AttentionParams& p = bp.fwd;
  p.dtype = c.dt;
  p.batch = B;
  p.num_heads = H;
  p.num_kv_heads = Hk;
  p.head_dim = D;
  const int64_t qrs = LQ.row_stride(), krs = LK.row_stride();
  p.q = q_d.p + c.off;
  p.q_row_stride = qrs;
  p.q_head_stride = D;
  p.k = k_d.p + c.off;
  p.v = v_d.p + c.off;
  p.k_row_stride = p.v_row_stride = krs;
  p.k_head_stride = p.v_head_stride = D;
  p.out = o_d.p + c.off;
  p.o_row_stride = qrs;
  p.o_head_stride = D;
  p.lse = lse_d.p;
  if (c.varlen) {
    p.cu_seqlens_q = cq_d.p;
    p.cu_seqlens_k = ck_d.p;
    p.lse_head_stride = tq;
    p.lse_row_stride = 1;
  } else {
    p.seqlen_q = Sq;
    p.seqlen_k = Sk;
    p.q_batch_stride = p.o_batch_stride = Sq * qrs;
    p.k_batch_stride = p.v_batch_stride = Sk * krs;
    p.lse_batch_stride = int64_t(H) * Sq;
    p.lse_head_stride = Sq;
    p.lse_row_stride = 1;
  }
  if (c.alibi) p.alibi_slopes = slope_d.p;
  p.softmax_scale = static_cast<float>(scale);
  p.softcap = c.softcap;
  p.window_left = c.wl;
  p.window_right = c.wr;
  p.num_splits = 1;
  bp.dout = g_d.p + c.off;
  bp.do_batch_stride = p.q_batch_stride;
  bp.do_row_stride = qrs;
  bp.do_head_stride = D;
  bp.dq = dq_d.p + c.off;
  bp.dq_batch_stride = p.q_batch_stride;
  bp.dq_row_stride = qrs;
  bp.dq_head_stride = D;
  bp.dk = dk_d.p + c.off;
  bp.dv = dv_d.p + c.off;
  bp.dk_batch_stride = bp.dv_batch_stride = p.k_batch_stride;
  bp.dk_row_stride = bp.dv_row_stride = krs;
  bp.dk_head_stride = bp.dv_head_stride = D;
  bp.total_q = c.varlen ? tq : 0;
  bp.total_k = c.varlen ? tk : 0;
  bp.deterministic = true;
  fc::AttentionExtras x;
  x.q_rows = c.varlen ? tq : 0;
  x.kv_rows = c.varlen ? tk : B;
  const size_t ws_bytes = fc::attention_backward_workspace_bytes(bp, x);
  void* ws = nullptr;
  ck(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 1)), "workspace");
  fc::attention_backward(bp, x, ws, ws_bytes, nullptr);
  ck(cudaDeviceSynchronize(), "backward");
  cudaFree(ws);

  double worst = 0;
  auto compare = [&](const char* name, const Dev<uint16_t>& got_d, const Layout& L, const std::vector<double>& ref) {
    const std::vector<uint16_t> got = got_d.get();
    if (grads) grads->insert(grads->end(), got.begin(), got.end());
    double mx = 1e-2;  // floor: a gradient that cancels to ~0 (one key: dS = 0) is judged on an absolute scale
    for (double r : ref) mx = std::max(mx, std::abs(r));
    std::vector<bool> inside(got.size(), false);
    for (int64_t r = 0; r < L.rows; ++r)
      for (int64_t h = 0; h < L.heads; ++h)
        for (int64_t d = 0; d < D; ++d) {
          inside[L.at(r, h, d)] = true;
          const double y = from_bits(got[L.at(r, h, d)], c.dt), want = ref[(r * L.heads + h) * D + d];
          if (!std::isfinite(y)) throw std::runtime_error(std::string(name) + ": non-finite value (unwritten?) at row " + std::to_string(r));
          worst = std::max(worst, std::abs(y - want) / mx);
        }
    for (size_t i = 0; i < got.size(); ++i)
      if (!inside[i] && got[i] != poison) throw std::runtime_error(std::string(name) + ": wrote outside its view");
  };
  compare("dq", dq_d, LQ, dq);
  compare("dk", dk_d, LK, dk);
  compare("dv", dv_d, LK, dv);
  return worst;
}

std::vector<int> dims() {
  std::vector<int> d;
#if defined(FASTINFER_CUDA_HDIM_64)
  d.push_back(64);
#endif
#if defined(FASTINFER_CUDA_HDIM_96)
  d.push_back(96);
#endif
#if defined(FASTINFER_CUDA_HDIM_128)
  d.push_back(128);
#endif
#if defined(FASTINFER_CUDA_HDIM_256)
  d.push_back(256);
#endif
  return d;
}

}  // namespace

int main(int argc, char** argv) {
  int cases = 20;
  uint64_t seed = 1;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--cases") && i + 1 < argc) cases = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
  }
  Rng rng(seed);
  const std::vector<int> ds = dims();
  int failed = 0;
  // Fixed cases first: every head dim and dtype, plain and causal; then random ones.
  std::vector<Case> all;
  for (int D : ds)
    for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
      Case c;
      c.dt = dt;
      c.D = D;
      c.H = 4;
      c.Hk = 2;
      c.lq = {37};
      c.lk = {70};
      c.wr = dt == DType::kBFloat16 ? 0 : -1;
      all.push_back(c);
    }
  // Edge cases (issue 21), one dtype per head dim: rows and keys at tile edges (dK/dV: 64 keys per block,
  // dQ: 64 or 32 rows and keys per tile, attention_bwd.cu), lengths 0 and 1, key blocks that no query sees.
  for (size_t di = 0; di < ds.size(); ++di) {
    const int D = ds[di], tile = D == 256 ? 32 : 64;
    Case e;
    e.dt = di % 2 ? DType::kFloat16 : DType::kBFloat16;
    e.D = D;
    e.H = 2;
    e.Hk = 1;
    e.varlen = true;
    e.lq = {tile / 2 - 1, tile / 2, tile / 2 + 1, 1, 0, 1};  // x2 packed rows: tile - 2, tile, tile + 2
    e.lk = {tile - 1, 64, 2 * tile + 1, 1, 1, 0};
    e.wr = 0;
    all.push_back(e);
    Case f = e;  // sliding window, more keys than queries: the first key blocks see no query
    f.varlen = false;
    f.lq = {10, 10};
    f.lk = {200, 200};
    f.wl = 5;
    all.push_back(f);
  }
  for (int i = 0; i < cases; ++i) {
    Case c;
    c.dt = rng.uni(0, 1) ? DType::kFloat16 : DType::kBFloat16;
    c.D = rng.pick(ds);
    c.Hk = rng.pick(std::vector<int>{1, 2});
    c.H = c.Hk * rng.pick(std::vector<int>{1, 2, 3});
    c.varlen = rng.uni(0, 1);
    const int B = rng.uni(1, 3);
    const std::vector<int> lens = {0, 1, 5, 16, 17, 33, 64, 65, 90};
    if (c.varlen) {
      for (int b = 0; b < B; ++b) c.lq.push_back(rng.pick(lens)), c.lk.push_back(rng.pick(lens));
    } else {
      const int sq = std::max(1, rng.pick(lens)), sk = std::max(1, rng.pick(lens));
      c.lq.assign(B, sq);
      c.lk.assign(B, sk);
    }
    switch (rng.uni(0, 3)) {
      case 0: break;
      case 1: c.wr = 0; break;                                  // causal
      case 2: c.wl = rng.uni(0, 20), c.wr = rng.uni(0, 8); break;  // sliding window
      default: c.wl = rng.uni(0, 30), c.wr = 0; break;
    }
    if (rng.uni(0, 3) == 0) c.softcap = 5.f;
    c.alibi = rng.uni(0, 3) == 0;
    c.pad = rng.pick(std::vector<int>{0, 8, 3});
    c.off = c.pad == 3 ? 1 : 0;
    all.push_back(c);
  }
  double worst_all = 0;
  for (const Case& c : all) {
    try {
      const double w = run_case(c, rng);
      const double tol = c.dt == DType::kFloat16 ? 4e-3 : 1.6e-2;  // relative to the largest reference gradient
      worst_all = std::max(worst_all, w);
      if (w > tol) {
        std::printf("FAIL %s: error %.3g > %.3g\n", c.str().c_str(), w, tol);
        ++failed;
      } else {
        std::printf("ok   %s: error %.3g\n", c.str().c_str(), w);
      }
    } catch (const std::exception& e) {
      std::printf("FAIL %s: %s\n", c.str().c_str(), e.what());
      ++failed;
    }
  }
  // Windows at or past the sequence ends (issue 21), one dtype per head dim. `exact`: the window excludes no
  // key of any sequence and the host's length bounds (seqlen_q/k, q_rows, kv_rows) turn it into -1, so dq, dk
  // and dv must equal the unbounded call's bit for bit (same inputs); every run is checked against the reference.
  struct WindowCase {
    Case c;
    bool exact;
    int wl_unbounded = -1, wr_unbounded = -1;
  };
  constexpr int kMax = std::numeric_limits<int>::max();
  std::vector<WindowCase> wcases;
  for (size_t di = 0; di < ds.size(); ++di) {
    Case c;
    c.dt = di % 2 ? DType::kBFloat16 : DType::kFloat16;
    c.D = ds[di];
    Case a = c;  // (INT_MAX, 0): UBSan's "2147483647 + 63" in the dK/dV kernel before the fix
    a.lq = {37}, a.lk = {70}, a.wl = kMax, a.wr = 0;
    wcases.push_back({a, true, -1, 0});
    Case b = c;  // the largest right window, more queries than keys
    b.lq = {70}, b.lk = {37}, b.wr = kMax;
    wcases.push_back({b, true});
    Case e = c;  // exactly at the thresholds: left seqlen_k - 1, right seqlen_q - 1
    e.lq = {33}, e.lk = {65}, e.wl = 64, e.wr = 32;
    wcases.push_back({e, true});
    Case v = c;  // varlen, INT_MAX - 1 and INT_MAX (bounds: q_rows, kv_rows, trailing rows included)
    v.varlen = true, v.lq = {37, 1, 0, 70}, v.lk = {70, 130, 5, 37}, v.wl = kMax - 1, v.wr = kMax;
    wcases.push_back({v, true});
    Case w = v;  // past the ends of some sequences, not of the longest (reference only)
    w.wl = 69, w.wr = 36;
    wcases.push_back({w, false});
  }
  int window_failed = 0;
  for (const WindowCase& w : wcases) {
    try {
      std::vector<uint16_t> got_w, got_u;
      const Rng start = rng;
      Rng r1 = start, r2 = start;  // the same inputs for both windows
      double err = run_case(w.c, r1, &got_w);
      if (w.exact) {
        Case u = w.c;
        u.wl = w.wl_unbounded, u.wr = w.wr_unbounded;
        err = std::max(err, run_case(u, r2, &got_u));
        if (got_w != got_u) throw std::runtime_error("dq/dk/dv differ from the unbounded call's");
      }
      rng = r1;
      const double tol = w.c.dt == DType::kFloat16 ? 4e-3 : 1.6e-2;
      worst_all = std::max(worst_all, err);
      if (err > tol) throw std::runtime_error("error " + std::to_string(err) + " > " + std::to_string(tol));
      std::printf("ok   window %s%s: error %.3g\n", w.c.str().c_str(), w.exact ? ", bit-identical to unbounded" : "", err);
    } catch (const std::exception& e) {
      std::printf("FAIL window %s: %s\n", w.c.str().c_str(), e.what());
      ++window_failed;
    }
  }
  std::printf("%zu cases, %d failed, worst relative error %.3g; window cases: %zu, failed %d\n", all.size(), failed,
              worst_all, wcases.size(), window_failed);
  return failed || window_failed ? 1 : 0;
}
