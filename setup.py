"""Builds the native extension asyncdiff_rt._C with CMake + ninja (CMakeLists.txt); metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .      # in place: asyncdiff_rt/_C*.so next to the sources
    pip install --no-build-isolation .

Environment knobs:
    ASYNCDIFF_RT_WITH_CUDA   AUTO (default: CUDA when nvcc and the nvidia-nccl-cu13 headers are found) | ON | OFF
    ASYNCDIFF_RT_BUILD_TYPE  Release (default) | Debug | RelWithDebInfo
    ASYNCDIFF_RT_BUILD_DIR   CMake build directory (default build/py-<python tag>-<variant>, kept for rebuilds)
    NCCL_ROOT                NCCL install with include/nccl.h and lib/libnccl.so.2 (default: the installed
                             nvidia-nccl-cu13 wheel; with build isolation that wheel is not visible, hence
                             --no-build-isolation or NCCL_ROOT)
    CUDAToolkit_ROOT         CUDA toolkit (default: nvcc on PATH, then /usr/local/cuda)
    CMAKE_BUILD_PARALLEL_LEVEL  parallel jobs (default: all cores)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _nccl_root() -> str | None:
    if os.environ.get("NCCL_ROOT"):
        return os.environ["NCCL_ROOT"]
    try:
        import nvidia.nccl  # noqa: PLC0415

        return list(nvidia.nccl.__path__)[0]
    except ImportError:
        pass
    # Under pip's build isolation the target environment's site-packages is hidden from this process; the same
    # interpreter started without pip's overlay sees it (the wheel whose libnccl.so.2 torch loads).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    code = "import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip()
    return path if out.returncode == 0 and path else None


def _cache_value(build_dir: Path, key: str) -> str | None:
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(key + ":"):
            return line.split("=", 1)[1]
    return None


def _drop_stale_cache(build_dir: Path) -> None:
    """A build dir configured under pip's build isolation names tools (cmake, ninja) of a temporary environment
    that is gone by the next build: start that build dir afresh."""
    for key in ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM"):
        tool = _cache_value(build_dir, key)
        if tool and not Path(tool).exists():
            shutil.rmtree(build_dir, ignore_errors=True)
            return


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # noqa: PLC0415 - a build requirement, not a runtime one

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building asyncdiff_rt._C needs cmake >= 3.24 (pip install cmake)")
        with_cuda = os.environ.get("ASYNCDIFF_RT_WITH_CUDA", "AUTO").upper()
        build_type = os.environ.get("ASYNCDIFF_RT_BUILD_TYPE", "Release")
        tag = f"{sys.implementation.cache_tag}-{with_cuda.lower()}-{build_type.lower()}"
        build_dir = Path(os.environ.get("ASYNCDIFF_RT_BUILD_DIR", ROOT / "build" / f"py-{tag}"))
        _drop_stale_cache(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DASYNCDIFF_RT_WITH_CUDA={with_cuda}",
            f"-DASYNCDIFF_RT_VERSION={self.distribution.get_version()}",
            "-DASYNCDIFF_RT_BUILD_TESTS=OFF",
        ]
        nccl = _nccl_root()
        if nccl:
            args.append(f"-DNCCL_ROOT={nccl}")
        ninja = shutil.which("ninja")
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            args.append("-GNinja")
        if ninja and _cache_value(build_dir, "CMAKE_GENERATOR") in (None, "Ninja"):
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C", "--parallel", jobs], check=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = build_dir / "asyncdiff_rt" / f"_C{suffix}"
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)
        target.chmod(0o755)
        # An editable install imports from the source tree: keep a copy there too (what `build_ext --inplace`
        # does), so `pip install -e .` works whatever setuptools' editable mode does with extensions.
        if getattr(self, "editable_mode", False) or self.inplace:
            in_tree = ROOT / "asyncdiff_rt" / target.name
            if in_tree.resolve() != target.resolve():
                shutil.copyfile(built, in_tree)
                in_tree.chmod(0o755)


setup(ext_modules=[CMakeExtension("asyncdiff_rt._C")], cmdclass={"build_ext": CMakeBuild})
