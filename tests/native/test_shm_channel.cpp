// The CPU shm channel between two forked processes: data across many seqs (both slot parities, several parts,
// odd sizes), the receiver running late and early, a receiver that times out naming peer and step, a dead
// peer noticed before the timeout, a sender that grows several generations before its receiver opens any, a peer
// that dies at set-up, misuse errors.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "shm_channel.h"
#include "test_util.h"

using asyncdiff_rt::Part;
using asyncdiff_rt::ShmChannel;

namespace {

std::string unique_name(const char* tag) { return "adrt_test_" + std::string(tag) + "_" + std::to_string(getpid()); }

std::uint8_t value_at(std::uint64_t seq, int part, std::size_t i) {
  return static_cast<std::uint8_t>(seq * 31 + part * 7 + i * 13);
}

const std::vector<std::size_t> kSizes = {1, 1000, 4096, 3, 65536 + 17};

// Runs `child` in a forked process; returns its exit status (0 = passed).
template <class F>
pid_t fork_child(F child) {
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    int rc = 1;
    try {
      rc = child();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child: %s\n", e.what());
    }
    std::_Exit(rc);
  }
  EXPECT(pid > 0);
  return pid;
}

int join(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

void test_data_many_seqs() {
  const std::string name = unique_name("data");
  const std::size_t capacity = ShmChannel::packed_size([] {
    std::vector<Part> p;
    for (auto n : kSizes) p.push_back(Part{1, n});
    return p;
  }());
  const int kSteps = 200;
  pid_t child = fork_child([&] {
    ShmChannel ch(name, capacity, /*create=*/false, -1, /*peer=*/0, 10.0);
    std::vector<std::vector<std::uint8_t>> bufs;
    for (auto n : kSizes) bufs.emplace_back(n, 0xEE);
    for (int s = 1; s <= kSteps; ++s) {
      if (s % 50 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a late receiver
      for (auto& b : bufs) std::fill(b.begin(), b.end(), 0xEE);                     // poison
      std::vector<Part> parts;
      for (auto& b : bufs) parts.push_back(Part{reinterpret_cast<std::uintptr_t>(b.data()), b.size()});
      ch.recv(static_cast<std::uint64_t>(s), parts);
      for (std::size_t k = 0; k < bufs.size(); ++k) {
        for (std::size_t i = 0; i < bufs[k].size(); ++i) {
          if (bufs[k][i] != value_at(s, static_cast<int>(k), i)) {
            std::fprintf(stderr, "mismatch seq %d part %zu byte %zu\n", s, k, i);
            return 1;
          }
        }
      }
    }
    ch.close();
    return 0;
  });
  ShmChannel ch(name, capacity, /*create=*/true, -1, /*peer=*/1, 10.0);
  std::vector<std::vector<std::uint8_t>> bufs;
  for (auto n : kSizes) bufs.emplace_back(n);
  for (int s = 1; s <= kSteps; ++s) {
    if (s % 70 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a late sender
    std::vector<Part> parts;
    for (std::size_t k = 0; k < bufs.size(); ++k) {
      for (std::size_t i = 0; i < bufs[k].size(); ++i) bufs[k][i] = value_at(s, static_cast<int>(k), i);
      parts.push_back(Part{reinterpret_cast<std::uintptr_t>(bufs[k].data()), bufs[k].size()});
    }
    ch.send(static_cast<std::uint64_t>(s), parts);
  }
  EXPECT(join(child) == 0);
  ch.close();
  std::printf("data_many_seqs ok\n");
}

void test_timeout_names_peer_and_step() {
  const std::string name = unique_name("timeout");
  pid_t child = fork_child([&] {
    ShmChannel ch(name, 64, false, -1, 0, 10.0);
    std::uint64_t v = 42;
    ch.send(1, {Part{reinterpret_cast<std::uintptr_t>(&v), sizeof(v)}});
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // alive but silent
    return 0;
  });
  ShmChannel ch(name, 64, true, -1, 3, 0.5);
  std::uint64_t v = 0;
  ch.recv(1, {Part{reinterpret_cast<std::uintptr_t>(&v), sizeof(v)}});
  EXPECT(v == 42);
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROWS_WITH(ch.recv(2, {Part{reinterpret_cast<std::uintptr_t>(&v), sizeof(v)}}), "peer rank 3", "step 2",
                     "timed out");
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT(dt >= 0.4 && dt < 1.5);
  EXPECT(ch.failed());
  EXPECT_THROWS_WITH(ch.recv(3, {}), "failed earlier");
  EXPECT(join(child) == 0);
  std::printf("timeout ok (%.2f s)\n", dt);
}

void test_dead_peer() {
  const std::string name = unique_name("dead");
  pid_t child = fork_child([&] {
    ShmChannel ch(name, 64, false, -1, 0, 10.0);
    std::_Exit(0);  // dies without sending
    return 0;
  });
  ShmChannel ch(name, 64, true, -1, 1, 30.0);
  std::uint64_t v = 0;
  // Make sure the child has opened before it can be seen dead.
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_THROWS_WITH(ch.recv(1, {Part{reinterpret_cast<std::uintptr_t>(&v), sizeof(v)}}), "peer rank 1", "step 1",
                     "exited");
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT(dt < 5.0);
  EXPECT(join(child) == 0);
  std::printf("dead peer ok (%.2f s)\n", dt);
}

void test_abort_reaches_peer() {
  const std::string name = unique_name("abort");
  pid_t child = fork_child([&] {
    ShmChannel ch(name, 64, false, -1, 0, 10.0);
    ch.abort("test abort");
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    return 0;
  });
  ShmChannel ch(name, 64, true, -1, 1, 30.0);
  std::uint64_t v = 0;
  EXPECT_THROWS_WITH(ch.recv(4, {Part{reinterpret_cast<std::uintptr_t>(&v), sizeof(v)}}), "peer rank 1", "step 4",
                     "failed");
  EXPECT(join(child) == 0);
  std::printf("abort ok\n");
}

// Note [shm generations]: the sender grows its channel three times (one message per generation) before the
// receiver opens the first; it keeps every generation it grew out of until the receiver has opened it.
void test_sender_grows_before_receiver_opens() {
  const std::string base = unique_name("grow");
  const std::vector<std::size_t> caps = {64, 8192, 70000, 300000};
  auto gen_name = [&](std::size_t g) { return base + "_g" + std::to_string(g); };
  pid_t child = fork_child([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the receiver runs behind
    for (std::size_t g = 0; g < caps.size(); ++g) {
      ShmChannel ch(gen_name(g), caps[g], /*create=*/false, -1, /*peer=*/0, 5.0, getppid());
      std::vector<std::uint8_t> buf(caps[g]);
      ch.recv(g + 1, {Part{reinterpret_cast<std::uintptr_t>(buf.data()), buf.size()}});
      for (std::size_t i = 0; i < buf.size(); ++i) {
        if (buf[i] != value_at(g + 1, 0, i)) return 1;
      }
    }
    return 0;
  });
  std::vector<std::unique_ptr<ShmChannel>> retired;
  for (std::size_t g = 0; g < caps.size(); ++g) {
    auto ch = std::make_unique<ShmChannel>(gen_name(g), caps[g], /*create=*/true, -1, /*peer=*/1, 5.0, child);
    std::vector<std::uint8_t> msg(caps[g]);
    for (std::size_t i = 0; i < msg.size(); ++i) msg[i] = value_at(g + 1, 0, i);
    ch->send(g + 1, {Part{reinterpret_cast<std::uintptr_t>(msg.data()), msg.size()}});  // a free slot: no wait
    EXPECT(!ch->peer_opened());
    retired.push_back(std::move(ch));
  }
  for (auto& ch : retired) {
    EXPECT(ch->wait_peer_opened(5.0));
    ch->close();
  }
  EXPECT(join(child) == 0);
  for (std::size_t g = 0; g < caps.size(); ++g) EXPECT(access(("/dev/shm/" + gen_name(g)).c_str(), F_OK) != 0);
  std::printf("sender grows before the receiver opens ok\n");
}

// A creator whose receiver died before opening: wait_peer_opened returns at once (known pid), abort unlinks;
// an opener whose creator died before creating fails at once naming the set-up.
void test_dead_peer_at_set_up() {
  const std::string name = unique_name("deadsetup");
  pid_t child = fork_child([] { return 0; });
  EXPECT(join(child) == 0);
  ShmChannel ch(name, 64, true, -1, 1, 5.0, child);
  auto t0 = std::chrono::steady_clock::now();
  EXPECT(!ch.wait_peer_opened(5.0));
  EXPECT(!ch.peer_problem().empty());
  ch.abort("peer died");
  EXPECT(access(("/dev/shm/" + name).c_str(), F_OK) != 0);
  EXPECT_THROWS_WITH(ShmChannel(unique_name("deadcreator"), 64, false, -1, 4, 5.0, child), "peer rank 4", "set-up",
                     "exited");
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT(dt < 1.0);
  std::printf("dead peer at set-up ok (%.2f s)\n", dt);
}

void test_misuse() {
  const std::string name = unique_name("misuse");
  ShmChannel a(name, 300, true, -1, 1, 2.0);
  ShmChannel b(name, 300, false, -1, 0, 2.0);  // same process: both ends
  std::vector<std::uint8_t> big(301), small(8, 1), out(8);
  EXPECT_THROWS_WITH(a.send(0, {Part{reinterpret_cast<std::uintptr_t>(big.data()), big.size()}}), "need 301 bytes",
                     "holds 300");
  // two parts: 8 bytes at 0, 8 bytes at 256 -> 264 <= 300
  std::vector<Part> two = {Part{reinterpret_cast<std::uintptr_t>(small.data()), 8},
                           Part{reinterpret_cast<std::uintptr_t>(small.data()), 8}};
  EXPECT(ShmChannel::packed_size(two) == 264);
  a.send(5, two);
  EXPECT_THROWS_WITH(a.send(5, two), "seq must increase");
  EXPECT_THROWS_WITH(a.recv(6, two), "directed");
  // Out of step: the receiver expects 7 but the sender wrote 5 into slot 1.
  EXPECT_THROWS_WITH(b.recv(7, {Part{reinterpret_cast<std::uintptr_t>(out.data()), 8}}), "out of step", "step 5");
  EXPECT_THROWS_WITH(ShmChannel(unique_name("nobody"), 64, false, -1, 9, 0.2), "timed out", "create");
  std::printf("misuse ok\n");
}

}  // namespace

int main() {
  test_data_many_seqs();
  test_timeout_names_peer_and_step();
  test_dead_peer();
  test_abort_reaches_peer();
  test_sender_grows_before_receiver_opens();
  test_dead_peer_at_set_up();
  test_misuse();
  std::printf("ok\n");
  return 0;
}
