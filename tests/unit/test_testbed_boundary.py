"""The test bed is not the product: ``sharedlvm_testbed`` may import ``sharedlvm``,
never the reverse, so a production host needs none of the test bed (issue 14)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PRODUCT_DIR = Path(__file__).resolve().parents[2] / "src" / "sharedlvm"
TESTBED = "sharedlvm_testbed"


def test_importing_the_product_loads_no_test_bed_module() -> None:
    # A fresh interpreter: this test process has imported the test bed already.
    code = ("import json, sys\n"
            "import sharedlvm, sharedlvm.cli, sharedlvm.daemon\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({TESTBED!r}))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def _imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a source file under root (the directory
    holding its top-level package), relative imports resolved; also the constant
    names given to ``importlib.import_module`` and ``__import__``."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def _testbed_imports(package_dir: Path) -> list[str]:
    return [f"{path.relative_to(package_dir.parent)}:{line}: {module}"
            for path in sorted(package_dir.rglob("*.py"))
            for line, module in _imported_modules(path, package_dir.parent)
            if module == TESTBED or module.startswith(TESTBED + ".")]


def test_no_product_source_imports_the_test_bed() -> None:
    assert (PRODUCT_DIR / "__init__.py").is_file()
    assert _testbed_imports(PRODUCT_DIR) == []


def test_the_source_check_sees_every_form_of_import(tmp_path: Path) -> None:
    package = tmp_path / "sharedlvm"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import errors\n")
    (package / "sub" / "x.py").write_text(
        "import os, sharedlvm_testbed.sim\n"
        "from sharedlvm_testbed import cli\n"
        "from .. import sharedlvm_testbed\n"  # resolves to sharedlvm.sharedlvm_testbed
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('sharedlvm_testbed.vmbed')\n")
    assert _testbed_imports(package) == [
        "sharedlvm/sub/x.py:1: sharedlvm_testbed.sim",
        "sharedlvm/sub/x.py:2: sharedlvm_testbed",
        "sharedlvm/sub/x.py:2: sharedlvm_testbed.cli",
        "sharedlvm/sub/x.py:6: sharedlvm_testbed.vmbed",
    ]


def _import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports, at any depth of the file
    (a function-level import is an import too), except under ``if TYPE_CHECKING``."""
    root = package_dir.parent
    name = package_dir.name
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = {n.lineno for block in ast.walk(tree) if isinstance(block, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(block.test)
                     for stmt in block.body for n in ast.walk(stmt) if hasattr(n, "lineno")}
        targets = set()
        for line, imported in _imported_modules(path, root):
            if line in type_only or not imported.startswith(name):
                continue
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]  # "pkg.mod.Name" -> "pkg.mod"
            if imported and imported != module and not module.startswith(imported + "."):
                targets.add(imported)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    """Neither package has an import cycle, not even one hidden in a function-level
    import (the package's __init__ re-exporting its modules excepted)."""
    for package in (PRODUCT_DIR, PRODUCT_DIR.parent / TESTBED):
        graph = _import_graph(package)
        for deps in graph.values():
            deps.discard(package.name)  # "from sharedlvm import errors" names a module
        assert _cycles(graph) == [], package.name
