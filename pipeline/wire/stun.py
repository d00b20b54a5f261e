"""STUN messages (RFC 8489): the Binding request and its answers. Pure.

A STUN message is a 20-byte header and TLV attributes, each padded to 4 bytes::

     0                   1                   2                   3
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |0 0|     STUN message type     |         message length        |
    |                   magic cookie 0x2112A442                     |
    |                transaction id (96 bits) ...                   |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

The type interleaves a 12-bit method (Binding is 1) with a 2-bit class (request, indication,
success response, error response): a Binding request is 0x0001, its success 0x0101, its
error 0x0111. The length counts the attributes, not the header, and is a multiple of 4.

``parse`` checks the header, walks the attributes and decodes the ones this codec knows
(XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, SOFTWARE, ERROR-CODE, UNKNOWN-ATTRIBUTES, FINGERPRINT);
anything malformed raises ``RemoteProtocolError`` and nothing else. Padding bytes are ignored
on receipt and zero when sent. MESSAGE-INTEGRITY is kept but not checked (a Binding to a
public STUN server carries none); attributes after it are ignored but FINGERPRINT, as RFC
8489 section 14.5 says. A FINGERPRINT must be last and must match.

**Telling STUN from autovn's own datagrams** (one UDP port carries both): ``is_stun`` is
true when the datagram is at least 20 bytes, its two top bits are 0, bytes 4-8 are the magic
cookie and bytes 2-4 (the length) are exactly ``len(datagram) - 20``. Every autovn datagram
starts with version 1 and a type of 1-5, so its first two bytes also pass the type test (a
Binding success is 0x0101, the same bytes as a version 1 DATA header); bytes 2-4 are its
flags and 4-8 its session index. The rule is exact as long as autovn guarantees either of:

- no session index (chosen by the receiver) is ever 0x2112A442; or
- the flags field is 0 and no autovn datagram is exactly 20 bytes long (today the shortest,
  an empty DATA, is 32).

Both hold today; an index allocator that skips the magic cookie makes the first hold for good.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "PORT",
    "Address",
    "Attr",
    "Class",
    "Method",
    "StunMessage",
    "binding_error",
    "binding_request",
    "binding_success",
    "encode",
    "is_stun",
    "parse",
]

PORT = 3478
HEADER_LEN = 20
MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
TRANSACTION_ID_LEN = 12
MAX_SOFTWARE = 763  # bytes of UTF-8 (RFC 8489 section 14.14)
MAX_REASON = 763

_HEADER = struct.Struct("!HHI12s")
_TLV = struct.Struct("!HH")
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")

Address = tuple[str, int]
"""An IP address (text, IPv4 or IPv6) and a port."""


class Method(enum.IntEnum):
    BINDING = 0x001


class Class(enum.IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Attr(enum.IntEnum):
    """Attribute types; below 0x8000 a receiver must understand them, above it may skip."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489, reserved since
    CHANGE_REQUEST = 0x0003  # RFC 3489 / RFC 5780
    SOURCE_ADDRESS = 0x0004  # RFC 3489, still sent by old servers (stund)
    CHANGED_ADDRESS = 0x0005  # RFC 3489, still sent by old servers (stund)
    USERNAME = 0x0006
    PASSWORD = 0x0007  # RFC 3489
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REFLECTED_FROM = 0x000B  # RFC 3489
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


#: Comprehension-required types a Binding client may meet and can ignore: everything of
#: ``Attr`` (the RFC 3489 ones come from old servers that answer with them).
UNDERSTOOD = frozenset(int(a) for a in Attr)

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02


def _message_type(method: int, cls: Class) -> int:
    """Interleave the method's 12 bits with the class's 2 (RFC 8489 figure 3)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def _split_type(message_type: int) -> tuple[int, Class]:
    method = (
        (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    )
    cls = Class(((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10))
    return method, cls


class StunMessage(msgspec.Struct, frozen=True):
    """A parsed STUN message.

    ``attributes`` holds every attribute as (type, value without padding), in order, those
    after MESSAGE-INTEGRITY included; the decoded fields come from the first of each kind
    before it (and FINGERPRINT). ``fingerprint`` is true when a FINGERPRINT was present (it
    was checked: a wrong one does not parse).
    """

    method: int
    cls: Class
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()
    xor_mapped_address: Address | None = None
    mapped_address: Address | None = None
    software: str | None = None
    error: tuple[int, str] | None = None
    unknown_attributes: tuple[int, ...] = ()
    fingerprint: bool = False

    @property
    def reflexive(self) -> Address | None:
        """Where the server saw the request come from: XOR-MAPPED-ADDRESS, else (an RFC 3489
        server) MAPPED-ADDRESS."""
        return self.xor_mapped_address or self.mapped_address

    def unknown_required(self, understood: frozenset[int] = UNDERSTOOD) -> tuple[int, ...]:
        """Comprehension-required attribute types (< 0x8000) not in ``understood``: a request
        with any gets a 420 error, a response with any is discarded (RFC 8489 section 7.3)."""
        seen = dict.fromkeys(t for t, _ in self.attributes if t < 0x8000 and t not in understood)
        return tuple(seen)


# ----------------------------------------------------------------------------------------------
# telling STUN apart


def is_stun(datagram: bytes | bytearray | memoryview) -> bool:
    """Cheap test for a STUN message (see the module docstring for why it is exact)."""
    n = len(datagram)
    return (
        n >= HEADER_LEN
        and datagram[0] & 0xC0 == 0
        and datagram[4:8] == _COOKIE
        and int.from_bytes(datagram[2:4], "big") == n - HEADER_LEN
    )


# ----------------------------------------------------------------------------------------------
# parsing


def parse(datagram: bytes | bytearray | memoryview) -> StunMessage:
    """Parse a STUN message; raises ``RemoteProtocolError`` on anything malformed."""
    data = bytes(datagram)
    n = len(data)
    if n < HEADER_LEN:
        raise RemoteProtocolError("stun_truncated", f"{n} bytes, need {HEADER_LEN}")
    message_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if message_type & 0xC000:
        raise RemoteProtocolError("stun_bad_type", f"type {message_type:#06x}")
    if cookie != MAGIC_COOKIE:
        raise RemoteProtocolError("stun_bad_cookie", f"cookie {cookie:#010x}")
    if length % 4 or HEADER_LEN + length != n:
        raise RemoteProtocolError("stun_bad_length", f"length {length} in {n} bytes")
    method, cls = _split_type(message_type)
    fields = _Fields()
    attributes: list[tuple[int, bytes]] = []
    integrity = False
    pos = HEADER_LEN
    while pos < n:
        if fields.fingerprint:
            raise RemoteProtocolError("stun_after_fingerprint", "FINGERPRINT is not last")
        if n - pos < 4:
            raise RemoteProtocolError("stun_bad_attribute", f"{n - pos} bytes left at {pos}")
        attr_type, attr_len = _TLV.unpack_from(data, pos)
        end = pos + 4 + attr_len
        if end > n:
            raise RemoteProtocolError("stun_bad_attribute", f"{attr_type:#06x} runs past the end")
        value = data[pos + 4 : end]
        attributes.append((attr_type, value))
        if attr_type == Attr.FINGERPRINT:
            _check_fingerprint(data[:pos], value)
            fields.fingerprint = True
        elif not integrity:
            fields.take(attr_type, value, transaction_id)
        integrity = integrity or attr_type in _INTEGRITY
        pos = end + (-attr_len % 4)
    return StunMessage(
        method,
        cls,
        transaction_id,
        tuple(attributes),
        fields.xor_mapped_address,
        fields.mapped_address,
        fields.software,
        fields.error,
        fields.unknown_attributes,
        fields.fingerprint,
    )


_INTEGRITY = frozenset({Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256})


class _Fields(msgspec.Struct):
    """The decoded attributes while parsing: the first of each kind counts."""

    xor_mapped_address: Address | None = None
    mapped_address: Address | None = None
    software: str | None = None
    error: tuple[int, str] | None = None
    unknown_attributes: tuple[int, ...] = ()
    fingerprint: bool = False
    seen: set[int] = msgspec.field(default_factory=set)

    def take(self, attr_type: int, value: bytes, transaction_id: bytes) -> None:
        if attr_type in self.seen:
            return
        self.seen.add(attr_type)
        if attr_type == Attr.XOR_MAPPED_ADDRESS:
            self.xor_mapped_address = _decode_address(value, _COOKIE + transaction_id)
        elif attr_type == Attr.MAPPED_ADDRESS:
            self.mapped_address = _decode_address(value, b"")
        elif attr_type == Attr.SOFTWARE:
            if len(value) > MAX_SOFTWARE:
                raise RemoteProtocolError("stun_bad_software", f"{len(value)} bytes")
            self.software = value.decode("utf-8", errors="replace")
        elif attr_type == Attr.ERROR_CODE:
            self.error = _decode_error(value)
        elif attr_type == Attr.UNKNOWN_ATTRIBUTES:
            if len(value) % 2:
                raise RemoteProtocolError("stun_bad_unknown", f"{len(value)} bytes")
            self.unknown_attributes = tuple(
                int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2)
            )


def _decode_address(value: bytes, mask: bytes) -> Address:
    """(X)MAPPED-ADDRESS: 0, family, port, address; ``mask`` is the xor pad ("" for none)."""
    if len(value) < 4 or value[0] != 0:
        raise RemoteProtocolError("stun_bad_address", f"{value[:4].hex()}")
    family = value[1]
    want = {_FAMILY_IPV4: 8, _FAMILY_IPV6: 20}.get(family)
    if want is None or len(value) != want:
        raise RemoteProtocolError("stun_bad_address", f"family {family}, {len(value)} bytes")
    raw = value[2:]
    if mask:
        raw = bytes(a ^ b for a, b in zip(raw, mask[:2] + mask, strict=False))
    port = int.from_bytes(raw[:2], "big")
    host = IPv4Address(raw[2:]) if family == _FAMILY_IPV4 else IPv6Address(raw[2:])
    return str(host), port


def _decode_error(value: bytes) -> tuple[int, str]:
    if len(value) < 4 or len(value) - 4 > MAX_REASON:
        raise RemoteProtocolError("stun_bad_error_code", f"{len(value)} bytes")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise RemoteProtocolError("stun_bad_error_code", f"class {klass}, number {number}")
    return klass * 100 + number, value[4:].decode("utf-8", errors="replace")


def _check_fingerprint(before: bytes, value: bytes) -> None:
    if len(value) != 4:
        raise RemoteProtocolError("stun_bad_fingerprint", f"{len(value)} bytes")
    if int.from_bytes(value, "big") != _crc(before):
        raise RemoteProtocolError("stun_bad_fingerprint", "CRC mismatch")


def _crc(before: bytes) -> int:
    return (zlib.crc32(before) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# building


def encode(
    method: int,
    cls: Class,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    fingerprint: bool = False,
) -> bytes:
    """A whole message: header, each attribute zero-padded, then FINGERPRINT if asked.

    Raises ``ValueError`` on a bad transaction id, method or attribute.
    """
    if len(transaction_id) != TRANSACTION_ID_LEN:
        raise ValueError(f"transaction id of {len(transaction_id)} bytes, need 12")
    if not 0 <= method <= 0xFFF:
        raise ValueError(f"method {method:#x} out of range")
    body = bytearray()
    for attr_type, value in attributes:
        if not 0 <= attr_type <= 0xFFFF or len(value) > 0xFFFF:
            raise ValueError(f"bad attribute {attr_type:#x} of {len(value)} bytes")
        body += _TLV.pack(attr_type, len(value)) + value + bytes(-len(value) % 4)
    extra = 8 if fingerprint else 0
    if len(body) + extra > 0xFFFF:
        raise ValueError(f"message of {len(body)} bytes is too long")
    header = _HEADER.pack(
        _message_type(method, cls), len(body) + extra, MAGIC_COOKIE, transaction_id
    )
    message = header + bytes(body)
    if fingerprint:
        crc = _crc(message)
        message += _TLV.pack(Attr.FINGERPRINT, 4) + crc.to_bytes(4, "big")
    return message


def address_value(address: Address, transaction_id: bytes | None = None) -> bytes:
    """The value of XOR-MAPPED-ADDRESS (with ``transaction_id``) or MAPPED-ADDRESS (without)."""
    host, port = address
    ip = ip_address(host)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    raw = port.to_bytes(2, "big") + ip.packed
    if transaction_id is not None:
        mask = _COOKIE + transaction_id
        raw = bytes(a ^ b for a, b in zip(raw, mask[:2] + mask, strict=False))
    return bytes((0, family)) + raw


def error_value(code: int, reason: str) -> bytes:
    if not 300 <= code <= 699:
        raise ValueError(f"error code {code} out of range 300..699")
    text = reason.encode()
    if len(text) > MAX_REASON:
        raise ValueError(f"reason of {len(text)} bytes is too long")
    return bytes((0, 0, code // 100, code % 100)) + text


def binding_request(
    transaction_id: bytes, *, software: str | None = None, fingerprint: bool = True
) -> bytes:
    """A Binding request (what a client sends to learn its reflexive address)."""
    attrs = [] if software is None else [(Attr.SOFTWARE.value, _software(software))]
    return encode(Method.BINDING, Class.REQUEST, transaction_id, attrs, fingerprint=fingerprint)


def binding_success(
    transaction_id: bytes,
    reflexive: Address,
    *,
    software: str | None = None,
    fingerprint: bool = True,
    xor: bool = True,
    plain: bool = False,
) -> bytes:
    """A Binding success response naming ``reflexive``: as XOR-MAPPED-ADDRESS (``xor``),
    as MAPPED-ADDRESS (``plain``, what RFC 3489 servers send), or both."""
    attrs: list[tuple[int, bytes]] = []
    if software is not None:
        attrs.append((Attr.SOFTWARE, _software(software)))
    if plain:
        attrs.append((Attr.MAPPED_ADDRESS, address_value(reflexive)))
    if xor:
        attrs.append((Attr.XOR_MAPPED_ADDRESS, address_value(reflexive, transaction_id)))
    return encode(Method.BINDING, Class.SUCCESS, transaction_id, attrs, fingerprint=fingerprint)


def binding_error(
    transaction_id: bytes,
    code: int,
    reason: str,
    *,
    unknown: Sequence[int] = (),
    software: str | None = None,
    fingerprint: bool = True,
) -> bytes:
    """A Binding error response; ``unknown`` fills UNKNOWN-ATTRIBUTES (for code 420)."""
    attrs: list[tuple[int, bytes]] = []
    if software is not None:
        attrs.append((Attr.SOFTWARE, _software(software)))
    attrs.append((Attr.ERROR_CODE, error_value(code, reason)))
    if unknown:
        attrs.append((Attr.UNKNOWN_ATTRIBUTES, b"".join(t.to_bytes(2, "big") for t in unknown)))
    return encode(Method.BINDING, Class.ERROR, transaction_id, attrs, fingerprint=fingerprint)


def _software(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > MAX_SOFTWARE:
        raise ValueError(f"SOFTWARE of {len(raw)} bytes is too long")
    return raw
