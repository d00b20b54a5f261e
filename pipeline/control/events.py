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

import dataclasses
import enum
from typing import Any, ClassVar


class Level(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class LogEvent:
    """A fact for the log: ``name`` and ``level`` per class, the fields per instance."""

    name: ClassVar[str]
    level: ClassVar[Level] = Level.INFO

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, slots=True)
class Effect:
    """Something for the driver to do in the world."""


# -- links -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LinkFormed(LogEvent):
    name = "link_formed"
    peer: str | None
    slot: int | None
    node_id: str
    pattern: str
    endpoint: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEstablished(LogEvent):
    name = "session_established"
    peer: str | None
    slot: int | None
    pattern: str


@dataclasses.dataclass(frozen=True, slots=True)
class LinkClosed(LogEvent):
    name = "link_closed"
    level = Level.WARNING
    peer: str | None
    slot: int | None
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeRefused(LogEvent):
    name = "handshake_refused"
    level = Level.WARNING
    reason: str
    source: str | None
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeRefusalsSuppressed(LogEvent):
    """More refusals came in a second than the log takes; they were counted only."""

    name = "handshake_refusals_suppressed"
    level = Level.WARNING
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class ShortcutFormed(LogEvent):
    """A link that was relayed through the overlay now goes straight to ``endpoint``."""

    name = "shortcut_formed"
    peer: str | None
    slot: int
    endpoint: str
    kind: str  # the candidate that worked: local, mapped, reflexive
    rtt_ms: float
    round: int


@dataclasses.dataclass(frozen=True, slots=True)
class ShortcutLost(LogEvent):
    name = "shortcut_lost"
    level = Level.WARNING
    peer: str | None
    slot: int
    endpoint: str


@dataclasses.dataclass(frozen=True, slots=True)
class ShortcutFailed(LogEvent):
    """No direct path after every round: the link stays relayed, tried again later."""

    name = "shortcut_failed"
    peer: str | None
    slot: int
    rounds: int
    retry_in_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class RelayChosen(LogEvent):
    """Both NATs map per destination: the link is relayed through ``relay`` (hex node id),
    the member both reach with the least sum of RTTs (``rtt_ms``)."""

    name = "relay_chosen"
    peer: str | None
    slot: int
    relay: str
    rtt_ms: float


# -- the NAT picture ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class StunAnswered(LogEvent):
    name = "stun_answered"
    server: str
    reflexive: str
    rtt_ms: float


@dataclasses.dataclass(frozen=True, slots=True)
class NatVaries(LogEvent):
    """STUN servers see the node at different ports: its NAT maps per destination."""

    name = "nat_varies"
    level = Level.WARNING
    answers: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class PortMapped(LogEvent):
    name = "port_mapped"
    protocol: str
    external: str
    lifetime_s: int


@dataclasses.dataclass(frozen=True, slots=True)
class PortMappingLost(LogEvent):
    name = "port_mapping_lost"
    level = Level.WARNING
    protocol: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class PortMappingFailed(LogEvent):
    name = "port_mapping_failed"
    reasons: dict[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class PortUnmapped(LogEvent):
    name = "port_unmapped"
    protocol: str
    confirmed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class AddressesMoved(LogEvent):
    """The node's own underlay addresses changed (it roamed): links handshake again from the
    new address, shortcuts are punched anew."""

    name = "addresses_moved"
    level = Level.WARNING
    addresses: tuple[str, ...]
    gateway: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class CandidatesChanged(LogEvent):
    """The node's own candidate endpoints changed (local, mapped, reflexive)."""

    name = "candidates_changed"
    candidates: tuple[str, ...]


# -- static peers ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PeerUp(LogEvent):
    name = "peer_up"
    peer: str
    slot: int
    rtt_ms: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class PeerDown(LogEvent):
    name = "peer_down"
    level = Level.WARNING
    peer: str
    slot: int


# -- the overlay -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class OverlayJoined(LogEvent):
    name = "overlay_joined"
    node_id: str
    estimated_size: int


@dataclasses.dataclass(frozen=True, slots=True)
class OverlayConnectionAdded(LogEvent):
    name = "overlay_connection_added"
    node_id: str
    kind: str
    endpoint: str


@dataclasses.dataclass(frozen=True, slots=True)
class OverlayConnectionRemoved(LogEvent):
    name = "overlay_connection_removed"
    level = Level.WARNING
    node_id: str
    reason: str


# -- this node's address record, routes --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AddressRegistered(LogEvent):
    name = "address_registered"
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class AddressNotRegistered(LogEvent):
    name = "address_not_registered"
    level = Level.WARNING
    address: str
    reason: str
    holder: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class AddressLost(LogEvent):
    name = "address_lost"
    level = Level.WARNING
    key: str
    holder: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class RouteAdded(LogEvent):
    name = "route_added"
    address: str
    node_id: str
    slot: int
    moved: bool


@dataclasses.dataclass(frozen=True, slots=True)
class RouteRemoved(LogEvent):
    name = "route_removed"
    address: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class ResolveFailed(LogEvent):
    name = "resolve_failed"
    address: str
    reason: str


# -- DHCP, names, machines ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseGranted(LogEvent):
    name = "lease_granted"
    address: str
    mac: str
    hostname: str | None
    lease_s: int


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseEnded(LogEvent):
    name = "lease_ended"
    address: str
    why: str


@dataclasses.dataclass(frozen=True, slots=True)
class NameRegistered(LogEvent):
    name = "name_registered"
    host: str
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class NameNotRegistered(LogEvent):
    name = "name_not_registered"
    level = Level.WARNING
    host: str
    reason: str
    holder: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class MachineLeased(LogEvent):
    name = "machine_leased"
    address: str
    mac: str
    hostname: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class MachineStatic(LogEvent):
    name = "machine_static"
    address: str
    mac: str


@dataclasses.dataclass(frozen=True, slots=True)
class LeasesNotRestored(LogEvent):
    """Router mode: the machines' leases kept before could not be read back."""

    name = "leases_not_restored"
    level = Level.WARNING
    error: str


@dataclasses.dataclass(frozen=True, slots=True)
class MachineGone(LogEvent):
    name = "machine_gone"
    address: str
    mac: str
    why: str


# -- effects -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class HoldAddress(Effect):
    """Keep ``address`` in the state directory: DHCP granted it, ask for it first next time."""

    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class HoldLeases(Effect):
    """Router mode: keep the machines' leases in the state directory (JSON objects)."""

    leases: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Reply(Effect):
    """Answer a tool's request: ``message`` (a ``pipeline.messages`` struct) to ``to`` (the
    requester, as the driver named it when it passed the request in)."""

    to: bytes
    message: Any


ControlEvent = LogEvent | Effect
