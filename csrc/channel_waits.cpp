// The waits and the failure handling every channel shares (csrc/shm_channel.h): host waits on the flag words, the
// GPU completion wait with its timeout, releasing a blocked stream from the host, and the thread-safe reads a
// watchdog uses.
#include <sched.h>

#include <chrono>
#include <sstream>
#include <thread>

#include "channel_header.h"
#include "check.h"
#include "shm_channel.h"

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace asyncdiff_rt {

using namespace channel_detail;

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
  ADRT_CHECK(header_ != nullptr, kind() << " channel '" << name_ << "' is closed");
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

}  // namespace asyncdiff_rt
