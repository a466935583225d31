"""Offline GPU build check: compile every shipped kernel for real GPUs on a machine without one.

    python -m vlmkern.tools.gpu_build_check [--arch 80 90] [--filter SUBSTRING] [--jobs N] [--json PATH]
                                            [--no-cache] [--unaligned]

* Triton: imports every Triton backend ``vlmkern.ops.<family>._triton`` so their ``register_builds(...)`` fill
  ``vlmkern.ops.launch.SHIPPED``, then compiles each entry with ``triton.compile`` for each ``--arch``
  down to a cubin. Registers and spills come from the ptxas log (``TRITON_DUMP_PTXAS_LOG``), shared memory
  from the compiled metadata (``shared``, dynamic) plus any static ``smem`` ptxas reports.
  ``CompiledKernel.n_regs``/``n_spills`` are not usable: Triton fills them only when it loads the cubin
  on a GPU.
* CUDA: compiles every ``csrc/**/*.cu`` with ``nvcc -arch=sm_XX -c -Xptxas -v`` (torch and Python include
  paths added) when nvcc is on PATH or in /usr/local/cuda/bin; skipped with a note otherwise. Shared memory
  there is static ``__shared__`` only; dynamic shared memory is set at launch and cannot be seen here.

Each clean Triton compile also stores a static reading of its PTX/SASS (``vlmkern.tools._asm``: main-loop
loads asynchronous?, dots on wgmma?, SASS opcode counts) in ``BuildResult.analysis`` and in the cache, which
``python -m vlmkern.tools.perf_report`` shows and checks.

``--unaligned`` also compiles each Triton entry without its 16-divisibility hints, labelled
``...{unaligned}``: the specialization Triton builds when a width or row stride is not a multiple of 16 (odd
widths in tests, unusual user shapes). A compile error there fails the run like any other; spills there are
reported but allowed, since no shipped model shape runs that variant (it is correct, only slower).

Fails (exit 1) on any compile error, any spill (> 0 bytes stored or loaded), shared memory above the
architecture's per-block maximum, or when nothing at all was selected. Compilation runs in worker
processes started with a clean environment: ``@triton.jit`` picks interpreter or compiler when a kernel
module is imported, so a caller's ``TRITON_INTERPRET=1`` (the CPU test setup) must not reach them.

The CLI keeps each clean compile's statistics in ``~/.cache/vlmkern/gpu_build_check`` keyed by everything
Triton's own cache key covers (kernel source and its dependencies, signature, constexprs, options, ptxas
version, arch), so a rerun recompiles only what changed; ``--no-cache`` recompiles everything.

ptxas: Triton uses its bundled ``backends/nvidia/bin/ptxas`` for sm < 90 and ``ptxas-blackwell`` for
sm >= 90 (override with ``TRITON_PTXAS_PATH`` / ``TRITON_PTXAS_BLACKWELL_PATH``); the PTX version is
derived from that ptxas, so any CUDA 12.x/13.x ptxas works. Each row records the ptxas used (``--json``).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import pkgutil
import queue
import re
import selectors
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

# Per-block shared memory maximum (opt-in dynamic), bytes: CUDA programming guide, compute capabilities table.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
DEFAULT_ARCHS = (80, 90)
UNALIGNED = "{unaligned}"   # label suffix of a build compiled without its 16-divisibility hints
REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 900.0
_CACHE_SCHEMA = "gpu_build_check/1"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlmkern" / "gpu_build_check"


@dataclass
class BuildResult:
    """One (kernel, arch) compilation; ``None`` fields were not measured (e.g. after a compile error)."""
    label: str
    kind: str                         # "triton" | "cuda"
    config: str                       # "M128 N128 K64 w8 s3" for Triton, "-" for CUDA
    arch: int
    registers: int | None = None
    spill_stores: int | None = None   # bytes
    spill_loads: int | None = None    # bytes
    stack: int | None = None          # bytes of stack frame (local arrays, spills)
    shared: int | None = None         # bytes per block
    error: str | None = None
    tool: str = ""                    # the ptxas / nvcc that compiled it
    seconds: float = 0.0
    cached: bool = False              # statistics reused from an identical earlier compile
    analysis: dict | None = None      # static reading of PTX/SASS (``vlmkern.tools._asm``), Triton only

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def spills_allowed(self) -> bool:
        return self.label.endswith(UNALIGNED)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.error is not None:
            out.append("error: " + (self.error.strip().splitlines() or ["?"])[-1][:70])
            return out
        if self.spills > 0 and not self.spills_allowed:
            out.append(f"spill {self.spill_stores}B st/{self.spill_loads}B ld")
        limit = SMEM_LIMIT.get(self.arch)
        if self.shared is not None and limit is not None and self.shared > limit:
            out.append(f"smem {self.shared} > {limit}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "ok" if self.ok else "FAIL " + "; ".join(self.problems)


def unaligned_variants(builds: Iterable[Any]) -> list[Any]:
    """Each build that carries 16-divisibility hints again without them, labelled ``...{unaligned}``."""
    return [replace(b, label=b.label + UNALIGNED, attrs={}) for b in builds if b.attrs]


@dataclass
class Report:
    results: list[BuildResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: int = 0  # selected but not compiled (no nvcc)

    @property
    def failures(self) -> list[BuildResult]:
        return [r for r in self.results if not r.ok]

    @property
    def exit_code(self) -> int:
        return 1 if (self.failures or not (self.results or self.skipped)) else 0

    def to_json(self) -> dict[str, Any]:
        rows = [dict(asdict(r), spills=r.spills, ok=r.ok, status=r.status) for r in self.results]
        return {"ok": self.exit_code == 0, "seconds": round(self.seconds, 2), "notes": self.notes, "results": rows}


# ----------------------------------------------------------------------------------------- ptxas logs

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict[str, dict[str, int | bool]]:
    """``ptxas -v`` output -> ``{mangled function: {registers, spill_stores, spill_loads, stack, smem, entry}}``.

    Entry kernels carry all keys; non-inlined device functions only the stack/spill ones.
    """
    funcs: dict[str, dict[str, int | bool]] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY_RE.search(line):
            current = m.group(1)
            funcs.setdefault(current, {})["entry"] = True
        elif m := _PROPS_RE.search(line):
            current = m.group(1)
            funcs.setdefault(current, {}).setdefault("entry", False)
        elif current is None:
            continue
        elif m := _FRAME_RE.search(line):
            funcs[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif m := _USED_RE.search(line):
            funcs[current]["registers"] = int(m.group(1))
            sm = _SMEM_RE.search(line)
            funcs[current]["smem"] = int(sm.group(1)) if sm else 0
    return funcs


def _short_kernel_name(pretty: str) -> str:
    """``void (anonymous namespace)::k<float, int>(float const*, ...)`` -> ``k<float, int>``."""
    name = pretty.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and i > 0:
            name = name[:i]
            break
    return name[5:] if name.startswith("void ") else name


def _demangle(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
        pretty = out.splitlines()
    except (OSError, subprocess.SubprocessError):
        pretty = []
    return {n: _short_kernel_name(p or n) for n, p in zip(names, pretty + [""] * len(names))}


# --------------------------------------------------------------------------------- Triton discovery

def discover_builds() -> tuple[list[Any], list[str]]:
    """Import every Triton backend (``vlmkern.ops.<family>._triton``, which registers its launches' builds) and
    every ``vlmkern.kernels`` module; return (SHIPPED builds, import-error notes)."""
    import vlmkern.kernels
    import vlmkern.ops
    from vlmkern.ops import launch as _build

    errors = []
    names = [i.name for i in pkgutil.walk_packages(vlmkern.kernels.__path__, "vlmkern.kernels.")]
    names += [i.name for i in pkgutil.walk_packages(vlmkern.ops.__path__, "vlmkern.ops.")
              if i.name.endswith("._triton")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken kernels module is a build failure, reported as such
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return list(_build.SHIPPED), errors


def _config_str(build: Any) -> str:
    blocks = " ".join(f"{k[len('BLOCK_'):]}{v}" for k, v in build.constexprs.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{build.num_warps} s{build.num_stages}".strip()


def _triton_job(build: Any, arch: int) -> dict[str, Any]:
    fn = getattr(build.kernel, "fn", build.kernel)  # JITFunction / InterpretedFunction -> python function
    try:
        file = os.path.abspath(sys.modules[fn.__module__].__file__) if fn.__module__ != "__main__" else None
    except (KeyError, AttributeError, TypeError):
        file = None
    if file is None:
        import inspect
        file = os.path.abspath(inspect.getfile(fn))
    return dict(label=build.label, module=fn.__module__, file=file, qualname=fn.__qualname__,
                signature=dict(build.signature), constexprs=dict(build.constexprs),
                attrs=dict(getattr(build, "attrs", None) or {}),
                num_warps=build.num_warps, num_stages=build.num_stages, arch=arch, config=_config_str(build))


# ------------------------------------------------------------------------------------ Triton worker

def _resolve_kernel(module: str, file: str | None, qualname: str) -> Any:
    mod = sys.modules.get(module) if module != "__main__" else None
    if mod is None:
        try:
            spec = importlib.util.find_spec(module) if module != "__main__" else None
        except (ImportError, ValueError):  # e.g. "tests.test_x" where tests/ is no package
            spec = None
        same = spec is not None and spec.origin and file and os.path.exists(spec.origin) \
            and os.path.samefile(spec.origin, file)
        if same or (spec is not None and not file):
            mod = importlib.import_module(module)
        else:  # e.g. a pytest module whose directory is not on sys.path here
            name = module if module != "__main__" else "__gpu_build_check_main__"
            spec = importlib.util.spec_from_file_location(name, file)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _ptxas_for(arch: int) -> tuple[str, str]:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(arch)
    except Exception:  # older Triton: single bundled ptxas
        from triton import knobs
        tool = knobs.nvidia.ptxas
    return tool.path, tool.version


def _run_ptxas(ptx: str, arch: int) -> str:
    """Fallback when Triton did not log ptxas (older Triton or cache hit): rerun it ourselves with -v."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    path, _ = _ptxas_for(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        proc = subprocess.run([path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                               "-o", src + ".o"], capture_output=True, text=True)
    return proc.stderr + proc.stdout


def _attrs_by_index(kernel: Any, attrs: dict[Any, Any]) -> dict[tuple, Any]:
    """Accept ``{"x_ptr": "D"}`` as well as Triton's own ``{(0,): [["tt.divisibility", 16]]}``."""
    out = {}
    for k, v in attrs.items():
        key = (kernel.arg_names.index(k),) if isinstance(k, str) else tuple(k)
        out[key] = [["tt.divisibility", 16]] if v == "D" else v
    return out


def _result_key(src: Any, target: Any, options: dict[str, Any]) -> str:
    """Everything Triton's own cache key covers: source + dependencies, signature, constexprs, attrs,
    options, backend (ptxas version, arch), Triton version and cache-invalidating env vars."""
    import triton
    from triton.compiler.compiler import make_backend
    backend = make_backend(target)
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        env = sorted(get_cache_invalidating_env_vars().items())
    except ImportError:
        env = []
    analysis = hashlib.sha256(Path(__file__).with_name("_asm.py").read_bytes()).hexdigest()
    parts = [_CACHE_SCHEMA, analysis, triton.__version__, src.hash(), backend.hash(),
             backend.parse_options(dict(options)).hash(), env]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _compile_triton(job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.time()
    res: dict[str, Any] = dict(label=job["label"], kind="triton", config=job["config"], arch=job["arch"])
    try:
        path, version = _ptxas_for(job["arch"])
        res["tool"] = f"{path} ({version})"
    except Exception as exc:
        res["tool"] = f"ptxas not found: {exc}"
    log = tempfile.TemporaryFile(mode="w+")
    saved = (os.dup(1), os.dup(2))
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)  # Triton prints the ptxas log (and, on failure, the PTX) to stdout
    os.dup2(log.fileno(), 2)  # MLIR diagnostics go to fd 2
    cache_file = None
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = _resolve_kernel(job["module"], job["file"], job["qualname"])
        if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
            raise TypeError(f"{job['qualname']} is {type(kernel).__name__}, not a compilable @triton.jit function")
        src = ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"],
                        attrs=_attrs_by_index(kernel, job["attrs"]))
        target = GPUTarget("cuda", job["arch"], 32)
        options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
        if job.get("cache_dir"):
            cache_file = Path(job["cache_dir"]) / (_result_key(src, target, options) + ".json")
            if cache_file.exists():
                res.update(json.loads(cache_file.read_text()), cached=True)
                cache_file = None
                return res
        ck = triton.compile(src, target=target, options=options)
        sys.stdout.flush()
        log.seek(0)
        funcs = parse_ptxas_log(log.read())
        props = funcs.get(ck.metadata.name) or parse_ptxas_log(_run_ptxas(ck.asm["ptx"], job["arch"])).get(
            ck.metadata.name, {})
        res.update(registers=props.get("registers"), spill_stores=props.get("spill_stores"),
                   spill_loads=props.get("spill_loads"), stack=props.get("stack"),
                   shared=int(ck.metadata.shared) + int(props.get("smem", 0)))
        if "registers" not in props:
            res["error"] = "compiled, but no ptxas -v statistics found for " + ck.metadata.name
        from vlmkern.tools import _asm
        # SASS counts are read by the perf report (sm_90, aligned builds); disassembling every build would add
        # about a second each to CI's build checks.
        wants_sass = job["arch"] == 90 and UNALIGNED not in job["label"]
        res["analysis"] = dict(_asm.analyse_ptx(ck.asm["ptx"]),
                               sass=_asm.sass_counts(ck.asm["cubin"], _asm.cuobjdump_path()) if wants_sass else None)
        if job.get("asm_dir"):
            stem = Path(job["asm_dir"]) / f"{re.sub(r'[^A-Za-z0-9_.=,+-]+', '_', job['label'])}.sm_{job['arch']}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(stem.suffix + ".ptx").write_text(ck.asm["ptx"])
    except BaseException as exc:  # any compiler failure, incl. PTXASError and MLIR pass failures
        cache_file = None  # errors are cheap to reproduce and may depend on the environment: never cached
        sys.stdout.flush()
        sys.stderr.flush()
        log.seek(0)
        diag = [ln for ln in log.read().splitlines() if "error" in ln.lower()][:20]
        res["error"] = "\n".join([*diag, f"{type(exc).__name__}: {str(exc).strip()}"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        log.close()
        res["seconds"] = time.time() - t0
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in res.items() if k not in ("label", "config", "seconds")}))
        tmp.replace(cache_file)
    return res


def _worker_main() -> None:
    """Serve jobs: one base64 pickle per line on stdin, one JSON result per line on the original stdout."""
    proto = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        if line.strip():
            job = pickle.loads(base64.b64decode(line))
            proto.write(json.dumps(_compile_triton(job)) + "\n")
            proto.flush()


def _worker_env(triton_cache: str) -> dict[str, str]:
    env = dict(os.environ)
    env["TRITON_CACHE_DIR"] = triton_cache    # throwaway: keeps ~/.triton clean
    env["TRITON_INTERPRET"] = "0"
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["TRITON_ALWAYS_COMPILE"] = "1"          # a cache hit would skip ptxas and its log
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, and silences its warning
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


class _Worker:
    """One long-lived ``--worker`` process; restarted if it dies."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.stderr = None

    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "vlmkern.tools.gpu_build_check", "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=self.env, text=True, cwd=str(REPO_ROOT))

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        t0 = time.time()
        try:
            self.proc.stdin.write(base64.b64encode(pickle.dumps(job)).decode() + "\n")
            self.proc.stdin.flush()
            sel = selectors.DefaultSelector()
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=JOB_TIMEOUT_S)
            sel.close()
            line = self.proc.stdout.readline() if ready else ""
        except OSError:
            line = ""
        if line:
            return json.loads(line)
        why = "timed out" if self.proc.poll() is None else f"died (exit {self.proc.returncode})"
        self.close()
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:]
        return dict(label=job["label"], kind="triton", config=job["config"], arch=job["arch"],
                    error=f"worker {why}:\n{tail}", seconds=time.time() - t0)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                    self.proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None


# ------------------------------------------------------------------------------------------- CUDA

def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.access(os.path.join(cand, "bin", "nvcc"), os.X_OK):
            return os.path.join(cand, "bin", "nvcc")
    return None


def find_cuda_sources(root: Path = REPO_ROOT) -> list[Path]:
    return sorted((root / "csrc").rglob("*.cu"))


def _nvcc_includes() -> list[str]:
    flags = []
    try:
        from torch.utils.cpp_extension import include_paths
        flags += [f"-I{p}" for p in include_paths()]
    except Exception:  # torch-free .cu files still compile
        pass
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    flags.append(f"-I{REPO_ROOT / 'csrc'}")
    return flags


def _compile_cuda(nvcc: str, source: Path, arch: int, includes: Sequence[str]) -> list[dict[str, Any]]:
    t0 = time.time()
    rel = os.path.relpath(source, REPO_ROOT)
    short = os.path.basename(source)
    with tempfile.TemporaryDirectory() as d:
        cmd = [nvcc, f"-arch=sm_{arch}", "-c", "-o", os.path.join(d, "k.o"), str(source), "-Xptxas", "-v",
               "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DTORCH_EXTENSION_NAME=_cuda",
               "-DTORCH_API_INCLUDE_EXTENSION_H", *includes]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired:
            out, rc = "nvcc timed out", -1
    base = dict(kind="cuda", config="-", arch=arch, tool=nvcc, seconds=time.time() - t0)
    if rc != 0:
        errs = [ln for ln in out.splitlines() if "error" in ln.lower()][:20] or out.splitlines()[-20:]
        return [dict(base, label=rel, error="\n".join(errs) + f"\nnvcc exit {rc}: {' '.join(cmd)}")]
    funcs = parse_ptxas_log(out)
    pretty = _demangle(funcs)
    rows = []
    for name, props in funcs.items():
        rows.append(dict(base, label=f"{short}:{pretty[name]}", registers=props.get("registers"),
                         spill_stores=props.get("spill_stores"), spill_loads=props.get("spill_loads"),
                         stack=props.get("stack"), shared=props.get("smem")))
    return rows or [dict(base, label=f"{short}:(no kernels)", registers=0, spill_stores=0, spill_loads=0, shared=0)]


# ----------------------------------------------------------------------------------------- driver

def check(archs: Sequence[int] = DEFAULT_ARCHS, label_filter: str | None = None, jobs: int | None = None,
          builds: Sequence[Any] | None = None, cuda_sources: Sequence[Path] | None = None,
          cache_dir: Path | str | None = None, unaligned: bool = False, asm_dir: Path | str | None = None) -> Report:
    """Compile ``builds`` (default: every shipped Triton config) and ``cuda_sources`` (default: csrc/**/*.cu)
    for each arch; ``label_filter`` keeps Triton labels / .cu paths containing it. With ``cache_dir``,
    Triton statistics of a compile identical in every input (see ``_result_key``) are reused from there.
    ``unaligned`` adds each build's :func:`unaligned_variants` entry; ``asm_dir`` receives each fresh
    compile's PTX (cache hits write nothing)."""
    t0 = time.time()
    report = Report()
    for arch in archs:
        if arch not in SMEM_LIMIT:
            raise ValueError(f"archs: unknown architecture {arch}; expected one of {sorted(SMEM_LIMIT)}")
    if builds is None:
        builds, errors = discover_builds()
        for err in errors:
            report.results.append(BuildResult(label=err.split(":")[0], kind="triton", config="-", arch=0,
                                              error="import failed: " + err))
    if label_filter:
        builds = [b for b in builds if label_filter in b.label]
    if unaligned:
        builds = [*builds, *unaligned_variants(builds)]
    seen: set[str] = set()
    for b in builds:
        if b.label in seen:
            report.notes.append(f"duplicate label {b.label!r}: registered twice")
        seen.add(b.label)

    tasks: list[tuple[str, Any]] = []
    sources = list(find_cuda_sources() if cuda_sources is None else cuda_sources)
    if label_filter:
        sources = [s for s in sources if label_filter in os.path.relpath(s, REPO_ROOT)]
    if cuda_sources is None and not sources:
        report.notes.append("no csrc/**/*.cu file" + (f" matching {label_filter!r}" if label_filter else "")
                            + ": no CUDA compiled")
    if label_filter and not builds and not sources:
        report.notes.append(f"--filter {label_filter!r} matched no kernel label and no .cu path")
    nvcc = find_nvcc() if sources else None
    if sources and nvcc is None:
        report.skipped += len(sources) * len(archs)
        report.notes.append("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda/bin): "
                            f"skipped {len(sources)} .cu file(s)")
    elif sources:
        includes = _nvcc_includes()
        tasks += [("cuda", (s, a, includes)) for s in sources for a in archs]  # slowest first
    cache = str(cache_dir) if cache_dir is not None else None
    asm = str(asm_dir) if asm_dir is not None else None
    tasks += [("triton", dict(_triton_job(b, a), cache_dir=cache, asm_dir=asm)) for b in builds for a in archs]

    jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(tasks) or 1))
    todo: queue.Queue = queue.Queue()
    for i, t in enumerate(tasks):
        todo.put((i, t))
    slots: list[list[dict[str, Any]]] = [[] for _ in tasks]
    triton_cache = tempfile.TemporaryDirectory(prefix="gpu_build_check_triton_")
    env = _worker_env(triton_cache.name)

    def drain() -> None:
        worker = _Worker(env)
        try:
            while True:
                try:
                    i, (kind, payload) = todo.get_nowait()
                except queue.Empty:
                    return
                slots[i] = [worker.run(payload)] if kind == "triton" else _compile_cuda(nvcc, *payload)
        finally:
            worker.close()

    threads = [threading.Thread(target=drain, daemon=True) for _ in range(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    triton_cache.cleanup()
    for rows in slots:
        report.results += [BuildResult(**r) for r in rows]
    report.seconds = time.time() - t0
    return report


def format_table(results: Sequence[BuildResult]) -> str:
    def num(v: int | None) -> str:
        return "-" if v is None else str(v)

    head = ("kernel", "config", "arch", "regs", "spills", "smem", "status")
    rows = [(r.label, r.config, f"sm_{r.arch}" if r.arch else "-", num(r.registers),
             "-" if r.spill_stores is None else str(r.spills), num(r.shared), r.status) for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if j < 2 or j == 6 else c.rjust(w)  # noqa: E731
                                   for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--worker"]:
        _worker_main()
        return 0
    p = argparse.ArgumentParser(prog="python -m vlmkern.tools.gpu_build_check", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(SMEM_LIMIT),
                   help="compute capabilities to compile for (default: 80 90)")
    p.add_argument("--filter", default=None, help="only Triton labels / csrc paths containing SUBSTRING")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: min(2, cpus))")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--no-cache", action="store_true",
                   help=f"recompile everything instead of reusing statistics from {default_cache_dir()}")
    p.add_argument("--unaligned", action="store_true",
                   help="also compile each Triton config without its 16-divisibility hints (spills allowed there)")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")

    report = check(archs=args.arch, label_filter=args.filter, jobs=args.jobs,
                   cache_dir=None if args.no_cache else default_cache_dir(), unaligned=args.unaligned)
    print(format_table(report.results))
    for note in report.notes:
        print("note:", note)
    tools = sorted({(r.arch, r.tool) for r in report.results if r.tool})
    for arch, tool in tools:
        print(f"sm_{arch}: {tool}")
    for r in report.failures:
        if r.error:  # the tail: Triton's CompilationError ends with the offending source line and the reason
            print(f"\n--- {r.label} sm_{r.arch} ---\n" + "\n".join(r.error.strip().splitlines()[-12:]))
    n, bad = len(report.results), len(report.failures)
    hits = sum(r.cached for r in report.results)
    print(f"\n{n} builds, {n - bad} ok, {bad} failed in {report.seconds:.1f} s"
          + (f" ({hits} Triton results from cache; --no-cache to recompile)" if hits else "")
          + ("" if n else " (nothing compiled: no builds registered or --filter matched nothing)"))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
