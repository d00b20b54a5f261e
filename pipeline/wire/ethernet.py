"""Ethernet II header codec: destination MAC, source MAC, ethertype (14 bytes)."""

from __future__ import annotations

import struct

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "BROADCAST",
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "ETHERTYPE_VLAN",
    "HEADER_LEN",
    "MAC_LEN",
    "EthernetHeader",
    "build",
    "mac_from_str",
    "mac_to_str",
    "parse",
]

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = 0x8100

HEADER_LEN = 14
MAC_LEN = 6
BROADCAST = b"\xff" * MAC_LEN

_HEADER = struct.Struct("!6s6sH")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class EthernetHeader(msgspec.Struct, frozen=True):
    """A parsed Ethernet II header; ``dst`` and ``src`` are 6-byte MAC addresses."""

    dst: bytes
    src: bytes
    ethertype: int


def parse(frame: bytes | memoryview) -> EthernetHeader:
    """Parse the header at the start of ``frame``; the payload starts at ``HEADER_LEN``."""
    if len(frame) < HEADER_LEN:
        raise RemoteProtocolError("ethernet_truncated", f"{len(frame)} bytes, need {HEADER_LEN}")
    dst, src, ethertype = _HEADER.unpack_from(frame)
    return EthernetHeader(dst, src, ethertype)


def build(dst: bytes, src: bytes, ethertype: int, payload: bytes | memoryview = b"") -> bytes:
    """Return header + ``payload``. Raises ``ValueError`` on a bad MAC or ethertype."""
    _check_mac("dst", dst)
    _check_mac("src", src)
    if not 0 <= ethertype <= 0xFFFF:
        raise ValueError(f"ethertype {ethertype!r} out of range")
    return _HEADER.pack(dst, src, ethertype) + payload


def mac_to_str(mac: bytes) -> str:
    """``b"\\x02\\x00..."`` -> ``"02:00:..."`` (lower case)."""
    _check_mac("mac", mac)
    return mac.hex(":")


def mac_from_str(text: str) -> bytes:
    """``"02:00:5e:10:00:01"`` (or ``-`` separated) -> 6 bytes. Raises ``ValueError``."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != MAC_LEN or any(len(p) != 2 or not _HEX_DIGITS.issuperset(p) for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def _check_mac(name: str, mac: bytes) -> None:
    if len(mac) != MAC_LEN:
        raise ValueError(f"{name} must be {MAC_LEN} bytes, got {len(mac)}")
