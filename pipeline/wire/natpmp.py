"""NAT-PMP (RFC 6886): asking the gateway for its external address and a UDP port mapping.
Pure.

A client sends requests to the gateway's UDP port 5351; every message starts with a version
byte (0) and an opcode (a response's is the request's plus 128). Big-endian::

    external address request   version 0 | opcode 0                                 (2 bytes)
    external address response  version 0 | opcode 128 | result u16 | epoch u32 |
                               external IPv4 address                               (12 bytes)
    map request                version 0 | opcode 1 (UDP) or 2 (TCP) | reserved u16 |
                               internal port u16 | suggested external port u16 |
                               lifetime u32 (seconds)                              (12 bytes)
    map response               version 0 | opcode 129 or 130 | result u16 | epoch u32 |
                               internal port u16 | external port u16 | lifetime u32 (16 bytes)

A map request with lifetime 0 deletes the mapping of that internal port (the suggested port
must then be 0). ``epoch`` is the gateway's seconds since its mappings were last lost: a
value smaller than expected means it rebooted and the client must map again. A gateway that
speaks a newer protocol only (PCP, RFC 6887) answers with its own version; one that speaks
neither answers nothing. Error responses may be cut after the epoch (a gateway answering a
version it does not speak): the missing fields read as 0.
"""

from __future__ import annotations

import enum
import struct
from ipaddress import IPv4Address

import msgspec

from pipeline.errors import RemoteProtocolError

__all__ = [
    "PORT",
    "VERSION",
    "ExternalAddressRequest",
    "ExternalAddressResponse",
    "MapRequest",
    "MapResponse",
    "Opcode",
    "Result",
    "parse_request",
    "parse_response",
]

PORT = 5351
CLIENT_PORT = 5350  # where a gateway multicasts (224.0.0.1) its address changes
VERSION = 0
RESPONSE = 0x80

_EXTERNAL_RESPONSE = struct.Struct("!BBHI4s")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")
_COMMON = struct.Struct("!BBHI")


class Opcode(enum.IntEnum):
    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class Result(enum.IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def result_name(result: int) -> str:
    """``"not_authorized"`` for 2, ``"result_9"`` for a code RFC 6886 does not define."""
    try:
        return Result(result).name.lower()
    except ValueError:
        return f"result_{result}"


class ExternalAddressRequest(msgspec.Struct, frozen=True):
    def encode(self) -> bytes:
        return bytes((VERSION, Opcode.EXTERNAL_ADDRESS))


class MapRequest(msgspec.Struct, frozen=True):
    """Map (or, with lifetime 0, delete) ``internal_port`` of the sender's address."""

    internal_port: int
    suggested_external_port: int
    lifetime_s: int
    opcode: Opcode = Opcode.MAP_UDP

    def encode(self) -> bytes:
        _check_u16("internal_port", self.internal_port)
        _check_u16("suggested_external_port", self.suggested_external_port)
        _check_u32("lifetime_s", self.lifetime_s)
        if self.opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
            raise ValueError(f"opcode {self.opcode} is not a map opcode")
        return _MAP_REQUEST.pack(
            VERSION,
            self.opcode,
            0,
            self.internal_port,
            self.suggested_external_port,
            self.lifetime_s,
        )


class ExternalAddressResponse(msgspec.Struct, frozen=True):
    result: int
    epoch_s: int
    address: str  # "0.0.0.0" unless result is SUCCESS

    def encode(self) -> bytes:
        _check_u16("result", self.result)
        _check_u32("epoch_s", self.epoch_s)
        packed = IPv4Address(self.address).packed
        return _EXTERNAL_RESPONSE.pack(
            VERSION, RESPONSE | Opcode.EXTERNAL_ADDRESS, self.result, self.epoch_s, packed
        )


class MapResponse(msgspec.Struct, frozen=True):
    result: int
    epoch_s: int
    internal_port: int
    external_port: int
    lifetime_s: int
    opcode: Opcode = Opcode.MAP_UDP

    def encode(self) -> bytes:
        _check_u16("result", self.result)
        for name in ("internal_port", "external_port"):
            _check_u16(name, getattr(self, name))
        _check_u32("epoch_s", self.epoch_s)
        _check_u32("lifetime_s", self.lifetime_s)
        return _MAP_RESPONSE.pack(
            VERSION,
            RESPONSE | self.opcode,
            self.result,
            self.epoch_s,
            self.internal_port,
            self.external_port,
            self.lifetime_s,
        )


Request = ExternalAddressRequest | MapRequest
Response = ExternalAddressResponse | MapResponse


def parse_request(datagram: bytes | bytearray | memoryview) -> Request:
    """A request as a gateway sees it (for test gateways)."""
    data = bytes(datagram)
    if len(data) < 2:
        raise RemoteProtocolError("natpmp_truncated", f"{len(data)} bytes")
    if data[0] != VERSION:
        raise RemoteProtocolError("natpmp_bad_version", f"version {data[0]}")
    opcode = data[1]
    if opcode == Opcode.EXTERNAL_ADDRESS:
        return ExternalAddressRequest()
    if opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise RemoteProtocolError("natpmp_bad_opcode", f"opcode {opcode}")
    if len(data) < _MAP_REQUEST.size:
        raise RemoteProtocolError("natpmp_truncated", f"{len(data)} bytes")
    _, _, _, internal, suggested, lifetime = _MAP_REQUEST.unpack_from(data)
    return MapRequest(internal, suggested, lifetime, Opcode(opcode))


def parse_response(datagram: bytes | bytearray | memoryview) -> Response:
    """A gateway's answer; raises ``RemoteProtocolError`` on anything else."""
    data = bytes(datagram)
    if len(data) < _COMMON.size:
        raise RemoteProtocolError("natpmp_truncated", f"{len(data)} bytes")
    version, opcode, result, epoch = _COMMON.unpack_from(data)
    if version != VERSION:
        raise RemoteProtocolError("natpmp_bad_version", f"version {version}")
    if not opcode & RESPONSE:
        raise RemoteProtocolError("natpmp_not_response", f"opcode {opcode}")
    kind = opcode & ~RESPONSE
    if kind == Opcode.EXTERNAL_ADDRESS:
        data = _full(data, _EXTERNAL_RESPONSE.size, result)
        address = str(IPv4Address(data[8:12]))
        return ExternalAddressResponse(result, epoch, address)
    if kind in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        data = _full(data, _MAP_RESPONSE.size, result)
        _, _, _, _, internal, external, lifetime = _MAP_RESPONSE.unpack_from(data)
        return MapResponse(result, epoch, internal, external, lifetime, Opcode(kind))
    raise RemoteProtocolError("natpmp_bad_opcode", f"opcode {opcode}")


def _full(data: bytes, size: int, result: int) -> bytes:
    """``data`` of at least ``size`` bytes; an error response may be cut (zeros appended)."""
    if len(data) >= size:
        return data
    if result == Result.SUCCESS:
        raise RemoteProtocolError("natpmp_truncated", f"{len(data)} bytes, need {size}")
    return data + bytes(size - len(data))


def _check_u16(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} {value} out of range 0..65535")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value} out of range 0..2**32-1")
