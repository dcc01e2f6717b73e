"""The layering of docs/architecture.md, checked: import-linter's contracts (pyproject.toml) on the package as it
installs (``exporters/`` becomes ``chita_edge.exporters``), no import cycles at all, and the doc names every package.

How to check by hand: ``python tests/test_architecture.py`` prints lint-imports' report for the staged tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def stage(dst: Path) -> Path:
    """A copy of the package laid out as pip installs it: exporters/ and device_profiles/ inside chita_edge/."""
    pkg = dst / "chita_edge"
    shutil.copytree(ROOT / "chita_edge", pkg, ignore=IGNORE)
    shutil.copytree(ROOT / "exporters", pkg / "exporters", ignore=IGNORE)
    shutil.copytree(ROOT / "device_profiles", pkg / "device_profiles", ignore=IGNORE)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def lint_imports(staged: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(staged)}
    return subprocess.run([str(exe), "pyproject.toml", "--no-cache"], cwd=staged, env=env,
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return stage(tmp_path_factory.mktemp("staged"))


@pytest.fixture(scope="module")
def graph(staged):
    grimp = pytest.importorskip("grimp")
    sys.path.insert(0, str(staged))
    saved = {k: v for k, v in sys.modules.items() if k == "chita_edge" or k.startswith("chita_edge.")}
    for k in saved:
        del sys.modules[k]
    try:
        yield grimp.build_graph("chita_edge", cache_dir=None)
    finally:
        sys.path.remove(str(staged))
        for k in [k for k in sys.modules if k == "chita_edge" or k.startswith("chita_edge.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_the_import_contracts_hold(staged):
    if not Path(sys.executable).with_name("lint-imports").exists():
        pytest.skip("needs import-linter (pip install -e '.[dev]')")
    r = lint_imports(staged)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 4 kept, 0 broken." in r.stdout, r.stdout


def test_a_layer_violation_breaks_the_contracts(tmp_path):
    if not Path(sys.executable).with_name("lint-imports").exists():
        pytest.skip("needs import-linter (pip install -e '.[dev]')")
    staged = stage(tmp_path)
    solver = staged / "chita_edge" / "solvers" / "chita.py"
    solver.write_text(solver.read_text() + "\nfrom chita_edge.pruning import layers  # noqa\n")
    r = lint_imports(staged)
    assert r.returncode != 0 and "BROKEN" in r.stdout


def test_no_module_imports_one_that_imports_it_back(graph):
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            chain = graph.find_shortest_chain(importer=imported, imported=importer)
            if chain:
                cycles.append(" -> ".join((importer, *chain)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:10])


def test_architecture_doc_names_every_package_and_only_real_ones():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`chita_edge/([a-z_]+)/`", doc))
    real = {p.parent.name for p in (ROOT / "chita_edge").glob("*/__init__.py")}
    assert named, "docs/architecture.md names no package"
    assert not named - real, f"docs/architecture.md names packages that do not exist: {sorted(named - real)}"
    assert not real - named, f"packages missing from docs/architecture.md: {sorted(real - named)}"
    layers = re.search(r"```mermaid\n(.*?)```", doc, re.S)
    assert layers, "docs/architecture.md has no mermaid picture"
    for p in real:
        assert p in layers.group(1), f"the picture in docs/architecture.md leaves out {p}"


def test_no_module_is_a_grab_bag():
    """No module over 520 lines unless it is one algorithm and its docstring says so."""
    big = []
    for p in [*(ROOT / "chita_edge").rglob("*.py"), *(ROOT / "exporters").rglob("*.py")]:
        text = p.read_text()
        if text.count("\n") > 520 and "one algorithm" not in text[:3000]:
            big.append(f"{p.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not big, "modules over 520 lines: " + ", ".join(big)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = lint_imports(stage(Path(d)))
        print(r.stdout + r.stderr)
        sys.exit(r.returncode)


def _local_project_imports(path: Path) -> list[tuple[int, str]]:
    import ast

    src = path.read_text()
    lines = src.splitlines()
    found = []
    for fn in ast.walk(ast.parse(src)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and ((node.module or "").startswith("chita_edge") or node.level):
                    found.append((node.lineno, lines[node.lineno - 1]))
    return found


def test_function_local_imports_of_the_project_only_defer_a_heavy_dependency():
    """No import hidden in a function to dodge a cycle: each one says which heavy optional dependency it defers."""
    bad = []
    for p in [*(ROOT / "chita_edge").rglob("*.py"), *(ROOT / "exporters").rglob("*.py")]:
        for line, text in set(_local_project_imports(p)):
            if not re.search(r"# deferred: .*(onnx|LiteRT|runtime)", text):
                bad.append(f"{p.relative_to(ROOT)}:{line}: {text.strip()}")
    assert not bad, "function-local imports of chita_edge without '# deferred: <dependency>':\n" + "\n".join(sorted(bad))


def test_the_local_import_rule_sees_a_hidden_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from chita_edge.core import errors\n    from chita_edge.exporters import onnx_format"
                 "  # deferred: onnx\n")
    assert [ln for ln, _ in _local_project_imports(f)] == [2, 3]


def test_every_package_is_installed():
    """A new subpackage must be listed in pyproject.toml's packages, or a wheel leaves it out."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    real = {"chita_edge." + p.parent.relative_to(ROOT / "chita_edge").as_posix().replace("/", ".")
            for p in (ROOT / "chita_edge").rglob("__init__.py") if p.parent != ROOT / "chita_edge"}
    assert real | {"chita_edge", "chita_edge.exporters", "chita_edge.device_profiles"} == listed
