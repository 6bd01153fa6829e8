// Driver API entry points the runtime needs (stream memory operations), resolved at run time through
// cudaGetDriverEntryPointByVersion so the library never links libcuda: the CUDA build links and imports on
// machines without a driver (CI); the calls then fail with a clear error instead.
#pragma once

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda.h>

namespace asyncdiff_rt {

struct DriverApi {
  CUresult (*stream_write_value32)(CUstream, CUdeviceptr, cuuint32_t, unsigned int) = nullptr;
  CUresult (*stream_wait_value32)(CUstream, CUdeviceptr, cuuint32_t, unsigned int) = nullptr;
};

// Loaded once (thread-safe); throws naming the missing symbol when the driver does not provide it.
const DriverApi& driver_api();

}  // namespace asyncdiff_rt
#endif
