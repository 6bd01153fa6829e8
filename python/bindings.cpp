// pybind11 bindings: the module asyncdiff_rt._C. Tensors cross as (data_ptr, nbytes) tuples, streams as the
// integer value of a cudaStream_t (torch.cuda.Stream.cuda_stream; 0 = the legacy default stream). Every call
// that can block releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "nccl_comm.h"
#include "shm_channel.h"
#include "streams.h"
#include "version.h"

namespace py = pybind11;
using namespace asyncdiff_rt;

namespace {

std::vector<Part> to_parts(const std::vector<std::tuple<std::uintptr_t, std::size_t>>& parts) {
  std::vector<Part> out;
  out.reserve(parts.size());
  for (const auto& [ptr, nbytes] : parts) out.push_back(Part{ptr, nbytes});
  return out;
}

std::vector<PeerBuffer> to_peer_buffers(const std::vector<std::tuple<int, std::uintptr_t, std::size_t>>& bufs) {
  std::vector<PeerBuffer> out;
  out.reserve(bufs.size());
  for (const auto& [peer, ptr, nbytes] : bufs) out.push_back(PeerBuffer{peer, ptr, nbytes});
  return out;
}

py::dict build_info_dict() {
  BuildInfo i = build_info();
  py::dict d;
  d["version"] = i.version;
  d["with_cuda"] = i.with_cuda;
  d["with_nccl"] = i.with_nccl;
  d["cuda_arch"] = i.cuda_arch;
  d["cuda_runtime_compiled"] = i.cuda_runtime_compiled;
  d["cuda_runtime_version"] = i.cuda_runtime_version;
  d["cuda_driver_version"] = i.cuda_driver_version;
  d["device_count"] = i.device_count;
  d["nccl_compiled"] = i.nccl_compiled;
  d["nccl_runtime"] = i.nccl_runtime;
  d["compiler"] = i.compiler;
  d["build_type"] = i.build_type;
  d["runtime_ok"] = i.runtime_problem.empty();
  d["runtime_problem"] = i.runtime_problem;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "asyncdiff_rt native runtime (shm, ipc and NCCL transports, streams); see csrc/";

  m.def("version", &version, "Version of the native library.");
  m.def("build_info", &build_info_dict,
        "Dict: version, with_cuda, with_nccl, cuda_arch, CUDA runtime/driver versions, device_count, NCCL "
        "compiled/runtime versions, compiler, build_type, runtime_ok, runtime_problem.");
  m.def("check_runtime", &check_runtime, py::call_guard<py::gil_scoped_release>(),
        "Raise RuntimeError saying what is unusable (no CUDA build, no driver/device, version mismatch).");

  py::class_<ShmChannel>(m, "ShmChannel",
                         "Directed double-buffered channel through POSIX shared memory (csrc/shm_channel.h).")
      .def(py::init<const std::string&, std::size_t, bool, int, int, double, int>(), py::arg("name"),
           py::arg("capacity"), py::arg("create"), py::arg("device"), py::arg("peer"),
           py::arg("timeout_s") = ShmChannel::kDefaultTimeoutS, py::arg("peer_pid") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def(
          "send",
          [](ShmChannel& c, std::uint64_t seq, const std::vector<std::tuple<std::uintptr_t, std::size_t>>& parts,
             std::uintptr_t stream) {
            auto p = to_parts(parts);
            py::gil_scoped_release nogil;
            c.send(seq, p, stream_from_int(stream));
          },
          py::arg("seq"), py::arg("parts"), py::arg("stream") = 0)
      .def(
          "recv",
          [](ShmChannel& c, std::uint64_t seq, const std::vector<std::tuple<std::uintptr_t, std::size_t>>& parts,
             std::uintptr_t stream) {
            auto p = to_parts(parts);
            py::gil_scoped_release nogil;
            c.recv(seq, p, stream_from_int(stream));
          },
          py::arg("seq"), py::arg("parts"), py::arg("stream") = 0)
      .def("wait", &ShmChannel::wait, py::arg("seq"), py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("abort", &ShmChannel::abort, py::arg("reason") = "aborted", py::call_guard<py::gil_scoped_release>())
      .def("close", &ShmChannel::close, py::call_guard<py::gil_scoped_release>())
      .def("wait_peer_opened", &ShmChannel::wait_peer_opened, py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(),
           "Wait until the receiver mapped this creator's region; False at the timeout, a failure or a dead peer.")
      .def_property_readonly("peer_opened", &ShmChannel::peer_opened)
      .def_property_readonly("peer_released", &ShmChannel::peer_released,
                             "Creator side: the opener no longer needs this side's memory (shm: it mapped the "
                             "region; ipc: it closed its mapping of the device slots). True on the opener side.")
      .def("peer_problem", &ShmChannel::peer_problem, py::call_guard<py::gil_scoped_release>(),
           "'' while the peer lives and the channel is healthy, else what happened (thread-safe).")
      .def("completed", &ShmChannel::completed, py::arg("seq"),
           "True when this side's op for seq has completed (host read of a word the stream writes; thread-safe).")
      .def("release_from_host", &ShmChannel::release_from_host, py::call_guard<py::gil_scoped_release>(),
           "Mark failed and write the awaited flag values from the host (thread-safe; for watchdogs).")
      .def_property_readonly("name", &ShmChannel::name)
      .def_property_readonly("capacity", &ShmChannel::capacity)
      .def_property_readonly("device", &ShmChannel::device)
      .def_property_readonly("peer", &ShmChannel::peer)
      .def_property_readonly("failed", &ShmChannel::failed)
      .def_property_readonly("closed", &ShmChannel::closed)
      .def_static(
          "packed_size",
          [](const std::vector<std::tuple<std::uintptr_t, std::size_t>>& parts) {
            return ShmChannel::packed_size(to_parts(parts));
          },
          py::arg("parts"), "Bytes the parts take in one slot (each part 256-byte aligned).")
      .def_readonly_static("PART_ALIGNMENT", &ShmChannel::kPartAlignment);

  py::class_<IpcChannel, ShmChannel>(m, "IpcChannel",
                                     "ShmChannel whose slots are device memory shared through CUDA IPC (Note [ipc "
                                     "channel] in csrc/shm_channel.h); device >= 0 on both sides.")
      .def(py::init<const std::string&, std::size_t, bool, int, int, double, int>(), py::arg("name"),
           py::arg("capacity"), py::arg("create"), py::arg("device"), py::arg("peer"),
           py::arg("timeout_s") = ShmChannel::kDefaultTimeoutS, py::arg("peer_pid") = 0,
           py::call_guard<py::gil_scoped_release>());

  m.def("process_alive", &process_alive, py::arg("pid"),
        "False once the process exited (a zombie counts as exited); True for pid <= 0 (unknown).");

  m.def("nccl_unique_id", [] { return py::bytes(nccl_unique_id()); }, "ncclGetUniqueId as bytes.");

  py::class_<NcclComm>(m, "NcclComm", "NCCL communicator owned by the library (csrc/nccl_comm.h).")
      .def(py::init([](py::bytes uid, int world, int rank, int device, double timeout_s) {
             std::string id = uid;
             py::gil_scoped_release nogil;
             return new NcclComm(id, world, rank, device, timeout_s);
           }),
           py::arg("uid"), py::arg("world"), py::arg("rank"), py::arg("device"), py::arg("timeout_s") = 60.0)
      .def(
          "sendrecv",
          [](NcclComm& c, const std::vector<std::tuple<int, std::uintptr_t, std::size_t>>& sends,
             const std::vector<std::tuple<int, std::uintptr_t, std::size_t>>& recvs, std::uintptr_t stream) {
            auto s = to_peer_buffers(sends);
            auto r = to_peer_buffers(recvs);
            py::gil_scoped_release nogil;
            c.sendrecv(s, r, stream_from_int(stream));
          },
          py::arg("sends"), py::arg("recvs"), py::arg("stream"))
      .def(
          "broadcast",
          [](NcclComm& c, std::uintptr_t ptr, std::size_t nbytes, int root, std::uintptr_t stream) {
            py::gil_scoped_release nogil;
            c.broadcast(ptr, nbytes, root, stream_from_int(stream));
          },
          py::arg("ptr"), py::arg("nbytes"), py::arg("root"), py::arg("stream"))
      .def(
          "wait",
          [](NcclComm& c, std::uintptr_t stream, double timeout_s, std::int64_t step) {
            py::gil_scoped_release nogil;
            c.wait(stream_from_int(stream), timeout_s, step);
          },
          py::arg("stream"), py::arg("timeout_s"), py::arg("step") = -1)
      .def("check_async", &NcclComm::check_async, py::arg("step") = -1, py::call_guard<py::gil_scoped_release>())
      .def("abort", &NcclComm::abort, py::arg("reason") = "abort() called", py::call_guard<py::gil_scoped_release>(),
           "Thread-safe: stops this communicator's kernels.")
      .def(
          "mark_done",
          [](NcclComm& c, std::uintptr_t stream, std::uint64_t seq) {
            py::gil_scoped_release nogil;
            c.mark_done(stream_from_int(stream), seq);
          },
          py::arg("stream"), py::arg("seq"), "Enqueue a host-visible completion mark for seq on stream.")
      .def("completed", &NcclComm::completed, py::arg("seq"),
           "True once the mark for seq ran (host read, no CUDA call; thread-safe).")
      .def("destroy", &NcclComm::destroy, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("world", &NcclComm::world)
      .def_property_readonly("rank", &NcclComm::rank)
      .def_property_readonly("device", &NcclComm::device)
      .def_property_readonly("valid", &NcclComm::valid);
}
