#include "version.h"

#include <sstream>
#include <stdexcept>

#include "check.h"
#include "driver_api.h"

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif
#ifdef ASYNCDIFF_RT_WITH_NCCL
#include <nccl.h>
#endif

#ifndef ASYNCDIFF_RT_VERSION
#define ASYNCDIFF_RT_VERSION "0.0.0"
#endif
#ifndef ASYNCDIFF_RT_CUDA_ARCH
#define ASYNCDIFF_RT_CUDA_ARCH ""
#endif
#ifndef ASYNCDIFF_RT_BUILD_TYPE
#define ASYNCDIFF_RT_BUILD_TYPE ""
#endif

namespace asyncdiff_rt {

std::string version() { return ASYNCDIFF_RT_VERSION; }

namespace {

#ifdef ASYNCDIFF_RT_WITH_CUDA
std::string cuda_version_string(int v) {
  std::ostringstream os;
  os << v / 1000 << "." << (v % 1000) / 10;
  return os.str();
}
#endif

std::string find_problem(const BuildInfo& info) {
#ifndef ASYNCDIFF_RT_WITH_CUDA
  (void)info;
  return "asyncdiff_rt was built without CUDA; rebuild with the CUDA toolkit and nvidia-nccl-cu13 installed "
         "(scripts/device_build.sh)";
#else
  std::ostringstream os;
  if (info.cuda_driver_version == 0) {
    return "no CUDA driver found (libcuda.so.1 could not be loaded): no CUDA device usable on this machine";
  }
  if (info.cuda_driver_version < info.cuda_runtime_version) {
    os << "the CUDA driver supports CUDA " << cuda_version_string(info.cuda_driver_version)
       << " but asyncdiff_rt was built with CUDA runtime " << cuda_version_string(info.cuda_runtime_version)
       << "; update the driver or rebuild with an older toolkit";
    return os.str();
  }
  if (info.device_count == 0) return "no CUDA device visible (check CUDA_VISIBLE_DEVICES)";
#ifdef ASYNCDIFF_RT_WITH_NCCL
  if (info.nccl_runtime / 100 < info.nccl_compiled / 100) {
    os << "libnccl.so.2 loaded at run time is NCCL " << info.nccl_runtime << ", older than the headers ("
       << info.nccl_compiled << ") asyncdiff_rt was built against; rebuild (scripts/device_build.sh) in the "
       << "environment that runs it";
    return os.str();
  }
#endif
  try {
    driver_api();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
#endif
}

}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.version = version();
  info.cuda_arch = ASYNCDIFF_RT_CUDA_ARCH;
  info.build_type = ASYNCDIFF_RT_BUILD_TYPE;
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#endif
#ifdef ASYNCDIFF_RT_WITH_CUDA
  info.with_cuda = true;
  info.cuda_runtime_compiled = CUDART_VERSION;
  int v = 0;
  if (cudaRuntimeGetVersion(&v) == cudaSuccess) info.cuda_runtime_version = v;
  v = 0;
  if (cudaDriverGetVersion(&v) == cudaSuccess) info.cuda_driver_version = v;
  int n = 0;
  if (info.cuda_driver_version > 0 && cudaGetDeviceCount(&n) == cudaSuccess) info.device_count = n;
  cudaGetLastError();  // do not leave a sticky "no driver" error behind for the caller
#endif
#ifdef ASYNCDIFF_RT_WITH_NCCL
  info.with_nccl = true;
  info.nccl_compiled = NCCL_VERSION_CODE;
  int nv = 0;
  if (ncclGetVersion(&nv) == ncclSuccess) info.nccl_runtime = nv;
#endif
  info.runtime_problem = find_problem(info);
  return info;
}

void check_runtime() {
  BuildInfo info = build_info();
  if (!info.runtime_problem.empty()) throw std::runtime_error("asyncdiff_rt: " + info.runtime_problem);
}

}  // namespace asyncdiff_rt
