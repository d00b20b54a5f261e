"""The README's commands are the ones that work: CI runs exactly its test command, and its
install command sets up a fresh virtual environment from which ``supervisor`` and pytest run
(issue 14: `pip install -e .` outside a venv stopped with externally-managed-environment,
and `python3 -m pytest` found no pytest after the README's install)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def blocks(section: str) -> list[list[str]]:
    """The ``sh`` code blocks of a README section, as lists of command lines."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"```sh\n(.*?)```", body, re.S)
    return [[line for line in b.splitlines() if line.strip()] for b in found]


def commands(script: Path) -> list[str]:
    """What a shell script runs, less comments, ``set`` and the ``cd`` to the clone's root."""
    lines = []
    for raw in script.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith(("set ", 'cd "$(dirname')):
            continue
        lines.append(line)
    return lines


def test_ci_runs_the_readme_test_command_and_nothing_else() -> None:
    (test,) = blocks("Test")
    assert test == ["./scripts/test"]
    assert commands(ROOT / ".ci/run") == test


def test_the_readme_main_command_installs_then_runs_the_demo() -> None:
    main = blocks("Install and run")[0]
    assert main == ["./scripts/install && .venv/bin/supervisor demo"]


def test_scripts_are_executable() -> None:
    for name in ("scripts/install", "scripts/test", ".ci/run"):
        assert os.access(ROOT / name, os.X_OK), name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_into_a_fresh_venv(tmp_path: Path) -> None:
    """The README's install with the test extra (what ``scripts/test`` runs first), into a
    new venv made by Debian's python3: ``supervisor --version`` and ``pytest --version`` then
    work from it, with nothing else on its path."""
    venv = tmp_path / "venv"
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"
    env = dict(os.environ, PYTHON=python)
    res = subprocess.run(
        ["./scripts/install", "--venv", str(venv), "--test"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"making a virtual environment in {venv}" in res.stderr
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = false") == 1
    clean = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run(
        [str(venv / "bin/supervisor"), "--version"], env=clean, capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("supervisor (autovn) ")
    pytest_version = subprocess.run(
        [str(venv / "bin/python"), "-m", "pytest", "--version"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert pytest_version.returncode == 0, pytest_version.stderr
    imports = "import prometheus_client, zmq, pytun, nacl, hypothesis, pytest_timeout"
    res = subprocess.run([str(venv / "bin/python"), "-c", imports], env=clean, cwd=tmp_path)
    assert res.returncode == 0
