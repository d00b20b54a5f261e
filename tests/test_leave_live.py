"""A node that stops leaves the overlay, live: two real nodes in namespaces this test makes;
``supervisor stop`` on one sends a Close over its overlay connection before overlay_io goes,
and the other drops the connection as closed by a leave at once (not after its 4 s ping
timeout or the connection's silence)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from supervisor.testbed import Node, Testbed, stop_all, two_nodes, wait_for

pytestmark = pytest.mark.netns


def _records(node: Node, event: str) -> list[dict[str, object]]:
    return [r for r in node.log_records() if r.get("event") == event]


def test_a_stopped_node_leaves_and_its_neighbour_drops_it_at_once(tmp_path: Path) -> None:
    with Testbed("avlv") as tb:
        a, b = two_nodes(tb, tmp_path)
        wait_for("an overlay connection", lambda: _records(a, "overlay_connection_added"), 30)
        stopped = time.time()
        stop_all([b])
        removed = wait_for(
            "a drops b",
            lambda: _records(a, "overlay_connection_removed"),
            timeout=10,
        )
        seen = time.time() - stopped
    assert [r["reason"] for r in removed] == ["closed_leave"], removed
    assert seen < 3.0, f"a dropped b {seen:.2f} s after the stop"
    (left,) = _records(b, "overlay_left")
    assert left["connections"] == 1
    assert not [r for r in _records(b, "worker_killed")]
