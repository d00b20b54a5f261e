"""The overlay's messages and their binary codec (version 1). Pure.

A message is one datagram::

    version (1 byte, = 1) | msgpack array [tag, field, field, ...]

The array is a msgspec ``array_like`` struct whose first element is the message's tag (a
small int); node ids and keys are 20-byte big-endian ``bin`` values, addresses are opaque
``bin`` values made by an ``AddressCodec`` (``HostPortCodec`` live: 4 or 16 bytes of IP and
2 of port). Every field is checked on decoding (lengths, ranges, list sizes); anything else
raises ``RemoteProtocolError`` from ``decode``, which the node turns into a counted drop.

Direct messages (sent to a connected or to-be-connected address):

- 1 ``Hello(sender, kind, token, to, on_circle)``: make (or refresh, or upgrade) a connection of
  this kind; ``to`` is the address the Hello was sent to (so a node learns how others
  reach it); ``on_circle``: the sender has its place on the circle (joined, or holding
  near or far connections), so a joining node can enter the circle through it.
- 2 ``HelloAck(sender, kind, token, observed, on_circle)``: connection made; ``observed`` is the
  address the Hello came from (the sender's reflexive address).
- 3 ``Close(sender, reason, entries)``: connection closed (``CloseReason``); on leave,
  ``entries`` are the leaver's neighbours, so the receivers repair at once.
- 4 ``Ping(sender, seq, sent)`` / 5 ``Pong(sender, seq, sent)``: liveness of a silent
  connection; ``sent`` (the pinger's clock) is echoed for the RTT.
- 6 ``Neighbours(sender, want_reply, entries)``: the sender's connections nearest the receiver.
- 8 ``ConnectReply(sender, kind, token, entries, responder, address, route)``: the answer
  to a ConnectRequest from ``responder`` (reachable at ``address``, if it knows its own),
  with its connections nearest the requester. It goes back the way the request came, hop by
  hop over connections (``route``: the ids still to visit, the requester last; each hop
  puts its own id in ``sender``), so a requester behind a NAT that lets in only what it
  asked for gets it too.
- 11 ``Forward(sender, origin, origin_address, dest, payload)``: a direct message (any of
  the above but Forward) for ``dest`` that ``origin`` cannot reach directly, through the
  sender, a node connected to both: a *tunnel* (Brunet's tunnel edges). The origin sends it
  to the relay with ``sender == origin`` and an empty ``origin_address``; the relay passes
  it to ``dest`` over its own connection with ``sender`` its own id and ``origin_address``
  the address it sees the origin at.

Routed messages (forwarded greedily toward ``dest``; ``hops`` counts the hops taken so
far, and a node that would exceed ``ttl`` drops the message):

- 7 ``ConnectRequest(src, dest, hops, ttl, kind, token, address, path)``: "the node closest
  to dest, other than src: answer src" back along ``path``, the ids of the nodes that
  forwarded the request, appended by each (with no path: to where the request came from).
  ``address`` is only what the requester claims: no reply is ever sent there (a member
  could aim a node's datagrams anywhere); a reply whose way back is broken is dropped.
- 9 ``Data(src, dest, exact, hops, ttl, message_id, payload)``: an application message.
- 10 ``RouteError(src, dest, hops, ttl, message_id, key, reason)``: the Data message
  ``message_id`` that ``dest`` sent to ``key`` was not delivered; or (reason
  ``tunnel_broken``, message_id 0), sent by a relay straight to a tunnel's near end, the
  relay reaches the far end ``key`` directly no more.

An *entry* is ``[node id, address, direct]``: ``direct`` is false for a node the lister
reaches only through a tunnel (it cannot be a tunnel's relay for it).
"""

# No ``from __future__ import annotations``: the records' annotations stay objects, so
# building ``_decoder`` (2.4 -> 0.8 ms) at import need not evaluate strings.

import enum
import ipaddress
from collections.abc import Hashable
from typing import Annotated, Protocol

import msgspec

from pipeline.errors import RemoteProtocolError

VERSION = 1
MAX_ENTRIES = 32
MAX_PAYLOAD = 65_535
MAX_ADDRESS = 64
MAX_PATH = 32  # hops a ConnectRequest remembers to send its reply back along

Address = Hashable
"""Where a node is reached: opaque to the overlay (a (host, port) tuple live)."""

IdBytes = Annotated[bytes, msgspec.Meta(min_length=20, max_length=20)]
AddressBytes = Annotated[bytes, msgspec.Meta(max_length=MAX_ADDRESS)]
Entry = tuple[IdBytes, AddressBytes, bool]
Entries = Annotated[tuple[Entry, ...], msgspec.Meta(max_length=MAX_ENTRIES)]
U8 = Annotated[int, msgspec.Meta(ge=0, le=255)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
U63 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Kind = Annotated[int, msgspec.Meta(ge=0, le=2)]


class CloseReason(enum.IntEnum):
    """Why a connection closed, as carried in ``Close``."""

    UNKNOWN = 0  # the receiver holds no such connection (a ping or hello after it forgot us)
    TRIM = 1  # surplus connection, trimmed
    LEAVE = 2  # the sender leaves the overlay
    TIMEOUT = 3  # the sender heard nothing from us
    FULL = 4  # the sender has no room for another connection


class Hello(msgspec.Struct, tag=1, array_like=True, frozen=True):
    sender: IdBytes
    kind: Kind
    token: U32
    to: AddressBytes
    on_circle: bool


class HelloAck(msgspec.Struct, tag=2, array_like=True, frozen=True):
    sender: IdBytes
    kind: Kind
    token: U32
    observed: AddressBytes
    on_circle: bool


class Close(msgspec.Struct, tag=3, array_like=True, frozen=True):
    sender: IdBytes
    reason: U8
    entries: Entries = ()


class Ping(msgspec.Struct, tag=4, array_like=True, frozen=True):
    sender: IdBytes
    seq: U32
    sent: float


class Pong(msgspec.Struct, tag=5, array_like=True, frozen=True):
    sender: IdBytes
    seq: U32
    sent: float


class Neighbours(msgspec.Struct, tag=6, array_like=True, frozen=True):
    sender: IdBytes
    want_reply: bool
    entries: Entries


Path = Annotated[tuple[IdBytes, ...], msgspec.Meta(max_length=MAX_PATH)]


class ConnectRequest(msgspec.Struct, tag=7, array_like=True, frozen=True):
    src: IdBytes
    dest: IdBytes
    hops: U8
    ttl: U8
    kind: Kind
    token: U32
    address: AddressBytes
    path: Path = ()


class ConnectReply(msgspec.Struct, tag=8, array_like=True, frozen=True):
    sender: IdBytes
    kind: Kind
    token: U32
    entries: Entries
    responder: IdBytes
    address: AddressBytes = b""
    route: Path = ()


class Data(msgspec.Struct, tag=9, array_like=True, frozen=True):
    src: IdBytes
    dest: IdBytes
    exact: bool
    hops: U8
    ttl: U8
    message_id: U63
    payload: Annotated[bytes, msgspec.Meta(max_length=MAX_PAYLOAD)]


class Forward(msgspec.Struct, tag=11, array_like=True, frozen=True):
    sender: IdBytes
    origin: IdBytes
    origin_address: AddressBytes
    dest: IdBytes
    payload: Annotated[bytes, msgspec.Meta(max_length=MAX_PAYLOAD)]


class RouteError(msgspec.Struct, tag=10, array_like=True, frozen=True):
    src: IdBytes
    dest: IdBytes
    hops: U8
    ttl: U8
    message_id: U63
    key: IdBytes
    reason: Annotated[str, msgspec.Meta(max_length=32)]


Message = (
    Hello
    | HelloAck
    | Close
    | Ping
    | Pong
    | Neighbours
    | ConnectRequest
    | ConnectReply
    | Data
    | RouteError
    | Forward
)
Routed = ConnectRequest | Data | RouteError

MESSAGE_NAMES: dict[type, str] = {
    Hello: "hello",
    HelloAck: "hello_ack",
    Close: "close",
    Ping: "ping",
    Pong: "pong",
    Neighbours: "neighbours",
    ConnectRequest: "connect_request",
    ConnectReply: "connect_reply",
    Data: "data",
    RouteError: "route_error",
    Forward: "forward",
}

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_PREFIX = bytes([VERSION])


def encode(message: Message) -> bytes:
    """One datagram: the version byte and the msgpack array."""
    return _PREFIX + _encoder.encode(message)


def decode(datagram: bytes) -> Message:
    """The message in a datagram; ``RemoteProtocolError`` for anything malformed."""
    if not datagram:
        raise RemoteProtocolError("empty")
    if datagram[0] != VERSION:
        raise RemoteProtocolError("bad_version", str(datagram[0]))
    try:
        message: Message = _decoder.decode(memoryview(datagram)[1:])
    except ValueError as exc:  # msgspec's DecodeError/ValidationError, UnicodeDecodeError
        raise RemoteProtocolError("malformed", str(exc)[:80]) from None
    return message


# -- addresses ---------------------------------------------------------------------------------


class Tunnel(msgspec.Struct, frozen=True):
    """The address of a node reached through a relay: messages to it go to ``relay`` inside a
    ``Forward`` for ``node_id``. ``address_bytes`` is where the relay sees the node (what
    neighbour lists name it by); it does not tell two tunnels apart."""

    relay: Address
    node_id: int
    address_bytes: bytes = b""

    def __eq__(self, other: object) -> bool:
        if type(other) is not Tunnel:
            return NotImplemented
        return self.relay == other.relay and self.node_id == other.node_id

    def __hash__(self) -> int:
        return hash((self.relay, self.node_id))

    def __str__(self) -> str:
        return f"tunnel:{self.node_id:040x}@{self.relay}"


class AddressCodec(Protocol):
    """How addresses travel in messages. ``decode`` raises ValueError on bad input."""

    def encode(self, address: Address) -> bytes: ...

    def decode(self, data: bytes) -> Address: ...


class HostPortCodec:
    """(host, port) with host an IPv4 or IPv6 literal: 4 or 16 bytes of IP, 2 of port."""

    def encode(self, address: Address) -> bytes:
        if not isinstance(address, tuple) or len(address) != 2:
            raise ValueError(f"not a (host, port) address: {address!r}")
        host, port = address
        if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"not a (host, port) address: {address!r}")
        return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")

    def decode(self, data: bytes) -> Address:
        if len(data) not in (6, 18):
            raise ValueError(f"a host-port address is 6 or 18 bytes, got {len(data)}")
        host = ipaddress.ip_address(bytes(data[:-2]))
        return (str(host), int.from_bytes(data[-2:], "big"))
