#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(FASTINFER_X86)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastinfer::cpu {

namespace {

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

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::kScalar;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return Isa::kScalar;
  const unsigned long long xcr0 = read_xcr0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return Isa::kScalar;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool amx = (d & (1u << 24)) && (d & (1u << 22));  // AMX-TILE, AMX-BF16
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));  // F DQ BW VL
  __cpuid_count(7, 1, a, b, c, d);
  const bool bf16 = a & (1u << 5);
  if (avx512 && zmm_os && fma && f16c && bf16 && amx && amx_usable(xcr0)) return Isa::kAmx;
  if (avx512 && zmm_os && fma && f16c) return bf16 ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (avx2 && ymm_os && fma && f16c) return Isa::kAvx2;
  return Isa::kScalar;
}
#else
Isa detect() { return Isa::kScalar; }
#endif

Isa parse(const std::string& name) {
  if (name == "auto" || name.empty()) return best_isa();
  Isa want;
  if (name == "scalar") want = Isa::kScalar;
  else if (name == "avx2") want = Isa::kAvx2;
  else if (name == "avx512") want = Isa::kAvx512;
  else if (name == "avx512_bf16") want = Isa::kAvx512Bf16;
  else if (name == "amx") want = Isa::kAmx;
  else
    throw std::invalid_argument("unknown CPU ISA '" + name +
                                "': expected one of auto, scalar, avx2, avx512, avx512_bf16, amx");
  if (static_cast<int>(want) > static_cast<int>(best_isa()))
    throw std::invalid_argument(std::string("CPU ISA '") + name + "' is not supported by this CPU/build (best is '" +
                                isa_name(best_isa()) + "')");
  return want;
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
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAmx: return "amx";
  }
  return "?";
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
