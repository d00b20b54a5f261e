"""Tests for the classifier of interface mode (pipeline.classifier.interface, on the shared
base in pipeline.classifier.classify): every verdict, exact output bytes, and fuzzing."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.classifier.classify import DROPPED, Classifier, DropReason, FrameAction, Verdict
from pipeline.classifier.interface import InterfaceClassifier
from pipeline.classifier.routes import Routes
from pipeline.wire import arp, ethernet, ipv4, ipv6, udp

A = IPv4Address
SUBNET = IPv4Network("100.64.0.0/16")
ME = A("100.64.0.1")
PEER3 = A("100.64.0.7")  # slot 3 also owns 100.64.1.20
PEER9 = A("100.64.2.2")
TAP_MAC = bytes.fromhex("02aabbccdd01")
GW_MAC = bytes.fromhex("02000000fe01")

# As in test_wire_codecs: Linux asking for 100.64.0.7 on the TAP.
KERNEL_ARP_REQUEST = bytes.fromhex(
    "ffffffffffff 02aabbccdd01 0806 0001 0800 06 04 0001"
    " 02aabbccdd01 64400001 000000000000 64400007"
)
# What we answer: to the asker's MAC, from the gateway MAC; "100.64.0.7 is at 02:00:00:00:fe:01".
EXPECTED_ARP_REPLY = bytes.fromhex(
    "02aabbccdd01 02000000fe01 0806 0001 0800 06 04 0002"
    " 02000000fe01 64400007 02aabbccdd01 64400001"
)


def make_classifier() -> InterfaceClassifier:
    classifier = InterfaceClassifier(subnet=SUBNET, address=ME, tap_mac=TAP_MAC, gateway_mac=GW_MAC)
    classifier.apply_routes(Routes.from_peers(5, [(3, [PEER3, A("100.64.1.20")]), (9, [PEER9])]))
    return classifier


@pytest.fixture
def classifier() -> InterfaceClassifier:
    return make_classifier()


def arp_frame(
    op: arp.ArpOp,
    sender_ip: IPv4Address,
    target_ip: IPv4Address,
    *,
    eth_dst: bytes = ethernet.BROADCAST,
    target_mac: bytes = bytes(6),
) -> memoryview:
    packet = arp.ArpPacket(op, TAP_MAC, sender_ip, target_mac, target_ip)
    return memoryview(ethernet.build(eth_dst, TAP_MAC, ethernet.ETHERTYPE_ARP, arp.build(packet)))


def udp_packet(src: IPv4Address, dst: IPv4Address, size: int = 100) -> bytes:
    payload = udp.build(40000, 5001, bytes(range(256)) * (size // 256) + bytes(size % 256))
    return ipv4.build(src=src, dst=dst, protocol=ipv4.Protocol.UDP, payload=payload)


def outbound(dst: IPv4Address, size: int = 100) -> memoryview:
    packet = udp_packet(ME, dst, size)
    return memoryview(bytearray(ethernet.build(GW_MAC, TAP_MAC, ethernet.ETHERTYPE_IPV4, packet)))


def assert_drop(
    classifier: Classifier,
    data: memoryview,
    reason: DropReason,
    *,
    peer: int | None = None,
) -> None:
    """The frame from the TAP (with ``peer``: the packet from that link) is dropped, and
    counted under ``reason`` and no other."""
    before = classifier.statistics().drops
    if peer is None:
        verdict = classifier.from_inside(data)
    else:
        verdict = classifier.from_outside(peer, data)
    after = classifier.statistics().drops
    assert verdict == DROPPED == (FrameAction.DROP, 0, b"")
    assert {r: after[r] - before[r] for r in DropReason if after[r] != before[r]} == {reason: 1}


# -- ARP -------------------------------------------------------------------------------------


def test_kernel_arp_request_gets_exact_reply(classifier: InterfaceClassifier) -> None:
    action, slot, out = classifier.from_inside(memoryview(KERNEL_ARP_REQUEST))
    assert (action, slot) == (FrameAction.TO_TAP, 0)
    assert isinstance(out, bytes)
    assert out == EXPECTED_ARP_REPLY


def test_unicast_arp_refresh_and_padding_get_the_same_reply(
    classifier: InterfaceClassifier,
) -> None:
    # The kernel re-validates a stale entry with a unicast request to the MAC it knows.
    frame = arp_frame(arp.ArpOp.REQUEST, ME, PEER3, eth_dst=GW_MAC, target_mac=GW_MAC)
    assert classifier.from_inside(frame) == (FrameAction.TO_TAP, 0, EXPECTED_ARP_REPLY)
    padded = memoryview(KERNEL_ARP_REQUEST + bytes(18))
    assert classifier.from_inside(padded) == (FrameAction.TO_TAP, 0, EXPECTED_ARP_REPLY)


def test_arp_for_unrouted_subnet_address_is_answered(classifier: InterfaceClassifier) -> None:
    action, _, out = classifier.from_inside(arp_frame(arp.ArpOp.REQUEST, ME, A("100.64.200.9")))
    assert action is FrameAction.TO_TAP
    assert isinstance(out, bytes)
    reply = arp.parse(out[14:])
    assert reply.sender_ip == A("100.64.200.9") and reply.sender_mac == GW_MAC
    assert reply.target_ip == ME and reply.target_mac == TAP_MAC


@pytest.mark.parametrize(
    ("sender", "target", "reason"),
    [
        (ME, ME, DropReason.ARP_OWN_ADDRESS),  # gratuitous
        (A("0.0.0.0"), ME, DropReason.ARP_OWN_ADDRESS),  # duplicate-address probe
        (A("100.64.0.5"), ME, DropReason.ARP_OWN_ADDRESS),
        (PEER3, PEER3, DropReason.ARP_OWN_ADDRESS),  # gratuitous for someone else's address
        (ME, A("100.65.0.1"), DropReason.ARP_NOT_FOR_SUBNET),
        (ME, A("100.64.255.255"), DropReason.ARP_NOT_FOR_SUBNET),  # subnet broadcast
        (ME, A("100.64.0.0"), DropReason.ARP_NOT_FOR_SUBNET),  # network address
    ],
)
def test_arp_requests_dropped(
    classifier: InterfaceClassifier, sender: IPv4Address, target: IPv4Address, reason: DropReason
) -> None:
    assert_drop(classifier, arp_frame(arp.ArpOp.REQUEST, sender, target), reason)


def test_arp_reply_from_stack_dropped(classifier: InterfaceClassifier) -> None:
    frame = arp_frame(arp.ArpOp.REPLY, ME, PEER3, eth_dst=GW_MAC, target_mac=GW_MAC)
    assert_drop(classifier, frame, DropReason.ARP_REPLY)


def test_malformed_arp(classifier: InterfaceClassifier) -> None:
    assert_drop(classifier, memoryview(KERNEL_ARP_REQUEST[:41]), DropReason.MALFORMED)
    wrong_htype = KERNEL_ARP_REQUEST[:15] + b"\x06" + KERNEL_ARP_REQUEST[16:]
    assert_drop(classifier, memoryview(wrong_htype), DropReason.MALFORMED)
    op_3 = KERNEL_ARP_REQUEST[:21] + b"\x03" + KERNEL_ARP_REQUEST[22:]
    assert_drop(classifier, memoryview(op_3), DropReason.MALFORMED)


# -- IPv4 outbound ---------------------------------------------------------------------------


def test_ipv4_to_routed_peer(classifier: InterfaceClassifier) -> None:
    frame = outbound(PEER3, 1400)
    action, slot, out = classifier.from_inside(frame)
    assert (action, slot) == (FrameAction.TO_PEER, 3)
    assert isinstance(out, memoryview)
    assert out == udp_packet(ME, PEER3, 1400)
    assert out.obj is frame.obj  # a slice of the frame, not a copy
    frame[-1] ^= 0xFF
    assert out[-1] == frame[-1]
    action, slot, _ = classifier.from_inside(outbound(A("100.64.1.20")))
    assert (action, slot) == (FrameAction.TO_PEER, 3)
    action, slot, _ = classifier.from_inside(outbound(PEER9))
    assert (action, slot) == (FrameAction.TO_PEER, 9)


def test_ethernet_padding_is_trimmed(classifier: InterfaceClassifier) -> None:
    small = ipv4.build(src=ME, dst=PEER9, protocol=ipv4.Protocol.ICMP, payload=bytes(8))
    frame = ethernet.build(GW_MAC, TAP_MAC, ethernet.ETHERTYPE_IPV4, small) + bytes(18)
    assert len(frame) == 60
    assert classifier.from_inside(memoryview(frame)) == (FrameAction.TO_PEER, 9, small)


@pytest.mark.parametrize(
    ("dst", "reason"),
    [
        (A("100.64.0.0"), DropReason.NO_ROUTE),
        (A("100.65.0.1"), DropReason.NOT_IN_SUBNET),
        (A("100.127.255.254"), DropReason.NOT_IN_SUBNET),
        (ME, DropReason.TO_SELF),
        (A("100.64.255.255"), DropReason.BROADCAST),
        (A("255.255.255.255"), DropReason.BROADCAST),
        (A("224.0.0.251"), DropReason.BROADCAST),
        (A("239.255.255.250"), DropReason.BROADCAST),
    ],
)
def test_ipv4_drops(classifier: InterfaceClassifier, dst: IPv4Address, reason: DropReason) -> None:
    assert_drop(classifier, outbound(dst), reason)


def test_an_address_without_a_route_goes_to_control_to_be_resolved(
    classifier: InterfaceClassifier,
) -> None:
    packet = udp_packet(ME, A("100.64.3.3"))
    frame = ethernet.build(GW_MAC, TAP_MAC, ethernet.ETHERTYPE_IPV4, packet) + bytes(4)
    assert classifier.from_inside(memoryview(frame)) == (FrameAction.RESOLVE, 0, packet)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: b"\x65" + p[1:],  # version 6 under ethertype IPv4
        lambda p: b"\x44" + p[1:],  # ihl 4
        lambda p: b"\x4f" + p[1:2] + (40).to_bytes(2, "big") + p[4:40],  # ihl 15 > total 40
        lambda p: p[:2] + (19).to_bytes(2, "big") + p[4:],  # total < header
        lambda p: p[:2] + (len(p) + 1).to_bytes(2, "big") + p[4:],  # truncated
        lambda p: p[:19],
    ],
)
def test_malformed_ipv4_from_inside(
    classifier: InterfaceClassifier, mangle: Callable[[bytes], bytes]
) -> None:
    packet = mangle(udp_packet(ME, PEER3))
    frame = ethernet.build(GW_MAC, TAP_MAC, ethernet.ETHERTYPE_IPV4, packet)
    assert_drop(classifier, memoryview(frame), DropReason.MALFORMED)


def test_routes_that_cannot_be_a_peers_are_ignored() -> None:
    classifier = InterfaceClassifier(subnet=SUBNET, address=ME, tap_mac=TAP_MAC, gateway_mac=GW_MAC)
    bad = [ME, A("100.65.0.1"), A("100.64.255.255"), A("100.64.0.0")]
    classifier.apply_routes(Routes.from_peers(8, [(4, [*bad, PEER3])]))
    assert_drop(classifier, outbound(ME), DropReason.TO_SELF)
    assert_drop(classifier, outbound(A("100.65.0.1")), DropReason.NOT_IN_SUBNET)
    assert_drop(classifier, outbound(A("100.64.255.255")), DropReason.BROADCAST)
    assert_drop(classifier, outbound(A("100.64.0.0")), DropReason.NO_ROUTE)
    assert classifier.from_inside(outbound(PEER3))[:2] == (FrameAction.TO_PEER, 4)
    stats = classifier.statistics()
    assert (stats.routes_version, stats.routes, stats.routes_ignored) == (8, 1, 4)
    assert classifier.routes.version == 8


def test_apply_routes_replaces_the_table(classifier: InterfaceClassifier) -> None:
    assert classifier.from_inside(outbound(PEER3))[:2] == (FrameAction.TO_PEER, 3)
    classifier.apply_routes(Routes.from_peers(6, [(9, [PEER9])]))
    assert classifier.from_inside(outbound(PEER3))[0] == FrameAction.RESOLVE
    assert classifier.from_inside(outbound(PEER9))[:2] == (FrameAction.TO_PEER, 9)
    assert classifier.statistics().routes_version == 6


def test_no_routes_before_the_first_table() -> None:
    classifier = InterfaceClassifier(subnet=SUBNET, address=ME, tap_mac=TAP_MAC, gateway_mac=GW_MAC)
    assert classifier.from_inside(outbound(PEER3))[0] == FrameAction.RESOLVE
    packet = udp_packet(PEER3, ME)
    assert classifier.from_outside(3, memoryview(packet)) == (FrameAction.VERIFY, 3, packet)


def test_a_sender_without_a_route_is_verified_by_control(classifier: InterfaceClassifier) -> None:
    """Its first packet (it resolved us; we have not resolved it) is not lost: control
    delivers it if the address resolves to the node of the link it came on."""
    packet = udp_packet(A("100.64.3.3"), ME)
    assert classifier.from_outside(3, memoryview(packet)) == (FrameAction.VERIFY, 3, packet)
    assert classifier.statistics().actions[FrameAction.VERIFY] == 1


# -- other ethertypes ------------------------------------------------------------------------


def ipv6_frame(next_header: int, payload: bytes) -> memoryview:
    packet = ipv6.build(
        src=IPv6Address("fe80::1"),
        dst=IPv6Address("ff02::1:ff00:2"),
        next_header=next_header,
        payload=payload,
        hop_limit=255,
    )
    return memoryview(ethernet.build(ethernet.BROADCAST, TAP_MAC, ethernet.ETHERTYPE_IPV6, packet))


@pytest.mark.parametrize("icmp_type", [133, 134, 135, 136, 137])
def test_ipv6_neighbour_discovery(classifier: InterfaceClassifier, icmp_type: int) -> None:
    frame = ipv6_frame(ipv6.NEXT_HEADER_ICMPV6, bytes([icmp_type]) + bytes(23))
    assert_drop(classifier, frame, DropReason.IPV6_NEIGHBOUR_DISCOVERY)


def test_other_ipv6(classifier: InterfaceClassifier) -> None:
    assert_drop(classifier, ipv6_frame(17, bytes(16)), DropReason.IPV6)
    assert_drop(classifier, ipv6_frame(58, bytes([128]) + bytes(7)), DropReason.IPV6)
    truncated = ipv6_frame(58, bytes([135]) + bytes(23))[:-1]
    assert_drop(classifier, truncated, DropReason.MALFORMED)


@pytest.mark.parametrize("ethertype", [ethernet.ETHERTYPE_VLAN, 0x88CC, 0x0042, 0x88E5])
def test_other_ethertypes(classifier: InterfaceClassifier, ethertype: int) -> None:
    frame = ethernet.build(ethernet.BROADCAST, TAP_MAC, ethertype, bytes(46))
    assert_drop(classifier, memoryview(frame), DropReason.NOT_IPV4)


def test_short_frames(classifier: InterfaceClassifier) -> None:
    for n in range(14):
        assert_drop(classifier, memoryview(bytes(n)), DropReason.MALFORMED)
    header_only = ethernet.build(GW_MAC, TAP_MAC, ethernet.ETHERTYPE_IPV4)
    assert_drop(classifier, memoryview(header_only), DropReason.MALFORMED)


# -- IPv4 inbound ----------------------------------------------------------------------------


def test_inbound_good_packet_becomes_exact_frame(classifier: InterfaceClassifier) -> None:
    packet = udp_packet(PEER3, ME, 1400)
    action, slot, out = classifier.from_outside(3, memoryview(bytearray(packet)))
    assert (action, slot) == (FrameAction.TO_TAP, 0)
    assert isinstance(out, bytes)
    assert out == TAP_MAC + GW_MAC + b"\x08\x00" + packet
    second_address = udp_packet(A("100.64.1.20"), ME)
    assert classifier.from_outside(3, memoryview(second_address))[0] is FrameAction.TO_TAP


def test_inbound_trailing_bytes_trimmed(classifier: InterfaceClassifier) -> None:
    packet = udp_packet(PEER9, ME)
    _, _, out = classifier.from_outside(9, memoryview(packet + b"junk"))
    assert out == TAP_MAC + GW_MAC + b"\x08\x00" + packet


@pytest.mark.parametrize(
    ("peer", "src", "dst", "reason"),
    [
        (9, PEER3, ME, DropReason.SPOOFED_SOURCE),  # slot 9 using slot 3's address
        (42, PEER3, ME, DropReason.SPOOFED_SOURCE),  # unknown slot
        (3, ME, ME, DropReason.SPOOFED_SOURCE),  # our own address
        (3, PEER3, PEER9, DropReason.WRONG_DESTINATION),
        (3, PEER3, A("100.65.0.1"), DropReason.WRONG_DESTINATION),
        (3, PEER3, A("100.64.255.255"), DropReason.BROADCAST),
        (3, PEER3, A("224.0.0.1"), DropReason.BROADCAST),
        (3, PEER3, A("255.255.255.255"), DropReason.BROADCAST),
    ],
)
def test_inbound_drops(
    classifier: InterfaceClassifier,
    peer: int,
    src: IPv4Address,
    dst: IPv4Address,
    reason: DropReason,
) -> None:
    assert_drop(classifier, memoryview(udp_packet(src, dst)), reason, peer=peer)


def test_inbound_malformed(classifier: InterfaceClassifier) -> None:
    good = udp_packet(PEER3, ME)
    for bad in (
        b"",
        good[:19],
        good[:-1],
        b"\x65" + good[1:],
        b"\x44" + good[1:],
        good[:2] + (19).to_bytes(2, "big") + good[4:],
        bytes(60),
    ):
        assert_drop(classifier, memoryview(bad), DropReason.MALFORMED, peer=3)


# -- statistics and fuzzing ------------------------------------------------------------------


def test_statistics_add_up(classifier: InterfaceClassifier) -> None:
    classifier.from_inside(memoryview(KERNEL_ARP_REQUEST))
    classifier.from_inside(outbound(PEER3))
    classifier.from_inside(outbound(PEER3))
    classifier.from_inside(outbound(A("100.64.3.3")))
    classifier.from_inside(memoryview(b"\x00"))
    classifier.from_outside(3, memoryview(udp_packet(PEER3, ME)))
    classifier.from_outside(9, memoryview(udp_packet(PEER3, ME)))
    classifier.from_outside(9, memoryview(b"\x00"))
    stats = classifier.statistics()
    assert (stats.from_inside, stats.from_outside) == (5, 3)
    assert stats.actions == {
        FrameAction.TO_PEER: 2,
        FrameAction.TO_TAP: 2,
        FrameAction.DROP: 3,
        FrameAction.TO_CONTROL: 0,
        FrameAction.RESOLVE: 1,
        FrameAction.VERIFY: 0,
        FrameAction.CLAIM: 0,
    }
    assert stats.drops[DropReason.MALFORMED] == 2
    assert stats.drops[DropReason.SPOOFED_SOURCE] == 1
    assert sum(stats.drops.values()) == stats.actions[FrameAction.DROP]
    assert set(stats.drops) == set(DropReason)
    assert (stats.routes_version, stats.routes, stats.routes_ignored) == (5, 3, 0)
    stats.drops[DropReason.MALFORMED] = 99  # a copy: the classifier's counters are unaffected
    assert classifier.statistics().drops[DropReason.MALFORMED] == 2


def frame_like() -> st.SearchStrategy[bytes]:
    """Random bytes, half of them behind a plausible Ethernet header to get past the ethertype."""
    ethertypes = st.sampled_from([0x0800, 0x0806, 0x86DD, 0x8100]).map(
        lambda t: t.to_bytes(2, "big")
    )
    headed = st.tuples(st.binary(min_size=12, max_size=12), ethertypes, st.binary(max_size=80))
    return st.one_of(st.binary(max_size=100), headed.map(lambda parts: b"".join(parts)))


def ip_like() -> st.SearchStrategy[bytes]:
    versioned = st.tuples(
        st.sampled_from([b"\x45", b"\x46", b"\x4f", b"\x60"]), st.binary(max_size=80)
    )
    return st.one_of(st.binary(max_size=100), versioned.map(lambda parts: b"".join(parts)))


def assert_typed(verdict: Verdict, peer: int) -> None:
    """A verdict's three parts have their types, and ``peer`` is a link slot only where the
    record belongs to a link: to a routed peer, or from the sending one."""
    action, slot, out = verdict
    assert type(action) is FrameAction and type(slot) is int and type(out) in (bytes, memoryview)
    if action is FrameAction.DROP:
        assert verdict is DROPPED
    elif action is FrameAction.TO_PEER:
        assert slot in (3, 9) and len(out) >= 20
    elif action is FrameAction.VERIFY:
        assert slot == peer and len(out) >= 20
    else:
        assert slot == 0 and len(out) >= 20


@settings(max_examples=400)
@given(
    st.lists(
        st.one_of(
            frame_like().map(lambda b: ("in", 0, b)),
            st.tuples(st.just("out"), st.sampled_from([0, 3, 9, 65535]), ip_like()),
        ),
        max_size=20,
    )
)
def test_fuzz_never_raises_and_always_counts(calls: list[tuple[str, int, bytes]]) -> None:
    classifier = make_classifier()
    inside = outside = 0
    for direction, peer, data in calls:
        view = memoryview(bytearray(data))
        if direction == "in":
            verdict = classifier.from_inside(view)
            inside += 1
        else:
            verdict = classifier.from_outside(peer, view)
            outside += 1
        assert_typed(verdict, peer)
    stats = classifier.statistics()
    assert (stats.from_inside, stats.from_outside) == (inside, outside)
    assert sum(stats.actions.values()) == inside + outside
    assert sum(stats.drops.values()) == stats.actions[FrameAction.DROP]


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_valid_frames(data: st.DataObject) -> None:
    classifier = make_classifier()
    samples = [
        KERNEL_ARP_REQUEST,
        bytes(outbound(PEER3)),
        bytes(ipv6_frame(58, bytes([135]) + bytes(23))),
    ]
    frame = bytearray(data.draw(st.sampled_from(samples)))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    end = data.draw(st.integers(0, len(frame)))
    classifier.from_inside(memoryview(frame)[:end])
    packet = bytearray(udp_packet(PEER3, ME))
    packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    classifier.from_outside(3, memoryview(packet)[: data.draw(st.integers(0, len(packet)))])
    stats = classifier.statistics()
    assert (stats.from_inside, stats.from_outside) == (1, 1)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        InterfaceClassifier(
            subnet=SUBNET, address=A("100.65.0.1"), tap_mac=TAP_MAC, gateway_mac=GW_MAC
        )
    with pytest.raises(ValueError):
        InterfaceClassifier(
            subnet=SUBNET, address=A("100.64.0.0"), tap_mac=TAP_MAC, gateway_mac=GW_MAC
        )
    with pytest.raises(ValueError):
        InterfaceClassifier(subnet=SUBNET, address=ME, tap_mac=TAP_MAC[:5], gateway_mac=GW_MAC)


def test_small_subnets_have_no_broadcast() -> None:
    # /31: both addresses are hosts (RFC 3021).
    classifier = InterfaceClassifier(
        subnet=IPv4Network("100.64.0.0/31"),
        address=A("100.64.0.0"),
        tap_mac=TAP_MAC,
        gateway_mac=GW_MAC,
    )
    peer = A("100.64.0.1")
    classifier.apply_routes(Routes.from_peers(1, [(2, [peer])]))
    frame = ethernet.build(GW_MAC, TAP_MAC, 0x0800, udp_packet(A("100.64.0.0"), peer))
    assert classifier.from_inside(memoryview(frame))[:2] == (FrameAction.TO_PEER, 2)
    assert (
        classifier.from_inside(arp_frame(arp.ArpOp.REQUEST, A("100.64.0.0"), peer))[0]
        is FrameAction.TO_TAP
    )


# -- the node's own services: DHCP, DNS at the gateway, and no address yet ---------------------

GATEWAY = A("100.64.255.254")


def service_frame(src: IPv4Address, dst: IPv4Address, src_port: int, dst_port: int) -> memoryview:
    datagram = udp.build(src_port, dst_port, b"query")
    packet = ipv4.build(src=src, dst=dst, protocol=ipv4.Protocol.UDP, payload=datagram)
    return memoryview(ethernet.build(GW_MAC, TAP_MAC, ethernet.ETHERTYPE_IPV4, packet))


def gateway_classifier(address: IPv4Address | None = ME) -> InterfaceClassifier:
    return InterfaceClassifier(
        subnet=SUBNET, address=address, tap_mac=TAP_MAC, gateway_mac=GW_MAC, gateway=GATEWAY
    )


def test_dhcp_and_dns_to_the_gateway_go_to_control() -> None:
    classifier = gateway_classifier()
    dhcp = service_frame(A("0.0.0.0"), A("255.255.255.255"), 68, 67)
    assert classifier.from_inside(dhcp) == (FrameAction.TO_CONTROL, 0, dhcp)
    dns = service_frame(ME, GATEWAY, 5353, 53)
    assert classifier.from_inside(dns) == (FrameAction.TO_CONTROL, 0, dns)
    other_dns = service_frame(ME, PEER3, 5353, 53)  # a resolver elsewhere: ordinary traffic
    assert classifier.from_inside(other_dns)[0] == FrameAction.RESOLVE
    assert_drop(classifier, service_frame(ME, GATEWAY, 5353, 80), DropReason.TO_GATEWAY)
    assert classifier.statistics().actions[FrameAction.TO_CONTROL] == 2


def test_without_an_address_only_dhcp_leaves_and_the_address_can_come_later() -> None:
    classifier = gateway_classifier(None)
    dhcp = service_frame(A("0.0.0.0"), A("255.255.255.255"), 68, 67)
    assert classifier.from_inside(dhcp)[0] == FrameAction.TO_CONTROL
    assert_drop(classifier, outbound(PEER3), DropReason.NO_ADDRESS)
    classifier.set_address(ME)
    assert classifier.address == ME
    assert classifier.from_inside(outbound(PEER3))[0] == FrameAction.RESOLVE
    with pytest.raises(ValueError):
        classifier.set_address(A("100.65.0.1"))


def test_a_route_to_the_address_given_later_is_ignored_from_then_on() -> None:
    classifier = gateway_classifier(None)
    classifier.apply_routes(Routes.from_peers(1, [(3, [ME, PEER3])]))
    classifier.set_address(ME)
    assert_drop(classifier, outbound(ME), DropReason.TO_SELF)
    assert classifier.from_inside(outbound(PEER3))[:2] == (FrameAction.TO_PEER, 3)
    assert classifier.statistics().routes_ignored == 1


def test_an_arp_probe_is_not_answered() -> None:
    """RFC 5227: a host probing an address it was offered must hear no one claim it."""
    classifier = gateway_classifier()
    probe = arp_frame(arp.ArpOp.REQUEST, sender_ip=A("0.0.0.0"), target_ip=A("100.64.0.9"))
    assert_drop(classifier, memoryview(probe), DropReason.ARP_PROBE)
