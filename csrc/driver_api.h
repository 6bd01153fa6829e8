// Driver API entry points the runtime needs (stream memory operations and barriers, an allocation's range), resolved at
// run time through cudaGetDriverEntryPointByVersion so the library never links libcuda: the CUDA build links and
// imports on machines without a driver (CI); the calls then fail with a clear error instead.
#pragma once

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda.h>

namespace asyncdiff_rt {

struct DriverApi {
  CUresult (*stream_write_value32)(CUstream, CUdeviceptr, cuuint32_t, unsigned int) = nullptr;
  CUresult (*stream_wait_value32)(CUstream, CUdeviceptr, cuuint32_t, unsigned int) = nullptr;
  // Note [release fence] (shm_channel.cpp): a memory barrier and a flag write as one batch.
  CUresult (*stream_batch_mem_op)(CUstream, unsigned int, CUstreamBatchMemOpParams*, unsigned int) = nullptr;
  // The allocation a device pointer lies in (ipc: export its base, send the offset).
  CUresult (*mem_get_address_range)(CUdeviceptr*, size_t*, CUdeviceptr) = nullptr;
};

// Loaded once (thread-safe); throws naming the missing symbol when the driver does not provide it.
const DriverApi& driver_api();

}  // namespace asyncdiff_rt
#endif
