// Internal to the channel implementation (shm_channel.cpp, channel_waits.cpp): the header both processes map, and
// the small helpers they share. Not part of the library's interface.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

#include "shm_channel.h"

namespace asyncdiff_rt {
namespace channel_detail {

constexpr std::uint32_t kMagic = 0x54524441;  // "ADRT"
constexpr std::uint32_t kLayoutVersion = 2;   // 2: slot storage, IPC handle and import state (the ipc channel)
constexpr std::size_t kHeaderBytes = 4096;
constexpr std::size_t kPage = 4096;
constexpr std::uint32_t kSenderCpu = 1;
constexpr std::uint32_t kSenderGpu = 2;

// Note [ipc teardown]: who may release the exported device slots. The opener moves kNone -> kImported before it
// opens the IPC handle and kImported -> kImportClosed after it closed it; the creator moves kNone -> kExporterClosed
// when it closes first (a late opener then refuses). The creator frees its allocation only in kExporterClosed or
// kImportClosed (or when the opener's process is gone): freeing memory another process still maps is undefined.
constexpr std::uint32_t kImportNone = 0;
constexpr std::uint32_t kImported = 1;
constexpr std::uint32_t kImportClosed = 2;
constexpr std::uint32_t kExporterClosed = 3;

inline std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

using Clock = std::chrono::steady_clock;

inline std::uint32_t load_acquire(const std::uint32_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void store_release(std::uint32_t* p, std::uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
inline bool compare_exchange(std::uint32_t* p, std::uint32_t expected, std::uint32_t desired, std::uint32_t* seen) {
  bool ok = __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  if (seen != nullptr) *seen = expected;
  return ok;
}

// One word per cache line so the two sides never share a line they both write.
struct alignas(64) Word {
  std::uint32_t value;
};

}  // namespace channel_detail

struct ChannelHeader {
  std::uint32_t magic;  // written last by the creator (release)
  std::uint32_t layout_version;
  std::uint64_t capacity;
  std::int32_t creator_pid;
  std::int32_t opener_pid;
  std::uint32_t storage;  // static_cast<uint32_t>(SlotStorage) of the creator: both sides must agree
  std::uint32_t reserved;
  std::uint64_t slots_offset;                           // device storage: the slots' offset in the exported allocation
  std::uint64_t slots_bytes;                            // device storage: bytes of both slots
  unsigned char ipc_handle[DeviceSlots::kHandleBytes];  // device storage: cudaIpcMemHandle_t of the allocation
  channel_detail::Word failed;                          // nonzero once either side marked the channel failed
  channel_detail::Word sender_kind;   // kSenderCpu / kSenderGpu, set by the sender before its first message
  channel_detail::Word full[2];       // Note [shm handshake]
  channel_detail::Word stamp[2];      // low 32 bits of the seq in each slot
  channel_detail::Word done[2];       // low 32 bits of the last seq whose op completed: [0] sender, [1] receiver
  channel_detail::Word import_state;  // Note [ipc teardown]
};
static_assert(sizeof(ChannelHeader) <= channel_detail::kHeaderBytes, "channel header must fit its page");

}  // namespace asyncdiff_rt
