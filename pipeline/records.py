"""What travels through the shm rings: the kinds of ring records, and which kinds each edge of
the ring graph (``pipeline/topology.py``) carries. Pure.

A ring record is an 8-byte header (``length u32 | kind u8 | flags u8 | peer u16``) and its
bytes (``pipeline/shm_ring.py``). Every kind means one thing on every hop, and ``peer``
always means the same: the slot of the link the record belongs to (the peer it came from or
goes to), or 0 when it belongs to no link.

``flags`` has one bit, ``FLAG_VNET``: a 10-byte virtio-net header (``pipeline/wire/vnet.py``)
precedes the frame or packet, whose ``csum_start`` and ``hdr_len`` count from the first byte
after it. Such a record may be a super-frame of up to 64 KiB: many TCP segments (or UDP
datagrams) behind one header (``gso_type``, ``gso_size``), or one packet whose checksum is
left to be finished (``NEEDS_CSUM``). Only the FRAME and IP_PACKET records between
tap_reader, classifier and overlay_io carry it; every record to or from control has
``flags`` 0 (whole packets, checksums final). Per hop:

- tap_reader → classifier: every FRAME read from a TAP opened with virtio-net headers;
- classifier → overlay_io: the same header, shifted by -14 (Ethernet stripped): one
  classifier verdict per super-frame;
- overlay_io → classifier: a packet, or consecutive TCP segments of one flow coalesced into a
  super-frame, with the header its TAP should get (shifted by -14);
- classifier → tap_reader: the same header shifted by +14 (Ethernet prepended). A FRAME
  without it (an ARP reply, a frame from control) is written after a zero header to a TAP
  with virtio-net headers; a FRAME with it is segmented, checksums computed, for a TAP
  without them.

Per edge of the ring graph, producer → consumer, the kinds it carries:

- tap_reader → classifier: FRAME, an Ethernet frame read from the TAP.
- classifier → tap_reader: FRAME, an Ethernet frame to write to the TAP.
- classifier → overlay_io: IP_PACKET, an IPv4 packet (no Ethernet header) to seal for the
  peer ``peer``.
- overlay_io → classifier: IP_PACKET, an IPv4 packet opened from the peer ``peer``.
- classifier → control:
  - FRAME, a frame for the node itself: DHCP, or DNS to the virtual gateway;
  - RESOLVE, an IPv4 packet to an address without a route: control holds it while it
    resolves the address, then sends it (or answers ICMP host unreachable);
  - VERIFY, an IPv4 packet from the peer ``peer`` whose source address has no route:
    control delivers it only if that address resolves to that peer;
  - CLAIM, router mode: a frame from a machine of the segment with an address of its own
    and no lease: control claims the address for it.
- control → classifier: FRAME, a frame control made for the TAP (DHCP and DNS answers,
  ICMP errors, packets that waited for VERIFY).
- overlay_io → control (the handshake lane, a ring of its own): HANDSHAKE, a HANDSHAKE or
  COOKIE datagram as received and let through by the screen (``pipeline/overlay_io/screen.py``),
  after its 6-byte source endpoint.
- overlay_io → control:
  - OVERLAY, an overlay message opened from the peer ``peer``;
  - RELAY, a relay payload (dest id, ttl, inner datagram) to seal as a RELAY datagram for
    the hop ``peer``, which another overlay_io worker owns: control passes it on to that
    worker unchanged;
  - PROBE, the payload of a PROBE datagram opened with the session of the link ``peer``,
    after its 6-byte source endpoint (a shortcut probe or its answer: where it came from
    is the point);
  - STUN, a STUN datagram that came to the node's port (an answer to control's binding
    request), after its 6-byte source endpoint.
- control → overlay_io:
  - IP_PACKET, a packet that waited in control for its route, to seal for the peer ``peer``;
  - OVERLAY, an overlay message to seal for the peer ``peer``;
  - HANDSHAKE, a HANDSHAKE or COOKIE datagram to send as it is, after its 6-byte
    destination endpoint;
  - RELAY, another worker's relay payload for the hop ``peer``, which this worker owns;
  - PROBE, a payload to seal with the session of the link ``peer`` as a PROBE datagram and
    send to the 6-byte endpoint before it (not to the link's own endpoint);
  - STUN, a STUN binding request to send as it is from the node's port to the 6-byte
    endpoint before it;
  - POOL, birthday probing for the link ``peer``: a payload to seal as PROBE, as for PROBE,
    and send from every socket of the link's socket pool (opened at the first such record)
    to the 6-byte endpoint before it; empty: close the link's pool.

``EDGE_KINDS`` holds this as data; a test keeps the table in ``docs/wire.md`` true to it.
"""

from __future__ import annotations

import enum

from pipeline.topology import EDGES, Lane, Stage

__all__ = [
    "EDGE_KINDS",
    "ENDPOINT_LEN",
    "FLAG_VNET",
    "RecordKind",
    "pack_endpoint",
    "unpack_endpoint",
]


class RecordKind(enum.IntEnum):
    """The ``kind`` byte of a ring record."""

    IP_PACKET = 1
    FRAME = 2
    OVERLAY = 3
    HANDSHAKE = 4
    RELAY = 5
    RESOLVE = 6
    VERIFY = 7
    CLAIM = 8
    PROBE = 9
    STUN = 10
    POOL = 11


_TAP, _CLS, _IO, _CTL = Stage.TAP_READER, Stage.CLASSIFIER, Stage.OVERLAY_IO, Stage.CONTROL
K = RecordKind

_MAIN, _HANDSHAKE = Lane.MAIN, Lane.HANDSHAKE

EDGE_KINDS: dict[tuple[Stage, Stage, Lane], frozenset[RecordKind]] = {
    (_TAP, _CLS, _MAIN): frozenset({K.FRAME}),
    (_CLS, _TAP, _MAIN): frozenset({K.FRAME}),
    (_CLS, _IO, _MAIN): frozenset({K.IP_PACKET}),
    (_IO, _CLS, _MAIN): frozenset({K.IP_PACKET}),
    (_CLS, _CTL, _MAIN): frozenset({K.FRAME, K.RESOLVE, K.VERIFY, K.CLAIM}),
    (_CTL, _CLS, _MAIN): frozenset({K.FRAME}),
    (_IO, _CTL, _MAIN): frozenset({K.OVERLAY, K.RELAY, K.PROBE, K.STUN}),
    (_IO, _CTL, _HANDSHAKE): frozenset({K.HANDSHAKE}),
    (_CTL, _IO, _MAIN): frozenset(
        {K.IP_PACKET, K.OVERLAY, K.HANDSHAKE, K.RELAY, K.PROBE, K.STUN, K.POOL}
    ),
}
"""Which kinds each edge of the ring graph carries; a consumer counts any other as a drop."""

del K

ENDPOINT_LEN = 6

FLAG_VNET = 1
"""Record flag: a 10-byte virtio-net header precedes the frame or packet (see above)."""


def pack_endpoint(host: str, port: int) -> bytes:
    """The 6-byte prefix of a HANDSHAKE record: IPv4 address and port, big-endian."""
    return bytes(int(x) for x in host.split(".")) + port.to_bytes(2, "big")


def unpack_endpoint(prefix: bytes | memoryview) -> tuple[str, int]:
    return ".".join(str(b) for b in prefix[:4]), int.from_bytes(prefix[4:6], "big")


def ring_graph() -> str:
    """The ring graph with the kinds each edge carries, as ``docs/architecture.md`` draws it
    (a test keeps the drawing equal to this)."""
    index = {Stage.TAP_READER: "[t]", Stage.CLASSIFIER: "[c]", Stage.OVERLAY_IO: "[k]"}
    rows = []
    for producer, consumer, lane in EDGES:
        kinds = ", ".join(k.name for k in sorted(EDGE_KINDS[producer, consumer, lane]))
        left = f"{producer}{index.get(producer, '')}"
        right = f"{consumer}{index.get(consumer, '')}" + (f" ({lane} lane)" if lane else "")
        rows.append((left, kinds, right))
    width = max(len(left) for left, _, _ in rows)
    span = max(len(kinds) for _, kinds, _ in rows) + 4
    return "\n".join(
        f"{left:<{width}} ══ {kinds + ' ':═<{span}}▶ {right}" for left, kinds, right in rows
    )
