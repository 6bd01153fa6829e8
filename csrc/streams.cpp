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

Stream::Stream(int device, bool high_priority) : device_(device) {
  DeviceGuard guard(device);
  int least = 0, greatest = 0;
  CHECK_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CHECK_CUDA(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, high_priority ? greatest : least));
}

Stream::~Stream() {
  if (stream_ != nullptr) {
    DeviceGuard guard(device_);
    cudaStreamDestroy(stream_);
  }
}

void Stream::synchronize() const { CHECK_CUDA(cudaStreamSynchronize(stream_)); }

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

void stream_wait_stream(StreamHandle waiter, StreamHandle signaller, Event& scratch) {
  scratch.record(signaller);
  CHECK_CUDA(cudaStreamWaitEvent(waiter, scratch.handle(), 0));
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
Stream::Stream(int device, bool) : device_(device) { ADRT_NO_CUDA("a CUDA stream"); }
Stream::~Stream() = default;
void Stream::synchronize() const {}
Event::Event(int device) : device_(device) { ADRT_NO_CUDA("a CUDA event"); }
Event::~Event() = default;
void Event::record(StreamHandle) {}
bool Event::query() const { return true; }
void stream_wait_stream(StreamHandle, StreamHandle, Event&) { ADRT_NO_CUDA("stream_wait_stream"); }
bool stream_is_capturing(StreamHandle) { return false; }

#endif

}  // namespace asyncdiff_rt
