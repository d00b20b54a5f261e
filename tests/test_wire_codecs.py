"""Tests for the pipeline.wire codecs: golden frames, round trips, and fuzzing of every parser."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import RemoteProtocolError
from pipeline.wire import arp, ethernet, ipv4, ipv6, udp

ROOT = Path(__file__).resolve().parent.parent
PURE_MODULES = [
    "pipeline/wire/ethernet.py",
    "pipeline/wire/arp.py",
    "pipeline/wire/ipv4.py",
    "pipeline/wire/ipv6.py",
    "pipeline/wire/udp.py",
    "pipeline/classifier/classify.py",
    "pipeline/classifier/routes.py",
]
FORBIDDEN_IMPORTS = {"socket", "zmq", "asyncio", "time", "os", "threading", "secrets", "random"}

HOST_MAC = bytes.fromhex("02aabbccdd01")
A1 = IPv4Address("100.64.0.1")
A2 = IPv4Address("100.64.0.2")

# The ARP request Linux sends on the TAP when 100.64.0.1 looks for 100.64.0.7: broadcast
# Ethernet destination, target hardware address all zeros, no padding (42 bytes).
KERNEL_ARP_REQUEST = bytes.fromhex(
    "ffffffffffff 02aabbccdd01 0806"  # Ethernet: dst, src, ethertype ARP
    " 0001 0800 06 04 0001"  # htype, ptype, hlen, plen, op=request
    " 02aabbccdd01 64400001"  # sender MAC, sender IP 100.64.0.1
    " 000000000000 64400007"  # target MAC (unknown), target IP 100.64.0.7
)

# 100.64.0.1:12345 -> 100.64.0.2:5001, UDP "hello", id 0x1c46, DF, TTL 64. Checksums by hand:
#   IPv4: 4500+0021+1c46+4000+4011+6440+0001+6440+0002 = 1a9fb -> a9fc -> ~ = 5603
#   UDP:  pseudo 6440+0001+6440+0002+0011+000d, header 3039+1389+000d, data 6865+6c6c+6f00
#         = 25041 -> 5043 -> ~ = afbc
GOLDEN_UDP_PACKET = bytes.fromhex(
    "4500 0021 1c46 4000 4011 5603 64400001 64400002"  # IPv4 header
    " 3039 1389 000d afbc 68656c6c6f"  # UDP header, "hello"
)

# Link-local fe80::1 -> ff02::1:ff00:2, ICMPv6 neighbour solicitation (type 135), 32 bytes.
ND_SOLICITATION = bytes.fromhex(
    "60000000 0020 3a ff"  # version 6, traffic class and flow label 0, length 32, ICMPv6, hop limit
    " fe80000000000000 0000000000000001"  # src fe80::1
    " ff02000000000000 00000001ff000002"  # dst ff02::1:ff00:2 (solicited-node)
    " 87 00 0000 00000000"  # type 135, code, checksum (not checked here), reserved
    " fe800000000000000000000000000002"  # target fe80::2
    " 01 01 02aabbccdd01"  # option: source link-layer address
)


def reference_checksum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way: add 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# -- golden frames ---------------------------------------------------------------------------


def test_kernel_arp_request_parses() -> None:
    eth = ethernet.parse(KERNEL_ARP_REQUEST)
    assert eth == ethernet.EthernetHeader(ethernet.BROADCAST, HOST_MAC, ethernet.ETHERTYPE_ARP)
    packet = arp.parse(memoryview(KERNEL_ARP_REQUEST)[ethernet.HEADER_LEN :])
    assert packet == arp.ArpPacket(
        op=arp.ArpOp.REQUEST,
        sender_mac=HOST_MAC,
        sender_ip=A1,
        target_mac=bytes(6),
        target_ip=IPv4Address("100.64.0.7"),
    )
    rebuilt = ethernet.build(eth.dst, eth.src, eth.ethertype, arp.build(packet))
    assert rebuilt == KERNEL_ARP_REQUEST


def test_arp_padded_to_minimum_frame_parses() -> None:
    padded = KERNEL_ARP_REQUEST + bytes(60 - len(KERNEL_ARP_REQUEST))
    assert arp.parse(padded[14:]) == arp.parse(KERNEL_ARP_REQUEST[14:])


def test_build_reply() -> None:
    request = arp.parse(KERNEL_ARP_REQUEST[14:])
    gateway = bytes.fromhex("02000000fe01")
    reply = arp.build_reply(request, gateway)
    assert arp.build(reply) == bytes.fromhex(
        "0001 0800 06 04 0002 02000000fe01 64400007 02aabbccdd01 64400001"
    )
    with pytest.raises(ValueError):
        arp.build_reply(reply, gateway)


def test_golden_ipv4_udp_packet() -> None:
    header = ipv4.parse(GOLDEN_UDP_PACKET, verify_checksum=True)
    assert header == ipv4.IPv4Header(
        version=4,
        ihl=5,
        tos=0,
        total_length=33,
        identification=0x1C46,
        flags=ipv4.FLAG_DF,
        fragment_offset=0,
        ttl=64,
        protocol=ipv4.Protocol.UDP,
        checksum=0x5603,
        src=A1,
        dst=A2,
    )
    assert header.header_length == 20
    assert ipv4.checksum(GOLDEN_UDP_PACKET[:20]) == 0
    assert reference_checksum(GOLDEN_UDP_PACKET[:10] + b"\0\0" + GOLDEN_UDP_PACKET[12:20]) == 0x5603

    datagram = GOLDEN_UDP_PACKET[20:]
    assert udp.parse(datagram) == udp.UdpHeader(12345, 5001, 13, 0xAFBC)
    assert udp.verify_ipv4_checksum(A1, A2, datagram)
    assert udp.ipv4_checksum(A1, A2, datagram) == 0
    pseudo = A1.packed + A2.packed + bytes([0, 17, 0, 13])
    assert reference_checksum(pseudo + datagram[:6] + b"\0\0" + datagram[8:]) == 0xAFBC

    rebuilt = ipv4.build(
        src=A1,
        dst=A2,
        protocol=ipv4.Protocol.UDP,
        identification=0x1C46,
        flags=ipv4.FLAG_DF,
        payload=udp.build(12345, 5001, b"hello", src=A1, dst=A2),
    )
    assert rebuilt == GOLDEN_UDP_PACKET


def test_corrupted_checksums_detected() -> None:
    bad = bytearray(GOLDEN_UDP_PACKET)
    bad[11] ^= 1
    with pytest.raises(RemoteProtocolError) as info:
        ipv4.parse(bytes(bad), verify_checksum=True)
    assert info.value.reason == "ipv4_bad_checksum"
    ipv4.parse(bytes(bad))  # not checked unless asked
    bad_udp = bytearray(GOLDEN_UDP_PACKET[20:])
    bad_udp[-1] ^= 0x40
    assert not udp.verify_ipv4_checksum(A1, A2, bytes(bad_udp))
    no_checksum = GOLDEN_UDP_PACKET[20:26] + b"\0\0" + GOLDEN_UDP_PACKET[28:]
    assert udp.verify_ipv4_checksum(A1, A2, no_checksum)


def test_golden_neighbour_solicitation() -> None:
    header = ipv6.parse(ND_SOLICITATION)
    assert header == ipv6.IPv6Header(
        version=6,
        traffic_class=0,
        flow_label=0,
        payload_length=32,
        next_header=ipv6.NEXT_HEADER_ICMPV6,
        hop_limit=255,
        src=IPv6Address("fe80::1"),
        dst=IPv6Address("ff02::1:ff00:2"),
    )
    assert ipv6.is_neighbour_discovery(ND_SOLICITATION)
    assert ipv6.is_neighbour_discovery(memoryview(bytearray(ND_SOLICITATION)))


@pytest.mark.parametrize("icmp_type", [128, 129, 132, 138, 143])
def test_other_icmpv6_is_not_neighbour_discovery(icmp_type: int) -> None:
    packet = ND_SOLICITATION[:40] + bytes([icmp_type]) + ND_SOLICITATION[41:]
    assert not ipv6.is_neighbour_discovery(packet)


def test_neighbour_discovery_needs_icmpv6_directly() -> None:
    hop_by_hop = ND_SOLICITATION[:6] + b"\x00" + ND_SOLICITATION[7:]
    assert not ipv6.is_neighbour_discovery(hop_by_hop)
    assert not ipv6.is_neighbour_discovery(ND_SOLICITATION[:40])
    assert not ipv6.is_neighbour_discovery(b"")


def test_ipv4_validation_reasons() -> None:
    def reason(packet: bytes) -> str:
        with pytest.raises(RemoteProtocolError) as info:
            ipv4.parse(packet)
        return info.value.reason

    p = GOLDEN_UDP_PACKET
    assert reason(p[:19]) == "ipv4_truncated"
    assert reason(b"\x65" + p[1:]) == "ipv4_bad_version"
    assert reason(b"\x44" + p[1:]) == "ipv4_bad_header_length"
    assert reason(b"\x4f" + p[1:]) == "ipv4_truncated"  # 60-byte header in 33 bytes
    assert reason(p[:2] + (19).to_bytes(2, "big") + p[4:]) == "ipv4_bad_total_length"
    assert reason(p[:2] + (34).to_bytes(2, "big") + p[4:]) == "ipv4_truncated"
    assert ipv4.parse(p + bytes(27)).total_length == 33  # link padding is fine


def test_address_accessors() -> None:
    view = memoryview(GOLDEN_UDP_PACKET)
    assert ipv4.src_bytes(view) == A1.packed
    assert ipv4.dst_bytes(view) == A2.packed
    assert type(ipv4.dst_bytes(view)) is bytes
    for bad in (view[:19], memoryview(ND_SOLICITATION)):
        with pytest.raises(RemoteProtocolError):
            ipv4.dst_bytes(bad)
        with pytest.raises(RemoteProtocolError):
            ipv4.src_bytes(bad)


def test_udp_length_validation() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        udp.parse(bytes.fromhex("303913890007afbc"))
    assert info.value.reason == "udp_bad_length"
    with pytest.raises(RemoteProtocolError) as info:
        udp.parse(GOLDEN_UDP_PACKET[20:-1])
    assert info.value.reason == "udp_truncated"


def test_mac_strings() -> None:
    assert ethernet.mac_to_str(HOST_MAC) == "02:aa:bb:cc:dd:01"
    assert ethernet.mac_from_str("02:AA:bb:cc:dd:01") == HOST_MAC
    assert ethernet.mac_from_str("02-aa-bb-cc-dd-01") == HOST_MAC
    for bad in (
        "",
        "02:aa:bb:cc:dd",
        "02:aa:bb:cc:dd:01:02",
        "2:aa:bb:cc:dd:01",
        "0x:aa:bb:cc:dd:01",
    ):
        with pytest.raises(ValueError):
            ethernet.mac_from_str(bad)
    with pytest.raises(ValueError):
        ethernet.mac_to_str(b"\x01\x02")


def test_builders_reject_bad_fields() -> None:
    with pytest.raises(ValueError):
        ethernet.build(b"\x00" * 5, HOST_MAC, 0x0800)
    with pytest.raises(ValueError):
        ethernet.build(HOST_MAC, HOST_MAC, 0x10000)
    with pytest.raises(ValueError):
        ipv4.build(src=A1, dst=A2, protocol=17, ttl=256)
    with pytest.raises(ValueError):
        ipv4.build(src=A1, dst=A2, protocol=17, options=b"\x01\x02")
    with pytest.raises(ValueError):
        ipv4.build(src=A1, dst=A2, protocol=17, payload=bytes(65516))
    with pytest.raises(ValueError):
        udp.build(70000, 1)
    with pytest.raises(ValueError):
        ipv6.build(src=IPv6Address("fe80::1"), dst=IPv6Address("fe80::2"), next_header=256)
    bad_arp = arp.ArpPacket(arp.ArpOp.REQUEST, b"\x01", A1, bytes(6), A2)
    with pytest.raises(ValueError):
        arp.build(bad_arp)


# -- checksum ----------------------------------------------------------------------------------


@given(st.binary(max_size=300))
def test_checksum_matches_reference(data: bytes) -> None:
    assert ipv4.checksum(data) == reference_checksum(data)
    assert ipv4.checksum(memoryview(bytearray(data))) == reference_checksum(data)


@pytest.mark.parametrize(
    "data", [b"", b"\x00", b"\x00\x00\x00", b"\xff\xff", b"\xff\xff\xff\xff", b"\xff", b"\x00\x01"]
)
def test_checksum_edge_cases(data: bytes) -> None:
    assert ipv4.checksum(data) == reference_checksum(data)


# -- round trips -------------------------------------------------------------------------------

macs = st.binary(min_size=6, max_size=6)
ipv4_addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))
ipv6_addresses = st.builds(IPv6Address, st.integers(0, 2**128 - 1))
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


@given(macs, macs, u16, st.binary(max_size=64))
def test_ethernet_round_trip(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> None:
    frame = ethernet.build(dst, src, ethertype, payload)
    assert ethernet.parse(memoryview(frame)) == ethernet.EthernetHeader(dst, src, ethertype)
    assert frame[ethernet.HEADER_LEN :] == payload
    assert ethernet.mac_from_str(ethernet.mac_to_str(dst)) == dst


arp_packets = st.builds(
    arp.ArpPacket,
    op=st.sampled_from(arp.ArpOp),
    sender_mac=macs,
    sender_ip=ipv4_addresses,
    target_mac=macs,
    target_ip=ipv4_addresses,
)


@given(arp_packets)
def test_arp_round_trip(packet: arp.ArpPacket) -> None:
    data = arp.build(packet)
    assert len(data) == arp.PACKET_LEN
    assert arp.parse(data) == packet


@given(
    src=ipv4_addresses,
    dst=ipv4_addresses,
    protocol=u8,
    ttl=u8,
    tos=u8,
    identification=u16,
    flags=st.integers(0, 7),
    fragment_offset=st.integers(0, 0x1FFF),
    options=st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
    payload=st.binary(max_size=200),
)
def test_ipv4_round_trip(
    src: IPv4Address,
    dst: IPv4Address,
    protocol: int,
    ttl: int,
    tos: int,
    identification: int,
    flags: int,
    fragment_offset: int,
    options: bytes,
    payload: bytes,
) -> None:
    packet = ipv4.build(
        src=src,
        dst=dst,
        protocol=protocol,
        payload=payload,
        ttl=ttl,
        tos=tos,
        identification=identification,
        flags=flags,
        fragment_offset=fragment_offset,
        options=options,
    )
    header = ipv4.parse(memoryview(packet), verify_checksum=True)
    hl = 20 + len(options)
    assert header == ipv4.IPv4Header(
        version=4,
        ihl=hl // 4,
        tos=tos,
        total_length=hl + len(payload),
        identification=identification,
        flags=flags,
        fragment_offset=fragment_offset,
        ttl=ttl,
        protocol=protocol,
        checksum=header.checksum,
        src=src,
        dst=dst,
    )
    zeroed = packet[:10] + b"\0\0" + packet[12:hl]
    assert header.checksum == reference_checksum(zeroed)
    assert packet[20:hl] == options and packet[hl:] == payload
    assert ipv4.src_bytes(packet) == src.packed and ipv4.dst_bytes(packet) == dst.packed


@given(
    src=ipv6_addresses,
    dst=ipv6_addresses,
    next_header=u8,
    hop_limit=u8,
    traffic_class=u8,
    flow_label=st.integers(0, 0xFFFFF),
    payload=st.binary(max_size=100),
)
def test_ipv6_round_trip(
    src: IPv6Address,
    dst: IPv6Address,
    next_header: int,
    hop_limit: int,
    traffic_class: int,
    flow_label: int,
    payload: bytes,
) -> None:
    packet = ipv6.build(
        src=src,
        dst=dst,
        next_header=next_header,
        payload=payload,
        hop_limit=hop_limit,
        traffic_class=traffic_class,
        flow_label=flow_label,
    )
    assert ipv6.parse(packet) == ipv6.IPv6Header(
        6, traffic_class, flow_label, len(payload), next_header, hop_limit, src, dst
    )


@given(u16, u16, st.binary(max_size=200), ipv4_addresses, ipv4_addresses)
def test_udp_round_trip(
    src_port: int, dst_port: int, payload: bytes, src: IPv4Address, dst: IPv4Address
) -> None:
    plain = udp.build(src_port, dst_port, payload)
    assert udp.parse(plain) == udp.UdpHeader(src_port, dst_port, 8 + len(payload), 0)
    summed = udp.build(src_port, dst_port, payload, src=src, dst=dst)
    header = udp.parse(memoryview(summed))
    assert header.checksum != 0
    assert udp.verify_ipv4_checksum(src, dst, summed)
    pseudo = src.packed + dst.packed + bytes([0, 17]) + len(plain).to_bytes(2, "big")
    assert (reference_checksum(pseudo + plain) or 0xFFFF) == header.checksum


# -- fuzzing: only RemoteProtocolError, never anything else -----------------------------------

Parser = Callable[[bytes | memoryview], object]

PARSERS: list[Parser] = [
    ethernet.parse,
    arp.parse,
    ipv4.parse,
    lambda b: ipv4.parse(b, verify_checksum=True),
    ipv4.src_bytes,
    ipv4.dst_bytes,
    ipv6.parse,
    ipv6.is_neighbour_discovery,
    udp.parse,
]


def parse_or_reject(parser: Parser, data: bytes | memoryview) -> None:
    try:
        parser(data)
    except RemoteProtocolError as exc:
        assert exc.reason and exc.reason.isidentifier()


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_random_bytes_only_remote_protocol_error(data: bytes) -> None:
    for parser in PARSERS:
        parse_or_reject(parser, data)
        parse_or_reject(parser, memoryview(bytearray(data)))


VALID_SAMPLES = [
    KERNEL_ARP_REQUEST,
    KERNEL_ARP_REQUEST[14:],
    GOLDEN_UDP_PACKET,
    GOLDEN_UDP_PACKET[20:],
    ND_SOLICITATION,
    ipv4.build(src=A1, dst=A2, protocol=6, options=bytes(40), payload=bytes(10)),
]


@pytest.mark.parametrize("sample", VALID_SAMPLES)
def test_every_truncation_only_remote_protocol_error(sample: bytes) -> None:
    view = memoryview(sample)
    for end in range(len(sample) + 1):
        for parser in PARSERS:
            parse_or_reject(parser, sample[:end])
            parse_or_reject(parser, view[:end])


@settings(max_examples=300)
@given(st.sampled_from(VALID_SAMPLES), st.data())
def test_mutated_packets_only_remote_protocol_error(sample: bytes, data: st.DataObject) -> None:
    mutated = bytearray(sample)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(u8)
    for parser in PARSERS:
        parse_or_reject(parser, bytes(mutated))
