"""PCP (RFC 6887): the MAP and ANNOUNCE opcodes, requests and responses. Pure.

A client sends requests to the gateway's UDP port 5351 (as NAT-PMP, whose successor PCP is:
the first byte, the version, tells them apart: 0 NAT-PMP, 2 PCP). Big-endian::

    request header   version 2 | R=0, opcode (7 bits) | reserved u16 | requested lifetime u32 |
                     the client's own IP address (16 bytes)                         (24 bytes)
    response header  version 2 | R=1, opcode | reserved u8 | result u8 | lifetime u32 |
                     epoch u32 | reserved (12 bytes)                                (24 bytes)
    MAP payload      mapping nonce (12 bytes) | protocol u8 | reserved (3 bytes) |
                     internal port u16 | suggested (request) or assigned (response) external
                     port u16 | suggested or assigned external IP address (16)      (36 bytes)
    options          code u8 | reserved u8 | length u16 | data, padded to 4 bytes (any number)

IPv4 addresses travel as IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``); "no suggestion" is
``::ffff:0.0.0.0``. ANNOUNCE (opcode 0) has no payload: a client may send one to learn
whether the gateway speaks PCP, and a gateway multicasts one when it lost its mappings.
A MAP with lifetime 0 deletes the mapping; the gateway accepts that only with the nonce
that made it. The response's ``epoch`` works as in NAT-PMP. Messages are a multiple of 4
bytes, from 24 to 1100. PEER (opcode 2) is not implemented: its responses do not parse.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "PORT",
    "VERSION",
    "AnnounceRequest",
    "AnnounceResponse",
    "MapRequest",
    "MapResponse",
    "Opcode",
    "Option",
    "Result",
    "parse_request",
    "parse_response",
]

PORT = 5351
VERSION = 2
NONCE_LEN = 12
MAX_MESSAGE = 1100
PROTOCOL_UDP = 17
PROTOCOL_TCP = 6
NO_ADDRESS = "0.0.0.0"  # as a suggested external address: no suggestion

_RESPONSE = 0x80
_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3sHH16s")
_OPTION = struct.Struct("!BBH")
HEADER_LEN = 24


class Opcode(enum.IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class Result(enum.IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def result_name(result: int) -> str:
    """``"not_authorized"`` for 2, ``"result_99"`` for a code RFC 6887 does not define."""
    try:
        return Result(result).name.lower()
    except ValueError:
        return f"result_{result}"


class Option(msgspec.Struct, frozen=True):
    code: int
    data: bytes = b""


class MapRequest(msgspec.Struct, frozen=True):
    """Map ``internal_port`` of ``client_address`` (the sender's own address)."""

    nonce: bytes
    internal_port: int
    lifetime_s: int
    client_address: str
    suggested_external_port: int = 0
    suggested_external_address: str = NO_ADDRESS
    protocol: int = PROTOCOL_UDP
    options: tuple[Option, ...] = ()

    def encode(self) -> bytes:
        header = _request_header(Opcode.MAP, self.lifetime_s, self.client_address)
        payload = _map_payload(
            self.nonce,
            self.protocol,
            self.internal_port,
            self.suggested_external_port,
            self.suggested_external_address,
        )
        return _sized(header + payload + _encode_options(self.options))


class AnnounceRequest(msgspec.Struct, frozen=True):
    client_address: str

    def encode(self) -> bytes:
        return _request_header(Opcode.ANNOUNCE, 0, self.client_address)


class MapResponse(msgspec.Struct, frozen=True):
    result: int
    lifetime_s: int
    epoch_s: int
    nonce: bytes
    internal_port: int
    external_port: int
    external_address: str
    protocol: int = PROTOCOL_UDP
    options: tuple[Option, ...] = ()

    def encode(self) -> bytes:
        header = _response_header(Opcode.MAP, self.result, self.lifetime_s, self.epoch_s)
        payload = _map_payload(
            self.nonce, self.protocol, self.internal_port, self.external_port, self.external_address
        )
        return _sized(header + payload + _encode_options(self.options))


class AnnounceResponse(msgspec.Struct, frozen=True):
    result: int
    epoch_s: int
    lifetime_s: int = 0

    def encode(self) -> bytes:
        return _response_header(Opcode.ANNOUNCE, self.result, self.lifetime_s, self.epoch_s)


Request = MapRequest | AnnounceRequest
Response = MapResponse | AnnounceResponse


# ----------------------------------------------------------------------------------------------
# building


def _request_header(opcode: Opcode, lifetime_s: int, client: str) -> bytes:
    _check("lifetime_s", lifetime_s, 0xFFFFFFFF)
    return _REQUEST_HEADER.pack(VERSION, opcode, 0, lifetime_s, _pack_address(client))


def _response_header(opcode: Opcode, result: int, lifetime_s: int, epoch_s: int) -> bytes:
    _check("result", result, 0xFF)
    _check("lifetime_s", lifetime_s, 0xFFFFFFFF)
    _check("epoch_s", epoch_s, 0xFFFFFFFF)
    return _RESPONSE_HEADER.pack(
        VERSION, _RESPONSE | opcode, 0, result, lifetime_s, epoch_s, bytes(12)
    )


def _map_payload(nonce: bytes, protocol: int, internal: int, external: int, address: str) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce of {len(nonce)} bytes, need {NONCE_LEN}")
    _check("protocol", protocol, 0xFF)
    _check("internal_port", internal, 0xFFFF)
    _check("external_port", external, 0xFFFF)
    return _MAP.pack(nonce, protocol, bytes(3), internal, external, _pack_address(address))


def _encode_options(options: Sequence[Option]) -> bytes:
    out = bytearray()
    for option in options:
        _check("option code", option.code, 0xFF)
        _check("option length", len(option.data), 0xFFFF)
        out += _OPTION.pack(option.code, 0, len(option.data))
        out += option.data + bytes(-len(option.data) % 4)
    return bytes(out)


def _sized(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE:
        raise ValueError(f"message of {len(message)} bytes, at most {MAX_MESSAGE}")
    return message


def _pack_address(text: str) -> bytes:
    ip = ip_address(text)
    if isinstance(ip, IPv4Address):
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def _check(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name} {value} out of range 0..{top}")


# ----------------------------------------------------------------------------------------------
# parsing


def _unpack_address(raw: bytes) -> str:
    ip = IPv6Address(raw)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


def _check_size(data: bytes) -> None:
    n = len(data)
    if n < HEADER_LEN or n > MAX_MESSAGE or n % 4:
        raise RemoteProtocolError("pcp_bad_length", f"{n} bytes")


def _parse_options(data: bytes, pos: int) -> tuple[Option, ...]:
    options = []
    while pos < len(data):
        if len(data) - pos < _OPTION.size:
            raise RemoteProtocolError("pcp_bad_option", f"{len(data) - pos} bytes at {pos}")
        code, _, length = _OPTION.unpack_from(data, pos)
        end = pos + _OPTION.size + length
        if end > len(data):
            raise RemoteProtocolError("pcp_bad_option", f"option {code} runs past the end")
        options.append(Option(code, data[pos + _OPTION.size : end]))
        pos = end + (-length % 4)
    return tuple(options)


def _parse_map(data: bytes) -> tuple[bytes, int, int, int, str, tuple[Option, ...]]:
    if len(data) < HEADER_LEN + _MAP.size:
        raise RemoteProtocolError("pcp_truncated", f"MAP in {len(data)} bytes")
    nonce, protocol, _, internal, external, address = _MAP.unpack_from(data, HEADER_LEN)
    options = _parse_options(data, HEADER_LEN + _MAP.size)
    return nonce, protocol, internal, external, _unpack_address(address), options


def parse_request(datagram: bytes | bytearray | memoryview) -> Request:
    """A request as a gateway sees it (for test gateways)."""
    data = bytes(datagram)
    _check_size(data)
    version, opcode, _, lifetime, client = _REQUEST_HEADER.unpack_from(data)
    if version != VERSION:
        raise RemoteProtocolError("pcp_bad_version", f"version {version}")
    if opcode & _RESPONSE:
        raise RemoteProtocolError("pcp_not_request", f"opcode {opcode:#x}")
    if opcode == Opcode.ANNOUNCE:
        return AnnounceRequest(_unpack_address(client))
    if opcode != Opcode.MAP:
        raise RemoteProtocolError("pcp_bad_opcode", f"opcode {opcode}")
    nonce, protocol, internal, external, address, options = _parse_map(data)
    client_address = _unpack_address(client)
    return MapRequest(
        nonce, internal, lifetime, client_address, external, address, protocol, options
    )


def parse_response(datagram: bytes | bytearray | memoryview) -> Response:
    """A gateway's answer; raises ``RemoteProtocolError`` on anything else (a NAT-PMP answer,
    version 0, included: look at the first byte first)."""
    data = bytes(datagram)
    _check_size(data)
    version, opcode, _, result, lifetime, epoch, _ = _RESPONSE_HEADER.unpack_from(data)
    if version != VERSION:
        raise RemoteProtocolError("pcp_bad_version", f"version {version}")
    if not opcode & _RESPONSE:
        raise RemoteProtocolError("pcp_not_response", f"opcode {opcode:#x}")
    kind = opcode & ~_RESPONSE
    if kind == Opcode.ANNOUNCE:
        return AnnounceResponse(result, epoch, lifetime)
    if kind != Opcode.MAP:
        raise RemoteProtocolError("pcp_bad_opcode", f"opcode {kind}")
    if result != Result.SUCCESS and len(data) < HEADER_LEN + _MAP.size:
        data += bytes(HEADER_LEN + _MAP.size - len(data))  # an error may come without payload
    nonce, protocol, internal, external, address, options = _parse_map(data)
    return MapResponse(
        result, lifetime, epoch, nonce, internal, external, address, protocol, options
    )
