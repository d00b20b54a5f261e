"""Relaying through the overlay: the relay payload and the greedy choice of the next hop. Pure.

A node that holds an end-to-end session with a peer but no direct link to it (the session's
endpoint is ``""``) seals each DATA or OVERLAY datagram for that peer with the end-to-end
session as usual, then wraps the whole datagram in a *relay payload*::

    dest (the first 7 bytes of its node id) | ttl (1 byte) | inner datagram (header + body)

and hands the payload, sealed as a RELAY datagram with the *hop* session, to the directly
linked node whose id is closest to ``dest`` on the circle. Each relay opens the hop layer
only: it reads ``dest``, ``ttl`` and the inner datagram's 16-byte header, never the inner
body (it has no key for it). A payload for this node is delivered: its inner datagram is
handled like one from the network (its own session index, replay window and tag). Any
other is forwarded with ``ttl - 1`` to a direct neighbour strictly closer to ``dest`` than
this node: every hop gets strictly closer, so a payload never loops; the TTL is a backstop.

Why 7 bytes of the id: the relay header must keep a relayed full-size packet inside a
1500-byte underlay MTU. A direct datagram of a 1400-byte packet is 1460 bytes on the wire
(IPv4 and UDP 28, our header 16, tag 16); relaying adds our outer header and tag (32) and
this prefix (8): 1500. Distances are taken on the 56-bit prefixes (the circle of 2^56); two
nodes that share a prefix (about one pair in 2^56/N^2) would only make a payload arrive at
the wrong one, whose inner session index and tag refuse it.

A hop may also be a *tunnel* neighbour (``pipeline/control/overlay``'s ``Tunnel``: a node
the overlay reaches through a relay node because neither reaches the other directly): it is
then listed under the relay's slot, so greedy forwarding follows the overlay's own paths.

- ``pack_relay`` / ``parse_relay``: the payload; junk raises ``RemoteProtocolError`` only
  (``relay_short``; ``relay_bad_inner`` when the inner datagram is not version 1 DATA or
  OVERLAY: nested relays and handshakes are refused, at every hop).
- ``RelayTable``: the greedy next hop from the direct links' node ids and our own.
- ``on_relay``: what to do with a received relay payload (deliver, forward, drop).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import NamedTuple

from pipeline.crypto.datapath import MIN_DATAGRAM
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import NODE_ID_LEN
from pipeline.wire.overlay import RELAY_TTL, VERSION, DatagramType

__all__ = [
    "CACHE_MAX",
    "DEST_LEN",
    "PREFIX_LEN",
    "RELAY_TTL",
    "RelayAction",
    "RelayTable",
    "Step",
    "on_relay",
    "pack_relay",
    "parse_relay",
]

DEST_LEN = 7  # the bytes of the destination's node id a relay payload carries
PREFIX_LEN = DEST_LEN + 1  # dest and ttl, before the inner datagram
_DEST_BITS = 8 * DEST_LEN
_DEST_SIZE = 1 << _DEST_BITS
_DEST_MASK = _DEST_SIZE - 1
_DEST_HALF = _DEST_SIZE >> 1
CACHE_MAX = 4096  # next hops remembered per table (dests come from authenticated peers)

_TTL = tuple(bytes((i,)) for i in range(256))
_INNER_TYPES = frozenset((DatagramType.DATA, DatagramType.OVERLAY))
_MISSING = -1

ReadableBuffer = bytes | bytearray | memoryview


def pack_relay(dest: bytes, ttl: int, inner: ReadableBuffer) -> bytes:
    """``dest[:7] | ttl | inner``. ``dest``: a node id (20 bytes) or its 7-byte prefix.
    ValueError for another length or a ttl that is not a u8."""
    if len(dest) != NODE_ID_LEN and len(dest) != DEST_LEN:
        raise ValueError(f"a node id is {NODE_ID_LEN} bytes, got {len(dest)}")
    if not 0 <= ttl <= 255:
        raise ValueError(f"ttl must be a u8, not {ttl}")
    return b"".join((dest[:DEST_LEN], _TTL[ttl], inner))


def parse_relay(payload: ReadableBuffer) -> tuple[bytes, int, memoryview]:
    """``(dest, ttl, inner)`` of a relay payload (``dest``: the 7-byte id prefix); ``inner``
    is a view into ``payload``.

    RemoteProtocolError: ``relay_short`` (no room for an inner datagram with its header and
    tag), ``relay_bad_inner`` (the inner datagram is not a version 1 DATA or OVERLAY one)."""
    view = memoryview(payload)
    if len(view) < PREFIX_LEN + MIN_DATAGRAM:
        raise RemoteProtocolError("relay_short", f"{len(view)} bytes")
    inner = view[PREFIX_LEN:]
    if inner[0] != VERSION or inner[1] not in _INNER_TYPES:
        raise RemoteProtocolError("relay_bad_inner", f"version {inner[0]}, type {inner[1]}")
    return bytes(view[:DEST_LEN]), view[DEST_LEN], inner


class RelayTable:
    """The greedy next hop towards a node id, among the direct links of the whole node.

    Built from ``(slot, node_id)`` of every direct, confirmed link (of every overlay_io worker:
    whether this worker may seal for the hop is the sender's question) and of every tunnel
    neighbour (under its relay's slot), and this node's id. ``next_hop(dest)`` (a node id or
    its 7-byte prefix) is the slot whose id is closest to ``dest`` by circle distance on the
    56-bit prefixes, if that is strictly closer than our own (else None: the payload would
    not get closer); ties go to the smaller slot. Answers are cached per dest; the table is
    rebuilt, cache and all, whenever the links change. Ids that are not 20 bytes are left
    out; with no valid own id there is no next hop at all.
    """

    __slots__ = ("_cache", "_hops", "_own", "own_id", "own_prefix")

    def __init__(self, own_id: bytes, hops: Iterable[tuple[int, bytes]]) -> None:
        self.own_id = bytes(own_id)
        self.own_prefix = self.own_id[:DEST_LEN] if len(own_id) == NODE_ID_LEN else b""
        self._own = int.from_bytes(own_id[:DEST_LEN], "big")
        self._hops: list[tuple[int, int]] = []
        if len(own_id) == NODE_ID_LEN:
            self._hops = sorted(
                (slot, int.from_bytes(node[:DEST_LEN], "big"))
                for slot, node in hops
                if len(node) == NODE_ID_LEN
            )
        self._cache: dict[bytes, int | None] = {}

    def __len__(self) -> int:
        return len(self._hops)

    @property
    def slots(self) -> list[int]:
        """The direct slots the table may choose from, in order."""
        return [slot for slot, _ in self._hops]

    def next_hop(self, dest: bytes) -> int | None:
        hop = self._cache.get(dest, _MISSING)
        if hop != _MISSING:
            return hop
        hop = self._choose(dest)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[dest] = hop
        return hop

    def _choose(self, dest: bytes) -> int | None:
        if len(dest) not in (NODE_ID_LEN, DEST_LEN) or not self._hops:
            return None
        target = int.from_bytes(dest[:DEST_LEN], "big")
        best = _distance(self._own, target)
        choice: int | None = None
        for slot, node in self._hops:  # by slot: on a tie the first (smallest) slot stays
            d = _distance(node, target)
            if d < best:
                best, choice = d, slot
        return choice


def _distance(a: int, b: int) -> int:
    """The circle distance of two 56-bit id prefixes."""
    d = (b - a) & _DEST_MASK
    return _DEST_SIZE - d if d > _DEST_HALF else d


class RelayAction(enum.Enum):
    DELIVER = "deliver"  # the inner datagram is for this node: open it as if from the network
    FORWARD = "forward"  # seal ``data`` (the relay payload, ttl taken down) for slot ``hop``
    DROP = "drop"  # count ``reason``


class Step(NamedTuple):
    action: RelayAction
    hop: int = -1  # FORWARD: the slot of the next hop
    data: ReadableBuffer = b""  # DELIVER: the inner datagram; FORWARD: the payload to send on
    reason: str = ""  # DROP: the drop counter


def on_relay(table: RelayTable, payload: ReadableBuffer) -> Step:
    """What a node does with a relay payload it opened from a RELAY datagram."""
    try:
        dest, ttl, inner = parse_relay(payload)
    except RemoteProtocolError as exc:
        return Step(RelayAction.DROP, reason=exc.reason)
    if dest == table.own_prefix:
        return Step(RelayAction.DELIVER, data=inner)
    if ttl == 0:
        return Step(RelayAction.DROP, reason="relay_ttl")
    hop = table.next_hop(dest)
    if hop is None:
        return Step(RelayAction.DROP, reason="relay_no_route")
    return Step(RelayAction.FORWARD, hop=hop, data=pack_relay(dest, ttl - 1, inner))
