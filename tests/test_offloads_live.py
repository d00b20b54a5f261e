"""Super-frames between two real nodes in namespaces: TAPs with virtio-net headers and TSO,
UDP GSO and GRO on the veth. Data crosses intact (a TCP transfer checked with SHA-256 at the
far end: iperf3 never looks at its bytes), the offloads are really used, and a node without
any of them (no TAP offloads, no GSO/GRO: the fallbacks) talks to one with all of them, both
ways, intact too."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.testbed import Node, Testbed, start_all, two_nodes, wait_for

pytestmark = pytest.mark.netns

SIZE = 8 << 20
PORT = 5301
SINK = r"""
import hashlib, socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(1)
print("listening", flush=True)
conn, _ = server.accept()
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(1 << 20):
    digest.update(chunk)
    total += len(chunk)
print(total, digest.hexdigest(), flush=True)
"""
SOURCE = r"""
import random, socket, sys
data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4]))
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as conn:
    conn.sendall(data)
"""


def transfer(sender: Node, receiver: Node, seed: int) -> tuple[int, str]:
    """``SIZE`` seeded random bytes over TCP from ``sender`` to ``receiver``: (bytes, SHA-256)
    as the receiving end counted them."""
    sink = receiver.ns.popen(
        [sys.executable, "-c", SINK, receiver.address, str(PORT)], stdout=subprocess.PIPE
    )
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == b"listening"
        sender.ns.run(
            [sys.executable, "-c", SOURCE, receiver.address, str(PORT), str(seed), str(SIZE)],
            timeout=120,
        )
        total, digest = sink.stdout.readline().split()
        return int(total), digest.decode()
    finally:
        receiver.ns.testbed.stop(sink)


def expected(seed: int) -> tuple[int, str]:
    return SIZE, hashlib.sha256(random.Random(seed).randbytes(SIZE)).hexdigest()


def stats(node: Node, stage: str) -> dict[str, Any]:
    st = wait_for(f"{node.name} status", node.status, timeout=15)
    found: dict[str, Any] = next(w["stats"] for w in st["workers"] if w["stage"] == stage)
    return found


def settled(node: Node, stage: str, key: str) -> Any:
    """A counter once the heartbeats have carried the last traffic's."""
    first = stats(node, stage)[key]
    return wait_for(f"{node.name} {key}", lambda: (s := stats(node, stage)[key]) == first and s)


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    with Testbed("avo") as tb:
        yield two_nodes(tb, tmp_path_factory.mktemp("offloaded"))


def test_super_frames_cross_intact_both_ways(offloaded: tuple[Node, Node]) -> None:
    a, b = offloaded
    assert transfer(a, b, 1) == expected(1)
    assert transfer(b, a, 2) == expected(2)
    for node in (a, b):
        tap, io = stats(node, "tap_reader"), stats(node, "overlay_io")
        assert tap["vnet"] is True and tap["segmented_in_software"] == 0
        assert io["gso"] is True and io["gro"] is True
        assert io["gso_sends"] > 0 and io["segments_sent"] > 2 * io["gso_sends"]
        assert io["gro_reads"] > 0
        assert io["coalesced"]["frames"] < io["coalesced"]["packets"]
        assert set(io["drops"]) <= {"no_session", "unknown_session"}  # at start only


def test_a_node_without_offloads_talks_to_one_with(tmp_path: Path) -> None:
    """beta has no TAP offloads and no UDP GSO/GRO (as on a kernel that refuses them):
    alpha's partial segments are finished in software there, beta's whole packets go as
    they are, and both directions arrive intact."""
    with Testbed("avf") as tb:
        a, b = two_nodes(tb, tmp_path, start=False)
        text = b.config.read_text()
        text = text.replace("[stages.tap_reader]\n", "[stages.tap_reader]\noffloads = false\n")
        text = text.replace("[stages.overlay_io]\n", "[stages.overlay_io]\noffloads = false\n")
        b.config.write_text(text)
        start_all([a, b], peers_up=True)
        assert transfer(a, b, 3) == expected(3)
        assert transfer(b, a, 4) == expected(4)
        tap_b, io_b = stats(b, "tap_reader"), stats(b, "overlay_io")
        assert tap_b["vnet"] is False and settled(b, "tap_reader", "segmented_in_software") > 0
        assert io_b["gso"] is False and io_b["gro"] is False and io_b["gso_sends"] == 0
        assert stats(a, "overlay_io")["gso_sends"] > 0
