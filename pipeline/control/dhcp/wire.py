"""The DHCP message codec (RFC 2131 §2, RFC 2132 options, RFC 3396 long options). Pure.

A DHCP message is one UDP payload, every integer big-endian::

    op(1) htype(1) hlen(1) hops(1) xid(4) secs(2) flags(2)
    ciaddr(4) yiaddr(4) siaddr(4) giaddr(4) chaddr(16) sname(64) file(128)   236 bytes
    magic cookie 99.130.83.99 (4)
    options: code(1) length(1) value(length) ..., Pad (0) and End (255) are one byte

``decode`` reads the options field, then, if option 52 (overload) says so, the ``file``
field and then the ``sname`` field (RFC 2131 §4.1). Options of one code are concatenated
in that order (RFC 3396): ``DhcpMessage.options`` maps each code to its whole value, in
the order the codes first appear. Options end at End or at the end of their field (a
missing End is tolerated, as most servers do). Anything else malformed raises
``RemoteProtocolError``: shorter than 240 bytes (``dhcp_truncated``), a wrong magic cookie
(``dhcp_bad_cookie``), ``hlen`` over 16 (``dhcp_bad_hlen``), an option running past its
field (``dhcp_option_truncated``), an overload value other than 1, 2 or 3
(``dhcp_bad_overload``). What the fields and options mean (is this a request, is the
hardware Ethernet) is the server's business, not the codec's.

``encode`` writes the options in the mapping's order, a value over 255 bytes as several
options of the same code (RFC 3396), then End, and pads the message with zeros to 300
bytes, the BOOTP minimum some clients still insist on (RFC 1542 §2.1). It never uses
overload.

No library: ``dpkt`` and ``scapy`` both decode DHCP, but neither is a better fit than these
200 lines for a message this simple, and neither validates strictly enough to sit on an
input boundary.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from ipaddress import IPv4Address

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "BOOTP_MIN_LEN",
    "BOOTREPLY",
    "BOOTREQUEST",
    "FLAG_BROADCAST",
    "HEADER_LEN",
    "HTYPE_ETHERNET",
    "MAGIC_COOKIE",
    "MIN_LEN",
    "UNSPECIFIED",
    "DhcpMessage",
    "MessageType",
    "Option",
    "decode",
    "encode",
    "pack_addresses",
    "pack_u16",
    "pack_u32",
]

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
FLAG_BROADCAST = 0x8000
MAGIC_COOKIE = bytes((99, 130, 83, 99))
HEADER_LEN = 236  # the fixed fields, before the magic cookie
MIN_LEN = HEADER_LEN + len(MAGIC_COOKIE)
BOOTP_MIN_LEN = 300
CHADDR_LEN = 16
SNAME_LEN = 64
FILE_LEN = 128
UNSPECIFIED = IPv4Address(0)

_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
assert _HEADER.size == HEADER_LEN
_OVERLOAD_FILE = 1
_OVERLOAD_SNAME = 2


class MessageType(enum.IntEnum):
    """Option 53 (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Option(enum.IntEnum):
    """The option codes this package reads or writes (RFC 2132 unless noted)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOST_NAME = 12
    DOMAIN_NAME = 15
    INTERFACE_MTU = 26
    REQUESTED_ADDRESS = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    CLIENT_ID = 61
    END = 255


class DhcpMessage(msgspec.Struct, frozen=True):
    """One DHCP message. ``chaddr`` is the whole 16-byte field (the hardware address is
    ``chaddr[:hlen]``, see ``hardware_address``); ``sname`` and ``file`` are the raw 64- and
    128-byte fields (``encode`` pads shorter ones with zeros). ``options`` maps a code to
    its value, without Pad, End or the length bytes."""

    op: int
    xid: int
    chaddr: bytes
    htype: int = HTYPE_ETHERNET
    hlen: int = 6
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = UNSPECIFIED
    yiaddr: IPv4Address = UNSPECIFIED
    siaddr: IPv4Address = UNSPECIFIED
    giaddr: IPv4Address = UNSPECIFIED
    sname: bytes = b""
    file: bytes = b""
    options: Mapping[int, bytes] = msgspec.field(default_factory=dict)

    @property
    def hardware_address(self) -> bytes:
        return self.chaddr[: self.hlen]

    @property
    def broadcast(self) -> bool:
        """The client asked for broadcast replies (the B flag)."""
        return bool(self.flags & FLAG_BROADCAST)

    def message_type(self) -> int | None:
        """Option 53 as a number (None if absent). RemoteProtocolError if not one byte."""
        value = self.options.get(Option.MESSAGE_TYPE)
        if value is None:
            return None
        if len(value) != 1:
            raise RemoteProtocolError("dhcp_bad_message_type", f"{len(value)} bytes")
        return value[0]

    def address_option(self, code: int) -> IPv4Address | None:
        """An option holding one IPv4 address (50, 54); None if absent.
        RemoteProtocolError if its length is not 4."""
        value = self.options.get(code)
        if value is None:
            return None
        if len(value) != 4:
            raise RemoteProtocolError(f"dhcp_bad_option_{code}", f"{len(value)} bytes, want 4")
        return IPv4Address(value)


def decode(data: bytes | memoryview) -> DhcpMessage:
    """Parse one DHCP message; see the module docstring for what raises."""
    n = len(data)
    if n < MIN_LEN:
        raise RemoteProtocolError("dhcp_truncated", f"{n} bytes, need {MIN_LEN}")
    fields = _HEADER.unpack_from(data)
    op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr = fields[:12]
    sname, file = fields[12:]
    if bytes(data[HEADER_LEN:MIN_LEN]) != MAGIC_COOKIE:
        raise RemoteProtocolError("dhcp_bad_cookie", bytes(data[HEADER_LEN:MIN_LEN]).hex())
    if hlen > CHADDR_LEN:
        raise RemoteProtocolError("dhcp_bad_hlen", f"hlen {hlen}")
    options: dict[int, bytearray] = {}
    _read_options(bytes(data[MIN_LEN:]), options)
    overload = options.pop(Option.OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise RemoteProtocolError("dhcp_bad_overload", overload.hex())
        if overload[0] & _OVERLOAD_FILE:
            _read_options(file, options)
        if overload[0] & _OVERLOAD_SNAME:
            _read_options(sname, options)
        options.pop(Option.OVERLOAD, None)  # an overload inside file or sname means nothing
    return DhcpMessage(
        op=op,
        htype=htype,
        hlen=hlen,
        hops=hops,
        xid=xid,
        secs=secs,
        flags=flags,
        ciaddr=IPv4Address(ciaddr),
        yiaddr=IPv4Address(yiaddr),
        siaddr=IPv4Address(siaddr),
        giaddr=IPv4Address(giaddr),
        chaddr=chaddr,
        sname=sname,
        file=file,
        options={code: bytes(value) for code, value in options.items()},
    )


def encode(message: DhcpMessage) -> bytes:
    """The message as bytes (at least 300). ValueError on a field out of range, a
    ``chaddr``/``sname``/``file`` too long, or an option code of Pad, End or overload."""
    m = message
    for name, value, limit in (
        ("op", m.op, 0xFF),
        ("htype", m.htype, 0xFF),
        ("hlen", m.hlen, CHADDR_LEN),
        ("hops", m.hops, 0xFF),
        ("xid", m.xid, 0xFFFFFFFF),
        ("secs", m.secs, 0xFFFF),
        ("flags", m.flags, 0xFFFF),
        ("chaddr length", len(m.chaddr), CHADDR_LEN),
        ("sname length", len(m.sname), SNAME_LEN),
        ("file length", len(m.file), FILE_LEN),
    ):
        if not 0 <= value <= limit:
            raise ValueError(f"{name} {value!r} out of range 0..{limit}")
    out = bytearray(
        _HEADER.pack(
            m.op,
            m.htype,
            m.hlen,
            m.hops,
            m.xid,
            m.secs,
            m.flags,
            m.ciaddr.packed,
            m.yiaddr.packed,
            m.siaddr.packed,
            m.giaddr.packed,
            m.chaddr,
            m.sname,
            m.file,
        )
    )
    out += MAGIC_COOKIE
    for code, data in m.options.items():
        if not 0 < code < 255 or code == Option.OVERLOAD:
            raise ValueError(f"option code {code} cannot be encoded as an option")
        chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        for chunk in chunks:
            out += bytes((code, len(chunk))) + chunk
    out.append(Option.END)
    if len(out) < BOOTP_MIN_LEN:
        out += bytes(BOOTP_MIN_LEN - len(out))
    return bytes(out)


def pack_u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def pack_u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def pack_addresses(*addresses: IPv4Address) -> bytes:
    return b"".join(a.packed for a in addresses)


def _read_options(field: bytes, options: dict[int, bytearray]) -> None:
    """Add the options of one field to ``options`` (concatenating repeated codes)."""
    i, n = 0, len(field)
    while i < n:
        code = field[i]
        if code == Option.END:
            return
        if code == Option.PAD:
            i += 1
            continue
        if i + 2 > n or i + 2 + field[i + 1] > n:
            raise RemoteProtocolError("dhcp_option_truncated", f"option {code} at {i}")
        length = field[i + 1]
        options.setdefault(code, bytearray()).extend(field[i + 2 : i + 2 + length])
        i += 2 + length
