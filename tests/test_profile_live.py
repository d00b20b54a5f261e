"""``AUTOVN_PROFILE_DIR``, live: two real nodes in namespaces this test makes, started with it
set, carry pings; when they stop, every worker of both has written its cProfile statistics,
and each file holds its stage's own work."""

from __future__ import annotations

import pstats
from pathlib import Path

import pytest

from supervisor.testbed import Testbed, stop_all, two_nodes, wait_for

pytestmark = pytest.mark.netns

WORK = {
    "tap_reader": "pipeline/tap_reader/stage.py",
    "classifier": "pipeline/classifier/stage.py",
    "overlay_io": "pipeline/overlay_io/stage.py",
    "control": "pipeline/control/stage.py",
}


def test_every_worker_writes_its_profile_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = tmp_path / "profiles"
    where.mkdir()
    monkeypatch.setenv("AUTOVN_PROFILE_DIR", str(where))
    with Testbed("avpf") as tb:
        a, b = two_nodes(tb, tmp_path)
        wait_for("a ping", lambda: a.ns.run(["ping", "-c1", "-W1", b.address], check=False)
                 .returncode == 0, timeout=30)  # fmt: skip
        stop_all([a, b])
    files = sorted(where.glob("*.prof"))
    assert sorted(f.name.split("-")[0] for f in files) == sorted(
        f"{stage}0" for stage in WORK for _ in (a, b)
    )
    for f in files:
        stage = f.name.split("-")[0][:-1]
        functions = pstats.Stats(str(f)).stats  # type: ignore[attr-defined]
        assert any(path.endswith(WORK[stage]) and name == "work" for path, _, name in functions), (
            f"{f.name}: no {stage} work() in it"
        )
