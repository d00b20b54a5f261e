"""Tests for pipeline.control.dhcp: the codec (golden bytes from a real dhclient, round
trips, RFC 3396 and overload), the server core (DORA, claims won and lost, renewals,
RELEASE, INFORM, DECLINE, NAK, timers, takeover, router mode), the frame helpers, and
fuzzing of every input."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layering import test_pure_module_imports_no_io as check_pure

from pipeline.control.dhcp import (
    AddressDeclined,
    Claim,
    ClaimsExhausted,
    DhcpMessage,
    DhcpServer,
    DhcpSettings,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRenewed,
    LeaseRevoked,
    MessageType,
    NakSent,
    OfferExpired,
    Option,
    Release,
    Reply,
    decode,
    derive_address,
    encode,
    reply_frame,
    request_from_frame,
)
from pipeline.control.dhcp.wire import FLAG_BROADCAST, UNSPECIFIED
from pipeline.errors import RemoteProtocolError
from pipeline.wire import ethernet, ipv4, udp

ROOT = Path(__file__).resolve().parent.parent
SUBNET = IPv4Network("100.64.0.0/24")
GW = IPv4Address("100.64.0.1")
NODE = bytes(range(20))
MAC = bytes.fromhex("02aabbccdd01")
MAC2 = bytes.fromhex("02aabbccdd02")
GW_MAC = bytes.fromhex("024156540001")
XID = 0xD7BC2437
BROADCAST = IPv4Address("255.255.255.255")
PREFERRED = IPv4Address("100.64.0.77")
LEASE = 3600

# The DISCOVER that ISC dhclient 4.4.3 sent on a veth (MAC 02:aa:bb:cc:dd:01, `send
# host-name "alpha"`, Debian's default request list), captured: RFC 2131 figure 1, then
# options 53, 12, 55, End, and zeros to 300 bytes.
REAL_DISCOVER = bytes.fromhex(
    "01 01 06 00"  # op BOOTREQUEST, htype Ethernet, hlen 6, hops 0
    " d7bc2437"  # xid
    " 0000 0000"  # secs, flags (no broadcast bit)
    " 00000000 00000000 00000000 00000000"  # ciaddr, yiaddr, siaddr, giaddr
    " 02aabbccdd01 00000000000000000000"  # chaddr: the MAC and 10 zero bytes
    + "00" * 64  # sname
    + "00" * 128  # file
    + " 63825363"  # magic cookie
    " 35 01 01"  # 53 message type, 1 byte: DISCOVER
    " 0c 05 616c706861"  # 12 host name, 5 bytes: "alpha"
    " 37 0d 01 1c 02 03 0f 06 77 0c 2c 2f 1a 79 2a"  # 55 parameter request list, 13 codes
    " ff"  # End
     + "00" * 34  # padding to 300 bytes
)
# ... and the frame it came in: broadcast from the MAC, IPv4 0.0.0.0 -> 255.255.255.255
# (TOS 0x10, TTL 128), UDP 68 -> 67 with its checksum.
REAL_DISCOVER_FRAME = (
    bytes.fromhex(
        "ffffffffffff 02aabbccdd01 0800"  # Ethernet
        " 4510 0148 0000 0000 8011 3996 00000000 ffffffff"  # IPv4, 328 bytes
        " 0044 0043 0134 6586"  # UDP 68 -> 67, 308 bytes, checksum
    )
    + REAL_DISCOVER
)
# The options of our OFFER of 100.64.0.77 to it (3600 s lease, domain vpn.test, MTU 1400).
OFFER_OPTIONS = bytes.fromhex(
    "63825363"  # magic cookie
    " 35 01 02"  # 53 message type: OFFER
    " 36 04 64400001"  # 54 server identifier 100.64.0.1
    " 33 04 00000e10"  # 51 lease time 3600
    " 3a 04 00000708"  # 58 renewal (T1) 1800
    " 3b 04 00000c4e"  # 59 rebinding (T2) 3150
    " 01 04 ffffff00"  # 1 subnet mask 255.255.255.0
    " 03 04 64400001"  # 3 router 100.64.0.1
    " 06 04 64400001"  # 6 DNS server 100.64.0.1
    " 0f 08 76706e2e74657374"  # 15 domain name "vpn.test"
    " 1a 02 0578"  # 26 interface MTU 1400
    " 0c 05 616c706861"  # 12 host name "alpha", echoed
    " ff"  # End (307 bytes in all: no padding)
)


def make_settings(**overrides: object) -> DhcpSettings:
    fields: dict[str, object] = {
        "subnet": SUBNET,
        "server_address": GW,
        "namespace": "lab",
        "node_id": NODE,
        "domain": "vpn.test",
        "lease_s": LEASE,
    }
    fields.update(overrides)
    return DhcpSettings(**fields)  # type: ignore[arg-type]


def make_server(seed: int = 1, **overrides: object) -> DhcpServer:
    return DhcpServer(make_settings(**overrides), random.Random(seed))


def message(
    kind: int | None,
    *,
    mac: bytes = MAC,
    xid: int = XID,
    ciaddr: IPv4Address = UNSPECIFIED,
    flags: int = 0,
    options: dict[int, bytes] | None = None,
    **fields: object,
) -> bytes:
    """A client message of type ``kind`` (None: no option 53) as bytes."""
    opts = {} if kind is None else {Option.MESSAGE_TYPE: bytes((kind,))}
    opts.update(options or {})
    msg = DhcpMessage(
        op=1, xid=xid, chaddr=mac + bytes(10), ciaddr=ciaddr, flags=flags, options=opts
    )
    return encode(msgspec.structs.replace(msg, **fields))  # type: ignore[arg-type]


def selecting(address: IPv4Address, **kw: object) -> bytes:
    options = {Option.SERVER_ID: GW.packed, Option.REQUESTED_ADDRESS: address.packed}
    return message(MessageType.REQUEST, options=options, **kw)  # type: ignore[arg-type]


def claims(server: DhcpServer) -> list[Claim]:
    requests = server.dht_requests()
    assert all(isinstance(r, Claim) for r in requests), requests
    return [r for r in requests if isinstance(r, Claim)]


def one_reply(server: DhcpServer) -> tuple[Reply, DhcpMessage]:
    [reply] = server.replies()
    return reply, decode(reply.payload)


def offered(
    server: DhcpServer, data: bytes | None = None, now: float = 0.0, mac: bytes = MAC
) -> tuple[Claim, Reply, DhcpMessage]:
    """A DISCOVER (``data``, by default a plain one), its one claim won, the OFFER."""
    server.receive(message(MessageType.DISCOVER, mac=mac) if data is None else data, mac, now)
    [claim] = claims(server)
    server.address_won(claim.token, claim.address, now)
    reply, offer = one_reply(server)
    return claim, reply, offer


def dora(server: DhcpServer, now: float = 0.0, mac: bytes = MAC) -> IPv4Address:
    """DISCOVER, the claim won, OFFER, REQUEST, ACK; the address."""
    _, _, offer = offered(server, now=now, mac=mac)
    server.receive(selecting(offer.yiaddr, mac=mac), mac, now)
    _, ack = one_reply(server)
    assert ack.message_type() == MessageType.ACK
    server.events()
    return ack.yiaddr


# -- the codec ---------------------------------------------------------------------------------


class TestWire:
    def test_real_dhclient_discover_decodes(self) -> None:
        msg = decode(REAL_DISCOVER)
        assert (msg.op, msg.htype, msg.hlen, msg.hops) == (1, 1, 6, 0)
        assert (msg.xid, msg.secs, msg.flags) == (XID, 0, 0)
        assert msg.hardware_address == MAC and msg.chaddr == MAC + bytes(10)
        assert msg.ciaddr == msg.yiaddr == msg.siaddr == msg.giaddr == UNSPECIFIED
        assert msg.message_type() == MessageType.DISCOVER
        assert msg.options == {
            Option.MESSAGE_TYPE: b"\x01",
            Option.HOST_NAME: b"alpha",
            Option.PARAMETER_REQUEST_LIST: bytes.fromhex("011c02030f06770c2c2f1a792a"),
        }

    def test_encode_matches_real_dhclient_byte_for_byte(self) -> None:
        assert len(REAL_DISCOVER) == 300
        assert encode(decode(REAL_DISCOVER)) == REAL_DISCOVER
        built = message(
            MessageType.DISCOVER,
            options={
                Option.HOST_NAME: b"alpha",
                Option.PARAMETER_REQUEST_LIST: bytes.fromhex("011c02030f06770c2c2f1a792a"),
            },
        )
        assert built == REAL_DISCOVER

    @settings(max_examples=300, deadline=None)
    @given(
        st.builds(
            DhcpMessage,
            op=st.integers(0, 255),
            xid=st.integers(0, 2**32 - 1),
            chaddr=st.binary(min_size=16, max_size=16),
            htype=st.integers(0, 255),
            hlen=st.integers(0, 16),
            hops=st.integers(0, 255),
            secs=st.integers(0, 0xFFFF),
            flags=st.integers(0, 0xFFFF),
            ciaddr=st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
            yiaddr=st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
            siaddr=st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
            giaddr=st.builds(IPv4Address, st.integers(0, 2**32 - 1)),
            sname=st.binary(min_size=64, max_size=64),
            file=st.binary(min_size=128, max_size=128),
            options=st.dictionaries(
                st.integers(1, 254).filter(lambda c: c != Option.OVERLOAD),
                st.binary(max_size=600),
                max_size=12,
            ),
        )
    )
    def test_round_trip(self, msg: DhcpMessage) -> None:
        data = encode(msg)
        assert len(data) >= 300
        assert decode(data) == msg
        assert encode(decode(data)) == data

    def test_long_option_is_split_and_concatenated(self) -> None:
        """RFC 3396: a value over 255 bytes travels as several options of one code."""
        value = bytes(range(256)) * 2
        data = message(MessageType.INFORM, options={Option.HOST_NAME: value})
        assert data[240:246] == bytes.fromhex("350108") + bytes.fromhex("0cff00")
        assert decode(data).options[Option.HOST_NAME] == value

    def test_overload_reads_file_then_sname(self) -> None:
        sname = bytes.fromhex("0c02 6869 ff").ljust(64, b"\0")  # host name "hi"
        file = bytes.fromhex("0c02 6a6b 0000 3a04 00000001 ff").ljust(128, b"\0")
        base = message(MessageType.DISCOVER, sname=sname, file=file)
        overloaded = base[:243] + bytes.fromhex("340103 ff")  # 52: file and sname
        msg = decode(overloaded)
        assert msg.options[Option.HOST_NAME] == b"jkhi"  # file first, then sname
        assert msg.options[Option.RENEWAL_TIME] == b"\0\0\0\1"
        assert Option.OVERLOAD not in msg.options
        assert decode(base).options == {Option.MESSAGE_TYPE: b"\x01"}  # no overload: ignored

    def test_pads_and_missing_end_are_tolerated(self) -> None:
        data = REAL_DISCOVER[:240] + b"\0\0" + bytes.fromhex("350103 0000 0c0161")
        assert decode(data).options == {Option.MESSAGE_TYPE: b"\x03", Option.HOST_NAME: b"a"}

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (REAL_DISCOVER[:239], "dhcp_truncated"),
            (REAL_DISCOVER[:236] + b"\x63\x82\x53\x64" + REAL_DISCOVER[240:], "dhcp_bad_cookie"),
            (REAL_DISCOVER[:2] + b"\x11" + REAL_DISCOVER[3:], "dhcp_bad_hlen"),
            (REAL_DISCOVER[:240] + bytes.fromhex("0c05616c70"), "dhcp_option_truncated"),
            (REAL_DISCOVER[:240] + bytes.fromhex("0c"), "dhcp_option_truncated"),
            (REAL_DISCOVER[:240] + bytes.fromhex("340104ff"), "dhcp_bad_overload"),
            (REAL_DISCOVER[:240] + bytes.fromhex("340201ff"), "dhcp_bad_overload"),
        ],
    )
    def test_malformed_raises_remote_protocol_error(self, data: bytes, reason: str) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            decode(data)
        assert info.value.reason == reason

    def test_encode_refuses_what_it_cannot_write(self) -> None:
        for bad in (
            DhcpMessage(op=1, xid=2**32, chaddr=MAC),
            DhcpMessage(op=1, xid=1, chaddr=bytes(17)),
            DhcpMessage(op=1, xid=1, chaddr=MAC, options={Option.END: b""}),
            DhcpMessage(op=1, xid=1, chaddr=MAC, options={Option.OVERLOAD: b"\x01"}),
        ):
            with pytest.raises(ValueError):
                encode(bad)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=700))
    def test_decode_fuzz_raises_only_remote_protocol_error(self, data: bytes) -> None:
        try:
            decode(data)
        except RemoteProtocolError:
            pass


# -- the server: the four-message exchange and the options -------------------------------------


class TestDora:
    def test_full_dora_with_a_won_claim(self) -> None:
        server = make_server()
        server.receive(REAL_DISCOVER, MAC, 0.0)
        assert server.replies() == []  # nothing before the claim is won
        [claim] = claims(server)
        derived = derive_address(SUBNET, NODE, make_settings().reserved_addresses)
        assert claim.address == derived
        assert claim.key == f"ip:lab:{derived}".encode()
        assert (claim.value, claim.lease_s, claim.renewal) == (NODE, LEASE, False)
        assert server.next_deadline() == 30.0  # the claim's timeout

        server.address_won(claim.token, claim.address, 0.5)
        reply, offer = one_reply(server)
        assert offer.message_type() == MessageType.OFFER
        assert (offer.op, offer.xid, offer.yiaddr, offer.ciaddr) == (2, XID, derived, UNSPECIFIED)
        assert offer.hardware_address == MAC
        assert (reply.dst_ip, reply.dst_mac, reply.broadcast) == (derived, MAC, False)
        assert server.next_deadline() == 60.5  # the offer's timeout

        server.receive(selecting(derived), MAC, 1.0)
        reply, ack = one_reply(server)
        assert ack.message_type() == MessageType.ACK and ack.yiaddr == derived
        assert (reply.dst_ip, reply.dst_mac) == (derived, MAC)
        assert server.events() == [LeaseGranted(b"\x01" + MAC, MAC, derived, LEASE, hostname=None)]
        assert server.next_deadline() == 1.0 + LEASE
        assert server.dht_requests() == []
        [lease] = server.leases()
        assert (lease.address, lease.state, lease.expires) == (derived, "bound", 1.0 + LEASE)
        stats = server.statistics()
        assert stats["received_discover"] == stats["received_request"] == 1
        assert stats["sent_offer"] == stats["sent_ack"] == stats["claims_won"] == 1

    def test_offer_options_byte_for_byte_and_decoded(self) -> None:
        server = make_server()
        server.preferred(PREFERRED)
        _, reply, offer = offered(server, REAL_DISCOVER)
        expected_header = bytes.fromhex(
            "02 01 06 00 d7bc2437 0000 0000"  # BOOTREPLY, Ethernet, xid, secs, flags
            " 00000000 6440004d 00000000 00000000"  # ciaddr, yiaddr 100.64.0.77, siaddr, giaddr
            " 02aabbccdd01 00000000000000000000"  # chaddr
        ) + bytes(192)
        assert reply.payload == expected_header + OFFER_OPTIONS
        opts = offer.options
        assert list(opts) == [53, 54, 51, 58, 59, 1, 3, 6, 15, 26, 12]
        assert opts[Option.MESSAGE_TYPE] == bytes([MessageType.OFFER])
        assert IPv4Address(opts[Option.SERVER_ID]) == GW
        assert int.from_bytes(opts[Option.LEASE_TIME], "big") == LEASE
        assert int.from_bytes(opts[Option.RENEWAL_TIME], "big") == LEASE // 2
        assert int.from_bytes(opts[Option.REBINDING_TIME], "big") == LEASE * 7 // 8
        assert IPv4Address(opts[Option.SUBNET_MASK]) == SUBNET.netmask
        assert IPv4Address(opts[Option.ROUTER]) == GW
        assert IPv4Address(opts[Option.DNS_SERVERS]) == GW
        assert opts[Option.DOMAIN_NAME] == b"vpn.test"
        assert int.from_bytes(opts[Option.INTERFACE_MTU], "big") == 1400
        assert opts[Option.HOST_NAME] == b"alpha"

    def test_dns_server_and_client_identifier(self) -> None:
        server = make_server(dns=IPv4Address("100.64.0.2"))
        client_id = b"\xff\x00\x00\x00\x01" + bytes(10)  # an RFC 4361 DUID-style id
        claim, _, offer = offered(server, message(1, options={Option.CLIENT_ID: client_id}))
        assert claim.address != IPv4Address("100.64.0.2")  # reserved as the DNS server
        assert offer.options[Option.DNS_SERVERS] == IPv4Address("100.64.0.2").packed
        assert offer.options[Option.CLIENT_ID] == client_id  # echoed (RFC 6842)
        assert server.leases()[0].client_id == client_id

    def test_broadcast_flag_gets_broadcast_replies(self) -> None:
        server = make_server()
        _, reply, offer = offered(server, message(MessageType.DISCOVER, flags=FLAG_BROADCAST))
        assert (reply.dst_ip, reply.dst_mac) == (BROADCAST, ethernet.BROADCAST)
        assert offer.flags == FLAG_BROADCAST  # copied back

    def test_repeated_discover_while_claiming_answers_the_latest(self) -> None:
        server = make_server()
        server.receive(message(MessageType.DISCOVER, xid=1), MAC, 0.0)
        server.receive(message(MessageType.DISCOVER, xid=2), MAC, 1.0)
        [claim] = claims(server)  # one claim only
        server.address_won(claim.token, claim.address, 1.5)
        _, offer = one_reply(server)
        assert offer.xid == 2

    def test_discover_from_a_bound_client_offers_its_address_again(self) -> None:
        server = make_server()
        address = dora(server)
        server.receive(message(MessageType.DISCOVER), MAC, 5.0)
        assert server.dht_requests() == []
        _, offer = one_reply(server)
        assert offer.yiaddr == address


# -- candidates and claims ---------------------------------------------------------------------


class TestCandidates:
    def test_preferred_address_first(self) -> None:
        server = make_server()
        assert server.preferred(PREFERRED)
        server.receive(
            message(1, options={Option.REQUESTED_ADDRESS: IPv4Address("100.64.0.9").packed}),
            MAC,
            0.0,
        )
        [claim] = claims(server)
        assert claim.address == PREFERRED

    def test_preferred_must_be_a_usable_host(self) -> None:
        server = make_server()
        for bad in (GW, SUBNET.network_address, SUBNET.broadcast_address, IPv4Address("10.0.0.1")):
            assert not server.preferred(bad)
        assert server.statistics()["preferred_ignored"] == 4

    def test_then_requested_then_derived_then_random(self) -> None:
        server = make_server()
        server.preferred(PREFERRED)
        requested = IPv4Address("100.64.0.9")
        server.receive(message(1, options={50: requested.packed}), MAC, 0.0)
        derived = derive_address(SUBNET, NODE, make_settings().reserved_addresses)
        seen = []
        for _ in range(4):
            [claim] = claims(server)
            seen.append(claim.address)
            server.address_lost(claim.token, claim.address, 0.0)
        assert seen[:3] == [PREFERRED, requested, derived]
        assert seen[3] in SUBNET and seen[3] not in seen[:3]
        assert server.statistics()["claims_lost"] == 4

    def test_lost_claim_goes_to_the_next_candidate_and_is_avoided(self) -> None:
        server = make_server()
        server.preferred(PREFERRED)
        server.receive(message(1), MAC, 0.0)
        [first] = claims(server)
        server.address_lost(first.token, first.address, 1.0)
        [second] = claims(server)
        assert second.address != PREFERRED
        server.address_won(second.token, second.address, 1.0)
        _, offer = one_reply(server)
        assert offer.yiaddr == second.address
        # a new search within avoid_s skips the address found taken
        server2 = make_server()
        server2.preferred(PREFERRED)
        server2.address_lost(None, PREFERRED, 0.0)
        server2.receive(message(1), MAC, 10.0)
        [claim] = claims(server2)
        assert claim.address != PREFERRED

    def test_claims_are_bounded(self) -> None:
        server = make_server(claim_tries=3)
        server.receive(message(1), MAC, 0.0)
        for _ in range(3):
            [claim] = claims(server)
            server.address_lost(claim.token, claim.address, 0.0)
        assert server.dht_requests() == [] and server.replies() == []
        assert server.events() == [ClaimsExhausted(b"\x01" + MAC, MAC, 3)]
        assert server.statistics()["claims_exhausted"] == 1
        assert server.leases() == []
        server.receive(message(1), MAC, 5.0)  # the client tries again: a new search
        assert len(claims(server)) == 1

    def test_a_tiny_subnet_runs_out(self) -> None:
        server = make_server(subnet=IPv4Network("100.64.0.0/30"), claim_tries=5)
        server.receive(message(1), MAC, 0.0)
        [claim] = claims(server)
        assert claim.address == IPv4Address("100.64.0.2")  # the only host left
        server.address_lost(claim.token, claim.address, 0.0)
        assert server.events() == [ClaimsExhausted(b"\x01" + MAC, MAC, 1)]

    def test_derived_address_is_stable(self) -> None:
        reserved = make_settings().reserved_addresses
        first = derive_address(SUBNET, NODE, reserved)
        assert first == derive_address(SUBNET, NODE, reserved)
        assert first != derive_address(SUBNET, bytes(20), reserved)

    @settings(max_examples=300, deadline=None)
    @given(
        st.binary(min_size=20, max_size=20),
        st.integers(8, 30),
        st.integers(0, 2**32 - 1),
        st.sets(st.integers(0, 255), max_size=8),
    )
    def test_derived_address_is_a_host_and_never_reserved(
        self, node_id: bytes, prefix: int, base: int, extra: set[int]
    ) -> None:
        subnet = IPv4Network((base, prefix), strict=False)
        hosts = list(subnet.hosts()) if prefix >= 24 else None
        spare = subnet.num_addresses - 4  # hosts besides the gateway and one more
        s = make_settings(
            subnet=subnet,
            server_address=subnet.network_address + 1,
            node_id=node_id,
            reserved=frozenset(subnet.network_address + 2 + i % spare for i in extra if spare),
        )
        reserved = s.reserved_addresses
        address = derive_address(subnet, node_id, reserved)
        assert address is not None and address == derive_address(subnet, node_id, reserved)
        assert address in subnet and address not in reserved
        assert subnet.network_address < address < subnet.broadcast_address
        if hosts is not None:
            assert address in hosts

    def test_router_mode_derives_per_client_and_bounds_the_table(self) -> None:
        server = make_server(max_clients=2)
        first = dora(server, mac=MAC)
        second = dora(server, mac=MAC2)
        assert first != second
        reserved = make_settings().reserved_addresses
        assert first == derive_address(SUBNET, NODE + b"\x01" + MAC, reserved)
        assert second == derive_address(SUBNET, NODE + b"\x01" + MAC2, reserved)
        mac3 = bytes.fromhex("02aabbccdd03")
        server.receive(message(1, mac=mac3), mac3, 0.0)
        assert server.dht_requests() == [] and server.replies() == []
        assert server.statistics()["dropped_table_full"] == 1

    def test_router_mode_never_gives_one_address_to_two_clients(self) -> None:
        server = make_server(max_clients=2)
        server.preferred(PREFERRED)
        first = dora(server, mac=MAC)
        assert first == PREFERRED
        server.receive(message(1, mac=MAC2, options={50: PREFERRED.packed}), MAC2, 0.0)
        [claim] = claims(server)
        assert claim.address != PREFERRED

    def test_interface_mode_new_mac_takes_over_the_lease(self) -> None:
        server = make_server()
        address = dora(server)
        server.receive(message(MessageType.DISCOVER, mac=MAC2), MAC2, 10.0)
        assert server.dht_requests() == []  # no new claim: the node keeps its address
        _, offer = one_reply(server)
        assert offer.yiaddr == address and offer.hardware_address == MAC2
        server.receive(selecting(address, mac=MAC2), MAC2, 10.0)
        _, ack = one_reply(server)
        assert ack.message_type() == MessageType.ACK
        assert server.events() == [LeaseGranted(b"\x01" + MAC2, MAC2, address, LEASE, None)]
        assert [x.mac for x in server.leases()] == [MAC2]
        assert server.statistics()["leases_taken_over"] == 1

    def test_same_mac_new_client_id_takes_over(self) -> None:
        server = make_server(max_clients=4)
        address = dora(server)
        client_id = b"\xff" + bytes(14)
        server.receive(message(1, options={Option.CLIENT_ID: client_id}), MAC, 1.0)
        _, offer = one_reply(server)
        assert offer.yiaddr == address
        assert [x.client_id for x in server.leases()] == [client_id]


# -- REQUEST in every state, NAK ---------------------------------------------------------------


class TestRequest:
    def test_request_for_another_address_is_naked(self) -> None:
        server = make_server()
        address = dora(server)
        other = address + 1
        server.receive(message(3, options={50: other.packed}), MAC, 5.0)  # INIT-REBOOT
        reply, nak = one_reply(server)
        assert nak.message_type() == MessageType.NAK
        assert (reply.dst_ip, reply.dst_mac) == (BROADCAST, ethernet.BROADCAST)
        assert nak.yiaddr == nak.ciaddr == UNSPECIFIED
        assert nak.options[Option.SERVER_ID] == GW.packed
        assert nak.options[Option.MESSAGE] == b"wrong_address"
        assert Option.LEASE_TIME not in nak.options
        assert server.events() == [NakSent(b"\x01" + MAC, MAC, other, "wrong_address")]

    def test_selecting_another_address_is_naked(self) -> None:
        server = make_server()
        claim, _, _ = offered(server)
        server.receive(selecting(claim.address + 1), MAC, 1.0)
        _, nak = one_reply(server)
        assert nak.message_type() == MessageType.NAK
        assert server.events() == [NakSent(b"\x01" + MAC, MAC, claim.address + 1, "not_offered")]

    def test_request_outside_the_subnet_or_reserved_is_naked(self) -> None:
        server = make_server()
        for address, reason in ((IPv4Address("10.1.2.3"), "not_in_subnet"), (GW, "unavailable")):
            server.receive(message(3, options={50: address.packed}), MAC, 0.0)
            _, nak = one_reply(server)
            assert nak.message_type() == MessageType.NAK
            assert server.events() == [NakSent(b"\x01" + MAC, MAC, address, reason)]
        assert server.dht_requests() == []

    def test_client_chose_another_server(self) -> None:
        server = make_server()
        claim, _, _ = offered(server)
        other = {Option.SERVER_ID: IPv4Address("100.64.0.254").packed, 50: b"\x64\x40\x00\x05"}
        server.receive(message(3, options=other), MAC, 1.0)
        assert server.replies() == []
        assert server.dht_requests() == [Release(claim.address, claim.key)]
        assert server.leases() == []
        assert server.statistics()["dropped_other_server"] == 1

    def test_renewal_acks_the_same_lease_and_renews_the_claim(self) -> None:
        server = make_server()
        address = dora(server)
        t1 = LEASE / 2
        server.receive(message(3, ciaddr=address, xid=7), MAC, t1)  # RENEWING, unicast
        reply, ack = one_reply(server)
        assert ack.message_type() == MessageType.ACK
        assert (ack.ciaddr, ack.yiaddr, ack.xid) == (address, address, 7)
        assert (reply.dst_ip, reply.dst_mac) == (address, MAC)
        assert int.from_bytes(ack.options[Option.LEASE_TIME], "big") == LEASE
        assert server.events() == [LeaseRenewed(b"\x01" + MAC, MAC, address, LEASE)]
        [renewal] = claims(server)
        assert (renewal.address, renewal.renewal) == (address, True)
        assert server.next_deadline() == t1 + 30.0  # the renewal claim's timeout
        server.address_won(renewal.token, address, t1 + 1)
        assert server.next_deadline() == t1 + LEASE
        server.receive(message(3, ciaddr=address), MAC, t1 + 2)  # a retransmission
        assert one_reply(server)[1].message_type() == MessageType.ACK
        assert server.dht_requests() == []  # confirmed a moment ago: no new claim

    def test_renewal_lost_revokes_the_lease(self) -> None:
        server = make_server()
        address = dora(server)
        server.receive(message(3, ciaddr=address), MAC, LEASE / 2)
        server.replies()
        server.events()
        [renewal] = claims(server)
        server.address_lost(renewal.token, address, LEASE / 2 + 1)
        assert server.events() == [LeaseRevoked(b"\x01" + MAC, MAC, address)]
        assert server.dht_requests() == []  # not ours: nothing to delete
        server.receive(message(3, ciaddr=address), MAC, LEASE / 2 + 10)  # within avoid_s
        _, nak = one_reply(server)
        assert nak.message_type() == MessageType.NAK
        server.events()
        server.receive(message(3, ciaddr=address), MAC, LEASE / 2 + 700)  # after: ask again
        assert [c.address for c in claims(server)] == [address]

    def test_any_claim_lost_revokes_whoever_holds_the_address(self) -> None:
        server = make_server()
        address = dora(server)
        server.receive(message(3, ciaddr=address), MAC, LEASE / 2)
        [renewal] = claims(server)  # still in flight when ...
        server.receive(message(MessageType.RELEASE, ciaddr=address), MAC, LEASE / 2 + 1)
        server.receive(message(3, options={50: address.packed}), MAC, LEASE / 2 + 2)
        release, claim = server.dht_requests()  # ... the client takes the address again
        assert isinstance(release, Release) and isinstance(claim, Claim)
        server.address_won(claim.token, address, LEASE / 2 + 3)
        server.replies()
        server.events()
        server.address_lost(renewal.token, address, LEASE / 2 + 4)  # the old claim: taken
        assert server.events() == [LeaseRevoked(b"\x01" + MAC, MAC, address)]
        assert server.leases() == []

    def test_lease_lost_in_the_dht_revokes_the_lease(self) -> None:
        server = make_server()
        address = dora(server)
        server.address_lost(None, address, 100.0)
        assert server.events() == [LeaseRevoked(b"\x01" + MAC, MAC, address)]
        assert server.leases() == [] and server.next_deadline() is None

    def test_renewal_claim_failure_keeps_the_lease(self) -> None:
        server = make_server()
        address = dora(server)
        server.receive(message(3, ciaddr=address), MAC, LEASE / 2)
        [renewal] = claims(server)
        server.claim_failed(renewal.token, address, LEASE / 2 + 9)
        assert server.dht_requests() == []
        assert [x.state for x in server.leases()] == ["bound"]

    def test_init_reboot_of_an_unknown_client_claims_its_address(self) -> None:
        """A restarted node (or control) has no leases; the host asks for its address."""
        server = make_server()
        server.receive(message(3, options={50: PREFERRED.packed}), MAC, 0.0)
        assert server.replies() == []
        [claim] = claims(server)
        assert claim.address == PREFERRED
        server.address_won(claim.token, PREFERRED, 0.2)
        _, ack = one_reply(server)
        assert (ack.message_type(), ack.yiaddr) == (MessageType.ACK, PREFERRED)
        assert server.events() == [LeaseGranted(b"\x01" + MAC, MAC, PREFERRED, LEASE, None)]

    def test_rebinding_of_an_unknown_client_whose_address_is_taken(self) -> None:
        server = make_server()
        server.receive(message(3, ciaddr=PREFERRED, flags=FLAG_BROADCAST), MAC, 0.0)
        [claim] = claims(server)
        server.address_lost(claim.token, PREFERRED, 0.2)
        reply, nak = one_reply(server)
        assert nak.message_type() == MessageType.NAK and reply.broadcast
        assert server.events() == [NakSent(b"\x01" + MAC, MAC, PREFERRED, "taken")]
        assert server.leases() == []

    def test_request_without_an_address_is_dropped(self) -> None:
        server = make_server()
        server.receive(message(3), MAC, 0.0)
        server.receive(message(3, options={Option.SERVER_ID: GW.packed}), MAC, 0.0)
        assert server.replies() == []
        assert server.statistics()["dropped_request_without_address"] == 2


# -- RELEASE, DECLINE, INFORM ------------------------------------------------------------------


class TestOtherMessages:
    def test_release(self) -> None:
        server = make_server()
        address = dora(server)
        release = message(MessageType.RELEASE, ciaddr=address, options={54: GW.packed})
        server.receive(release, MAC, 10.0)
        assert server.replies() == []  # RELEASE has no answer
        assert server.dht_requests() == [Release(address, f"ip:lab:{address}".encode())]
        assert server.events() == [LeaseReleased(b"\x01" + MAC, MAC, address)]
        assert server.leases() == [] and server.next_deadline() is None
        server.receive(release, MAC, 11.0)  # again: nothing to release
        assert server.statistics()["dropped_release_unknown"] == 1

    def test_release_of_an_address_not_held_is_dropped(self) -> None:
        server = make_server()
        address = dora(server)
        server.receive(message(MessageType.RELEASE, ciaddr=address + 1), MAC, 1.0)
        assert server.dht_requests() == [] and len(server.leases()) == 1

    def test_decline_marks_the_address_bad(self) -> None:
        server = make_server()
        server.preferred(PREFERRED)
        address = dora(server)
        assert address == PREFERRED
        decline = {Option.REQUESTED_ADDRESS: address.packed, Option.SERVER_ID: GW.packed}
        server.receive(message(MessageType.DECLINE, options=decline), MAC, 2.0)
        assert server.replies() == []
        assert server.events() == [AddressDeclined(b"\x01" + MAC, MAC, address)]
        assert server.dht_requests() == [Release(address, f"ip:lab:{address}".encode())]
        server.receive(message(MessageType.DISCOVER), MAC, 12.0)  # the client starts over
        [claim] = claims(server)
        assert claim.address != PREFERRED  # the next candidate
        assert claim.address == derive_address(SUBNET, NODE, make_settings().reserved_addresses)

    def test_inform_gets_options_without_an_address_or_lease(self) -> None:
        server = make_server()
        here = IPv4Address("100.64.0.200")
        server.receive(message(MessageType.INFORM, ciaddr=here), MAC, 0.0)
        reply, ack = one_reply(server)
        assert ack.message_type() == MessageType.ACK
        assert (ack.yiaddr, ack.ciaddr) == (UNSPECIFIED, here)
        assert (reply.dst_ip, reply.dst_mac) == (here, MAC)
        for code in (Option.LEASE_TIME, Option.RENEWAL_TIME, Option.REBINDING_TIME):
            assert code not in ack.options
        for code in (1, 3, 6, 15, 26, 53, 54):
            assert code in ack.options
        assert server.dht_requests() == [] and server.leases() == []


# -- timers and DHT failures -------------------------------------------------------------------


class TestTimers:
    def test_offer_expires(self) -> None:
        server = make_server()
        claim, _, _ = offered(server, now=1.0)
        server.handle_timer(60.9)
        assert server.dht_requests() == []
        server.handle_timer(61.0)
        assert server.dht_requests() == [Release(claim.address, claim.key)]
        assert server.events() == [OfferExpired(b"\x01" + MAC, MAC, claim.address)]
        assert server.next_deadline() is None

    def test_lease_expires(self) -> None:
        server = make_server()
        address = dora(server)
        assert server.next_deadline() == LEASE
        server.handle_timer(LEASE)
        assert server.events() == [LeaseExpired(b"\x01" + MAC, MAC, address)]
        assert server.dht_requests() == [Release(address, f"ip:lab:{address}".encode())]

    def test_claim_failure_releases_and_sends_nothing(self) -> None:
        server = make_server()
        server.receive(message(1), MAC, 0.0)
        [claim] = claims(server)
        server.claim_failed(claim.token, claim.address, 9.0)
        assert server.replies() == []
        assert server.dht_requests() == [Release(claim.address, claim.key)]
        server.receive(message(1), MAC, 12.0)  # the client asks again: the same candidate
        assert [c.address for c in claims(server)] == [claim.address]

    def test_claim_timeout(self) -> None:
        server = make_server()
        server.receive(message(1), MAC, 0.0)
        [claim] = claims(server)
        server.handle_timer(30.0)
        assert server.dht_requests() == [Release(claim.address, claim.key)]
        assert server.leases() == []
        server.address_won(claim.token, claim.address, 31.0)  # too late: no OFFER ...
        assert server.replies() == [] and server.leases() == []
        # ... but the record is ours now (a create the DHT retried over our delete): delete it
        assert server.dht_requests() == [Release(claim.address, claim.key)]
        assert server.statistics()["unknown_claim"] == 1
        assert server.statistics()["claim_timeouts"] == 1

    def test_claim_result_for_the_wrong_address_is_ignored(self) -> None:
        server = make_server()
        server.receive(message(1), MAC, 0.0)
        [claim] = claims(server)
        server.address_won(claim.token, claim.address + 1, 0.0)
        assert server.replies() == []
        assert server.statistics()["claim_mismatch"] == 1
        server.address_won(claim.token, claim.address, 0.0)
        assert len(server.replies()) == 1

    def test_a_won_claim_nobody_wants_is_released(self) -> None:
        server = make_server()
        address = dora(server)
        server.receive(message(3, ciaddr=address), MAC, LEASE / 2)
        [renewal] = claims(server)
        server.receive(message(MessageType.RELEASE, ciaddr=address), MAC, LEASE / 2 + 1)
        assert len(server.dht_requests()) == 1  # the release
        server.address_won(renewal.token, address, LEASE / 2 + 2)  # re-created the record
        assert server.dht_requests() == [Release(address, renewal.key)]


# -- malformed and unwanted input --------------------------------------------------------------


def _drop_cases() -> list[tuple[bytes, bytes, str]]:
    discover = MessageType.DISCOVER
    return [
        (message(discover, op=2), MAC, "not_request"),
        (message(discover, htype=6), MAC, "unsupported_hardware"),
        (message(discover, hlen=16), MAC, "unsupported_hardware"),
        (message(discover, giaddr=IPv4Address("100.64.0.9")), MAC, "relayed"),
        (message(discover), MAC2, "chaddr_mismatch"),
        (message(None), MAC, "bootp"),
        (message(MessageType.OFFER), MAC, "not_client_message"),
        (message(MessageType.NAK), MAC, "not_client_message"),
        (message(9), MAC, "unknown_message_type"),
        (message(discover, options={53: b"\x01\x01"}), MAC, "dhcp_bad_message_type"),
        (message(discover, options={50: b"\x01\x02\x03"}), MAC, "dhcp_bad_option_50"),
        (message(3, options={54: b""}), MAC, "dhcp_bad_option_54"),
        (message(discover, options={61: b"\x01"}), MAC, "dhcp_bad_option_61"),
        (message(discover, options={12: b""}), MAC, "dhcp_bad_option_12"),
        (message(discover, options={57: b"\x02"}), MAC, "dhcp_bad_option_57"),
        (REAL_DISCOVER[:100], MAC, "dhcp_truncated"),
    ]


@pytest.mark.parametrize(("data", "mac", "reason"), _drop_cases())
def test_unwanted_input_is_a_counted_drop(data: bytes, mac: bytes, reason: str) -> None:
    server = make_server()
    server.receive(data, mac, 0.0)
    assert server.replies() == [] and server.dht_requests() == [] and server.events() == []
    assert server.statistics() == {f"dropped_{reason}": 1}


def test_allowed_macs() -> None:
    server = make_server(allowed_macs=frozenset({MAC2}))
    server.receive(message(1), MAC, 0.0)
    assert server.statistics() == {"dropped_mac_not_allowed": 1}
    server.receive(message(1, mac=MAC2), MAC2, 0.0)
    assert len(claims(server)) == 1


def test_oversized_reply_drops_the_host_name() -> None:
    server = make_server(domain="d" * 200)
    server.preferred(PREFERRED)
    _, reply, offer = offered(server, message(1, options={Option.HOST_NAME: b"h" * 200}))
    assert len(reply.payload) <= 576 - 28
    assert Option.HOST_NAME not in offer.options and Option.DOMAIN_NAME in offer.options
    big = {Option.HOST_NAME: b"h" * 200, Option.MAX_MESSAGE_SIZE: (1500).to_bytes(2, "big")}
    server.receive(message(1, options=big), MAC, 1.0)
    assert one_reply(server)[1].options[Option.HOST_NAME] == b"h" * 200


def _valid_messages() -> list[bytes]:
    opts = {Option.SERVER_ID: GW.packed, Option.REQUESTED_ADDRESS: PREFERRED.packed}
    return [
        REAL_DISCOVER,
        message(1, options={Option.CLIENT_ID: b"\x01" + MAC2, 57: b"\x05\xdc"}),
        message(3, options=opts),
        message(3, ciaddr=PREFERRED),
        message(3, options={50: PREFERRED.packed}),
        message(4, options=opts),
        message(7, ciaddr=PREFERRED, options={54: GW.packed}),
        message(8, ciaddr=PREFERRED),
    ]


def _settle(
    server: DhcpServer,
    rng: random.Random,
    now: float,
    owned: set[IPv4Address] | None = None,
    pending: list[Claim] | None = None,
) -> None:
    """Give the claims made (and those ``pending``) a random verdict or none, and drain the
    outputs. ``owned``: the addresses whose record is ours, as the DHT would see it."""
    owned = set() if owned is None else owned
    pending = [] if pending is None else pending
    for request in server.dht_requests():
        if isinstance(request, Claim):
            pending.append(request)
        else:
            owned.discard(request.address)
    for claim in list(pending):
        verdict = rng.choice(("won", "lost", "failed", None))
        if verdict is not None:
            pending.remove(claim)
        if verdict == "won":
            server.address_won(claim.token, claim.address, now)
            owned.add(claim.address)
        elif verdict == "lost":
            server.address_lost(claim.token, claim.address, now)
            owned.discard(claim.address)
        elif verdict == "failed":
            server.claim_failed(claim.token, claim.address, now)
    server.replies()
    server.events()


class TestFuzz:
    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=700))
    def test_random_bytes_never_raise(self, data: bytes) -> None:
        server = make_server()
        server.receive(data, MAC, 0.0)
        server.receive_frame(data, 0.0)
        server.receive_frame(REAL_DISCOVER_FRAME[:42] + data, 0.0)
        assert sum(server.statistics().values()) >= 3

    @settings(max_examples=400, deadline=None)
    @given(st.data())
    def test_mutated_valid_packets_never_raise(self, data: st.DataObject) -> None:
        server = make_server(seed=data.draw(st.integers(0, 2**16)))
        rng = random.Random(data.draw(st.integers(0, 2**16)))
        server.preferred(PREFERRED)
        dora(server)
        packet = bytearray(data.draw(st.sampled_from(_valid_messages())))
        for _ in range(data.draw(st.integers(1, 8))):
            where = data.draw(st.integers(0, len(packet) - 1))
            packet[where] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(packet)))
        packet = packet[:cut] + data.draw(st.binary(max_size=40))
        server.receive(bytes(packet), MAC, 1.0)
        _settle(server, rng, 2.0)
        server.handle_timer(data.draw(st.floats(0, 10 * LEASE)))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(range(len(_valid_messages()))),
                st.sampled_from([MAC, MAC2]),
                st.floats(0, 100),
                st.integers(0, 2**16),
            ),
            max_size=25,
        ),
        st.integers(1, 3),
    )
    def test_random_conversations_keep_the_invariants(
        self, steps: list[tuple[int, bytes, float, int]], max_clients: int
    ) -> None:
        """Whatever the clients and the DHT say: at most ``max_clients`` leases, no address
        held twice, none reserved, every held address's record ours, a timer while there
        are leases; and once every claim is answered and every timer has run, no lease and
        no record left (the DHT would renew a leaked record forever)."""
        server = make_server(max_clients=max_clients, claim_tries=3)
        server.preferred(PREFERRED)
        reserved = make_settings().reserved_addresses
        valid = _valid_messages()
        owned: set[IPv4Address] = set()
        pending: list[Claim] = []
        now = 0.0
        for index, mac, dt, seed in steps:
            now += dt
            data = bytearray(valid[index])
            data[28:34] = mac
            server.receive(bytes(data), mac, now)
            if seed % 7 == 0 and server.leases():
                lost = server.leases()[0].address  # the DHT's LeaseLost
                server.address_lost(None, lost, now)
                owned.discard(lost)
            _settle(server, random.Random(seed), now, owned, pending)
            server.handle_timer(now)
            leases = server.leases()
            assert len(leases) <= max_clients
            held = [x.address for x in leases if x.state != "claiming"]
            assert len(held) == len(set(held))
            assert set(held) <= owned
            assert all(x.address in SUBNET and x.address not in reserved for x in leases)
            assert not leases or server.next_deadline() is not None
        rng = random.Random(len(steps))
        for _ in range(10):
            now += 10 * LEASE
            server.handle_timer(now)
            _settle(server, rng, now, owned, pending)
        _settle(server, rng, now, owned, pending)
        assert server.leases() == [] and server.next_deadline() is None
        assert owned == set()


# -- frames ------------------------------------------------------------------------------------


class TestFrames:
    def test_real_frame_gives_its_payload_and_mac(self) -> None:
        payload, mac = request_from_frame(REAL_DISCOVER_FRAME, 67, verify_udp_checksum=True)
        assert (payload, mac) == (REAL_DISCOVER, MAC)

    def test_receive_frame(self) -> None:
        server = make_server()
        server.receive_frame(REAL_DISCOVER_FRAME, 0.0)
        assert len(claims(server)) == 1

    @pytest.mark.parametrize(
        ("frame", "reason"),
        [
            (REAL_DISCOVER_FRAME[:10], "ethernet_truncated"),
            (REAL_DISCOVER_FRAME[:12] + b"\x86\xdd" + REAL_DISCOVER_FRAME[14:], "not_ipv4"),
            (REAL_DISCOVER_FRAME[:23] + b"\x06" + REAL_DISCOVER_FRAME[24:], "ipv4_bad_checksum"),
            (REAL_DISCOVER_FRAME[:36] + b"\x00\x44" + REAL_DISCOVER_FRAME[38:], "wrong_port"),
        ],
    )
    def test_bad_frames_are_counted_drops(self, frame: bytes, reason: str) -> None:
        server = make_server()
        server.receive_frame(frame, 0.0)
        [(key, count)] = server.statistics().items()
        assert key.startswith("dropped_") and key.endswith(reason) and count == 1

    def test_udp_checksum_is_verified_only_on_request(self) -> None:
        """Offloaded checksums (a veth, a TAP with offloads) leave a partial sum in there."""
        frame = bytearray(REAL_DISCOVER_FRAME)
        frame[40:42] = b"\xca\x13"
        assert request_from_frame(bytes(frame), 67)[0] == REAL_DISCOVER
        with pytest.raises(RemoteProtocolError) as info:
            request_from_frame(bytes(frame), 67, verify_udp_checksum=True)
        assert info.value.reason == "dhcp_frame_bad_checksum"

    def test_reply_frame(self) -> None:
        server = make_server(server_port=1067)
        address = dora(server)
        server.receive(message(3, ciaddr=address), MAC, 1.0)
        [frame] = server.reply_frames(GW_MAC)
        eth = ethernet.parse(frame)
        assert (eth.dst, eth.src, eth.ethertype) == (MAC, GW_MAC, ethernet.ETHERTYPE_IPV4)
        ip = ipv4.parse(frame[14:], verify_checksum=True)
        assert (ip.src, ip.dst, ip.protocol, ip.ttl) == (GW, address, 17, 64)
        datagram = frame[14 + ip.header_length :]
        header = udp.parse(datagram)
        assert (header.src_port, header.dst_port) == (1067, 1068)
        assert udp.verify_ipv4_checksum(ip.src, ip.dst, datagram) and header.checksum != 0
        assert decode(datagram[8:]).message_type() == MessageType.ACK
        nak = Reply(b"x" * 300, BROADCAST, ethernet.BROADCAST, MessageType.NAK)
        frame = reply_frame(nak, server_mac=GW_MAC, server_address=GW)
        assert ethernet.parse(frame).dst == ethernet.BROADCAST
        assert ipv4.parse(frame[14:]).dst == BROADCAST


# -- settings and purity -----------------------------------------------------------------------


def test_settings_values() -> None:
    s = make_settings(lease_s=1000, server_port=1067, reserved=frozenset({GW + 5}))
    assert (s.renewal_s, s.rebinding_s, s.client_port) == (500, 875, 1068)
    assert s.dns_address == GW
    assert s.reserved_addresses == {SUBNET.network_address, SUBNET.broadcast_address, GW, GW + 5}
    assert s.key(GW + 1) == b"ip:lab:100.64.0.2"


@pytest.mark.parametrize(
    "overrides",
    [
        {"subnet": IPv4Network("100.64.0.0/31"), "server_address": IPv4Address("100.64.0.0")},
        {"server_address": IPv4Address("100.64.1.1")},
        {"server_address": SUBNET.network_address},
        {"namespace": ""},
        {"node_id": b"short"},
        {"domain": ""},
        {"domain": "é.test"},
        {"mtu": 67},
        {"lease_s": 1},
        {"server_port": 65535},
        {"max_clients": 0},
        {"claim_tries": 0},
        {"offer_timeout_s": 0.0},
        {"allowed_macs": frozenset({b"\x01"})},
    ],
)
def test_settings_refuse_nonsense(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_settings(**overrides)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "pipeline/control/dhcp").glob("*.py")), ids=lambda p: p.name
)
def test_dhcp_package_is_pure(path: Path) -> None:
    """tests/test_layering.py's check, until its list of pure modules names this package."""
    check_pure(path)
