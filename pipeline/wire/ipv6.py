"""IPv6 fixed-header codec (40 bytes) and a neighbour-discovery test."""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv6Address

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "HEADER_LEN",
    "NEXT_HEADER_ICMPV6",
    "IPv6Header",
    "Icmpv6Type",
    "build",
    "is_neighbour_discovery",
    "parse",
]

HEADER_LEN = 40
NEXT_HEADER_ICMPV6 = 58

_HEADER = struct.Struct("!IHBB16s16s")


class Icmpv6Type(IntEnum):
    """The ICMPv6 types of neighbour discovery (RFC 4861)."""

    ROUTER_SOLICITATION = 133
    ROUTER_ADVERTISEMENT = 134
    NEIGHBOUR_SOLICITATION = 135
    NEIGHBOUR_ADVERTISEMENT = 136
    REDIRECT = 137


class IPv6Header(msgspec.Struct, frozen=True):
    """A parsed IPv6 fixed header; the payload is ``packet[40:40 + payload_length]``."""

    version: int
    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int
    hop_limit: int
    src: IPv6Address
    dst: IPv6Address


def parse(packet: bytes | memoryview) -> IPv6Header:
    """Parse the fixed header; checks version 6 and that the payload fits in the buffer."""
    n = len(packet)
    if n < HEADER_LEN:
        raise RemoteProtocolError("ipv6_truncated", f"{n} bytes, need {HEADER_LEN}")
    first, payload_length, next_header, hop_limit, src, dst = _HEADER.unpack_from(packet)
    version = first >> 28
    if version != 6:
        raise RemoteProtocolError("ipv6_bad_version", f"version {version}")
    if HEADER_LEN + payload_length > n:
        raise RemoteProtocolError("ipv6_truncated", f"payload_length {payload_length}, have {n}")
    return IPv6Header(
        version=version,
        traffic_class=(first >> 20) & 0xFF,
        flow_label=first & 0xFFFFF,
        payload_length=payload_length,
        next_header=next_header,
        hop_limit=hop_limit,
        src=IPv6Address(src),
        dst=IPv6Address(dst),
    )


def build(
    *,
    src: IPv6Address,
    dst: IPv6Address,
    next_header: int,
    payload: bytes | memoryview = b"",
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """Return the fixed header + ``payload``. Raises ``ValueError`` on a field out of range."""
    for name, value, limit in (
        ("next_header", next_header, 0xFF),
        ("hop_limit", hop_limit, 0xFF),
        ("traffic_class", traffic_class, 0xFF),
        ("flow_label", flow_label, 0xFFFFF),
        ("payload_length", len(payload), 0xFFFF),
    ):
        if not 0 <= value <= limit:
            raise ValueError(f"{name} {value!r} out of range 0..{limit}")
    first = 6 << 28 | traffic_class << 20 | flow_label
    header = _HEADER.pack(first, len(payload), next_header, hop_limit, src.packed, dst.packed)
    return header + payload


def is_neighbour_discovery(packet: bytes | memoryview) -> bool:
    """True for IPv6 whose next header is directly ICMPv6 with type 133..137; never raises."""
    return (
        len(packet) > HEADER_LEN
        and packet[0] >> 4 == 6
        and packet[6] == NEXT_HEADER_ICMPV6
        and Icmpv6Type.ROUTER_SOLICITATION <= packet[HEADER_LEN] <= Icmpv6Type.REDIRECT
    )
