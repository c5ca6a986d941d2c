#!/usr/bin/env bash
# Builds an emulated self-test: the CUDA sources as host C++ against the CPU emulator in this folder.
#
#   csrc/cuda/emu/emu_build.sh forward|backward|checks asan|race|plain BUILD_DIR
#     -> BUILD_DIR/selftest_emulated | selftest_backward_emulated | emu_checks (checks/emu_checks.cu: the
#        emulator's own planted bugs, tests/test_cuda_emulator.py)
#
# Modes (one build each; the instrumentations cannot share one):
#   asan   AddressSanitizer + UBSan on everything (EMU_SANITIZE overrides the list; empty: none).
#   race   the kernel sources compiled with -fsanitize=thread instrumentation but linked without its
#          runtime: emu_race.cpp provides the hooks and checks shared-memory races (see there).
#   plain  no instrumentation.
# Env: EMU_HEADDIMS="64 96 128 256", EMU_SRC=csrc/cuda (the CUDA sources; the mutation gate passes a
# mutated copy), CXX=g++. The sources are first copied by prepare_sources.py (__launch_bounds__ becomes
# a check at kernel entry). Incremental: an object is recompiled only when a file it includes changed.
set -euo pipefail
[ $# -eq 3 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
TARGET=$1 MODE=$2 BUILD=$3
EMU=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$EMU/../../.." && pwd)
DEFAULT_SRC=$ROOT/csrc/cuda
[ "$TARGET" = checks ] && DEFAULT_SRC=$EMU/checks
SRC=$(cd "${EMU_SRC:-$DEFAULT_SRC}" && pwd)
DIMS=${EMU_HEADDIMS:-64 96 128 256}
CXX=${CXX:-g++}
case $TARGET in
  forward) BIN=selftest_emulated; SRCS=(attention_cuda.cu kv_cache_cuda.cu selftest.cu) ;;
  # attention_cuda.cu: compiled_head_dims() and the forward it links
  backward) BIN=selftest_backward_emulated; SRCS=(attention_bwd.cu selftest_backward.cu attention_cuda.cu) ;;
  checks) BIN=emu_checks; SRCS=(emu_checks.cu) ;;
  *) echo "emu_build.sh: target must be forward, backward or checks, got '$TARGET'" >&2; exit 2 ;;
esac
FLAGS=(-std=c++20 -O1 -g -fno-omit-frame-pointer -DFASTINFER_CUDA_EMULATE -Wall -Wno-unknown-pragmas -Wno-unused-function)
KERNEL_FLAGS=()  # only for the kernel sources (not the self-test driver, not the emulator)
LINK_FLAGS=()
EMU_DEFS=()
case $MODE in
  asan)
    SAN=${EMU_SANITIZE-address,undefined}
    if [ -n "$SAN" ]; then FLAGS+=(-fsanitize="$SAN" -fno-sanitize-recover=all); LINK_FLAGS+=(-fsanitize="$SAN"); fi ;;
  race)
    KERNEL_FLAGS+=(-fsanitize=thread --param=tsan-instrument-func-entry-exit=0)
    EMU_DEFS+=(-DFI_EMU_RACE=1) ;;
  plain) ;;
  *) echo "emu_build.sh: mode must be asan, race or plain, got '$MODE'" >&2; exit 2 ;;
esac
for d in $DIMS; do
  FLAGS+=(-DFASTINFER_CUDA_HDIM_$d=1)
  [ "$TARGET" = checks ] || SRCS+=(attention_fwd_hdim$d.cu)
done
mkdir -p "$BUILD"
STAMP="$BUILD/.inputs"
# Up to date: same inputs (file list, flags) and the binary newer than all of them.
echo "$TARGET $MODE $DIMS $CXX ${FLAGS[*]} $SRC" >"$STAMP.new"
if [ -x "$BUILD/$BIN" ] && cmp -s "$STAMP" "$STAMP.new" &&
  [ -z "$(find "$SRC" "$ROOT/csrc/include" "$EMU" -newer "$BUILD/$BIN" -type f 2>/dev/null | head -1)" ]; then
  rm -f "$STAMP.new"
  exit 0
fi
# Other inputs than last time (mode, flags, head dims): start from scratch.
cmp -s "$STAMP" "$STAMP.new" || rm -f "$BUILD"/*.o "$BUILD"/*.d
mv "$STAMP.new" "$STAMP"
python3 "$EMU/prepare_sources.py" "$SRC" "$BUILD/src"
INC=(-I "$EMU/include" -I "$BUILD/src" -I "$ROOT/csrc/include" -I "$ROOT/csrc")
# An object is rebuilt when it is missing or older than one of the files its last compile read (-MMD).
stale() {
  local obj=$1
  [ -f "$obj" ] && [ -f "${obj%.o}.d" ] || return 0
  local deps
  deps=$(sed -e 's/\\$//' -e 's/^[^:]*://' "${obj%.o}.d")
  for d in $deps; do [ "$d" -nt "$obj" ] && return 0; done
  return 1
}
compile() {  # source object flags...
  local src=$1 obj=$2
  shift 2
  stale "$obj" || return 0
  $CXX "$@" -MMD -MF "${obj%.o}.d" -c "$src" -o "$obj"
}
pids=()
for f in "${SRCS[@]}"; do
  extra=()
  [[ $f == selftest* ]] || extra=("${KERNEL_FLAGS[@]}")  # the self-test drivers touch no shared memory
  compile "$BUILD/src/cuda/$f" "$BUILD/${f%.cu}.o" "${FLAGS[@]}" "${extra[@]}" "${INC[@]}" -x c++ &
  pids+=($!)
done
compile "$EMU/emu.cpp" "$BUILD/emu.o" "${FLAGS[@]}" "${EMU_DEFS[@]}" "${INC[@]}" &
pids+=($!)
compile "$EMU/emu_race.cpp" "$BUILD/emu_race.o" "${FLAGS[@]}" "${EMU_DEFS[@]}" "${INC[@]}"
for p in "${pids[@]}"; do wait "$p"; done
objs=()
for f in "${SRCS[@]}"; do objs+=("$BUILD/${f%.cu}.o"); done
$CXX "${LINK_FLAGS[@]}" "${objs[@]}" "$BUILD/emu.o" "$BUILD/emu_race.o" -ldl -o "$BUILD/$BIN"
