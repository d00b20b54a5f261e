"""The addressing core in memory, on RoutingCores that form a real overlay and DHT: DHCP
leases won in the DHT, host names and static names in DNS, packets that wait for their
route, ICMP host unreachable for an address nobody holds, and junk as counted drops."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import dnslib

from pipeline.control import events as ev
from pipeline.control.addressing import Addressing, AddressingSettings
from pipeline.control.dhcp import DhcpMessage, MessageType, Option, decode, encode
from pipeline.wire import ethernet, ipv4, udp
from tests.test_routing import Lab

SUBNET = IPv4Network("100.64.0.0/24")
GATEWAY = IPv4Address("100.64.0.254")
GW_MAC = bytes.fromhex("024156540001")
DOMAIN = "vpn.test"


def tap_mac(i: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, i + 1])


class AddressLab(Lab):
    """Cores without static addresses, each with an addressing core and one DHCP client."""

    def __init__(self, n: int, *, preferred: list[IPv4Address | None] | None = None) -> None:
        super().__init__(n, dhcp=True)
        self.addressing = [
            Addressing(
                core,
                AddressingSettings(
                    subnet=SUBNET,
                    gateway=GATEWAY,
                    domain=DOMAIN,
                    namespace="lab",
                    node_name=f"n{i}",
                    tap_mac=tap_mac(i),
                    gateway_mac=GW_MAC,
                    mtu=1400,
                    dhcp=True,
                ),
                rng=random.Random(i),
                preferred=(preferred or [None] * n)[i],
            )
            for i, core in enumerate(self.cores)
        ]
        self.to_tap: list[list[bytes]] = [[] for _ in range(n)]
        self.sent: list[list[tuple[int, bytes]]] = [[] for _ in range(n)]
        self.results: list[list[object]] = [[] for _ in range(n)]

    def after_timers(self) -> None:
        for i, (core, addressing) in enumerate(zip(self.cores, self.addressing, strict=True)):
            addressing.handle_timer(self.now, self.wall())
            for result in core.dht_results():
                if not addressing.dht_result(result, self.now):
                    self.results[i].append(result)
            self.to_tap[i] += addressing.frames_to_tap()
            self.sent[i] += addressing.packets_to_send()

    def frames(self, i: int) -> list[bytes]:
        out, self.to_tap[i] = self.to_tap[i] + self.addressing[i].frames_to_tap(), []
        return out


def dhcp_frame(i: int, kind: MessageType, **options: bytes) -> bytes:
    opts = {Option.MESSAGE_TYPE: bytes((kind,)), Option.HOST_NAME: f"host{i}".encode()}
    opts.update({Option[k.upper()]: v for k, v in options.items()})
    msg = DhcpMessage(op=1, xid=0x1234 + i, chaddr=tap_mac(i) + bytes(10), options=opts)
    payload = encode(msg)
    zero, bcast = IPv4Address("0.0.0.0"), IPv4Address("255.255.255.255")
    datagram = udp.build(68, 67, payload, src=zero, dst=bcast)
    packet = ipv4.build(src=zero, dst=bcast, protocol=ipv4.Protocol.UDP, payload=datagram)
    return ethernet.build(b"\xff" * 6, tap_mac(i), ethernet.ETHERTYPE_IPV4, packet)


def replies(lab: AddressLab, i: int) -> list[DhcpMessage]:
    out = []
    for frame in lab.frames(i):
        packet = frame[ethernet.HEADER_LEN :]
        if packet[9] == ipv4.Protocol.UDP and packet[22:24] == (68).to_bytes(2, "big"):
            out.append(decode(packet[28:]))
    return out


def lease(lab: AddressLab, i: int) -> IPv4Address:
    """DORA for node i's client; the address it is given."""
    lab.addressing[i].frame_from_tap(dhcp_frame(i, MessageType.DISCOVER), lab.now)
    offer = None
    for _ in range(100):
        lab.step()
        offer = next(iter(replies(lab, i)), None)
        if offer is not None:
            break
    assert offer is not None and offer.options[Option.MESSAGE_TYPE] == bytes([2])
    requested = {
        "requested_address": offer.yiaddr.packed,
        "server_id": GATEWAY.packed,
    }
    lab.addressing[i].frame_from_tap(dhcp_frame(i, MessageType.REQUEST, **requested), lab.now)
    lab.step()
    (ack,) = replies(lab, i)
    assert ack.options[Option.MESSAGE_TYPE] == bytes([5]) and ack.yiaddr == offer.yiaddr
    return ack.yiaddr


def dns_query(i: int, name: str, qtype: str = "A") -> bytes:
    query = dnslib.DNSRecord.question(name, qtype).pack()
    src = IPv4Address(f"100.64.0.{200 + i}")
    datagram = udp.build(5353, 53, query, src=src, dst=GATEWAY)
    packet = ipv4.build(src=src, dst=GATEWAY, protocol=ipv4.Protocol.UDP, payload=datagram)
    return ethernet.build(GW_MAC, tap_mac(i), ethernet.ETHERTYPE_IPV4, packet)


def dns_answers(lab: AddressLab, i: int) -> list[dnslib.DNSRecord]:
    return [
        dnslib.DNSRecord.parse(frame[ethernet.HEADER_LEN + 28 :])
        for frame in lab.frames(i)
        if frame[ethernet.HEADER_LEN + 20 : ethernet.HEADER_LEN + 22] == (53).to_bytes(2, "big")
    ]


def test_a_lease_is_won_in_the_dht_and_names_are_registered() -> None:
    lab = AddressLab(4)
    lab.run(15)
    address = lease(lab, 1)
    assert address in SUBNET and address != GATEWAY
    assert lab.cores[1].address == address
    events = lab.addressing[1].events()
    assert any(isinstance(e, ev.LeaseGranted) for e in events)
    assert ev.HoldAddress(str(address)) in events  # the driver keeps it for the next start
    lab.run(2)
    names = {e.host for e in lab.addressing[1].events() if isinstance(e, ev.NameRegistered)}
    assert names == {"n1", "host1"}
    # another node finds the address and the host name
    rid = lab.cores[3].dht_get(f"ip:lab:{address}".encode(), lab.now)
    lab.run(2)
    (result,) = [r for r in lab.results[3] if getattr(r, "request_id", None) == rid]
    assert result.records[0].value == lab.idents[1].node_id


def test_two_nodes_that_want_one_address_get_two() -> None:
    wanted = IPv4Address("100.64.0.77")
    lab = AddressLab(4, preferred=[None, wanted, wanted, None])
    lab.run(15)
    first = lease(lab, 1)
    second = lease(lab, 2)
    assert first == wanted and second != wanted and second in SUBNET


def test_dns_answers_static_names_host_names_and_refuses_foreign_ones() -> None:
    lab = AddressLab(4)
    lab.run(15)
    address = lease(lab, 2)
    lab.run(3)
    asker = lab.addressing[0]
    asker.frame_from_tap(dns_query(0, "C064000009.vpn.test"), lab.now)
    (static,) = dns_answers(lab, 0)
    assert str(static.rr[0].rdata) == "100.64.0.9"
    asker.frame_from_tap(dns_query(0, "example.com"), lab.now)
    (foreign,) = dns_answers(lab, 0)
    assert foreign.header.rcode == dnslib.RCODE.REFUSED
    asker.frame_from_tap(dns_query(0, "host2.vpn.test"), lab.now)
    lab.run(2)
    (host,) = dns_answers(lab, 0)
    assert str(host.rr[0].rdata) == str(address)
    asker.frame_from_tap(dns_query(0, "nobody.vpn.test"), lab.now)
    lab.run(2)
    (missing,) = dns_answers(lab, 0)
    assert missing.header.rcode == dnslib.RCODE.NXDOMAIN


def icmp_packet(src: IPv4Address, dst: IPv4Address) -> bytes:
    echo = b"\x08\x00\x00\x00\x00\x01\x00\x01" + bytes(16)
    return ipv4.build(src=src, dst=dst, protocol=ipv4.Protocol.ICMP, payload=echo)


def test_a_packet_waits_for_its_route_then_goes() -> None:
    lab = AddressLab(4)
    lab.run(15)
    a, b = lease(lab, 1), lease(lab, 3)
    lab.run(2)
    lab.addressing[1].packet_to_resolve(icmp_packet(a, b), lab.now, lab.wall())
    assert lab.addressing[1].statistics()["waiting"] == 1
    lab.run(1)
    ((slot, packet),) = lab.sent[1]
    assert packet == icmp_packet(a, b)
    assert lab.cores[1].links.links[slot].certificate.node_id == lab.idents[3].node_id


def test_an_address_nobody_holds_gets_icmp_host_unreachable() -> None:
    lab = AddressLab(3)
    lab.run(15)
    a = lease(lab, 1)
    lab.frames(1)
    nobody = IPv4Address("100.64.0.250")
    original = icmp_packet(a, nobody)
    lab.addressing[1].packet_to_resolve(original, lab.now, lab.wall())
    lab.run(2)
    (frame,) = lab.frames(1)
    reply = frame[ethernet.HEADER_LEN :]
    assert ipv4.parse(reply).src == GATEWAY and ipv4.parse(reply).dst == a
    assert reply[20:22] == b"\x03\x01"  # destination unreachable: host
    assert reply[28:] == original[:28]  # the offending header and 8 bytes
    assert ipv4.checksum(reply[20:]) == 0
    assert not lab.sent[1]


def test_a_packet_too_short_to_quote_is_dropped_without_an_icmp_error() -> None:
    """An ICMP-protocol header with nothing after it (found by the fuzzer: it raised
    IndexError) or a header length below 20: counted, no reply, the core goes on."""
    lab = AddressLab(3)
    lab.run(15)
    a = lease(lab, 1)
    lab.frames(1)
    nobody = IPv4Address("100.64.0.250")
    short = icmp_packet(a, nobody)[:20]
    bad_ihl = bytes([0x44]) + icmp_packet(a, nobody)[1:]
    for packet in (short, bad_ihl):
        lab.addressing[1].packet_to_resolve(packet, lab.now, lab.wall())
    lab.run(2)
    assert lab.frames(1) == []
    assert lab.addressing[1].statistics()["counters"]["dropped_unresolved"] == 2
    lab.addressing[1].packet_to_resolve(icmp_packet(a, nobody), lab.now, lab.wall())
    lab.run(2)
    assert len(lab.frames(1)) == 1  # a whole one still gets its error


def test_junk_from_the_tap_is_a_counted_drop() -> None:
    lab = AddressLab(2)
    lab.run(10)
    addressing = lab.addressing[1]
    for junk in (b"", b"\x00" * 14, dhcp_frame(1, MessageType.DISCOVER)[:40]):
        addressing.frame_from_tap(junk, lab.now)
    bad_dns = bytearray(dns_query(1, "x.vpn.test"))
    bad_dns[-5:] = b"\xff" * 5
    addressing.frame_from_tap(bytes(bad_dns), lab.now)
    addressing.packet_to_resolve(b"\x45", lab.now, lab.wall())
    stats = addressing.statistics()
    dropped = sum(v for k, v in stats["counters"].items() if k.startswith("dropped"))
    dns_dropped = sum(v for k, v in stats["dns"].items() if k.startswith("dropped"))
    dns_formerr = stats["dns"]["answered_formerr"]
    assert dropped + stats["dhcp"].get("dropped_truncated", 0) >= 3
    assert dns_dropped + dns_formerr == 1
    assert not [e for e in addressing.events() if isinstance(e, ev.LeaseGranted | ev.LeaseEnded)]
