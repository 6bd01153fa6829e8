// A directed, double-buffered channel from one process to another through a ShmRegion (DESIGN §1, §5): the `shm`
// channel (slots in the shared region) and the `ipc` channel (slots in device memory, Note [ipc channel]); they share
// the header, the handshake, the waits and the failure handling below.
//
// Layout: a 4 KiB header, then (shm) two slots of `capacity` bytes (rounded up to pages). The sender packs several
// (ptr, nbytes) parts into the slot of parity seq % 2, each part at a 256-byte aligned offset, in list order;
// the receiver unpacks the same list. Both sides must pass the same capacity and, per seq, the same sizes.
//
// Note [shm handshake]: each slot has one flag word, `full`, written by both sides in strict alternation:
//   send(seq): wait full[p] == 0 (the receiver has consumed the previous message in this slot, seq - 2 when
//              seqs are consecutive); copy parts into slot p; write stamp[p] = seq; write full[p] = 1.
//   recv(seq): wait full[p] == 1; copy parts out of slot p; write full[p] = 0.
// The flag values are constants, not seqs, on purpose: a send or recv captured into a CUDA graph bakes its
// values into the graph, and replaying a "ready >= seq" wait with a stale seq would pass without waiting and
// race. With constant values a replayed graph runs the same handshake every time. Ordering and misuse are
// still checked where the host sees them: seqs must increase per side (consecutive seqs alternate slots; any
// increasing sequence both sides share works), and a CPU receiver checks the stamp a CPU sender wrote.
//
// CPU (device < 0): memcpy plus atomic flag accesses (release after writing the slot, acquire before reading
// it); host waits spin, then yield, then sleep, and throw after `timeout_s` naming the peer rank and the step;
// they also notice at once a peer process that has exited or that marked the channel failed.
//
// GPU (device >= 0): the region is page-locked (cudaHostRegister Mapped|Portable); copies are
// cudaMemcpyAsync between device memory and the slot on the caller's stream; waits and flag writes are
// cuStreamWaitValue32(EQ) / cuStreamWriteValue32 on the mapped flag words, each `full` write behind an explicit
// memory barrier (Note [release fence] in shm_channel.cpp) — no host synchronisation in steady state. `wait(seq)`
// polls an event recorded after the op with the timeout; on expiry it marks the channel failed, releases the
// stream by writing the awaited flag values from the host (so the GPU does not stay blocked forever; the data
// of that step is then garbage and every later call throws), and throws naming the peer and the step.
//
// CUDA graph capture: send/recv may be captured (stream memory operations and memcpyAsync are capturable).
// Caveats: (1) during capture no completion event is recorded and the seq order check is skipped, so `wait`
// covers only eagerly issued ops; call `wait` on a later eager op or synchronise the replay stream. (2) The
// pointers and sizes are baked into the graph: the tensors must stay alive and in place. (3) Both processes must
// replay their captured sends/recvs in the same order as they would issue them eagerly. (4) A graph that both
// sends and receives on the same channel direction deadlocks unless the other side runs concurrently, as in
// eager mode. (5) The stamp a captured send writes is the seq at capture time, so a CPU receiver cannot check it.
// A channel is single-threaded: one thread issues its ops.
//
// Note [ipc channel]: the same header, flags and waits, but the two slots live in device memory that the creator
// allocates and exports through CUDA IPC (csrc/device_slots.h) and the opener maps on its own device: the same GPU
// or one with peer access. Either side may create; the transports create on the sending side, so the sender copies
// into its own memory and the receiver out of the mapped slot, both device to device on the caller's stream. The
// flag words stay in the page-locked shared header: a stream wait on a flag orders the copies across processes
// with no host synchronisation and is capturable. IPC events are not used for the ordering: cudaStreamWaitEvent
// on an IPC event waits for the record the host has issued last, so without a host handshake per message it can
// pass before the peer's record of that message; the flags carry the per-message ordering instead. Device only
// (device >= 0); the two sides must be different processes. Teardown follows Note [ipc teardown]
// (channel_header.h): the creator frees its slots only once the opener has closed its mapping (or exited), so the
// opener should close its ipc channels before the creator closes its side.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "device_slots.h"
#include "shm_region.h"
#include "streams.h"

namespace asyncdiff_rt {

struct Part {
  std::uintptr_t ptr;  // host pointer (CPU channel) or any pointer cudaMemcpyDefault accepts (GPU channel)
  std::size_t nbytes;
};

struct ChannelHeader;  // in shared memory; defined in channel_header.h

// Where a channel's two slots live: in the shared region (shm) or in the creator's device memory (ipc).
enum class SlotStorage : std::uint32_t { kHost = 1, kDevice = 2 };

class ShmChannel {
 public:
  static constexpr double kDefaultTimeoutS = 60.0;
  static constexpr std::size_t kPartAlignment = 256;

  // `create`: this side creates the region (the other side opens it, waiting up to timeout_s for it).
  // `device`: CUDA device index of the tensors this side passes, or -1 for host memory.
  // `peer`: the other side's rank, used in error messages only. `peer_pid` (> 0 when known, e.g. from the
  // rendezvous): a peer that exits before the channel is set up ends the set-up waits at once.
  // Set-up failures throw naming the channel, the peer rank and "set-up".
  ShmChannel(const std::string& name, std::size_t capacity, bool create, int device, int peer,
             double timeout_s = kDefaultTimeoutS, int peer_pid = 0)
      : ShmChannel(SlotStorage::kHost, name, capacity, create, device, peer, timeout_s, peer_pid) {}
  virtual ~ShmChannel();
  ShmChannel(const ShmChannel&) = delete;
  ShmChannel& operator=(const ShmChannel&) = delete;

  // CPU: blocking. GPU: enqueued on `stream` (Note [stream ordering]).
  void send(std::uint64_t seq, const std::vector<Part>& parts, StreamHandle stream = nullptr);
  void recv(std::uint64_t seq, const std::vector<Part>& parts, StreamHandle stream = nullptr);
  // GPU: host wait (with timeout) for the op issued eagerly with `seq` to complete (returns at once for a seq
  // it holds no event for: captured, unknown, or older than the last 32 ops); CPU: checks only that the channel
  // has not failed.
  void wait(std::uint64_t seq, double timeout_s);
  // Marks the channel failed on both sides (the peer's waits throw at once), releases this side's blocked
  // stream ops. Later calls throw. For tests and for tearing down after another rank failed.
  // The creator also unlinks the name, so nothing is left in /dev/shm whatever happens next.
  void abort(const std::string& reason = "aborted");
  // Note [shm generations]: a sender that grows its channel keeps the old generation (and its name) until the
  // receiver has opened it, since the receiver still has to read the messages in it. True on the opener side,
  // on a closed channel, and on the creator side once the opener has mapped the region (thread-safe read).
  bool peer_opened() const;
  // True once the opener no longer needs what this creator owns: shm, once it mapped the region (its mapping
  // keeps the memory); ipc, once it closed its mapping of the device slots (Note [ipc teardown]). True on the
  // opener side and on a closed channel. Thread-safe read.
  bool peer_released() const;
  // Waits up to timeout_s for peer_opened(); false at the timeout, or at once when the channel failed or the
  // peer exited. Never throws.
  bool wait_peer_opened(double timeout_s);
  // The three calls below are the only ones safe from another thread (a watchdog) while the owning thread uses
  // the channel (not while it closes it): they only read or atomically write words of the shared header.
  // Empty while the peer is alive and has not marked the channel failed; otherwise what happened to it.
  std::string peer_problem() const;
  // True when the op this side issued with `seq` has completed (its stream wrote the completion word; a pure
  // host read, no CUDA call, so a watchdog never blocks behind a synchronous copy in another thread). Also
  // true for a closed channel. Captured ops write the seq of capture time: watch eager ops only.
  bool completed(std::uint64_t seq) const;
  // Marks the channel failed in shared memory (both sides' host calls then throw) and writes, once, the flag
  // values this side's stream ops wait for, releasing a stream blocked on a dead or stalled peer. Call it
  // repeatedly until the stream's work completed (a released op's own flag write can block the next one).
  void release_from_host();
  // Waits (with the timeout) for enqueued GPU work, then unmaps; never throws. Idempotent.
  void close() noexcept;

  const std::string& name() const { return name_; }
  std::size_t capacity() const { return capacity_; }
  int device() const { return device_; }
  int peer() const { return peer_; }
  bool failed() const;
  bool closed() const { return header_ == nullptr; }
  // Bytes the packed parts need in one slot (alignment included).
  static std::size_t packed_size(const std::vector<Part>& parts);
  SlotStorage storage() const { return storage_; }

 protected:
  ShmChannel(SlotStorage storage, const std::string& name, std::size_t capacity, bool create, int device, int peer,
             double timeout_s, int peer_pid);

 private:
  enum class Role { kNone, kSender, kReceiver };

  void check_usable(Role role, std::uint64_t seq);
  // The bookkeeping every op shares (size, state, role and seq checks); true when `stream` is capturing.
  bool begin_op(Role role, std::uint64_t seq, const std::vector<Part>& parts, StreamHandle stream);
  // Waits for full[parity] == value: on the host (CPU) or enqueued on `stream` (GPU).
  void await_flag(int parity, std::uint32_t value, std::uint64_t seq, const char* what, StreamHandle stream);
  // Writes a header word: a release store (CPU) or a stream write after the op's copies (GPU, `dev` pointer);
  // `fence`: behind a system-wide memory barrier on the stream (Note [release fence] in shm_channel.cpp).
  void set_word(std::uint32_t* host, std::uintptr_t dev, std::uint32_t value, StreamHandle stream, bool fence = false);
  // Packs parts into slot `parity` or unpacks them from it: memcpy (CPU) or cudaMemcpyAsync on `stream` (GPU).
  void copy_parts(const std::vector<Part>& parts, int parity, bool into_slot, StreamHandle stream);
  void check_fits(const std::vector<Part>& parts, std::uint64_t seq) const;
  std::uint8_t* slot(int parity) const;
  std::uint32_t* full_word(int parity) const;
  std::uint32_t* stamp_word(int parity) const;
  // CPU wait for full[parity] == value; throws naming peer and `step` (with `what` describing the wait).
  void host_wait_flag(int parity, std::uint32_t value, std::uint64_t step, const char* what);
  void check_peer(std::uint64_t step, const char* what);
  int peer_pid() const;
  [[noreturn]] void fail(const std::string& message);
  std::string describe(std::uint64_t step) const;
  void mark_failed(const std::string& reason);
  void release_gpu(double grace_s);
  void record_done(std::uint64_t seq, StreamHandle stream);
  const char* kind() const { return storage_ == SlotStorage::kHost ? "shm" : "ipc"; }
  // GPU: page-locks the region and finds the flag words' device addresses (stream memory operations).
  void setup_gpu_flags();
  // Device storage: export (creator) or import (opener) the slots; set-up of a device channel.
  void setup_device_slots(const std::string& who);
  // Device storage at close: Note [ipc teardown]. Never throws.
  void release_device_slots() noexcept;

  std::string name_;
  std::size_t capacity_ = 0;
  std::size_t slot_stride_ = 0;
  SlotStorage storage_ = SlotStorage::kHost;
  std::uint8_t* slots_ = nullptr;  // both slots: in the region (shm) or in device memory (ipc)
  DeviceSlots device_slots_;
  int device_ = -1;
  int peer_ = -1;
  int known_peer_pid_ = 0;
  double timeout_s_ = kDefaultTimeoutS;
  bool creator_ = false;
  ShmRegion region_;
  ChannelHeader* header_ = nullptr;
  std::atomic<Role> role_{Role::kNone};
  bool has_seq_ = false;
  std::uint64_t last_seq_ = 0;
  bool failed_local_ = false;
  std::string failure_;

  // GPU: completion events of recent ops, oldest first; retired events are reused.
  std::uintptr_t dev_full_[2] = {0, 0};
  std::uintptr_t dev_stamp_[2] = {0, 0};
  std::uintptr_t dev_done_[2] = {0, 0};
  std::deque<std::pair<std::uint64_t, std::unique_ptr<Event>>> pending_;
  std::vector<std::unique_ptr<Event>> spare_events_;
  static constexpr std::size_t kMaxPending = 32;
};

// Note [ipc channel]: the ShmChannel interface with its slots in device memory shared through CUDA IPC.
class IpcChannel : public ShmChannel {
 public:
  IpcChannel(const std::string& name, std::size_t capacity, bool create, int device, int peer,
             double timeout_s = kDefaultTimeoutS, int peer_pid = 0)
      : ShmChannel(SlotStorage::kDevice, name, capacity, create, device, peer, timeout_s, peer_pid) {}
};

}  // namespace asyncdiff_rt
