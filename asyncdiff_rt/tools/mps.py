"""A CUDA MPS daemon of our own, for `asyncdiff-rt bench --emulate N` (benchmarks/README.md, "emulated").

`MpsDaemon` starts `nvidia-cuda-mps-control -d` with fresh CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY
folders and stops it (`echo quit | nvidia-cuda-mps-control` with the same variables) on every exit path: use it as
a context manager; SIGTERM / SIGHUP are turned into an exception while it runs, so `finally` runs on them too, and
Ctrl-C raises KeyboardInterrupt anyway. Its clients are processes started after it with `client_env(n)` in their
environment before CUDA initialises; the process that owns the daemon must not initialise CUDA itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["MpsDaemon", "MpsError", "mps_processes", "percentage"]

CONTROL = "nvidia-cuda-mps-control"


class MpsError(RuntimeError):
    """The MPS daemon is missing, did not start, or did not stop."""


def percentage(n: int) -> int:
    """The SM share of each of n emulated GPUs, in whole percent (100 // n: 50, 33, 25)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the number of emulated GPUs must be an integer >= 1, got {n!r}")
    return 100 // n


def mps_processes(pipe_dir: str | None) -> list[int]:
    """Ids of the live processes (readable by us) whose command is an MPS control daemon or server and whose
    environment names `pipe_dir` as their MPS pipe folder (`None`: every MPS process, whatever its folder)."""
    needle = f"CUDA_MPS_PIPE_DIRECTORY={pipe_dir}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            if b"nvidia-cuda-mps" not in cmd:
                continue
            if pipe_dir is None:
                found.append(int(entry))
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(int(entry))
    return found


class _Stop(BaseException):
    """SIGTERM / SIGHUP while the daemon runs: unwinds like Ctrl-C, so the daemon is stopped."""


class MpsDaemon:
    def __init__(self, start_timeout_s: float = 15.0, stop_timeout_s: float = 60.0):
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.exe: str | None = None
        self.root: str | None = None
        self.pipe_dir = self.log_dir = ""
        self.running = False
        self._old_handlers: dict[int, Any] = {}
        self._before: set[int] = set()  # MPS processes that were there before ours (another daemon's)

    # ------------------------------------------------------------------------------------------ environment
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    def client_env(self, n: int) -> dict[str, str]:
        """What a client process needs in its environment before CUDA starts: our pipe and 100/n % of the SMs."""
        if not self.running:
            raise MpsError("the MPS daemon is not running: start it (with MpsDaemon() as d: ...) before its clients")
        return {**self.env(), "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percentage(n))}

    def _control(self, text: str | None, args: tuple[str, ...] = (), timeout: float = 30.0):
        return subprocess.run(
            [self.exe or CONTROL, *args],
            input=text,
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs(self, chars: int = 2000) -> str:
        """The tail of the daemon's control.log and server.log (for error messages)."""
        out = []
        for name in ("control.log", "server.log"):
            path = os.path.join(self.log_dir, name)
            if self.log_dir and os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {path}:\n{f.read()[-chars:]}")
        return "\n".join(out) or "(no MPS log written)"

    def server_list(self) -> str:
        """`get_server_list`: the ids of the MPS servers running (one once a client has used the GPU)."""
        try:
            return self._control("get_server_list\n", timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            return f"(get_server_list failed: {err})"

    # ------------------------------------------------------------------------------------------ start / stop
    def start(self) -> MpsDaemon:
        self.exe = shutil.which(CONTROL)
        if self.exe is None:
            raise MpsError(
                f"--emulate needs CUDA MPS, but {CONTROL} is not on the PATH: run on a machine with the NVIDIA "
                "driver's MPS binaries (they ship with the driver, e.g. /usr/bin) and add their folder to PATH, "
                "or measure without --emulate"
            )
        self.root = tempfile.mkdtemp(prefix="asyncdiff_rt_mps_")
        self.pipe_dir, self.log_dir = os.path.join(self.root, "pipe"), os.path.join(self.root, "log")
        os.makedirs(self.pipe_dir)
        os.makedirs(self.log_dir)
        self._catch_signals()
        self._before = set(mps_processes(None))
        try:
            res = self._control(None, ("-d",))
            if res.returncode != 0:
                raise MpsError(
                    f"`{CONTROL} -d` failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()}\n"
                    f"{self.logs()}\nCheck that no other MPS daemon owns the GPU (`echo quit | {CONTROL}` with its "
                    "CUDA_MPS_PIPE_DIRECTORY) and that the GPU is in the Default compute mode"
                )
            self.running = True  # from here on, stop() must run
            deadline = time.monotonic() + self.start_timeout_s
            while not os.listdir(self.pipe_dir):
                if time.monotonic() > deadline:
                    raise MpsError(
                        f"the MPS control daemon did not create its pipe in {self.pipe_dir} within "
                        f"{self.start_timeout_s:.0f} s\n{self.logs()}\nCheck that no other MPS daemon owns the GPU "
                        f"(`echo quit | {CONTROL}` with its CUDA_MPS_PIPE_DIRECTORY)"
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Quit the daemon (and its servers); idempotent. Processes still left after stop_timeout_s are killed."""
        try:
            if self.running:
                self.running = False
                try:
                    self._control("quit\n", timeout=self.stop_timeout_s)
                except (OSError, subprocess.SubprocessError):
                    pass
                deadline = time.monotonic() + self.stop_timeout_s
                while time.monotonic() < deadline and (
                    mps_processes(self.pipe_dir) or set(mps_processes(None)) - self._before
                ):  # ours by their environment, or new since we started (a server may not show its environment)
                    time.sleep(0.2)
                left = mps_processes(self.pipe_dir)
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    for pid in left:
                        try:
                            os.kill(pid, sig)
                        except OSError:
                            pass
                    time.sleep(1.0)
                    left = mps_processes(self.pipe_dir)
                    if not left:
                        break
        finally:
            self._restore_signals()
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def _catch_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            raise _Stop(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, stop)
            except (ValueError, OSError):  # not the main thread: only try/finally protects
                pass

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        self._old_handlers = {}

    def __enter__(self) -> MpsDaemon:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
