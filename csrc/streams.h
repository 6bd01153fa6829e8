// Streams and events owned by the native runtime. Every function takes the stream it works on; streams cross
// the Python boundary as the integer value of a cudaStream_t (what `torch.cuda.Stream.cuda_stream` gives).
//
// Note [stream ordering]: work enqueued by the runtime on a caller's stream is ordered after everything the
// caller queued before, and everything queued after it sees its results. Where the runtime uses a stream of its
// own (communication; the Python transports create it and fork/join it with torch streams), an event recorded on the
// caller's stream gates it and an event recorded on it gates the caller's stream again, so the caller can treat the
// call as if it ran on its own stream.
#pragma once

#include <cstdint>

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace asyncdiff_rt {

#ifdef ASYNCDIFF_RT_WITH_CUDA
using StreamHandle = cudaStream_t;
using EventHandle = cudaEvent_t;
#else
using StreamHandle = void*;
using EventHandle = void*;
#endif

inline StreamHandle stream_from_int(std::uintptr_t v) { return reinterpret_cast<StreamHandle>(v); }

// Makes `device` current for a scope and restores the previous device (no-op for device < 0).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Event without timing (cheap to record and query).
class Event {
 public:
  explicit Event(int device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(StreamHandle stream);
  // True when all work captured by the last record() has completed.
  bool query() const;
  EventHandle handle() const { return event_; }

 private:
  int device_;
  EventHandle event_ = nullptr;
};

// True when `stream` is being captured into a CUDA graph (host-side bookkeeping must then be skipped).
bool stream_is_capturing(StreamHandle stream);

}  // namespace asyncdiff_rt
