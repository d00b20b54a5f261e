"""overlay_io workers in one process: real shm rings, memory ports on a ``MemoryNetwork``, no
root and no ZeroMQ (what a worker tells control is kept by a stand-in feed). Sealed DATA both
ways, relaying through a third node, plaintext mode, and the memory port itself."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from pipeline import messages, shm_ring
from pipeline.config import settings_from_mapping
from pipeline.crypto import handshake as hs
from pipeline.crypto.datapath import SendSession
from pipeline.crypto.keyfiles import read_certificate
from pipeline.crypto.screen import ScreenSettings, resync_hint
from pipeline.nodeid import NODE_ID_LEN
from pipeline.overlay_io import stage as io_stage
from pipeline.overlay_io.relay import RELAY_TTL, pack_relay, parse_relay
from pipeline.overlay_io.udp import (
    RECV_SIZE,
    Address,
    MemoryNetwork,
    UdpPort,
    spread_by_source,
)
from pipeline.records import RecordKind, pack_endpoint
from pipeline.shm_ring import Consumer, Producer, Ring, RingSpec
from pipeline.topology import Lane, RingEdge, Stage, WorkerId
from pipeline.wire.overlay import DatagramType, build_header, parse_header
from supervisor.testbed.nodes import Authority

SIZE = 1 << 160
KEY_AR, KEY_RA, KEY_RB, KEY_BR, KEY_AB, KEY_BA = (bytes([i]) * 32 for i in range(1, 7))
KEY_NEW_AR, KEY_NEW_RA = bytes([7]) * 32, bytes([8]) * 32


def nid(value: int) -> bytes:
    return (value % SIZE).to_bytes(NODE_ID_LEN, "big")


class FakeFeed:
    """RouteFeed's interface without ZeroMQ: what the worker tells control is kept, and the
    test hands it control's messages through the worker's own callbacks."""

    def __init__(
        self,
        worker: object,
        on_snapshot: Callable[[messages.RouteSnapshot], None],
        on_message: Callable[[messages.Message], None],
    ) -> None:
        self.on_snapshot = on_snapshot
        self.on_message = on_message
        self.told: list[messages.Message] = []

    def tell(self, msg: messages.Message) -> None:
        self.told.append(msg)


class Node:
    """One node's overlay_io workers on memory ports, and the other ends of their rings."""

    def __init__(
        self,
        net: MemoryNetwork,
        name: str,
        host: str,
        node_id: bytes,
        tmp: Path,
        *,
        workers: int = 1,
        plaintext: bool = False,
        gso: bool = True,
        gro: bool = True,
        tap_offloads: bool = True,
        pool_sockets: int = 256,
    ) -> None:
        """``gso``, ``gro``: what the memory ports offer; ``tap_offloads``: whether the node's
        TAP is said to take super-frames (``stages.tap_reader.offloads``); ``pool_sockets``:
        birthday probing's pool size (``nat.pool_sockets``)."""
        self.name, self.address, self.node_id = name, (host, 4789), node_id
        if not plaintext and not (tmp / "authority" / "ca.crt").exists():
            Authority.create(tmp / "authority")
        security = (
            {"insecure_plaintext": True}
            if plaintext
            else {"ca_certificate": str(tmp / "authority" / "ca.crt")}
        )
        data = {
            "node": {"name": name, "state_dir": str(tmp / name), "runtime_dir": str(tmp / name)},
            "network": {"namespace": "lab", "subnet": "100.64.0.0/24", "address": "100.64.0.1"},
            "security": security,
            "overlay": {"listen_address": host},
            "stages": {
                "overlay_io": {"workers": workers},
                "tap_reader": {"offloads": tap_offloads},
            },
            "nat": {"pool_sockets": pool_sockets},
        }
        settings = settings_from_mapping(data)
        self.specs: list[RingSpec] = []
        self.rings: list[Ring] = []
        self.workers: list[io_stage.OverlayIoWorker] = []
        self.to_io: list[Producer] = []  # classifier0 -> overlay_io i
        self.from_control: list[Producer] = []  # control -> overlay_io i
        self.to_classifier: list[Consumer] = []
        self.to_control: list[Consumer] = []
        self.handshakes_to_control: list[Consumer] = []  # the handshake lane
        cls, ctl = WorkerId(Stage.CLASSIFIER, 0), WorkerId(Stage.CONTROL, 0)
        for i in range(workers):
            io = WorkerId(Stage.OVERLAY_IO, i)
            names = {
                key: RingEdge(p, c, 0, lane).name
                for key, p, c, lane in (
                    ("in", cls, io, Lane.MAIN),
                    ("out", io, cls, Lane.MAIN),
                    ("ctl_in", ctl, io, Lane.MAIN),
                    ("ctl_out", io, ctl, Lane.MAIN),
                    ("hs_out", io, ctl, Lane.HANDSHAKE),
                )
            }
            specs = {k: shm_ring.create_ring(n, shm_ring.MIN_CAPACITY) for k, n in names.items()}
            self.specs += specs.values()
            self.to_io.append(Producer(self._attach(specs["in"])))
            self.from_control.append(Producer(self._attach(specs["ctl_in"])))
            self.to_classifier.append(Consumer(self._attach(specs["out"])))
            self.to_control.append(Consumer(self._attach(specs["ctl_out"])))
            self.handshakes_to_control.append(Consumer(self._attach(specs["hs_out"])))
            rings = {s.name: s for s in specs.values()}
            port = net.port(host, 4789, gso=gso, gro=gro)
            worker = io_stage.OverlayIoWorker(settings, i, rings, port=port)
            worker.setup()
            self.workers.append(worker)

    def _attach(self, spec: RingSpec) -> Ring:
        ring = Ring.attach(spec)
        self.rings.append(ring)
        return ring

    def feed(self, i: int = 0) -> FakeFeed:
        feed = self.workers[i].routes
        assert isinstance(feed, FakeFeed)
        return feed

    def install(self, entries: list[messages.KeyEntry]) -> None:
        for i in range(len(self.workers)):
            self.feed(i).on_message(messages.SessionKeys(1, tuple(entries), self.node_id))

    def close(self) -> None:
        for w in self.workers:
            w.teardown()
            for ring in w._rings:
                ring.close()
            w.epoll.close()
        for ring in self.rings:
            ring.close()
        for spec in self.specs:
            shm_ring.close_spec(spec)


def entry(
    slot: int,
    recv: tuple[int, bytes],
    send: tuple[int, bytes],
    endpoint: str,
    node_id: bytes,
    *,
    confirmed: bool = True,
    created: float | None = None,
) -> messages.KeyEntry:
    return messages.KeyEntry(
        slot=slot,
        recv_index=recv[0],
        recv_key=recv[1],
        send_index=send[0],
        send_key=send[1],
        counter_start=0,
        created=time.monotonic() if created is None else created,
        confirmed=confirmed,
        endpoint=endpoint,
        node_id=node_id,
    )


ID_A, ID_R, ID_B = nid(0x80 << 152), nid(0x20 << 152), nid(0x10 << 152)
HOST_A, HOST_R, HOST_B = "198.18.0.1", "198.18.0.2", "198.18.0.3"
EP_A, EP_R, EP_B = (f"{h}:4789" for h in (HOST_A, HOST_R, HOST_B))
# slots: at A, R is 1 and B is 2; at R, A is 2 and B is 1; at B, R is 1 and A is 2
SLOT_R_AT_A, SLOT_B_AT_A, SLOT_A_AT_R, SLOT_B_AT_R, SLOT_R_AT_B, SLOT_A_AT_B = 1, 2, 2, 1, 1, 2
PACKET = bytes(range(256)) * 4


@pytest.fixture
def quiet_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io_stage, "RouteFeed", FakeFeed)
    monkeypatch.setattr("pipeline.worker.configure_logging", lambda **kw: structlog.get_logger())


class Lab:
    """Nodes on one memory network; every worker is closed at the end."""

    def __init__(self, tmp: Path, **network: object) -> None:
        self.tmp = tmp
        self.net = MemoryNetwork(record=True, **network)  # type: ignore[arg-type]
        self.nodes: dict[str, Node] = {}

    def node(self, key: str, name: str, host: str, node_id: bytes, **kw: object) -> Node:
        made = self.nodes[key] = Node(self.net, name, host, node_id, self.tmp, **kw)  # type: ignore[arg-type]
        return made

    def pump(self) -> list[tuple[bytes, Address, Address]]:
        """Run every worker until nothing moves; the datagrams sent meanwhile are returned as
        (datagram, from, to)."""
        log = self.net.sent
        assert log is not None
        start = len(log)
        for _ in range(20):
            if not sum(w.work() for n in self.nodes.values() for w in n.workers):
                return log[start:]
        raise AssertionError("the workers never went quiet")

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()


@pytest.fixture
def lab(quiet_workers: None, tmp_path: Path) -> Iterator[Lab]:
    made = Lab(tmp_path)
    try:
        yield made
    finally:
        made.close()


def three_nodes(lab: Lab, relay_workers: int = 1, *, r_seen_by_a: bytes = ID_R) -> None:
    """A and B linked only through R; A and B hold an end-to-end session (no endpoint).
    ``r_seen_by_a``: the node id A's link to R has (another one moves R on A's circle)."""
    a = lab.node("a", "alpha", HOST_A, ID_A)
    r = lab.node("r", "relay", HOST_R, ID_R, workers=relay_workers)
    b = lab.node("b", "beta", HOST_B, ID_B)
    a.install(
        [
            entry(SLOT_R_AT_A, (101, KEY_RA), (201, KEY_AR), EP_R, r_seen_by_a),
            entry(SLOT_B_AT_A, (102, KEY_BA), (302, KEY_AB), "", ID_B),
        ]
    )
    r.install(
        [
            entry(SLOT_A_AT_R, (201, KEY_AR), (101, KEY_RA), EP_A, ID_A),
            entry(SLOT_B_AT_R, (202, KEY_BR), (301, KEY_RB), EP_B, ID_B),
        ]
    )
    b.install(
        [
            entry(SLOT_R_AT_B, (301, KEY_RB), (202, KEY_BR), EP_R, ID_R),
            entry(SLOT_A_AT_B, (302, KEY_AB), (102, KEY_BA), "", ID_A),
        ]
    )


def records(consumer: Consumer) -> list[tuple[int, int, bytes]]:
    got = [(r.kind, r.peer, bytes(r.data)) for r in consumer.pop_batch(100)]
    consumer.release()
    return got


def send_ip(node: Node, slot: int, packet: bytes = PACKET, worker: int = 0) -> None:
    node.to_io[worker].push(packet, RecordKind.IP_PACKET, slot)
    node.to_io[worker].flush()


def wire(log: list[tuple[bytes, Address, Address]]) -> list[tuple[DatagramType, Address, Address]]:
    return [(parse_header(d).type, src, to) for d, src, to in log]


# -- two workers, sealed DATA both ways, and a relayed datagram through a third --------------------


def test_two_workers_carry_sealed_data_both_ways_and_through_a_relay(lab: Lab) -> None:
    three_nodes(lab)
    a, r, b = lab.nodes["a"], lab.nodes["r"], lab.nodes["b"]

    # A -> R and R -> A: one sealed DATA datagram each way, the packet never in the clear
    send_ip(a, SLOT_R_AT_A)
    send_ip(r, SLOT_A_AT_R, PACKET[::-1])
    log = lab.pump()
    assert sorted(wire(log)) == [
        (DatagramType.DATA, a.address, r.address),
        (DatagramType.DATA, r.address, a.address),
    ]
    assert all(PACKET[:64] not in d and PACKET[::-1][:64] not in d for d, _, _ in log)
    assert records(r.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_R, PACKET)]
    assert records(a.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_R_AT_A, PACKET[::-1])]

    # A -> B has no direct link: sealed end to end, relayed by R, opened by B only
    send_ip(a, SLOT_B_AT_A)
    log = lab.pump()
    assert wire(log) == [
        (DatagramType.RELAY, a.address, r.address),
        (DatagramType.RELAY, r.address, b.address),
    ]
    assert records(b.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET)]
    assert records(r.to_classifier[0]) == [] and records(r.to_control[0]) == []

    stats = {k: n.workers[0].stats() for k, n in lab.nodes.items()}
    assert {k: s["datagrams_sent"] for k, s in stats.items()} == {"a": 2, "r": 2, "b": 0}
    assert {k: s["datagrams_received"] for k, s in stats.items()} == {"a": 1, "r": 2, "b": 2}
    assert stats["a"]["relay_sent"] == 1 and stats["a"]["sessions"] == {"receive": 2, "send": 2}
    assert stats["r"]["relay_forwarded"] == 1 and stats["b"]["relay_delivered"] == 1
    assert all(s["drops"] == {} for s in stats.values())
    # all confirmed already; a relay hop not heard from lately is reported (HopSilent)
    told = {k: n.feed().told for k, n in lab.nodes.items()}
    assert all(isinstance(m, messages.HopSilent) for t in told.values() for m in t), told


def test_the_port_wakes_the_workers_epoll(lab: Lab) -> None:
    """A memory port's descriptor is readable while a datagram waits, as a socket is."""
    three_nodes(lab)
    a, r = lab.nodes["a"], lab.nodes["r"]
    w = r.workers[0]
    fd = w.port.fileno()
    assert fd not in dict(w.epoll.poll(0))
    send_ip(a, SLOT_R_AT_A)
    a.workers[0].work()
    assert dict(w.epoll.poll(0)).get(fd) == select.EPOLLIN
    w.work()
    assert fd not in dict(w.epoll.poll(0))
    assert records(r.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_R, PACKET)]


def test_first_datagram_on_an_unconfirmed_session_is_reported_once(lab: Lab) -> None:
    """A new session of the link A-R (a rekey): R holds it unconfirmed, A already sends."""
    three_nodes(lab)
    a, r = lab.nodes["a"], lab.nodes["r"]
    a.install(
        [
            entry(SLOT_R_AT_A, (101, KEY_RA), (201, KEY_AR), EP_R, ID_R),
            entry(SLOT_R_AT_A, (103, KEY_NEW_RA), (203, KEY_NEW_AR), EP_R, ID_R),
        ]
    )
    r.install(
        [
            entry(SLOT_A_AT_R, (201, KEY_AR), (101, KEY_RA), EP_A, ID_A),
            entry(SLOT_A_AT_R, (203, KEY_NEW_AR), (103, KEY_NEW_RA), EP_A, ID_A, confirmed=False),
        ]
    )
    for _ in range(3):
        send_ip(a, SLOT_R_AT_A)
    log = lab.pump()
    assert [parse_header(d).session for d, _, _ in log] == [203] * 3  # the newest session
    assert len(records(r.to_classifier[0])) == 3
    assert r.feed().told == [messages.SessionConfirmed(203)]


def test_a_datagram_on_an_unknown_session_gets_one_resync_hint(lab: Lab) -> None:
    """Never a word to control (no handshake toward a source that may be forged): a bare
    COOKIE header back, echoing the index, once per interval."""
    three_nodes(lab)
    a, r = lab.nodes["a"], lab.nodes["r"]
    r.install([entry(SLOT_B_AT_R, (202, KEY_BR), (301, KEY_RB), EP_B, ID_B)])  # A forgotten
    send_ip(a, SLOT_R_AT_A)
    send_ip(a, SLOT_R_AT_A)
    log = lab.pump()
    hints = [(d, to) for d, frm, to in log if frm == r.address]
    assert hints == [(resync_hint(201), a.address)]
    stats = r.workers[0].stats()
    assert stats["drops"] == {"unknown_session": 2, "hint_repeated": 1}
    assert stats["screen"] == {"hints_sent": 1}
    assert r.feed().told == []
    assert records(a.handshakes_to_control[0]) == [
        (RecordKind.HANDSHAKE, 0, pack_endpoint(HOST_R, 4789) + resync_hint(201))
    ]


def test_a_send_session_of_age_asks_for_a_rekey_once(lab: Lab) -> None:
    three_nodes(lab)
    a, r = lab.nodes["a"], lab.nodes["r"]
    old = time.monotonic() - 121.0  # REKEY_AFTER_SECONDS ago, and a little more
    a.install([entry(SLOT_R_AT_A, (103, KEY_NEW_RA), (203, KEY_NEW_AR), EP_R, ID_R, created=old)])
    r.install([entry(SLOT_A_AT_R, (203, KEY_NEW_AR), (103, KEY_NEW_RA), EP_A, ID_A)])
    assert a.feed().told == []  # asked only when it seals
    for _ in range(3):
        send_ip(a, SLOT_R_AT_A)
        lab.pump()
    assert a.feed().told == [messages.RekeyRequest(SLOT_R_AT_A)]
    assert len(records(r.to_classifier[0])) == 3  # and it still seals meanwhile


def handshake(lab: Lab, sender: int, *, step: int = 0, good: bool = True) -> bytes:
    """A first message (or an answer) with the lab's network mac1, or a forged one."""
    ca = read_certificate(lab.tmp / "authority" / "ca.crt")
    key = hs.mac1_key(ca.public_key if good else bytes(32))
    return hs.build_handshake(
        key, receiver_index=0, pattern=hs.Pattern.XX, step=step, sender_index=sender,
        noise=bytes(48),
    )  # fmt: skip


def test_handshake_datagrams_are_screened_and_go_on_their_own_lane(lab: Lab) -> None:
    """Out as they are; in, with the endpoint in front, on the handshake lane, if the screen
    lets them: a forged mac1 and junk headers are counted drops."""
    three_nodes(lab)
    a, r = lab.nodes["a"], lab.nodes["r"]
    hello = handshake(lab, 7)
    a.from_control[0].push(pack_endpoint(HOST_R, 4789) + hello, RecordKind.HANDSHAKE)
    a.from_control[0].flush()
    lab.net.deliver(handshake(lab, 8, good=False), (HOST_B, 4789), r.address)
    lab.net.deliver(build_header(DatagramType.HANDSHAKE) + bytes(20), (HOST_B, 4789), r.address)
    lab.net.deliver(b"\x01\x01" + bytes(5), (HOST_B, 4789), r.address)
    lab.net.deliver(b"\x07" + bytes(40), (HOST_B, 4789), r.address)
    lab.net.deliver(b"\x01\x09" + bytes(40), (HOST_B, 4789), r.address)
    log = lab.pump()
    assert log == [(hello, a.address, r.address)]
    assert records(r.handshakes_to_control[0]) == [
        (RecordKind.HANDSHAKE, 0, pack_endpoint(HOST_A, 4789) + hello)
    ]
    assert records(r.to_control[0]) == []
    assert a.workers[0].stats()["datagrams_sent"] == 1
    assert r.workers[0].stats()["drops"] == {
        "bad_mac1": 1,
        "short_handshake": 1,
        "short_datagram": 1,
        "bad_version": 1,
        "bad_type": 1,
    }


def test_a_handshake_flood_from_one_source_stops_at_its_bucket(lab: Lab) -> None:
    three_nodes(lab)
    r = lab.nodes["r"]
    for i in range(100):
        lab.net.deliver(handshake(lab, i + 1), (HOST_B, 5000 + i), r.address)
    assert lab.pump() == []
    passed = records(r.handshakes_to_control[0])
    assert len(passed) == ScreenSettings().per_source_burst
    assert r.workers[0].stats()["drops"] == {"handshake_rate_limited": 90}


def test_worker_relays_data_end_to_end(lab: Lab) -> None:
    three_nodes(lab)
    a, r, b = lab.nodes["a"], lab.nodes["r"], lab.nodes["b"]
    send_ip(a, SLOT_B_AT_A)
    log = lab.pump()
    assert [(src, to) for _, src, to in log] == [(a.address, r.address), (r.address, b.address)]
    for datagram, _, _ in log:
        assert parse_header(datagram).type is DatagramType.RELAY
        assert PACKET[:64] not in datagram
    assert records(b.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET)]
    assert records(r.to_classifier[0]) == [] and records(r.to_control[0]) == []
    stats = {k: n.workers[0].stats() for k, n in lab.nodes.items()}
    assert stats["a"]["relay_sent"] == 1 and stats["a"]["sessions"]["send"] == 2
    assert stats["r"]["relay_forwarded"] == 1 and stats["r"]["drops"] == {}
    assert stats["b"]["relay_delivered"] == 1 and stats["b"]["drops"] == {}

    # the reply, an overlay message from control, takes the same way back
    b.from_control[0].push(b"\x01pong", RecordKind.OVERLAY, SLOT_A_AT_B)
    b.from_control[0].flush()
    log = lab.pump()
    assert [(src, to) for _, src, to in log] == [(b.address, r.address), (r.address, a.address)]
    assert records(a.to_control[0]) == [(RecordKind.OVERLAY, SLOT_B_AT_A, b"\x01pong")]


def test_bytes_are_counted_per_peer_relayed_ones_for_the_peer_not_the_hop(lab: Lab) -> None:
    three_nodes(lab)
    a, r, b = lab.nodes["a"], lab.nodes["r"], lab.nodes["b"]
    send_ip(a, SLOT_R_AT_A)  # direct, both ways
    send_ip(r, SLOT_A_AT_R, PACKET[:100])
    log = lab.pump()
    to_r = next(len(d) for d, src, _ in log if src == a.address)
    to_a = next(len(d) for d, src, _ in log if src == r.address)
    overhead = to_r - len(PACKET)  # header and tag
    send_ip(a, SLOT_B_AT_A)  # relayed through R, and an overlay message back
    lab.pump()
    b.from_control[0].push(b"\x01pong", RecordKind.OVERLAY, SLOT_A_AT_B)
    b.from_control[0].flush()
    lab.pump()
    records(b.to_classifier[0])
    there, back = len(PACKET) + overhead, 5 + overhead  # end-to-end datagrams
    stats = {k: n.workers[0].stats() for k, n in lab.nodes.items()}
    assert stats["a"]["peer_bytes"] == {SLOT_R_AT_A: [to_r, to_a], SLOT_B_AT_A: [there, back]}
    assert stats["b"]["peer_bytes"] == {SLOT_A_AT_B: [back, there]}  # nothing for R, the hop
    # R passed on A's and B's RELAY datagrams: no peer's bytes, though its port's
    assert stats["r"]["peer_bytes"] == {SLOT_A_AT_R: [to_a, to_r]}
    assert stats["r"]["bytes_sent"] > to_a and stats["r"]["relay_forwarded"] == 2


def test_byte_counts_go_with_their_link(lab: Lab) -> None:
    """A closed link's byte counts are forgotten with its sessions (the heartbeat would grow
    for ever), and a slot control gives to another peer counts from zero."""
    three_nodes(lab)
    a = lab.nodes["a"]
    send_ip(a, SLOT_R_AT_A)
    send_ip(a, SLOT_B_AT_A)
    lab.pump()
    assert set(a.workers[0].stats()["peer_bytes"]) == {SLOT_R_AT_A, SLOT_B_AT_A}
    # B's end-to-end session closed: only R's link is left
    a.install([entry(SLOT_R_AT_A, (101, KEY_RA), (201, KEY_AR), EP_R, ID_R)])
    assert set(a.workers[0].stats()["peer_bytes"]) == {SLOT_R_AT_A}
    # R's slot now holds another peer (B, direct): its counts start again
    a.install([entry(SLOT_R_AT_A, (103, KEY_BA), (303, KEY_AB), EP_B, ID_B)])
    assert a.workers[0].stats()["peer_bytes"] == {}


def test_direct_data_is_not_relayed(lab: Lab) -> None:
    three_nodes(lab)
    a, r = lab.nodes["a"], lab.nodes["r"]
    send_ip(a, SLOT_R_AT_A)
    log = lab.pump()
    assert len(log) == 1 and parse_header(log[0][0]).type is DatagramType.DATA
    assert records(r.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_R, PACKET)]


def test_hop_of_another_worker_goes_through_control(quiet_workers: None, tmp_path: Path) -> None:
    """R runs two workers: A's slot (2) is worker 0's, B's (1) worker 1's; R's port hands
    every datagram to worker 0."""
    lab = Lab(tmp_path, spread=lambda source, ports: 0)
    try:
        three_nodes(lab, relay_workers=2)
        a, r, b = lab.nodes["a"], lab.nodes["r"], lab.nodes["b"]
        send_ip(a, SLOT_B_AT_A)
        lab.pump()
        assert records(b.to_classifier[0]) == []
        handed = records(r.to_control[0])
        assert [(kind, peer) for kind, peer, _ in handed] == [(RecordKind.RELAY, SLOT_B_AT_R)]
        dest, ttl, _ = parse_relay(handed[0][2])
        assert (dest, ttl) == (ID_B[:7], RELAY_TTL - 1)
        assert r.workers[0].stats()["relay_forwarded"] == 1

        # control passes the record on, unchanged, to worker 1, which seals it for B
        r.from_control[1].push(handed[0][2], RecordKind.RELAY, SLOT_B_AT_R)
        r.from_control[1].flush()
        log = lab.pump()
        assert [(src, to) for _, src, to in log] == [(r.address, b.address)]
        assert records(b.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET)]

        # a RELAY record for a hop worker 0 cannot seal for is dropped, never sent back
        r.from_control[0].push(handed[0][2], RecordKind.RELAY, SLOT_B_AT_R)
        r.from_control[0].flush()
        assert lab.pump() == []
        assert records(r.to_control[0]) == []
        assert r.workers[0].stats()["drops"] == {"no_session": 1}
    finally:
        lab.close()


def test_no_route_and_no_session_are_counted_drops(lab: Lab) -> None:
    # A sees R at 0x90..., not closer to B (0x10...) than A (0x80...): A has no way to B
    three_nodes(lab, r_seen_by_a=nid(0x90 << 152))
    a = lab.nodes["a"]
    send_ip(a, SLOT_B_AT_A)
    send_ip(a, 9)  # no session at all
    assert lab.pump() == []
    stats = a.workers[0].stats()
    assert stats["drops"] == {"relay_no_route": 1, "no_session": 1}
    assert stats["relay_sent"] == 0


def relay_datagram(payload: bytes) -> bytes:
    """What A would send R: ``payload`` sealed with A's hop session."""
    sealer = SendSession(KEY_AR, index=201, created=0.0)
    return b"".join(sealer.seal(DatagramType.RELAY, payload))


@pytest.mark.parametrize(
    ("dest", "ttl", "inner_type", "reason"),
    [
        (ID_B, 0, DatagramType.DATA, "relay_ttl"),
        (nid(0x28 << 152), 5, DatagramType.DATA, "relay_no_route"),  # R is closest
        (ID_B, 5, DatagramType.RELAY, "relay_bad_inner"),
        (ID_R, 5, DatagramType.HANDSHAKE, "relay_bad_inner"),
        (ID_R, 5, DatagramType.DATA, "unknown_session"),  # for R: opened as from the network
    ],
    ids=["ttl", "no_route", "nested_relay", "handshake_inside", "for_us_unknown_session"],
)
def test_relay_drops_what_it_must(
    lab: Lab, dest: bytes, ttl: int, inner_type: int, reason: str
) -> None:
    three_nodes(lab)
    r = lab.nodes["r"]
    inner = build_header(DatagramType(inner_type), session=999, counter=1) + bytes(40)
    lab.net.deliver(relay_datagram(pack_relay(dest, ttl, inner)), (HOST_A, 4789), r.address)
    assert lab.pump() == []
    stats = r.workers[0].stats()
    assert stats["drops"] == {reason: 1}
    assert stats["relay_forwarded"] == 0
    assert r.feed().told == []  # an inner datagram's source is the relay: never reported


def test_a_session_that_gains_an_endpoint_keeps_its_counter(lab: Lab) -> None:
    """The same key, relayed and then direct: one SendSession, so no nonce is used twice."""
    three_nodes(lab)
    a = lab.nodes["a"]
    send_ip(a, SLOT_B_AT_A)
    lab.pump()
    table = a.workers[0].sessions
    session = table.relayed[SLOT_B_AT_A].session
    assert isinstance(session, SendSession)
    assert session.counter == 1 and SLOT_B_AT_A not in table.send
    a.install(
        [
            entry(SLOT_R_AT_A, (101, KEY_RA), (201, KEY_AR), EP_R, ID_R),
            entry(SLOT_B_AT_A, (102, KEY_BA), (302, KEY_AB), EP_B, ID_B),
        ]
    )
    assert table.send[SLOT_B_AT_A].session is session and not table.relayed
    assert table.relay_table.slots == [SLOT_R_AT_A, SLOT_B_AT_A]
    send_ip(a, SLOT_B_AT_A)
    log = lab.pump()
    assert [(parse_header(d).type, parse_header(d).counter, to) for d, _, to in log] == [
        (DatagramType.DATA, 1, (HOST_B, 4789))
    ]
    assert records(lab.nodes["b"].to_classifier[0]) == [
        (RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET),
        (RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET),
    ]


# -- birthday probing: a socket pool --------------------------------------------------------------


def run_handlers(worker: io_stage.OverlayIoWorker) -> None:
    """What the worker's loop does after epoll: the handlers of its readable descriptors
    (a pool socket's reads its datagrams)."""
    for fd, _ in worker.epoll.poll(0):
        handler = worker._handlers.get(fd)
        if handler is not None:
            handler()


def test_a_pool_probes_from_its_sockets_and_the_one_that_hears_back_carries_the_link(
    lab: Lab,
) -> None:
    """A POOL record sends one sealed probe from each of A's pool sockets; B answers one of
    them; that socket is pinned (the rest closed): A's data, probes and handshakes for B go
    from it and B's datagrams to it are opened; an empty POOL record closes it."""
    a = lab.node("a", "alpha", HOST_A, ID_A, pool_sockets=8)
    b = lab.node("b", "beta", HOST_B, ID_B)
    a.install([entry(SLOT_B_AT_A, (102, KEY_BA), (302, KEY_AB), "", ID_B)])  # relayed: no
    b.install([entry(SLOT_A_AT_B, (302, KEY_AB), (102, KEY_BA), "", ID_A)])  # endpoint yet
    w = a.workers[0]
    a.from_control[0].push(pack_endpoint(*b.address) + b"probe", RecordKind.POOL, SLOT_B_AT_A)
    a.from_control[0].flush()
    log = lab.pump()
    assert [(t, to) for t, _, to in wire(log)] == [(DatagramType.PROBE, b.address)] * 8
    sources = [src for _, src, _ in log]
    assert len(set(sources)) == 8 and a.address not in sources
    got = records(b.to_control[0])
    assert [(k, p, d[6:]) for k, p, d in got] == [(RecordKind.PROBE, SLOT_A_AT_B, b"probe")] * 8
    assert w.stats()["pools"]["sockets"] == 8

    winner = sources[5]  # as if only this one's mapping met B's probe
    b.from_control[0].push(pack_endpoint(*winner) + b"ack", RecordKind.PROBE, SLOT_A_AT_B)
    b.from_control[0].flush()
    lab.pump()
    run_handlers(w)
    assert records(a.to_control[0]) == [
        (RecordKind.PROBE, SLOT_B_AT_A, pack_endpoint(*b.address) + b"ack")
    ]
    pools = w.stats()["pools"]
    assert pools["sockets"] == 1 and pools["pinned"] == 1 and pools["pools_won"] == 1

    # direct now (control found the path): A's data for B goes from the pinned socket
    a.install([entry(SLOT_B_AT_A, (102, KEY_BA), (302, KEY_AB), EP_B, ID_B)])
    b.install([entry(SLOT_A_AT_B, (302, KEY_AB), (102, KEY_BA), f"{winner[0]}:{winner[1]}", ID_A)])
    send_ip(a, SLOT_B_AT_A)
    a.from_control[0].push(pack_endpoint(*b.address) + b"\x01\x03hs", RecordKind.HANDSHAKE)
    a.from_control[0].flush()
    log = lab.pump()
    assert [(src, to) for _, src, to in log] == [(winner, b.address)] * 2
    assert records(b.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET)]
    send_ip(b, SLOT_A_AT_B, PACKET[::-1])  # and B's data to the pinned socket is opened
    assert wire(lab.pump()) == [(DatagramType.DATA, b.address, winner)]
    run_handlers(w)
    assert records(a.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_B_AT_A, PACKET[::-1])]

    a.from_control[0].push(b"", RecordKind.POOL, SLOT_B_AT_A)  # control: the path is lost
    a.from_control[0].flush()
    lab.pump()
    send_ip(a, SLOT_B_AT_A)
    assert wire(lab.pump()) == [(DatagramType.DATA, a.address, b.address)]
    assert w.stats()["pools"]["sockets"] == 0 and w.stats()["pools"]["pinned"] == 0


def win_pool(lab: Lab, a: Node, b: Node, a_slot: int, b_slot: int, pick: int = 3) -> Address:
    """A's pool for its link to B (slot ``a_slot``; B's slot of A: ``b_slot``) probes B,
    B's answer reaches the ``pick``-th pool socket only, which wins; both then direct (B to
    that socket). The winner's address."""
    a.from_control[0].push(pack_endpoint(*b.address) + b"probe", RecordKind.POOL, a_slot)
    a.from_control[0].flush()
    winner = lab.pump()[pick][1]
    records(b.to_control[0])
    b.from_control[0].push(pack_endpoint(*winner) + b"ack", RecordKind.PROBE, b_slot)
    b.from_control[0].flush()
    lab.pump()
    run_handlers(a.workers[0])
    records(a.to_control[0])
    assert a.workers[0].stats()["pools"]["pinned"] == 1
    return winner


def test_a_resync_hint_to_a_pinned_peer_goes_from_its_pool_socket(lab: Lab) -> None:
    """A forgot its link's session (a restart, say); the peer's data to A's won pool socket
    gets its resync hint from that socket, the only one the peer's side lets in."""
    a = lab.node("a", "alpha", HOST_A, ID_A, pool_sockets=8)
    b = lab.node("b", "beta", HOST_B, ID_B)
    a.install([entry(SLOT_B_AT_A, (102, KEY_BA), (302, KEY_AB), "", ID_B)])
    b.install([entry(SLOT_A_AT_B, (302, KEY_AB), (102, KEY_BA), "", ID_A)])
    winner = win_pool(lab, a, b, SLOT_B_AT_A, SLOT_A_AT_B)
    b.install([entry(SLOT_A_AT_B, (302, KEY_AB), (102, KEY_BA), f"{winner[0]}:{winner[1]}", ID_A)])
    a.install([entry(SLOT_B_AT_A, (103, KEY_BA), (303, KEY_AB), EP_B, ID_B)])  # new keys
    send_ip(b, SLOT_A_AT_B)
    lab.pump()
    assert lab.net.sent is not None
    start = len(lab.net.sent)
    run_handlers(a.workers[0])  # the pool socket's read, and A's answer to it
    assert a.workers[0].stats()["drops"]["unknown_session"] == 1
    hints = [(d, frm, to) for d, frm, to in lab.net.sent[start:] if d == resync_hint(102)]
    assert hints == [(resync_hint(102), winner, b.address)]


def test_a_pool_socket_takes_only_its_own_links_datagrams(lab: Lab) -> None:
    """An authentic datagram of another link of A's arriving on a pool socket pins nothing
    (a counted drop); a POOL record for a link without a session is a counted drop."""
    three_nodes(lab)
    a, r = lab.nodes["a"], lab.nodes["r"]
    w = a.workers[0]
    a.from_control[0].push(pack_endpoint(*r.address) + b"probe", RecordKind.POOL, SLOT_B_AT_A)
    a.from_control[0].push(pack_endpoint(*r.address) + b"probe", RecordKind.POOL, 9)
    a.from_control[0].flush()
    log = lab.pump()
    pool_port = log[0][1]
    r.install(
        [
            entry(
                SLOT_A_AT_R, (201, KEY_AR), (101, KEY_RA), f"{pool_port[0]}:{pool_port[1]}", ID_A
            ),
            entry(SLOT_B_AT_R, (202, KEY_BR), (301, KEY_RB), EP_B, ID_B),
        ]
    )
    send_ip(r, SLOT_A_AT_R)  # R's link to A (slot 1 at A), not the pool's link to B (slot 2)
    lab.pump()
    run_handlers(w)
    assert records(a.to_classifier[0]) == []
    stats = w.stats()
    assert stats["drops"]["pool_other_link"] == 1 and stats["drops"]["probe_no_session"] == 1
    assert stats["pools"]["pinned"] == 0 and stats["pools"]["sockets"] == 256


# -- plaintext ---------------------------------------------------------------------------------


def plain_pair(lab: Lab) -> tuple[Node, Node]:
    a = lab.node("a", "alpha", HOST_A, ID_A, plaintext=True)
    b = lab.node("b", "beta", HOST_B, ID_B, plaintext=True)
    for node, slot, other in ((a, 1, EP_B), (b, 1, EP_A)):
        peer = messages.PeerRoute(slot, "peer", ("100.64.0.9",), other, True)
        node.feed().on_snapshot(messages.RouteSnapshot(7, 1, (peer,)))
        # keys are not for plaintext nodes (control has none to give)
        node.feed().on_message(
            messages.SessionKeys(1, (entry(1, (5, KEY_AB), (6, KEY_BA), other, ID_B),))
        )
    return a, b


def test_plaintext_carries_data_in_the_clear_by_configured_endpoint(lab: Lab) -> None:
    a, b = plain_pair(lab)
    send_ip(a, 1)
    send_ip(b, 1, PACKET[::-1])
    b.from_control[0].push(b"\x81ping", RecordKind.OVERLAY, 1)
    b.from_control[0].flush()
    log = lab.pump()
    header = build_header(DatagramType.DATA)
    assert sorted((d, src, to) for d, src, to in log) == sorted(
        [
            (header + PACKET, a.address, b.address),
            (header + PACKET[::-1], b.address, a.address),
            (build_header(DatagramType.OVERLAY) + b"\x81ping", b.address, a.address),
        ]
    )
    assert records(b.to_classifier[0]) == [(RecordKind.IP_PACKET, 1, PACKET)]
    assert records(a.to_classifier[0]) == [(RecordKind.IP_PACKET, 1, PACKET[::-1])]
    assert records(a.to_control[0]) == [(RecordKind.OVERLAY, 1, b"\x81ping")]
    stats = a.workers[0].stats()
    assert stats["encrypted"] is False and stats["sessions"] == {"receive": 0, "send": 0}
    assert stats["bytes_sent"] == 16 + len(PACKET) and stats["drops"] == {}
    assert stats["datagrams_received"] == 2


def test_plaintext_drops_what_it_must(lab: Lab) -> None:
    """Unknown sources and slots, RELAY and handshake datagrams: counted, never passed on."""
    a, _ = plain_pair(lab)
    send_ip(a, 9)  # no such peer
    for dtype in (DatagramType.RELAY, DatagramType.HANDSHAKE, DatagramType.COOKIE):
        lab.net.deliver(build_header(dtype) + bytes(60), (HOST_B, 4789), a.address)
    lab.net.deliver(build_header(DatagramType.DATA) + PACKET, ("198.18.0.99", 4789), a.address)
    lab.net.deliver(b"\x02" + bytes(30), (HOST_B, 4789), a.address)
    assert lab.pump() == []
    assert a.workers[0].stats()["drops"] == {
        "no_endpoint": 1,
        "bad_type": 3,
        "unknown_source": 1,
        "bad_version": 1,
    }
    assert records(a.to_control[0]) == [] and records(a.to_classifier[0]) == []
    assert a.feed().told == []


# -- the memory port -----------------------------------------------------------------------------


def test_memory_ports_queue_copy_lose_and_drop() -> None:
    net = MemoryNetwork(queue_max=2)
    one, two = net.port("198.18.0.1", 1), net.port("198.18.0.2", 2)
    try:
        body = bytearray(b"body")
        assert one.send([b"head", memoryview(body)], ("198.18.0.2", 2))
        body[:] = b"XXXX"  # a copy was taken, as the kernel does
        assert one.send([b"x"], ("198.18.0.2", 2))
        assert one.send([b"y"], ("198.18.0.2", 2))  # the queue is full
        assert one.send([b"z"], ("198.18.0.9", 9))  # nobody there
        assert (net.dropped, net.lost) == (1, 1)
        assert two.recv() == (8, ("198.18.0.1", 1)) and bytes(two.view[:8]) == b"headbody"
        assert two.recv() == (1, ("198.18.0.1", 1))
        assert two.recv() is None and one.recv() is None
        big = bytes(RECV_SIZE + 10)
        one.send([big], ("198.18.0.2", 2))
        assert two.recv() == (RECV_SIZE, ("198.18.0.1", 1))  # truncated, as recvfrom does
    finally:
        one.close()
        two.close()
    assert net.ports == {("198.18.0.1", 1): [], ("198.18.0.2", 2): []}
    one.send([b"late"], ("198.18.0.2", 2))
    assert net.lost == 2


def test_memory_ports_at_one_address_share_its_datagrams_by_source() -> None:
    net = MemoryNetwork()
    ports = [net.port("198.18.0.2", 4789) for _ in range(2)]
    sender = net.port("198.18.0.1", 4789)
    try:
        sources = [("198.18.0.1", p) for p in range(5000, 5016)]
        for source in sources:
            net.deliver(b"d", source, ("198.18.0.2", 4789))
        got = [[src for _, src in p.queue] for p in ports]
        assert got == [[s for s in sources if spread_by_source(s, 2) == i] for i in range(2)]
        assert all(got)  # both get some
        assert spread_by_source(("198.18.0.1", 5000), 2) == spread_by_source(
            ("198.18.0.1", 5000), 2
        )
    finally:
        for p in [*ports, sender]:
            p.close()


def test_memory_port_descriptor_is_readable_only_while_datagrams_wait() -> None:
    net = MemoryNetwork()
    one, two = net.port("198.18.0.1", 1), net.port("198.18.0.2", 2)
    poller = select.epoll()
    try:
        poller.register(two.fileno(), select.EPOLLIN)
        assert poller.poll(0) == []
        one.send([b"a"], two.address)
        one.send([b"b"], two.address)
        assert poller.poll(0) == [(two.fileno(), select.EPOLLIN)]
        two.recv()
        assert poller.poll(0) == [(two.fileno(), select.EPOLLIN)]
        two.recv()
        assert poller.poll(0) == []
    finally:
        poller.close()
        one.close()
        two.close()
    assert one.fd == -1


def test_memory_port_wakes_its_reader_on_another_thread_for_every_datagram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sender and reader on two threads (as the in-memory two-node test runs its workers):
    a datagram queued just as the reader takes the last one must leave the descriptor
    readable, or the reader sleeps past it (or reads an empty eventfd). The reader's eventfd
    read is slowed, as a preempted thread's is on a loaded machine, so that the sender's
    datagram lands in that window."""
    net = MemoryNetwork(queue_max=1_000_000)
    one, two = net.port("198.18.0.1", 1), net.port("198.18.0.2", 2)
    count, got = 200, []
    poller = select.epoll()
    poller.register(two.fileno(), select.EPOLLIN)
    real_read = os.eventfd_read

    def slow_read(fd: int) -> int:
        time.sleep(0.001)
        return real_read(fd)

    def send() -> None:
        for i in range(count):
            one.send([i.to_bytes(4, "big")], two.address)
            time.sleep(0.0005)

    monkeypatch.setattr(os, "eventfd_read", slow_read)
    sender = threading.Thread(target=send)
    try:
        sender.start()
        while len(got) < count:
            if not poller.poll(1.0):  # asleep with datagrams waiting: the lost wake-up
                break
            while (r := two.recv()) is not None:
                got.append(int.from_bytes(two.view[: r[0]], "big"))
    finally:
        sender.join()
        poller.close()
        one.close()
        two.close()
    assert got == list(range(count))


def test_the_kernel_steers_handshake_datagrams_to_their_own_socket() -> None:
    """``UdpPort`` with ``handshake_socket``, on loopback: HANDSHAKE and COOKIE datagrams
    (the payload's second byte) arrive at the second socket, everything else at the first."""
    port = UdpPort("127.0.0.1", 0, buffer_bytes=1 << 20, handshake_socket=True)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert port.handshake_fd is not None
        to = port.sock.getsockname()
        for kind in (1, 3, 4, 2, 3, 9):
            sender.sendto(bytes([1, kind]) + bytes(30), to)
        sender.sendto(b"\x01", to)  # too short for the program: the first socket
        select.select([port.sock, port.handshake_sock], [], [], 1.0)
        time.sleep(0.05)
        main, steered = [], []
        while (got := port.recv()) is not None:
            main.append(bytes(port.view[: got[0]][1:2]))
        while port.recv_handshake() is not None:
            steered.append(port.handshake_view[1])
        assert main == [b"\x01", b"\x02", b"\x09", b""]
        assert steered == [3, 4, 3] and port.handshake_overflows == 0
    finally:
        sender.close()
        port.close()
