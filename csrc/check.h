// Checked calls for the native runtime. The library has no torch, so these throw std::runtime_error carrying
// file, line, the failing expression and the library's own error string; the bindings turn it into a Python
// RuntimeError.
#pragma once

#include <cerrno>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace asyncdiff_rt {

[[noreturn]] inline void throw_error(const char* file, int line, const std::string& what) {
  std::ostringstream os;
  os << "asyncdiff_rt: " << what << " (" << file << ":" << line << ")";
  throw std::runtime_error(os.str());
}

}  // namespace asyncdiff_rt

// Plain precondition check, usable in every build.
#define ADRT_CHECK(cond, msg)                                          \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::ostringstream adrt_os_;                                     \
      adrt_os_ << msg;                                                 \
      ::asyncdiff_rt::throw_error(__FILE__, __LINE__, adrt_os_.str()); \
    }                                                                  \
  } while (0)

// errno-setting libc calls (shm_open, mmap, ftruncate, ...).
#define CHECK_ERRNO(expr, what)                                        \
  do {                                                                 \
    if ((expr) < 0) {                                                  \
      int adrt_errno_ = errno;                                         \
      std::ostringstream adrt_os_;                                     \
      adrt_os_ << what << ": " << std::strerror(adrt_errno_);          \
      ::asyncdiff_rt::throw_error(__FILE__, __LINE__, adrt_os_.str()); \
    }                                                                  \
  } while (0)

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>

#define CHECK_CUDA(expr)                                                                                \
  do {                                                                                                  \
    cudaError_t adrt_err_ = (expr);                                                                     \
    if (adrt_err_ != cudaSuccess) {                                                                     \
      std::ostringstream adrt_os_;                                                                      \
      adrt_os_ << "CUDA error " << cudaGetErrorName(adrt_err_) << " (" << cudaGetErrorString(adrt_err_) \
               << ") in " #expr;                                                                        \
      ::asyncdiff_rt::throw_error(__FILE__, __LINE__, adrt_os_.str());                                  \
    }                                                                                                   \
  } while (0)

// Driver API results (entry points loaded at run time, see driver_api.h). The error string comes from the
// runtime so that nothing here needs libcuda at link time.
#define CHECK_CU(expr)                                                                 \
  do {                                                                                 \
    CUresult adrt_res_ = (expr);                                                       \
    if (adrt_res_ != CUDA_SUCCESS) {                                                   \
      std::ostringstream adrt_os_;                                                     \
      adrt_os_ << "CUDA driver error " << static_cast<int>(adrt_res_) << " in " #expr; \
      ::asyncdiff_rt::throw_error(__FILE__, __LINE__, adrt_os_.str());                 \
    }                                                                                  \
  } while (0)
#endif

#ifdef ASYNCDIFF_RT_WITH_NCCL
#include <nccl.h>

#define CHECK_NCCL(expr)                                                                                \
  do {                                                                                                  \
    ncclResult_t adrt_res_ = (expr);                                                                    \
    if (adrt_res_ != ncclSuccess && adrt_res_ != ncclInProgress) {                                      \
      std::ostringstream adrt_os_;                                                                      \
      adrt_os_ << "NCCL error " << static_cast<int>(adrt_res_) << " (" << ncclGetErrorString(adrt_res_) \
               << ") in " #expr;                                                                        \
      ::asyncdiff_rt::throw_error(__FILE__, __LINE__, adrt_os_.str());                                  \
    }                                                                                                   \
  } while (0)
#endif

// Raised by every GPU-only entry point of a build without CUDA.
#define ADRT_NO_CUDA(what)                                                                              \
  ::asyncdiff_rt::throw_error(__FILE__, __LINE__,                                                       \
                              std::string(what) +                                                       \
                                  " needs CUDA, but asyncdiff_rt was built without CUDA; rebuild with " \
                                  "the CUDA toolkit and nvidia-nccl-cu13 installed "                    \
                                  "(scripts/device_build.sh, or CMake -DASYNCDIFF_RT_WITH_CUDA=ON)")
