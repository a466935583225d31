"""Library plumbing: dispatch, the tolerance rule, `python -m vlmkern info`, import without extensions."""
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from vlmkern.ops import dispatch as _dispatch
from vlmkern.ops.dispatch import BackendNotSupported, OpDispatch
from vlmkern.testing import assert_close, bound


def _toy():
    return OpDispatch("toy", {"triton": lambda x: [] if x > 0 else ["x must be positive"],
                              "reference": lambda x: []})


def test_dispatch_prefers_first_capable_backend(monkeypatch):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    assert _toy().select(1) == "triton"
    assert _toy().select(-1) == "reference"


def test_forced_backend_explains_refusal(monkeypatch):
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    with pytest.raises(BackendNotSupported, match="x must be positive"):
        _toy().select(-1)
    monkeypatch.setenv("VLMKERN_BACKEND", "reference")
    assert _toy().select(1) == "reference"
    monkeypatch.setenv("VLMKERN_BACKEND", "cuda")  # an op without the forced backend refuses, naming its own
    with pytest.raises(BackendNotSupported, match=r"VLMKERN_BACKEND=cuda: vlmkern::toy has no cuda backend "
                                                  r"\(its backends: triton, reference\)"):
        _toy().select(1)


def test_dispatch_logs_the_backend_taken_and_why_not_the_others(monkeypatch, caplog):
    monkeypatch.delenv("VLMKERN_BACKEND", raising=False)
    with caplog.at_level(logging.DEBUG, logger="vlmkern"):
        assert _toy().select(-1) == "reference"
        monkeypatch.setenv("VLMKERN_BACKEND", "triton")
        assert _toy().select(1) == "triton"
    assert [r.getMessage() for r in caplog.records] == [
        "vlmkern::toy -> reference; not triton: x must be positive",
        "vlmkern::toy -> triton (forced by VLMKERN_BACKEND)"]
    caplog.clear()
    monkeypatch.delenv("VLMKERN_BACKEND")
    with caplog.at_level(logging.INFO, logger="vlmkern"):
        _toy().select(-1)
    assert not caplog.records


def test_logger_is_silent_by_default():
    out = subprocess.run([sys.executable, "-c", "import logging, vlmkern, torch; "
                          "print(logging.getLogger('vlmkern').handlers); "
                          "vlmkern.ops.linear_gelu(torch.randn(2, 4), torch.randn(3, 4), None)"],
                         capture_output=True, text=True, check=True)
    assert "NullHandler" in out.stdout and out.stderr == ""


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("VLMKERN_BACKEND", "tpu")
    with pytest.raises(ValueError, match="VLMKERN_BACKEND='tpu'"):
        _dispatch.forced_backend()


@pytest.mark.parametrize("version, too_old", [("3.6.0", True), ("3.7.0", False), ("3.9.0+git1a2b", False)])
def test_old_triton_interpreter_is_refused_with_a_reason(monkeypatch, version, too_old):
    import triton
    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VLMKERN_BACKEND", "triton")
    reasons = _dispatch.triton_env_reasons(torch.device("cpu"))
    assert (reasons == [f"the Triton interpreter of triton {version} cannot run vlmkern's kernels (needs >= 3.7)"]
            if too_old else reasons == [])


def test_tolerance_rule_accepts_and_rejects():
    ref = torch.randn(1000, dtype=torch.float64)
    base = ref.to(torch.bfloat16)
    good = (ref + (base.double() - ref) * 1.5).to(torch.bfloat16)
    assert_close(base, base, ref, dtype=torch.bfloat16)
    assert_close(good.double(), base, ref, dtype=torch.bfloat16)
    bad = ref.clone()
    bad[3] += 10 * bound(base, ref, torch.bfloat16)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close(bad, base, ref, dtype=torch.bfloat16)
    nan = ref.clone()
    nan[0] = float("nan")
    with pytest.raises(AssertionError):
        assert_close(nan, base, ref, dtype=torch.bfloat16)


def test_info_command_lists_ops_and_reasons():
    out = subprocess.run([sys.executable, "-m", "vlmkern", "info"], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "0"}).stdout
    assert "patch_embed" in out and "reference  ok" in out
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET=1 is not set" in out


def test_integrations_and_models_load_on_first_access():
    """``import vlmkern; vlmkern.integrations.hf.apply(model)`` as the README writes it; transformers and the
    models stay unimported until then."""
    code = ("import sys, vlmkern; assert 'transformers' not in sys.modules and 'vlmkern.models' not in sys.modules; "
            "assert callable(vlmkern.integrations.hf.apply) and vlmkern.models.cogvlm.VisionExpertMLP; "
            "assert 'transformers' not in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        __import__("vlmkern").nope


WHEEL_CHECK = """
import importlib.resources, sys
import torch, vlmkern
from vlmkern import _ext
assert vlmkern.__file__.startswith(sys.prefix), vlmkern.__file__   # the installed wheel, not a checkout
assert _ext.cpu_ext() is not None, _ext.cpu_ext_error()
assert importlib.resources.files("vlmkern").joinpath("py.typed").is_file()
assert vlmkern.ops.patchify(torch.zeros(1, 3, 30, 30, dtype=torch.uint8)).shape == (1, 1, 2700)
assert callable(vlmkern.integrations.hf.apply) and "transformers" not in sys.modules
print("wheel ok", vlmkern.__version__)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VLMKERN_TEST_WHEEL") != "1",
                    reason="builds a wheel and a clean virtualenv (~5 min on 2 cores): set VLMKERN_TEST_WHEEL=1")
def test_wheel_installs_and_imports_in_a_clean_venv(tmp_path):
    """The documented wheel build (``pip wheel --no-build-isolation --no-deps .``) installed with ``--no-deps``
    into a virtualenv that sees no site-packages, next to the same torch / Triton versions from the index."""
    import venv

    import triton
    root = pathlib.Path(__file__).resolve().parents[1]
    run = lambda *cmd, **kw: subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # noqa: E731
    run(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "whl"),
        str(root))
    wheel, = (tmp_path / "whl").glob("vlmkern-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    py = str(tmp_path / "venv" / "bin" / "python")
    run(py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}",
        f"triton=={triton.__version__}", "numpy")
    run(py, "-m", "pip", "install", "-q", "--no-deps", str(wheel))
    out = run(py, "-c", WHEEL_CHECK, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert "wheel ok" in out.stdout


def test_setup_without_torch_says_to_install_it_and_use_no_build_isolation():
    """What pip's isolated build (no torch in it) shows instead of a bare 'No module named torch'."""
    root = pathlib.Path(__file__).resolve().parents[1]
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert res.returncode == 1, res.stdout
    assert "torch is not importable" in res.stderr and "pip install --no-build-isolation" in res.stderr, res.stderr
