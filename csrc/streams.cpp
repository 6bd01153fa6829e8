#include "streams.h"

#include "check.h"

namespace asyncdiff_rt {

#ifdef ASYNCDIFF_RT_WITH_CUDA

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) return;
  CHECK_CUDA(cudaGetDevice(&previous_));
  if (previous_ != device) {
    CHECK_CUDA(cudaSetDevice(device));
  } else {
    previous_ = -1;
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

Event::Event(int device) : device_(device) {
  DeviceGuard guard(device);
  CHECK_CUDA(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
}

Event::~Event() {
  if (event_ != nullptr) {
    DeviceGuard guard(device_);
    cudaEventDestroy(event_);
  }
}

void Event::record(StreamHandle stream) { CHECK_CUDA(cudaEventRecord(event_, stream)); }

bool Event::query() const {
  cudaError_t err = cudaEventQuery(event_);
  if (err == cudaErrorNotReady) return false;
  CHECK_CUDA(err);
  return true;
}

bool stream_is_capturing(StreamHandle stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CHECK_CUDA(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

#else  // !ASYNCDIFF_RT_WITH_CUDA

DeviceGuard::DeviceGuard(int device) {
  if (device >= 0) ADRT_NO_CUDA("a CUDA device");
}
DeviceGuard::~DeviceGuard() = default;
Event::Event(int device) : device_(device) { ADRT_NO_CUDA("a CUDA event"); }
Event::~Event() = default;
void Event::record(StreamHandle) {}
bool Event::query() const { return true; }
bool stream_is_capturing(StreamHandle) { return false; }

#endif

}  // namespace asyncdiff_rt
