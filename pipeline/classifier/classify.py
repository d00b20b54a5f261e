"""The classifier's core: what to do with each frame from the TAP or packet from a peer.

Theory of operation
===================

A classifier is handed, one at a time, the frames read from the TAP (``from_inside(frame)``,
Ethernet header first) and the IPv4 packets opened from a peer
(``from_outside(peer, packet)``), and answers each with a ``Verdict``, a plain tuple of three
typed parts::

    (action, peer, out)

- ``action`` (a ``FrameAction``) says where the bytes go, and so which ring record carries
  them (``pipeline/records.py``): ``TO_PEER`` an IP_PACKET to overlay_io, ``TO_TAP`` a FRAME
  to a tap_reader, ``TO_CONTROL`` a FRAME to control, ``RESOLVE``/``VERIFY``/``CLAIM`` a
  record of that kind to control, ``DROP`` nothing;
- ``peer`` is the link slot the record belongs to (``TO_PEER``, ``VERIFY``), else 0;
- ``out`` is the record's bytes: a slice of the input (no copy) or new bytes (a reply, a
  packet given its Ethernet header); ``b""`` for ``DROP``.

A drop's reason is counted here (``statistics().drops``), not returned: the driver has
nothing to do with a drop. A plain tuple costs nothing to build and unpack; it is the one
shape every verdict has, so the driver needs no cast and no ``isinstance``.

Two classes, one per ``network.mode``, and the driver picks one at setup:
``InterfaceClassifier`` (``pipeline/classifier/interface.py``: the TAP is this machine's,
with one address) and ``RouterClassifier`` (``pipeline/classifier/router.py``: the TAP is a
port of a segment's bridge, with the machines there behind it). ``Classifier``, here, is
what they share: the configuration checks, the route table, the counters, and the cold paths
both take (ARP replies, IPv6 and other ethertypes, the drop counters). Each has its own
``from_inside`` and ``from_outside``, whose header checks are written out in full on
purpose: a helper shared by the two would cost every frame a call.

The IPv4 paths touch only raw bytes: a route is one dict probe keyed by the 4 packed address
bytes (``apply_routes`` keeps only addresses that can be a peer's, so a hit needs no further
check); the ``int & mask`` subnet tests run only to name the reason for a miss.

Nothing raises on input: a codec's ``RemoteProtocolError`` is caught at the two entry points
and counted as ``MALFORMED``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from enum import IntEnum, StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import ClassVar, Final

import msgspec

from pipeline.classifier.routes import Routes
from pipeline.wire import arp, ethernet, ipv6

__all__ = [
    "DHCP_SERVER_PORT",
    "DNS_PORT",
    "DROPPED",
    "Classifier",
    "ClassifierStats",
    "DropReason",
    "FrameAction",
    "Verdict",
]


class DropReason(StrEnum):
    MALFORMED = "malformed"
    NOT_IPV4 = "not_ipv4"  # an ethertype other than IPv4, ARP, IPv6
    IPV6_NEIGHBOUR_DISCOVERY = "ipv6_neighbour_discovery"
    IPV6 = "ipv6"
    ARP_NOT_FOR_SUBNET = "arp_not_for_subnet"
    ARP_OWN_ADDRESS = "arp_own_address"  # a request for our own address, or gratuitous
    ARP_REPLY = "arp_reply"  # the stack's replies; nobody here asked
    NOT_IN_SUBNET = "not_in_subnet"
    NO_ROUTE = "no_route"  # to the subnet's network address
    ARP_PROBE = "arp_probe"  # an address-conflict probe (sender 0.0.0.0): nobody here answers
    NO_ADDRESS = "no_address"  # the TAP has no address yet (DHCP): only DHCP goes out
    TO_GATEWAY = "to_gateway"  # to the virtual gateway, but neither DHCP nor DNS
    TO_SELF = "to_self"
    SPOOFED_SOURCE = "spoofed_source"
    WRONG_DESTINATION = "wrong_destination"
    BROADCAST = "broadcast"  # IPv4 broadcast or multicast
    # Router mode only: the TAP is a port of a segment's bridge, and "local" means an address
    # in the LocalHosts table (a machine on that segment).
    ARP_LOCAL = "arp_local"  # for a local machine: it answers for itself on the segment
    ARP_FOREIGN_SENDER = "arp_foreign_sender"  # asked by an address that is not local
    NOT_LEASED = "not_leased"  # IPv4 from a source that is not local: the segment's own traffic
    SPOOFED_LOCAL = "spoofed_local"  # a local source address from a MAC that is not its own
    LOCAL_TO_LOCAL = "local_to_local"  # between two local machines: they talk on the segment


class FrameAction(IntEnum):
    """Where a verdict sends its bytes, and as which ring record (``pipeline/records.py``)."""

    TO_PEER = 0  # IP_PACKET to the overlay_io worker of link ``peer``
    TO_TAP = 1  # FRAME to a tap_reader (an ARP reply goes back to the TAP queue it came from)
    DROP = 2  # nothing: the reason is counted
    TO_CONTROL = 3  # FRAME to control: a frame for the node itself, DHCP or DNS at the gateway
    RESOLVE = 4  # RESOLVE to control: an IP packet to an address without a route
    VERIFY = 5  # VERIFY to control: from link ``peer``, from a source without a route
    CLAIM = 6  # CLAIM to control, router mode: a frame from an unleased machine of the subnet


Verdict = tuple[FrameAction, int, bytes | memoryview]
"""``(action, peer, out)``: see the module docstring. ``out`` is exactly the record's bytes, so
a header the TAP adds or wants (a virtio-net header, with TSO) can travel in it."""

DROPPED: Final[Verdict] = (FrameAction.DROP, 0, b"")
"""The one verdict of every drop (the reason is counted, not returned)."""


class ClassifierStats(msgspec.Struct, frozen=True):
    """Counters since start. ``sum(actions.values()) == from_inside + from_outside`` and
    ``sum(drops.values()) == actions[FrameAction.DROP]``."""

    routes_version: int
    routes: int  # addresses routed
    routes_ignored: int  # addresses in the table that cannot be a peer's (see apply_routes)
    local_version: int  # router mode: the LocalHosts table in use (0 before the first)
    local_hosts: int  # local addresses in use
    local_ignored: int  # addresses in that table that cannot be local (see apply_local)
    from_inside: int
    from_outside: int
    actions: dict[FrameAction, int]
    drops: dict[DropReason, int]
    # router mode: per local address, [packets to the overlay, packets delivered from it]
    machines: dict[str, list[int]] = msgspec.field(default_factory=dict)


DHCP_SERVER_PORT = 67
DNS_PORT = 53
_ETHERTYPE_ARP = ethernet.ETHERTYPE_ARP
_ETHERTYPE_IPV6 = ethernet.ETHERTYPE_IPV6
_MULTICAST_TOP_NIBBLE = 0xE  # 224.0.0.0/4
_LIMITED_BROADCAST = 0xFFFFFFFF


class Classifier(abc.ABC):
    """What the interface and router classifiers share. Decides, frame by frame, between a
    peer, the TAP, control and a counted drop; never raises on input."""

    mode: ClassVar[str]  # the ``network.mode`` this class serves

    def __init__(
        self,
        *,
        subnet: IPv4Network,
        gateway_mac: bytes,
        gateway: IPv4Address | None = None,
        dhcp_port: int = DHCP_SERVER_PORT,
    ) -> None:
        """``dhcp_port``: the UDP port whose datagrams from the TAP go to control's DHCP
        server. ``gateway``: the virtual gateway's address (DNS is answered there)."""
        if type(dhcp_port) is not int or not 1 <= dhcp_port <= 0xFFFF:
            raise ValueError(f"dhcp_port {dhcp_port!r} outside 1..65535")
        if len(gateway_mac) != ethernet.MAC_LEN:
            raise ValueError(
                f"gateway_mac must be {ethernet.MAC_LEN} bytes, got {len(gateway_mac)}"
            )
        self._dhcp_port = dhcp_port
        self._subnet = subnet
        self._gateway_mac = bytes(gateway_mac)
        self._gateway4 = gateway.packed if gateway is not None else b""
        self._mask = int(subnet.netmask)
        self._network = int(subnet.network_address)
        # With /31 and /32 every address is a host (RFC 3021), so there is no subnet broadcast.
        self._subnet_broadcast = int(subnet.broadcast_address) if subnet.prefixlen <= 30 else -1
        self._routes = Routes.from_peers(0, ())
        self._routes_ignored = 0
        no_routes: dict[bytes, int] = {}
        self._route_get: Callable[[bytes], int | None] = no_routes.get
        # Counters: one increment per call on the hot paths; drops are per direction.
        self._to_peer = 0
        self._to_control = 0
        self._to_resolve = 0
        self._to_verify = 0
        self._to_claim = 0
        self._inside_to_tap = 0
        self._outside_to_tap = 0
        self._inside_drops = dict.fromkeys(DropReason, 0)
        self._outside_drops = dict.fromkeys(DropReason, 0)

    # -- the two entry points, one pair per mode -------------------------------------------

    @abc.abstractmethod
    def from_inside(self, frame: memoryview) -> Verdict:
        """Classify a frame read from the TAP (Ethernet header first)."""

    @abc.abstractmethod
    def from_outside(self, peer: int, packet: memoryview) -> Verdict:
        """Classify an IPv4 packet opened from the link in slot ``peer``."""

    # -- routes ----------------------------------------------------------------------------

    @property
    def dhcp_port(self) -> int:
        return self._dhcp_port

    @property
    def routes(self) -> Routes:
        return self._routes

    def apply_routes(self, routes: Routes) -> None:
        """Use ``routes`` from now on (control published a new table).

        Addresses that cannot be a peer's -- outside the subnet, the subnet's network or
        broadcast address, a local one (ours, or in router mode a local machine's) -- are
        left out (counted in ``statistics().routes_ignored``), so the hot paths need no
        further address checks.
        """
        self._routes = routes
        self._use_routes()

    def _use_routes(self) -> None:
        usable: dict[bytes, int] = {}
        for address4, slot in self._routes.items():
            if self._is_host(int.from_bytes(address4, "big")) and not self._is_local(address4):
                usable[address4] = slot
        self._routes_ignored = len(self._routes) - len(usable)
        self._route_get = usable.get

    @abc.abstractmethod
    def _is_local(self, address4: bytes) -> bool:
        """Is this address on this side of the TAP (so never a peer's)?"""

    # -- counters --------------------------------------------------------------------------

    def statistics(self) -> ClassifierStats:
        drops = {
            reason: self._inside_drops[reason] + self._outside_drops[reason]
            for reason in DropReason
        }
        inside_drops = sum(self._inside_drops.values())
        outside_drops = sum(self._outside_drops.values())
        return ClassifierStats(
            routes_version=self._routes.version,
            routes=len(self._routes) - self._routes_ignored,
            routes_ignored=self._routes_ignored,
            local_version=0,
            local_hosts=0,
            local_ignored=0,
            from_inside=self._to_peer
            + self._inside_to_tap
            + self._to_control
            + self._to_resolve
            + self._to_claim
            + inside_drops,
            from_outside=self._outside_to_tap + self._to_verify + outside_drops,
            actions={
                FrameAction.TO_PEER: self._to_peer,
                FrameAction.TO_TAP: self._inside_to_tap + self._outside_to_tap,
                FrameAction.DROP: inside_drops + outside_drops,
                FrameAction.TO_CONTROL: self._to_control,
                FrameAction.RESOLVE: self._to_resolve,
                FrameAction.VERIFY: self._to_verify,
                FrameAction.CLAIM: self._to_claim,
            },
            drops=drops,
        )

    # -- the cold paths both modes take ----------------------------------------------------

    def _drop_inside(self, reason: DropReason) -> Verdict:
        self._inside_drops[reason] += 1
        return DROPPED

    def _drop_outside(self, reason: DropReason) -> Verdict:
        self._outside_drops[reason] += 1
        return DROPPED

    def _is_host(self, address: int) -> bool:
        """In the subnet, and neither its network nor its broadcast address."""
        return (
            address & self._mask == self._network
            and address != self._subnet_broadcast
            and not (self._subnet_broadcast >= 0 and address == self._network)
        )

    def _is_broadcast(self, address: int) -> bool:
        return (
            address >> 28 == _MULTICAST_TOP_NIBBLE
            or address == _LIMITED_BROADCAST
            or address == self._subnet_broadcast
        )

    def _inside_not_ipv4(self, frame: memoryview, ethertype: int) -> Verdict:
        """A frame from the TAP that is not IPv4: ARP is the mode's; the rest are drops."""
        if ethertype == _ETHERTYPE_ARP:
            request = arp.parse(frame[ethernet.HEADER_LEN :])
            if request.op != arp.ArpOp.REQUEST:
                return self._drop_inside(DropReason.ARP_REPLY)
            return self._arp_request(request, frame)
        if ethertype == _ETHERTYPE_IPV6:
            payload = frame[ethernet.HEADER_LEN :]
            ipv6.parse(payload)
            if ipv6.is_neighbour_discovery(payload):
                return self._drop_inside(DropReason.IPV6_NEIGHBOUR_DISCOVERY)
            return self._drop_inside(DropReason.IPV6)
        return self._drop_inside(DropReason.NOT_IPV4)

    @abc.abstractmethod
    def _arp_request(self, request: arp.ArpPacket, frame: memoryview) -> Verdict:
        """An ARP request from the TAP (``frame``: the whole frame): answered or dropped."""

    def _arp_reply(self, request: arp.ArpPacket) -> Verdict:
        """The reply to ``request``: its target is at the gateway MAC."""
        reply = arp.build_reply(request, self._gateway_mac)
        frame_out = ethernet.build(
            request.sender_mac, self._gateway_mac, _ETHERTYPE_ARP, arp.build(reply)
        )
        self._inside_to_tap += 1
        return (FrameAction.TO_TAP, 0, frame_out)
