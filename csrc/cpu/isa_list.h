// The CPU SIMD levels, lowest first: the one list that the Isa enum and the run-time detection
// (cpu_features), the kernel declarations and dispatch tables (*_cpu.h, *_dispatch.cpp) and the
// build (CMakeLists.txt parses the FI_ISA rows below) all read. Adding a level: a row here, its
// kernel specialisations where a kernel header needs one (vec.h, tile_*.h), and a Features bit in
// cpu_features.cpp if its predicate needs a new cpuid bit. CMake generates its kernel sources.
//
// A level need not hold wherever a higher one does (avx_vnni, the VEX-encoded int8 dot products of
// Alder Lake and Sapphire Rapids, is absent from the earlier AVX-512 CPUs): auto picks the highest
// level that holds, and forcing a level asks only its own predicate.
//
// FI_ISA(suffix, Enum, "name", arch, "flags", attention, backward, linear, pointwise, predicate)
//   suffix     kernel namespace (FI_ISA_NS) and source suffix: <family>_<suffix>.cpp
//   Enum       its Isa enumerator; the order of the rows is the order of the levels
//   name       what FASTINFER_CPU_ISA and set_cpu_isa accept and build_info reports
//   arch       any | x86: x86 levels are built only where FASTINFER_X86 is defined
//   flags      compile options of its kernel sources (one row: CMake reads it with a regex)
//   attention, backward, linear, pointwise
//              1: the level has its own kernels of that family; 0: it runs the next level below's
//   predicate  true when this CPU and OS can run the level (Features f); tried highest level first
#pragma once

// clang-format off
#define FI_CPU_ISAS(FI_ISA) \
  FI_ISA(scalar,     kScalar,     "scalar",      any, "",                                                                                     1, 1, 1, 1, true) \
  FI_ISA(avx2,       kAvx2,       "avx2",        x86, "-mavx2 -mfma -mf16c",                                                                  1, 1, 1, 1, f.avx2 && f.ymm_os && f.fma && f.f16c) \
  FI_ISA(avxvnni,    kAvxVnni,    "avx_vnni",    x86, "-mavx2 -mfma -mf16c -mavxvnni",                                                        0, 0, 1, 0, f.avx2 && f.ymm_os && f.fma && f.f16c && f.avxvnni) \
  FI_ISA(avx512,     kAvx512,     "avx512",      x86, "-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c",                       1, 1, 1, 1, f.avx512 && f.zmm_os && f.fma && f.f16c) \
  FI_ISA(avx512bf16, kAvx512Bf16, "avx512_bf16", x86, "-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mavx512vnni -mavx2 -mfma -mf16c", 1, 0, 1, 0, f.avx512 && f.zmm_os && f.fma && f.f16c && f.bf16 && f.vnni) \
  FI_ISA(amx,        kAmx,        "amx",         x86, "-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mavx512vnni -mamx-tile -mamx-bf16 -mamx-int8 -mavx2 -mfma -mf16c", 1, 0, 1, 0, f.avx512 && f.zmm_os && f.fma && f.f16c && f.bf16 && f.vnni && f.amx && amx_usable(f.xcr0))
// clang-format on

// Helpers of the per-family tables (*_dispatch.cpp): FI_ISA_ENTRY(arch, has, getter) is `&getter,`
// where the level has its own kernels of the family and is built here, else `nullptr,`;
// FI_ISA_BUILT_<arch> says whether a level is built here at all.
#define FI_ISA_IF_1(fn) &fn
#define FI_ISA_IF_0(fn) nullptr
#define FI_ISA_ON_any(x) x
#define FI_ISA_BUILT_any true
#if defined(FASTINFER_X86)
#define FI_ISA_ON_x86(x) x
#define FI_ISA_BUILT_x86 true
#else
#define FI_ISA_ON_x86(x) nullptr
#define FI_ISA_BUILT_x86 false
#endif
#define FI_ISA_ENTRY(arch, has, fn) FI_ISA_ON_##arch(FI_ISA_IF_##has(fn)),

// FI_ISA_CAT(kernels_, FI_ISA_NS) -> kernels_avx2: the getter a kernel header defines for its level.
#define FI_ISA_CAT_(a, b) a##b
#define FI_ISA_CAT(a, b) FI_ISA_CAT_(a, b)
