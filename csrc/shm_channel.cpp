#include "shm_channel.h"

#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <sstream>
#include <thread>

#include "check.h"
#include "driver_api.h"

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace asyncdiff_rt {

namespace {

constexpr std::uint32_t kMagic = 0x54524441;  // "ADRT"
constexpr std::uint32_t kLayoutVersion = 1;
constexpr std::size_t kHeaderBytes = 4096;
constexpr std::size_t kPage = 4096;
constexpr std::uint32_t kSenderCpu = 1;
constexpr std::uint32_t kSenderGpu = 2;

std::size_t round_up(std::size_t v, std::size_t a) { return (v + a - 1) / a * a; }

// One word per cache line so the two sides never share a line they both write.
struct alignas(64) Word {
  std::uint32_t value;
};

using Clock = std::chrono::steady_clock;

std::uint32_t load_acquire(const std::uint32_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void store_release(std::uint32_t* p, std::uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

}  // namespace

struct ChannelHeader {
  std::uint32_t magic;  // written last by the creator (release)
  std::uint32_t layout_version;
  std::uint64_t capacity;
  std::int32_t creator_pid;
  std::int32_t opener_pid;
  Word failed;       // nonzero once either side marked the channel failed
  Word sender_kind;  // kSenderCpu / kSenderGpu, set by the sender before its first message
  Word full[2];      // Note [shm handshake]
  Word stamp[2];     // low 32 bits of the seq in each slot
  Word done[2];      // low 32 bits of the last seq whose op completed: [0] sender side, [1] receiver side
};
static_assert(sizeof(ChannelHeader) <= kHeaderBytes, "channel header must fit its page");

ShmChannel::ShmChannel(const std::string& name, std::size_t capacity, bool create, int device, int peer,
                       double timeout_s, int peer_pid)
    : name_(name),
      capacity_(capacity),
      device_(device),
      peer_(peer),
      known_peer_pid_(peer_pid),
      timeout_s_(timeout_s),
      creator_(create) {
  ADRT_CHECK(capacity > 0, "shm channel '" << name << "': capacity must be positive");
  ADRT_CHECK(timeout_s > 0, "shm channel '" << name << "': timeout_s must be positive");
#ifndef ASYNCDIFF_RT_WITH_CUDA
  if (device >= 0) ADRT_NO_CUDA("a shm channel on a CUDA device");
#endif
  slot_stride_ = round_up(capacity, kPage);
  std::size_t total = kHeaderBytes + 2 * slot_stride_;
  if (create) {
    region_ = ShmRegion::create(name, total);
    auto* h = static_cast<ChannelHeader*>(region_.data());
    h->layout_version = kLayoutVersion;
    h->capacity = capacity;
    h->creator_pid = static_cast<std::int32_t>(::getpid());
    store_release(&h->magic, kMagic);
    header_ = h;
  } else {
    auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
    const std::string who = "shm channel '" + name + "' (peer rank " + std::to_string(peer) + ", set-up)";
    region_ = ShmRegion::open(name, total, timeout_s, peer_pid, who);
    auto* h = static_cast<ChannelHeader*>(region_.data());
    while (load_acquire(&h->magic) != kMagic) {
      ADRT_CHECK(Clock::now() < deadline, who << ": the peer created the region but never initialised it");
      ADRT_CHECK(process_alive(peer_pid), who << ": the peer (pid " << peer_pid << ") exited");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ADRT_CHECK(load_acquire(&h->failed.value) == 0, who << ": the peer marked the channel failed");
    ADRT_CHECK(h->layout_version == kLayoutVersion,
               "shm channel '" << name << "': layout version " << h->layout_version << " != " << kLayoutVersion
                               << " (both sides must run the same asyncdiff_rt build)");
    ADRT_CHECK(h->capacity == capacity,
               "shm channel '" << name << "': capacity " << capacity << " != peer's " << h->capacity);
    __atomic_store_n(&h->opener_pid, static_cast<std::int32_t>(::getpid()), __ATOMIC_RELEASE);
    header_ = h;
    region_.unlink();  // Note [shm names]
  }
  if (device >= 0) {
#ifdef ASYNCDIFF_RT_WITH_CUDA
    driver_api();  // fail early, with the reason, when the driver lacks stream memory operations
    region_.register_cuda(device);
    for (int p = 0; p < 2; ++p) {
      dev_full_[p] = reinterpret_cast<std::uintptr_t>(region_.device_pointer(full_word(p)));
      dev_stamp_[p] = reinterpret_cast<std::uintptr_t>(region_.device_pointer(stamp_word(p)));
      dev_done_[p] = reinterpret_cast<std::uintptr_t>(region_.device_pointer(&header_->done[p].value));
    }
#endif
  }
}

ShmChannel::~ShmChannel() { close(); }

std::uint8_t* ShmChannel::slot(int parity) const {
  return static_cast<std::uint8_t*>(region_.data()) + kHeaderBytes + static_cast<std::size_t>(parity) * slot_stride_;
}
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
  os << "shm channel '" << name_ << "' (peer rank " << peer_ << ", step " << step << ")";
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
  ADRT_CHECK(header_ != nullptr, "shm channel '" << name_ << "' is closed");
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

void ShmChannel::check_peer(std::uint64_t step, const char* what) {
  if (load_acquire(&header_->failed.value) != 0) {
    fail(describe(step) + ": peer rank " + std::to_string(peer_) + " marked the channel failed while waiting " + what);
  }
  int pid = peer_pid();
  if (!process_alive(pid)) {
    fail(describe(step) + ": peer rank " + std::to_string(peer_) + " (pid " + std::to_string(pid) +
         ") exited while waiting " + what);
  }
}

void ShmChannel::host_wait_flag(int parity, std::uint32_t value, std::uint64_t step, const char* what) {
  std::uint32_t* word = full_word(parity);
  if (load_acquire(word) == value) return;
  auto start = Clock::now();
  auto deadline = start + std::chrono::duration<double>(timeout_s_);
  auto next_check = start;
  for (std::uint64_t i = 0;; ++i) {
    if (load_acquire(word) == value) return;
    if (i < 256) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      continue;
    }
    auto now = Clock::now();
    if (now >= next_check) {
      check_peer(step, what);
      if (now >= deadline) {
        std::ostringstream os;
        os << describe(step) << ": timed out after " << timeout_s_ << " s waiting " << what;
        fail(os.str());
      }
      next_check = now + std::chrono::milliseconds(20);
    }
    if (now - start < std::chrono::milliseconds(2)) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

void ShmChannel::record_done(std::uint64_t seq, StreamHandle stream) {
  std::unique_ptr<Event> ev;
  if (pending_.size() >= kMaxPending) {
    ev = std::move(pending_.front().second);
    pending_.pop_front();
  } else if (!spare_events_.empty()) {
    ev = std::move(spare_events_.back());
    spare_events_.pop_back();
  } else {
    ev = std::make_unique<Event>(device_);
  }
  ev->record(stream);
  pending_.emplace_back(seq, std::move(ev));
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

void ShmChannel::set_word(std::uint32_t* host, std::uintptr_t dev, std::uint32_t value, StreamHandle stream) {
  if (device_ < 0) {
    store_release(host, value);
    return;
  }
#ifdef ASYNCDIFF_RT_WITH_CUDA
  CHECK_CU(
      driver_api().stream_write_value32(reinterpret_cast<CUstream>(stream), dev, value, CU_STREAM_WRITE_VALUE_DEFAULT));
#else
  (void)dev;
  (void)stream;
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
  set_word(full_word(p), dev_full_[p], 1, stream);
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
  set_word(full_word(p), dev_full_[p], 0, stream);
  set_word(&header_->done[1].value, dev_done_[1], static_cast<std::uint32_t>(seq), stream);
  if (device_ >= 0 && !capturing) record_done(seq, stream);
}

void ShmChannel::release_gpu(double grace_s) {
#ifdef ASYNCDIFF_RT_WITH_CUDA
  if (device_ < 0 || header_ == nullptr || role_ == Role::kNone) return;
  // A blocked sender waits for full == 0, a blocked receiver for full == 1: keep writing what this side's
  // stream waits for until its last op completed (its own flag writes may re-block a later op).
  const std::uint32_t release_value = role_.load() == Role::kSender ? 0 : 1;
  auto deadline = Clock::now() + std::chrono::duration<double>(grace_s);
  for (;;) {
    for (int p = 0; p < 2; ++p) store_release(full_word(p), release_value);
    bool done = true;
    if (!pending_.empty()) {
      cudaError_t err = cudaEventQuery(pending_.back().second->handle());
      done = err != cudaErrorNotReady;
      if (err != cudaSuccess && err != cudaErrorNotReady) cudaGetLastError();
    }
    if (done || Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
#else
  (void)grace_s;
#endif
}

void ShmChannel::wait(std::uint64_t seq, double timeout_s) {
  ADRT_CHECK(header_ != nullptr, "shm channel '" << name_ << "' is closed");
  if (failed_local_) ADRT_CHECK(false, describe(seq) << ": channel failed earlier: " << failure_);
  if (device_ < 0) {
    if (load_acquire(&header_->failed.value) != 0) {
      fail(describe(seq) + ": peer rank " + std::to_string(peer_) + " marked the channel failed");
    }
    return;
  }
#ifdef ASYNCDIFF_RT_WITH_CUDA
  Event* ev = nullptr;
  for (auto& entry : pending_) {
    if (entry.first == seq) ev = entry.second.get();
  }
  if (ev == nullptr) {
    // Older than the events kept (completed long ago), issued under graph capture (no event), or never issued:
    // nothing this side can wait for.
    return;
  }
  DeviceGuard guard(device_);
  auto start = Clock::now();
  auto deadline = start + std::chrono::duration<double>(timeout_s);
  auto next_check = start;
  const char* what = role_.load() == Role::kSender ? "for the send to complete (receiver to free the slot)"
                                                   : "for the sender's message";
  for (;;) {
    if (ev->query()) break;
    auto now = Clock::now();
    if (now >= next_check) {
      bool peer_failed = load_acquire(&header_->failed.value) != 0;
      int pid = peer_pid();
      bool peer_dead = !process_alive(pid);
      if (peer_failed || peer_dead || now >= deadline) {
        std::ostringstream os;
        os << describe(seq) << ": ";
        if (peer_failed) {
          os << "peer rank " << peer_ << " marked the channel failed";
        } else if (peer_dead) {
          os << "peer rank " << peer_ << " (pid " << pid << ") exited";
        } else {
          os << "timed out after " << timeout_s << " s";
        }
        os << " while waiting " << what << "; the stream was released and the data of this step is invalid";
        mark_failed(os.str());
        release_gpu(5.0);
        throw std::runtime_error("asyncdiff_rt: " + os.str());
      }
      next_check = now + std::chrono::milliseconds(20);
    }
    if (now - start < std::chrono::milliseconds(1)) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  // Retire completed events.
  while (!pending_.empty() && pending_.front().first <= seq) {
    spare_events_.push_back(std::move(pending_.front().second));
    pending_.pop_front();
  }
#else
  (void)timeout_s;
#endif
}

bool ShmChannel::completed(std::uint64_t seq) const {
  ChannelHeader* h = header_;
  Role role = role_.load();
  if (h == nullptr || role == Role::kNone) return true;
  std::uint32_t done = load_acquire(&h->done[role == Role::kSender ? 0 : 1].value);
  // 32-bit words wrap: "done >= seq" within half the range.
  return static_cast<std::int32_t>(done - static_cast<std::uint32_t>(seq)) >= 0;
}

std::string ShmChannel::peer_problem() const {
  ChannelHeader* h = header_;
  if (h == nullptr) return "";
  if (load_acquire(&h->failed.value) != 0) {
    return "peer rank " + std::to_string(peer_) + " or this side marked the channel failed";
  }
  int pid = peer_pid();
  if (!process_alive(pid)) return "peer rank " + std::to_string(peer_) + " (pid " + std::to_string(pid) + ") exited";
  return "";
}

void ShmChannel::release_from_host() {
  ChannelHeader* h = header_;
  if (h == nullptr) return;
  store_release(&h->failed.value, 1);
  Role role = role_.load();
  if (device_ < 0 || role == Role::kNone) return;
  const std::uint32_t release_value = role == Role::kSender ? 0 : 1;
  for (int p = 0; p < 2; ++p) store_release(&h->full[p].value, release_value);
}

void ShmChannel::abort(const std::string& reason) {
  if (header_ == nullptr) return;
  mark_failed(reason);
  release_gpu(1.0);
  if (creator_) region_.unlink();
}

void ShmChannel::close() noexcept {
  if (header_ == nullptr) return;
#ifdef ASYNCDIFF_RT_WITH_CUDA
  if (device_ >= 0 && !pending_.empty()) {
    // The slots must not be unmapped under an in-flight DMA.
    try {
      if (!failed()) {
        wait(pending_.back().first, timeout_s_);
      } else {
        release_gpu(5.0);
      }
    } catch (...) {
    }
    pending_.clear();
    spare_events_.clear();
  }
#endif
  header_ = nullptr;
  region_.close();
}

}  // namespace asyncdiff_rt
