#!/usr/bin/env bash
# The CUDA attention backward on the CPU emulator (see run_emulated_selftest.sh): compiles
# attention_bwd.cu and selftest_backward.cu unchanged as host C++ with ASan + UBSan and runs the
# self-test against its float64 reference. Arguments go to the self-test (--cases N --seed S).
# Env: EMU_HEADDIMS="64 96 128 256", EMU_SANITIZE=address,undefined (empty: none), EMU_BUILD=/tmp/fastinfer-cuda-emu-bwd.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
BUILD=${EMU_BUILD:-/tmp/fastinfer-cuda-emu-bwd}
DIMS=${EMU_HEADDIMS:-64 96 128 256}
SAN=${EMU_SANITIZE-address,undefined}
CXX=${CXX:-g++}
mkdir -p "$BUILD"
FLAGS=(-std=c++20 -O1 -g -fno-omit-frame-pointer -DFASTINFER_CUDA_EMULATE -Wall -Wno-unknown-pragmas -Wno-unused-function
       -I "$ROOT/csrc/cuda/emu/include" -I "$ROOT/csrc/include" -I "$ROOT/csrc")
[ -n "$SAN" ] && FLAGS+=(-fsanitize="$SAN" -fno-sanitize-recover=all)
SRCS=(attention_bwd.cu selftest_backward.cu attention_cuda.cu)  # attention_cuda.cu: compiled_head_dims() and the forward it links
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
$CXX "${FLAGS[@]}" "${objs[@]}" "$BUILD/emu.o" -o "$BUILD/selftest_backward_emulated"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=0:detect_leaks=0} "$BUILD/selftest_backward_emulated" "$@"
