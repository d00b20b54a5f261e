"""Kinds of records that travel through the shm rings (the ``kind`` byte of a ring record)."""

from __future__ import annotations

import enum


class RecordKind(enum.IntEnum):
    IP_PACKET = 1  # an IPv4 packet without Ethernet header (classifier <-> overlay_io)
    FRAME = 2  # an Ethernet frame (tap_reader <-> classifier)
    OVERLAY = 3  # an overlay message, opaque to overlay_io (overlay_io <-> control)
    HANDSHAKE = 4  # a HANDSHAKE/COOKIE datagram after a 6-byte endpoint (overlay_io <-> control)
    # A relay payload (dest id, ttl, inner datagram) to seal as a RELAY datagram for the hop
    # slot ``peer``: overlay_io -> control -> the overlay_io worker that owns that slot.
    RELAY = 5


ENDPOINT_LEN = 6


def pack_endpoint(host: str, port: int) -> bytes:
    """The 6-byte prefix of a HANDSHAKE record: IPv4 address and port, big-endian."""
    return bytes(int(x) for x in host.split(".")) + port.to_bytes(2, "big")


def unpack_endpoint(prefix: bytes | memoryview) -> tuple[str, int]:
    return ".".join(str(b) for b in prefix[:4]), int.from_bytes(prefix[4:6], "big")
