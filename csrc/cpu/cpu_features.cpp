// Detection and forcing of the CPU SIMD level. The levels, their names and the CPU features each
// needs are the rows of isa_list.h; this file only reads cpuid/XCR0 into Features.
#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(FASTINFER_X86)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastinfer::cpu {

namespace {

// The CPU and OS features the predicates of isa_list.h read (all false off x86).
struct Features {
  bool fma = false, f16c = false, avx2 = false, avx512 = false, bf16 = false, amx = false;
  bool vnni = false;  // AVX512_VNNI: int8 dot products (vpdpbusd), on every CPU with AVX512_BF16
  bool avxvnni = false;  // AVX-VNNI: the same dot products VEX-encoded, on 256-bit registers
  bool ymm_os = false, zmm_os = false;  // the OS saves the 256-bit / 512-bit registers
  unsigned long long xcr0 = 0;
};

#if defined(FASTINFER_X86)
// XCR0 says whether the OS saves the wide registers; cpuid alone is not enough.
unsigned long long read_xcr0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux hands out the 8 KiB AMX tile state only to processes that ask for it.
bool amx_usable(unsigned long long xcr0) {
  if ((xcr0 & (3ull << 17)) != (3ull << 17)) return false;  // XTILECFG, XTILEDATA
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

Features features() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  if (!osxsave || __get_cpuid_max(0, nullptr) < 7) return f;
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  f.xcr0 = read_xcr0();
  f.ymm_os = (f.xcr0 & 0x6) == 0x6;
  f.zmm_os = (f.xcr0 & 0xe6) == 0xe6;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = b & (1u << 5);
  f.amx = (d & (1u << 24)) && (d & (1u << 22)) && (d & (1u << 25));  // AMX-TILE, AMX-BF16, AMX-INT8
  f.avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));  // F DQ BW VL
  f.vnni = c & (1u << 11);
  __cpuid_count(7, 1, a, b, c, d);
  f.bf16 = a & (1u << 5);
  f.avxvnni = a & (1u << 4);
  return f;
}
#else
bool amx_usable(unsigned long long) { return false; }
Features features() { return {}; }
#endif

constexpr const char* kNames[] = {
#define FI_ISA_NAME(suffix, Enum, name, ...) name,
    FI_CPU_ISAS(FI_ISA_NAME)
#undef FI_ISA_NAME
};
constexpr int kNumIsas = sizeof(kNames) / sizeof(kNames[0]);

// Whether level i is built here and this CPU and OS run it. amx_usable asks the OS for the tile state,
// so AMX's predicate runs only once everything else about AMX holds.
bool level_holds(int i) {
  using Predicate = bool (*)(const Features&);
  static const Predicate kPredicates[] = {
#define FI_ISA_PREDICATE(suffix, Enum, name, arch, flags, att, bwd, lin, pw, pred) \
  [](const Features& f) { return FI_ISA_BUILT_##arch && (pred); },
      FI_CPU_ISAS(FI_ISA_PREDICATE)
#undef FI_ISA_PREDICATE
  };
  static const Features f = features();
  return kPredicates[i](f);
}

// The highest level that holds.
Isa detect() {
  for (int i = kNumIsas - 1; i > 0; --i)
    if (level_holds(i)) return static_cast<Isa>(i);
  return static_cast<Isa>(0);
}

Isa parse(const std::string& name) {
  if (name == "auto" || name.empty()) return best_isa();
  int want = -1;
  std::string all = "auto";
  for (int i = 0; i < kNumIsas; ++i) {
    if (name == kNames[i]) want = i;
    all += std::string(", ") + kNames[i];
  }
  if (want < 0) throw std::invalid_argument("unknown CPU ISA '" + name + "': expected one of " + all);
  // Not every level below the best holds (isa_list.h): each forced level must hold itself.
  if (want > static_cast<int>(best_isa()) || !level_holds(want))
    throw std::invalid_argument(std::string("CPU ISA '") + name + "' is not supported by this CPU/build (best is '" +
                                isa_name(best_isa()) + "')");
  return static_cast<Isa>(want);
}

std::atomic<int>& forced() {
  static std::atomic<int> value{[] {
    const char* env = std::getenv("FASTINFER_CPU_ISA");
    if (!env) return static_cast<int>(best_isa());
    try {
      return static_cast<int>(parse(env));
    } catch (const std::invalid_argument&) {
      return static_cast<int>(best_isa());  // a bad variable must not make import fail; set_isa() reports it
    }
  }()};
  return value;
}

}  // namespace

const char* isa_name(Isa isa) {
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kNumIsas ? kNames[i] : "?";
}

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() { return static_cast<Isa>(forced().load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) { forced().store(static_cast<int>(parse(name))); }

const char* active_isa_name() { return isa_name(active_isa()); }

const char* best_isa_name() { return isa_name(best_isa()); }

}  // namespace fastinfer::cpu
