#include "shm_channel.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <sstream>
#include <thread>

#include "channel_header.h"
#include "check.h"
#include "driver_api.h"

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace asyncdiff_rt {

using namespace channel_detail;

namespace {

// Exported device slots are allocated in whole 2 MiB pages: no other allocation shares what the peer maps.
constexpr std::size_t kDeviceGranularity = 2u << 20;

}  // namespace

ShmChannel::ShmChannel(SlotStorage storage, const std::string& name, std::size_t capacity, bool create, int device,
                       int peer, double timeout_s, int peer_pid)
    : name_(name),
      capacity_(capacity),
      storage_(storage),
      device_(device),
      peer_(peer),
      known_peer_pid_(peer_pid),
      timeout_s_(timeout_s),
      creator_(create) {
  const bool on_device = storage == SlotStorage::kDevice;
  ADRT_CHECK(capacity > 0, kind() << " channel '" << name << "': capacity must be positive");
  ADRT_CHECK(timeout_s > 0, kind() << " channel '" << name << "': timeout_s must be positive");
  ADRT_CHECK(!on_device || device >= 0, "ipc channel '" << name << "': device " << device
                                                        << " is not a CUDA device; the ipc channel moves device memory "
                                                           "(use a shm channel for host memory)");
#ifndef ASYNCDIFF_RT_WITH_CUDA
  if (device >= 0) ADRT_NO_CUDA(on_device ? "an ipc channel" : "a shm channel on a CUDA device");
#endif
  slot_stride_ = round_up(capacity, kPage);
  std::size_t total = kHeaderBytes + (on_device ? 0 : 2 * slot_stride_);
  const std::string who =
      std::string(kind()) + " channel '" + name + "' (peer rank " + std::to_string(peer) + ", set-up)";
  if (create) {
    region_ = ShmRegion::create(name, total);
    auto* h = static_cast<ChannelHeader*>(region_.data());
    h->layout_version = kLayoutVersion;
    h->capacity = capacity;
    h->creator_pid = static_cast<std::int32_t>(::getpid());
    h->storage = static_cast<std::uint32_t>(storage);
    header_ = h;
    if (device >= 0) setup_gpu_flags();
    if (on_device) setup_device_slots(who);  // before the magic: an opener finds the handle in place
    store_release(&h->magic, kMagic);
  } else {
    auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
    region_ = ShmRegion::open(name, total, timeout_s, peer_pid, who);
    auto* h = static_cast<ChannelHeader*>(region_.data());
    while (load_acquire(&h->magic) != kMagic) {
      ADRT_CHECK(Clock::now() < deadline, who << ": the peer created the region but never initialised it");
      ADRT_CHECK(process_alive(peer_pid), who << ": the peer (pid " << peer_pid << ") exited");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ADRT_CHECK(load_acquire(&h->failed.value) == 0, who << ": the peer marked the channel failed");
    ADRT_CHECK(h->layout_version == kLayoutVersion, kind() << " channel '" << name << "': layout version "
                                                           << h->layout_version << " != " << kLayoutVersion
                                                           << " (both sides must run the same asyncdiff_rt build)");
    ADRT_CHECK(h->storage == static_cast<std::uint32_t>(storage),
               who << ": the peer made a "
                   << (h->storage == static_cast<std::uint32_t>(SlotStorage::kHost) ? "shm" : "ipc")
                   << " channel, this side opens an " << kind() << " one (both sides must use the same transport)");
    ADRT_CHECK(h->capacity == capacity,
               kind() << " channel '" << name << "': capacity " << capacity << " != peer's " << h->capacity);
    header_ = h;
    if (device >= 0) setup_gpu_flags();
    if (on_device) setup_device_slots(who);  // last: nothing after it can fail (Note [ipc teardown])
    __atomic_store_n(&h->opener_pid, static_cast<std::int32_t>(::getpid()), __ATOMIC_RELEASE);
    region_.unlink();  // Note [shm names]
  }
  slots_ = on_device ? device_slots_.data() : static_cast<std::uint8_t*>(region_.data()) + kHeaderBytes;
}

void ShmChannel::setup_gpu_flags() {
#ifdef ASYNCDIFF_RT_WITH_CUDA
  driver_api();  // fail early, with the reason, when the driver lacks stream memory operations
  region_.register_cuda(device_);
  for (int p = 0; p < 2; ++p) {
    dev_full_[p] = reinterpret_cast<std::uintptr_t>(region_.device_pointer(full_word(p)));
    dev_stamp_[p] = reinterpret_cast<std::uintptr_t>(region_.device_pointer(stamp_word(p)));
    dev_done_[p] = reinterpret_cast<std::uintptr_t>(region_.device_pointer(&header_->done[p].value));
  }
#endif
}

void ShmChannel::setup_device_slots(const std::string& who) {
  ChannelHeader* h = header_;
  std::uint32_t* state = &h->import_state.value;
  if (creator_) {
    const std::size_t bytes = round_up(2 * slot_stride_, kDeviceGranularity);
    try {
      device_slots_.allocate(device_, bytes, h->ipc_handle, &h->slots_offset);
    } catch (const std::exception& e) {
      ADRT_CHECK(false, who << ": cannot export " << bytes << " bytes of device memory on cuda:" << device_ << ": "
                            << e.what());
    }
    h->slots_bytes = bytes;
    return;
  }
  std::uint32_t seen = 0;
  if (!compare_exchange(state, kImportNone, kImported, &seen)) {
    ADRT_CHECK(false, who << ": the peer closed the channel before this side opened it (import state " << seen << ")");
  }
  try {
    device_slots_.open(device_, h->ipc_handle, h->slots_offset);
  } catch (const std::exception& e) {
    store_release(state, kImportClosed);  // the creator need not wait for a mapping that never existed
    ADRT_CHECK(false, who << ": cannot open the peer's device slots through CUDA IPC on cuda:" << device_ << " ("
                          << e.what()
                          << "); CUDA IPC needs both processes on the same GPU or on GPUs with peer access (use "
                             "transport='shm' otherwise)");
  }
}

void ShmChannel::release_device_slots() noexcept {
  ChannelHeader* h = header_;
  if (!device_slots_.held() || h == nullptr) return;
  std::uint32_t* state = &h->import_state.value;
  if (!creator_) {
    device_slots_.release();  // the importer's mapping first, then tell the exporter
    store_release(state, kImportClosed);
    return;
  }
  std::uint32_t seen = 0;
  if (compare_exchange(state, kImportNone, kExporterClosed, &seen)) {
    device_slots_.release();  // never imported: no one else maps it
    return;
  }
  // Imported: wait for the importer to close its mapping, or to exit. A healthy peer closes its receives as its
  // transport closes; after a failure give it a short grace. Past it, leak rather than free memory still mapped.
  const double grace_s = failed() ? 2.0 : timeout_s_;
  auto deadline = Clock::now() + std::chrono::duration<double>(grace_s);
  for (;;) {
    if (load_acquire(state) == kImportClosed || !process_alive(peer_pid())) {
      device_slots_.release();
      return;
    }
    if (Clock::now() >= deadline) {
      device_slots_.leak();
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

ShmChannel::~ShmChannel() { close(); }

std::uint8_t* ShmChannel::slot(int parity) const { return slots_ + static_cast<std::size_t>(parity) * slot_stride_; }
std::uint32_t* ShmChannel::full_word(int parity) const { return &header_->full[parity].value; }
std::uint32_t* ShmChannel::stamp_word(int parity) const { return &header_->stamp[parity].value; }

std::size_t ShmChannel::packed_size(const std::vector<Part>& parts) {
  std::size_t off = 0;
  for (const auto& part : parts) off = round_up(off, kPartAlignment) + part.nbytes;
  return off;
}

bool ShmChannel::failed() const {
  return failed_local_ || (header_ != nullptr && load_acquire(&header_->failed.value) != 0);
}

int ShmChannel::peer_pid() const {
  if (header_ == nullptr) return 0;
  int pid = creator_ ? __atomic_load_n(&header_->opener_pid, __ATOMIC_ACQUIRE) : header_->creator_pid;
  return pid > 0 ? pid : known_peer_pid_;
}

bool ShmChannel::peer_opened() const {
  ChannelHeader* h = header_;
  return !creator_ || h == nullptr || __atomic_load_n(&h->opener_pid, __ATOMIC_ACQUIRE) != 0;
}

bool ShmChannel::peer_released() const {
  ChannelHeader* h = header_;
  if (!creator_ || h == nullptr) return true;
  if (storage_ == SlotStorage::kHost) return peer_opened();
  std::uint32_t state = load_acquire(&h->import_state.value);
  return state == kImportClosed || state == kExporterClosed;
}

bool ShmChannel::wait_peer_opened(double timeout_s) {
  auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  while (!peer_opened()) {
    if (failed() || !process_alive(peer_pid()) || Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

std::string ShmChannel::describe(std::uint64_t step) const {
  std::ostringstream os;
  os << kind() << " channel '" << name_ << "' (peer rank " << peer_ << ", step " << step << ")";
  return os.str();
}

void ShmChannel::mark_failed(const std::string& reason) {
  if (!failed_local_) {
    failed_local_ = true;
    failure_ = reason;
  }
  if (header_ != nullptr) store_release(&header_->failed.value, 1);
}

void ShmChannel::fail(const std::string& message) {
  mark_failed(message);
  throw std::runtime_error("asyncdiff_rt: " + message);
}

void ShmChannel::check_usable(Role role, std::uint64_t seq) {
  ADRT_CHECK(header_ != nullptr, kind() << " channel '" << name_ << "' is closed");
  if (failed_local_) {
    ADRT_CHECK(false, describe(seq) << ": channel failed earlier: " << failure_);
  }
  if (load_acquire(&header_->failed.value) != 0) {
    fail(describe(seq) + ": peer rank " + std::to_string(peer_) + " marked the channel failed");
  }
  if (role_ == Role::kNone) role_ = role;
  ADRT_CHECK(role_.load() == role, describe(seq) << ": a channel is directed; this side already used it to "
                                                 << (role_.load() == Role::kSender ? "send" : "receive"));
  if (has_seq_) {
    ADRT_CHECK(seq > last_seq_, describe(seq) << ": seq must increase (last was " << last_seq_ << ")");
  }
}

void ShmChannel::check_fits(const std::vector<Part>& parts, std::uint64_t seq) const {
  std::size_t need = packed_size(parts);
  ADRT_CHECK(need <= capacity_, describe(seq) << ": " << parts.size() << " parts need " << need
                                              << " bytes, the channel holds " << capacity_);
  for (const auto& part : parts) {
    ADRT_CHECK(part.ptr != 0 || part.nbytes == 0, describe(seq) << ": null pointer");
  }
}

bool ShmChannel::begin_op(Role role, std::uint64_t seq, const std::vector<Part>& parts, StreamHandle stream) {
  check_fits(parts, seq);
  const bool capturing = device_ >= 0 && stream_is_capturing(stream);
  if (capturing) {  // Note [shm handshake], capture caveat (1): no seq order check
    ADRT_CHECK(header_ != nullptr && !failed(), describe(seq) << ": channel closed or failed");
    if (role_ == Role::kNone) role_ = role;
  } else {
    check_usable(role, seq);
    has_seq_ = true;
    last_seq_ = seq;
  }
  return capturing;
}

void ShmChannel::await_flag(int parity, std::uint32_t value, std::uint64_t seq, const char* what, StreamHandle stream) {
  if (device_ < 0) {
    host_wait_flag(parity, value, seq, what);
    return;
  }
#ifdef ASYNCDIFF_RT_WITH_CUDA
  CHECK_CU(driver_api().stream_wait_value32(reinterpret_cast<CUstream>(stream), dev_full_[parity], value,
                                            CU_STREAM_WAIT_VALUE_EQ));
#else
  (void)stream;
#endif
}

// Note [release fence]: a `full` flag publishes a slot (sender: its bytes are written; receiver: its bytes are read
// and may be overwritten), so the flag must not become visible before the copies ahead of it on the stream. The v1
// cuStreamWriteValue32 fenced by default; for the _v2 entry point we load the documentation only says that the
// flag to drop the fence "is not supported in the v2 API", and offers CU_STREAM_MEM_OP_BARRIER. So the write goes in
// one batch behind an explicit system-wide barrier (the flags live in host memory, shm's slots too), whichever way
// that sentence is read. No failure was traced to its absence (the non-finite MPS runs of 2026-12-03 were the patch
// exchange's dtype order, Note [dtype order] in strategies/patches/exchange.py); the channel tier passes with it.
void ShmChannel::set_word(std::uint32_t* host, std::uintptr_t dev, std::uint32_t value, StreamHandle stream,
                          bool fence) {
  if (device_ < 0) {
    store_release(host, value);
    return;
  }
#ifdef ASYNCDIFF_RT_WITH_CUDA
  if (fence) {
    CUstreamBatchMemOpParams ops[2];
    std::memset(ops, 0, sizeof(ops));
    ops[0].memoryBarrier.operation = CU_STREAM_MEM_OP_BARRIER;
    ops[0].memoryBarrier.flags = CU_STREAM_MEMORY_BARRIER_TYPE_SYS;
    ops[1].writeValue.operation = CU_STREAM_MEM_OP_WRITE_VALUE_32;
    ops[1].writeValue.address = static_cast<CUdeviceptr>(dev);
    ops[1].writeValue.value = value;
    ops[1].writeValue.flags = CU_STREAM_WRITE_VALUE_DEFAULT;
    CHECK_CU(driver_api().stream_batch_mem_op(reinterpret_cast<CUstream>(stream), 2, ops, 0));
    return;
  }
  CHECK_CU(
      driver_api().stream_write_value32(reinterpret_cast<CUstream>(stream), dev, value, CU_STREAM_WRITE_VALUE_DEFAULT));
#else
  (void)dev;
  (void)stream;
  (void)fence;
#endif
}

void ShmChannel::copy_parts(const std::vector<Part>& parts, int parity, bool into_slot, StreamHandle stream) {
  std::uint8_t* base = slot(parity);
  std::size_t off = 0;
  for (const auto& part : parts) {
    off = round_up(off, kPartAlignment);
    if (part.nbytes) {
      void* user = reinterpret_cast<void*>(part.ptr);
      void* dst = into_slot ? base + off : user;
      const void* src = into_slot ? static_cast<const void*>(user) : base + off;
      if (device_ < 0) {
        std::memcpy(dst, src, part.nbytes);
      } else {
#ifdef ASYNCDIFF_RT_WITH_CUDA
        CHECK_CUDA(cudaMemcpyAsync(dst, src, part.nbytes, cudaMemcpyDefault, stream));
#endif
      }
    }
    off += part.nbytes;
  }
  (void)stream;
}

void ShmChannel::send(std::uint64_t seq, const std::vector<Part>& parts, StreamHandle stream) {
  const int p = static_cast<int>(seq & 1);
  DeviceGuard guard(device_);
  const bool capturing = begin_op(Role::kSender, seq, parts, stream);
  const std::uint32_t kind = device_ < 0 ? kSenderCpu : kSenderGpu;
  if (header_->sender_kind.value != kind) store_release(&header_->sender_kind.value, kind);
  await_flag(p, 0, seq, "for the receiver to free the slot (consume the previous message)", stream);
  copy_parts(parts, p, /*into_slot=*/true, stream);
  const auto s32 = static_cast<std::uint32_t>(seq);
  set_word(stamp_word(p), dev_stamp_[p], s32, stream);
  set_word(full_word(p), dev_full_[p], 1, stream, /*fence=*/true);
  set_word(&header_->done[0].value, dev_done_[0], s32, stream);
  if (device_ >= 0 && !capturing) record_done(seq, stream);
}

void ShmChannel::recv(std::uint64_t seq, const std::vector<Part>& parts, StreamHandle stream) {
  const int p = static_cast<int>(seq & 1);
  DeviceGuard guard(device_);
  const bool capturing = begin_op(Role::kReceiver, seq, parts, stream);
  await_flag(p, 1, seq, "for the sender's message", stream);
  if (device_ < 0 && load_acquire(&header_->sender_kind.value) == kSenderCpu) {
    std::uint32_t stamp = load_acquire(stamp_word(p));
    if (stamp != static_cast<std::uint32_t>(seq)) {
      fail(describe(seq) + ": out of step: peer rank " + std::to_string(peer_) + " sent step " + std::to_string(stamp) +
           " into slot " + std::to_string(p) + ", this side expects step " + std::to_string(seq));
    }
  }
  copy_parts(parts, p, /*into_slot=*/false, stream);
  set_word(full_word(p), dev_full_[p], 0, stream, /*fence=*/true);
  set_word(&header_->done[1].value, dev_done_[1], static_cast<std::uint32_t>(seq), stream);
  if (device_ >= 0 && !capturing) record_done(seq, stream);
}

void ShmChannel::close() noexcept {
  if (header_ == nullptr) return;
  bool drained = true;  // no copy of this side is still in flight (as far as the host can tell)
#ifdef ASYNCDIFF_RT_WITH_CUDA
  if (device_ >= 0 && !pending_.empty()) {
    // The slots must not be unmapped or freed under an in-flight DMA.
    bool released = false;
    try {
      if (!failed()) wait(pending_.back().first, timeout_s_);  // retires every event on success
    } catch (...) {
      released = true;  // wait marked the channel failed and released the stream
    }
    if (!pending_.empty()) {
      if (!released) release_gpu(5.0);
      try {
        drained = pending_.back().second->query();
      } catch (...) {
        drained = false;
      }
    }
    pending_.clear();
    spare_events_.clear();
  }
#endif
  if (storage_ == SlotStorage::kDevice) {
    if (drained) {
      release_device_slots();
    } else {
      device_slots_.leak();  // a copy may still touch it: leak rather than fault (Note [ipc teardown])
    }
  }
  slots_ = nullptr;
  header_ = nullptr;
  region_.close();
}

}  // namespace asyncdiff_rt
