"""The README's main command: ``supervisor demo`` builds, measures and removes a network."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supervisor.netns import leftover_namespaces

pytestmark = pytest.mark.netns


def test_demo_prints_a_table_and_leaves_nothing() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--seconds", "1", "--pings", "3"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["from", "address"]
    rows = [line.split() for line in lines[1:3]]
    assert {r[0] for r in rows} == {"alpha", "beta"}
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0 and row[6] == "direct"
    assert "everything removed" in res.stdout
    assert "[demo] both nodes up" in res.stderr
    assert leftover_namespaces("avdemo") == []
