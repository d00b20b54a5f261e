"""The fuzz targets, in two tables: ``DECODERS`` (every decoder of bytes that come from outside
the node: one call on any bytes) and ``STATEFUL`` (the cores that hold state across inputs:
junk in, then a valid input must still work). ``tests/test_fuzz.py`` drives them with
hypothesis in CI; ``bench/fuzz_long.py`` drives the same tables for long runs.

A decoder's contract: on any input it returns, or raises one of its documented error types
(``RemoteProtocolError`` and its subclasses for the codecs, ``ValueError`` for the msgspec
decoders that say so); anything else escaping is a finding. A stateful core's contract: no
exception at all, every input leaves a trace in its counters (a counted drop, or a count of
what it handled), and after junk a valid input is served as before.

``test_fuzz.py`` checks that every public ``decode*``/``parse*``/``unpack*``/``open*``/
``read*`` function and method in ``pipeline`` is in ``DECODERS`` or in ``NOT_DECODERS`` (with
the reason it takes no remote input): a new decoder cannot be left out unnoticed.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Any

from dnslib import QTYPE, DNSQuestion, DNSRecord

from pipeline import messages, records
from pipeline.classifier.classify import FrameAction
from pipeline.classifier.interface import InterfaceClassifier
from pipeline.classifier.router import RouterClassifier
from pipeline.control import crawl, shortcuts
from pipeline.control.addressing import AddressingSettings
from pipeline.control.core import ControlCore
from pipeline.control.dhcp import frames as dhcp_frames
from pipeline.control.dhcp import wire as dhcp_wire
from pipeline.control.dhcp.server import DhcpServer
from pipeline.control.dht import wire as dht_wire
from pipeline.control.dht.events import CreateResult
from pipeline.control.dht.node import Dht
from pipeline.control.dns import message as dns_message
from pipeline.control.dns.responder import DnsResponder
from pipeline.control.overlay import OverlayNode
from pipeline.control.overlay import wire as overlay_wire
from pipeline.control.overlay.events import Delivered
from pipeline.crypto import cert as cert_mod
from pipeline.crypto import handshake as hs
from pipeline.crypto.datapath import RecvSession, SendSession
from pipeline.crypto.identity import Identity
from pipeline.crypto.noise import HandshakeState, NoiseError, public_key
from pipeline.crypto.screen import HandshakeScreen, ScreenSettings
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import id_to_bytes
from pipeline.overlay_io import relay, sessions
from pipeline.wire import arp, ethernet, ipv4, ipv6, natpmp, pcp, stun, tso, udp, vnet
from pipeline.wire.overlay import DatagramType, build_header, parse_header
from tests.test_classify import PEER3, make_classifier, outbound, udp_packet
from tests.test_classify_router import M1, MAC1, R3, ip_frame, make_router
from tests.test_control_core import ENDPOINTS as CORE_ENDPOINTS
from tests.test_control_core import pair as core_pair
from tests.test_control_core import run as core_run
from tests.test_dhcp import MAC as DHCP_MAC
from tests.test_dhcp import MAC2 as DHCP_MAC2
from tests.test_dhcp import SUBNET as DHCP_SUBNET
from tests.test_dhcp import dora, make_server
from tests.test_dht import FakeNet, network
from tests.test_dns import CLIENT as DNS_CLIENT
from tests.test_dns import Client, ask, rdata
from tests.test_dns import make as make_responder
from tests.test_links import WALL
from tests.test_overlay_wire import PEER_IDS as OVERLAY_PEER_IDS
from tests.test_overlay_wire import PEERS as OVERLAY_PEERS
from tests.test_overlay_wire import SELF_ID as OVERLAY_SELF_ID
from tests.test_overlay_wire import linked_node

Call = Callable[[bytes], object]
Errors = tuple[type[BaseException], ...]

RPE: Errors = (RemoteProtocolError,)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """``calls``: each is given the same bytes and may raise only ``errors``. ``seeds``: valid
    inputs, mutated by the fuzzers; each must go through every call without an error."""

    calls: tuple[Call, ...]
    errors: Errors
    seeds: tuple[bytes, ...]
    max_size: int = 300


# -- seeds -------------------------------------------------------------------------------------

MAC = bytes.fromhex("02aabbccdd01")
ME = IPv4Address("100.64.0.1")
PEER = IPv4Address("100.64.0.7")
ARP_REQUEST = ethernet.build(
    ethernet.BROADCAST,
    MAC,
    ethernet.ETHERTYPE_ARP,
    arp.build(arp.ArpPacket(arp.ArpOp.REQUEST, MAC, ME, bytes(6), PEER)),
)
UDP_DATAGRAM = udp.build(40000, 5001, b"fuzz" * 8, src=ME, dst=PEER)
UDP_PACKET = ipv4.build(src=ME, dst=PEER, protocol=ipv4.Protocol.UDP, payload=UDP_DATAGRAM)
IP_FRAME = ethernet.build(MAC, MAC, ethernet.ETHERTYPE_IPV4, UDP_PACKET)
ND_SOLICITATION = ipv6.build(
    src=IPv6Address("fe80::1"),
    dst=IPv6Address("ff02::1:ff00:7"),
    next_header=58,
    payload=bytes([135]) + bytes(23),
)


def tcp_segment(seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    """An IPv4 TCP segment with a partial checksum (as a peer's cut super-frame has)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 1, 5 << 4, flags, 512, 0, 0)
    return ipv4.build(src=ME, dst=PEER, protocol=ipv4.Protocol.TCP, payload=tcp + payload)


TCP_SEGMENT = tcp_segment(1000, bytes(100))
TCP_SUPER_FRAME = tcp_segment(1000, bytes(250))  # 3 segments of at most 100 bytes
UDP_SUPER_FRAME = ipv4.build(
    src=ME, dst=PEER, protocol=ipv4.Protocol.UDP, payload=udp.build(40000, 5001, bytes(250))
)

STUN_REQUEST = stun.binding_request(bytes(range(12)))
STUN_SUCCESS = stun.binding_success(bytes(range(12)), ("198.18.0.9", 4000))
NATPMP_SEEDS = (
    natpmp.ExternalAddressRequest().encode(),
    natpmp.MapRequest(40000, 40000, 7200).encode(),
    bytes.fromhex("0080 0000 000004b0 c6125a0b"),
    bytes.fromhex("0081 0000 000004b0 9c40 9c41 00001c20"),
)
PCP_SEEDS = (
    bytes.fromhex("0200 0000 00000000 00000000 00000000 0000ffff c613010a"),
    bytes.fromhex("0280 0000 00000000 00000005 000000000000000000000000"),
)

OVERLAY_SEEDS = (
    overlay_wire.encode(overlay_wire.Ping(id_to_bytes(0xAA << 152), 1, 0.5)),
    overlay_wire.encode(
        overlay_wire.Hello(id_to_bytes(0x70 << 152), 2, 7, bytes([198, 18, 0, 2, 15, 160]), True)
    ),
)
CA = Identity.from_seed(b"C" * 32)
CA_CERTIFICATE = cert_mod.make_ca(CA, name="authority", not_before=0, not_after=2**40, serial=1)
NODE = Identity.from_seed(b"N" * 32)
CERTIFICATE = cert_mod.issue(
    CA,
    CA_CERTIFICATE,
    public_key=NODE.public_key,
    name="alpha",
    networks=["lab"],
    addresses=[],
    not_before=0,
    not_after=2**39,
    serial=2,
)

KEY = b"ip:lab:100.64.0.7"
RECORD = dht_wire.sign_record(NODE, KEY, bytes(NODE.node_id), seq=1, lease_s=600.0)
DHT_SEEDS = (
    dht_wire.encode(dht_wire.Get(1, KEY)),
    dht_wire.encode(dht_wire.Create(2, RECORD)),
    dht_wire.encode(dht_wire.Store(3, dht_wire.Held(RECORD, 500.0), True)),
    dht_wire.encode(dht_wire.Reply(4, 0, 1, (dht_wire.Held(RECORD, 500.0),))),
)
CRAWLER = bytes(range(20))
CRAWL_SEEDS = (
    crawl.encode(crawl.LinksQuery(5)),
    crawl.make_answer(
        crawl.own_links(
            bytes(NODE.node_id),
            "alpha",
            ["100.64.0.7"],
            [crawl.Connection(bytes(20), "near", False), crawl.Connection(CRAWLER, "tunnel", True)],
        ),
        crawler=CRAWLER,
        query_id=5,
        identity=NODE,
        certificate=CERTIFICATE,
    ),
)
PATH_SEEDS = (
    shortcuts.encode(shortcuts.PathGo(3)),
    shortcuts.encode(
        shortcuts.PathOffer(1, True, (("198.18.0.9", 4789, "reflexive"), ("10.0.0.2", 1, "local")))
    ),
)
PROBE_SEEDS = (
    shortcuts.encode(shortcuts.Probe(3, 1.0)),
    shortcuts.encode(shortcuts.ProbeAck(3, 1.0, "198.18.0.9:4789")),
)

DNS_QUERY = DNSRecord(q=DNSQuestion("c064000007.vpn.test", QTYPE.A)).pack()

DHCP_DISCOVER = dhcp_wire.encode(
    dhcp_wire.DhcpMessage(
        op=1,
        xid=0xD7BC2437,
        chaddr=MAC + bytes(10),
        options={dhcp_wire.Option.MESSAGE_TYPE: bytes((dhcp_wire.MessageType.DISCOVER,))},
    )
)
DHCP_FRAME = ethernet.build(
    ethernet.BROADCAST,
    MAC,
    ethernet.ETHERTYPE_IPV4,
    ipv4.build(
        src=IPv4Address("0.0.0.0"),
        dst=IPv4Address("255.255.255.255"),
        protocol=ipv4.Protocol.UDP,
        payload=udp.build(68, 67, DHCP_DISCOVER),
    ),
)


MAC1_KEY = hs.mac1_key(bytes(32))
HANDSHAKE = hs.build_handshake(
    MAC1_KEY,
    receiver_index=0,
    pattern=hs.Pattern.IK,
    step=0,
    sender_index=0x1234,
    noise=bytes(96),
)
PAYLOAD = hs.encode_payload(hs.HandshakePayload(CERTIFICATE.encode(), 1))
COOKIE_KEY = bytes(range(32))
COOKIE_MAC1 = bytes(16)
COOKIE_REPLY = hs.build_cookie_reply(
    COOKIE_KEY, receiver_index=9, cookie=bytes(16), mac1=COOKIE_MAC1, nonce=bytes(24)
)

SESSION_KEY = bytes(range(32))
SESSION_INDEX = 0xA1B2C3D4


def _sealed(payload: bytes, dtype: int = DatagramType.DATA) -> bytes:
    send = SendSession(SESSION_KEY, index=SESSION_INDEX, created=0.0)
    return b"".join(send.seal(dtype, payload))


SEALED = _sealed(b"fuzz" * 10)
OWN_ID = id_to_bytes(0x80 << 152)
RELAY_TABLE = relay.RelayTable(
    OWN_ID, [(1, id_to_bytes(0x70 << 152)), (2, id_to_bytes(0x90 << 152))]
)
RELAYED = relay.pack_relay(id_to_bytes(0x90 << 152), 5, SEALED)


# -- calls: a decoder and what its caller does with the result ---------------------------------


def _open(datagram: bytes) -> object:
    """A fresh session for every call: the window of one would refuse a seed's replay."""
    return RecvSession(SESSION_KEY, index=SESSION_INDEX, created=0.0).open(datagram)


def _open_run(batch: bytes) -> object:
    """A GRO batch of ``segment``-byte datagrams (the segment size from the batch's last byte)."""
    segment = max(1, batch[-1] if batch else 1)
    session = RecvSession(SESSION_KEY, index=SESSION_INDEX, created=0.0)
    drops: dict[str, int] = {}
    opened: list[tuple[bytes, int]] = []
    at, nbytes = session.open_run(memoryview(batch), 0, segment, DatagramType.DATA, opened, drops)
    assert 0 <= at <= len(batch) and 0 <= nbytes <= at and (nbytes > 0) == bool(opened)
    return at


def _stun(datagram: bytes) -> object:
    stun.is_stun(datagram)
    message = stun.parse(datagram)
    message.unknown_required()
    return message.reflexive


def _stun_is(datagram: bytes) -> object:
    return stun.is_stun(datagram)


def _ipv4_checked(packet: bytes) -> object:
    return ipv4.parse(packet, verify_checksum=True)


def _ipv4_addresses(packet: bytes) -> object:
    return ipv4.src_bytes(packet), ipv4.dst_bytes(packet), ipv4.checksum(packet)


def _udp_checksum(datagram: bytes) -> object:
    return udp.verify_ipv4_checksum(ME, PEER, datagram)


def _dht(payload: bytes) -> object:
    """The decoded message's records checked, as a storing node does."""
    dht_wire.is_dht(payload)
    message = dht_wire.decode(payload)
    found: list[dht_wire.DhtRecord] = []
    if isinstance(message, dht_wire.Create | dht_wire.Delete):
        found.append(message.record)
    elif isinstance(message, dht_wire.Store):
        found.append(message.held.record)
    elif isinstance(message, dht_wire.Reply):
        found += [held.record for held in message.held]
    for record in found:
        dht_wire.check_record(record)
        record.owner_id  # noqa: B018 - what the node computes next
    return message


def _crawl(payload: bytes) -> object:
    crawl.is_links(payload)
    message = crawl.decode(payload)
    if isinstance(message, crawl.LinksAnswer):
        try:
            crawl.check_answer(
                message,
                src=bytes(NODE.node_id),
                crawler=CRAWLER,
                ca=CA_CERTIFICATE,
                revoked=cert_mod.RevocationList.empty(),
                networks=("lab",),
                wall=1000.0,
            )
        except RemoteProtocolError:
            pass
    return message


def _handshake(datagram: bytes) -> object:
    message = hs.parse_handshake(datagram)
    hs.check_mac1(MAC1_KEY, datagram)
    hs.check_mac2(bytes(16), datagram)
    return message


_SCREEN = HandshakeScreen(
    bytes(32), bytes, 0.0, ScreenSettings(per_source_burst=1e12, per_source_rate=1e12)
)  # the CA key whose mac1_key is MAC1_KEY; buckets that never run dry


def _screen(datagram: bytes) -> object:
    """overlay_io's screen takes every HANDSHAKE or COOKIE datagram as it came: nothing may
    escape it (a drop is counted), and so the answer to junk is False."""
    admitted = _SCREEN.screen(datagram, ("198.18.0.9", 4789), 1.0)
    _SCREEN.unknown_session(0x1234, ("198.18.0.9", 4789), 1.0)
    _SCREEN.datagrams_to_send()
    return admitted


def _cookie(datagram: bytes) -> object:
    if len(datagram) >= 8:  # the caller (LinkManager.receive) checks the header's length first
        hs.cookie_receiver(datagram)
    return hs.open_cookie_reply(COOKIE_KEY, datagram, COOKIE_MAC1)


def _relay(payload: bytes) -> object:
    step = relay.on_relay(RELAY_TABLE, payload)
    relay.parse_relay(payload)
    return step


def _pem(data: bytes) -> object:
    return cert_mod.from_pem(data.decode("utf-8", "replace"))


def _pem_wrapped(data: bytes) -> object:
    """Whatever stands between the armour lines, in the armour (the seed's own are dropped)."""
    lines = data.decode("ascii", "replace").splitlines()
    text = "\n".join(line for line in lines if not line.startswith("-----"))
    return cert_mod.from_pem(
        f"-----BEGIN AUTOVN CERTIFICATE-----\n{text}\n-----END AUTOVN CERTIFICATE-----\n"
    )


def _vnet(data: bytes) -> object:
    return vnet.parse(data), vnet.parse(vnet.shift(data, -14))


def _segment(data: bytes) -> object:
    """A virtio-net header and the packet behind it, cut and summed (``tso.segment``)."""
    return tso.segment(vnet.parse(data), data[vnet.LEN :])


def _natpmp_names(datagram: bytes) -> object:
    response = natpmp.parse_response(datagram)
    return natpmp.result_name(getattr(response, "result", 0))


def _pcp_names(datagram: bytes) -> object:
    response = pcp.parse_response(datagram)
    return pcp.result_name(getattr(response, "result", 0))


def _dhcp_frame(frame: bytes) -> object:
    return dhcp_frames.request_from_frame(frame, 67, verify_udp_checksum=True)


IK = hs.Pattern.IK.protocol
INIT_S, RESP_S = bytes(range(1, 33)), bytes(range(101, 133))
INIT_E, RESP_E = bytes(range(201, 233)), bytes(range(33, 65))


def noise_pair(protocol: str = IK) -> tuple[HandshakeState, HandshakeState]:
    """Initiator and responder of ``protocol`` (IK or XX), fixed static keys."""
    rs = public_key(RESP_S) if "_IK_" in protocol else None
    return (
        HandshakeState(protocol, initiator=True, s=INIT_S, e=INIT_E, rs=rs),
        HandshakeState(protocol, initiator=False, s=RESP_S, e=RESP_E),
    )


def _noise_responder(message: bytes) -> object:
    """A responder's first read: junk where an initiation should be."""
    _, responder = noise_pair()
    return responder.read_message(message)


def _noise_initiator(message: bytes) -> object:
    """An initiator's read of junk where the response to its initiation should be."""
    initiator, _ = noise_pair(hs.Pattern.XX.protocol)
    initiator.write_message(b"")
    return initiator.read_message(message)


PING_OVERLAY = messages.encode_overlay(messages.Ping(1, 2, "n1"))


DECODERS: dict[str, Decoder] = {
    # pipeline/wire: what the classifier, overlay_io and the NAT drivers parse
    "pipeline.wire.ethernet.parse": Decoder((ethernet.parse,), RPE, (ARP_REQUEST, IP_FRAME)),
    "pipeline.wire.arp.parse": Decoder((arp.parse,), RPE, (ARP_REQUEST[14:],)),
    "pipeline.wire.ipv4.parse": Decoder(
        (ipv4.parse, _ipv4_checked, _ipv4_addresses), RPE, (UDP_PACKET, TCP_SEGMENT)
    ),
    "pipeline.wire.ipv6.parse": Decoder(
        (ipv6.parse, ipv6.is_neighbour_discovery), RPE, (ND_SOLICITATION,)
    ),
    "pipeline.wire.udp.parse": Decoder((udp.parse, _udp_checksum), RPE, (UDP_DATAGRAM,)),
    "pipeline.wire.stun.parse": Decoder((_stun_is, _stun), RPE, (STUN_REQUEST, STUN_SUCCESS)),
    "pipeline.wire.natpmp.parse_request": Decoder((natpmp.parse_request,), RPE, NATPMP_SEEDS[:2]),
    "pipeline.wire.natpmp.parse_response": Decoder((_natpmp_names,), RPE, NATPMP_SEEDS[2:]),
    "pipeline.wire.pcp.parse_request": Decoder((pcp.parse_request,), RPE, PCP_SEEDS[:1]),
    "pipeline.wire.pcp.parse_response": Decoder((_pcp_names,), RPE, PCP_SEEDS[1:]),
    "pipeline.wire.overlay.parse_header": Decoder((parse_header,), RPE, (SEALED,)),
    # vnet headers come from the kernel (``struct.error`` if short: documented), and tso cuts
    # what they describe; a peer's packets reach tso through the coalescer (STATEFUL)
    "pipeline.wire.vnet.parse": Decoder((_vnet,), (struct.error,), (vnet.build(),)),
    "pipeline.wire.tso.segment": Decoder(
        (_segment,),
        (struct.error, ValueError),
        (
            vnet.build(vnet.NEEDS_CSUM, 0, 0, 0, 20, 16) + TCP_SEGMENT,
            vnet.build(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 40, 100, 20, 16) + TCP_SUPER_FRAME,
            vnet.build(vnet.NEEDS_CSUM, vnet.GSO_UDP_L4, 28, 100, 20, 6) + UDP_SUPER_FRAME,
        ),
    ),
    # the node's own rings and ZeroMQ messages
    "pipeline.records.unpack_endpoint": Decoder(
        (records.unpack_endpoint,), (), (records.pack_endpoint("198.18.0.1", 4789),)
    ),
    "pipeline.messages.decode": Decoder(
        (messages.decode,), (ValueError,), (messages.encode(messages.Stop()),)
    ),
    "pipeline.messages.decode_overlay": Decoder(
        (messages.decode_overlay,), (ValueError,), (PING_OVERLAY,)
    ),
    # control's codecs: overlay, DHT, crawl, shortcuts, handshake, certificates
    "pipeline.control.overlay.wire.decode": Decoder((overlay_wire.decode,), RPE, OVERLAY_SEEDS),
    "pipeline.control.overlay.wire.HostPortCodec.decode": Decoder(
        (overlay_wire.HostPortCodec().decode,), (ValueError,), (bytes([198, 18, 0, 2, 15, 160]),)
    ),
    "pipeline.control.dht.wire.decode": Decoder((_dht,), RPE, DHT_SEEDS),
    "pipeline.control.crawl.decode": Decoder((_crawl,), RPE, CRAWL_SEEDS),
    "pipeline.control.shortcuts.decode_path": Decoder(
        (shortcuts.decode_path,), (ValueError,), PATH_SEEDS
    ),
    "pipeline.control.shortcuts.decode_probe": Decoder(
        (shortcuts.decode_probe,), (ValueError,), PROBE_SEEDS
    ),
    "pipeline.crypto.handshake.parse_handshake": Decoder((_handshake,), RPE, (HANDSHAKE,)),
    "pipeline.crypto.handshake.decode_payload": Decoder((hs.decode_payload,), RPE, (PAYLOAD,)),
    "pipeline.crypto.handshake.open_cookie_reply": Decoder((_cookie,), RPE, (COOKIE_REPLY,)),
    "pipeline.crypto.screen.HandshakeScreen.screen": Decoder(
        (_screen,), (), (HANDSHAKE, COOKIE_REPLY)
    ),
    "pipeline.crypto.cert.decode_certificate": Decoder(
        (cert_mod.decode_certificate,), RPE, (CERTIFICATE.encode(),), max_size=600
    ),
    "pipeline.crypto.cert.from_pem": Decoder(
        (_pem, _pem_wrapped), RPE, (cert_mod.to_pem(CERTIFICATE).encode(),), max_size=900
    ),
    "pipeline.crypto.noise.HandshakeState.read_message": Decoder(
        (_noise_responder, _noise_initiator), (NoiseError,), ()
    ),
    # overlay_io: sessions and relaying
    "pipeline.crypto.datapath.RecvSession.open": Decoder((_open,), RPE, (SEALED,)),
    "pipeline.crypto.datapath.RecvSession.open_run": Decoder((_open_run,), (), (SEALED + b"\x3a",)),
    "pipeline.overlay_io.sessions.NullRecvSession.open": Decoder(
        (sessions.NullRecvSession().open,), RPE, (build_header(DatagramType.DATA) + b"x",)
    ),
    "pipeline.overlay_io.relay.parse_relay": Decoder((_relay,), RPE, (RELAYED,)),
    # DHCP and DNS from the TAP
    "pipeline.control.dhcp.wire.decode": Decoder(
        (dhcp_wire.decode,), RPE, (DHCP_DISCOVER,), max_size=700
    ),
    "pipeline.control.dhcp.frames.request_from_frame": Decoder(
        (_dhcp_frame,), RPE, (DHCP_FRAME,), max_size=700
    ),
    "pipeline.control.dns.message.read_query": Decoder((dns_message.read_query,), (), (DNS_QUERY,)),
}

NOT_DECODERS: dict[str, str] = {
    "pipeline.config.Endpoint.parse": "the operator's config (check-config reports errors)",
    "pipeline.crypto.cert.RevocationList.parse": "a local file the operator installs",
    "pipeline.crypto.identity.parse_node_id": "a command-line argument",
    "pipeline.crypto.keyfiles.read_seed": "a local key file",
    "pipeline.crypto.keyfiles.read_certificate": "a local file (its bytes: decode_certificate)",
    "pipeline.crypto.keyfiles.read_revocation_list": "a local file",
    "pipeline.control.overlay.node.OverlayNode.readdress": "not a decoder (a local event)",
    "pipeline.control.overlay.wire.AddressCodec.decode": "a Protocol (HostPortCodec is one)",
    "pipeline.overlay_io.sessions.parse_address": "endpoint text from control's own messages",
    "pipeline.overlay_io.sessions.Opener.open": "a Protocol (RecvSession, NullRecvSession)",
    "pipeline.overlay_io.sessions.Opener.open_run": "a Protocol",
    "pipeline.overlay_io.sessions.NullRecvSession.open_run": "opens nothing (returns at)",
    "pipeline.overlay_io.sessions.RecvEntry.open": "a field: its session's open, bound",
    "pipeline.shm_ring.read_stats": "the node's own shared memory",
    "pipeline.crypto.screen.HandshakeScreen.read_budget": "a count the driver asks for, no bytes",
    "pipeline.crypto.screen.ScreenSettings.reads_per_s": "a setting, not a decoder",
    "pipeline.sim.overlay.IntAddressCodec.decode": "the simulator's addresses",
    "pipeline.tap_reader.device.TapDevice.read": "a device read (its frames: the classifier)",
    "pipeline.tap_reader.device.TapDevice.read_into": "a device read",
    "pipeline.tap_reader.device.LinuxTap.read": "a device read",
    "pipeline.tap_reader.device.LinuxTap.read_into": "a device read",
    "pipeline.tap_reader.device.MemoryTap.read": "a device read (the tests' twin)",
    "pipeline.tap_reader.device.MemoryTap.read_into": "a device read (the tests' twin)",
}


# -- stateful cores ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stateful:
    """A core fed junk. ``feed`` gives it one input (at one or more of its entry points, as
    the named source would); ``tally`` is what its counters have counted so far (handled or
    dropped) and must grow by at least ``per_input`` a feed; ``works`` asserts that a valid
    input is still served."""

    make: Callable[[], Any]
    feed: Callable[[Any, bytes], None]
    tally: Callable[[Any], int]
    works: Callable[[Any], None]
    seeds: tuple[bytes, ...]
    per_input: int = 1
    max_size: int = 300


def int_leaves(value: object) -> int:
    """The sum of every integer in a status tree (dicts and lists of counters)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return sum(int_leaves(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(int_leaves(v) for v in value)
    return 0


# the interface-mode classifier: frames from the TAP, packets from link 3 (a routed peer)


def _classifier_feed(classifier: InterfaceClassifier, data: bytes) -> None:
    classifier.from_inside(memoryview(bytearray(data)))
    classifier.from_outside(3, memoryview(bytearray(data)))


def _classifier_tally(classifier: InterfaceClassifier | RouterClassifier) -> int:
    stats = classifier.statistics()
    assert sum(stats.drops.values()) == stats.actions[FrameAction.DROP]
    return sum(stats.actions.values())


def _classifier_works(classifier: InterfaceClassifier) -> None:
    action, slot, _ = classifier.from_inside(outbound(PEER3))
    assert (action, slot) == (FrameAction.TO_PEER, 3)
    action, _, _ = classifier.from_outside(3, memoryview(bytearray(udp_packet(PEER3, ME))))
    assert action is FrameAction.TO_TAP


def _router_feed(router: RouterClassifier, data: bytes) -> None:
    router.from_inside(memoryview(bytearray(data)))
    router.from_outside(3, memoryview(bytearray(data)))


def _router_works(router: RouterClassifier) -> None:
    action, slot, _ = router.from_inside(ip_frame(MAC1, M1, R3))
    assert (action, slot) == (FrameAction.TO_PEER, 3)


# DHCP and DNS: what the TAP's machines send to the virtual gateway


def _dhcp_feed(server: DhcpServer, data: bytes) -> None:
    server.receive(data, DHCP_MAC, 0.0)
    server.receive_frame(data, 0.0)
    server.replies(), server.dht_requests(), server.events()


def _dhcp_works(server: DhcpServer) -> None:
    assert dora(server, mac=DHCP_MAC2) in DHCP_SUBNET


def _dns_feed(responder: DnsResponder[Client], data: bytes) -> None:
    responder.receive(data, DNS_CLIENT, 0.0)
    responder.answers()


def _dns_works(responder: DnsResponder[Client]) -> None:
    assert rdata(ask(responder, "C064000007.vpn.test")) == ["100.64.0.7"]


# the overlay node: datagrams from a linked neighbour


def _overlay_feed(node: OverlayNode, data: bytes) -> None:
    node.receive(data, OVERLAY_PEERS[0], 1.0)
    node.datagrams_to_send()
    node.events()


def _overlay_tally(node: OverlayNode) -> int:
    stats = node.statistics()
    return sum(v for k, v in stats.items() if k.startswith(("received_", "dropped_")))


def _overlay_works(node: OverlayNode) -> None:
    """The other neighbour is still answered (the junk's sender may have said, in a valid
    Hello, that it is another node now: then its old id is rightly gone)."""
    sender = id_to_bytes(OVERLAY_PEER_IDS[1])
    node.receive(overlay_wire.encode(overlay_wire.Ping(sender, 77, 1.0)), OVERLAY_PEERS[1], 2.0)
    replies = [overlay_wire.decode(d) for d, to in node.datagrams_to_send()]
    assert overlay_wire.Pong(id_to_bytes(OVERLAY_SELF_ID), 77, 1.0) in replies


# the DHT: payloads delivered to it through the overlay from another member


def _dht_make() -> tuple[FakeNet, Dht]:
    net, (a, _b) = network(2)
    return net, a


def _dht_feed(state: tuple[FakeNet, Dht], data: bytes) -> None:
    net, a = state
    a.handle_overlay_event(Delivered(5, 0, data, 1, 1, False), net.now)
    net.run()
    a.events()


def _dht_works(state: tuple[FakeNet, Dht]) -> None:
    net, a = state
    a.create(b"name:lab:fuzz", b"100.64.0.9", 60.0, net.now)
    net.run()
    (result,) = [e for e in a.events() if isinstance(e, CreateResult)]
    assert result.ok, result


# Noise: a responder and an initiator read junk where a handshake message should be


@dataclasses.dataclass
class NoiseDuo:
    """An IK responder waiting for an initiation, an XX initiator waiting for the response
    (its initiation sent), the genuine messages each expects, and the junk refused so far."""

    responder: HandshakeState
    initiator: HandshakeState
    initiation: bytes
    response: bytes
    refused: int = 0


def _noise_make() -> NoiseDuo:
    ik_init, ik_resp = noise_pair()
    xx_init, xx_resp = noise_pair(hs.Pattern.XX.protocol)
    initiation = ik_init.write_message(b"hello")
    xx_resp.read_message(xx_init.write_message(b""))
    return NoiseDuo(ik_resp, xx_init, initiation, xx_resp.write_message(b"answer"))


def _noise_feed(duo: NoiseDuo, data: bytes) -> None:
    for state in (duo.responder, duo.initiator):
        before = (state.message_index, state.handshake_hash)
        try:
            state.read_message(data)
        except NoiseError:
            assert (state.message_index, state.handshake_hash) == before
            duo.refused += 1
        else:  # a forgery: only the genuine message reads (AEAD under a DH key)
            raise AssertionError(f"junk read as a handshake message: {data.hex()}")


def _noise_works(duo: NoiseDuo) -> None:
    assert duo.responder.read_message(duo.initiation) == b"hello"
    assert duo.initiator.read_message(duo.response) == b"answer"


# overlay_io's receive session: DATA datagrams claiming to be of its session


@dataclasses.dataclass
class SessionDuo:
    """A receive session and, for ``works``, a sender past the seed's counters (a worker of
    the next generation, as control hands out)."""

    send: SendSession
    recv: RecvSession
    counted: int = 0


def _session_make() -> SessionDuo:
    return SessionDuo(
        SendSession(SESSION_KEY, index=SESSION_INDEX, created=0.0, counter_start=1 << 40),
        RecvSession(SESSION_KEY, index=SESSION_INDEX, created=0.0),
    )


def _session_feed(duo: SessionDuo, data: bytes) -> None:
    top = duo.recv.window.top
    try:
        duo.recv.open(data)
    except RemoteProtocolError:
        assert duo.recv.window.top == top  # a forgery or a replay never moves the window
    else:
        assert data == SEALED, f"junk opened: {data.hex()}"  # only the genuine seed opens
    duo.counted += 1


def _session_works(duo: SessionDuo) -> None:
    assert duo.recv.open(b"".join(duo.send.seal(DatagramType.DATA, b"still"))) == b"still"


# overlay_io's coalescer: opened packets from peers, on their way to the TAP


@dataclasses.dataclass
class CoalescerState:
    coalescer: tso.Coalescer
    frames: list[tuple[bytes, bytes]]


def _coalescer_make() -> CoalescerState:
    frames: list[tuple[bytes, bytes]] = []

    def emit(header: bytes, head: Any, packets: list[Any], skip: int) -> None:
        frame = bytes(head) + b"".join(bytes(p)[skip:] for p in packets)
        frames.append((header, frame))
        tso.segment(vnet.parse(header), frame)  # what a TAP without offloads gets

    return CoalescerState(tso.Coalescer(emit), frames)


def _coalescer_feed(state: CoalescerState, data: bytes) -> None:
    partial = data[-1] & 1 if data else 0
    state.coalescer.add(data, partial)
    if data[:1] == b"\x00":
        state.coalescer.flush()


def _coalescer_works(state: CoalescerState) -> None:
    coalescer = state.coalescer
    coalescer.flush()
    state.frames.clear()
    coalescer.add(tcp_segment(5000, bytes(100)), 1)
    coalescer.add(tcp_segment(5100, bytes(100)), 1)
    coalescer.flush()
    ((header, frame),) = state.frames
    assert vnet.parse(header).gso_type == vnet.GSO_TCPV4 and len(frame) == 240
    assert coalescer.frames <= coalescer.packets


# control's core: what a linked member (static peer on slot 1, also an overlay neighbour)
# can send it: overlay records, handshake and probe datagrams, packets to verify


@dataclasses.dataclass
class CoreDuo:
    cores: list[ControlCore]
    now: float


STUN_SERVER = ("198.18.90.3", 3478)
GATEWAY = "198.18.0.254"


def _core_make(router: bool = False) -> CoreDuo:
    """Linked; asking a STUN server and the gateway (for a port mapping) about its endpoints,
    so the answers it waits for are parsed too; serving DHCP and DNS on its TAP (``router``:
    to the machines of a segment, which may also claim addresses of their own)."""
    addressing = AddressingSettings(
        subnet=IPv4Network("100.64.0.0/24"),
        gateway=IPv4Address("100.64.0.254"),
        domain="vpn.test",
        namespace="lab",
        node_name="n",
        tap_mac=MAC,
        gateway_mac=bytes.fromhex("02000000fe01"),
        mtu=1400,
        dhcp=True,
        router=router,
        allow_static=router,
    )
    cores = core_pair(stun_servers=(STUN_SERVER,), port_mapping=True, addressing=addressing)
    for core, (host, _) in zip(cores, CORE_ENDPOINTS, strict=True):
        core.set_local_addresses([host], GATEWAY, 100.0, WALL + 100.0)
    now, _ = core_run(cores, 100.0, 102.0)
    return CoreDuo(cores, now)


def _core_feed(duo: CoreDuo, data: bytes) -> None:
    a = duo.cores[0]
    wall = WALL + duo.now
    member = CORE_ENDPOINTS[1]
    a.receive_overlay(1, data, duo.now, wall)
    a.receive_handshake(data, member, duo.now, wall)
    a.receive_probe(1, data, member, duo.now, wall)
    a.packet_from_unknown(1, data, duo.now, wall)
    a.receive_stun(data, member, duo.now, wall)
    a.receive_stun(data, STUN_SERVER, duo.now, wall)
    a.receive_portmap(data, (GATEWAY, 5351), duo.now, wall)
    a.frame_from_tap(data, duo.now, wall)  # DHCP and DNS from the TAP (a segment's machines)
    a.claim(data, duo.now, wall)
    a.packet_to_resolve(data, duo.now, wall)
    a.overlay_to_send(), a.handshakes_to_send(), a.probes_to_send(), a.events()
    a.stun_to_send(), a.portmap_to_send(), a.upnp_to_run()


def _core_tally(duo: CoreDuo) -> int:
    return int_leaves(duo.cores[0].status(duo.now))


def _core_works(duo: CoreDuo) -> None:
    a = duo.cores[0]
    ping = messages.encode_overlay(messages.Ping(9, 1, "n1"))
    a.receive_overlay(1, ping, duo.now, WALL + duo.now)
    pongs = [messages.decode_overlay(p) for s, p in a.overlay_to_send() if s == 1]
    assert messages.Pong(9, 1, "n0") in pongs
    duo.now, _ = core_run(duo.cores, duo.now, duo.now + 3.0)  # and the link stays up
    assert [p["state"] for p in a.status(duo.now)["peers"]] == ["up"]


def _core_seeds() -> tuple[bytes, ...]:
    """What the member really sends: its overlay records and handshakes while linking."""
    cores = core_pair()
    seen: list[bytes] = []
    for core in cores:
        core.handle_timer(100.0, WALL + 100.0)
    for _ in range(6):
        for i, core in enumerate(cores):
            other = cores[1 - i]
            for datagram, _, _ in core.handshakes_to_send():
                seen.append(datagram)
                other.receive_handshake(datagram, CORE_ENDPOINTS[i], 100.0, WALL + 100.0)
            for slot, payload in core.overlay_to_send():
                seen.append(payload)
                other.receive_overlay(slot, payload, 100.0, WALL + 100.0)
    return tuple(dict.fromkeys(seen))


STATEFUL: dict[str, Stateful] = {
    "classifier.interface": Stateful(
        make_classifier,
        _classifier_feed,
        _classifier_tally,
        _classifier_works,
        (ARP_REQUEST, IP_FRAME, bytes(outbound(PEER3)), udp_packet(PEER3, ME)),
        per_input=2,
    ),
    "classifier.router": Stateful(
        make_router,
        _router_feed,
        _classifier_tally,
        _router_works,
        (bytes(ip_frame(MAC1, M1, R3)), ARP_REQUEST, IP_FRAME),
        per_input=2,
    ),
    "dhcp.server": Stateful(
        lambda: make_server(max_clients=4),  # the junk's client may hold one
        _dhcp_feed,
        lambda server: sum(server.statistics().values()),
        _dhcp_works,
        (DHCP_DISCOVER, DHCP_FRAME),
        per_input=2,
        max_size=700,
    ),
    "dns.responder": Stateful(
        make_responder,
        _dns_feed,
        lambda responder: sum(responder.statistics().values()),
        _dns_works,
        (DNS_QUERY,),
    ),
    "overlay.node": Stateful(
        linked_node, _overlay_feed, _overlay_tally, _overlay_works, OVERLAY_SEEDS
    ),
    "dht.node": Stateful(
        _dht_make,
        _dht_feed,
        lambda state: sum(state[1].statistics().values()),
        _dht_works,
        DHT_SEEDS,
    ),
    "noise.handshake": Stateful(
        _noise_make, _noise_feed, lambda duo: duo.refused, _noise_works, (), per_input=2
    ),
    "datapath.recv_session": Stateful(
        _session_make, _session_feed, lambda duo: duo.counted, _session_works, (SEALED,)
    ),
    "tso.coalescer": Stateful(
        _coalescer_make,
        _coalescer_feed,
        lambda state: state.coalescer.packets,
        _coalescer_works,
        (TCP_SEGMENT, UDP_PACKET, tcp_segment(1100, bytes(100), 0x18)),
    ),
    "control.core": Stateful(
        _core_make,
        _core_feed,
        _core_tally,
        _core_works,
        (*_core_seeds(), DHCP_FRAME, IP_FRAME, ARP_REQUEST),
    ),
    "control.core.router": Stateful(
        functools.partial(_core_make, router=True),
        _core_feed,
        _core_tally,
        _core_works,
        (*_core_seeds(), DHCP_FRAME, IP_FRAME, ARP_REQUEST),
    ),
}
