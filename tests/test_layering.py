"""The fence around the sans-I/O modules: they import no socket, zmq, asyncio, time, os,
threading, secrets or multiprocessing, and call no module-level random function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = [
    "pipeline/wire",
    "pipeline/classifier/classify.py",
    "pipeline/classifier/routes.py",
    "pipeline/control/peers.py",
    "pipeline/errors.py",
    "pipeline/crypto/noise.py",
    "pipeline/crypto/identity.py",
    "pipeline/crypto/cert.py",
    "pipeline/control/handshake.py",
    "pipeline/control/links.py",
    "pipeline/crypto/datapath.py",
    "pipeline/control/overlay",
    "pipeline/control/dht",
    "pipeline/sim",
    "pipeline/records.py",
    "pipeline/messages.py",
    "pipeline/control/core.py",
    "pipeline/control/dns",
    "pipeline/overlay_io/relay.py",
    "pipeline/control/dhcp",
]
FORBIDDEN = {
    "socket",
    "zmq",
    "asyncio",
    "time",
    "os",
    "threading",
    "secrets",
    "multiprocessing",
    "subprocess",
    "select",
    "selectors",
    "mmap",
    "pytun",
    "structlog",
    "io",
    "datetime",
    "pathlib",
}


def pure_files() -> list[Path]:
    files: list[Path] = []
    for entry in PURE:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_there_are_pure_files() -> None:
    assert len(pure_files()) >= 8


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    assert not imports(tree) & FORBIDDEN
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert node.value.id != "random" or node.attr == "Random", f"random.{node.attr}"


def test_pure_package_imports_no_impure_project_module() -> None:
    """Pure modules import only other pure modules of the project."""
    pure = {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".") for p in pure_files()}
    pure |= {name.removesuffix(".__init__") for name in pure}  # a package is its __init__
    for path in pure_files():
        for name in imports(ast.parse(path.read_text())):
            if name == "pipeline":
                tree = ast.parse(path.read_text())
                for node in ast.walk(tree):
                    if (
                        isinstance(node, ast.ImportFrom)
                        and node.module
                        and node.module.startswith("pipeline")
                    ):
                        mods = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                        assert mods & pure, f"{path} imports {node.module}"


def _imports_testbed(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.startswith("supervisor.testbed") for a in node.names)
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module == "supervisor":
            return any(a.name == "testbed" for a in node.names)
        return node.module.startswith("supervisor.testbed")
    return False


def test_the_product_does_not_import_the_test_bed() -> None:
    """The test bed (``supervisor/testbed/``) is for tests, benchmarks and ``supervisor demo``:
    no module of the product imports it, but the demo command, when it runs."""
    product = list((ROOT / "pipeline").rglob("*.py")) + [
        p for p in (ROOT / "supervisor").rglob("*.py") if "testbed" not in p.relative_to(ROOT).parts
    ]
    assert len(product) >= 20
    for path in product:
        tree = ast.parse(path.read_text())
        allowed: set[ast.AST] = set()
        if path == ROOT / "supervisor" / "cli.py":
            (demo,) = [
                n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cmd_demo"
            ]
            allowed = set(ast.walk(demo))
        found = [n for n in ast.walk(tree) if _imports_testbed(n) and n not in allowed]
        assert not found, f"{path.relative_to(ROOT)}:{found[0].lineno} imports the test bed"
