// A small persistent thread pool for the CPU kernels. Work is handed out by an
// atomic counter, so uneven tasks (causal tiles, ragged batches) balance themselves.
#pragma once
#include <cstdint>
#include <functional>

namespace fastinfer::cpu {

// Runs fn(task, worker) for task in [0, num_tasks) on up to num_threads() workers
// (worker < num_threads()). Blocks until all tasks finish. Serialised across callers.
void parallel_for(int64_t num_tasks, const std::function<void(int64_t task, int worker)>& fn);

// Upper bound of set_num_threads (and of FASTINFER_NUM_THREADS): more would only exhaust the process.
constexpr int kMaxThreads = 1024;

int num_threads();
// n <= 0 restores the default (FASTINFER_NUM_THREADS, else the CPUs this process may use).
void set_num_threads(int n);

}  // namespace fastinfer::cpu
