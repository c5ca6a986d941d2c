#include "cpu/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <algorithm>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fastinfer::cpu {

namespace {

int default_threads() {
  if (const char* env = std::getenv("FASTINFER_NUM_THREADS")) {
    const long n = std::strtol(env, nullptr, 10);
    if (n > 0) return static_cast<int>(std::min<long>(n, kMaxThreads));
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

class Pool {
 public:
  ~Pool() { stop(); }

  int size() {
    std::lock_guard<std::mutex> lock(call_mutex_);
    return size_locked();
  }

  void resize(int n) {
    std::lock_guard<std::mutex> lock(call_mutex_);
    stop();
    requested_ = n;
  }

  void run(int64_t num_tasks, const std::function<void(int64_t, int)>& fn) {
    std::lock_guard<std::mutex> lock(call_mutex_);
    const int n = size_locked();
    if (n == 1 || num_tasks == 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t, 0);
      return;
    }
    start(n);
    {
      std::lock_guard<std::mutex> g(m_);
      fn_ = &fn;
      num_tasks_ = num_tasks;
      next_.store(0);
      pending_.store(static_cast<int>(workers_.size()));
      error_ = nullptr;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();  // no system call when every worker is still spinning
    work(0);  // the calling thread is worker 0
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> g(m_);
      done_cv_.wait(g, [&] { return pending_.load() == 0; });
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  int size_locked() {
    if (requested_ <= 0) requested_ = default_threads();
    return requested_;
  }

  void start(int n) {
    if (static_cast<int>(workers_.size()) == n - 1) return;
    stop();
    quit_ = false;
    quit_flag_.store(false);
    // A new worker waits for the next region, not the last one.
    const uint64_t current = generation_.load();
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i, current] { loop(i, current); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> g(m_);
      quit_ = true;
      quit_flag_.store(true);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  void work(int worker) {
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= num_tasks_) return;
      try {
        (*fn_)(t, worker);
      } catch (...) {
        std::lock_guard<std::mutex> g(m_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void loop(int worker, uint64_t seen) {
    for (;;) {
      // Model steps call the pool every few tens of microseconds: a worker that spins briefly
      // before sleeping starts at once, where a condition-variable wake-up costs ~40 us.
      if (!spin_until([&] { return quit_flag_.load(std::memory_order_relaxed) ||
                                   generation_.load(std::memory_order_acquire) != seen; })) {
        std::unique_lock<std::mutex> g(m_);
        cv_.wait(g, [&] { return quit_ || generation_.load() != seen; });
      }
      {
        std::lock_guard<std::mutex> g(m_);
        if (quit_) return;
        seen = generation_.load();
      }
      work(worker);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> g(m_);
        done_cv_.notify_one();
      }
    }
  }

  // Spins up to spin_ns() for ready(); false if it never became true.
  template <class Ready>
  static bool spin_until(Ready ready) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns());
    for (int i = 0;; ++i) {
      if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return false;
    }
  }

  static int64_t spin_ns() {
    static const int64_t ns = [] {
      const char* env = std::getenv("FASTINFER_SPIN_US");
      return env ? std::max<int64_t>(0, std::atoll(env)) * 1000 : int64_t(100) * 1000;
    }();
    return ns;
  }

  std::mutex call_mutex_;  // one parallel region at a time
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t num_tasks_ = 0;
  std::atomic<int> pending_{0};           // workers (not counting the caller) still in this region
  std::atomic<uint64_t> generation_{0};   // bumped per region; written under m_
  bool quit_ = false;
  std::atomic<bool> quit_flag_{false};    // quit_, readable while spinning
  int requested_ = 0;
  std::exception_ptr error_;
};

// Leaked on purpose: joining threads during interpreter exit can deadlock.
Pool* g_pool = nullptr;
std::once_flag g_pool_once;

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();
    // A forked child has none of the parent's threads: give it a fresh pool.
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); });
  });
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t num_tasks, const std::function<void(int64_t, int)>& fn) {
  if (num_tasks <= 0) return;
  pool().run(num_tasks, fn);
}

int num_threads() { return pool().size(); }

void set_num_threads(int n) { pool().resize(n); }

}  // namespace fastinfer::cpu
