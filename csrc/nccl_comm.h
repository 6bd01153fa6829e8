// An NCCL communicator owned by the library (DESIGN §5): unique id from rank 0, non-blocking
// ncclCommInitRankConfig (so set-up too can time out), grouped ncclSend/ncclRecv of raw bytes on a given
// stream, broadcast, waits that poll ncclCommGetAsyncError and the stream with a timeout and abort the
// communicator instead of hanging, finalize then destroy.
//
// The communicator is non-blocking (config.blocking = 0): every NCCL call may return ncclInProgress, and the
// library polls ncclCommGetAsyncError until the call settled before issuing the next one.
//
// Threads: one thread issues the operations; another (a watchdog) may call `completed`, `abort` and `valid`
// at any time. A mutex guards the communicator handle, and long waits poll with the mutex released, so an abort
// from the watchdog gets through within one poll and the issuing thread then throws "aborted".
//
// CUDA graph capture: sendrecv/broadcast are capturable (NCCL >= 2.9 supports capture); warm every peer edge up
// eagerly before capturing (the first op on an edge sets up connections), and do not call `wait` on a
// capturing stream.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "streams.h"

namespace asyncdiff_rt {

struct PeerBuffer {
  int peer;
  std::uintptr_t ptr;
  std::size_t nbytes;
};

// ncclGetUniqueId as bytes (NCCL_UNIQUE_ID_BYTES long).
std::string nccl_unique_id();

class NcclComm {
 public:
  NcclComm(const std::string& unique_id, int world, int rank, int device, double timeout_s = 60.0);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // One ncclGroup of byte sends and receives, enqueued on `stream`.
  void sendrecv(const std::vector<PeerBuffer>& sends, const std::vector<PeerBuffer>& recvs, StreamHandle stream);
  // In place: `ptr` on `root` is the source, elsewhere the destination.
  void broadcast(std::uintptr_t ptr, std::size_t nbytes, int root, StreamHandle stream);
  // Host wait (with timeout) until `stream` is idle; on timeout or an asynchronous NCCL error aborts the
  // communicator and throws naming `step` (a negative step is named by the caller).
  void wait(StreamHandle stream, double timeout_s, std::int64_t step);
  // Throws (after aborting) if NCCL reported an asynchronous error.
  void check_async(std::int64_t step);
  // Enqueues on `stream` a write of the low 32 bits of `seq` into a page-locked host word (a stream memory
  // operation): `completed(seq)` then tells from the host, without any CUDA call, that everything enqueued on
  // `stream` before it has run. For watchdogs (a CUDA query would block behind a synchronous copy).
  void mark_done(StreamHandle stream, std::uint64_t seq);
  bool completed(std::uint64_t seq) const;
  // Thread-safe; kernels of this communicator stop, later calls throw naming `reason`.
  void abort(const std::string& reason = "abort() called") noexcept;
  // Finalize (flushes outstanding ops, with the timeout) then destroy; aborts when finalize does not settle.
  // A communicator dropped without destroy() is aborted by the destructor.
  void destroy();

  int world() const { return world_; }
  int rank() const { return rank_; }
  int device() const { return device_; }
  bool valid() const { return comm_.load() != nullptr; }

 private:
  // Polls until the last NCCL call settled (ncclInProgress -> result); aborts and throws on error/timeout.
  void settle(const char* what, double timeout_s, std::int64_t step);
  void require_valid(const char* what) const;  // with mu_ held
  void abort_locked(const std::string& reason) noexcept;

  mutable std::mutex mu_;
  std::atomic<void*> comm_{nullptr};  // ncclComm_t
  std::uint32_t* done_host_ = nullptr;
  std::uintptr_t done_dev_ = 0;
  int world_ = 0;
  int rank_ = 0;
  int device_ = 0;
  double timeout_s_ = 60.0;
  std::string abort_reason_;
};

}  // namespace asyncdiff_rt
