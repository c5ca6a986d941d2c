#!/usr/bin/env bash
# Checks the CUDA kernels on a machine without a GPU: compiles csrc/cuda/*.cu as host C++ against the
# CPU emulator in this folder (FASTINFER_CUDA_EMULATE; see emu_build.sh) and runs the C++ self-test
# (selftest.cu) on it. Arguments go to the self-test, e.g.
#   csrc/cuda/emu/run_emulated_selftest.sh --quick
#   csrc/cuda/emu/run_emulated_selftest.sh --cases 100 --seed 7
#   EMU_MODE=race csrc/cuda/emu/run_emulated_selftest.sh --cases 0     # the fixed cases under the race checker
#   FI_EMU_SCHED=warp FI_EMU_CPASYNC=issue csrc/cuda/emu/run_emulated_selftest.sh --cases 0
# Env: EMU_MODE=asan (AddressSanitizer + UBSan; default) | race | plain, EMU_HEADDIMS="64 96 128 256",
# EMU_SANITIZE=address,undefined, EMU_BUILD=/tmp/fastinfer-cuda-emu[-MODE]; the emulator reads
# FI_EMU_SCHED, FI_EMU_CPASYNC and FI_EMU_ARCH (emu.cpp).
# Slow (every CUDA thread is a fiber), so keep shapes small; exact numerics of ex2.approx, tanh and the
# tensor cores' accumulation order are not reproduced, only what the kernels compute with them.
set -euo pipefail
EMU=$(cd "$(dirname "$0")" && pwd)
MODE=${EMU_MODE:-asan}
BUILD=${EMU_BUILD:-/tmp/fastinfer-cuda-emu$([ "$MODE" = asan ] || echo "-$MODE")}
"$EMU/emu_build.sh" forward "$MODE" "$BUILD"
# Fibers switch stacks: tell ASan not to treat the switch as a stack overflow.
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=0:detect_leaks=0} "$BUILD/selftest_emulated" "$@"
