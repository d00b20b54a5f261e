"""The classifier of router mode: the TAP is a port of a segment's bridge.

The node has no address of its own; the machines on the segment are the local hosts
(``apply_local``: address -> MAC, control's leases). ARP is answered only for a local machine
asking for a remote virtual address (or the gateway); only local machines, from their own
MACs, reach the overlay, and a peer reaches only them (the frame goes to the machine's MAC);
traffic between local machines and the segment's own traffic are dropped: they talk on L2.
With ``allow_static``, the first frame of an unleased machine of the subnet goes to control
(CLAIM), which claims its address for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import ClassVar

import msgspec

from pipeline.classifier.classify import (
    DHCP_SERVER_PORT,
    DNS_PORT,
    Classifier,
    ClassifierStats,
    DropReason,
    FrameAction,
    Verdict,
)
from pipeline.errors import RemoteProtocolError
from pipeline.wire import arp, ethernet

__all__ = ["LocalHosts", "RouterClassifier"]

_TO_PEER = FrameAction.TO_PEER
_TO_TAP = FrameAction.TO_TAP
_TO_CONTROL = FrameAction.TO_CONTROL
_RESOLVE = FrameAction.RESOLVE
_VERIFY = FrameAction.VERIFY
_CLAIM = FrameAction.CLAIM
_UDP = 17
_NO_ADDRESS4 = b"\0\0\0\0"
_MAX_MACHINES = 4096  # per-machine counters kept


class LocalHosts(msgspec.Struct, frozen=True):
    """The machines behind this node's TAP, at one version of control's leases.

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


class RouterClassifier(Classifier):
    """The TAP is a port of a segment's bridge: frames go to and come from the machines of
    ``apply_local``'s table (none before the first)."""

    mode: ClassVar[str] = "router"

    def __init__(
        self,
        *,
        subnet: IPv4Network,
        gateway_mac: bytes,
        gateway: IPv4Address | None = None,
        dhcp_port: int = DHCP_SERVER_PORT,
        allow_static: bool = False,
    ) -> None:
        """``allow_static``: machines with addresses of their own are claimed (CLAIM)."""
        super().__init__(
            subnet=subnet, gateway_mac=gateway_mac, gateway=gateway, dhcp_port=dhcp_port
        )
        self._allow_static = allow_static
        self._per_machine: dict[bytes, list[int]] = {}
        self._local = LocalHosts(0, MappingProxyType({}))
        self._local_macs: dict[bytes, bytes] = {}  # the usable part of self._local
        self._local_get = self._local_macs.get
        no_headers: dict[bytes, bytes] = {}  # local address -> Ethernet header of frames to it
        self._local_header_get: Callable[[bytes], bytes | None] = no_headers.get

    @property
    def local(self) -> LocalHosts:
        return self._local

    def apply_local(self, local: LocalHosts) -> None:
        """Use ``local`` (the machines on the segment) from now on.

        Addresses that cannot be a machine's -- outside the subnet, the subnet's network or
        broadcast address, the gateway -- are left out (``statistics().local_ignored``).
        Routes to local addresses are ignored while they are local.
        """
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

    def _is_local(self, address4: bytes) -> bool:
        return address4 in self._local_macs

    def statistics(self) -> ClassifierStats:
        return msgspec.structs.replace(
            super().statistics(),
            local_version=self._local.version,
            local_hosts=len(self._local_macs),
            local_ignored=len(self._local.macs) - len(self._local_macs),
            machines={".".join(str(b) for b in a): list(c) for a, c in self._per_machine.items()},
        )

    def from_inside(self, frame: memoryview) -> Verdict:
        """Classify a frame from the segment: only a local machine, from its own MAC, reaches
        the overlay, and only to a remote address. The verdicts are interface mode's, and
        ``(CLAIM, 0, frame)``."""
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
                source_mac = self._local_get(frame[26:30].tobytes())
                if frame[6:12].tobytes() == source_mac:  # a local machine, from its own MAC
                    self._to_peer += 1
                    self._count(frame[26:30].tobytes(), 0)
                    return (_TO_PEER, slot, frame[14 : 14 + total])
            return self._not_routed(frame, dst4, header_length, total)
        except RemoteProtocolError:
            return self._drop_inside(DropReason.MALFORMED)

    def from_outside(self, peer: int, packet: memoryview) -> Verdict:
        """Classify a packet from a peer: to a local machine only, framed to its MAC."""
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

    # -- the cold paths ------------------------------------------------------------------

    def _not_routed(
        self, frame: memoryview, dst4: bytes, header_length: int, total: int
    ) -> Verdict:
        """A packet from the segment without a route to a peer: DHCP from anyone; from a
        local machine, DNS at the gateway or an address to resolve; else a claim or a drop."""
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

    def _arp_request(self, request: arp.ArpPacket, frame: memoryview) -> Verdict:
        """ARP on the segment: answered with the gateway MAC only when a local machine asks
        for a remote virtual address (or the gateway); machines answer for themselves."""
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
            if len(self._per_machine) >= _MAX_MACHINES:
                return
            counts = self._per_machine[address4] = [0, 0]
        counts[direction] += 1
