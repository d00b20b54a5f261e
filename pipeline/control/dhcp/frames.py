"""DHCP in Ethernet frames: the request read from the TAP, the reply written to it. Pure.

Built on the codecs of ``pipeline.wire``; nothing here knows DHCP beyond the ports.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from pipeline.control.dhcp.events import Reply
from pipeline.errors import RemoteProtocolError
from pipeline.wire import ethernet, ipv4, udp

__all__ = ["reply_frame", "request_from_frame"]


def request_from_frame(
    frame: bytes | memoryview, server_port: int, *, verify_udp_checksum: bool = False
) -> tuple[bytes, bytes]:
    """(UDP payload, source MAC) of an Ethernet II / IPv4 / UDP frame to ``server_port``.

    Raises ``RemoteProtocolError``: the codecs' reasons (``ethernet_truncated``,
    ``ipv4_*`` including a bad header checksum, ``udp_*``), or ``dhcp_frame_not_ipv4``,
    ``dhcp_frame_not_udp``, ``dhcp_frame_fragment``, ``dhcp_frame_wrong_port``, and with
    ``verify_udp_checksum`` ``dhcp_frame_bad_checksum`` (0, no checksum, is accepted).

    The UDP checksum is not verified by default: the frame comes from the host's own stack,
    and a stack with checksum offload hands over only the pseudo-header sum in it (a veth,
    or a TAP with offloads on). A client's unicast RENEWING requests go out that way (its
    kernel's UDP socket), unlike its broadcasts (built whole by the client): verifying
    would drop every renewal. Linux computes the IPv4 header checksum in software always.
    """
    eth = ethernet.parse(frame)
    if eth.ethertype != ethernet.ETHERTYPE_IPV4:
        raise RemoteProtocolError("dhcp_frame_not_ipv4", f"ethertype {eth.ethertype:#06x}")
    packet = memoryview(frame)[ethernet.HEADER_LEN :]
    ip = ipv4.parse(packet, verify_checksum=True)
    if ip.protocol != ipv4.Protocol.UDP:
        raise RemoteProtocolError("dhcp_frame_not_udp", f"protocol {ip.protocol}")
    if ip.flags & ipv4.FLAG_MF or ip.fragment_offset:
        raise RemoteProtocolError("dhcp_frame_fragment", f"offset {ip.fragment_offset}")
    datagram = packet[ip.header_length : ip.total_length]
    header = udp.parse(datagram)
    if header.dst_port != server_port:
        raise RemoteProtocolError("dhcp_frame_wrong_port", f"port {header.dst_port}")
    datagram = datagram[: header.length]
    if verify_udp_checksum and not udp.verify_ipv4_checksum(ip.src, ip.dst, datagram):
        raise RemoteProtocolError("dhcp_frame_bad_checksum", f"stored {header.checksum:#06x}")
    return bytes(datagram[udp.HEADER_LEN :]), eth.src


def reply_frame(
    reply: Reply,
    *,
    server_mac: bytes,
    server_address: IPv4Address,
    server_port: int = 67,
    ttl: int = 64,
) -> bytes:
    """The Ethernet frame of ``reply``: ``server_mac`` -> ``reply.dst_mac``, IPv4
    ``server_address`` -> ``reply.dst_ip``, UDP ``server_port`` -> ``server_port + 1`` with
    its checksum. ValueError on a MAC that is not 6 bytes or a port out of range."""
    datagram = udp.build(
        server_port, server_port + 1, reply.payload, src=server_address, dst=reply.dst_ip
    )
    packet = ipv4.build(
        src=server_address, dst=reply.dst_ip, protocol=ipv4.Protocol.UDP, payload=datagram, ttl=ttl
    )
    return ethernet.build(reply.dst_mac, server_mac, ethernet.ETHERTYPE_IPV4, packet)
