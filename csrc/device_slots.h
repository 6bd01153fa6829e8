// The two exchange slots of an `ipc` channel in device memory, shared between two processes through CUDA IPC
// (cudaIpcGetMemHandle / cudaIpcOpenMemHandle). The exporter (the channel's creator, its sender) allocates them; the
// importer (the receiver) opens the handle on its own device: the same GPU (processes under MPS, or time-sliced
// contexts) or a GPU with peer access (cudaIpcMemLazyEnablePeerAccess). CUDA IPC cannot open a handle in the
// process that exported it.
//
// Why the sender allocates: the opener already waits for the creator at set-up, so both sides are ready once
// their constructors return; a receiver-allocated slot would make a growing sender wait on the host for its
// receiver to open the new generation (two ranks growing towards each other would deadlock).
//
// Without CUDA every call raises the no-CUDA error.
#pragma once

#include <cstddef>
#include <cstdint>

namespace asyncdiff_rt {

class DeviceSlots {
 public:
  static constexpr std::size_t kHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t)

  DeviceSlots() = default;
  ~DeviceSlots() { release(); }
  DeviceSlots(const DeviceSlots&) = delete;
  DeviceSlots& operator=(const DeviceSlots&) = delete;

  // Exporter: allocates `bytes` on `device`, zero-filled (synchronously, on a private stream), and writes the IPC
  // handle of the allocation that holds them and the slots' offset in it.
  void allocate(int device, std::size_t bytes, unsigned char* handle_out, std::uint64_t* offset_out);
  // Importer: opens `handle` on `device`; the slots start `offset` bytes into the mapping.
  void open(int device, const unsigned char* handle, std::uint64_t offset);
  std::uint8_t* data() const { return data_; }
  bool held() const { return data_ != nullptr; }
  // cudaFree (exporter) or cudaIpcCloseMemHandle (importer); never throws. Idempotent.
  void release() noexcept;
  // Forgets the memory without releasing it: where releasing could be undefined (a peer may still map it).
  void leak() noexcept;

 private:
  int device_ = -1;
  bool exporter_ = false;
  std::uint8_t* data_ = nullptr;  // the slots
  void* mapping_ = nullptr;       // what to free or close
};

}  // namespace asyncdiff_rt
