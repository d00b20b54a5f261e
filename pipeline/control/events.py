"""What control's core tells its driver: typed, frozen events. Pure.

Two kinds, told apart by type, never by a string:

- **Log events** (``LogEvent`` subclasses): facts for the node's log. Each class names its
  log event (``name``, a past-tense fact as LOGGING.md lists it) and its level; its fields
  are the log record's fields. The driver logs every one the same way.
- **Effects** (``Effect`` subclasses): something only the driver can do, because it touches
  the world: keep the leased address or the machines' leases on disk, answer a tool's
  request on its socket.

The core produces them in order; ``ControlCore.events()`` drains them.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import msgspec


class Level(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogEvent(msgspec.Struct, frozen=True):
    """A fact for the log: ``name`` and ``level`` per class, the fields per instance."""

    name: ClassVar[str]
    level: ClassVar[Level] = Level.INFO

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__struct_fields__}


class Effect(msgspec.Struct, frozen=True):
    """Something for the driver to do in the world."""


# -- links -----------------------------------------------------------------------------------


class LinkFormed(LogEvent, frozen=True):
    name = "link_formed"
    peer: str | None
    slot: int | None
    node_id: str
    pattern: str
    endpoint: str | None


class SessionEstablished(LogEvent, frozen=True):
    name = "session_established"
    peer: str | None
    slot: int | None
    pattern: str
    cipher: str  # the data cipher the handshake agreed on


class LinkClosed(LogEvent, frozen=True):
    name = "link_closed"
    level = Level.WARNING
    peer: str | None
    slot: int | None
    reason: str


class HandshakeRefused(LogEvent, frozen=True):
    name = "handshake_refused"
    level = Level.WARNING
    reason: str
    source: str | None
    detail: str


class HandshakeRefusalsSuppressed(LogEvent, frozen=True):
    """More refusals came in a second than the log takes; they were counted only."""

    name = "handshake_refusals_suppressed"
    level = Level.WARNING
    count: int


class ShortcutFormed(LogEvent, frozen=True):
    """A link that was relayed through the overlay now goes straight to ``endpoint``."""

    name = "shortcut_formed"
    peer: str | None
    slot: int
    endpoint: str
    kind: str  # the candidate that worked: local, mapped, reflexive
    rtt_ms: float
    round: int


class ShortcutLost(LogEvent, frozen=True):
    name = "shortcut_lost"
    level = Level.WARNING
    peer: str | None
    slot: int
    endpoint: str


class ShortcutFailed(LogEvent, frozen=True):
    """No direct path after every round: the link stays relayed, tried again later."""

    name = "shortcut_failed"
    peer: str | None
    slot: int
    rounds: int
    retry_in_s: float


class RelayChosen(LogEvent, frozen=True):
    """Both NATs map per destination: the link is relayed through ``relay`` (hex node id),
    the member both reach with the least sum of RTTs (``rtt_ms``)."""

    name = "relay_chosen"
    peer: str | None
    slot: int
    relay: str
    rtt_ms: float


# -- the NAT picture ---------------------------------------------------------------------------


class StunAnswered(LogEvent, frozen=True):
    name = "stun_answered"
    server: str
    reflexive: str
    rtt_ms: float


class NatVaries(LogEvent, frozen=True):
    """STUN servers see the node at different ports: its NAT maps per destination."""

    name = "nat_varies"
    level = Level.WARNING
    answers: dict[str, str]


class PortMapped(LogEvent, frozen=True):
    name = "port_mapped"
    protocol: str
    external: str
    lifetime_s: int


class PortMappingLost(LogEvent, frozen=True):
    name = "port_mapping_lost"
    level = Level.WARNING
    protocol: str
    reason: str


class PortMappingFailed(LogEvent, frozen=True):
    name = "port_mapping_failed"
    reasons: dict[str, str]


class PortUnmapped(LogEvent, frozen=True):
    name = "port_unmapped"
    protocol: str
    confirmed: bool


class AddressesMoved(LogEvent, frozen=True):
    """The node's own underlay addresses changed (it roamed): links handshake again from the
    new address, shortcuts are punched anew."""

    name = "addresses_moved"
    level = Level.WARNING
    addresses: tuple[str, ...]
    gateway: str | None


class CandidatesChanged(LogEvent, frozen=True):
    """The node's own candidate endpoints changed (local, mapped, reflexive)."""

    name = "candidates_changed"
    candidates: tuple[str, ...]


# -- static peers ------------------------------------------------------------------------------


class PeerUp(LogEvent, frozen=True):
    name = "peer_up"
    peer: str
    slot: int
    rtt_ms: float | None


class PeerDown(LogEvent, frozen=True):
    name = "peer_down"
    level = Level.WARNING
    peer: str
    slot: int


# -- the overlay -------------------------------------------------------------------------------


class OverlayJoined(LogEvent, frozen=True):
    name = "overlay_joined"
    node_id: str
    estimated_size: int


class OverlayPlaced(LogEvent, frozen=True):
    """The node knows its place on the circle (its first near connection while joining, or
    ``overlay_joined``): its DHT requests and its address record go out from now on."""

    name = "overlay_placed"
    node_id: str
    joined: bool


class OverlayConnectionAdded(LogEvent, frozen=True):
    name = "overlay_connection_added"
    node_id: str
    kind: str
    endpoint: str


class OverlayLeft(LogEvent, frozen=True):
    name = "overlay_left"
    connections: int


class OverlayConnectionRemoved(LogEvent, frozen=True):
    name = "overlay_connection_removed"
    level = Level.WARNING
    node_id: str
    reason: str


# -- this node's address record, routes --------------------------------------------------------


class AddressRegistered(LogEvent, frozen=True):
    name = "address_registered"
    address: str


class AddressRegistering(LogEvent, frozen=True):
    name = "address_registering"
    level = Level.DEBUG
    address: str


class AddressNotRegistered(LogEvent, frozen=True):
    name = "address_not_registered"
    level = Level.WARNING
    address: str
    reason: str
    holder: str | None


class AddressLost(LogEvent, frozen=True):
    name = "address_lost"
    level = Level.WARNING
    key: str
    holder: str | None


class RouteAdded(LogEvent, frozen=True):
    name = "route_added"
    address: str
    node_id: str
    slot: int
    moved: bool


class RouteRemoved(LogEvent, frozen=True):
    name = "route_removed"
    address: str
    reason: str


class ResolveFailed(LogEvent, frozen=True):
    name = "resolve_failed"
    address: str
    reason: str


# -- DHCP, names, machines ---------------------------------------------------------------------


class LeaseGranted(LogEvent, frozen=True):
    name = "lease_granted"
    address: str
    mac: str
    hostname: str | None
    lease_s: int


class LeaseEnded(LogEvent, frozen=True):
    name = "lease_ended"
    address: str
    why: str


class NameRegistered(LogEvent, frozen=True):
    name = "name_registered"
    host: str
    address: str


class NameNotRegistered(LogEvent, frozen=True):
    name = "name_not_registered"
    level = Level.WARNING
    host: str
    reason: str
    holder: str | None


class MachineLeased(LogEvent, frozen=True):
    name = "machine_leased"
    address: str
    mac: str
    hostname: str | None


class MachineStatic(LogEvent, frozen=True):
    name = "machine_static"
    address: str
    mac: str


class LeasesNotRestored(LogEvent, frozen=True):
    """Router mode: the machines' leases kept before could not be read back."""

    name = "leases_not_restored"
    level = Level.WARNING
    error: str


class MachineGone(LogEvent, frozen=True):
    name = "machine_gone"
    address: str
    mac: str
    why: str


# -- effects -----------------------------------------------------------------------------------


class HoldAddress(Effect, frozen=True):
    """Keep ``address`` in the state directory: DHCP granted it, ask for it first next time."""

    address: str


class HoldLeases(Effect, frozen=True):
    """Router mode: keep the machines' leases in the state directory (JSON objects)."""

    leases: tuple[dict[str, Any], ...]


class Reply(Effect, frozen=True):
    """Answer a tool's request: ``message`` (a ``pipeline.messages`` struct) to ``to`` (the
    requester, as the driver named it when it passed the request in)."""

    to: bytes
    message: Any


ControlEvent = LogEvent | Effect
