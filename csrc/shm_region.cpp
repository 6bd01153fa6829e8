#include "shm_region.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <thread>
#include <utility>

#include "check.h"
#include "streams.h"

#ifdef ASYNCDIFF_RT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace asyncdiff_rt {

bool process_alive(int pid) {
  if (pid <= 0) return true;  // unknown yet
  if (::kill(pid, 0) < 0 && errno == ESRCH) return false;
  // A child that exited but was not reaped yet still answers kill(): look at its state.
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  std::ifstream f(path);
  if (!f) return true;  // no procfs: trust kill()
  std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto close_paren = stat.rfind(')');
  if (close_paren == std::string::npos || close_paren + 2 >= stat.size()) return true;
  char state = stat[close_paren + 2];
  return state != 'Z' && state != 'X';
}

std::string shm_posix_name(const std::string& name) {
  std::string n = name.empty() || name[0] != '/' ? "/" + name : name;
  ADRT_CHECK(n.size() > 1 && n.size() < 250, "shm name '" << name << "' must have 1..248 characters");
  ADRT_CHECK(n.find('/', 1) == std::string::npos, "shm name '" << name << "' must not contain '/' after the first");
  return n;
}

ShmRegion ShmRegion::create(const std::string& name, std::size_t size) {
  ADRT_CHECK(size > 0, "shm region '" << name << "' needs a positive size");
  ShmRegion r;
  r.name_ = shm_posix_name(name);
  ::shm_unlink(r.name_.c_str());  // a stale region of a crashed run with the same name
  int fd = ::shm_open(r.name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  CHECK_ERRNO(fd, "shm_open(create) of '" << r.name_ << "'");
  r.owner_ = true;
  if (::ftruncate(fd, static_cast<off_t>(size)) < 0) {
    int e = errno;
    ::close(fd);
    ::shm_unlink(r.name_.c_str());
    errno = e;
    CHECK_ERRNO(-1, "ftruncate of '" << r.name_ << "' to " << size << " bytes (is /dev/shm large enough?)");
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    ::shm_unlink(r.name_.c_str());
    errno = e;
    CHECK_ERRNO(-1, "mmap of '" << r.name_ << "' (" << size << " bytes)");
  }
  r.data_ = p;
  r.size_ = size;
  return r;
}

ShmRegion ShmRegion::open(const std::string& name, std::size_t size, double timeout_s, int owner_pid,
                          const std::string& who) {
  ShmRegion r;
  r.name_ = shm_posix_name(name);
  const std::string prefix = who.empty() ? "shm region '" + r.name_ + "'" : who;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  int fd = -1;
  for (;;) {
    fd = ::shm_open(r.name_.c_str(), O_RDWR, 0600);
    if (fd >= 0) {
      struct stat st{};
      CHECK_ERRNO(::fstat(fd, &st), "fstat of '" << r.name_ << "'");
      if (static_cast<std::size_t>(st.st_size) == size) break;
      ::close(fd);
      fd = -1;
      // Size 0: the owner has not sized it yet. Any other size: a mismatch, unless a stale region is
      // about to be replaced; report it only at the deadline.
      if (std::chrono::steady_clock::now() > deadline) {
        ADRT_CHECK(false, prefix << ": region '" << r.name_ << "' has " << st.st_size << " bytes, expected " << size
                                 << " (both sides must pass the same capacity)");
      }
    } else if (errno != ENOENT) {
      CHECK_ERRNO(-1, "shm_open(open) of '" << r.name_ << "'");
    }
    ADRT_CHECK(std::chrono::steady_clock::now() < deadline, prefix << ": timed out after " << timeout_s
                                                                   << " s waiting for the peer to create shm region '"
                                                                   << r.name_ << "'");
    ADRT_CHECK(process_alive(owner_pid),
               prefix << ": the peer (pid " << owner_pid << ") exited before creating shm region '" << r.name_ << "'");
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    errno = e;
    CHECK_ERRNO(-1, "mmap of '" << r.name_ << "' (" << size << " bytes)");
  }
  r.data_ = p;
  r.size_ = size;
  return r;
}

ShmRegion::~ShmRegion() { close(); }

ShmRegion::ShmRegion(ShmRegion&& o) noexcept { *this = std::move(o); }

ShmRegion& ShmRegion::operator=(ShmRegion&& o) noexcept {
  if (this != &o) {
    close();
    name_ = std::move(o.name_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    owner_ = std::exchange(o.owner_, false);
    unlinked_ = std::exchange(o.unlinked_, true);
    registered_device_ = std::exchange(o.registered_device_, -1);
  }
  return *this;
}

void ShmRegion::unlink() {
  if (!unlinked_ && !name_.empty()) {
    ::shm_unlink(name_.c_str());  // ENOENT when the other side already did: fine
    unlinked_ = true;
  }
}

void ShmRegion::register_cuda(int device) {
#ifdef ASYNCDIFF_RT_WITH_CUDA
  if (registered_device_ >= 0) return;
  ADRT_CHECK(data_ != nullptr, "register_cuda on a closed shm region");
  DeviceGuard guard(device);
  CHECK_CUDA(cudaHostRegister(data_, size_, cudaHostRegisterMapped | cudaHostRegisterPortable));
  registered_device_ = device;
#else
  (void)device;
  ADRT_NO_CUDA("page-locking shared memory");
#endif
}

void* ShmRegion::device_pointer(void* host_ptr) const {
#ifdef ASYNCDIFF_RT_WITH_CUDA
  ADRT_CHECK(registered_device_ >= 0, "device_pointer of an unregistered shm region");
  DeviceGuard guard(registered_device_);
  void* dptr = nullptr;
  CHECK_CUDA(cudaHostGetDevicePointer(&dptr, host_ptr, 0));
  return dptr;
#else
  (void)host_ptr;
  ADRT_NO_CUDA("device_pointer");
#endif
}

void ShmRegion::close() noexcept {
#ifdef ASYNCDIFF_RT_WITH_CUDA
  if (registered_device_ >= 0 && data_ != nullptr) {
    int prev = -1;
    if (cudaGetDevice(&prev) == cudaSuccess) {
      cudaSetDevice(registered_device_);
      cudaHostUnregister(data_);
      cudaSetDevice(prev);
    }
    registered_device_ = -1;
  }
#endif
  if (data_ != nullptr) {
    ::munmap(data_, size_);
    data_ = nullptr;
  }
  if (owner_) unlink();
}

}  // namespace asyncdiff_rt
