"""Build of vlmkern's compiled extensions; metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation -e .`` (the extensions compile against the torch already
installed; a build-system requirement on torch would pull a multi-GB CUDA wheel).

Extensions:
  ``vlmkern._C``     CPU kernels (csrc/cpu), always built.
  ``vlmkern._cuda``  CUDA kernels (csrc/cuda), built only when torch has CUDA and a toolkit is found.
                     A failed CUDA build is skipped with a warning (vlmkern then reports the op backends
                     as unavailable and uses Triton / the reference); VLMKERN_REQUIRE_CUDA=1 makes it fatal.

Environment:
  VLMKERN_NO_EXT=1            build no extension (pure Python install).
  VLMKERN_CUDA_ARCHS="8.0;9.0" CUDA archs, ';'- or ' '-separated; "9.0+PTX" also embeds PTX.
  VLMKERN_REQUIRE_CUDA=1      fail the install if the CUDA extension cannot be built.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time

try:
    import torch
except ImportError as _exc:  # pip's isolated build env has no torch: say what to do instead of a bare traceback
    sys.exit(
        f"vlmkern's setup.py needs torch to build its C++/CUDA extensions, and torch is not importable here "
        f"({_exc}).\nIf torch is installed, pip is building in an isolated environment without it: add "
        f"--no-build-isolation. Otherwise install torch first. Either way:\n"
        f"    pip install torch\n    pip install --no-build-isolation .   (or -e . for a checkout)")
from setuptools import find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_EXT = "vlmkern._cuda"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nvlmkern WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _openmp_flags() -> list[str]:
    """-fopenmp if the C++ compiler accepts it (at::parallel_for is header-inline OpenMP in torch builds)."""
    if os.name == "nt" or sys.platform == "darwin":
        return []
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    return ["-fopenmp"] if ok else []


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(";", " ").split():
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        if not num.isdigit():
            raise ValueError(f"VLMKERN_CUDA_ARCHS: bad arch {arch!r}, expected e.g. '8.0;9.0' or '9.0+PTX'")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _cxx_flags() -> list[str]:
    if os.name == "nt":
        return ["/O2"]
    # -ffp-contract=off: no FMA contraction, so float results match the PyTorch reference bit for bit.
    # -g0: no debug info (Python's CFLAGS add -g), a much shorter compile.
    return ["-O3", "-g0", "-ffp-contract=off"]


def _cuda_home() -> str | None:
    """torch's guess of the toolkit, unless it lacks the CUDA headers (an ``nvcc`` wrapper script in
    /usr/local/bin makes torch guess /usr/local): then /usr/local/cuda when that has them."""
    home = cpp_extension.CUDA_HOME
    has_headers = lambda d: d is not None and os.path.isfile(os.path.join(d, "include", "cuda_runtime.h"))  # noqa: E731
    if home is None or has_headers(home) or not has_headers("/usr/local/cuda"):
        return home
    print(f"vlmkern: CUDA_HOME={home} has no include/cuda_runtime.h, using /usr/local/cuda", file=sys.stderr)
    cpp_extension.CUDA_HOME = "/usr/local/cuda"   # torch's include, library and nvcc paths read this global
    return cpp_extension.CUDA_HOME


def extensions() -> list:
    if _flag("VLMKERN_NO_EXT"):
        return []
    omp = _openmp_flags()
    exts = [CppExtension(
        "vlmkern._C",
        sources=sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT)),
        include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args={"cxx": _cxx_flags() + omp},
        extra_link_args=omp,
    )]
    if torch.version.cuda is None or _cuda_home() is None:
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        msg = f"not building {CUDA_EXT}: {why}"
        if _flag("VLMKERN_REQUIRE_CUDA"):
            raise RuntimeError(msg)
        print(f"vlmkern: {msg}", file=sys.stderr)
        return exts
    exts.append(CUDAExtension(
        CUDA_EXT,
        sources=sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT) + glob.glob("csrc/cuda/*.cpp", root_dir=ROOT)),
        include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={
            "cxx": _cxx_flags(),
            "nvcc": ["-O3"] + _gencode_flags(os.environ.get("VLMKERN_CUDA_ARCHS", "8.0;9.0")),
        },
        optional=not _flag("VLMKERN_REQUIRE_CUDA"),  # Build.build_extension skips it on failure
    ))
    return exts


class Build(BuildExtension):
    """BuildExtension that turns a failure of an optional (CUDA) extension into a loud warning and drops it,
    instead of failing the install or leaving a half-built module behind."""

    def build_extensions(self) -> None:
        self._failed: set[str] = set()
        has_cu = any(src.endswith(".cu") for e in self.extensions if e.optional for src in e.sources)
        check = getattr(cpp_extension, "_check_cuda_version", None)
        if has_cu and check is not None:
            try:  # torch raises for every extension on an nvcc/torch CUDA major mismatch; keep _C building
                check(*self._check_abi())
            except Exception as exc:
                self._skip(CUDA_EXT, exc)
                self.extensions = [e for e in self.extensions if e.name != CUDA_EXT]
        super().build_extensions()
        # Dropped after the loop, so in-place/editable copies and wheel outputs do not look for them.
        self.extensions = [e for e in self.extensions if e.name not in self._failed]

    def build_extension(self, ext) -> None:
        # pip shows these lines with -v (its spinner hides them otherwise); the C++ build is a few minutes on 2 cores
        print(f"vlmkern: building {ext.name} from {len(ext.sources)} sources "
              f"({'nvcc + ' if any(s.endswith('.cu') for s in ext.sources) else ''}c++)...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            super().build_extension(ext)
            print(f"vlmkern: built {ext.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        except Exception as exc:  # torch raises RuntimeError, which setuptools' optional handling ignores
            if not ext.optional:
                raise
            self._failed.add(ext.name)
            self._skip(ext.name, exc)

    @staticmethod
    def _skip(name: str, exc: Exception) -> None:
        _warn(f"building {name} failed and it is skipped ({type(exc).__name__}: {exc}). vlmkern still works; "
              "its ops report the 'cuda' backend as unavailable (python -m vlmkern info). "
              "Set VLMKERN_REQUIRE_CUDA=1 to make this an error.")


setup(
    packages=find_packages(include=["vlmkern*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
