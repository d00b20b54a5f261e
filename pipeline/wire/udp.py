"""UDP header codec (8 bytes) and the IPv4 pseudo-header checksum."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import msgspec

from pipeline.errors import RemoteProtocolError
from pipeline.wire.ipv4 import Protocol, ones_complement_sum

__all__ = [
    "HEADER_LEN",
    "UdpHeader",
    "build",
    "ipv4_checksum",
    "parse",
    "verify_ipv4_checksum",
]

HEADER_LEN = 8

_HEADER = struct.Struct("!HHHH")
_PSEUDO_TAIL = struct.Struct("!BBH")


class UdpHeader(msgspec.Struct, frozen=True):
    """A parsed UDP header; the payload is ``datagram[8:length]``."""

    src_port: int
    dst_port: int
    length: int
    checksum: int


def parse(datagram: bytes | memoryview) -> UdpHeader:
    """Parse the header; checks 8 <= length <= len(datagram). Does not verify the checksum."""
    n = len(datagram)
    if n < HEADER_LEN:
        raise RemoteProtocolError("udp_truncated", f"{n} bytes, need {HEADER_LEN}")
    src_port, dst_port, length, csum = _HEADER.unpack_from(datagram)
    if length < HEADER_LEN:
        raise RemoteProtocolError("udp_bad_length", f"length {length}")
    if length > n:
        raise RemoteProtocolError("udp_truncated", f"length {length}, have {n}")
    return UdpHeader(src_port, dst_port, length, csum)


def ipv4_checksum(src: IPv4Address, dst: IPv4Address, datagram: bytes | memoryview) -> int:
    """Internet checksum over the IPv4 pseudo-header + ``datagram`` as given.

    With the checksum field zeroed this is the value to store (send 0xFFFF if it is 0);
    over a datagram holding a correct checksum it is 0. Length is ``len(datagram)``.
    """
    if len(datagram) > 0xFFFF:
        raise ValueError(f"datagram of {len(datagram)} bytes is too long")
    pseudo = src.packed + dst.packed + _PSEUDO_TAIL.pack(0, Protocol.UDP, len(datagram))
    total = ones_complement_sum(pseudo) + ones_complement_sum(datagram)
    total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def verify_ipv4_checksum(src: IPv4Address, dst: IPv4Address, datagram: bytes | memoryview) -> bool:
    """True if the stored checksum is correct, or 0 (no checksum; legal over IPv4)."""
    if len(datagram) < HEADER_LEN:
        raise RemoteProtocolError("udp_truncated", f"{len(datagram)} bytes, need {HEADER_LEN}")
    if datagram[6] == 0 and datagram[7] == 0:
        return True
    return ipv4_checksum(src, dst, datagram) == 0


def build(
    src_port: int,
    dst_port: int,
    payload: bytes | memoryview = b"",
    *,
    src: IPv4Address | None = None,
    dst: IPv4Address | None = None,
) -> bytes:
    """Return header + ``payload``, with the checksum computed if ``src`` and ``dst`` are given
    (else 0, meaning none). Raises ``ValueError`` on a port or length out of range."""
    length = HEADER_LEN + len(payload)
    for name, value in (("src_port", src_port), ("dst_port", dst_port), ("length", length)):
        if not 0 <= value <= 0xFFFF:
            raise ValueError(f"{name} {value!r} out of range 0..65535")
    datagram = _HEADER.pack(src_port, dst_port, length, 0) + payload
    if src is None or dst is None:
        return datagram
    csum = ipv4_checksum(src, dst, datagram) or 0xFFFF
    return datagram[:6] + csum.to_bytes(2, "big") + datagram[8:]
