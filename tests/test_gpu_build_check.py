"""The offline GPU build check: real sm_80/sm_90 compiles on a machine without a GPU.

The compile tests run in worker processes with ``TRITON_INTERPRET=0`` although this session runs the
interpreter (conftest), which is itself part of what they check.
"""
import pytest
import triton
import triton.language as tl

from vlmkern.ops.launch import KernelBuild
from vlmkern.tools import gpu_build_check as gbc

pytest.importorskip("triton.backends.nvidia.compiler")

GOOD_LABEL = "patch_embed_bwd_pixels[fp16->fp16]"


@triton.jit
def _small_k_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """c = a @ b with a K=8 reduction: the interpreter runs it, the GPU compiler requires K >= 16."""
    r = tl.arange(0, BLOCK)
    k = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + r[:, None] * BLOCK_K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * BLOCK + r[None, :])
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))


BAD = KernelBuild("test_small_k_dot[k8]", _small_k_dot_kernel,
                  {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr", "BLOCK_K": "constexpr"},
                  {"BLOCK": 32, "BLOCK_K": 8}, num_warps=4, num_stages=2)


@pytest.fixture(scope="module")
def report():
    """One run for both compile tests: a shipped config and the bad kernel, each for sm_80 and sm_90."""
    shipped, _ = gbc.discover_builds()
    good = [b for b in shipped if b.label == GOOD_LABEL]
    assert len(good) == 1, f"{GOOD_LABEL} is no longer registered: pick another shipped label"
    return gbc.check(archs=(80, 90), builds=[*good, BAD], cuda_sources=[], jobs=2, cache_dir=None)


def _rows(report, label):
    rows = [r for r in report.results if r.label == label]
    assert sorted(r.arch for r in rows) == [80, 90]
    return rows


@pytest.mark.slow
def test_shipped_config_compiles_for_sm80_and_sm90_without_spills(report):
    for r in _rows(report, GOOD_LABEL):
        assert r.error is None, r.error
        assert r.ok, r.status
        assert r.spill_stores == 0 and r.spill_loads == 0
        assert 0 < r.registers <= 255
        assert 0 < r.shared <= gbc.SMEM_LIMIT[r.arch]
        assert "ptxas" in r.tool and not r.cached


@pytest.mark.slow
def test_small_k_dot_is_a_compile_failure_and_fails_the_run(report):
    for r in _rows(report, BAD.label):
        assert not r.ok
        assert "K >= 16" in r.error
        assert r.status.startswith("FAIL error:")
    assert report.exit_code == 1
    table = gbc.format_table(report.results)
    assert "FAIL" in table and GOOD_LABEL in table


NVCC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for _Z6helperPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function '_Z5plainPi' for 'sm_80'
ptxas info    : Function properties for _Z5plainPi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 356 bytes cmem[0]
ptxas info    : Compile time = 22.604 ms
ptxas info    : Compiling entry function '_Z12scale_kernelILi256EEvPff' for 'sm_80'
ptxas info    : Function properties for _Z12scale_kernelILi256EEvPff
    0 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 364 bytes cmem[0]
"""


def test_parse_ptxas_log():
    funcs = gbc.parse_ptxas_log(NVCC_LOG)
    assert funcs["_Z5plainPi"] == dict(entry=True, stack=0, spill_stores=0, spill_loads=0, registers=8, smem=0)
    assert funcs["_Z12scale_kernelILi256EEvPff"] == dict(entry=True, stack=0, spill_stores=12, spill_loads=12,
                                                         registers=10, smem=1024)
    assert funcs["_Z6helperPf"] == dict(entry=False, stack=16, spill_stores=8, spill_loads=4)
    # Triton's bundled sm_90 assembler prefixes its lines differently
    hopper = NVCC_LOG.replace("ptxas info", "ptxas-blackwell info").replace("'sm_80'", "'sm_90a'")
    assert gbc.parse_ptxas_log(hopper) == funcs


def test_short_kernel_name():
    pretty = "void (anonymous namespace)::patchify_kernel<float, __half>(float const*, __half*, params)"
    assert gbc._short_kernel_name(pretty) == "patchify_kernel<float, __half>"
    assert gbc._short_kernel_name("plain(int*)") == "plain"


def test_status_and_table_flag_spills_and_shared_memory():
    ok = gbc.BuildResult("k[ok]", "cuda", "-", 80, registers=8, spill_stores=0, spill_loads=0, shared=1024)
    spill = gbc.BuildResult("k[spill]", "cuda", "-", 80, registers=10, spill_stores=12, spill_loads=0, shared=0)
    smem = gbc.BuildResult("k[smem]", "triton", "M128 w8 s3", 80, registers=128, spill_stores=0, spill_loads=0,
                           shared=gbc.SMEM_LIMIT[80] + 1)
    fits_h100 = gbc.BuildResult("k[smem]", "triton", "M128 w8 s3", 90, registers=128, spill_stores=0,
                                spill_loads=0, shared=gbc.SMEM_LIMIT[80] + 1)
    assert ok.ok and fits_h100.ok and not spill.ok and not smem.ok
    assert "spill" in spill.status and "smem" in smem.status
    assert gbc.Report([ok, fits_h100]).exit_code == 0
    assert gbc.Report([ok, spill]).exit_code == 1
    assert gbc.Report([]).exit_code == 1  # nothing compiled is a broken setup, not a pass
    lines = gbc.format_table([ok, spill, smem]).splitlines()
    assert lines[0].split() == ["kernel", "config", "arch", "regs", "spills", "smem", "status"]
    cells = lines[3].split()
    assert cells[:6] == ["k[spill]", "-", "sm_80", "10", "12", "0"] and cells[6] == "FAIL"


def test_unaligned_variants_drop_the_divisibility_hints_and_allow_spills():
    shipped, _ = gbc.discover_builds()
    hinted = [b for b in shipped if b.attrs]
    variants = gbc.unaligned_variants(shipped)
    assert len(variants) == len(hinted) > 0
    for b, v in zip(hinted, variants):
        assert v.label == b.label + "{unaligned}" and v.attrs == {}
        assert (v.kernel, v.signature, v.constexprs, v.num_warps, v.num_stages) == (
            b.kernel, b.signature, b.constexprs, b.num_warps, b.num_stages)
    spill = dict(kind="triton", config="-", arch=90, registers=255, spill_stores=8, spill_loads=8, shared=0)
    assert gbc.BuildResult("k[x]{unaligned}", **spill).ok
    assert not gbc.BuildResult("k[x]", **spill).ok
    assert not gbc.BuildResult("k[x]{unaligned}", **dict(spill, error="boom")).ok   # errors still fail


@pytest.mark.slow
@pytest.mark.skipif(gbc.find_nvcc() is None, reason="nvcc not installed")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    src = tmp_path / "tiny_kernel.cu"
    src.write_text("__global__ void tiny_kernel(float* x) { __shared__ float s[64]; s[threadIdx.x] = x[threadIdx.x];"
                   " __syncthreads(); x[threadIdx.x] = s[63 - threadIdx.x]; }\n")
    report = gbc.check(archs=(80,), builds=[], cuda_sources=[src], jobs=1)
    [row] = report.results
    assert row.label == "tiny_kernel.cu:tiny_kernel" and row.ok, row.status
    assert row.shared == 256 and row.registers > 0 and row.spills == 0
    assert report.exit_code == 0


def test_cli_with_nothing_selected_fails(capsys):
    assert gbc.main(["--filter", "no-kernel-has-this-label", "--no-cache"]) == 1
    assert "matched no kernel" in capsys.readouterr().out


def test_nvcc_missing_is_a_note(monkeypatch, tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k() {}\n")
    monkeypatch.setattr(gbc, "find_nvcc", lambda: None)
    report = gbc.check(archs=(80,), builds=[], cuda_sources=[src])
    assert report.results == [] and any("nvcc not found" in n for n in report.notes)
    assert report.exit_code == 0  # a skip, not a failure
