"""The classifier of interface mode: the TAP is this machine's, with one virtual address.

Outbound, an IPv4 packet to a routed address goes to its peer; DHCP, and DNS to the virtual
gateway, go to control; an address of the subnet without a route goes to control to be
resolved; ARP for any other address of the subnet is answered with the gateway's MAC.
Inbound, a packet is delivered (framed gateway MAC -> TAP MAC) only from an address its link
owns, to our own address; from an address without a route, control verifies it first.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import ClassVar

from pipeline.classifier.classify import (
    DHCP_SERVER_PORT,
    DNS_PORT,
    Classifier,
    DropReason,
    FrameAction,
    Verdict,
)
from pipeline.errors import RemoteProtocolError
from pipeline.wire import arp, ethernet

__all__ = ["InterfaceClassifier"]

_TO_PEER = FrameAction.TO_PEER
_TO_TAP = FrameAction.TO_TAP
_TO_CONTROL = FrameAction.TO_CONTROL
_RESOLVE = FrameAction.RESOLVE
_VERIFY = FrameAction.VERIFY
_UDP = 17
_NO_ADDRESS4 = b"\0\0\0\0"


class InterfaceClassifier(Classifier):
    """The TAP is this machine's: frames go to and come from ``address`` (``set_address``)."""

    mode: ClassVar[str] = "interface"

    def __init__(
        self,
        *,
        subnet: IPv4Network,
        address: IPv4Address | None,
        tap_mac: bytes,
        gateway_mac: bytes,
        gateway: IPv4Address | None = None,
        dhcp_port: int = DHCP_SERVER_PORT,
    ) -> None:
        """``address``: this node's virtual address, None until DHCP gives one.
        ``tap_mac``: the TAP's MAC, the destination of every frame delivered."""
        super().__init__(
            subnet=subnet, gateway_mac=gateway_mac, gateway=gateway, dhcp_port=dhcp_port
        )
        if len(tap_mac) != ethernet.MAC_LEN:
            raise ValueError(f"tap_mac must be {ethernet.MAC_LEN} bytes, got {len(tap_mac)}")
        self._to_tap_header = ethernet.build(tap_mac, gateway_mac, ethernet.ETHERTYPE_IPV4)
        self.set_address(address)

    @property
    def address(self) -> IPv4Address | None:
        return self._address

    def set_address(self, address: IPv4Address | None) -> None:
        """This node's virtual address (None: not known yet, the TAP waits for DHCP).
        A route to it is ignored from now on."""
        subnet = self._subnet
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
        self._use_routes()

    def _is_local(self, address4: bytes) -> bool:
        return address4 == self._address4

    def from_inside(self, frame: memoryview) -> Verdict:
        """Classify a frame read from the TAP (Ethernet header first).

        ``(TO_PEER, slot, ip_packet)`` (a slice of ``frame``, no copy, trimmed to the IPv4
        total length), ``(TO_TAP, 0, arp_reply_frame)``, ``(TO_CONTROL, 0, frame)``,
        ``(RESOLVE, 0, ip_packet)`` or ``DROPPED``.
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
            return self._not_routed(frame, dst4, header_length, total)
        except RemoteProtocolError:
            return self._drop_inside(DropReason.MALFORMED)

    def from_outside(self, peer: int, packet: memoryview) -> Verdict:
        """Classify an IPv4 packet opened from the link in slot ``peer``.

        ``(TO_TAP, 0, ethernet_frame)`` (tap_mac <- gateway_mac, one copy; bytes beyond the
        IPv4 total length left out), ``(VERIFY, peer, ip_packet)`` or ``DROPPED``.
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

    # -- the cold paths ------------------------------------------------------------------

    def _not_routed(
        self, frame: memoryview, dst4: bytes, header_length: int, total: int
    ) -> Verdict:
        """A packet from the TAP without a route: DHCP and DNS for the node itself, an
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

    def _arp_request(self, request: arp.ArpPacket, frame: memoryview) -> Verdict:
        """Any address of the subnet but ours is at the gateway MAC."""
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
