"""The compiled side: CUDA sources compile for the shipped archs without a GPU, the CUDA binding compiles
against torch's headers, the install produced what torch allows, and vlmkern imports without extensions."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from vlmkern import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
ARCHS = ["80", "90"]  # setup.py's default VLMKERN_CUDA_ARCHS "8.0;9.0"


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for cand in (shutil.which("nvcc"), CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def test_there_are_cuda_sources():
    assert CU_SOURCES, "csrc/**/*.cu is empty"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=_rel)
def test_cuda_source_compiles(source, arch, tmp_path):
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the -D__CUDA_NO_HALF_* flags setup.py gets

    cmd = [NVCC, f"-arch=sm_{arch}", "-O3", "-std=c++17", *COMMON_NVCC_FLAGS, "-I", os.path.dirname(source),
           "-c", source, "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


@pytest.mark.slow
@needs_nvcc
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """Syntax-check csrc/cuda/*.cpp as setup.py would compile them, even with a CPU-only torch.

    A CPU torch wheel ships the c10/cuda headers but not the CMake-generated macros header; an empty
    stand-in is enough for a syntax check.
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [CUDA_HOME, os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    includes = [os.path.join(r, "include") for r in roots if r]
    cuda_include = next((i for i in includes if os.path.exists(os.path.join(i, "cuda_runtime.h"))), None)
    if cuda_include is None:
        pytest.skip(f"cuda_runtime.h not found under {includes}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx!r}")
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))):
        cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=_cuda",
               "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{tmp_path}", f"-I{cuda_include}",
               f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.dirname(source)}"]
        cmd += [f"-I{p}" for p in include_paths()] + [source]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{_rel(source)}:\n{res.stderr[-4000:]}"


def test_cpu_extension_was_built():
    """The install builds vlmkern._C everywhere; skipped only for a plain source checkout."""
    if _ext.cpu_ext() is None and not glob.glob(os.path.join(ROOT, "vlmkern", "_C*")):
        pytest.skip(f"not installed: {_ext.cpu_ext_error()} (pip install --no-build-isolation -e .)")
    assert _ext.cpu_ext() is not None, _ext.cpu_ext_error()
    assert hasattr(_ext.cpu_ext(), "patchify")


@pytest.mark.cuda
@pytest.mark.cuda_ext
def test_cuda_extension_was_built():
    """With a CUDA torch the install must have built vlmkern._cuda; a skipped build is a warning, not silence."""
    assert torch.version.cuda is not None
    assert _ext.cuda_ext() is not None, (
        f"{_ext.cuda_ext_error()} -- rebuild with `VLMKERN_REQUIRE_CUDA=1 pip install --no-build-isolation -v -e .` "
        "to see why")
    x = torch.randint(0, 256, (1, 3, 31, 29), dtype=torch.uint8, device="cuda")
    out = _ext.cuda_ext().patchify(x, 30, 1.0, 1 / 255, [0.5] * 3, [0.5] * 3)
    from vlmkern import reference
    assert torch.equal(out.cpu(), reference.patchify(x.cpu(), 30))


_BLOCK_EXTENSIONS = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("vlmkern._C", "vlmkern._cuda"):
                raise ImportError(f"simulated: {name} missing")
            return None

    sys.meta_path.insert(0, Block())
""")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    full_env.pop("VLMKERN_BACKEND", None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", _BLOCK_EXTENSIONS + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, env=full_env, cwd=ROOT)


def test_import_without_extensions_falls_back_to_reference():
    res = _run_python("""
        import torch, vlmkern
        from vlmkern import _ext, reference
        from vlmkern.ops.patch_embed import PATCHIFY, patchify
        assert _ext.cpu_ext() is None and "simulated: vlmkern._C missing" in _ext.cpu_ext_error()
        x = torch.randint(0, 256, (1, 3, 31, 29), dtype=torch.uint8)
        why = PATCHIFY.reasons("cpp", x, 30, torch.float32)
        assert any("vlmkern._C" in w for w in why), why
        assert PATCHIFY.select(x, 30, torch.float32) == "reference"
        assert torch.equal(patchify(x, 30), reference.patchify(x, 30))
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-4000:]


def test_forced_cpp_without_extension_says_it_is_not_built():
    res = _run_python("""
        import torch
        from vlmkern.ops.dispatch import BackendNotSupported
        from vlmkern.ops.patch_embed import patchify
        try:
            patchify(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4)
        except BackendNotSupported as exc:
            print(exc)
    """, VLMKERN_BACKEND="cpp")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "VLMKERN_BACKEND=cpp" in res.stdout and "vlmkern._C not built" in res.stdout, res.stdout
