#!/usr/bin/env bash
# The CUDA attention backward on the CPU emulator (see run_emulated_selftest.sh): compiles
# attention_bwd.cu and selftest_backward.cu as host C++ (emu_build.sh) and runs the self-test against
# its float64 reference. Arguments go to the self-test (--cases N --seed S).
# Env: EMU_MODE=asan (default) | race | plain, EMU_HEADDIMS="64 96 128 256", EMU_SANITIZE=address,undefined,
# EMU_BUILD=/tmp/fastinfer-cuda-emu-bwd[-MODE]; FI_EMU_SCHED, FI_EMU_CPASYNC, FI_EMU_ARCH as there.
set -euo pipefail
EMU=$(cd "$(dirname "$0")" && pwd)
MODE=${EMU_MODE:-asan}
BUILD=${EMU_BUILD:-/tmp/fastinfer-cuda-emu-bwd$([ "$MODE" = asan ] || echo "-$MODE")}
"$EMU/emu_build.sh" backward "$MODE" "$BUILD"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=0:detect_leaks=0} "$BUILD/selftest_backward_emulated" "$@"
