// Version and build information, and a runtime check that the driver, the CUDA runtime and NCCL fit together.
#pragma once

#include <string>

namespace asyncdiff_rt {

struct BuildInfo {
  std::string version;
  bool with_cuda = false;
  bool with_nccl = false;
  std::string cuda_arch;          // architectures compiled for, e.g. "90"
  int cuda_runtime_compiled = 0;  // CUDART_VERSION of the headers, e.g. 13000
  int cuda_runtime_version = 0;   // cudaRuntimeGetVersion (the statically linked runtime)
  int cuda_driver_version = 0;    // cudaDriverGetVersion, 0 without a driver
  int device_count = 0;           // 0 without a driver or device
  int nccl_compiled = 0;          // NCCL_VERSION_CODE of the headers
  int nccl_runtime = 0;           // ncclGetVersion of the loaded libnccl.so.2
  std::string compiler;
  std::string build_type;
  std::string runtime_problem;  // empty when check_runtime() would pass
};

std::string version();
BuildInfo build_info();
// Throws std::runtime_error saying what does not fit (no CUDA build, no driver, no device, driver older than
// the runtime, NCCL older than its headers, missing stream memory operations).
void check_runtime();

}  // namespace asyncdiff_rt
