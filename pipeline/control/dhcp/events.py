"""What a ``DhcpServer`` hands its driver: replies to send, DHT requests to make, events.
Pure.

- ``Reply``: a DHCP message for the client and where it goes (``replies()``).
- ``Claim`` / ``Release``: a DHT create / delete the server wants (``dht_requests()``).
- Events (``events()``), for the log and the node's state. Every event names the client:
  ``client_id`` (option 61 as sent, or ``b"\\x01"`` + the MAC when the client sent none:
  the key of the lease table) and ``mac`` (6 bytes).
"""

from __future__ import annotations

from ipaddress import IPv4Address

import msgspec

from pipeline.control.dhcp.wire import MessageType

__all__ = [
    "AddressDeclined",
    "Claim",
    "ClaimsExhausted",
    "DhcpEvent",
    "LeaseEvent",
    "LeaseExpired",
    "LeaseGranted",
    "LeaseReleased",
    "LeaseRenewed",
    "LeaseRevoked",
    "NakSent",
    "OfferExpired",
    "Release",
    "Reply",
]

BROADCAST_ADDRESS = IPv4Address("255.255.255.255")


class Reply(msgspec.Struct, frozen=True):
    """A DHCP message for a client (the UDP payload, server port -> client port), to
    ``dst_ip`` at ``dst_mac``: 255.255.255.255 at ff:ff:ff:ff:ff:ff (``broadcast``), or the
    client's address at its MAC (RFC 2131 §4.1; no ARP: the driver writes the frame)."""

    payload: bytes
    dst_ip: IPv4Address
    dst_mac: bytes
    message_type: MessageType

    @property
    def broadcast(self) -> bool:
        return self.dst_ip == BROADCAST_ADDRESS


class Claim(msgspec.Struct, frozen=True):
    """Please create the DHT record ``key`` (``ip:<namespace>:<address>``) with ``value``
    (this node's id) for ``lease_s``, and report the outcome with ``token``:
    ``address_won`` (created, or renewed: ours), ``address_lost`` (another node holds it),
    ``claim_failed`` (no answer, no quorum, refused). ``renewal``: the address is already
    ours and in use; this refreshes the record and checks we still hold it."""

    token: int
    address: IPv4Address
    key: bytes
    value: bytes
    lease_s: float
    renewal: bool


class Release(msgspec.Struct, frozen=True):
    """Please delete the DHT record ``key`` of ``address`` (ours); nothing to report back."""

    address: IPv4Address
    key: bytes


class LeaseEvent(msgspec.Struct, frozen=True):
    """Something happened to the lease of ``address`` held for a client."""

    client_id: bytes
    mac: bytes
    address: IPv4Address


class LeaseGranted(LeaseEvent, frozen=True):
    """The first ACK of a lease: the client now uses ``address`` for ``lease_s``. The driver
    persists the address (``DhcpServer.preferred`` next start) and routes it to this node.
    ``hostname``: the client's option 12, as ASCII (undecodable bytes escaped), if sent."""

    lease_s: int
    hostname: str | None


class LeaseRenewed(LeaseEvent, frozen=True):
    """A later ACK of the same lease (RENEWING, REBINDING, INIT-REBOOT, a repeated REQUEST)."""

    lease_s: int


class LeaseReleased(LeaseEvent, frozen=True):
    """The client sent RELEASE; the address is given up (a ``Release`` is in
    ``dht_requests``)."""


class LeaseExpired(LeaseEvent, frozen=True):
    """The client did not renew in time; the address is given up (a ``Release`` follows)."""


class LeaseRevoked(LeaseEvent, frozen=True):
    """Another node holds the address after all (``address_lost`` of an address this node
    held: a renewal answered EXISTS, or the DHT's ``LeaseLost``). The next REQUEST of the
    client is NAKed and it starts over. Nothing is released: the record is not ours."""


class AddressDeclined(LeaseEvent, frozen=True):
    """The client sent DECLINE (the address is in use on its link): the address is given up
    and not offered again for ``avoid_s``."""


class OfferExpired(LeaseEvent, frozen=True):
    """An OFFER got no REQUEST within ``offer_timeout_s``; the address is given up."""


class NakSent(msgspec.Struct, frozen=True):
    """A REQUEST was refused. ``address``: the one asked for (None if the request named
    none). ``reason``: ``not_offered`` (SELECTING, but not what we offered),
    ``wrong_address`` (the client's lease here is another address), ``not_in_subnet``,
    ``unavailable`` (reserved, declined, or another client's), ``taken`` (another node
    holds it), ``revoked`` (the lease was revoked)."""

    client_id: bytes
    mac: bytes
    address: IPv4Address | None
    reason: str


class ClaimsExhausted(msgspec.Struct, frozen=True):
    """No address for a DISCOVER: ``tries`` candidates were claimed and lost (or none was
    left to try). No OFFER is sent; the client will DISCOVER again, and the search starts
    over then (addresses found taken are skipped for ``avoid_s``)."""

    client_id: bytes
    mac: bytes
    tries: int


DhcpEvent = (
    LeaseGranted
    | LeaseRenewed
    | LeaseReleased
    | LeaseExpired
    | LeaseRevoked
    | AddressDeclined
    | OfferExpired
    | NakSent
    | ClaimsExhausted
)
