#include "device_slots.h"

#include <cstring>

#include "check.h"
#include "driver_api.h"
#include "streams.h"

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace asyncdiff_rt {

#ifdef ASYNCDIFF_RT_WITH_CUDA

static_assert(sizeof(cudaIpcMemHandle_t) == DeviceSlots::kHandleBytes, "cudaIpcMemHandle_t is 64 bytes");

// CHECK_CUDA that also clears the (non-sticky) error: a failed set-up must not surface later in torch's own
// launch checks (cudaGetLastError) as if an unrelated kernel had failed.
#define ADRT_CHECK_CUDA_CLEAR(expr) \
  do {                              \
    cudaError_t adrt_e_ = (expr);   \
    if (adrt_e_ != cudaSuccess) {   \
      cudaGetLastError();           \
      CHECK_CUDA(adrt_e_);          \
    }                               \
  } while (0)

void DeviceSlots::allocate(int device, std::size_t bytes, unsigned char* handle_out, std::uint64_t* offset_out) {
  ADRT_CHECK(!held(), "device slots allocated twice");
  ADRT_CHECK(device >= 0 && bytes > 0, "device slots need a CUDA device and a positive size");
  DeviceGuard guard(device);
  void* ptr = nullptr;
  ADRT_CHECK_CUDA_CLEAR(cudaMalloc(&ptr, bytes));
  device_ = device;
  exporter_ = true;
  mapping_ = ptr;
  data_ = static_cast<std::uint8_t*>(ptr);
  try {
    // A private non-blocking stream: the zero fill must not queue behind (or wait for) the caller's streams, and
    // it must be done before the peer's first copy, so this one set-up call synchronises.
    cudaStream_t s = nullptr;
    ADRT_CHECK_CUDA_CLEAR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaError_t fill = cudaMemsetAsync(ptr, 0, bytes, s);
    cudaError_t sync = fill == cudaSuccess ? cudaStreamSynchronize(s) : fill;
    cudaStreamDestroy(s);
    ADRT_CHECK_CUDA_CLEAR(fill);
    ADRT_CHECK_CUDA_CLEAR(sync);
    // cudaMalloc may hand out part of a larger allocation; the IPC handle names the whole allocation, and the
    // importer's pointer is its base: export the base and the offset.
    CUdeviceptr base = 0;
    size_t size = 0;
    CHECK_CU(driver_api().mem_get_address_range(&base, &size, reinterpret_cast<CUdeviceptr>(ptr)));
    cudaIpcMemHandle_t handle;
    ADRT_CHECK_CUDA_CLEAR(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base)));
    std::memcpy(handle_out, &handle, kHandleBytes);
    *offset_out = reinterpret_cast<CUdeviceptr>(ptr) - base;
  } catch (...) {
    release();
    throw;
  }
}

void DeviceSlots::open(int device, const unsigned char* handle, std::uint64_t offset) {
  ADRT_CHECK(!held(), "device slots opened twice");
  DeviceGuard guard(device);
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle, kHandleBytes);
  void* ptr = nullptr;
  ADRT_CHECK_CUDA_CLEAR(cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess));
  device_ = device;
  exporter_ = false;
  mapping_ = ptr;
  data_ = static_cast<std::uint8_t*>(ptr) + offset;
}

void DeviceSlots::release() noexcept {
  if (mapping_ == nullptr) return;
  int previous = -1;
  if (cudaGetDevice(&previous) == cudaSuccess && previous != device_) cudaSetDevice(device_);
  cudaError_t err = exporter_ ? cudaFree(mapping_) : cudaIpcCloseMemHandle(mapping_);
  if (err != cudaSuccess) cudaGetLastError();  // not sticky: leave no error for the caller's next call
  if (previous >= 0 && previous != device_) cudaSetDevice(previous);
  mapping_ = nullptr;
  data_ = nullptr;
}

#else  // !ASYNCDIFF_RT_WITH_CUDA

void DeviceSlots::allocate(int, std::size_t, unsigned char*, std::uint64_t*) { ADRT_NO_CUDA("an ipc channel"); }
void DeviceSlots::open(int, const unsigned char*, std::uint64_t) { ADRT_NO_CUDA("an ipc channel"); }
void DeviceSlots::release() noexcept {
  mapping_ = nullptr;
  data_ = nullptr;
}

#endif

void DeviceSlots::leak() noexcept {
  mapping_ = nullptr;
  data_ = nullptr;
}

}  // namespace asyncdiff_rt
