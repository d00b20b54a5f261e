"""The classifier stage's core: what to do with each frame from the TAP or packet from a peer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType

from pipeline.classifier.routes import Routes
from pipeline.errors import RemoteProtocolError
from pipeline.wire import arp, ethernet, ipv6

__all__ = [
    "DHCP_SERVER_PORT",
    "INTERFACE",
    "ROUTER",
    "Action",
    "Classifier",
    "ClassifierStats",
    "DropReason",
    "LocalHosts",
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


class Action(IntEnum):
    TO_PEER = 0
    TO_TAP = 1
    DROP = 2
    TO_CONTROL = 3  # a frame for the node itself: DHCP, or DNS to the virtual gateway
    RESOLVE = 4  # an IP packet to an address without a route: control resolves and sends it
    VERIFY = 5  # from a peer, from a source without a route: control checks whose it is
    CLAIM = 6  # router mode, allow_static: a frame from an unleased machine of the subnet


Verdict = tuple[Action, int, bytes | memoryview | DropReason]


@dataclass(frozen=True, slots=True)
class ClassifierStats:
    """Counters since start. ``sum(actions.values()) == from_inside + from_outside`` and
    ``sum(drops.values()) == actions[Action.DROP]``."""

    routes_version: int
    routes: int  # addresses routed
    routes_ignored: int  # addresses in the table that cannot be a peer's (see apply_routes)
    local_version: int  # router mode: the LocalHosts table in use (0 before the first)
    local_hosts: int  # local addresses in use
    local_ignored: int  # addresses in that table that cannot be local (see apply_local)
    from_inside: int
    from_outside: int
    actions: dict[Action, int]
    drops: dict[DropReason, int]
    # router mode: per local address, [packets to the overlay, packets delivered from it]
    machines: dict[str, list[int]] = field(default_factory=dict)


_TO_PEER = Action.TO_PEER
_TO_TAP = Action.TO_TAP
_TO_CONTROL = Action.TO_CONTROL
_RESOLVE = Action.RESOLVE
_VERIFY = Action.VERIFY
_CLAIM = Action.CLAIM
_UDP = 17
DHCP_SERVER_PORT = 67
DNS_PORT = 53
_DROP: dict[DropReason, Verdict] = {reason: (Action.DROP, 0, reason) for reason in DropReason}

_ETHERTYPE_ARP = ethernet.ETHERTYPE_ARP
_ETHERTYPE_IPV6 = ethernet.ETHERTYPE_IPV6
_MULTICAST_TOP_NIBBLE = 0xE  # 224.0.0.0/4
_LIMITED_BROADCAST = 0xFFFFFFFF
_NO_ADDRESS4 = b"\0\0\0\0"

INTERFACE = "interface"
ROUTER = "router"


@dataclass(frozen=True, slots=True)
class LocalHosts:
    """Router mode: the machines behind this node's TAP, at one version of control's leases.

    ``macs`` maps each local virtual address (4 packed bytes) to its machine's MAC (6 bytes).
    Build it with ``from_leases``, which validates and copies into a read-only mapping.
    """

    version: int
    macs: Mapping[bytes, bytes]

    @classmethod
    def from_leases(cls, version: int, leases: Iterable[tuple[IPv4Address, bytes]]) -> LocalHosts:
        """Build from (address, MAC) pairs: the leases, and any allowed static addresses.

        A machine may hold several addresses; an address has one machine. Raises
        ``ValueError`` for a MAC that is not 6 bytes or is a group or all-zero MAC, or an
        address given with two MACs; ``TypeError`` for an address that is not an
        ``IPv4Address``.
        """
        table: dict[bytes, bytes] = {}
        for address, mac in leases:
            if not isinstance(address, IPv4Address):
                raise TypeError(f"not an IPv4Address: {address!r}")
            mac = bytes(mac)
            if len(mac) != ethernet.MAC_LEN or mac[0] & 1 or not any(mac):
                raise ValueError(f"not a unicast MAC for {address}: {mac.hex(':')}")
            known = table.setdefault(address.packed, mac)
            if known != mac:
                raise ValueError(f"{address} given to {known.hex(':')} and {mac.hex(':')}")
        return cls(version, MappingProxyType(table))


class Classifier:
    """Decides, frame by frame, between a peer, the TAP and a counted drop. Never raises on input.

    The IPv4 paths touch only raw bytes: a route is one dict probe keyed by the 4 packed
    address bytes (``apply_routes`` keeps only addresses in the subnet, so a hit needs no
    further check); the ``int & mask`` subnet test runs only to name the reason for a miss.

    Interface mode: the TAP is this machine's, with one address (``set_address``). Router
    mode: the TAP is a port of a segment's bridge, and the machines there are the local
    hosts (``apply_local``: address -> MAC). ARP is answered only for a local machine asking
    for a remote virtual address; only local machines, from their own MACs, reach the
    overlay, and a peer reaches only them (the frame goes to the machine's MAC); traffic
    between local machines and the segment's own traffic are dropped.
    """

    def __init__(
        self,
        *,
        subnet: IPv4Network,
        address: IPv4Address | None,
        tap_mac: bytes,
        gateway_mac: bytes,
        gateway: IPv4Address | None = None,
        mode: str = INTERFACE,
        dhcp_port: int = DHCP_SERVER_PORT,
        allow_static: bool = False,
    ) -> None:
        """``mode``: ``"interface"`` (the TAP is this machine's: frames go to and come from
        ``address``) or ``"router"`` (the TAP is a port of a segment's bridge: frames go to
        and come from the machines of ``apply_local``'s table; ``address`` must be None).
        ``dhcp_port``: the UDP port whose datagrams from the TAP go to control's DHCP server.
        """
        if mode != INTERFACE and mode != ROUTER:
            raise ValueError(f"mode must be {INTERFACE!r} or {ROUTER!r}, got {mode!r}")
        if type(dhcp_port) is not int or not 1 <= dhcp_port <= 0xFFFF:
            raise ValueError(f"dhcp_port {dhcp_port!r} outside 1..65535")
        self._router = mode == ROUTER
        self._dhcp_port = dhcp_port
        self._allow_static = allow_static  # router mode: machines with their own addresses
        self._to_claim = 0
        self._per_machine: dict[bytes, list[int]] = {}
        for name, mac in (("tap_mac", tap_mac), ("gateway_mac", gateway_mac)):
            if len(mac) != ethernet.MAC_LEN:
                raise ValueError(f"{name} must be {ethernet.MAC_LEN} bytes, got {len(mac)}")
        self._subnet = subnet
        self._gateway_mac = bytes(gateway_mac)
        self._gateway4 = gateway.packed if gateway is not None else b""
        self.set_address(address)
        self._mask = int(subnet.netmask)
        self._network = int(subnet.network_address)
        # With /31 and /32 every address is a host (RFC 3021), so there is no subnet broadcast.
        self._subnet_broadcast = int(subnet.broadcast_address) if subnet.prefixlen <= 30 else -1
        self._to_tap_header = ethernet.build(tap_mac, gateway_mac, ethernet.ETHERTYPE_IPV4)
        self._routes = Routes.from_peers(0, ())
        self._routes_ignored = 0
        no_routes: dict[bytes, int] = {}
        self._route_get: Callable[[bytes], int | None] = no_routes.get
        self._local = LocalHosts(0, MappingProxyType({}))
        self._local_macs: dict[bytes, bytes] = {}  # the usable part of self._local
        self._local_get = self._local_macs.get
        no_headers: dict[bytes, bytes] = {}  # local address -> Ethernet header of frames to it
        self._local_header_get: Callable[[bytes], bytes | None] = no_headers.get
        if self._router:
            # Router mode has its own entry points, so interface mode's stay as they are.
            self.from_inside = self._router_from_inside  # type: ignore[method-assign]
            self.from_outside = self._router_from_outside  # type: ignore[method-assign]
        # Counters: one increment per call on the hot paths; drops are per direction.
        self._to_peer = 0
        self._to_control = 0
        self._to_resolve = 0
        self._to_verify = 0
        self._inside_to_tap = 0
        self._outside_to_tap = 0
        self._inside_drops = dict.fromkeys(DropReason, 0)
        self._outside_drops = dict.fromkeys(DropReason, 0)

    def set_address(self, address: IPv4Address | None) -> None:
        """This node's virtual address (None: not known yet, the TAP waits for DHCP).

        Router mode: always None (the local addresses are ``apply_local``'s).
        """
        subnet = self._subnet
        if address is not None and self._router:
            raise ValueError("a router has no address of its own: local addresses are leases")
        if address is not None and address not in subnet:
            raise ValueError(f"address {address} is not in subnet {subnet}")
        if (
            address is not None
            and subnet.prefixlen <= 30
            and address in (subnet.network_address, subnet.broadcast_address)
        ):
            raise ValueError(f"address {address} is the network or broadcast address of {subnet}")
        self._address = address
        self._address4 = address.packed if address is not None else _NO_ADDRESS4

    @property
    def address(self) -> IPv4Address | None:
        return self._address

    @property
    def mode(self) -> str:
        return ROUTER if self._router else INTERFACE

    @property
    def dhcp_port(self) -> int:
        return self._dhcp_port

    @property
    def routes(self) -> Routes:
        return self._routes

    def apply_routes(self, routes: Routes) -> None:
        """Use ``routes`` from now on (control published a new table).

        Addresses that cannot be a peer's -- outside the subnet, our own (in router mode: a
        local machine's), the subnet's network or broadcast address -- are left out (counted
        in ``statistics().routes_ignored``), so the hot paths need no further address checks.
        """
        self._routes = routes
        self._use_routes()

    def _use_routes(self) -> None:
        usable: dict[bytes, int] = {}
        local = self._local_macs
        for address4, slot in self._routes.items():
            if (
                self._is_host(int.from_bytes(address4, "big"))
                and address4 != self._address4
                and address4 not in local
            ):
                usable[address4] = slot
        self._routes_ignored = len(self._routes) - len(usable)
        self._route_get = usable.get

    @property
    def local(self) -> LocalHosts:
        return self._local

    def apply_local(self, local: LocalHosts) -> None:
        """Router mode: use ``local`` (the machines on the segment) from now on.

        Addresses that cannot be a machine's -- outside the subnet, the subnet's network or
        broadcast address, the gateway -- are left out (``statistics().local_ignored``).
        Routes to local addresses are ignored while they are local. Interface mode takes
        only an empty table (its one local address is ``set_address``'s).
        """
        if not self._router and len(local.macs):
            raise ValueError("interface mode has no local hosts but its own address")
        macs: dict[bytes, bytes] = {}
        headers: dict[bytes, bytes] = {}
        for address4, mac in local.macs.items():
            if self._is_host(int.from_bytes(address4, "big")) and address4 != self._gateway4:
                macs[address4] = mac
                headers[address4] = ethernet.build(mac, self._gateway_mac, 0x0800)
        self._local = local
        self._local_macs = macs
        self._local_get = macs.get
        self._local_header_get = headers.get
        self._use_routes()

    def from_inside(self, frame: memoryview) -> Verdict:
        """Classify a frame read from the TAP (Ethernet header first).

        Returns ``(TO_PEER, slot, ip_packet)`` (a slice of ``frame``, no copy, trimmed to the
        IPv4 total length), ``(TO_TAP, 0, arp_reply_frame)`` or ``(DROP, 0, reason)``.
        """
        try:
            n = len(frame)
            if n < 14:
                return self._drop_inside(DropReason.MALFORMED)
            ethertype = frame[12] << 8 | frame[13]
            if ethertype != 0x0800:
                return self._inside_not_ipv4(frame, ethertype)
            if n < 34:
                return self._drop_inside(DropReason.MALFORMED)
            vihl = frame[14]
            header_length = (vihl & 0x0F) << 2
            total = frame[16] << 8 | frame[17]
            if vihl >> 4 != 4 or header_length < 20 or total < header_length or total > n - 14:
                return self._drop_inside(DropReason.MALFORMED)
            dst4 = frame[30:34].tobytes()
            slot = self._route_get(dst4)
            if slot is not None:
                self._to_peer += 1
                return (_TO_PEER, slot, frame[14 : 14 + total])
            return self._inside_not_routed(frame, dst4, header_length, total)
        except RemoteProtocolError:
            return self._drop_inside(DropReason.MALFORMED)

    def from_outside(self, peer: int, packet: memoryview) -> Verdict:
        """Classify an IPv4 packet received from peer slot ``peer``.

        Returns ``(TO_TAP, 0, ethernet_frame)`` (tap_mac <- gateway_mac, one copy) or
        ``(DROP, 0, reason)``. Bytes beyond the IPv4 total length are dropped from the frame.
        """
        try:
            n = len(packet)
            if n < 20:
                return self._drop_outside(DropReason.MALFORMED)
            vihl = packet[0]
            header_length = (vihl & 0x0F) << 2
            total = packet[2] << 8 | packet[3]
            if vihl >> 4 != 4 or header_length < 20 or total < header_length or total > n:
                return self._drop_outside(DropReason.MALFORMED)
            src4 = packet[12:16].tobytes()
            owner = self._route_get(src4)
            if owner != peer:
                src = int.from_bytes(src4, "big")
                if (
                    owner is None
                    and src & self._mask == self._network
                    and packet[16:20] == self._address4
                    and src4 != self._address4
                ):
                    self._to_verify += 1  # a sender we have not resolved yet: control checks
                    return (_VERIFY, peer, packet[:total])
                return self._drop_outside(DropReason.SPOOFED_SOURCE)
            if packet[16:20] != self._address4:
                dst = int.from_bytes(packet[16:20], "big")
                if self._is_broadcast(dst):
                    return self._drop_outside(DropReason.BROADCAST)
                return self._drop_outside(DropReason.WRONG_DESTINATION)
            self._outside_to_tap += 1
            if total == n:
                return (_TO_TAP, 0, self._to_tap_header + packet)
            return (_TO_TAP, 0, self._to_tap_header + packet[:total])
        except RemoteProtocolError:
            return self._drop_outside(DropReason.MALFORMED)

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
            local_version=self._local.version,
            local_hosts=len(self._local_macs),
            local_ignored=len(self._local.macs) - len(self._local_macs),
            from_inside=self._to_peer
            + self._inside_to_tap
            + self._to_control
            + self._to_resolve
            + self._to_claim
            + inside_drops,
            from_outside=self._outside_to_tap + self._to_verify + outside_drops,
            actions={
                Action.TO_PEER: self._to_peer,
                Action.TO_TAP: self._inside_to_tap + self._outside_to_tap,
                Action.DROP: inside_drops + outside_drops,
                Action.TO_CONTROL: self._to_control,
                Action.RESOLVE: self._to_resolve,
                Action.VERIFY: self._to_verify,
                Action.CLAIM: self._to_claim,
            },
            drops=drops,
            machines={".".join(str(b) for b in a): list(c) for a, c in self._per_machine.items()},
        )

    # -- the cold paths ------------------------------------------------------------------

    def _drop_inside(self, reason: DropReason) -> Verdict:
        self._inside_drops[reason] += 1
        return _DROP[reason]

    def _drop_outside(self, reason: DropReason) -> Verdict:
        self._outside_drops[reason] += 1
        return _DROP[reason]

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

    def _inside_not_routed(
        self, frame: memoryview, dst4: bytes, header_length: int, total: int
    ) -> Verdict:
        """The cold path of a packet from the TAP: DHCP and DNS for the node itself, an
        address to resolve, or a drop."""
        udp_at = 14 + header_length
        if frame[23] == _UDP and total >= header_length + 8:
            dst_port = frame[udp_at + 2] << 8 | frame[udp_at + 3]
            if dst_port == self._dhcp_port:
                self._to_control += 1
                return (_TO_CONTROL, 0, frame[: 14 + total])
            if dst4 == self._gateway4 and dst_port == DNS_PORT:
                self._to_control += 1
                return (_TO_CONTROL, 0, frame[: 14 + total])
        if self._address is None:
            return self._drop_inside(DropReason.NO_ADDRESS)
        if dst4 == self._address4:
            return self._drop_inside(DropReason.TO_SELF)
        if dst4 == self._gateway4:
            return self._drop_inside(DropReason.TO_GATEWAY)
        dst = int.from_bytes(dst4, "big")
        if self._is_broadcast(dst):
            return self._drop_inside(DropReason.BROADCAST)
        if dst & self._mask != self._network:
            return self._drop_inside(DropReason.NOT_IN_SUBNET)
        if dst == self._network and self._subnet_broadcast >= 0:
            return self._drop_inside(DropReason.NO_ROUTE)  # the subnet's own address
        self._to_resolve += 1
        return (_RESOLVE, 0, frame[14 : 14 + total])

    def _inside_not_ipv4(self, frame: memoryview, ethertype: int) -> Verdict:
        if ethertype == _ETHERTYPE_ARP:
            return self._inside_arp(frame)
        if ethertype == _ETHERTYPE_IPV6:
            payload = frame[ethernet.HEADER_LEN :]
            ipv6.parse(payload)
            if ipv6.is_neighbour_discovery(payload):
                return self._drop_inside(DropReason.IPV6_NEIGHBOUR_DISCOVERY)
            return self._drop_inside(DropReason.IPV6)
        return self._drop_inside(DropReason.NOT_IPV4)

    def _inside_arp(self, frame: memoryview) -> Verdict:
        request = arp.parse(frame[ethernet.HEADER_LEN :])
        if request.op != arp.ArpOp.REQUEST:
            return self._drop_inside(DropReason.ARP_REPLY)
        target = request.target_ip
        subnet = self._subnet
        if target not in subnet or (
            subnet.prefixlen <= 30
            and (target == subnet.network_address or target == subnet.broadcast_address)
        ):
            return self._drop_inside(DropReason.ARP_NOT_FOR_SUBNET)
        if target == self._address or request.sender_ip == target:
            return self._drop_inside(DropReason.ARP_OWN_ADDRESS)
        if int(request.sender_ip) == 0:
            return self._drop_inside(DropReason.ARP_PROBE)
        return self._arp_reply(request)

    def _arp_reply(self, request: arp.ArpPacket) -> Verdict:
        """The reply to ``request``: its target is at the gateway MAC."""
        reply = arp.build_reply(request, self._gateway_mac)
        frame_out = ethernet.build(
            request.sender_mac, self._gateway_mac, _ETHERTYPE_ARP, arp.build(reply)
        )
        self._inside_to_tap += 1
        return (_TO_TAP, 0, frame_out)

    # -- router mode: the TAP is a port of a segment's bridge ------------------------------
    # The two entry points repeat the header checks of interface mode's on purpose: a helper
    # shared with them would cost interface mode a call per frame.

    def _router_from_inside(self, frame: memoryview) -> Verdict:
        """``from_inside`` in router mode: only a local machine, from its own MAC, reaches
        the overlay, and only to a remote address; the verdicts are interface mode's."""
        try:
            n = len(frame)
            if n < 14:
                return self._drop_inside(DropReason.MALFORMED)
            ethertype = frame[12] << 8 | frame[13]
            if ethertype != 0x0800:
                if ethertype == _ETHERTYPE_ARP:
                    return self._router_arp(frame)
                return self._inside_not_ipv4(frame, ethertype)
            if n < 34:
                return self._drop_inside(DropReason.MALFORMED)
            vihl = frame[14]
            header_length = (vihl & 0x0F) << 2
            total = frame[16] << 8 | frame[17]
            if vihl >> 4 != 4 or header_length < 20 or total < header_length or total > n - 14:
                return self._drop_inside(DropReason.MALFORMED)
            dst4 = frame[30:34].tobytes()
            slot = self._route_get(dst4)
            if slot is not None:
                source_mac = self._local_get(frame[26:30].tobytes())
                if frame[6:12].tobytes() == source_mac:  # a local machine, from its own MAC
                    self._to_peer += 1
                    self._count(frame[26:30].tobytes(), 0)
                    return (_TO_PEER, slot, frame[14 : 14 + total])
            return self._router_not_routed(frame, dst4, header_length, total)
        except RemoteProtocolError:
            return self._drop_inside(DropReason.MALFORMED)

    def _router_from_outside(self, peer: int, packet: memoryview) -> Verdict:
        """``from_outside`` in router mode: to a local machine only, framed to its MAC."""
        try:
            n = len(packet)
            if n < 20:
                return self._drop_outside(DropReason.MALFORMED)
            vihl = packet[0]
            header_length = (vihl & 0x0F) << 2
            total = packet[2] << 8 | packet[3]
            if vihl >> 4 != 4 or header_length < 20 or total < header_length or total > n:
                return self._drop_outside(DropReason.MALFORMED)
            src4 = packet[12:16].tobytes()
            owner = self._route_get(src4)
            header = self._local_header_get(packet[16:20].tobytes())
            if owner != peer:
                if (
                    owner is None
                    and header is not None
                    and int.from_bytes(src4, "big") & self._mask == self._network
                    and src4 not in self._local_macs
                ):
                    self._to_verify += 1  # a sender we have not resolved yet: control checks
                    return (_VERIFY, peer, packet[:total])
                return self._drop_outside(DropReason.SPOOFED_SOURCE)
            if header is None:
                if self._is_broadcast(int.from_bytes(packet[16:20], "big")):
                    return self._drop_outside(DropReason.BROADCAST)
                return self._drop_outside(DropReason.WRONG_DESTINATION)
            self._outside_to_tap += 1
            self._count(packet[16:20].tobytes(), 1)
            if total == n:
                return (_TO_TAP, 0, header + packet)
            return (_TO_TAP, 0, header + packet[:total])
        except RemoteProtocolError:
            return self._drop_outside(DropReason.MALFORMED)

    def _router_not_routed(
        self, frame: memoryview, dst4: bytes, header_length: int, total: int
    ) -> Verdict:
        """The cold path of a router's packet from the TAP: DHCP from anyone; from a local
        machine, DNS at the gateway or an address to resolve; else a drop."""
        dst_port = -1
        if frame[23] == _UDP and total >= header_length + 8:
            udp_at = 14 + header_length
            dst_port = frame[udp_at + 2] << 8 | frame[udp_at + 3]
            if dst_port == self._dhcp_port:
                self._to_control += 1
                return (_TO_CONTROL, 0, frame[: 14 + total])
        src4 = frame[26:30].tobytes()
        mac = self._local_get(src4)
        if mac is None:
            if self._claimable(src4, frame):
                self._to_claim += 1  # a machine with an address of its own: control claims it
                return (_CLAIM, 0, frame[: 14 + total])
            return self._drop_inside(DropReason.NOT_LEASED)
        if frame[6:12].tobytes() != mac:
            return self._drop_inside(DropReason.SPOOFED_LOCAL)
        if dst4 == self._gateway4:
            if dst_port == DNS_PORT:
                self._to_control += 1
                return (_TO_CONTROL, 0, frame[: 14 + total])
            return self._drop_inside(DropReason.TO_GATEWAY)
        if dst4 in self._local_macs:
            return self._drop_inside(DropReason.LOCAL_TO_LOCAL)
        dst = int.from_bytes(dst4, "big")
        if self._is_broadcast(dst):
            return self._drop_inside(DropReason.BROADCAST)
        if dst & self._mask != self._network:
            return self._drop_inside(DropReason.NOT_IN_SUBNET)
        if dst == self._network and self._subnet_broadcast >= 0:
            return self._drop_inside(DropReason.NO_ROUTE)  # the subnet's own address
        self._to_resolve += 1
        self._count(src4, 0)
        return (_RESOLVE, 0, frame[14 : 14 + total])

    def _claimable(self, address4: bytes, frame: memoryview) -> bool:
        """With ``allow_static``: may this unleased sender (a host address of the subnet,
        from a unicast MAC) be registered as a machine with an address of its own?"""
        address = int.from_bytes(address4, "big")
        return (
            self._allow_static
            and address & self._mask == self._network
            and address4 != self._gateway4
            and not self._is_broadcast(address)
            and address != self._network
            and not frame[6] & 1
        )

    def _count(self, address4: bytes, direction: int) -> None:
        counts = self._per_machine.get(address4)
        if counts is None:
            if len(self._per_machine) >= 4096:
                return
            counts = self._per_machine[address4] = [0, 0]
        counts[direction] += 1

    def _router_arp(self, frame: memoryview) -> Verdict:
        """ARP on the segment: answered with the gateway MAC only when a local machine asks
        for a remote virtual address (or the gateway); machines answer for themselves."""
        request = arp.parse(frame[ethernet.HEADER_LEN :])
        if request.op != arp.ArpOp.REQUEST:
            return self._drop_inside(DropReason.ARP_REPLY)
        target4 = request.target_ip.packed
        if not self._is_host(int.from_bytes(target4, "big")):
            return self._drop_inside(DropReason.ARP_NOT_FOR_SUBNET)
        if target4 in self._local_macs:
            return self._drop_inside(DropReason.ARP_LOCAL)
        sender4 = request.sender_ip.packed
        if sender4 == target4:
            return self._drop_inside(DropReason.ARP_OWN_ADDRESS)  # gratuitous
        if sender4 == _NO_ADDRESS4:
            return self._drop_inside(DropReason.ARP_PROBE)
        mac = self._local_get(sender4)
        if mac is None:
            if self._claimable(sender4, frame):
                self._to_claim += 1  # its first word on the segment: control claims it
                return (_CLAIM, 0, frame)
            return self._drop_inside(DropReason.ARP_FOREIGN_SENDER)
        if mac != request.sender_mac:
            return self._drop_inside(DropReason.SPOOFED_LOCAL)
        return self._arp_reply(request)
