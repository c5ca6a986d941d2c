// Whether a CUDA device can run this build's kernels: a pure check of a device's compute capability
// against the kernels' minimum (sm_80: cp.async, bf16 mma.sync) and the architectures compiled in
// (FASTINFER_CUDA_ARCHS), exposed as fastinfer._C.cuda_arch_problem so that it is testable without
// a GPU; in CUDA builds the same check of a real device (cached per device), which cuda_available()
// reads and check_devices raises before any kernel runs on such a device ("invalid device function"
// otherwise, from the first launch).
#include <pybind11/pybind11.h>

#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

#include "bindings/bindings.h"
#include "bindings/checks.h"
#include "fastinfer/cuda.h"

namespace fastinfer::bindings {

namespace {

constexpr int kMinComputeCapability = 80;  // every CUDA kernel of fastinfer uses sm_80 instructions

// One entry of a CMake CUDA_ARCHITECTURES list ("80", "90a", "100f", "80-real", "86-virtual").
struct ArchEntry {
  int cc = 0;           // 10 * major + minor
  char variant = 0;     // 0, 'a' (arch-specific: that exact device) or 'f' (family: same major, minor >= )
  bool sass = true;     // machine code for that architecture
  bool ptx = true;      // PTX, compiled by the driver for newer devices
};

// False for what cannot be read as an entry ("native", "all", "all-major"): the device decides then.
bool parse_arch(std::string s, ArchEntry& e) {
  const size_t dash = s.find('-');
  if (dash != std::string::npos) {
    const std::string kind = s.substr(dash + 1);
    if (kind == "real") e.ptx = false;
    else if (kind == "virtual") e.sass = false;
    else return false;
    s = s.substr(0, dash);
  }
  if (!s.empty() && (s.back() == 'a' || s.back() == 'f')) {
    e.variant = s.back();
    s.pop_back();
  }
  if (s.empty() || s.size() > 4 || s.find_first_not_of("0123456789") != std::string::npos) return false;
  e.cc = std::stoi(s);
  return true;
}

// Can code compiled for entry e run on a device of compute capability cc (10 * major + minor)?
bool runs_on(const ArchEntry& e, int cc) {
  const bool same_major = cc / 10 == e.cc / 10;
  if (e.variant == 'a') return cc == e.cc;
  if (e.variant == 'f') return same_major && cc >= e.cc;
  return (e.sass && same_major && cc >= e.cc) || (e.ptx && cc >= e.cc);
}

}  // namespace

std::string cuda_arch_problem(int device, const std::string& name, int major, int minor, const std::string& archs) {
  const int cc = 10 * major + minor;
  std::ostringstream dev;
  dev << "device " << device << " (" << name << ")";
  if (cc < kMinComputeCapability)
    return cat("fastinfer's CUDA kernels need compute capability ", kMinComputeCapability / 10, ".",
               kMinComputeCapability % 10, " or newer; ", dev.str(), " is ", major, ".", minor);
  std::istringstream list(archs);
  std::string item;
  bool any = false;
  while (std::getline(list, item, ',')) {
    const size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    if (b == std::string::npos) continue;
    ArchEntry entry;
    if (!parse_arch(item.substr(b, e - b + 1), entry)) return "";  // a list this check cannot read: no verdict
    any = true;
    if (runs_on(entry, cc)) return "";
  }
  if (!any) return "";  // no list (a build without CUDA): only the minimum applies
  return cat("fastinfer's CUDA kernels were compiled for ", archs, " (FASTINFER_CUDA_ARCHS), none of which runs on ",
             dev.str(), " of compute capability ", major, ".", minor, "; rebuild with FASTINFER_CUDA_ARCHS including ",
             cc);
}

#if defined(FASTINFER_WITH_CUDA)
std::string cuda_device_problem(int device) {
  static std::mutex mu;
  static std::map<int, std::string> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  std::string problem;
  try {
    const cuda::DeviceInfo info = cuda::device_info(device);
    problem = cuda_arch_problem(device, info.name, info.major, info.minor, FASTINFER_CUDA_ARCHS_STR);
  } catch (const std::runtime_error& e) {  // a device whose properties cannot be read cannot be used either
    problem = e.what();
  }
  return known[device] = problem;
}

void check_cuda_device(int device) {
  const std::string problem = cuda_device_problem(device);
  if (!problem.empty()) throw std::runtime_error(problem);
}
#endif

void bind_cuda_device(py::module_& m) {
  m.def("cuda_arch_problem", &cuda_arch_problem, py::arg("device"), py::arg("name"), py::arg("major"), py::arg("minor"),
        py::arg("archs"),
        "Why a device of compute capability major.minor cannot run kernels compiled for `archs` (build_info's "
        "cuda_archs, e.g. '80,90a'), or '' when it can. Pure: no GPU needed.");
#if defined(FASTINFER_WITH_CUDA)
  m.def("cuda_device_problem", &cuda_device_problem, py::arg("device"),
        "cuda_arch_problem for CUDA device `device` of this machine and this build's architectures ('' = usable).");
#endif
}

}  // namespace fastinfer::bindings
