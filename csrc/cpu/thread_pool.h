// A small persistent thread pool for the CPU kernels. Work is handed out by an
// atomic counter, so uneven tasks (causal tiles, ragged batches) balance themselves.
#pragma once
#include <cstdint>
#include <functional>

#include "fastinfer/cpu.h"  // kMaxThreads, num_threads, set_num_threads

namespace fastinfer::cpu {

// Runs fn(task, worker) for task in [0, num_tasks) on up to num_threads() workers
// (worker < num_threads()). Blocks until all tasks finish. Serialised across callers.
void parallel_for(int64_t num_tasks, const std::function<void(int64_t task, int worker)>& fn);

}  // namespace fastinfer::cpu
