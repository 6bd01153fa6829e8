#include "nccl_comm.h"

#include <chrono>
#include <sstream>
#include <thread>

#include "check.h"
#include "driver_api.h"

#ifdef ASYNCDIFF_RT_WITH_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace asyncdiff_rt {

#ifdef ASYNCDIFF_RT_WITH_NCCL

namespace {
using Clock = std::chrono::steady_clock;
ncclComm_t as_comm(void* c) { return static_cast<ncclComm_t>(c); }
// " (step 3)"; nothing for a negative step: set-up (its `what` says so) or a call whose step only the caller
// knows (the Python transport names it), never a made-up "step -1".
std::string step_note(std::int64_t step) { return step >= 0 ? " (step " + std::to_string(step) + ")" : ""; }
}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId id;
  CHECK_NCCL(ncclGetUniqueId(&id));
  return std::string(id.internal, sizeof(id.internal));
}

NcclComm::NcclComm(const std::string& unique_id, int world, int rank, int device, double timeout_s)
    : world_(world), rank_(rank), device_(device), timeout_s_(timeout_s) {
  ADRT_CHECK(unique_id.size() == NCCL_UNIQUE_ID_BYTES,
             "NCCL unique id must have " << NCCL_UNIQUE_ID_BYTES << " bytes, got " << unique_id.size());
  ADRT_CHECK(world >= 1 && rank >= 0 && rank < world, "NCCL rank " << rank << " out of range for world " << world);
  ADRT_CHECK(device >= 0, "NCCL needs a CUDA device index, got " << device);
  ADRT_CHECK(timeout_s > 0, "timeout_s must be positive");
  DeviceGuard guard(device);
  void* host = nullptr;
  CHECK_CUDA(cudaHostAlloc(&host, 64, cudaHostAllocMapped | cudaHostAllocPortable));
  done_host_ = static_cast<std::uint32_t*>(host);
  *done_host_ = 0;
  void* dev = nullptr;
  CHECK_CUDA(cudaHostGetDevicePointer(&dev, host, 0));
  done_dev_ = reinterpret_cast<std::uintptr_t>(dev);
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, world, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    cudaFreeHost(done_host_);
    CHECK_NCCL(r);
  }
  comm_ = comm;
  try {
    settle("set-up (ncclCommInitRankConfig, waiting for every rank to join)", timeout_s, -1);
  } catch (...) {
    cudaFreeHost(done_host_);
    done_host_ = nullptr;
    throw;
  }
}

NcclComm::~NcclComm() {
  // Not destroyed explicitly: abort rather than finalize, which may wait for peers (at interpreter exit, say).
  abort("communicator dropped without destroy()");
  if (done_host_ != nullptr) cudaFreeHost(done_host_);
}

void NcclComm::require_valid(const char* what) const {
  ADRT_CHECK(comm_.load() != nullptr, "NCCL " << what << " on a communicator that was "
                                              << (abort_reason_.empty() ? "destroyed" : "aborted: " + abort_reason_));
}

void NcclComm::settle(const char* what, double timeout_s, std::int64_t step) {
  auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      require_valid(what);
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(as_comm(comm_), &state);
      if (r != ncclSuccess) state = r;
      if (state == ncclSuccess) return;
      std::ostringstream os;
      if (state != ncclInProgress) {
        os << "NCCL " << what << " failed on rank " << rank_ << step_note(step) << ": " << ncclGetErrorString(state);
        if (const char* last = ncclGetLastError(as_comm(comm_))) {
          if (*last) os << " [" << last << "]";
        }
      } else if (Clock::now() >= deadline) {
        os << "NCCL " << what << " on rank " << rank_ << " of " << world_ << " did not complete within " << timeout_s
           << " s" << step_note(step) << "; a peer died or stalled; the communicator was aborted";
      }
      if (!os.str().empty()) {
        abort_locked(os.str());
        throw std::runtime_error("asyncdiff_rt: " + os.str());
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void NcclComm::sendrecv(const std::vector<PeerBuffer>& sends, const std::vector<PeerBuffer>& recvs,
                        StreamHandle stream) {
  for (const auto& b : sends) ADRT_CHECK(b.peer >= 0 && b.peer < world_, "NCCL send to invalid peer " << b.peer);
  for (const auto& b : recvs) ADRT_CHECK(b.peer >= 0 && b.peer < world_, "NCCL recv from invalid peer " << b.peer);
  DeviceGuard guard(device_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    require_valid("sendrecv");
    ncclComm_t comm = as_comm(comm_);
    CHECK_NCCL(ncclGroupStart());
    for (const auto& b : sends) {
      CHECK_NCCL(ncclSend(reinterpret_cast<const void*>(b.ptr), b.nbytes, ncclUint8, b.peer, comm, stream));
    }
    for (const auto& b : recvs) {
      CHECK_NCCL(ncclRecv(reinterpret_cast<void*>(b.ptr), b.nbytes, ncclUint8, b.peer, comm, stream));
    }
    CHECK_NCCL(ncclGroupEnd());
  }
  settle("grouped send/recv", timeout_s_, -1);
}

void NcclComm::broadcast(std::uintptr_t ptr, std::size_t nbytes, int root, StreamHandle stream) {
  ADRT_CHECK(root >= 0 && root < world_, "NCCL broadcast from invalid root " << root);
  DeviceGuard guard(device_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    require_valid("broadcast");
    void* p = reinterpret_cast<void*>(ptr);
    CHECK_NCCL(ncclBroadcast(p, p, nbytes, ncclUint8, root, as_comm(comm_), stream));
  }
  settle("broadcast", timeout_s_, -1);
}

void NcclComm::check_async(std::int64_t step) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    require_valid("check");
    ncclResult_t state = ncclSuccess;
    CHECK_NCCL(ncclCommGetAsyncError(as_comm(comm_), &state));
    if (state == ncclSuccess || state == ncclInProgress) return;
  }
  settle("asynchronous operation", timeout_s_, step);  // reports the error and aborts
}

void NcclComm::mark_done(StreamHandle stream, std::uint64_t seq) {
  DeviceGuard guard(device_);
  CHECK_CU(driver_api().stream_write_value32(reinterpret_cast<CUstream>(stream), done_dev_,
                                             static_cast<std::uint32_t>(seq), CU_STREAM_WRITE_VALUE_DEFAULT));
}

bool NcclComm::completed(std::uint64_t seq) const {
  if (done_host_ == nullptr) return true;
  std::uint32_t done = __atomic_load_n(done_host_, __ATOMIC_ACQUIRE);
  return static_cast<std::int32_t>(done - static_cast<std::uint32_t>(seq)) >= 0;
}

void NcclComm::wait(StreamHandle stream, double timeout_s, std::int64_t step) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    require_valid("wait");
  }
  DeviceGuard guard(device_);
  auto start = Clock::now();
  auto deadline = start + std::chrono::duration<double>(timeout_s);
  for (;;) {
    cudaError_t err = cudaStreamQuery(stream);
    if (err == cudaSuccess) return;
    if (err != cudaErrorNotReady) CHECK_CUDA(err);
    check_async(step);
    if (Clock::now() >= deadline) {
      std::ostringstream os;
      os << "NCCL operations on rank " << rank_ << " of " << world_ << " did not complete within " << timeout_s << " s"
         << step_note(step) << "; a peer died or stalled; the communicator was aborted";
      abort(os.str());
      throw std::runtime_error("asyncdiff_rt: " + os.str());
    }
    if (Clock::now() - start < std::chrono::milliseconds(1)) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
}

void NcclComm::abort(const std::string& reason) noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  abort_locked(reason);
}

void NcclComm::abort_locked(const std::string& reason) noexcept {
  void* comm = comm_.exchange(nullptr);
  if (comm == nullptr) return;
  if (abort_reason_.empty()) abort_reason_ = reason;
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  ncclCommAbort(as_comm(comm));
  if (prev >= 0) cudaSetDevice(prev);
}

void NcclComm::destroy() {
  DeviceGuard guard(device_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_.load() == nullptr) return;
    CHECK_NCCL(ncclCommFinalize(as_comm(comm_)));
  }
  settle("finalize", timeout_s_, -1);
  std::lock_guard<std::mutex> lock(mu_);
  void* comm = comm_.exchange(nullptr);
  if (comm == nullptr) return;
  abort_reason_.clear();
  CHECK_NCCL(ncclCommDestroy(as_comm(comm)));
}

#else  // !ASYNCDIFF_RT_WITH_NCCL

std::string nccl_unique_id() { ADRT_NO_CUDA("NCCL"); }
NcclComm::NcclComm(const std::string&, int world, int rank, int device, double timeout_s)
    : world_(world), rank_(rank), device_(device), timeout_s_(timeout_s) {
  ADRT_NO_CUDA("NcclComm");
}
NcclComm::~NcclComm() = default;
void NcclComm::sendrecv(const std::vector<PeerBuffer>&, const std::vector<PeerBuffer>&, StreamHandle) {
  ADRT_NO_CUDA("NcclComm.sendrecv");
}
void NcclComm::broadcast(std::uintptr_t, std::size_t, int, StreamHandle) { ADRT_NO_CUDA("NcclComm.broadcast"); }
void NcclComm::wait(StreamHandle, double, std::int64_t) { ADRT_NO_CUDA("NcclComm.wait"); }
void NcclComm::check_async(std::int64_t) { ADRT_NO_CUDA("NcclComm.check_async"); }
void NcclComm::abort(const std::string&) noexcept {}
void NcclComm::abort_locked(const std::string&) noexcept {}
void NcclComm::mark_done(StreamHandle, std::uint64_t) { ADRT_NO_CUDA("NcclComm.mark_done"); }
bool NcclComm::completed(std::uint64_t) const { return true; }
void NcclComm::destroy() {}
void NcclComm::settle(const char*, double, std::int64_t) {}
void NcclComm::require_valid(const char*) const {}

#endif

}  // namespace asyncdiff_rt
