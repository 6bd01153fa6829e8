// A POSIX shared-memory region between processes of one host: created (and sized) by its owner, opened by the
// peer, unlinked on close. Note [shm names]: the name is unlinked as soon as the peer has mapped it (and again,
// harmlessly, by the owner on close), so a crash after set-up leaves nothing behind in /dev/shm.
//
// With CUDA the mapping can be page-locked with cudaHostRegister(Mapped | Portable): copies between device
// memory and the region then run as DMA on a stream, and the GPU can read and write the region's words with
// stream memory operations.
#pragma once

#include <cstddef>
#include <string>

namespace asyncdiff_rt {

class ShmRegion {
 public:
  // Owner: creates `name` (replacing a stale one), sizes it to `size` bytes, zero-filled.
  static ShmRegion create(const std::string& name, std::size_t size);
  // Peer: waits up to `timeout_s` for the owner to create a region of exactly `size` bytes, then maps it. A
  // known `owner_pid` (> 0) that exits ends the wait at once; `who` prefixes the error messages.
  static ShmRegion open(const std::string& name, std::size_t size, double timeout_s, int owner_pid = 0,
                        const std::string& who = "");

  ShmRegion() = default;
  ~ShmRegion();
  ShmRegion(ShmRegion&& other) noexcept;
  ShmRegion& operator=(ShmRegion&& other) noexcept;
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;

  void* data() const { return data_; }
  std::size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }

  // Removes the name (the mapping stays valid). Idempotent.
  void unlink();
  // Page-locks the mapping for `device` (CUDA builds; throws otherwise). Idempotent.
  void register_cuda(int device);
  // Host pointer -> device pointer of the registered mapping.
  void* device_pointer(void* host_ptr) const;
  // Unregisters, unmaps, unlinks (owner). Idempotent; never throws.
  void close() noexcept;

 private:
  std::string name_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
  bool owner_ = false;
  bool unlinked_ = false;
  int registered_device_ = -1;
};

// False once process `pid` has exited (a zombie counts as exited); true for pid <= 0 (unknown).
bool process_alive(int pid);

// "/name" as shm_open wants it; checks the POSIX name rules and says what is wrong.
std::string shm_posix_name(const std::string& name);

}  // namespace asyncdiff_rt
