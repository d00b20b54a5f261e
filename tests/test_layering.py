"""The fence: everything in ``pipeline/`` is pure (sans-I/O) except the drivers named below;
no stage package imports another; the supervisor imports no stage package.

Pure means: it imports no socket, zmq, asyncio, time, os, threading, secrets, subprocess,
select, mmap, pytun, structlog, io, datetime or pathlib, calls no module-level ``random``
function (``random.Random`` instances are passed in), and imports only pure project modules.
A new module is pure unless it is added to ``DRIVERS`` (and a reviewer agrees).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipeline"
STAGES = ("tap_reader", "classifier", "overlay_io", "control")

DRIVERS = frozenset(
    {
        # the stages' drivers: the only code that touches devices, sockets, rings and clocks
        "pipeline/tap_reader/__main__.py",
        "pipeline/tap_reader/stage.py",
        "pipeline/tap_reader/device.py",
        "pipeline/classifier/__main__.py",
        "pipeline/classifier/stage.py",
        "pipeline/overlay_io/__main__.py",
        "pipeline/overlay_io/stage.py",
        "pipeline/overlay_io/udp.py",
        "pipeline/control/__main__.py",
        "pipeline/control/stage.py",
        "pipeline/control/upnp_client.py",  # UPnP IGD's blocking calls, in a thread
        # what every driver shares: the run loop, the rings, route snapshots, logs
        "pipeline/worker.py",
        "pipeline/shm_ring.py",
        "pipeline/route_feed.py",
        "pipeline/log.py",
        # files: settings and keys are read (and state written) at the edges
        "pipeline/config.py",
        "pipeline/crypto/keyfiles.py",
        "pipeline/statefiles.py",
    }
)
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
    "fcntl",
    "signal",
    "ctypes",
}


def module_name(path: Path) -> str:
    name = str(path.relative_to(ROOT).with_suffix("")).replace("/", ".")
    return name.removesuffix(".__init__")


def all_modules() -> list[Path]:
    return sorted(PIPELINE.rglob("*.py"))


def pure_files() -> list[Path]:
    return [p for p in all_modules() if str(p.relative_to(ROOT)) not in DRIVERS]


def imported(tree: ast.AST, module: str) -> set[str]:
    """Every module name ``tree`` imports (absolute; relative imports resolved)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_every_driver_exists() -> None:
    """A driver that was renamed or removed must leave the list (or the fence has a hole)."""
    missing = sorted(d for d in DRIVERS if not (ROOT / d).exists())
    assert not missing


def test_there_are_pure_modules() -> None:
    assert len(pure_files()) >= 50


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    tops = {name.split(".")[0] for name in imported(tree, module_name(path))}
    io = sorted(tops & FORBIDDEN)
    assert not io, f"{module_name(path)} is pure but imports {io} (or belongs in DRIVERS)"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert node.value.id != "random" or node.attr == "Random", f"random.{node.attr}"


@pytest.mark.parametrize("path", pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_imports_only_pure_project_modules(path: Path) -> None:
    drivers = {module_name(ROOT / d) for d in DRIVERS}
    names = imported(ast.parse(path.read_text()), module_name(path))
    found = sorted(names & drivers)
    assert not found, f"{module_name(path)} is pure but imports the drivers {found}"


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pipeline" and parts[1] in STAGES else None


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stage_imports_another(path: Path) -> None:
    module = module_name(path)
    names = imported(ast.parse(path.read_text()), module)
    mine = stage_of(module)
    others = {stage_of(n) for n in names} - {None, mine}
    if mine is None and module.startswith("pipeline.sim"):
        others -= {"control"}  # the simulator drives control's cores: it is not a stage
    assert not others, f"{module} imports stage packages {sorted(o for o in others if o)}"


@pytest.mark.parametrize(
    "path", sorted((ROOT / "supervisor").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_supervisor_imports_no_stage_package(path: Path) -> None:
    names = imported(ast.parse(path.read_text()), module_name(path))
    assert not {stage_of(n) for n in names} - {None}


def test_the_fence_catches_a_violation(tmp_path: Path) -> None:
    """The checks themselves fail on what they must catch."""
    core = ast.parse("import socket\nfrom pipeline.worker import Worker\n")
    assert "socket" in {n.split(".")[0] for n in imported(core, "pipeline.control.x")}
    assert "pipeline.worker" in imported(core, "pipeline.control.x")
    cross = ast.parse("from pipeline.overlay_io.relay import RelayTable\n")
    stages = {stage_of(n) for n in imported(cross, "pipeline.classifier.stage")}
    assert "overlay_io" in stages
    relative = ast.parse("from ..overlay_io import relay\n")
    assert "pipeline.overlay_io" in imported(relative, "pipeline.classifier.stage")


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
