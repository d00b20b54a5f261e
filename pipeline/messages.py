"""Typed control messages between processes (ZeroMQ, msgpack via msgspec). Never frames.

Who sends what:

- worker -> supervisor (DEALER -> ROUTER): ``Ready`` once attached, ``Heartbeat`` with the
  worker's counters every ``stages.heartbeat_interval_s``.
- supervisor -> worker: ``HeartbeatAck`` for each heartbeat (a silent supervisor is a dead
  one), ``ReportRequest`` (send a ``Heartbeat`` now: a CLI status wants fresh counters),
  ``Stop``.
- control -> classifier, overlay_io (PUB -> SUB): ``RouteSnapshot``, a whole versioned
  route table; republished on change and periodically so a restarted subscriber resyncs.
- classifier, overlay_io -> control (DEALER -> ROUTER): ``SnapshotRequest``; control answers
  with the current ``RouteSnapshot`` at once, and an overlay_io worker also gets
  ``SessionKeys`` then and on every change of the sessions (the runtime directory is 0700:
  session keys travel here). overlay_io tells control ``SessionConfirmed``,
  ``RekeyRequest``, ``PeerMoved`` and ``HopSilent``.
- supervisor CLI -> supervisor (REQ -> ROUTER): ``StatusRequest`` -> ``StatusReply``.
- supervisor CLI -> control (DEALER -> ROUTER): ``DhtGetRequest``, ``DhtPutRequest``,
  ``PingRequest``, ``NetcheckRequest``, ``MapRequest`` (the overlay crawl; ``MapReply``
  when it ends).
"""

# No ``from __future__ import annotations``: the records' annotations stay objects, so the
# msgspec decoders built at import need not evaluate strings (every node start imports this).

from typing import Any

import msgspec

from pipeline.crypto.ciphers import LEGACY_CIPHER, DataCipher


class Ready(msgspec.Struct, tag=True, frozen=True):
    stage: str
    worker: int
    pid: int


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    stage: str
    worker: int
    pid: int
    stats: dict[str, Any]


class HeartbeatAck(msgspec.Struct, tag=True, frozen=True):
    pass


class ReportRequest(msgspec.Struct, tag=True, frozen=True):
    pass


class Stop(msgspec.Struct, tag=True, frozen=True):
    reason: str = "shutdown"


class PeerRoute(msgspec.Struct, frozen=True):
    slot: int
    name: str
    addresses: tuple[str, ...]
    endpoint: str  # "host:port"
    up: bool


class RouteSnapshot(msgspec.Struct, tag=True, frozen=True):
    epoch: int  # changes when control restarts; versions restart with it
    version: int
    peers: tuple[PeerRoute, ...]
    address: str = ""  # this node's virtual address ("": none yet, DHCP has not granted one)
    # router mode: the machines behind this node, (address, MAC as 12 hex digits)
    local: tuple[tuple[str, str], ...] = ()


class SnapshotRequest(msgspec.Struct, tag=True, frozen=True):
    stage: str
    worker: int
    pid: int = 0  # a new pid is a new incarnation: its send counters must start afresh


class KeyEntry(msgspec.Struct, frozen=True):
    """One session of one link, as overlay_io needs it."""

    slot: int
    recv_index: int
    recv_key: bytes
    send_index: int
    send_key: bytes
    counter_start: int  # first send counter for this worker incarnation: nonces never repeat
    created: float  # control's monotonic clock (the same clock in every process of the host)
    confirmed: bool  # the peer holds these keys: overlay_io may send with them
    endpoint: str  # "host:port" to send to; "" = no direct endpoint: relayed over the overlay
    node_id: bytes = b""  # the peer's 20-byte node id (the destination of relayed datagrams)
    # relayed: the node id of the member to relay through first (both NATs vary, chosen by
    # the shortcut's exchange); b"": the overlay's greedy next hop
    via: bytes = b""
    cipher: DataCipher = LEGACY_CIPHER  # the data cipher both keys seal with (the handshake's)


class SessionKeys(msgspec.Struct, tag=True, frozen=True):
    """Every session control holds, for one overlay_io worker (control -> DEALER)."""

    version: int
    entries: tuple[KeyEntry, ...]
    node_id: bytes = b""  # this node's own 20-byte node id (relay payloads for it stop here)
    # (node id, node id of its relay): overlay neighbours reached through a tunnel; relay
    # payloads for them go to the relay's link
    tunnels: tuple[tuple[bytes, bytes], ...] = ()
    # node ids of the direct links that may carry relay payloads: the overlay's connections
    # that are not suspect (None: every direct link, as before this field)
    hops: tuple[bytes, ...] | None = None


class SessionConfirmed(msgspec.Struct, tag=True, frozen=True):
    """overlay_io opened a datagram on a session not yet confirmed (overlay_io -> control)."""

    recv_index: int


class RekeyRequest(msgspec.Struct, tag=True, frozen=True):
    """A send session carried its volume: control should start a new handshake."""

    slot: int


class PeerMoved(msgspec.Struct, tag=True, frozen=True):
    """An authentic datagram of link ``slot``'s direct session came from a new ``endpoint``
    (overlay_io -> control): the peer roamed, or its NAT gave it another mapping; control
    sends to it there from now on."""

    slot: int
    endpoint: str  # "host:port"


class HopSilent(msgspec.Struct, tag=True, frozen=True):
    """overlay_io sends relay payloads over link ``slot`` but has heard nothing from that
    link for a while (overlay_io -> control, at most twice a second a slot): control pings
    the node, and stops relaying through it if it does not answer."""

    slot: int


class DhtGetRequest(msgspec.Struct, tag=True, frozen=True):
    """``supervisor dht get`` (DEALER -> control's ROUTER)."""

    key: str


class DhtPutRequest(msgspec.Struct, tag=True, frozen=True):
    """``supervisor dht put``: create ``key`` with ``value``, signed by this node."""

    key: str
    value: bytes
    lease_s: float


class DhtPutReply(msgspec.Struct, tag=True, frozen=True):
    key: str
    ok: bool
    reason: str
    holder: str  # hex node id of the owner of the live record, when another one holds it


class DhtRecordSummary(msgspec.Struct, frozen=True):
    value: bytes
    owner_id: str  # hex node id of the signer
    seq: int
    lease_s: float
    deleted: bool


class DhtGetReply(msgspec.Struct, tag=True, frozen=True):
    key: str
    ok: bool
    reason: str
    records: tuple[DhtRecordSummary, ...]
    position: str  # hex: the key's place on the circle
    replicas: tuple[str, ...]  # hex node ids that should hold it, nearest first (as seen here)


class PingRequest(msgspec.Struct, tag=True, frozen=True):
    """``supervisor ping``: probe the link to ``peer`` (a node name, a virtual address or a
    node id) once; ``seq`` tells the answers apart."""

    peer: str
    seq: int


class PingReply(msgspec.Struct, tag=True, frozen=True):
    peer: str
    seq: int
    ok: bool
    reason: str  # "" when ok; else why not: "unknown_peer", "resolving", "no_link"...
    rtt_ms: float = 0.0
    path: str = ""  # "direct" or "relayed"
    endpoint: str = ""  # direct: "host:port"; relayed: the node id of the first relay
    node: str = ""  # the peer's name and node id, as its certificate says


class NetcheckRequest(msgspec.Struct, tag=True, frozen=True):
    """``supervisor netcheck``: the node's NAT picture (DEALER -> control's ROUTER)."""


class NetcheckReply(msgspec.Struct, tag=True, frozen=True):
    picture: dict[str, Any]


class MapRequest(msgspec.Struct, tag=True, frozen=True):
    """``supervisor map``: crawl the overlay from this node (DEALER -> control's ROUTER);
    at most ``max_nodes`` nodes asked, for at most ``timeout_s``."""

    max_nodes: int = 200
    timeout_s: float = 20.0


class MapReply(msgspec.Struct, tag=True, frozen=True):
    """The crawl (``pipeline/control/crawl.py``, ``Crawl.result``), or ``{"error": ...}``."""

    map: dict[str, Any]


class StatusRequest(msgspec.Struct, tag=True, frozen=True):
    pass


class StatusReply(msgspec.Struct, tag=True, frozen=True):
    status: dict[str, Any]


Message = (
    Ready
    | Heartbeat
    | HeartbeatAck
    | ReportRequest
    | Stop
    | RouteSnapshot
    | SnapshotRequest
    | SessionKeys
    | SessionConfirmed
    | RekeyRequest
    | PeerMoved
    | HopSilent
    | DhtGetRequest
    | DhtGetReply
    | DhtPutRequest
    | DhtPutReply
    | PingRequest
    | PingReply
    | NetcheckRequest
    | NetcheckReply
    | MapRequest
    | MapReply
    | StatusRequest
    | StatusReply
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Raises ValueError (msgspec.DecodeError, UnicodeDecodeError) on anything else."""
    msg: Message = _decoder.decode(data)
    return msg


# Overlay messages that control exchanges with peers (inside OVERLAY datagrams).


class Ping(msgspec.Struct, tag=True, frozen=True):
    seq: int
    sent_ns: int
    node: str


class Pong(msgspec.Struct, tag=True, frozen=True):
    seq: int
    sent_ns: int
    node: str


OverlayMessage = Ping | Pong
_overlay_decoder = msgspec.msgpack.Decoder(OverlayMessage)


def encode_overlay(msg: OverlayMessage) -> bytes:
    return _encoder.encode(msg)


def decode_overlay(data: bytes | memoryview) -> OverlayMessage:
    msg: OverlayMessage = _overlay_decoder.decode(data)
    return msg
