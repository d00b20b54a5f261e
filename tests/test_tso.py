"""Segmentation and coalescing of super-frames (pipeline/wire/tso.py), byte for byte against a
plain reference written here from the RFCs: every segment the kernel's GSO would make, with
final checksums; a mixed stream of TCP, UDP and ICMP, small and large, survives split, the
wire, coalescing and delivery unchanged."""

from __future__ import annotations

import random
import struct

import pytest

from pipeline.wire import tso, vnet
from pipeline.wire.ipv4 import checksum
from pipeline.wire.overlay import FLAG_PARTIAL

SRC, DST = bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])


def ip_header(total: int, proto: int, ident: int, *, tos: int = 0, ttl: int = 64) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, ident, 0x4000, ttl, proto, 0, SRC, DST)
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:]


def l4_checksum(proto: int, segment: bytes) -> int:
    pseudo = SRC + DST + struct.pack("!BBH", 0, proto, len(segment))
    value = checksum(pseudo + segment)
    return value or 0xFFFF if proto == 17 else value


def tcp_packet(
    seq: int,
    payload: bytes,
    *,
    flags: int = 0x10,
    ident: int = 7,
    options: bytes = b"\x01\x01\x08\x0a" + bytes(range(8)),
    ack: int = 0x01020304,
    window: int = 501,
    check: int | None = None,
) -> bytes:
    """A TCP/IPv4 packet; ``check`` None: the final checksum."""
    doff = (20 + len(options)) // 4
    head = struct.pack("!HHIIBBHHH", 40000, 5201, seq, ack, doff << 4, flags, window, 0, 0)
    tcp = head + options + payload
    value = l4_checksum(6, tcp) if check is None else check
    tcp = tcp[:16] + struct.pack("!H", value) + tcp[18:]
    return ip_header(20 + len(tcp), 6, ident) + tcp


def udp_packet(payload: bytes, *, ident: int = 9, check: int | None = None) -> bytes:
    udp = struct.pack("!HHHH", 5353, 4000, 8 + len(payload), 0) + payload
    value = l4_checksum(17, udp) if check is None else check
    udp = udp[:6] + struct.pack("!H", value) + udp[8:]
    return ip_header(20 + len(udp), 17, ident) + udp


def icmp_packet(payload: bytes, ident: int = 11) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return ip_header(20 + len(icmp), 1, ident) + icmp


def pseudo(proto: int, length: int) -> int:
    return tso.pseudo_sum(SRC * 3 + SRC + DST, 0, proto, length)


def tso_frame(seq: int, payload: bytes, gso: int, *, flags: int = 0x18, ident: int = 7) -> bytes:
    """A TCP super-frame as the kernel hands it over: one header, the whole payload, the
    checksum field holding the pseudo-header sum of the whole."""
    probe = tcp_packet(seq, payload, flags=flags, ident=ident, check=0)
    return tcp_packet(seq, payload, flags=flags, ident=ident, check=pseudo(6, len(probe) - 20))


def reference_segments(seq: int, payload: bytes, gso: int, flags: int, ident: int) -> list[bytes]:
    """What GSO makes of ``tso_frame(...)``: whole packets, final checksums."""
    out = []
    chunks = [payload[i : i + gso] for i in range(0, len(payload), gso)]
    for i, chunk in enumerate(chunks):
        f = flags if len(chunks) == 1 else flags & ~0x09 if i < len(chunks) - 1 else flags
        out.append(tcp_packet(seq + i * gso, chunk, flags=f, ident=ident + i))
    return out


def finished(packet: bytes | bytearray | memoryview) -> bytes:
    data = bytearray(packet)
    if data[9] in (6, 17):
        tso.finish_checksum(data, 20, 16 if data[9] == 6 else 6)
    return bytes(data)


def split_all(frame: bytes, gso: int) -> list[bytes]:
    buf = bytearray(frame)
    out: list[bytes] = []
    count = tso.split(buf, 0, len(buf), gso, lambda view: out.append(bytes(view)))
    assert count == len(out)
    return out


class TestSplit:
    @pytest.mark.parametrize("size", [1, 1359, 1360, 1361, 2720, 5000, 65535 - 52])
    def test_segments_are_the_kernel_s_byte_for_byte(self, size: int) -> None:
        payload = random.Random(size).randbytes(size)
        frame = tso_frame(1000, payload, 1360)
        segments = split_all(frame, 1360)
        assert [finished(s) for s in segments] == reference_segments(1000, payload, 1360, 0x18, 7)

    def test_each_segment_holds_its_own_pseudo_header_sum(self) -> None:
        segments = split_all(tso_frame(1, bytes(3000), 1000), 1000)
        for s in segments:
            assert struct.unpack_from("!H", s, 36)[0] == pseudo(6, len(s) - 20)

    def test_fin_and_psh_only_last_cwr_only_first(self) -> None:
        frame = tso_frame(5, bytes(4000), 1000, flags=0x80 | 0x10 | 0x08 | 0x01)
        flags = [s[33] for s in split_all(frame, 1000)]
        assert flags == [0x90, 0x10, 0x10, 0x19]

    def test_sequence_wraps(self) -> None:
        segments = split_all(tso_frame(0xFFFFFF00, bytes(1000), 500), 500)
        assert [struct.unpack_from("!I", s, 24)[0] for s in segments] == [0xFFFFFF00, 0x000000F4]

    def test_ip_ids_and_header_checksums(self) -> None:
        segments = split_all(tso_frame(1, bytes(3000), 1000, ident=0xFFFF), 1000)
        assert [struct.unpack_from("!H", s, 4)[0] for s in segments] == [0xFFFF, 0, 1]
        assert all(checksum(s[:20]) == 0 for s in segments)

    def test_udp_super_frame(self) -> None:
        payload = bytes(range(256)) * 10
        probe = udp_packet(payload, check=0)
        frame = udp_packet(payload, check=pseudo(17, len(probe) - 20))
        segments = split_all(frame, 1000)
        chunks = [payload[i : i + 1000] for i in range(0, len(payload), 1000)]
        assert [finished(s) for s in segments] == [
            udp_packet(c, ident=9 + i) for i, c in enumerate(chunks)
        ]

    @pytest.mark.parametrize("case", range(40))
    def test_any_frame_is_cut_byte_for_byte(self, case: int) -> None:
        """Random TCP and UDP super-frames (any size, gso_size down to 1, any of CWR, FIN
        and PSH, IP ids and sequence numbers about to wrap): each segment exactly as GSO
        makes it, but for the checksum field, which holds its pseudo-header sum."""
        rng = random.Random(case)
        gso = rng.choice([1, 7, 51, 536, 1000, 1348, 1360, rng.randint(1, 3000)])
        payload = rng.randbytes(rng.randint(1, min(65000, gso * rng.randint(1, 60))))
        ident = rng.choice([0, 0xFFFF - rng.randint(0, 5), rng.randint(0, 0xFFFF)])
        chunks = [payload[i : i + gso] for i in range(0, len(payload), gso)]
        last = len(chunks) - 1
        if case % 4 == 3:  # UDP
            probe = udp_packet(payload, ident=ident, check=0)
            frame = udp_packet(payload, ident=ident, check=pseudo(17, len(probe) - 20))
            expected = [
                udp_packet(c, ident=(ident + i) & 0xFFFF, check=pseudo(17, 8 + len(c)))
                for i, c in enumerate(chunks)
            ]
        else:
            seq = rng.choice([rng.randint(0, 0xFFFFFFFF), 0xFFFFFFFF - rng.randint(0, 70000)])
            flags = 0x10 | rng.choice([0, 0x01, 0x08, 0x80, 0x89])
            frame = tso_frame(seq, payload, gso, flags=flags, ident=ident)
            expected = []
            for i, c in enumerate(chunks):
                f = flags
                if i < last:
                    f &= ~0x09
                if i and last:
                    f &= ~0x80
                expected.append(
                    tcp_packet((seq + i * gso) & 0xFFFFFFFF, c, flags=f,
                               ident=(ident + i) & 0xFFFF, check=pseudo(6, 32 + len(c)))
                )  # fmt: skip
        buf = bytearray(b"\xee" * 3 + frame)
        got = [bytes(v) for v in tso.segments(buf, 3, len(buf), gso)]
        assert got == expected

    def test_refuses_what_it_cannot_cut(self) -> None:
        with pytest.raises(ValueError):
            split_all(icmp_packet(bytes(3000)), 1000)
        with pytest.raises(ValueError):
            split_all(tso_frame(1, bytes(100), 10), 0)

    def test_segment_is_the_software_fallback(self) -> None:
        payload = random.Random(1).randbytes(4000)
        frame = tso_frame(9, payload, 1000)
        header = vnet.parse(vnet.build(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1000, 20, 16))
        assert [bytes(p) for p in tso.segment(header, frame)] == reference_segments(
            9, payload, 1000, 0x18, 7
        )
        single = tcp_packet(1, b"x", check=pseudo(6, 33))
        one = vnet.parse(vnet.build(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16))
        assert [bytes(p) for p in tso.segment(one, single)] == [tcp_packet(1, b"x")]
        assert [bytes(p) for p in tso.segment(vnet.parse(vnet.ZERO), icmp_packet(b"a"))] == [
            icmp_packet(b"a")
        ]


Buffer = bytes | bytearray | memoryview


class Collected:
    def __init__(self) -> None:
        self.frames: list[tuple[vnet.VnetHeader, bytes]] = []

    def __call__(self, header: bytes, head: Buffer, packets: list[Buffer], skip: int) -> None:
        self.frames.append((vnet.parse(header), joined(head, packets, skip)))


def joined(head: Buffer, packets: list[Buffer], skip: int) -> bytes:
    """The IP packet an emit stands for: ``head``, then each packet but its headers."""
    return bytes(head) + b"".join(bytes(p)[skip:] for p in packets)


def delivered(frames: list[tuple[vnet.VnetHeader, bytes]]) -> list[bytes]:
    """What a TAP would make of the coalescer's output: the packets, checksums final."""
    return [bytes(p) for header, data in frames for p in tso.segment(header, data)]


class TestCoalescer:
    def test_split_then_coalesce_gives_the_super_frame_back(self) -> None:
        payload = random.Random(2).randbytes(20000)
        frame = tso_frame(77, payload, 1360)
        out = Collected()
        co = tso.Coalescer(out)
        for s in split_all(frame, 1360):
            co.add(s, True)
        co.flush()
        ((header, data),) = out.frames
        assert data == frame
        assert header == (vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 52, 1360, 20, 16)

    def test_a_gap_ends_the_frame(self) -> None:
        segments = split_all(tso_frame(1, bytes(5000), 1000), 1000)
        out = Collected()
        co = tso.Coalescer(out)
        for s in segments[:2] + segments[3:]:
            co.add(s, True)
        co.flush()
        assert [len(d) for _, d in out.frames] == [2052, 2052]

    def test_nothing_after_a_short_or_psh_segment(self) -> None:
        a = split_all(tso_frame(1, bytes(2500), 1000), 1000)  # 1000, 1000, 500 (PSH)
        b = split_all(tso_frame(2501, bytes(2000), 1000), 1000)
        out = Collected()
        co = tso.Coalescer(out)
        for s in a + b:
            co.add(s, True)
        co.flush()
        assert [(h.gso_size, len(d) - 52) for h, d in out.frames] == [(1000, 2500), (1000, 2000)]
        assert out.frames[0][1][33] & 0x08  # PSH kept on the frame it ended

    def test_flows_acks_and_options_keep_apart(self) -> None:
        base = tcp_packet(1, bytes(100), check=0)
        other_ack = tcp_packet(101, bytes(100), ack=9, check=0)
        other_window = tcp_packet(201, bytes(100), window=7, check=0)
        other_opts = tcp_packet(301, bytes(100), options=b"\x01" * 12, check=0)
        out = Collected()
        co = tso.Coalescer(out)
        for p in (base, other_ack, other_window, other_opts):
            co.add(p, True)
        co.flush()
        assert len(out.frames) == 4

    def test_not_partial_goes_as_it_came(self) -> None:
        p1, p2 = tcp_packet(1, bytes(100)), tcp_packet(101, bytes(100))
        out = Collected()
        co = tso.Coalescer(out)
        co.add(p1, False)
        co.add(p2, False)
        co.flush()
        assert out.frames == [(vnet.parse(vnet.ZERO), p1), (vnet.parse(vnet.ZERO), p2)]

    def test_without_merging_each_goes_alone_with_its_header(self) -> None:
        segments = split_all(tso_frame(1, bytes(3000), 1000), 1000)
        out = Collected()
        co = tso.Coalescer(out, merge=False)
        for s in segments:
            co.add(s, True)
        co.flush()
        assert [h for h, _ in out.frames] == [(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16)] * 3
        assert delivered(out.frames) == reference_segments(1, bytes(3000), 1000, 0x18, 7)

    def test_never_more_than_64_kib(self) -> None:
        segments = split_all(tso_frame(1, bytes(65000), 1360), 1360)
        segments += split_all(tso_frame(65001, bytes(65000), 1360), 1360)
        out = Collected()
        co = tso.Coalescer(out)
        for s in segments:
            co.add(s, True)
        co.flush()
        assert all(len(d) <= 0xFFFF for _, d in out.frames)
        assert sum(len(d) - 52 for _, d in out.frames) == 130000

    @pytest.mark.parametrize("seed", range(30))
    def test_add_all_is_add_one_by_one(self, seed: int) -> None:
        """Two flows' segments interleaved, some changed in one field the fast path compares
        (TOS, TTL, DF, a port, the acknowledgment number, the window, an option, the
        length), some not partial, some views: runs of any length through ``add_all`` give
        the frames ``add`` gives one packet at a time, with the same flushes."""
        rng = random.Random(seed)
        wire: list[tuple[bytes | memoryview, int]] = []
        seqs = {0: 1000, 1: 0xFFFFF000}
        for _ in range(rng.randint(1, 12)):
            flow = rng.randrange(2)
            payload = rng.randbytes(rng.randint(1, 20000))
            frame = bytearray(tso_frame(seqs[flow], payload, 1000, ident=rng.randrange(65536)))
            if flow:
                frame[21] ^= 1  # another source port
            seqs[flow] = (seqs[flow] + len(payload)) & 0xFFFFFFFF
            for segment in split_all(bytes(frame), 1000):
                packet = bytearray(segment)
                if rng.random() < 0.1:
                    packet[rng.choice([1, 6, 8, 20, 28, 34, 41])] ^= 0x40
                elif rng.random() < 0.03:
                    packet = packet[:-1]
                data = bytes(packet) if rng.random() < 0.9 else memoryview(bytes(packet))
                wire.append((data, rng.choice([FLAG_PARTIAL] * 9 + [0])))
        one, runs = Collected(), Collected()
        by_one, by_runs = tso.Coalescer(one), tso.Coalescer(runs)
        at = 0
        while at < len(wire):
            chunk = wire[at : at + rng.randint(1, 50)]
            at += len(chunk)
            for packet, partial in chunk:
                by_one.add(packet, partial)
            by_runs.add_all(chunk)
            if rng.random() < 0.5:
                by_one.flush()
                by_runs.flush()
        by_one.flush()
        by_runs.flush()
        assert runs.frames == one.frames
        assert (by_runs.packets, by_runs.frames) == (by_one.packets, by_one.frames)
        assert by_one.packets == len(wire) and by_one.frames < len(wire)

    def test_a_mixed_stream_round_trips_byte_for_byte(self) -> None:
        """TCP super-frames and small TCP, UDP (one and a super-frame), ICMP, interleaved:
        split at the sender, every packet through the coalescer at the receiver, then what a
        TAP makes of it: the reference packets, in the order sent."""
        rng = random.Random(3)
        sent: list[tuple[bytes, int]] = []  # (packet or super-frame, gso_size or 0)
        expected: list[bytes] = []
        seq = 1000
        for i in range(40):
            kind = rng.choice(["tso", "tcp", "udp", "uso", "icmp", "tso"])
            if kind == "tso":
                payload = rng.randbytes(rng.randint(1, 30000))
                sent.append((tso_frame(seq, payload, 1360, ident=i * 100), 1360))
                expected += reference_segments(seq, payload, 1360, 0x18, i * 100)
                seq += len(payload)
            elif kind == "tcp":
                payload = rng.randbytes(rng.randint(0, 200))
                sent.append((tcp_packet(seq, payload, check=pseudo(6, 32 + len(payload))), 0))
                expected.append(tcp_packet(seq, payload))
                seq += len(payload)
            elif kind == "udp":
                payload = rng.randbytes(rng.randint(0, 1300))
                sent.append((udp_packet(payload, check=pseudo(17, 8 + len(payload))), 0))
                expected.append(udp_packet(payload))
            elif kind == "uso":
                payload = rng.randbytes(rng.randint(1301, 9000))
                sent.append((udp_packet(payload, check=pseudo(17, 8 + len(payload))), 1300))
                chunks = [payload[j : j + 1300] for j in range(0, len(payload), 1300)]
                expected += [udp_packet(c, ident=9 + j) for j, c in enumerate(chunks)]
            else:
                payload = rng.randbytes(rng.randint(0, 1000))
                sent.append((icmp_packet(payload), 0))
                expected.append(icmp_packet(payload))
        wire: list[tuple[bytes, bool]] = []
        for packet, gso in sent:
            if gso:
                wire += [(s, True) for s in split_all(packet, gso)]
            else:
                wire.append((packet, packet[9] in (6, 17)))
        out = Collected()
        co = tso.Coalescer(out)
        for i, (packet, partial) in enumerate(wire):
            co.add(packet, partial)
            if i % 17 == 16:
                co.flush()  # batch ends fall anywhere
        co.flush()
        assert delivered(out.frames) == expected
        assert len(out.frames) < len(wire)  # it did coalesce
