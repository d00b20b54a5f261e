"""The virtio-net header: the 10 bytes a TAP opened with ``IFF_VNET_HDR`` puts before every
frame it hands over and wants before every frame it is given (Linux ``virtio_net_hdr``, in
the host's byte order: little-endian here)::

    0        1        2                4                6                8               10
    +--------+--------+----------------+----------------+----------------+----------------+
    | flags  |gso_type|    hdr_len     |    gso_size    |   csum_start   |  csum_offset   |
    +--------+--------+----------------+----------------+----------------+----------------+

- ``flags``: ``NEEDS_CSUM`` (the L4 checksum holds only the pseudo-header sum: whoever
  delivers the packet computes the rest from ``csum_start``, writing it at ``csum_start +
  csum_offset``), ``DATA_VALID`` (checked already);
- ``gso_type``: ``GSO_NONE`` (one packet), ``GSO_TCPV4``/``GSO_TCPV6`` (a TSO super-frame: many
  TCP segments of ``gso_size`` payload bytes behind one header, IP total length covering all),
  ``GSO_UDP_L4`` (a USO super-frame: UDP datagrams of ``gso_size``), with ``GSO_ECN`` or-ed in
  when the segments carry ECN's CWR;
- ``hdr_len``: the length of the headers up to the payload (not to be trusted: recomputed
  from the TCP header where it matters); ``csum_start`` and ``hdr_len`` count from the first
  byte after this header.

A ring record whose ``flags`` has ``pipeline.records.FLAG_VNET`` starts with this header
(``docs/wire.md``): for a FRAME the offsets count from the Ethernet header, for an IP_PACKET
from the IP header, so the classifier shifts them by 14 (``shift``) when it strips or
prepends Ethernet. Pure.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "DATA_VALID",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP_L4",
    "HEADER",
    "LEN",
    "NEEDS_CSUM",
    "ZERO",
    "VnetHeader",
    "build",
    "parse",
    "shift",
]

HEADER = struct.Struct("<BBHHHH")
LEN = HEADER.size  # 10
ZERO = bytes(LEN)  # one whole packet, checksum final: GSO_NONE, no flags

NEEDS_CSUM = 1
DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO, never offered here
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80


class VnetHeader(NamedTuple):
    flags: int
    gso_type: int  # GSO_ECN included
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


def parse(data: bytes | bytearray | memoryview) -> VnetHeader:
    """The header at the start of ``data`` (``struct.error`` if shorter than ``LEN``)."""
    return VnetHeader._make(HEADER.unpack_from(data))


def build(
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    return HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def shift(header: bytes | bytearray | memoryview, delta: int) -> bytes:
    """``header`` with ``csum_start`` and ``hdr_len`` moved by ``delta`` bytes (-14: Ethernet
    stripped, +14: prepended); fields that are 0 (unused) stay 0."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = HEADER.unpack_from(header)
    return HEADER.pack(
        flags,
        gso_type,
        hdr_len + delta if hdr_len else 0,
        gso_size,
        csum_start + delta if flags & NEEDS_CSUM else csum_start,
        csum_offset,
    )
