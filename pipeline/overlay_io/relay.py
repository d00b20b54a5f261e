"""Relaying through the overlay: the relay payload and the greedy choice of the next hop. Pure.

A node that holds an end-to-end session with a peer but no direct link to it (the session's
endpoint is ``""``) seals each DATA or OVERLAY datagram for that peer with the end-to-end
session as usual, then wraps the whole datagram in a *relay payload*::

    dest node id (20 bytes, big-endian) | ttl (1 byte) | inner datagram (header + sealed body)

and hands the payload, sealed as a RELAY datagram with the *hop* session, to the directly
linked node whose id is closest to ``dest`` on the circle of 2^160. Each relay opens the hop
layer only: it reads ``dest``, ``ttl`` and the inner datagram's 16-byte header, never the
inner body (it has no key for it). A payload for this node is delivered: its inner datagram
is handled like one from the network (its own session index, replay window and tag). Any
other is forwarded with ``ttl - 1`` to a direct neighbour strictly closer to ``dest`` than
this node: every hop gets strictly closer, so a payload never loops; the TTL is a backstop.

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
from pipeline.nodeid import NODE_ID_LEN, circle_distance
from pipeline.wire.overlay import RELAY_TTL, VERSION, DatagramType

__all__ = [
    "CACHE_MAX",
    "PREFIX_LEN",
    "RELAY_TTL",
    "RelayAction",
    "RelayTable",
    "Step",
    "on_relay",
    "pack_relay",
    "parse_relay",
]

PREFIX_LEN = NODE_ID_LEN + 1  # dest id and ttl, before the inner datagram
CACHE_MAX = 4096  # next hops remembered per table (dests come from authenticated peers)

_TTL = tuple(bytes((i,)) for i in range(256))
_INNER_TYPES = frozenset((DatagramType.DATA, DatagramType.OVERLAY))
_MISSING = -1

ReadableBuffer = bytes | bytearray | memoryview


def pack_relay(dest: bytes, ttl: int, inner: ReadableBuffer) -> bytes:
    """``dest | ttl | inner``. ValueError for a dest that is not 20 bytes or a ttl not a u8."""
    if len(dest) != NODE_ID_LEN:
        raise ValueError(f"a node id is {NODE_ID_LEN} bytes, got {len(dest)}")
    if not 0 <= ttl <= 255:
        raise ValueError(f"ttl must be a u8, not {ttl}")
    return b"".join((dest, _TTL[ttl], inner))


def parse_relay(payload: ReadableBuffer) -> tuple[bytes, int, memoryview]:
    """``(dest, ttl, inner)`` of a relay payload; ``inner`` is a view into ``payload``.

    RemoteProtocolError: ``relay_short`` (no room for an inner datagram with its header and
    tag), ``relay_bad_inner`` (the inner datagram is not a version 1 DATA or OVERLAY one)."""
    view = memoryview(payload)
    if len(view) < PREFIX_LEN + MIN_DATAGRAM:
        raise RemoteProtocolError("relay_short", f"{len(view)} bytes")
    inner = view[PREFIX_LEN:]
    if inner[0] != VERSION or inner[1] not in _INNER_TYPES:
        raise RemoteProtocolError("relay_bad_inner", f"version {inner[0]}, type {inner[1]}")
    return bytes(view[:NODE_ID_LEN]), view[NODE_ID_LEN], inner


class RelayTable:
    """The greedy next hop towards a node id, among the direct links of the whole node.

    Built from ``(slot, node_id)`` of every direct, confirmed link (of every overlay_io worker:
    whether this worker may seal for the hop is the sender's question) and this node's id.
    ``next_hop(dest)`` is the slot whose id is closest to ``dest`` by circle distance, if that
    is strictly closer than our own id (else None: the payload would not get closer); ties go
    to the smaller slot. Answers are cached per dest; the table is rebuilt, cache and all,
    whenever the links change. Ids that are not 20 bytes are left out; with no valid own id
    there is no next hop at all.
    """

    __slots__ = ("_cache", "_hops", "_own", "own_id")

    def __init__(self, own_id: bytes, hops: Iterable[tuple[int, bytes]]) -> None:
        self.own_id = bytes(own_id)
        self._own = int.from_bytes(own_id, "big")
        self._hops: list[tuple[int, int]] = []
        if len(own_id) == NODE_ID_LEN:
            self._hops = sorted(
                (slot, int.from_bytes(node, "big"))
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
        if len(dest) != NODE_ID_LEN or not self._hops:
            return None
        target = int.from_bytes(dest, "big")
        best = circle_distance(self._own, target)
        choice: int | None = None
        for slot, node in self._hops:  # by slot: on a tie the first (smallest) slot stays
            d = circle_distance(node, target)
            if d < best:
                best, choice = d, slot
        return choice


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
    if dest == table.own_id:
        return Step(RelayAction.DELIVER, data=inner)
    if ttl == 0:
        return Step(RelayAction.DROP, reason="relay_ttl")
    hop = table.next_hop(dest)
    if hop is None:
        return Step(RelayAction.DROP, reason="relay_no_route")
    return Step(RelayAction.FORWARD, hop=hop, data=pack_relay(dest, ttl - 1, inner))
