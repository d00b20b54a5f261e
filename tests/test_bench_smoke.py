"""The in-process benchmarks still run against the current code, at their smallest sizes.

A benchmark nothing runs rots: ``bench/overlay_io_bench.py`` stopped working when overlay_io's
port grew a handshake socket, and nobody saw it until a measurement needed it. These runs
time nothing (the figures at these sizes mean nothing); they check that each script finishes
and prints its table's rows. The namespace benchmarks are run by their own live tests, or
are too long for the suite.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: script, arguments, a pattern every run must print (a table row with a number in it)
SMOKE = [
    ("aead_bench.py", ["--runs", "1", "--sizes", "64", "--target", "0.01"], r"\n\s+64 \S+"),
    ("ring_bench.py", ["--runs", "1", "--scale", "0.01"], r"\n\s+1500\s+[\d,]+\s+[\d,]+"),
    ("hop_bench.py", ["--bounces", "20", "--gaps", "0"], r"\n\s+0\s+[\d.]+\s+[\d.]+"),
    # the child alone: the parent's comparison exports another revision with git
    *(
        (
            "overlay_io_bench.py",
            ["--child", "--modes", mode, "--sizes", size, "--packets", "500"],
            r'"send": [\d.]+, "recv": [\d.]+',
        )
        for mode, size in (("tso", "1400"), ("enc", "64"), ("plain", "1400"))
    ),
]


@pytest.mark.parametrize(
    ("script", "args", "row"), SMOKE, ids=[f"{s[0]} {' '.join(s[1][:3])}" for s in SMOKE]
)
def test_benchmark_runs(script: str, args: list[str], row: str) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(row, res.stdout), res.stdout[-2000:]
