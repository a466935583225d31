"""The house rules, read off the source: lower layers never import higher ones, the production path never imports
the oracle (``vlmkern.reference``), the Triton backends live in their own rooms, and no module imports itself back
through a circle. Static (every ``import`` in a module, also those inside functions), so a lazy import can't hide.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import vlmkern

ROOT = Path(vlmkern.__file__).parent

# Level of each part of the package; a module may import its own level or lower. `reference` is the oracle,
# beside the kernels: it may use the shared mask rule (vlmkern.masks) but nothing that it checks.
LEVELS = {
    "vlmkern._version": 0, "vlmkern._ext": 0, "vlmkern.masks": 0, "vlmkern.testing": 0,
    "vlmkern.kernels": 1, "vlmkern.reference": 1,
    "vlmkern.ops": 2, "vlmkern.nn": 3, "vlmkern.models": 4, "vlmkern.integrations": 5,
    # tools above every layer: they build, check and report on the layers below
    "vlmkern.parity": 6, "vlmkern.__main__": 6, "vlmkern.tools": 6,
}
PRODUCTION = ("vlmkern.kernels", "vlmkern.ops", "vlmkern.nn", "vlmkern.models", "vlmkern.integrations")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _part(module: str) -> str | None:
    """The entry of LEVELS a module belongs to (longest prefix), None for the package root."""
    best = None
    for key in LEVELS:
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def _imports(module: str) -> set[str]:
    """vlmkern modules ``module`` imports: ``from a import b`` counts as ``a.b`` when that is a module."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES}


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_level():
    missing = [m for m in MODULES if m != "vlmkern" and _part(m) is None]
    assert not missing, f"modules outside every layer of tests/test_layers.py's LEVELS: {missing}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "vlmkern"))
def test_lower_layers_never_import_higher_ones(module):
    level = LEVELS[_part(module)]
    upward = sorted(m for m in GRAPH[module] if m != "vlmkern" and LEVELS[_part(m)] > level)
    assert not upward, f"{module} (level {level}) imports higher layers: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(PRODUCTION)))
def test_the_production_path_never_imports_the_oracle(module):
    oracle = sorted(m for m in GRAPH[module] if m.startswith("vlmkern.reference"))
    assert not oracle, f"{module} imports the oracle {oracle}: production code has its own implementation"


def test_kernels_hold_triton_jit_only():
    """No launch configs or builds in kernels/: those live beside the launchers, in ops/<family>/_triton.py."""
    for module in (m for m in MODULES if m.startswith("vlmkern.kernels.")):
        text = MODULES[module].read_text()
        assert "register_builds" not in text and not re.search(r"^\w*CONFIGS?\w* *=", text, re.M), module


def test_op_bodies_do_not_branch_on_the_selected_backend():
    """Backends are registered per device (dispatch.implement), not chosen by ``if select() == ...`` in an op."""
    for module in (m for m in MODULES if m.startswith("vlmkern.ops.")):
        text = MODULES[module].read_text()
        assert '.select(' not in text or module == "vlmkern.ops.dispatch", f"{module} branches on select()"


def test_no_import_circle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if n == "vlmkern" or n == m:
                continue
            if state.get(n) == 1:
                circle = stack[stack.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(circle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_importing_vlmkern_loads_no_oracle():
    """``import vlmkern`` loads the op layer and the modules, never the oracle (it loads on first access)."""
    import subprocess
    import sys
    code = "import sys, vlmkern; print(sorted(m for m in sys.modules if m.startswith('vlmkern.reference')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    assert out.strip() == "[]", out
