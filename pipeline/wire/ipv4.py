"""IPv4 header codec, the RFC 1071 internet checksum, and hot-path address accessors."""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "FLAG_DF",
    "FLAG_MF",
    "MAX_HEADER_LEN",
    "MIN_HEADER_LEN",
    "IPv4Header",
    "Protocol",
    "build",
    "checksum",
    "dst_bytes",
    "ones_complement_sum",
    "parse",
    "src_bytes",
]

MIN_HEADER_LEN = 20
MAX_HEADER_LEN = 60
FLAG_DF = 0x2  # in IPv4Header.flags (the top three bits of the flags/fragment word)
FLAG_MF = 0x1

_HEADER = struct.Struct("!BBHHHBBH4s4s")


class Protocol(IntEnum):
    """The usual values of the protocol field (any 0..255 is legal on the wire)."""

    ICMP = 1
    TCP = 6
    UDP = 17


class IPv4Header(msgspec.Struct, frozen=True):
    """A parsed IPv4 header. Options, if any, are ``packet[20:header_length]``."""

    version: int
    ihl: int
    tos: int
    total_length: int
    identification: int
    flags: int
    fragment_offset: int
    ttl: int
    protocol: int
    checksum: int
    src: IPv4Address
    dst: IPv4Address

    @property
    def header_length(self) -> int:
        return self.ihl * 4


def ones_complement_sum(data: bytes | memoryview) -> int:
    """The 16-bit ones' complement sum of ``data`` (big-endian words, odd length zero-padded).

    Uses 2**16 == 1 (mod 0xFFFF): the folded sum is the whole buffer, read as one integer,
    mod 0xFFFF -- except that a non-zero buffer never sums to 0 (it gives 0xFFFF instead).
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    if value == 0:
        return 0
    return (value - 1) % 0xFFFF + 1


def checksum(data: bytes | memoryview) -> int:
    """RFC 1071 internet checksum of ``data``. Over a header holding a valid checksum it is 0."""
    return 0xFFFF - ones_complement_sum(data)


def parse(packet: bytes | memoryview, *, verify_checksum: bool = False) -> IPv4Header:
    """Parse and validate the header at the start of ``packet``.

    Checks version 4, ihl >= 5, the header and ``total_length`` fit in the buffer and
    ``total_length`` covers the header; optionally the header checksum. Trailing bytes beyond
    ``total_length`` (link padding) are allowed.
    """
    n = len(packet)
    if n < MIN_HEADER_LEN:
        raise RemoteProtocolError("ipv4_truncated", f"{n} bytes, need {MIN_HEADER_LEN}")
    vihl, tos, total, ident, flags_frag, ttl, proto, csum, src, dst = _HEADER.unpack_from(packet)
    version = vihl >> 4
    ihl = vihl & 0x0F
    if version != 4:
        raise RemoteProtocolError("ipv4_bad_version", f"version {version}")
    if ihl < 5:
        raise RemoteProtocolError("ipv4_bad_header_length", f"ihl {ihl}")
    header_length = ihl * 4
    if header_length > n:
        raise RemoteProtocolError("ipv4_truncated", f"header {header_length} bytes, have {n}")
    if total < header_length:
        raise RemoteProtocolError(
            "ipv4_bad_total_length", f"total_length {total} < header {header_length}"
        )
    if total > n:
        raise RemoteProtocolError("ipv4_truncated", f"total_length {total}, have {n}")
    if verify_checksum and ones_complement_sum(packet[:header_length]) != 0xFFFF:
        raise RemoteProtocolError("ipv4_bad_checksum", f"stored {csum:#06x}")
    return IPv4Header(
        version=version,
        ihl=ihl,
        tos=tos,
        total_length=total,
        identification=ident,
        flags=flags_frag >> 13,
        fragment_offset=flags_frag & 0x1FFF,
        ttl=ttl,
        protocol=proto,
        checksum=csum,
        src=IPv4Address(src),
        dst=IPv4Address(dst),
    )


def build(
    *,
    src: IPv4Address,
    dst: IPv4Address,
    protocol: int,
    payload: bytes | memoryview = b"",
    ttl: int = 64,
    tos: int = 0,
    identification: int = 0,
    flags: int = 0,
    fragment_offset: int = 0,
    options: bytes = b"",
) -> bytes:
    """Return header (with correct checksum and total_length) + ``payload``.

    ``options`` must be a multiple of 4 bytes, at most 40. Raises ``ValueError`` on any field
    out of range.
    """
    if len(options) % 4 or len(options) > MAX_HEADER_LEN - MIN_HEADER_LEN:
        raise ValueError(f"options must be a multiple of 4 bytes, at most 40; got {len(options)}")
    header_length = MIN_HEADER_LEN + len(options)
    total = header_length + len(payload)
    for name, value, limit in (
        ("protocol", protocol, 0xFF),
        ("ttl", ttl, 0xFF),
        ("tos", tos, 0xFF),
        ("identification", identification, 0xFFFF),
        ("flags", flags, 0x7),
        ("fragment_offset", fragment_offset, 0x1FFF),
        ("total_length", total, 0xFFFF),
    ):
        if not 0 <= value <= limit:
            raise ValueError(f"{name} {value!r} out of range 0..{limit}")
    header = bytearray(
        _HEADER.pack(
            0x40 | (header_length >> 2),
            tos,
            total,
            identification,
            flags << 13 | fragment_offset,
            ttl,
            protocol,
            0,
            src.packed,
            dst.packed,
        )
        + options
    )
    header[10:12] = checksum(memoryview(header)).to_bytes(2, "big")
    return bytes(header) + payload


def src_bytes(packet: bytes | memoryview) -> bytes:
    """The 4 packed source-address bytes. Checks only length >= 20 and version 4."""
    if len(packet) < MIN_HEADER_LEN or packet[0] >> 4 != 4:
        raise RemoteProtocolError("ipv4_malformed", "too short or not version 4")
    return bytes(packet[12:16])


def dst_bytes(packet: bytes | memoryview) -> bytes:
    """The 4 packed destination-address bytes. Checks only length >= 20 and version 4."""
    if len(packet) < MIN_HEADER_LEN or packet[0] >> 4 != 4:
        raise RemoteProtocolError("ipv4_malformed", "too short or not version 4")
    return bytes(packet[16:20])
