#include "driver_api.h"

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda_runtime_api.h>

#include <mutex>
#include <stdexcept>
#include <string>

#include "check.h"

namespace asyncdiff_rt {
namespace {

// The _v2 ABI of the stream memory operations dates from CUDA 11.7; asking for the CUDA 12.0 version
// gives the same entry point on every driver we support (CUDA 12+).
constexpr unsigned kEntryPointVersion = 12000;

void* load_symbol(const char* symbol) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &fn, kEntryPointVersion, cudaEnableDefault, &status);
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || fn == nullptr) {
    std::string why = err != cudaSuccess                                  ? cudaGetErrorString(err)
                      : status == cudaDriverEntryPointVersionNotSufficent ? "driver too old for this entry point"
                                                                          : "symbol not found in the driver";
    ADRT_CHECK(false, "cannot load CUDA driver entry point " << symbol << ": " << why);
  }
  return fn;
}

}  // namespace

const DriverApi& driver_api() {
  static DriverApi api;
  static std::once_flag once;
  static std::string load_error;
  std::call_once(once, [] {
    try {
      api.stream_write_value32 =
          reinterpret_cast<decltype(api.stream_write_value32)>(load_symbol("cuStreamWriteValue32"));
      api.stream_wait_value32 = reinterpret_cast<decltype(api.stream_wait_value32)>(load_symbol("cuStreamWaitValue32"));
      api.stream_batch_mem_op = reinterpret_cast<decltype(api.stream_batch_mem_op)>(load_symbol("cuStreamBatchMemOp"));
      api.mem_get_address_range =
          reinterpret_cast<decltype(api.mem_get_address_range)>(load_symbol("cuMemGetAddressRange"));
    } catch (const std::exception& e) {
      load_error = e.what();
    }
  });
  if (!load_error.empty()) throw std::runtime_error(load_error);
  return api;
}

}  // namespace asyncdiff_rt
#endif
