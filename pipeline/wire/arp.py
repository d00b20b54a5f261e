"""ARP codec, Ethernet/IPv4 only (htype 1, ptype 0x0800, hlen 6, plen 4; 28 bytes)."""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "HLEN_ETHERNET",
    "HTYPE_ETHERNET",
    "PACKET_LEN",
    "PLEN_IPV4",
    "PTYPE_IPV4",
    "ArpOp",
    "ArpPacket",
    "build",
    "build_reply",
    "parse",
]

HTYPE_ETHERNET = 1
PTYPE_IPV4 = 0x0800
HLEN_ETHERNET = 6
PLEN_IPV4 = 4
PACKET_LEN = 28

_PACKET = struct.Struct("!HHBBH6s4s6s4s")


class ArpOp(IntEnum):
    REQUEST = 1
    REPLY = 2


class ArpPacket(msgspec.Struct, frozen=True):
    """A parsed Ethernet/IPv4 ARP packet; MACs are 6 bytes."""

    op: ArpOp
    sender_mac: bytes
    sender_ip: IPv4Address
    target_mac: bytes
    target_ip: IPv4Address


def parse(data: bytes | memoryview) -> ArpPacket:
    """Parse the ARP packet at the start of ``data``; trailing bytes (padding) are ignored."""
    if len(data) < PACKET_LEN:
        raise RemoteProtocolError("arp_truncated", f"{len(data)} bytes, need {PACKET_LEN}")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _PACKET.unpack_from(data)
    if htype != HTYPE_ETHERNET or ptype != PTYPE_IPV4 or hlen != HLEN_ETHERNET or plen != PLEN_IPV4:
        raise RemoteProtocolError(
            "arp_unsupported", f"htype={htype} ptype={ptype:#06x} hlen={hlen} plen={plen}"
        )
    if op != ArpOp.REQUEST and op != ArpOp.REPLY:
        raise RemoteProtocolError("arp_unsupported", f"op={op}")
    return ArpPacket(ArpOp(op), sha, IPv4Address(spa), tha, IPv4Address(tpa))


def build(packet: ArpPacket) -> bytes:
    """Encode ``packet`` as 28 bytes. Raises ``ValueError`` on a MAC that is not 6 bytes."""
    for name, mac in (("sender_mac", packet.sender_mac), ("target_mac", packet.target_mac)):
        if len(mac) != HLEN_ETHERNET:
            raise ValueError(f"{name} must be {HLEN_ETHERNET} bytes, got {len(mac)}")
    return _PACKET.pack(
        HTYPE_ETHERNET,
        PTYPE_IPV4,
        HLEN_ETHERNET,
        PLEN_IPV4,
        packet.op,
        packet.sender_mac,
        packet.sender_ip.packed,
        packet.target_mac,
        packet.target_ip.packed,
    )


def build_reply(request: ArpPacket, our_mac: bytes) -> ArpPacket:
    """The reply saying ``request.target_ip`` is at ``our_mac``, addressed to the requester."""
    if request.op != ArpOp.REQUEST:
        raise ValueError("can only reply to an ARP request")
    return ArpPacket(
        op=ArpOp.REPLY,
        sender_mac=our_mac,
        sender_ip=request.target_ip,
        target_mac=request.sender_mac,
        target_ip=request.sender_ip,
    )
