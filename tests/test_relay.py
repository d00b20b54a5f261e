"""Relaying through the overlay: the relay payload, the greedy next hop, end-to-end sealing
through a relay, and overlay_io's forward/deliver decisions (workers driven in-process with a
fake UDP port and real shm rings)."""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from pipeline import messages, shm_ring
from pipeline.config import settings_from_mapping
from pipeline.crypto.datapath import MIN_DATAGRAM, RecvSession, SendSession
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import NODE_ID_LEN, circle_distance
from pipeline.overlay_io import stage as io_stage
from pipeline.overlay_io.relay import (
    CACHE_MAX,
    PREFIX_LEN,
    RELAY_TTL,
    RelayAction,
    RelayTable,
    on_relay,
    pack_relay,
    parse_relay,
)
from pipeline.overlay_io.udp import RECV_SIZE, Address
from pipeline.records import RecordKind
from pipeline.shm_ring import Consumer, Producer, Ring, RingSpec
from pipeline.topology import RingEdge, Stage, WorkerId
from pipeline.wire.overlay import HEADER_LEN, DatagramType, build_header, parse_header

SIZE = 1 << 160


def nid(value: int) -> bytes:
    return (value % SIZE).to_bytes(NODE_ID_LEN, "big")


def sealed_inner(dtype: DatagramType = DatagramType.DATA, body: bytes = b"x" * 40) -> bytes:
    return build_header(dtype, session=7, counter=3) + body


KEY_AR, KEY_RA, KEY_RB, KEY_BR, KEY_AB, KEY_BA = (bytes([i]) * 32 for i in range(1, 7))


# -- the relay payload -----------------------------------------------------------------------------


def test_payload_bytes_are_exact() -> None:
    inner = sealed_inner()
    payload = pack_relay(nid(0xABC), 16, inner)
    assert payload == nid(0xABC) + b"\x10" + inner
    dest, ttl, view = parse_relay(payload)
    assert (dest, ttl, bytes(view)) == (nid(0xABC), 16, inner)
    assert PREFIX_LEN == 21 and RELAY_TTL == 16 and int(DatagramType.RELAY) == 5
    assert int(RecordKind.RELAY) == 5


@given(
    st.binary(min_size=20, max_size=20),
    st.integers(0, 255),
    st.sampled_from([DatagramType.DATA, DatagramType.OVERLAY]),
    st.binary(min_size=16, max_size=200),
)
def test_payload_round_trip(dest: bytes, ttl: int, dtype: DatagramType, body: bytes) -> None:
    inner = sealed_inner(dtype, body)
    got_dest, got_ttl, view = parse_relay(pack_relay(dest, ttl, inner))
    assert (got_dest, got_ttl, bytes(view)) == (dest, ttl, inner)
    # a memoryview payload (as a ring record is) parses the same
    assert parse_relay(memoryview(pack_relay(dest, ttl, inner)))[0] == dest


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "relay_short"),
        (nid(1) + b"\x10", "relay_short"),
        (nid(1) + b"\x10" + sealed_inner(body=b"x" * 15), "relay_short"),
        (nid(1) + b"\x10" + b"\x02\x01" + bytes(30), "relay_bad_inner"),
        (nid(1) + b"\x10" + sealed_inner(DatagramType.RELAY), "relay_bad_inner"),
        (nid(1) + b"\x10" + sealed_inner(DatagramType.HANDSHAKE), "relay_bad_inner"),
        (nid(1) + b"\x10" + sealed_inner(DatagramType.COOKIE), "relay_bad_inner"),
        (nid(1) + b"\x10" + b"\x01\x09" + bytes(30), "relay_bad_inner"),
    ],
)
def test_bad_payloads_name_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_relay(payload)
    assert info.value.reason == reason


def test_smallest_payload_parses() -> None:
    payload = nid(1) + b"\x00" + sealed_inner(body=bytes(MIN_DATAGRAM - HEADER_LEN))
    assert parse_relay(payload)[1] == 0


_GOOD_PREFIX = st.sampled_from([b"", b"\x01\x01", b"\x01\x02", b"\x01\x05"]).map(
    lambda head: nid(5) + b"\x03" + head
)


@given(st.one_of(st.binary(max_size=120), st.tuples(_GOOD_PREFIX, st.binary(max_size=60))))
def test_junk_raises_only_remote_protocol_error(raw: bytes | tuple[bytes, bytes]) -> None:
    """Any junk, or junk after a dest, a ttl and a good inner header's start."""
    with contextlib.suppress(RemoteProtocolError):
        parse_relay(raw if isinstance(raw, bytes) else raw[0] + raw[1])


def test_pack_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        pack_relay(b"short", 1, sealed_inner())
    with pytest.raises(ValueError, match="u8"):
        pack_relay(nid(1), 256, sealed_inner())
    with pytest.raises(ValueError, match="u8"):
        pack_relay(nid(1), -1, sealed_inner())


# -- the greedy next hop ---------------------------------------------------------------------------


def test_next_hop_is_the_closest_direct_link() -> None:
    table = RelayTable(nid(1000), [(1, nid(100)), (2, nid(500)), (3, nid(2000))])
    assert table.next_hop(nid(450)) == 2
    assert table.next_hop(nid(120)) == 1
    assert table.next_hop(nid(1900)) == 3
    assert table.next_hop(nid(500)) == 2  # the destination itself is a direct link
    assert len(table) == 3 and table.slots == [1, 2, 3]


def test_next_hop_wraps_around_the_circle() -> None:
    # dest just below 2^160: the id just above 0 is 11 away, the one at 2^159 far
    table = RelayTable(nid(1 << 100), [(1, nid(1 << 159)), (2, nid(5))])
    assert table.next_hop(nid(SIZE - 6)) == 2
    # and the other way: dest just above 0, the link just below 2^160
    table = RelayTable(nid(1 << 100), [(1, nid(SIZE - 3)), (2, nid(1 << 120))])
    assert table.next_hop(nid(4)) == 1
    assert circle_distance(SIZE - 3, 4) == 7 == circle_distance(4, SIZE - 3)


def test_no_hop_closer_than_us_is_none() -> None:
    table = RelayTable(nid(1000), [(1, nid(100)), (2, nid(5000))])
    assert table.next_hop(nid(1010)) is None
    assert table.next_hop(nid(1000)) is None  # ourselves
    # a link exactly as close as we are is not closer
    assert RelayTable(nid(1000), [(1, nid(1020))]).next_hop(nid(1010)) is None
    assert RelayTable(nid(1000), []).next_hop(nid(1)) is None


def test_ties_go_to_the_smaller_slot() -> None:
    # 90 and 110 are both 10 from 100, on either side; whatever the order given
    for hops in ([(7, nid(110)), (3, nid(90))], [(3, nid(90)), (7, nid(110))]):
        assert RelayTable(nid(5000), hops).next_hop(nid(100)) == 3
    for hops in ([(7, nid(90)), (3, nid(110))], [(3, nid(110)), (7, nid(90))]):
        assert RelayTable(nid(5000), hops).next_hop(nid(100)) == 3


def test_bad_ids_mean_no_hop() -> None:
    assert RelayTable(b"", [(1, nid(1))]).next_hop(nid(2)) is None
    table = RelayTable(nid(1000), [(1, b"short"), (2, nid(10))])
    assert table.slots == [2]
    assert table.next_hop(b"short") is None


def test_answers_are_cached_and_the_cache_is_bounded() -> None:
    table = RelayTable(nid(1 << 159), [(1, nid(0))])
    assert table.next_hop(nid(3)) == 1
    table._hops.clear()  # a stale table would still answer from its cache
    assert table.next_hop(nid(3)) == 1
    for i in range(CACHE_MAX + 10):
        table.next_hop(nid(i + 10))
    assert len(table._cache) <= CACHE_MAX
    assert table.next_hop(nid(3)) is None  # forgotten, recomputed with no hops


@given(
    st.integers(0, SIZE - 1),
    st.lists(st.tuples(st.integers(0, 65535), st.integers(0, SIZE - 1)), max_size=8),
    st.integers(0, SIZE - 1),
)
def test_next_hop_is_the_brute_force_choice(own: int, links: list[Any], dest: int) -> None:
    hops = list({slot: node for slot, node in links}.items())
    table = RelayTable(nid(own), [(slot, nid(node)) for slot, node in hops])
    candidates = [
        (circle_distance(node, dest), slot)
        for slot, node in hops
        if circle_distance(node, dest) < circle_distance(own, dest)
    ]
    assert table.next_hop(nid(dest)) == (min(candidates)[1] if candidates else None)
    dist = min(abs(own - dest), SIZE - abs(own - dest))
    assert circle_distance(own, dest) == dist


# -- the decisions of a relay ----------------------------------------------------------------------


def test_on_relay_delivers_forwards_and_drops() -> None:
    table = RelayTable(nid(1000), [(4, nid(100))])
    inner = sealed_inner()
    step = on_relay(table, pack_relay(nid(1000), 0, inner))
    assert step.action is RelayAction.DELIVER and bytes(step.data) == inner
    step = on_relay(table, pack_relay(nid(90), 5, inner))
    assert (step.action, step.hop, step.data) == (
        RelayAction.FORWARD,
        4,
        pack_relay(nid(90), 4, inner),
    )
    step = on_relay(table, pack_relay(nid(90), 0, inner))
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_ttl")
    step = on_relay(table, pack_relay(nid(1100), 5, inner))
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_no_route")
    step = on_relay(table, pack_relay(nid(1000), 5, sealed_inner(DatagramType.RELAY)))
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_bad_inner")
    step = on_relay(table, b"junk")
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_short")


def test_a_payload_never_outlives_its_ttl() -> None:
    """Even relays that disagreed about the circle could not pass it on more than 16 times."""
    table = RelayTable(nid(1000), [(1, nid(10))])
    payload = pack_relay(nid(0), RELAY_TTL, sealed_inner())
    hops = 0
    while (step := on_relay(table, payload)).action is RelayAction.FORWARD:
        payload = bytes(step.data)
        hops += 1
    assert hops == RELAY_TTL and step.reason == "relay_ttl"


# -- end to end through a relay, with real sessions ------------------------------------------------


def test_inner_datagram_is_sealed_end_to_end_through_a_relay() -> None:
    """A -> R -> B: R opens only the hop layer and cannot open the inner datagram."""
    a_to_r = SendSession(KEY_AR, index=11, created=0.0)  # A's hop session to R
    r_from_a = RecvSession(KEY_AR, index=11, created=0.0)
    r_to_b = SendSession(KEY_RB, index=22, created=0.0)  # R's hop session to B
    b_from_r = RecvSession(KEY_RB, index=22, created=0.0)
    a_to_b = SendSession(KEY_AB, index=33, created=0.0)  # A and B, end to end
    b_from_a = RecvSession(KEY_AB, index=33, created=0.0)
    id_b, id_r = nid(0x10 << 152), nid(0x20 << 152)

    packet = b"an IPv4 packet for B" * 10
    inner = b"".join(a_to_b.seal(DatagramType.DATA, packet))
    outer = b"".join(a_to_r.seal(DatagramType.RELAY, pack_relay(id_b, RELAY_TTL, inner)))
    assert parse_header(outer).type is DatagramType.RELAY
    assert packet not in outer and packet not in inner

    # the relay: open the hop layer, look at dest/ttl/inner header, pass it on
    at_r = r_from_a.open(memoryview(outer))
    step = on_relay(RelayTable(id_r, [(1, nid(0xAA << 152)), (2, id_b)]), at_r)
    assert step.action is RelayAction.FORWARD and step.hop == 2
    _dest, _ttl, seen = parse_relay(at_r)
    assert parse_header(seen).session == 33  # the relay sees the inner header only
    for key in (KEY_AR, KEY_RA, KEY_RB, KEY_BR):  # every key the relay holds
        with pytest.raises(RemoteProtocolError) as info:
            RecvSession(key, index=33, created=0.0).open(seen)
        assert info.value.reason == "bad_tag"
    hop2 = b"".join(r_to_b.seal(DatagramType.RELAY, step.data))

    # the destination: open the hop layer, then the inner datagram with the e2e session
    at_b = b_from_r.open(memoryview(hop2))
    step = on_relay(RelayTable(id_b, [(5, id_r)]), at_b)
    assert step.action is RelayAction.DELIVER
    assert parse_header(step.data).type is DatagramType.DATA
    assert b_from_a.open(step.data) == packet
    _, ttl, _ = parse_relay(at_b)
    assert ttl == RELAY_TTL - 1
    with pytest.raises(RemoteProtocolError) as info:  # and it cannot be replayed
        b_from_a.open(step.data)
    assert info.value.reason == "replayed"


# -- overlay_io workers, in-process ----------------------------------------------------------------


class FakePort:
    """UdpPort's interface: datagrams go to a list, and come from an inbox."""

    def __init__(self, host: str, port: int, *, buffer_bytes: int) -> None:
        self.address = (host, port)
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)
        self.inbox: deque[tuple[bytes, Address]] = deque()
        self.outbox: list[tuple[bytes, Address]] = []
        self.send_errors = 0
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def recv(self) -> tuple[int, Address] | None:
        if not self.inbox:
            return None
        data, source = self.inbox.popleft()
        self.buffer[: len(data)] = data
        return len(data), source

    def send(self, parts: list[bytes | memoryview], address: Address) -> bool:
        self.outbox.append((b"".join(parts), address))
        return True

    def close(self) -> None:
        os.close(self.fd)


class FakeFeed:
    """RouteFeed's interface without ZeroMQ: what the worker tells control is kept."""

    def __init__(self, worker: object, on_snapshot: object, on_message: object = None) -> None:
        self.told: list[messages.Message] = []

    def tell(self, msg: messages.Message) -> None:
        self.told.append(msg)


class Node:
    """One node's overlay_io workers, their rings (held by the test as the other ends)."""

    def __init__(self, name: str, host: str, node_id: bytes, workers: int, tmp: Path) -> None:
        self.name, self.address, self.node_id = name, (host, 4789), node_id
        data = {
            "node": {"name": name, "state_dir": str(tmp / name), "runtime_dir": str(tmp / name)},
            "network": {"namespace": "lab", "subnet": "100.64.0.0/24", "address": "100.64.0.1"},
            "security": {"ca_certificate": str(tmp / "ca.crt")},
            "overlay": {"listen_address": host},
            "stages": {"overlay_io": {"workers": workers}},
        }
        settings = settings_from_mapping(data)
        self.specs: list[RingSpec] = []
        self.rings: list[Ring] = []
        self.workers: list[io_stage.OverlayIoWorker] = []
        self.to_io: list[Producer] = []  # classifier0 -> overlay_io i
        self.from_control: list[Producer] = []  # control -> overlay_io i
        self.to_classifier: list[Consumer] = []
        self.to_control: list[Consumer] = []
        for i in range(workers):
            io, cls, ctl = (
                WorkerId(Stage.OVERLAY_IO, i),
                WorkerId(Stage.CLASSIFIER, 0),
                WorkerId(Stage.CONTROL, 0),
            )
            names = {
                key: RingEdge(p, c, 0).name
                for key, p, c in (
                    ("in", cls, io),
                    ("out", io, cls),
                    ("ctl_in", ctl, io),
                    ("ctl_out", io, ctl),
                )
            }
            specs = {k: shm_ring.create_ring(n, shm_ring.MIN_CAPACITY) for k, n in names.items()}
            self.specs += specs.values()
            self.to_io.append(Producer(self._attach(specs["in"])))
            self.from_control.append(Producer(self._attach(specs["ctl_in"])))
            self.to_classifier.append(Consumer(self._attach(specs["out"])))
            self.to_control.append(Consumer(self._attach(specs["ctl_out"])))
            worker = io_stage.OverlayIoWorker(settings, i, {s.name: s for s in specs.values()})
            worker.setup()
            self.workers.append(worker)

    def _attach(self, spec: RingSpec) -> Ring:
        ring = Ring.attach(spec)
        self.rings.append(ring)
        return ring

    def port(self, i: int = 0) -> FakePort:
        port = self.workers[i].port
        assert isinstance(port, FakePort)
        return port

    def install(self, entries: list[messages.KeyEntry]) -> None:
        for w in self.workers:
            w._on_control(messages.SessionKeys(1, tuple(entries), node_id=self.node_id))

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
    slot: int, recv: tuple[int, bytes], send: tuple[int, bytes], endpoint: str, node_id: bytes
) -> messages.KeyEntry:
    return messages.KeyEntry(
        slot=slot,
        recv_index=recv[0],
        recv_key=recv[1],
        send_index=send[0],
        send_key=send[1],
        counter_start=0,
        created=time.monotonic(),
        confirmed=True,
        endpoint=endpoint,
        node_id=node_id,
    )


ID_A, ID_R, ID_B = nid(0x80 << 152), nid(0x20 << 152), nid(0x10 << 152)
HOST_A, HOST_R, HOST_B = "198.18.0.1", "198.18.0.2", "198.18.0.3"
# slots: at A, R is 1 and B is 2; at R, A is 2 and B is 1; at B, R is 1 and A is 2
SLOT_R_AT_A, SLOT_B_AT_A, SLOT_A_AT_R, SLOT_B_AT_R, SLOT_R_AT_B, SLOT_A_AT_B = 1, 2, 2, 1, 1, 2
PACKET = bytes(range(256)) * 4


@pytest.fixture
def quiet_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io_stage, "UdpPort", FakePort)
    monkeypatch.setattr(io_stage, "RouteFeed", FakeFeed)
    monkeypatch.setattr("pipeline.worker.configure_logging", lambda **kw: structlog.get_logger())


@pytest.fixture
def nodes(quiet_workers: None, tmp_path: Path) -> Iterator[dict[str, Node]]:
    made: dict[str, Node] = {}
    try:
        yield made
    finally:
        for node in made.values():
            node.close()


def three_nodes(nodes: dict[str, Node], tmp: Path, relay_workers: int = 1) -> None:
    """A and B linked only through R; A and B hold an end-to-end session (no endpoint)."""
    a = nodes["a"] = Node("alpha", HOST_A, ID_A, 1, tmp)
    r = nodes["r"] = Node("relay", HOST_R, ID_R, relay_workers, tmp)
    b = nodes["b"] = Node("beta", HOST_B, ID_B, 1, tmp)
    ep_a, ep_r, ep_b = (f"{h}:4789" for h in (HOST_A, HOST_R, HOST_B))
    a.install(
        [
            entry(SLOT_R_AT_A, (101, KEY_RA), (201, KEY_AR), ep_r, ID_R),
            entry(SLOT_B_AT_A, (102, KEY_BA), (302, KEY_AB), "", ID_B),
        ]
    )
    r.install(
        [
            entry(SLOT_A_AT_R, (201, KEY_AR), (101, KEY_RA), ep_a, ID_A),
            entry(SLOT_B_AT_R, (202, KEY_BR), (301, KEY_RB), ep_b, ID_B),
        ]
    )
    b.install(
        [
            entry(SLOT_R_AT_B, (301, KEY_RB), (202, KEY_BR), ep_r, ID_R),
            entry(SLOT_A_AT_B, (302, KEY_AB), (102, KEY_BA), "", ID_A),
        ]
    )


def pump(nodes: dict[str, Node]) -> list[tuple[bytes, Address, Address]]:
    """Run every worker until nothing moves; deliver datagrams by address. The log of
    (datagram, from, to) is returned."""
    ports = {n.address: n for n in nodes.values()}
    log: list[tuple[bytes, Address, Address]] = []
    for _ in range(20):
        moved = 0
        for node in nodes.values():
            for i, w in enumerate(node.workers):
                moved += w.work()
                port = node.port(i)
                for data, to in port.outbox:
                    log.append((data, node.address, to))
                    ports[to].port(0).inbox.append((data, node.address))
                    moved += 1
                port.outbox.clear()
        if not moved:
            return log
    raise AssertionError("the workers never went quiet")


def records(consumer: Consumer) -> list[tuple[int, int, bytes]]:
    got = [(r.kind, r.peer, bytes(r.data)) for r in consumer.pop_batch(100)]
    consumer.release()
    return got


def send_ip(node: Node, slot: int, packet: bytes = PACKET) -> None:
    node.to_io[0].push(packet, RecordKind.IP_PACKET, slot)
    node.to_io[0].flush()


def test_worker_relays_data_end_to_end(nodes: dict[str, Node], tmp_path: Path) -> None:
    three_nodes(nodes, tmp_path)
    a, r, b = nodes["a"], nodes["r"], nodes["b"]
    send_ip(a, SLOT_B_AT_A)
    log = pump(nodes)
    assert [(src, to) for _, src, to in log] == [(a.address, r.address), (r.address, b.address)]
    for datagram, _, _ in log:
        assert parse_header(datagram).type is DatagramType.RELAY
        assert PACKET[:64] not in datagram
    assert records(b.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET)]
    assert records(r.to_classifier[0]) == [] and records(r.to_control[0]) == []
    stats = {k: n.workers[0].stats() for k, n in nodes.items()}
    assert stats["a"]["relay_sent"] == 1 and stats["a"]["sessions"]["send"] == 2
    assert stats["r"]["relay_forwarded"] == 1 and stats["r"]["drops"] == {}
    assert stats["b"]["relay_delivered"] == 1 and stats["b"]["drops"] == {}

    # the reply, an overlay message from control, takes the same way back
    b.from_control[0].push(b"\x01pong", RecordKind.OVERLAY, SLOT_A_AT_B)
    b.from_control[0].flush()
    log = pump(nodes)
    assert [(src, to) for _, src, to in log] == [(b.address, r.address), (r.address, a.address)]
    assert records(a.to_control[0]) == [(RecordKind.OVERLAY, SLOT_B_AT_A, b"\x01pong")]


def test_direct_data_is_not_relayed(nodes: dict[str, Node], tmp_path: Path) -> None:
    three_nodes(nodes, tmp_path)
    a, r = nodes["a"], nodes["r"]
    send_ip(a, SLOT_R_AT_A)
    log = pump(nodes)
    assert len(log) == 1 and parse_header(log[0][0]).type is DatagramType.DATA
    assert records(r.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_R, PACKET)]


def test_hop_of_another_worker_goes_through_control(nodes: dict[str, Node], tmp_path: Path) -> None:
    """R runs two workers: A's slot (2) is worker 0's, B's (1) worker 1's."""
    three_nodes(nodes, tmp_path, relay_workers=2)
    a, r, b = nodes["a"], nodes["r"], nodes["b"]
    send_ip(a, SLOT_B_AT_A)
    pump(nodes)
    assert records(b.to_classifier[0]) == []
    handed = records(r.to_control[0])
    assert [(kind, peer) for kind, peer, _ in handed] == [(RecordKind.RELAY, SLOT_B_AT_R)]
    dest, ttl, _ = parse_relay(handed[0][2])
    assert (dest, ttl) == (ID_B, RELAY_TTL - 1)
    assert r.workers[0].stats()["relay_forwarded"] == 1

    # control passes the record on, unchanged, to worker 1, which seals it for B
    r.from_control[1].push(handed[0][2], RecordKind.RELAY, SLOT_B_AT_R)
    r.from_control[1].flush()
    log = pump(nodes)
    assert [(src, to) for _, src, to in log] == [(r.address, b.address)]
    assert records(b.to_classifier[0]) == [(RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET)]

    # a RELAY record for a hop worker 0 cannot seal for is dropped, never sent back
    r.from_control[0].push(handed[0][2], RecordKind.RELAY, SLOT_B_AT_R)
    r.from_control[0].flush()
    assert pump(nodes) == []
    assert records(r.to_control[0]) == []
    assert r.workers[0].stats()["drops"] == {"no_session": 1}


def test_no_route_and_no_session_are_counted_drops(nodes: dict[str, Node], tmp_path: Path) -> None:
    three_nodes(nodes, tmp_path)
    a = nodes["a"]
    w = a.workers[0]
    # R is not closer to B than A is any more: A has no way to B
    w.relay_table = RelayTable(ID_A, [(SLOT_R_AT_A, nid(0x90 << 152))])
    send_ip(a, SLOT_B_AT_A)
    send_ip(a, 9)  # no session at all
    assert pump(nodes) == []
    assert w.stats()["drops"] == {"relay_no_route": 1, "no_session": 1}
    assert w.stats()["relay_sent"] == 0


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
    nodes: dict[str, Node], tmp_path: Path, dest: bytes, ttl: int, inner_type: int, reason: str
) -> None:
    three_nodes(nodes, tmp_path)
    r = nodes["r"]
    inner = build_header(DatagramType(inner_type), session=999, counter=1) + bytes(40)
    r.port().inbox.append((relay_datagram(pack_relay(dest, ttl, inner)), nodes["a"].address))
    assert pump({"r": r}) == []
    stats = r.workers[0].stats()
    assert stats["drops"] == {reason: 1}
    assert stats["relay_forwarded"] == 0


def test_plaintext_mode_drops_relay_datagrams(quiet_workers: None, tmp_path: Path) -> None:
    node = Node("alpha", HOST_A, ID_A, 1, tmp_path)
    try:
        w = node.workers[0]
        w.secure = False
        w.slots = {(HOST_R, 4789): 1}
        node.port().inbox.append((build_header(DatagramType.RELAY) + bytes(60), (HOST_R, 4789)))
        w.work()
        assert w.stats()["drops"] == {"bad_type": 1}
    finally:
        node.close()


def test_a_session_that_gains_an_endpoint_keeps_its_counter(
    nodes: dict[str, Node], tmp_path: Path
) -> None:
    """The same key, relayed and then direct: one SendSession, so no nonce is used twice."""
    three_nodes(nodes, tmp_path)
    a = nodes["a"]
    send_ip(a, SLOT_B_AT_A)
    pump(nodes)
    w = a.workers[0]
    session = w.relayed[SLOT_B_AT_A].session
    assert session.counter == 1 and SLOT_B_AT_A not in w.send
    a.install(
        [
            entry(SLOT_R_AT_A, (101, KEY_RA), (201, KEY_AR), f"{HOST_R}:4789", ID_R),
            entry(SLOT_B_AT_A, (102, KEY_BA), (302, KEY_AB), f"{HOST_B}:4789", ID_B),
        ]
    )
    assert w.send[SLOT_B_AT_A].session is session and not w.relayed
    assert w.relay_table.slots == [SLOT_R_AT_A, SLOT_B_AT_A]
    send_ip(a, SLOT_B_AT_A)
    log = pump(nodes)
    assert [(parse_header(d).type, parse_header(d).counter, to) for d, _, to in log] == [
        (DatagramType.DATA, 1, (HOST_B, 4789))
    ]
    assert records(nodes["b"].to_classifier[0]) == [
        (RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET),
        (RecordKind.IP_PACKET, SLOT_A_AT_B, PACKET),
    ]
