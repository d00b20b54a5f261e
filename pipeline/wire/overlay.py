"""The overlay wire header: the first 16 bytes of every autovn UDP datagram.

    0        1        2                4                                8               16
    +--------+--------+----------------+--------------------------------+---------------+
    | version|  type  |     flags      |         session index          |    counter    |
    +--------+--------+----------------+--------------------------------+---------------+

All fields big-endian. ``version`` is 1. ``type`` says what follows: a DATA datagram carries
one IPv4 packet for the classifier; an OVERLAY datagram carries a control message that
overlay_io hands to control without reading it; HANDSHAKE and COOKIE datagrams carry the
link handshake (``pipeline/crypto/handshake.py``); a RELAY datagram carries, sealed for
the next hop, a *relay payload*: a destination node id, a TTL and a whole DATA or OVERLAY
datagram sealed end to end for that destination (``pipeline/overlay_io/relay.py``).
``session index`` names the receiver's session and ``counter`` is the sender's per-session
packet number (the nonce and the replay window); both are 0 in plaintext mode.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from pipeline.errors import RemoteProtocolError

VERSION = 1
HEADER = struct.Struct("!BBHIQ")
HEADER_LEN = HEADER.size  # 16


class DatagramType(enum.IntEnum):
    DATA = 1
    OVERLAY = 2
    HANDSHAKE = 3
    COOKIE = 4
    RELAY = 5
    PROBE = 6


FLAG_PARTIAL = 1
"""DATA flag: the packet's TCP or UDP checksum holds only its pseudo-header sum (the sender
cut it from a super-frame, or its kernel left it to offload): the receiver finishes it, by
its TAP's offload (``NEEDS_CSUM``) or in software."""

RELAY_TTL = 16  # the TTL a relay payload starts with; each relay takes one off


class OverlayHeader(NamedTuple):
    type: DatagramType
    flags: int
    session: int
    counter: int


_TYPES = {t.value: t for t in DatagramType}


def parse_header(datagram: bytes | bytearray | memoryview) -> OverlayHeader:
    """Parse and check the header; the payload starts at HEADER_LEN."""
    if len(datagram) < HEADER_LEN:
        raise RemoteProtocolError("short_datagram", f"{len(datagram)} bytes")
    version, kind, flags, session, counter = HEADER.unpack_from(datagram)
    if version != VERSION:
        raise RemoteProtocolError("bad_version", f"version {version}")
    dtype = _TYPES.get(kind)
    if dtype is None:
        raise RemoteProtocolError("bad_type", f"type {kind}")
    return OverlayHeader(dtype, flags, session, counter)


def build_header(
    dtype: DatagramType, *, flags: int = 0, session: int = 0, counter: int = 0
) -> bytes:
    return HEADER.pack(VERSION, dtype, flags, session, counter)
