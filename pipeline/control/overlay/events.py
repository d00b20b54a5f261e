"""What an ``OverlayNode`` tells its user, and what it shows of its connections. Pure."""

from __future__ import annotations

import enum
from collections.abc import Hashable

import msgspec


class ConnectionKind(enum.StrEnum):
    """Why a connection exists. ``leaf``: a bootstrap connection, not used for routing (only
    for exact hits and for a joining node's first hop), closed once the node has joined. ``near``: a
    neighbour on the circle. ``far``: a Symphony shortcut drawn at a distance ∝ 1/d."""

    LEAF = "leaf"
    FAR = "far"
    NEAR = "near"

    @property
    def code(self) -> int:
        """The wire value; a larger code is a stronger reason (leaf < far < near)."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> ConnectionKind:
        return _KINDS[code]


_KINDS = (ConnectionKind.LEAF, ConnectionKind.FAR, ConnectionKind.NEAR)
_CODES = {kind: code for code, kind in enumerate(_KINDS)}


class ConnectionAdded(msgspec.Struct, frozen=True):
    """A connection to ``node_id`` at ``address`` is up."""

    node_id: int
    address: Hashable
    kind: ConnectionKind


class ConnectionRemoved(msgspec.Struct, frozen=True):
    """The connection to ``node_id`` is gone. ``reason``: ``timeout`` (silent too long),
    ``trim_near`` / ``trim_far`` / ``trim_leaf`` (surplus, closed by us), ``closed_<why>``
    (closed by the peer: ``closed_trim``, ``closed_leave``, ``closed_unknown``, ...),
    ``replaced`` (another node answered at its address), ``left`` (we left)."""

    node_id: int
    reason: str


class NeighboursChanged(msgspec.Struct, frozen=True):
    """The near neighbourhood changed: the nearest ``near_per_side`` connected nodes clockwise
    (``successors``, nearest first) and counter-clockwise (``predecessors``). In a small
    overlay one node can be in both. The DHT hands records over on this event."""

    successors: tuple[int, ...]
    predecessors: tuple[int, ...]


class Delivered(msgspec.Struct, frozen=True):
    """An application message for which this node is the destination: the node closest to
    ``key`` (``send_to_key``) or the node whose id is ``key`` (``send_to_node``, ``exact``).
    ``hops`` is 0 for a message this node sent to itself."""

    src_id: int
    key: int
    payload: bytes
    hops: int
    message_id: int
    exact: bool


class RouteFailed(msgspec.Struct, frozen=True):
    """A message this node sent was not delivered, as far as the overlay can tell.
    ``reason``: ``no_route`` (no connection to send on), ``ttl`` (hop limit reached),
    ``no_such_node`` (``send_to_node`` found no node with that id), ``left`` (this node has
    left). A lost datagram gives no event: callers that need delivery use their own
    timeouts and retries."""

    message_id: int
    key: int
    reason: str


class Joined(msgspec.Struct, frozen=True):
    """The node has its place on the circle: a successor and a predecessor, and neither
    of them knows a node between itself and this one (Brunet's "connected" test). The
    first node of an overlay (empty bootstrap list) is joined at once. A node that loses
    every near and far connection joins anew, and says ``Joined`` again when it has."""

    node_id: int
    estimated_size: int


OverlayEvent = (
    ConnectionAdded | ConnectionRemoved | NeighboursChanged | Delivered | RouteFailed | Joined
)


class ConnectionInfo(msgspec.Struct, frozen=True):
    """One connection as ``OverlayNode.connections()`` shows it. ``kind`` is why it was made
    (a far connection may also be a near neighbour by position: see ``OverlayNode.neighbours``);
    ``rtt`` is a smoothed round trip in seconds, first from the HelloAck of a connection made
    with one Hello, then from pings (None till one of them); ``age``
    is seconds since the connection came up, at the time of the node's latest input."""

    node_id: int
    address: Hashable
    kind: ConnectionKind
    rtt: float | None
    age: float
