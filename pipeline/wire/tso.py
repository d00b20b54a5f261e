"""Segmentation and coalescing of IPv4 super-frames, in Python, without ever summing a
payload on the hot paths. Pure.

A TAP opened with virtio-net headers and TSO hands over TCP *super-frames*: one IPv4 and TCP
header and up to 64 KiB of payload, to be cut into segments of ``gso_size`` bytes
(``pipeline/wire/vnet.py``). This module does what the kernel's GSO would:

- ``split`` cuts a TCP (``GSO_TCPV4``) or UDP (``GSO_UDP_L4``) super-frame into real packets,
  in place: segment *i*'s headers are written just before its payload, over the tail of
  segment *i-1*, which the caller has consumed (sealed) by then, so no payload byte is
  copied. Per segment: the IPv4 total length, the identification (+i), the header checksum
  (incrementally, integer arithmetic), and for TCP the sequence number (+i*gso_size), FIN and
  PSH on the last segment only, CWR on the first only; for UDP the length. The L4 checksum
  is left partial, as the sending kernel left it (``NEEDS_CSUM``): the field holds each
  segment's own pseudo-header sum, so every segment is a correct CHECKSUM_PARTIAL packet,
  and whoever delivers it finishes it (a receiving TAP with ``NEEDS_CSUM``, the kernel's
  offload; or ``finish_checksum`` where there is none).
- ``Coalescer`` does the reverse for the packets a peer sent (wireguard-go's ``tcpGRO``
  rules): consecutive in-order TCP segments of one flow (same addresses, ports,
  acknowledgment number, TOS, DF, TTL, window and options; contiguous sequence numbers;
  equal payload sizes but for a shorter last one; only ACK, and PSH only on the last) become
  one super-frame with its virtio-net header: ``NEEDS_CSUM``, ``GSO_TCPV4``, ``gso_size``,
  the IPv4 total length and header checksum rewritten, and the exact pseudo-header sum in
  the TCP checksum field (a wrong one is delivered locally all the same, and only fails once
  the frame is forwarded: router mode). Unlike wireguard-go it does not verify the
  segments' checksums first: they are partial on purpose, and the AEAD tag already vouched
  for every byte. Anything else passes alone, in order.
- ``segment`` and ``finish_checksum`` are the slow software fallbacks for the few places that
  need whole packets with final checksums (control, and a TAP without virtio-net headers).

IPv4 only: the pipeline carries IPv4.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from typing import TypeAlias

from pipeline.wire import vnet
from pipeline.wire.ipv4 import ones_complement_sum
from pipeline.wire.overlay import FLAG_PARTIAL

__all__ = [
    "MAX_IP_PACKET",
    "Coalescer",
    "Emit",
    "finish_checksum",
    "pseudo_sum",
    "segment",
    "segments",
    "split",
]

Buffer: TypeAlias = bytes | bytearray | memoryview
Emit: TypeAlias = Callable[[bytes, Buffer, list[Buffer], int], object]
"""``emit(vnet_header, head, packets, skip)``: one packet or super-frame for the TAP: its
virtio-net header, then its IP packet: ``head``, then each of ``packets`` but its first
``skip`` bytes (its headers), in order (buffers valid during the call). A packet that goes as
it came is ``(ZERO, packet, [], 0)``; any other has a header that is not ``ZERO``. Whole
packets, not views of their payloads: a view costs more than the copy it would save, and
the ring copies them last to first (``Producer.push_cut``)."""

MAX_IP_PACKET = 0xFFFF
TCP = 6
UDP = 17
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80
_W10 = struct.Struct(">10H")  # a 20-byte IPv4 header as words
_IP_FIX = struct.Struct(">HHHHH")  # total length, id, flags/fragment, ttl/protocol, checksum
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ADDR = struct.Struct(">4H")  # source and destination, as words
_ID_FRAG_TTL = struct.Struct(">HHH")


def _fold(value: int) -> int:
    value = (value & 0xFFFF) + (value >> 16)
    return (value & 0xFFFF) + (value >> 16)


def pseudo_sum(packet: Buffer, at: int, proto: int, l4_length: int) -> int:
    """The folded (not complemented) sum of the IPv4 pseudo-header of the packet at ``at``:
    what a CHECKSUM_PARTIAL packet holds in its L4 checksum field."""
    a, b, c, d = _ADDR.unpack_from(packet, at + 12)
    return _fold(a + b + c + d + proto + l4_length)


def finish_checksum(packet: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Compute, in software, the checksum of a packet whose field holds its pseudo-header sum
    (``NEEDS_CSUM``): the sum over ``packet[csum_start:]``, complemented, at
    ``csum_start + csum_offset`` (0 becomes 0xFFFF, as UDP needs and TCP allows)."""
    value = 0xFFFF - ones_complement_sum(memoryview(packet)[csum_start:])
    _U16.pack_into(packet, csum_start + csum_offset, value or 0xFFFF)


def _ip_base(buf: Buffer, ip0: int) -> int:
    """The sum of a 20-byte IPv4 header's words but total length, id and checksum."""
    w: tuple[int, ...] = _W10.unpack_from(buf, ip0)
    return w[0] + w[3] + w[4] + w[6] + w[7] + w[8] + w[9]


def split(
    buf: bytearray | memoryview,
    ip0: int,
    end: int,
    gso_size: int,
    emit: Callable[[memoryview], object],
) -> int:
    """``segments``, each handed to ``emit``; returns how many. ``emit`` must be done with a
    view when it returns: the next packet's headers overwrite its tail."""
    count = 0
    for view in segments(buf, ip0, end, gso_size):
        emit(view)
        count += 1
    return count


def segments(
    buf: bytearray | memoryview, ip0: int, end: int, gso_size: int
) -> Iterator[memoryview]:
    """Cut the super-frame ``buf[ip0:end]`` (an IPv4 packet with a TCP or UDP header and a
    payload of any length) into packets of at most ``gso_size`` payload bytes, in place, and
    yield each as a view, in order. The caller must be done with a view before it asks for
    the next: the next packet's headers overwrite its tail.

    ValueError (at the call, before any packet is cut) if it is not IPv4 TCP or UDP without
    IP options, its headers do not fit in it, or ``gso_size`` is 0. A packet whose payload
    fits one segment is yielded as it is (with a fresh pseudo-header sum).
    """
    mv = memoryview(buf)
    if end - ip0 < 28 or mv[ip0] != 0x45 or gso_size <= 0:
        raise ValueError("not an IPv4 packet without options, or no gso_size")
    proto = mv[ip0 + 9]
    t0 = ip0 + 20
    if proto == TCP:
        hl = 20 + ((mv[t0 + 12] >> 4) << 2) if end - ip0 >= 40 else 0
    elif proto == UDP:
        hl = 28
    else:
        raise ValueError(f"protocol {proto}: only TCP and UDP are segmented")
    if hl < (28 if proto == UDP else 40) or ip0 + hl > end:
        raise ValueError(f"headers of {hl} bytes in {end - ip0}")
    return _cut(mv, ip0, end, gso_size, proto, hl)


def _cut(
    mv: memoryview, ip0: int, end: int, gso_size: int, proto: int, hl: int
) -> Iterator[memoryview]:
    """``segments``' work, once the headers are known to be sound. The first and the last
    segment are fixed field by field; every one between is written whole, its headers in one
    ``pack_into`` (of ``_head``: what differs from the first segment's is only the IP id
    and header checksum and, for TCP, the sequence number)."""
    t0 = ip0 + 20
    payload = end - ip0 - hl
    check_at = t0 + (16 if proto == TCP else 6)
    if payload <= gso_size:
        _U16.pack_into(mv, check_at, pseudo_sum(mv, ip0, proto, end - t0))
        yield mv[ip0:end]
        return
    count = -(-payload // gso_size)
    base = _ip_base(mv, ip0)
    ident0, frag, ttl_proto = _ID_FRAG_TTL.unpack_from(mv, ip0 + 4)
    full = hl + gso_size
    seed_full = pseudo_sum(mv, ip0, proto, full - 20)
    if proto == TCP:
        seq = _U32.unpack_from(mv, t0 + 4)[0]
        step = gso_size
        flags = mv[t0 + 13]
        mv[t0 + 13] = flags & ~(FIN | PSH | CWR)  # a middle segment's
        last_flags = flags & ~CWR
    else:  # the UDP length and checksum seed, the same in every full segment
        _U16.pack_into(mv, t0 + 4, full - 20)
        seq = 0
        step = 0
    _U16.pack_into(mv, ip0 + 2, full)
    _U16.pack_into(mv, check_at, seed_full)
    # the fields every full segment shares: [0:4], [12:24], [28:hl] (TCP) or [24:28] (UDP)
    lead = bytes(mv[ip0 : ip0 + 4])
    ends = bytes(mv[ip0 + 12 : ip0 + 24])
    rest = bytes(mv[ip0 + 28 : ip0 + hl])
    if proto == UDP:
        seq = _U32.unpack_from(mv, ip0 + 24)[0]
    pack_head = _head(len(rest)).pack_into
    common = _fold(base + full)
    x = common + ident0
    x = (x & 0xFFFF) + (x >> 16)
    pack_head(mv, ip0, lead, ident0, frag, ttl_proto, ~x & 0xFFFF, ends, seq, rest)
    template = bytes(mv[ip0 : ip0 + hl])  # the last segment's, but for what is its own
    if proto == TCP:
        mv[t0 + 13] = flags & ~(FIN | PSH)  # the first keeps CWR
    yield mv[ip0 : ip0 + full]
    ident = ident0
    pos = ip0
    for pos in range(ip0 + gso_size, ip0 + (count - 1) * gso_size, gso_size):
        ident = (ident + 1) & 0xFFFF
        seq = (seq + step) & 0xFFFFFFFF
        x = common + ident
        x = (x & 0xFFFF) + (x >> 16)
        pack_head(mv, pos, lead, ident, frag, ttl_proto, ~x & 0xFFFF, ends, seq, rest)
        yield mv[pos : pos + full]
    # the last: its own length, checksums and (TCP) flags
    pos = ip0 + (count - 1) * gso_size
    ident = (ident0 + count - 1) & 0xFFFF
    length = end - pos
    mv[pos : pos + hl] = template
    if proto == TCP:
        _U32.pack_into(mv, pos + 24, (seq + step) & 0xFFFFFFFF)
        mv[pos + 33] = last_flags
        _U16.pack_into(mv, pos + 36, pseudo_sum(mv, pos, proto, length - 20))
    else:
        _U16.pack_into(mv, pos + 24, length - 20)
        _U16.pack_into(mv, pos + 26, pseudo_sum(mv, pos, proto, length - 20))
    x = _fold(base + length + ident)
    _IP_FIX.pack_into(mv, pos + 2, length, ident, frag, ttl_proto, ~x & 0xFFFF)
    yield mv[pos:end]


_HEADS: dict[int, struct.Struct] = {}


def _head(rest: int) -> struct.Struct:
    """The headers of a full segment: IP bytes 0-4, id, flags/fragment, TTL/protocol,
    checksum, addresses and ports, the TCP sequence number (for UDP, its length and checksum
    seed), then ``rest`` bytes (the TCP header after its sequence number)."""
    head = _HEADS.get(rest)
    if head is None:
        head = _HEADS[rest] = struct.Struct(f">4sHHHH12sI{rest}s")
    return head


def segment(header: vnet.VnetHeader, packet: Buffer) -> list[bytearray]:
    """Whole packets with final checksums from an IPv4 packet and its virtio-net header (offsets
    from the IP header): the super-frame cut (``GSO_TCPV4``, ``GSO_UDP_L4``) and every checksum
    left to finish (``NEEDS_CSUM``) computed; a packet with neither comes back as it is. The
    slow path, for control and for a TAP without virtio-net headers. ValueError: a
    super-frame ``split`` refuses."""
    data = bytearray(packet)
    gso = header.gso_type & ~vnet.GSO_ECN
    if gso in (vnet.GSO_TCPV4, vnet.GSO_UDP_L4) and header.gso_size and len(data) >= 28:
        out: list[bytearray] = []
        split(data, 0, len(data), header.gso_size, lambda view: out.append(bytearray(view)))
        for piece in out:
            finish_checksum(piece, 20, 16 if piece[9] == TCP else 6)
        return out
    if header.flags & vnet.NEEDS_CSUM and header.csum_start + header.csum_offset + 2 <= len(data):
        finish_checksum(data, header.csum_start, header.csum_offset)
    return [data]


_SHARED: dict[int, struct.Struct] = {}


def _shared_fields(hl: int) -> struct.Struct:
    """What a full segment of ``hl`` bytes of headers must share with the first of its frame
    to join it on the fast path: IP bytes 0-2 (version, TOS), 6-10 (flags, fragment offset,
    TTL, protocol), 12-24 (addresses, ports) and 28-``hl`` (the TCP header after the
    sequence number)."""
    shared = _SHARED.get(hl)
    if shared is None:
        shared = _SHARED[hl] = struct.Struct(f">2s4x4s2x12s4x{max(0, hl - 28)}s")
    return shared


_NEEDS_CSUM = vnet.NEEDS_CSUM
_GSO_TCPV4 = vnet.GSO_TCPV4
_VNET_PACK = vnet.HEADER.pack
_ZERO = vnet.ZERO


class Coalescer:
    """Opened IPv4 packets in (``add``), in the order they came; packets and super-frames for
    the TAP out (``emit``: see ``Emit``), in the same order per flow. Holds at most one
    super-frame in the making: ``flush`` (at the end of every batch, never held across a
    sleep) emits it.

    ``partial``: the packet's L4 checksum holds its pseudo-header sum only (the sender cut it
    from a super-frame or its kernel left it): a TCP or UDP packet goes out with
    ``NEEDS_CSUM``. A packet without it goes out as it came (a zero header: checksums final).
    Coalesced frames are always ``NEEDS_CSUM``.
    """

    __slots__ = (
        "_emit", "_first", "_parts", "_key", "_hl", "_gso", "_next_seq", "_total", "_closed",
        "_psh", "_max", "_full", "_shared", "_same", "frames", "packets",
    )  # fmt: skip

    def __init__(self, emit: Emit, *, max_bytes: int = MAX_IP_PACKET, merge: bool = True) -> None:
        """``merge`` False: every packet goes alone (for a TAP without virtio-net headers,
        which would only have them cut again), with its header all the same."""
        self._emit = emit
        self._max = max_bytes if merge else 0
        self._first: Buffer | None = None  # the first packet of the frame in the making
        self._parts: list[Buffer] = []  # its packets, the first included
        self._key: bytes = b""
        self._hl = 0
        self._gso = 0
        self._next_seq = 0
        self._total = 0  # IP total length so far
        self._closed = False
        self._psh = False
        self._full = -1  # the length of a full segment (the first packet's); -1: no frame
        # the bytes every full segment shares with the first (``_SHARED``), and its reader
        self._shared: tuple[bytes, ...] = ()
        self._same = _shared_fields(20).unpack_from
        self.frames = 0  # emitted: packets and super-frames
        self.packets = 0  # added

    @property
    def empty(self) -> bool:
        """No frame in the making: a packet that cannot merge may pass it by."""
        return self._first is None

    def add(self, packet: Buffer, partial: int) -> None:
        """One opened packet (kept, not copied, until emitted: it must not change);
        ``partial``: true (any non-zero: the DATA header's flags do) if its checksum is
        partial."""
        partial &= FLAG_PARTIAL
        self.packets += 1
        if (
            len(packet) == self._full
            and partial
            and self._same(packet) == self._shared
            and _U32.unpack_from(packet, 24)[0] == self._next_seq
            and self._total + self._gso <= self._max
        ):  # the fast path: see add_all
            self._parts.append(packet)
            self._next_seq = (self._next_seq + self._gso) & 0xFFFFFFFF
            self._total += self._gso
            return
        n = len(packet)
        if n < 40 or packet[0] != 0x45 or packet[9] != TCP or packet[6] & 0x3F or packet[7]:
            self.flush()
            self._alone(packet, partial)
            return
        if n > self._max:  # never merged: not even a frame of one (merge False)
            self._alone(packet, partial)
            return
        hl = 20 + ((packet[32] >> 4) << 2)
        flags = packet[33]
        size = n - hl
        if size <= 0 or (flags != ACK and flags != ACK | PSH) or hl > n or not partial:
            self.flush()
            self._alone(packet, partial)
            return
        seq = _U32.unpack_from(packet, 24)[0]
        if self._first is not None:
            if (
                seq == self._next_seq
                and not self._closed
                and hl == self._hl
                and size <= self._gso
                and self._total + size <= self._max
                and self._key_of(packet, hl) == self._key
            ):
                self._parts.append(packet)
                self._next_seq = (seq + size) & 0xFFFFFFFF
                self._total += size
                if size < self._gso or flags & PSH:
                    self._close(bool(flags & PSH))
                return
            self.flush()
        self._first = packet
        self._key = self._key_of(packet, hl)
        self._hl = hl
        self._gso = size
        self._full = n
        self._next_seq = (seq + size) & 0xFFFFFFFF
        self._total = n
        self._closed = False
        self._psh = False
        self._same = _shared_fields(hl).unpack_from
        self._shared = self._same(packet)
        self._parts = [packet]
        if flags & PSH:
            self._close(True)

    def add_all(self, packets: Iterable[tuple[Buffer, int]]) -> None:
        """``add`` of each ``(packet, partial)``, in order (a GRO read's run, opened).

        The fast path, in one loop with the frame's state in locals: the next full segment
        cut from the same super-frame has the first's length and, from the acknowledgment
        number to the end of the options (flags, window and checksum seed included: the
        seed depends on the length), in the addresses and ports, the flags, fragment
        offset, TTL and protocol, the version and TOS (``_SHARED``), the same bytes as the
        first; and the next sequence number. Anything else goes through ``add``."""
        fast = 0
        rest = iter(packets)
        while True:
            full, shared, same, gso = self._full, self._shared, self._same, self._gso
            next_seq, total, limit = self._next_seq, self._total, self._max - gso
            append = self._parts.append
            for packet, partial in rest:
                if (
                    len(packet) == full
                    and partial & FLAG_PARTIAL
                    and same(packet) == shared
                    and _U32.unpack_from(packet, 24)[0] == next_seq
                    and total <= limit
                ):
                    append(packet)
                    next_seq = (next_seq + gso) & 0xFFFFFFFF
                    total += gso
                    fast += 1
                    continue
                break  # to add, then back with the frame add leaves
            else:
                self._next_seq = next_seq
                self._total = total
                self.packets += fast
                return
            self._next_seq = next_seq
            self._total = total
            self.add(packet, partial)

    def _close(self, psh: bool) -> None:
        """Nothing may join the frame any more (a short or PSH segment ended it)."""
        self._closed = True
        self._psh = psh
        self._full = -1  # no packet has that length: the fast path never matches

    @staticmethod
    def _key_of(packet: Buffer, hl: int) -> bytes:
        """What must be equal for two segments to merge: TOS, DF, TTL and protocol, the
        addresses, the ports, the acknowledgment number, the data offset, the window and the
        options (not the sequence number, the flags or the checksum)."""
        p = bytes(packet[:hl])
        return b"".join((p[1:2], bytes((p[6] & 0xE0,)), p[8:10], p[12:24], p[28:33], p[34:36],
                         p[40:hl]))  # fmt: skip

    def flush(self) -> None:
        """Emit the super-frame in the making, if any."""
        first = self._first
        if first is None:
            return
        self._first = None
        self._full = -1
        packets = self._parts
        self._parts = []
        if len(packets) == 1:
            self._alone(first, True)
            return
        hl = self._hl
        total = self._total
        head = bytearray(first[:hl])
        head[10] = head[11] = 0
        _U16.pack_into(head, 2, total)
        _U16.pack_into(head, 10, 0xFFFF - ones_complement_sum(memoryview(head)[:20]))
        if self._psh:
            head[33] |= PSH
        _U16.pack_into(head, 36, pseudo_sum(head, 0, TCP, total - 20))
        self.frames += 1
        self._emit(_VNET_PACK(_NEEDS_CSUM, _GSO_TCPV4, hl, self._gso, 20, 16), head, packets, hl)

    def _alone(self, packet: Buffer, partial: int) -> None:
        """A packet that joins nothing: a TCP or UDP one with a partial checksum gets a fresh
        pseudo-header sum and ``NEEDS_CSUM``; any other goes as it is."""
        self.frames += 1
        n = len(packet)
        if partial and n >= 28 and packet[0] >> 4 == 4 and not (packet[6] & 0x3F or packet[7]):
            ihl = (packet[0] & 15) << 2
            proto = packet[9]
            if proto == TCP and n >= ihl + 20:
                offset = 16
            elif proto == UDP and n >= ihl + 8:
                offset = 6
            else:
                self._emit(_ZERO, packet, [], 0)
                return
            at = ihl + offset
            head = bytearray(packet[: at + 2])
            _U16.pack_into(head, at, pseudo_sum(packet, 0, proto, n - ihl))
            header = _VNET_PACK(_NEEDS_CSUM, 0, 0, 0, ihl, offset)
            self._emit(header, head, [packet], at + 2)
            return
        self._emit(_ZERO, packet, [], 0)
