"""Super-frames through overlay_io, in one process on memory ports: a TSO record is cut into
segments, each sealed on its own (FLAG_PARTIAL) and sent to the peer in GSO batches; the peer
opens each datagram of a GRO read and coalesces them back, byte for byte. Each fallback: no
GSO, no GRO, no TAP offloads at the receiver, GSO failing with EIO on a real socket; one lost
datagram costs one segment; a mixed stream of TCP, UDP and ICMP, small and large, relayed
super-frames and plaintext mode."""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from pipeline import messages
from pipeline.overlay_io import stage as io_stage
from pipeline.overlay_io.udp import UdpPort
from pipeline.records import FLAG_VNET, RecordKind
from pipeline.shm_ring import Consumer
from pipeline.wire import tso, vnet
from pipeline.wire.overlay import FLAG_PARTIAL, DatagramType, parse_header
from tests.test_overlay_io import (
    EP_A,
    EP_B,
    HOST_A,
    HOST_B,
    ID_A,
    ID_B,
    KEY_AB,
    KEY_BA,
    FakeFeed,  # noqa: F401 (quiet_workers: a fixture)
    Lab,
    Node,
    entry,
    run_handlers,
    three_nodes,
    win_pool,
)
from tests.test_tso import (
    icmp_packet,
    pseudo,
    reference_segments,
    tcp_packet,
    tso_frame,
    udp_packet,
)

SLOT = 2  # each node's slot of the other
TSO = vnet.build(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1360, 20, 16)  # as the classifier hands it
COALESCED = vnet.parse(vnet.build(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1360, 20, 16))


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Lab]:
    monkeypatch.setattr(io_stage, "RouteFeed", FakeFeed)
    monkeypatch.setattr("pipeline.worker.configure_logging", lambda **kw: structlog.get_logger())
    made = Lab(tmp_path)
    try:
        yield made
    finally:
        made.close()


def pair(lab: Lab, **b_options: Any) -> tuple[Node, Node]:
    """A and B linked directly; ``b_options`` for B's node (gso, gro, tap_offloads...)."""
    a = lab.node("a", "alpha", HOST_A, ID_A, plaintext=b_options.get("plaintext", False))
    b = lab.node("b", "beta", HOST_B, ID_B, **b_options)
    a.install([entry(SLOT, (102, KEY_BA), (302, KEY_AB), EP_B, ID_B)])
    b.install([entry(SLOT, (302, KEY_AB), (102, KEY_BA), EP_A, ID_A)])
    return a, b


def send(node: Node, data: bytes, flags: int = FLAG_VNET, slot: int = SLOT) -> None:
    node.to_io[0].push(data, RecordKind.IP_PACKET, slot, flags)
    node.to_io[0].flush()


def got(consumer: Consumer) -> list[tuple[int, int, int, bytes]]:
    out = [(r.kind, r.peer, r.flags, bytes(r.data)) for r in consumer.pop_batch(1000)]
    consumer.release()
    return out


def delivered(records: list[tuple[int, int, int, bytes]]) -> list[bytes]:
    """What the receiving TAP makes of the records: packets, checksums final."""
    out: list[bytes] = []
    for _, _, flags, data in records:
        if flags & FLAG_VNET:
            out += [bytes(p) for p in tso.segment(vnet.parse(data), data[vnet.LEN :])]
        else:
            out.append(data)
    return out


def test_a_super_frame_crosses_as_sealed_segments_and_comes_out_whole(lab: Lab) -> None:
    a, b = pair(lab)
    payload = random.Random(1).randbytes(60000)
    frame = tso_frame(7, payload, 1360)
    send(a, TSO + frame)
    log = lab.pump()
    # on the wire: one DATA datagram a segment, each sealed alone, with FLAG_PARTIAL
    headers = [parse_header(d) for d, _, _ in log]
    assert len(log) == 45 and {h.type for h in headers} == {DatagramType.DATA}
    assert {h.flags for h in headers} == {FLAG_PARTIAL}
    assert [h.counter for h in headers] == list(range(45))
    assert all(payload[:32] not in d for d, _, _ in log)
    # GSO: 45 datagrams of 1444 bytes fit one send (GSO_BYTES); GRO at B: one read
    sa, sb = a.workers[0].stats(), b.workers[0].stats()
    assert (sa["gso_sends"], sa["segments_sent"], sa["datagrams_sent"]) == (1, 45, 45)
    assert (sb["gro_reads"], sb["segments_received"], sb["datagrams_received"]) == (1, 45, 45)
    # at B: the super-frame again, byte for byte, with the header its TAP needs
    ((kind, slot, flags, data),) = got(b.to_classifier[0])
    assert (kind, slot, flags) == (RecordKind.IP_PACKET, SLOT, FLAG_VNET)
    assert vnet.parse(data) == COALESCED and data[vnet.LEN :] == frame
    assert sb["coalesced"] == {"packets": 45, "frames": 1}
    assert sa["drops"] == sb["drops"] == {}
    # bytes per peer: the GSO batch and the GRO run, each counted once, for the link's slot
    wire_bytes = sum(len(d) for d, _, _ in log)
    assert sa["bytes_sent"] == sb["bytes_received"] == wire_bytes
    assert sa["peer_bytes"] == {SLOT: [wire_bytes, 0]} and sb["peer_bytes"] == {
        SLOT: [0, wire_bytes]
    }


@pytest.mark.parametrize(
    "options",
    [{"gso": False}, {"gro": False}, {"gso": False, "gro": False}],
    ids=["no-gso", "no-gro", "neither"],
)
def test_without_gso_or_gro_the_same_frame_arrives(lab: Lab, options: dict[str, bool]) -> None:
    a = lab.node("a", "alpha", HOST_A, ID_A, gso=options.get("gso", True))
    b = lab.node("b", "beta", HOST_B, ID_B, gro=options.get("gro", True))
    a.install([entry(SLOT, (102, KEY_BA), (302, KEY_AB), EP_B, ID_B)])
    b.install([entry(SLOT, (302, KEY_AB), (102, KEY_BA), EP_A, ID_A)])
    frame = tso_frame(7, random.Random(2).randbytes(30000), 1360)
    send(a, TSO + frame)
    assert len(lab.pump()) == 23
    ((_, _, flags, data),) = got(b.to_classifier[0])
    assert flags == FLAG_VNET and data[vnet.LEN :] == frame
    sa, sb = a.workers[0].stats(), b.workers[0].stats()
    assert sa["gso"] == options.get("gso", True) and sb["gro"] == options.get("gro", True)
    assert sa["peer_bytes"][SLOT][0] == sb["peer_bytes"][SLOT][1] == sa["bytes_sent"] > 30000
    assert sb["gro_reads"] == (1 if sa["gso"] and sb["gro"] else 0)


def test_a_won_pool_socket_sends_with_gso_and_reads_with_gro(lab: Lab) -> None:
    """Birthday probing's winner carries the link's data as the node's port does: A's
    super-frame leaves it in one GSO send, B's arrives on it as one GRO read and comes out
    one coalesced record, byte for byte."""
    a = lab.node("a", "alpha", HOST_A, ID_A, pool_sockets=8)
    b = lab.node("b", "beta", HOST_B, ID_B)
    a.install([entry(SLOT, (102, KEY_BA), (302, KEY_AB), "", ID_B)])  # relayed: no endpoint
    b.install([entry(SLOT, (302, KEY_AB), (102, KEY_BA), "", ID_A)])
    w = a.workers[0]
    winner = win_pool(lab, a, b, SLOT, SLOT)
    a.install([entry(SLOT, (102, KEY_BA), (302, KEY_AB), EP_B, ID_B)])  # direct now
    b.install([entry(SLOT, (302, KEY_AB), (102, KEY_BA), f"{winner[0]}:{winner[1]}", ID_A)])

    out = tso_frame(7, random.Random(4).randbytes(30000), 1360)
    send(a, TSO + out)
    log = lab.pump()
    assert len(log) == 23 and {src for _, src, _ in log} == {winner}
    assert w.stats()["gso_sends"] == 1
    ((_, _, flags, data),) = got(b.to_classifier[0])
    assert flags == FLAG_VNET and data[vnet.LEN :] == out

    back = tso_frame(9, random.Random(5).randbytes(30000), 1360)
    send(b, TSO + back)
    log = lab.pump()
    assert len(log) == 23 and {to for _, _, to in log} == {winner}
    run_handlers(w)
    ((_, _, flags, data),) = got(a.to_classifier[0])
    assert flags == FLAG_VNET and data[vnet.LEN :] == back
    st = w.stats()
    assert (st["gro_reads"], st["segments_received"]) == (1, 23)
    assert st["coalesced"] == {"packets": 23, "frames": 1} and st["drops"] == {}


def test_a_receiver_without_tap_offloads_gets_packets_not_frames(lab: Lab) -> None:
    """Nothing merged (its tap_reader would cut it again); the checksums still partial, so
    each packet goes with NEEDS_CSUM for the tap_reader to finish in software."""
    a, b = pair(lab, tap_offloads=False)
    payload = random.Random(3).randbytes(5000)
    send(a, TSO + tso_frame(7, payload, 1360))
    lab.pump()
    records = got(b.to_classifier[0])
    assert len(records) == 4
    assert {vnet.parse(d) for _, _, _, d in records} == {(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16)}
    assert delivered(records) == reference_segments(7, payload, 1360, 0x18, 7)


def test_one_lost_datagram_costs_one_segment(lab: Lab) -> None:
    a, b = pair(lab)
    payload = random.Random(4).randbytes(20 * 1360)
    frame = tso_frame(7, payload, 1360)
    deliver = lab.net.deliver
    lost: list[bytes] = []

    def lossy(datagram: bytes, source: Any, to: Any, segment: int = 0) -> None:
        pieces = [datagram[i : i + segment] for i in range(0, len(datagram), segment or 1 << 20)]
        for i, piece in enumerate(pieces):
            if i == 9 and not lost:
                lost.append(piece)  # the tenth segment never arrives
            else:
                deliver(piece, source, to)

    lab.net.deliver = lossy  # type: ignore[method-assign]
    send(a, TSO + frame)
    lab.pump()
    records = got(b.to_classifier[0])
    expected = reference_segments(7, payload, 1360, 0x18, 7)
    assert delivered(records) == expected[:9] + expected[10:]
    assert [len(d) - vnet.LEN for _, _, _, d in records] == [52 + 9 * 1360, 52 + 10 * 1360]


def test_a_mixed_stream_comes_out_byte_for_byte(lab: Lab) -> None:
    """TCP super-frames, small TCP, UDP (one and a super-frame), ICMP: the classifier's
    records at A become, at B, records whose packets are the reference's, in order."""
    a, b = pair(lab)
    rng = random.Random(5)
    expected: list[bytes] = []
    records: list[tuple[int, int, int, bytes]] = []
    seq = 1
    for i in range(30):
        kind = rng.choice(["tso", "tcp", "udp", "uso", "icmp"])
        if kind == "tso":
            payload = rng.randbytes(rng.randint(1, 40000))
            send(a, TSO + tso_frame(seq, payload, 1360, ident=i))
            expected += reference_segments(seq, payload, 1360, 0x18, i)
            seq += len(payload)
        elif kind == "tcp":  # one packet, its checksum left to the offload
            payload = rng.randbytes(rng.randint(0, 300))
            csum = vnet.build(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16)
            send(a, csum + tcp_packet(seq, payload, check=pseudo(6, 32 + len(payload))))
            expected.append(tcp_packet(seq, payload))
            seq += len(payload)
        elif kind == "udp":  # checksum final: no header at all
            payload = rng.randbytes(rng.randint(0, 1300))
            send(a, udp_packet(payload), flags=0)
            expected.append(udp_packet(payload))
        elif kind == "uso":
            payload = rng.randbytes(rng.randint(1301, 6000))
            uso = vnet.build(vnet.NEEDS_CSUM, vnet.GSO_UDP_L4, 28, 1300, 20, 6)
            send(a, uso + udp_packet(payload, check=pseudo(17, 8 + len(payload))))
            chunks = [payload[j : j + 1300] for j in range(0, len(payload), 1300)]
            expected += [udp_packet(c, ident=9 + j) for j, c in enumerate(chunks)]
        else:
            payload = rng.randbytes(rng.randint(0, 1000))
            send(a, icmp_packet(payload), flags=0)
            expected.append(icmp_packet(payload))
        if i % 4 == 3:
            lab.pump()
            records += got(b.to_classifier[0])  # B's classifier: room for the next reads
    lab.pump()
    records += got(b.to_classifier[0])
    assert delivered(records) == expected
    assert b.workers[0].stats()["drops"] == {}


def test_a_full_classifier_ring_holds_reads_back_and_nothing_is_lost(lab: Lab) -> None:
    """Back-pressure: while B's classifier takes nothing, B's overlay_io stops reading its
    socket once a read might not fit the ring (the datagrams wait in the socket), drops no
    super-frame, and says it is blocked; once the ring is drained the rest comes through."""
    a, b = pair(lab)
    rng = random.Random(6)
    expected: list[bytes] = []
    seq = 1
    for i in range(12):  # 12 super-frames of 60,000 bytes: more than the ring holds
        payload = rng.randbytes(60000)
        send(a, TSO + tso_frame(seq, payload, 1360, ident=i))
        expected += reference_segments(seq, payload, 1360, 0x18, i)
        seq += len(payload)
        lab.pump()
    worker = b.workers[0]
    assert worker.blocked
    first = got(b.to_classifier[0])
    assert 0 < len(delivered(first)) < len(expected)
    records = first
    for _ in range(20):
        lab.pump()
        more = got(b.to_classifier[0])
        if not more:
            break
        records += more
    assert delivered(records) == expected
    assert worker.stats()["drops"] == {}
    assert b.to_classifier[0]._ring.stats().drops == 0


@pytest.mark.parametrize("gro", [True, False], ids=["gro", "no-gro"])
def test_a_peer_that_moves_mid_stream_is_reported_once(lab: Lab, gro: bool) -> None:
    """Roaming holds on both receive paths: a GRO read's run of one session (``open_run``)
    and datagrams one by one. A super-frame from the endpoint B knows tells nothing; from a
    new source, control hears ``PeerMoved`` once, however many segments came from there."""
    a, b = pair(lab, gro=gro)
    frame = tso_frame(7, random.Random(8).randbytes(20000), 1360)
    send(a, TSO + frame)
    lab.pump()
    assert got(b.to_classifier[0])
    assert not [m for m in b.feed().told if isinstance(m, messages.PeerMoved)]
    port = a.workers[0].port
    lab.net.ports[port.address].remove(port)
    port.address = (HOST_A, 40000)  # A's NAT gave it another mapping
    lab.net.ports.setdefault(port.address, []).append(port)
    send(a, TSO + tso_frame(7 + 20000, random.Random(9).randbytes(20000), 1360))
    lab.pump()
    assert got(b.to_classifier[0])
    moved = [m for m in b.feed().told if isinstance(m, messages.PeerMoved)]
    assert moved == [messages.PeerMoved(SLOT, f"{HOST_A}:40000")]
    assert b.workers[0].stats()["gro_reads"] == (2 if gro else 0)


def test_a_relayed_peer_gets_its_segments_one_by_one(lab: Lab) -> None:
    from tests.test_overlay_io import SLOT_A_AT_B, SLOT_B_AT_A

    three_nodes(lab)
    a, b = lab.nodes["a"], lab.nodes["b"]
    payload = random.Random(6).randbytes(5000)
    send(a, TSO + tso_frame(7, payload, 1360), slot=SLOT_B_AT_A)
    log = lab.pump()
    assert sum(1 for d, _, _ in log if parse_header(d).type is DatagramType.RELAY) == 8
    records = got(b.to_classifier[0])
    assert {r[1] for r in records} == {SLOT_A_AT_B}
    assert delivered(records) == reference_segments(7, payload, 1360, 0x18, 7)


def test_plaintext_super_frames(lab: Lab) -> None:
    from pipeline import messages

    a = lab.node("a", "alpha", HOST_A, ID_A, plaintext=True)
    b = lab.node("b", "beta", HOST_B, ID_B, plaintext=True)
    for node, peer in ((a, EP_B), (b, EP_A)):
        route = messages.PeerRoute(SLOT, "peer", ("100.64.0.9",), peer, True)
        node.feed().on_snapshot(messages.RouteSnapshot(1, 1, (route,)))
    payload = random.Random(7).randbytes(30000)
    frame = tso_frame(7, payload, 1360)
    send(a, TSO + frame)
    lab.pump()
    records = got(b.to_classifier[0])
    assert delivered(records) == reference_segments(7, payload, 1360, 0x18, 7)
    assert [vnet.parse(d).gso_type for _, _, _, d in records] == [vnet.GSO_TCPV4]


class EioSocket:
    """A socket whose UDP_SEGMENT sends fail with EIO, as on a kernel or device that cannot."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.plain = 0

    def sendmsg(self, parts: Any, cmsg: Any, flags: int, address: Any) -> int:
        if cmsg:
            raise OSError(errno.EIO, "Input/output error")
        self.plain += 1
        return int(self.sock.sendmsg(parts, cmsg, flags, address))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_gso_turns_itself_off_at_the_first_eio() -> None:
    """A real socket on loopback: the first GSO send fails with EIO, that batch goes a
    datagram a call, and so does every later one."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(2)
    port = UdpPort("127.0.0.1", 0, buffer_bytes=1 << 20, gso=True, gro=True)
    try:
        if not port.gso:
            pytest.skip("this kernel has no UDP GSO")
        eio = EioSocket(port.sock)
        port.sock = eio  # type: ignore[assignment]
        parts: list[bytes | bytearray | memoryview] = []
        for i in range(5):
            parts += [bytes([i]) * 16, bytes([i]) * (100 if i < 4 else 40)]
        to = receiver.getsockname()
        assert port.send_segments(parts, 116, to) == 5
        assert not port.gso and "Input/output" in port.gso_failed and eio.plain == 5
        assert [len(receiver.recv(2000)) for _ in range(5)] == [116] * 4 + [56]
        assert port.send_segments(parts[:4], 116, to) == 2 and eio.plain == 7
    finally:
        port.close()
        receiver.close()


def test_a_real_socket_sends_gso_and_reads_gro_batches() -> None:
    """Loopback, where the kernel has both: one send, one read of all the datagrams."""
    a = UdpPort("127.0.0.1", 0, buffer_bytes=1 << 20, gso=True, gro=True)
    b = UdpPort("127.0.0.1", 0, buffer_bytes=1 << 20, gso=True, gro=True)
    try:
        if not (a.gso and b.gro):
            pytest.skip("this kernel has no UDP GSO/GRO")
        parts: list[bytes | bytearray | memoryview] = []
        for i in range(10):
            parts += [bytes([i]) * 16, bytes([i]) * (1000 if i < 9 else 500)]
        assert a.send_segments(parts, 1016, b.sock.getsockname()) == 10
        import select

        select.select([b.fileno()], [], [], 2)
        length, source, segment = b.recv_batch() or (0, ("", 0), 0)
        assert (length, segment) == (9 * 1016 + 516, 1016)
        assert bytes(b.view[1016 * 3 : 1016 * 3 + 16]) == bytes([3]) * 16
    finally:
        a.close()
        b.close()


def test_a_super_frame_that_cannot_be_cut_is_a_counted_drop(lab: Lab) -> None:
    """A record whose header asks for TCP segmentation of what is no TCP packet (a broken or
    forged record: the kernel's TSO never makes one) is dropped and counted; the worker goes
    on, and the next super-frame crosses whole."""
    a, b = pair(lab)
    send(a, TSO + icmp_packet(random.Random(7).randbytes(3000)))
    lab.pump()
    assert a.workers[0].stats()["drops"] == {"gso_unsplittable": 1}
    assert got(b.to_classifier[0]) == []
    payload = random.Random(8).randbytes(5000)
    send(a, TSO + tso_frame(7, payload, 1360))
    lab.pump()
    assert delivered(got(b.to_classifier[0])) == reference_segments(7, payload, 1360, 0x18, 7)
