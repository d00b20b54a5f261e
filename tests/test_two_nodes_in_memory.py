"""Two whole nodes in one process, without root: each node's four workers (tap_reader,
classifier, overlay_io, control) on real shm rings and real ZeroMQ sockets in a temporary
directory, its TAP a ``MemoryTap`` and its UDP port a ``MemoryPort`` on one
``MemoryNetwork``. The nodes are certified by a fresh authority and name each other as static
peers (Noise IK), so control handshakes over the memory network, hands the session keys to
overlay_io and publishes the routes; then a ping crosses: an ICMP echo request written by
alpha's "kernel" comes out of beta's TAP as the same packet, and beta's echo reply comes out
of alpha's.

Nothing here needs root: no TAP device, no namespace, no privileged socket. The underlay
addresses exist only as keys of the memory network, and control opens no port mapping socket
(``nat.port_mapping = false``), so no datagram leaves the process.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import structlog

from pipeline.classifier.stage import ClassifierWorker
from pipeline.config import GATEWAY_MAC, Settings, settings_from_mapping
from pipeline.control.stage import ControlWorker
from pipeline.overlay_io.stage import OverlayIoWorker
from pipeline.overlay_io.udp import MemoryNetwork
from pipeline.tap_reader.device import MemoryTap
from pipeline.tap_reader.stage import TapReaderWorker
from pipeline.topology import Stage
from pipeline.wire import arp, ethernet, ipv4
from supervisor.testbed.nodes import Authority
from tests.test_inside import Inside, Loops, wait_for

A = IPv4Address
PORT = 4789
NAMES = ("alpha", "beta")
UNDERLAY = ("198.18.0.1", "198.18.0.2")  # keys of the memory network, not real addresses
VIRTUAL = (A("100.64.0.1"), A("100.64.0.2"))
SLOT = 1  # each node's one static peer


@pytest.fixture(autouse=True)
def quiet_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two nodes' workers share one process, so one structlog: no per-node log files."""
    monkeypatch.setattr("pipeline.worker.configure_logging", lambda **kw: structlog.get_logger())


def settings(tmp: Path, me: int, authority: Authority, peer_key: str) -> Settings:
    name, peer = NAMES[me], 1 - me
    root = tmp / name
    (root / "run").mkdir(parents=True, exist_ok=True)
    return settings_from_mapping(
        {
            "node": {
                "name": name,
                "state_dir": str(root / "state"),
                "runtime_dir": str(root / "run"),
            },
            "network": {
                "namespace": "test",
                "subnet": "100.64.0.0/24",
                "address": str(VIRTUAL[me]),
            },
            "overlay": {
                "listen_address": UNDERLAY[me],
                "listen_port": PORT,
                "keepalive_interval_s": 1.0,
            },
            "peers": [
                {
                    "name": NAMES[peer],
                    "addresses": [str(VIRTUAL[peer])],
                    "endpoint": f"{UNDERLAY[peer]}:{PORT}",
                    "public_key": peer_key,
                }
            ],
            "security": {"ca_certificate": str(authority.path)},
            "nat": {"port_mapping": False},
        }
    )


@dataclass
class MemoryNode:
    """One node: its rings, its four workers and its TAP."""

    settings: Settings
    inside: Inside
    tap: MemoryTap
    control: ControlWorker
    io: OverlayIoWorker
    classifier: ClassifierWorker


def start_node(s: Settings, net: MemoryNetwork, made: list[Inside]) -> MemoryNode:
    """The rings of every worker of the node, and its workers set up in start order (control
    first: it binds the ZeroMQ sockets the others connect to), the twins injected."""
    inside = Inside(s, set(s.stages.topology().workers()))
    made.append(inside)
    tap = MemoryTap()
    workers = {
        Stage.CONTROL: ControlWorker(s, 0, inside.specs),
        Stage.OVERLAY_IO: OverlayIoWorker(
            s, 0, inside.specs, port=net.port(str(s.overlay.listen_address), PORT)
        ),
        Stage.CLASSIFIER: ClassifierWorker(s, 0, inside.specs),
        Stage.TAP_READER: TapReaderWorker(s, 0, inside.specs, open_tap=lambda name, **kw: tap),
    }
    for worker in workers.values():  # a dict keeps the start order it was written in
        inside.start(worker)
    control, io, classifier = (
        workers[k] for k in (Stage.CONTROL, Stage.OVERLAY_IO, Stage.CLASSIFIER)
    )
    assert isinstance(control, ControlWorker) and isinstance(io, OverlayIoWorker)
    assert isinstance(classifier, ClassifierWorker)
    return MemoryNode(s, inside, tap, control, io, classifier)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[MemoryNode, MemoryNode, MemoryNetwork]]:
    authority = Authority.create(tmp_path / "authority")
    keys = [authority.certify(tmp_path / name / "state", name).public_key.hex() for name in NAMES]
    net = MemoryNetwork(record=True)
    made: list[Inside] = []
    try:
        a, b = (
            start_node(settings(tmp_path, me, authority, keys[1 - me]), net, made) for me in (0, 1)
        )
        yield a, b, net
    finally:
        for inside in reversed(made):
            inside.close()


# -- frames as the kernels on either side write and read them ---------------------------------


def icmp_echo(kind: int, ident: int, seq: int, data: bytes) -> bytes:
    """An ICMP echo request (8) or reply (0), with its checksum."""
    body = bytearray(struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data)
    body[2:4] = ipv4.checksum(memoryview(body)).to_bytes(2, "big")
    return bytes(body)


def ping_packet(src: IPv4Address, dst: IPv4Address, kind: int, seq: int) -> bytes:
    data = b"autovn in memory " * 3
    payload = icmp_echo(kind, 0x4156, seq, data)
    return ipv4.build(src=src, dst=dst, protocol=ipv4.Protocol.ICMP, payload=payload, ttl=64)


def from_kernel(node: MemoryNode, packet: bytes) -> bytes:
    """What the node's kernel writes to its TAP: to the gateway's MAC (the node's ARP
    answer for every virtual address)."""
    return ethernet.build(GATEWAY_MAC, node.settings.tap_mac, ethernet.ETHERTYPE_IPV4, packet)


def to_kernel(node: MemoryNode, packet: bytes) -> bytes:
    """What the node writes to its TAP for its kernel: from the gateway's MAC."""
    return ethernet.build(node.settings.tap_mac, GATEWAY_MAC, ethernet.ETHERTYPE_IPV4, packet)


def next_written(node: MemoryNode, what: str) -> bytes:
    wait_for(what, lambda: bool(node.tap.written))
    return node.tap.written.popleft()


def peer_reachable(node: MemoryNode, peer_address: IPv4Address) -> Callable[[], bool]:
    """The classifier routes to the peer and overlay_io holds a session for it."""
    return lambda: (
        node.classifier.core.routes.lookup(peer_address.packed) == SLOT and SLOT in node.io.send
    )


def test_a_ping_crosses_two_whole_nodes_in_one_process(
    pair: tuple[MemoryNode, MemoryNode, MemoryNetwork],
) -> None:
    a, b, net = pair
    loops = Loops(
        [w for n in (a, b) for w in n.inside.workers]  # eight loops, each on its own thread
    )
    try:
        wait_for("alpha's link to beta", peer_reachable(a, VIRTUAL[1]), timeout_s=30)
        wait_for("beta's link to alpha", peer_reachable(b, VIRTUAL[0]), timeout_s=30)
        # an overlay message control hands over before overlay_io has installed the link's
        # session is a counted drop (the overlay retries): what counts is nothing lost from here
        drops_at_start = [dict(n.io.stats()["drops"]) for n in (a, b)]

        # alpha's kernel asks for beta's MAC: the classifier answers as the gateway
        request = arp.ArpPacket(
            arp.ArpOp.REQUEST, a.settings.tap_mac, VIRTUAL[0], bytes(6), VIRTUAL[1]
        )
        a.tap.inject(
            ethernet.build(
                ethernet.BROADCAST, a.settings.tap_mac, ethernet.ETHERTYPE_ARP, arp.build(request)
            )
        )
        frame = next_written(a, "the ARP reply")
        assert ethernet.parse(frame).ethertype == ethernet.ETHERTYPE_ARP
        answer = arp.parse(frame[ethernet.HEADER_LEN :])
        assert (answer.op, answer.sender_mac, answer.sender_ip) == (
            arp.ArpOp.REPLY,
            GATEWAY_MAC,
            VIRTUAL[1],
        )

        for seq in range(1, 4):
            echo = ping_packet(VIRTUAL[0], VIRTUAL[1], 8, seq)
            a.tap.inject(from_kernel(a, echo))
            assert next_written(b, f"echo request {seq} at beta") == to_kernel(b, echo)
            reply = ping_packet(VIRTUAL[1], VIRTUAL[0], 0, seq)
            b.tap.inject(from_kernel(b, reply))
            assert next_written(a, f"echo reply {seq} at alpha") == to_kernel(a, reply)
    finally:
        loops.stop()
    # the echoes crossed the memory network sealed: DATA datagrams, never the packet itself
    sent = net.sent
    assert sent is not None
    assert not any(echo[20:] in datagram for datagram, _, _ in sent)
    assert net.lost == net.dropped == 0
    for node, drops in zip((a, b), drops_at_start, strict=True):
        assert list(node.tap.written) == []
        io = node.io.stats()
        assert io["encrypted"] and io["drops"] == drops and io["datagrams_received"] >= 3
        assert set(drops) <= {"no_session"}
        tap = node.inside.workers[-1].stats()
        assert tap["frames_read"] >= 3 and tap["frames_written"] >= 3
        assert node.control.deadline_statistics()["fired"] > 0  # its timers ran on the deadline
