"""DHCP for the virtual network: addresses won in the DHT. Sans-I/O. Pure.

Modules:

- ``wire``: the DHCP message codec (``DhcpMessage``, ``decode``, ``encode``, option codes).
- ``events``: what the server hands its driver: ``Reply``, ``Claim``, ``Release`` and the
  events (``LeaseGranted``, ``LeaseRenewed``, ``LeaseReleased``, ``LeaseExpired``,
  ``LeaseRevoked``, ``AddressDeclined``, ``OfferExpired``, ``NakSent``,
  ``ClaimsExhausted``).
- ``frames``: the DHCP payload in an Ethernet/IPv4/UDP frame and back.
- ``server``: ``DhcpServer``, ``DhcpSettings``, ``derive_address`` (its docstring has the
  theory of operation).

The API::

    server = DhcpServer(DhcpSettings(subnet=..., server_address=..., namespace="lab",
                                     node_id=identity.node_id, domain="vpn.test"),
                        rng=random.Random(seed))
    server.preferred(address_from_state_dir)     # optional, before the first DISCOVER
    # inputs
    server.receive(udp_payload, client_mac, now)  # or server.receive_frame(frame, now)
    server.address_won(claim.token, claim.address, now)    # CreateResult ok
    server.address_lost(claim.token, claim.address, now)   # CreateResult "exists"
    server.address_lost(None, address, now)                # the DHT's LeaseLost
    server.claim_failed(claim.token, claim.address, now)   # any other CreateResult
    server.handle_timer(now)                                # at next_deadline()
    # outputs
    server.replies() -> list[Reply]           # or server.reply_frames(gateway_mac)
    server.dht_requests() -> list[Claim | Release]   # dht.create / dht.delete, in order
    server.events() -> list[DhcpEvent]
    server.next_deadline() -> float | None
    server.statistics() -> dict[str, int]
    server.leases() -> list[LeaseInfo]
"""

from pipeline.control.dhcp.events import (
    AddressDeclined,
    Claim,
    ClaimsExhausted,
    DhcpEvent,
    LeaseEvent,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRenewed,
    LeaseRevoked,
    NakSent,
    OfferExpired,
    Release,
    Reply,
)
from pipeline.control.dhcp.frames import reply_frame, request_from_frame
from pipeline.control.dhcp.server import DhcpServer, DhcpSettings, LeaseInfo, derive_address
from pipeline.control.dhcp.wire import DhcpMessage, MessageType, Option, decode, encode

__all__ = [
    "AddressDeclined",
    "Claim",
    "ClaimsExhausted",
    "DhcpEvent",
    "DhcpMessage",
    "DhcpServer",
    "DhcpSettings",
    "LeaseEvent",
    "LeaseExpired",
    "LeaseGranted",
    "LeaseInfo",
    "LeaseReleased",
    "LeaseRenewed",
    "LeaseRevoked",
    "MessageType",
    "NakSent",
    "OfferExpired",
    "Option",
    "Release",
    "Reply",
    "decode",
    "derive_address",
    "encode",
    "reply_frame",
    "request_from_frame",
]
