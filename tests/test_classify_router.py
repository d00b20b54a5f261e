"""Tests for the classifier in router mode: the TAP is a port of a cluster segment's bridge, with
three machines behind it that hold leases from this node, and a physical network beside them."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.classifier.classify import DropReason, FrameAction
from pipeline.classifier.interface import InterfaceClassifier
from pipeline.classifier.router import LocalHosts, RouterClassifier
from pipeline.classifier.routes import Routes
from pipeline.wire import arp, ethernet, ipv4, udp
from tests.test_classify import assert_drop, assert_typed

A = IPv4Address
SUBNET = IPv4Network("100.64.0.0/24")
GATEWAY = A("100.64.0.254")
TAP_MAC = bytes.fromhex("02aabbccdd00")  # the router's own TAP: no frame is addressed to it
GW_MAC = bytes.fromhex("02000000fe01")
DHCP_PORT = 1067  # a physical DHCP server answers on 67 on the same segment

# The machines on the segment, with their leases.
M1, M2, M3 = A("100.64.0.11"), A("100.64.0.12"), A("100.64.0.13")
MAC1, MAC2, MAC3 = (bytes.fromhex(f"0200000000{n}") for n in ("11", "12", "13"))
LEASES = [(M1, MAC1), (M2, MAC2), (M3, MAC3)]
# Remote virtual addresses: two routed through peers, one not resolved yet, one unleased.
R3, R9, UNROUTED, UNLEASED = A("100.64.0.21"), A("100.64.0.22"), A("100.64.0.30"), A("100.64.0.40")
# The physical network on the same segment.
PHYS, PHYS_SERVER = A("198.18.0.5"), A("198.18.0.1")
PHYS_MAC = bytes.fromhex("020000000099")
NEW_MAC = bytes.fromhex("0200000000aa")  # a machine that has no lease yet


def make_router(dhcp_port: int = DHCP_PORT, *, allow_static: bool = False) -> RouterClassifier:
    router = RouterClassifier(
        subnet=SUBNET,
        gateway_mac=GW_MAC,
        gateway=GATEWAY,
        dhcp_port=dhcp_port,
        allow_static=allow_static,
    )
    router.apply_routes(Routes.from_peers(4, [(3, [R3]), (9, [R9])]))
    router.apply_local(LocalHosts.from_leases(1, LEASES))
    return router


@pytest.fixture
def router() -> RouterClassifier:
    return make_router()


def arp_request(
    sender_mac: bytes, sender_ip: IPv4Address, target_ip: IPv4Address, op: int = arp.ArpOp.REQUEST
) -> memoryview:
    packet = arp.ArpPacket(arp.ArpOp(op), sender_mac, sender_ip, bytes(6), target_ip)
    frame = ethernet.build(
        ethernet.BROADCAST, sender_mac, ethernet.ETHERTYPE_ARP, arp.build(packet)
    )
    return memoryview(frame)


def udp_packet(src: IPv4Address, dst: IPv4Address, dst_port: int = 5001, size: int = 100) -> bytes:
    payload = udp.build(40000, dst_port, bytes(range(256)) * (size // 256) + bytes(size % 256))
    return ipv4.build(src=src, dst=dst, protocol=ipv4.Protocol.UDP, payload=payload)


def ip_frame(
    src_mac: bytes,
    src: IPv4Address,
    dst: IPv4Address,
    dst_port: int = 5001,
    *,
    dst_mac: bytes = GW_MAC,
    size: int = 100,
) -> memoryview:
    packet = udp_packet(src, dst, dst_port, size)
    return memoryview(bytearray(ethernet.build(dst_mac, src_mac, ethernet.ETHERTYPE_IPV4, packet)))


# -- ARP on the segment ----------------------------------------------------------------------


@pytest.mark.parametrize("target", [R3, UNROUTED, GATEWAY])
def test_arp_for_a_remote_address_is_answered_with_the_gateway_mac(
    router: RouterClassifier, target: IPv4Address
) -> None:
    reply_packet = arp.ArpPacket(arp.ArpOp.REPLY, GW_MAC, target, MAC2, M2)
    expected = ethernet.build(MAC2, GW_MAC, ethernet.ETHERTYPE_ARP, arp.build(reply_packet))
    assert router.from_inside(arp_request(MAC2, M2, target)) == (FrameAction.TO_TAP, 0, expected)


@pytest.mark.parametrize(
    ("sender_mac", "sender", "target", "reason"),
    [
        (MAC1, M1, M2, DropReason.ARP_LOCAL),  # M2 answers for itself
        (MAC3, M3, M1, DropReason.ARP_LOCAL),
        (MAC1, M1, M1, DropReason.ARP_LOCAL),  # gratuitous, from a local machine
        (NEW_MAC, A("0.0.0.0"), M3, DropReason.ARP_LOCAL),  # a probe for a leased address
        (PHYS_MAC, PHYS, M1, DropReason.ARP_LOCAL),
        (PHYS_MAC, PHYS, PHYS_SERVER, DropReason.ARP_NOT_FOR_SUBNET),  # the physical network's
        (MAC1, M1, PHYS_SERVER, DropReason.ARP_NOT_FOR_SUBNET),
        (MAC1, M1, A("100.64.0.0"), DropReason.ARP_NOT_FOR_SUBNET),  # network address
        (MAC1, M1, A("100.64.0.255"), DropReason.ARP_NOT_FOR_SUBNET),  # broadcast address
        (PHYS_MAC, PHYS, R3, DropReason.ARP_FOREIGN_SENDER),
        (NEW_MAC, UNLEASED, R3, DropReason.ARP_FOREIGN_SENDER),  # a virtual address, unleased
        (MAC2, M1, R3, DropReason.SPOOFED_LOCAL),  # M1's address from M2's MAC
        (NEW_MAC, A("0.0.0.0"), R3, DropReason.ARP_PROBE),
        (NEW_MAC, UNLEASED, UNLEASED, DropReason.ARP_OWN_ADDRESS),  # gratuitous, not local
    ],
)
def test_arp_requests_not_answered(
    router: RouterClassifier,
    sender_mac: bytes,
    sender: IPv4Address,
    target: IPv4Address,
    reason: DropReason,
) -> None:
    assert_drop(router, arp_request(sender_mac, sender, target), reason)


def test_arp_replies_on_the_segment_are_not_ours(router: RouterClassifier) -> None:
    reply = arp_request(MAC2, M2, M1, op=arp.ArpOp.REPLY)
    assert_drop(router, reply, DropReason.ARP_REPLY)


# -- DHCP and DNS for control ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_mac", "src", "dst"),
    [
        (NEW_MAC, A("0.0.0.0"), A("255.255.255.255")),  # a machine without a lease
        (MAC1, M1, GATEWAY),  # a renewal, unicast
        (PHYS_MAC, PHYS, A("255.255.255.255")),  # anyone on the segment
    ],
)
def test_dhcp_on_the_configured_port_goes_to_control(
    router: RouterClassifier, src_mac: bytes, src: IPv4Address, dst: IPv4Address
) -> None:
    frame = ip_frame(src_mac, src, dst, DHCP_PORT, dst_mac=ethernet.BROADCAST)
    assert router.from_inside(frame) == (FrameAction.TO_CONTROL, 0, frame)


def test_dhcp_on_port_67_belongs_to_the_physical_server(router: RouterClassifier) -> None:
    assert router.dhcp_port == DHCP_PORT
    discover = ip_frame(NEW_MAC, A("0.0.0.0"), A("255.255.255.255"), 67)
    assert_drop(router, discover, DropReason.NOT_LEASED)
    renewal = ip_frame(PHYS_MAC, PHYS, PHYS_SERVER, 67)
    assert_drop(router, renewal, DropReason.NOT_LEASED)
    assert router.statistics().actions[FrameAction.TO_CONTROL] == 0


def test_the_default_dhcp_port_is_67() -> None:
    router = make_router(67)
    discover = ip_frame(NEW_MAC, A("0.0.0.0"), A("255.255.255.255"), 67)
    assert router.from_inside(discover)[0] is FrameAction.TO_CONTROL
    assert_drop(router, ip_frame(NEW_MAC, A("0.0.0.0"), GATEWAY, 1067), DropReason.NOT_LEASED)


def test_interface_mode_takes_the_dhcp_port_too() -> None:
    classifier = InterfaceClassifier(
        subnet=SUBNET, address=None, tap_mac=TAP_MAC, gateway_mac=GW_MAC, dhcp_port=1067
    )
    assert classifier.mode == "interface"
    dhcp = ip_frame(TAP_MAC, A("0.0.0.0"), A("255.255.255.255"), 1067)
    assert classifier.from_inside(dhcp) == (FrameAction.TO_CONTROL, 0, dhcp)
    other = ip_frame(TAP_MAC, A("0.0.0.0"), A("255.255.255.255"), 67)
    assert_drop(classifier, other, DropReason.NO_ADDRESS)


def test_dns_at_the_gateway_from_a_local_machine_goes_to_control(router: RouterClassifier) -> None:
    dns = ip_frame(MAC3, M3, GATEWAY, 53)
    assert router.from_inside(dns) == (FrameAction.TO_CONTROL, 0, dns)
    assert_drop(router, ip_frame(MAC3, M3, GATEWAY, 80), DropReason.TO_GATEWAY)
    assert_drop(router, ip_frame(PHYS_MAC, PHYS, GATEWAY, 53), DropReason.NOT_LEASED)
    assert_drop(router, ip_frame(MAC1, M3, GATEWAY, 53), DropReason.SPOOFED_LOCAL)


# -- IPv4 from the segment -------------------------------------------------------------------


def test_local_to_a_routed_remote_goes_to_its_peer(router: RouterClassifier) -> None:
    frame = ip_frame(MAC1, M1, R3, size=1400)
    action, slot, out = router.from_inside(frame)
    assert (action, slot) == (FrameAction.TO_PEER, 3)
    assert isinstance(out, memoryview)
    assert out == udp_packet(M1, R3, size=1400)
    assert out.obj is frame.obj  # a slice of the frame, not a copy
    assert router.from_inside(ip_frame(MAC2, M2, R9))[:2] == (FrameAction.TO_PEER, 9)
    padded = memoryview(bytes(ip_frame(MAC3, M3, R9)) + bytes(8))
    assert router.from_inside(padded) == (FrameAction.TO_PEER, 9, udp_packet(M3, R9))


def test_local_to_an_unrouted_remote_is_resolved(router: RouterClassifier) -> None:
    assert router.from_inside(ip_frame(MAC1, M1, UNROUTED)) == (
        FrameAction.RESOLVE,
        0,
        udp_packet(M1, UNROUTED),
    )


@pytest.mark.parametrize(
    ("src_mac", "src", "dst", "reason"),
    [
        (MAC1, M1, M2, DropReason.LOCAL_TO_LOCAL),
        (MAC2, M2, M2, DropReason.LOCAL_TO_LOCAL),
        (PHYS_MAC, PHYS, PHYS_SERVER, DropReason.NOT_LEASED),  # the physical network's traffic
        (PHYS_MAC, PHYS, R3, DropReason.NOT_LEASED),  # routed destination, foreign source
        (PHYS_MAC, PHYS, M1, DropReason.NOT_LEASED),
        (NEW_MAC, UNLEASED, R3, DropReason.NOT_LEASED),  # virtual-looking, but not leased
        (NEW_MAC, A("0.0.0.0"), R3, DropReason.NOT_LEASED),
        (MAC2, M1, R3, DropReason.SPOOFED_LOCAL),  # M1's address from M2's MAC
        (NEW_MAC, M1, UNROUTED, DropReason.SPOOFED_LOCAL),
        (MAC1, M1, PHYS_SERVER, DropReason.NOT_IN_SUBNET),
        (MAC1, M1, A("100.64.0.255"), DropReason.BROADCAST),
        (MAC1, M1, A("255.255.255.255"), DropReason.BROADCAST),
        (MAC1, M1, A("224.0.0.251"), DropReason.BROADCAST),
        (MAC1, M1, A("100.64.0.0"), DropReason.NO_ROUTE),
    ],
)
def test_ipv4_drops(
    router: RouterClassifier, src_mac: bytes, src: IPv4Address, dst: IPv4Address, reason: DropReason
) -> None:
    assert_drop(router, ip_frame(src_mac, src, dst), reason)


def test_other_ethertypes_and_malformed_frames(router: RouterClassifier) -> None:
    frame = ethernet.build(ethernet.BROADCAST, MAC1, 0x88CC, bytes(46))
    assert_drop(router, memoryview(frame), DropReason.NOT_IPV4)
    assert_drop(router, memoryview(bytes(13)), DropReason.MALFORMED)
    good = bytes(ip_frame(MAC1, M1, R3))
    assert_drop(router, memoryview(good[:33]), DropReason.MALFORMED)
    assert_drop(router, memoryview(good[:-1]), DropReason.MALFORMED)
    assert_drop(router, arp_request(MAC1, M1, R3)[:41], DropReason.MALFORMED)


# -- IPv4 from peers -------------------------------------------------------------------------


def test_inbound_to_a_local_machine_is_framed_to_its_mac(router: RouterClassifier) -> None:
    packet = udp_packet(R3, M2, size=1400)
    action, slot, out = router.from_outside(3, memoryview(bytearray(packet)))
    assert (action, slot) == (FrameAction.TO_TAP, 0)
    assert out == MAC2 + GW_MAC + b"\x08\x00" + packet
    other = udp_packet(R9, M3)
    assert router.from_outside(9, memoryview(other + b"junk")) == (
        FrameAction.TO_TAP,
        0,
        MAC3 + GW_MAC + b"\x08\x00" + other,
    )


def test_an_unresolved_sender_to_a_local_machine_is_verified(router: RouterClassifier) -> None:
    packet = udp_packet(UNROUTED, M1)
    assert router.from_outside(3, memoryview(packet)) == (FrameAction.VERIFY, 3, packet)


@pytest.mark.parametrize(
    ("peer", "src", "dst", "reason"),
    [
        (3, R3, UNLEASED, DropReason.WRONG_DESTINATION),
        (3, R3, R9, DropReason.WRONG_DESTINATION),
        (3, R3, PHYS_SERVER, DropReason.WRONG_DESTINATION),
        (3, R3, GATEWAY, DropReason.WRONG_DESTINATION),
        (3, R3, A("100.64.0.255"), DropReason.BROADCAST),
        (3, R3, A("224.0.0.1"), DropReason.BROADCAST),
        (9, R3, M1, DropReason.SPOOFED_SOURCE),  # slot 9 using slot 3's address
        (3, M2, M1, DropReason.SPOOFED_SOURCE),  # a peer using a local machine's address
        (3, PHYS, M1, DropReason.SPOOFED_SOURCE),  # not a virtual address
        (3, UNROUTED, UNLEASED, DropReason.SPOOFED_SOURCE),  # unresolved, and not to us
    ],
)
def test_inbound_drops(
    router: RouterClassifier, peer: int, src: IPv4Address, dst: IPv4Address, reason: DropReason
) -> None:
    assert_drop(router, memoryview(udp_packet(src, dst)), reason, peer=peer)


def test_inbound_malformed(router: RouterClassifier) -> None:
    good = udp_packet(R3, M1)
    for bad in (b"", good[:19], good[:-1], b"\x65" + good[1:], bytes(60)):
        assert_drop(router, memoryview(bad), DropReason.MALFORMED, peer=3)


# -- the local table -------------------------------------------------------------------------


def test_apply_local_replaces_the_table(router: RouterClassifier) -> None:
    m4, mac4 = A("100.64.0.14"), bytes.fromhex("020000000014")
    router.apply_local(LocalHosts.from_leases(2, [(M1, MAC1), (M2, MAC2), (m4, mac4)]))
    assert router.local.version == 2
    # M3's lease is gone: its frames are the segment's, and it is remote to the others.
    assert_drop(router, ip_frame(MAC3, M3, R3), DropReason.NOT_LEASED)
    assert_drop(router, memoryview(udp_packet(R3, M3)), DropReason.WRONG_DESTINATION, peer=3)
    assert router.from_inside(arp_request(MAC1, M1, M3))[0] is FrameAction.TO_TAP
    assert router.from_inside(ip_frame(MAC1, M1, M3))[0] is FrameAction.RESOLVE
    # The new machine is local.
    assert router.from_inside(ip_frame(mac4, m4, R3))[:2] == (FrameAction.TO_PEER, 3)
    assert_drop(router, arp_request(MAC1, M1, m4), DropReason.ARP_LOCAL)
    assert_drop(router, ip_frame(MAC1, M1, m4), DropReason.LOCAL_TO_LOCAL)
    _, _, out = router.from_outside(9, memoryview(udp_packet(R9, m4)))
    assert isinstance(out, bytes) and out[:6] == mac4
    stats = router.statistics()
    assert (stats.local_version, stats.local_hosts, stats.local_ignored) == (2, 3, 0)


def test_a_machine_that_moves_here_is_local_and_its_route_is_ignored(
    router: RouterClassifier,
) -> None:
    moved = LocalHosts.from_leases(2, [*LEASES, (R3, bytes.fromhex("020000000021"))])
    router.apply_local(moved)
    assert_drop(router, ip_frame(MAC1, M1, R3), DropReason.LOCAL_TO_LOCAL)
    assert_drop(router, memoryview(udp_packet(R3, M1)), DropReason.SPOOFED_SOURCE, peer=3)
    assert router.statistics().routes_ignored == 1
    router.apply_local(LocalHosts.from_leases(3, LEASES))
    assert router.from_inside(ip_frame(MAC1, M1, R3))[:2] == (FrameAction.TO_PEER, 3)
    assert router.statistics().routes_ignored == 0
    # The route table applied later is filtered by the local table in force.
    router.apply_local(moved)
    router.apply_routes(Routes.from_peers(5, [(3, [R3]), (9, [R9])]))
    assert_drop(router, ip_frame(MAC1, M1, R3), DropReason.LOCAL_TO_LOCAL)


def test_addresses_that_cannot_be_local_are_ignored(router: RouterClassifier) -> None:
    bad = [PHYS, A("100.64.0.0"), A("100.64.0.255"), GATEWAY]
    leases = [
        *LEASES,
        *((address, bytes.fromhex(f"0200000001{i:02x}")) for i, address in enumerate(bad)),
    ]
    router.apply_local(LocalHosts.from_leases(7, leases))
    stats = router.statistics()
    assert (stats.local_version, stats.local_hosts, stats.local_ignored) == (7, 3, 4)
    assert router.from_inside(arp_request(MAC1, M1, GATEWAY))[0] is FrameAction.TO_TAP
    assert router.from_inside(ip_frame(MAC1, M1, GATEWAY, 53))[0] is FrameAction.TO_CONTROL


def test_a_router_starts_with_no_local_machines() -> None:
    router = RouterClassifier(subnet=SUBNET, gateway_mac=GW_MAC)
    assert router.mode == "router" and router.dhcp_port == 67
    assert len(router.local.macs) == 0 and router.statistics().local_version == 0
    assert_drop(router, ip_frame(MAC1, M1, R3), DropReason.NOT_LEASED)
    assert_drop(router, arp_request(MAC1, M1, R3), DropReason.ARP_FOREIGN_SENDER)
    assert_drop(router, memoryview(udp_packet(R3, M1)), DropReason.SPOOFED_SOURCE, peer=3)


def test_local_hosts_validation() -> None:
    shared = LocalHosts.from_leases(1, [(M1, MAC1), (M2, MAC1), (M1, MAC1)])
    assert dict(shared.macs) == {M1.packed: MAC1, M2.packed: MAC1}  # one machine, two addresses
    with pytest.raises(TypeError):
        shared.macs[M3.packed] = MAC3  # type: ignore[index]
    for mac in (
        MAC1[:5],
        MAC1 + b"\0",
        bytes.fromhex("010000000011"),
        ethernet.BROADCAST,
        bytes(6),
    ):
        with pytest.raises(ValueError):
            LocalHosts.from_leases(1, [(M1, mac)])
    with pytest.raises(ValueError):
        LocalHosts.from_leases(1, [(M1, MAC1), (M1, MAC2)])  # one address, two machines
    with pytest.raises(TypeError):
        LocalHosts.from_leases(1, [("100.64.0.11", MAC1)])  # type: ignore[list-item]


def test_constructor_validation() -> None:
    for port in (0, 65536, -1):
        with pytest.raises(ValueError):
            RouterClassifier(subnet=SUBNET, gateway_mac=GW_MAC, dhcp_port=port)
    with pytest.raises(ValueError):
        RouterClassifier(subnet=SUBNET, gateway_mac=GW_MAC[:5])


def test_each_mode_is_its_own_class_chosen_once() -> None:
    """The two modes share a base, not an instance that swaps its methods: the entry points
    are the class's own, and each mode has only the tables it uses."""
    router = make_router()
    interface = InterfaceClassifier(subnet=SUBNET, address=M1, tap_mac=TAP_MAC, gateway_mac=GW_MAC)
    for classifier, cls in ((router, RouterClassifier), (interface, InterfaceClassifier)):
        assert not {"from_inside", "from_outside"} & set(vars(classifier))
        assert type(classifier).from_inside is cls.from_inside
        assert type(classifier).from_outside is cls.from_outside
    assert (router.mode, interface.mode) == ("router", "interface")
    assert not hasattr(router, "set_address") and not hasattr(router, "address")
    assert not hasattr(interface, "apply_local") and not hasattr(interface, "local")
    # the same frame, two answers: M2 answers for itself on the segment; behind an interface
    # every other address of the subnet is at the gateway
    request = arp_request(MAC1, M1, M2)
    assert_drop(router, request, DropReason.ARP_LOCAL)
    assert interface.from_inside(request)[0] is FrameAction.TO_TAP


# -- statistics and fuzzing ------------------------------------------------------------------


def test_statistics_add_up(router: RouterClassifier) -> None:
    router.from_inside(arp_request(MAC1, M1, R3))  # TO_TAP
    router.from_inside(arp_request(MAC1, M1, M2))  # arp_local
    router.from_inside(ip_frame(MAC1, M1, R3))  # TO_PEER
    router.from_inside(ip_frame(MAC1, M1, UNROUTED))  # RESOLVE
    router.from_inside(ip_frame(NEW_MAC, A("0.0.0.0"), A("255.255.255.255"), DHCP_PORT))
    router.from_inside(ip_frame(MAC1, M1, M2))  # local_to_local
    router.from_inside(ip_frame(PHYS_MAC, PHYS, PHYS_SERVER))  # not_leased
    router.from_inside(ip_frame(MAC2, M1, R3))  # spoofed_local
    router.from_outside(3, memoryview(udp_packet(R3, M1)))  # TO_TAP
    router.from_outside(3, memoryview(udp_packet(UNROUTED, M1)))  # VERIFY
    router.from_outside(3, memoryview(udp_packet(R3, UNLEASED)))  # wrong_destination
    stats = router.statistics()
    assert (stats.from_inside, stats.from_outside) == (8, 3)
    assert stats.actions == {
        FrameAction.TO_PEER: 1,
        FrameAction.TO_TAP: 2,
        FrameAction.DROP: 5,
        FrameAction.TO_CONTROL: 1,
        FrameAction.RESOLVE: 1,
        FrameAction.VERIFY: 1,
        FrameAction.CLAIM: 0,
    }
    assert {reason: n for reason, n in stats.drops.items() if n} == {
        DropReason.ARP_LOCAL: 1,
        DropReason.LOCAL_TO_LOCAL: 1,
        DropReason.NOT_LEASED: 1,
        DropReason.SPOOFED_LOCAL: 1,
        DropReason.WRONG_DESTINATION: 1,
    }
    assert (stats.routes_version, stats.routes, stats.routes_ignored) == (4, 2, 0)
    assert (stats.local_version, stats.local_hosts, stats.local_ignored) == (1, 3, 0)


MACS = [MAC1, MAC2, MAC3, PHYS_MAC, NEW_MAC, GW_MAC]
ADDRESSES = [M1, M2, M3, R3, R9, UNROUTED, UNLEASED, GATEWAY, PHYS, PHYS_SERVER]
ADDRESSES += [A("0.0.0.0"), A("100.64.0.0"), A("100.64.0.255"), A("255.255.255.255")]


@st.composite
def segment_frames(draw: st.DrawFn) -> bytes:
    """Frames that look like the segment's: ARP and UDP between its MACs and addresses, some
    with a byte changed or cut short."""
    mac = draw(st.sampled_from(MACS))
    src, dst = draw(st.sampled_from(ADDRESSES)), draw(st.sampled_from(ADDRESSES))
    if draw(st.booleans()):
        op = draw(st.sampled_from([arp.ArpOp.REQUEST, arp.ArpOp.REPLY]))
        frame = bytearray(arp_request(mac, src, dst, op))
    else:
        port = draw(st.sampled_from([53, 67, DHCP_PORT, 5001]))
        frame = bytearray(ip_frame(mac, src, dst, port, size=draw(st.integers(0, 40))))
    for _ in range(draw(st.integers(0, 2))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame[: draw(st.integers(0, len(frame)))] if draw(st.booleans()) else frame)


@st.composite
def peer_packets(draw: st.DrawFn) -> tuple[int, bytes]:
    peer = draw(st.sampled_from([0, 3, 9, 65535]))
    src, dst = draw(st.sampled_from(ADDRESSES)), draw(st.sampled_from(ADDRESSES))
    packet = bytearray(udp_packet(src, dst, size=draw(st.integers(0, 40))))
    if draw(st.booleans()):
        packet[draw(st.integers(0, len(packet) - 1))] = draw(st.integers(0, 255))
    return peer, bytes(
        packet[: draw(st.integers(0, len(packet)))] if draw(st.booleans()) else packet
    )


local_tables = st.lists(
    st.tuples(st.sampled_from(ADDRESSES[:7]), st.sampled_from(MACS[:5])),
    max_size=5,
    unique_by=lambda lease: lease[0],
)


@settings(max_examples=400)
@given(
    st.lists(
        st.one_of(
            segment_frames().map(lambda frame: ("in", 0, frame)),
            peer_packets().map(lambda p: ("out", p[0], p[1])),
            st.binary(max_size=80).map(lambda junk: ("in", 0, junk)),
            local_tables.map(lambda table: ("local", 0, table)),
        ),
        max_size=25,
    )
)
def test_fuzz_never_raises_and_always_counts(calls: list[tuple[str, int, object]]) -> None:
    router = make_router()
    inside = outside = 0
    for direction, peer, data in calls:
        if direction == "local":
            router.apply_local(LocalHosts.from_leases(2, data))  # type: ignore[arg-type]
            continue
        assert isinstance(data, bytes)
        view = memoryview(bytearray(data))
        local = router.local.macs
        if direction == "in":
            verdict = router.from_inside(view)
            inside += 1
            if verdict[0] is FrameAction.TO_PEER:  # only a local machine, from its own MAC
                assert local.get(data[26:30]) == data[6:12]
                assert data[30:34] not in local
        else:
            verdict = router.from_outside(peer, view)
            outside += 1
            if verdict[0] is FrameAction.TO_TAP:  # only to a local machine, at its MAC
                out = verdict[2]
                assert isinstance(out, bytes) and local[data[16:20]] == out[:6]
        assert_typed(verdict, peer)
    stats = router.statistics()
    assert (stats.from_inside, stats.from_outside) == (inside, outside)
    assert sum(stats.actions.values()) == inside + outside
    assert sum(stats.drops.values()) == stats.actions[FrameAction.DROP]


# -- machines with addresses of their own (allow_static), and per-machine counters ----------


def test_an_unleased_machine_of_the_subnet_is_claimed_only_when_allowed() -> None:
    frame = ip_frame(NEW_MAC, UNLEASED, R3)
    assert_drop(make_router(), frame, DropReason.NOT_LEASED)
    allowing = make_router(allow_static=True)
    assert allowing.from_inside(frame) == (FrameAction.CLAIM, 0, frame)
    # the physical network's own hosts are never claimed
    assert_drop(allowing, ip_frame(PHYS_MAC, PHYS, R3), DropReason.NOT_LEASED)
    assert_drop(allowing, ip_frame(NEW_MAC, GATEWAY, R3), DropReason.NOT_LEASED)
    assert allowing.statistics().actions[FrameAction.CLAIM] == 1


def test_each_machine_has_its_own_counters(router: RouterClassifier) -> None:
    for _ in range(3):
        assert router.from_inside(ip_frame(MAC1, M1, R3))[0] == FrameAction.TO_PEER
    assert router.from_inside(ip_frame(MAC2, M2, UNROUTED))[0] == FrameAction.RESOLVE
    assert router.from_outside(3, memoryview(udp_packet(R3, M1)))[0] == FrameAction.TO_TAP
    machines = router.statistics().machines
    assert machines == {str(M1): [3, 1], str(M2): [1, 0]}


def test_an_unleased_machines_arp_is_a_claim_when_allowed() -> None:
    """A machine with its own address speaks first with ARP (for the remote address)."""
    allowing = make_router(allow_static=True)
    request = arp_request(NEW_MAC, UNLEASED, R3)
    assert allowing.from_inside(request) == (FrameAction.CLAIM, 0, request)
    assert_drop(make_router(), request, DropReason.ARP_FOREIGN_SENDER)
