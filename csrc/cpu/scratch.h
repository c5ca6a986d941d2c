// Per-thread scratch memory of the CPU drivers: 64-byte aligned and only grown, so a call
// does not pay page faults on fresh memory every time (measured: a fresh 35 MB staging buffer
// cost about 20% of a prefill). Pool workers are persistent, so each is allocated once per size.
#pragma once
#include <cstdint>
#include <memory>
#include <new>

namespace fastinfer::cpu {

struct AlignedDelete {
  void operator()(char* p) const { ::operator delete[](p, std::align_val_t(64)); }
};

// One buffer per Tag and OS thread (declare each Tag in an anonymous namespace).
template <class Tag>
char* thread_scratch(int64_t bytes) {
  struct Buffer {
    std::unique_ptr<char[], AlignedDelete> data;
    int64_t size = 0;
  };
  thread_local Buffer buf;
  if (buf.size < bytes) {
    buf.data.reset(static_cast<char*>(::operator new[](bytes, std::align_val_t(64))));
    buf.size = bytes;
  }
  return buf.data.get();
}

}  // namespace fastinfer::cpu
