#!/usr/bin/env bash
# Checks the CUDA kernels on a machine without a GPU: compiles csrc/cuda/*.cu unchanged as host C++
# against the CPU emulator in this folder (FASTINFER_CUDA_EMULATE), with AddressSanitizer and UBSan,
# and runs the C++ self-test (selftest.cu) on it. Arguments go to the self-test, e.g.
#   csrc/cuda/emu/run_emulated_selftest.sh --quick
#   csrc/cuda/emu/run_emulated_selftest.sh --cases 100 --seed 7
# Env: EMU_HEADDIMS="64 96 128 256", EMU_SANITIZE=address,undefined (empty: none), EMU_BUILD=/tmp/fastinfer-cuda-emu.
# Slow (every CUDA thread is a fiber), so keep shapes small; exact numerics of ex2.approx, tanh and the
# tensor cores' accumulation order are not reproduced, only what the kernels compute with them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
BUILD=${EMU_BUILD:-/tmp/fastinfer-cuda-emu}
DIMS=${EMU_HEADDIMS:-64 96 128 256}
SAN=${EMU_SANITIZE-address,undefined}
CXX=${CXX:-g++}
mkdir -p "$BUILD"
FLAGS=(-std=c++20 -O1 -g -fno-omit-frame-pointer -DFASTINFER_CUDA_EMULATE -Wall -Wno-unknown-pragmas -Wno-unused-function
       -I "$ROOT/csrc/cuda/emu/include" -I "$ROOT/csrc/include" -I "$ROOT/csrc")
[ -n "$SAN" ] && FLAGS+=(-fsanitize="$SAN" -fno-sanitize-recover=all)
SRCS=(attention_cuda.cu kv_cache_cuda.cu selftest.cu)
for d in $DIMS; do
  FLAGS+=(-DFASTINFER_CUDA_HDIM_$d=1)
  SRCS+=(attention_fwd_hdim$d.cu)
done
pids=()
for f in "${SRCS[@]}"; do
  $CXX "${FLAGS[@]}" -x c++ -c "$ROOT/csrc/cuda/$f" -o "$BUILD/${f%.cu}.o" &
  pids+=($!)
done
$CXX "${FLAGS[@]}" -c "$ROOT/csrc/cuda/emu/emu.cpp" -o "$BUILD/emu.o"
for p in "${pids[@]}"; do wait "$p"; done
objs=()
for f in "${SRCS[@]}"; do objs+=("$BUILD/${f%.cu}.o"); done
$CXX "${FLAGS[@]}" "${objs[@]}" "$BUILD/emu.o" -o "$BUILD/selftest_emulated"
# Fibers switch stacks: tell ASan not to treat the switch as a stack overflow.
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=0:detect_leaks=0} "$BUILD/selftest_emulated" "$@"
