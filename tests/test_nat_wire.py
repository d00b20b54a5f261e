"""The NAT codecs: STUN (RFC 8489) against RFC 5769's test vectors and aioice, NAT-PMP
(RFC 6886) and PCP (RFC 6887) against bytes written out from the RFCs' layouts; garbage only
ever raises RemoteProtocolError."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import aioice.stun as oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import RemoteProtocolError
from pipeline.wire import natpmp, pcp, stun
from pipeline.wire.overlay import DatagramType, build_header


def hexbytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 section 2.1: a Binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
# MESSAGE-INTEGRITY and FINGERPRINT (padding is 0x20 there, which receivers must ignore).
RFC5769_REQUEST = hexbytes("""
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
""")
# Section 2.2: the IPv4 response, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
RFC5769_IPV4 = hexbytes("""
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
""")
# Section 2.3: the IPv6 response, XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853.
RFC5769_IPV6 = hexbytes("""
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
""")
RFC5769_TID = hexbytes("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
TID = bytes(range(1, 13))


# ----------------------------------------------------------------------------------------------
# STUN: RFC 5769


def test_rfc5769_request_parses_with_its_fingerprint() -> None:
    message = stun.parse(RFC5769_REQUEST)
    assert (message.method, message.cls) == (stun.Method.BINDING, stun.Class.REQUEST)
    assert message.transaction_id == RFC5769_TID
    assert message.software == "STUN test client"
    assert message.fingerprint
    types = [t for t, _ in message.attributes]
    assert types == [0x8022, 0x0024, 0x8029, 0x0006, 0x0008, 0x8028]
    assert dict(message.attributes)[stun.Attr.USERNAME] == b"evtj:h6vY"  # padding dropped
    # PRIORITY (0x0024) is comprehension-required and not ours: a server would answer 420
    assert message.unknown_required() == (0x0024,)


def test_rfc5769_ipv4_response() -> None:
    message = stun.parse(RFC5769_IPV4)
    assert message.cls is stun.Class.SUCCESS
    assert message.xor_mapped_address == ("192.0.2.1", 32853)
    assert message.reflexive == ("192.0.2.1", 32853)
    assert message.software == "test vector"
    assert message.fingerprint and message.unknown_required() == ()


def test_rfc5769_ipv6_response() -> None:
    message = stun.parse(RFC5769_IPV6)
    assert message.reflexive == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4, RFC5769_IPV6])
def test_a_flipped_bit_breaks_the_fingerprint(vector: bytes) -> None:
    broken = bytearray(vector)
    broken[25] ^= 0x01  # inside the first attribute's value
    with pytest.raises(RemoteProtocolError) as err:
        stun.parse(bytes(broken))
    assert err.value.reason == "stun_bad_fingerprint"


def test_xor_mapped_address_encodes_as_in_rfc5769() -> None:
    """The attribute value of section 2.2, made by the encoder."""
    value = stun.address_value(("192.0.2.1", 32853), RFC5769_TID)
    assert value == hexbytes("00 01 a1 47 e1 12 a6 43")
    value6 = stun.address_value(("2001:db8:1234:5678:11:2233:4455:6677", 32853), RFC5769_TID)
    assert value6 == hexbytes("00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9")


# ----------------------------------------------------------------------------------------------
# STUN: building, and aioice as an oracle


def test_binding_request_bytes() -> None:
    """Header, no attributes but FINGERPRINT: CRC-32 of the 20 bytes before it (whose length
    already counts the 8 bytes of FINGERPRINT), xor 0x5354554e."""
    request = stun.binding_request(TID)
    assert request[:20] == hexbytes("0001 0008 2112a442") + TID
    assert request[20:24] == hexbytes("8028 0004")
    assert len(request) == 28
    assert stun.binding_request(TID, fingerprint=False) == hexbytes("0001 0000 2112a442") + TID


def test_our_messages_parse_in_aioice() -> None:
    success = stun.binding_success(TID, ("198.18.90.11", 40000), software="autovn")
    theirs = oracle.parse_message(success)  # checks the FINGERPRINT too
    assert theirs.message_method is oracle.Method.BINDING
    assert theirs.message_class is oracle.Class.RESPONSE
    assert theirs.transaction_id == TID
    assert theirs.attributes["XOR-MAPPED-ADDRESS"] == ("198.18.90.11", 40000)
    assert theirs.attributes["SOFTWARE"] == "autovn"
    error = oracle.parse_message(stun.binding_error(TID, 420, "Unknown", unknown=(0x24, 0x25)))
    assert error.message_class is oracle.Class.ERROR
    assert error.attributes["ERROR-CODE"] == (420, "Unknown")
    request = oracle.parse_message(stun.binding_request(TID))
    assert request.message_class is oracle.Class.REQUEST


@pytest.mark.parametrize(
    "address", [("198.18.90.11", 40000), ("2001:db8::7", 3478), ("0.0.0.0", 0)]
)
def test_aioice_messages_parse_here(address: tuple[str, int]) -> None:
    theirs = oracle.Message(oracle.Method.BINDING, oracle.Class.RESPONSE, TID)
    theirs.attributes["XOR-MAPPED-ADDRESS"] = address
    theirs.attributes["MAPPED-ADDRESS"] = address
    theirs.attributes["SOFTWARE"] = "aioice"
    theirs.add_fingerprint()
    message = stun.parse(bytes(theirs))
    assert message.xor_mapped_address == address and message.mapped_address == address
    assert message.software == "aioice" and message.fingerprint


def test_an_old_server_gives_mapped_address_only() -> None:
    """RFC 3489 servers answer with MAPPED-ADDRESS (and SOURCE-ADDRESS, CHANGED-ADDRESS)."""
    attrs = [
        (stun.Attr.MAPPED_ADDRESS.value, stun.address_value(("198.18.90.12", 5000))),
        (stun.Attr.SOURCE_ADDRESS.value, stun.address_value(("198.18.90.3", 3478))),
        (stun.Attr.CHANGED_ADDRESS.value, stun.address_value(("198.18.90.4", 3479))),
    ]
    message = stun.parse(encode_success(attrs))
    assert message.xor_mapped_address is None
    assert message.reflexive == ("198.18.90.12", 5000)
    assert message.unknown_required() == ()


def encode_success(attrs: list[tuple[int, bytes]]) -> bytes:
    return stun.encode(stun.Method.BINDING, stun.Class.SUCCESS, TID, attrs)


def test_attributes_after_message_integrity_are_ignored_but_fingerprint() -> None:
    after = stun.address_value(("198.18.90.99", 1), TID)
    message = stun.parse(
        stun.encode(
            stun.Method.BINDING,
            stun.Class.SUCCESS,
            TID,
            [(stun.Attr.MESSAGE_INTEGRITY, bytes(20)), (stun.Attr.XOR_MAPPED_ADDRESS, after)],
            fingerprint=True,
        )
    )
    assert message.reflexive is None and message.fingerprint
    assert len(message.attributes) == 3


def test_error_response() -> None:
    message = stun.parse(stun.binding_error(TID, 420, "Unknown Attribute", unknown=(0x24,)))
    assert message.cls is stun.Class.ERROR
    assert message.error == (420, "Unknown Attribute")
    assert message.unknown_attributes == (0x24,)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (hexbytes("0001 0000 2112a442") + TID[:11], "stun_truncated"),
        (hexbytes("c001 0000 2112a442") + TID, "stun_bad_type"),
        (hexbytes("0001 0000 2112a443") + TID, "stun_bad_cookie"),
        (hexbytes("0001 0004 2112a442") + TID, "stun_bad_length"),
        (hexbytes("0001 0002 2112a442") + TID + b"\0\0", "stun_bad_length"),
        (hexbytes("0101 0004 2112a442") + TID + hexbytes("0020 0008"), "stun_bad_attribute"),
        (hexbytes("0101 0008 2112a442") + TID + hexbytes("0020 0004 0003 0000"),
         "stun_bad_address"),
        (hexbytes("0111 0008 2112a442") + TID + hexbytes("0009 0004 0000 0263"),
         "stun_bad_error_code"),
    ],
)  # fmt: skip
def test_malformed_stun(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        stun.parse(data)
    assert err.value.reason == reason


def test_fingerprint_must_be_last() -> None:
    header = hexbytes("0001 000c 2112a442") + TID  # FINGERPRINT (8) and an empty SOFTWARE (4)
    crc = (zlib.crc32(header) ^ 0x5354554E).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError) as err:
        stun.parse(header + hexbytes("8028 0004") + crc + hexbytes("8022 0000"))
    assert err.value.reason == "stun_after_fingerprint"


# ----------------------------------------------------------------------------------------------
# telling STUN from autovn datagrams


def test_is_stun_on_stun() -> None:
    for message in (RFC5769_REQUEST, RFC5769_IPV4, RFC5769_IPV6, stun.binding_request(TID)):
        assert stun.is_stun(message)


@pytest.mark.parametrize("dtype", list(DatagramType))
def test_is_stun_on_autovn_datagrams(dtype: DatagramType) -> None:
    """A DATA header begins 01 01, like a Binding success; the cookie and the length tell."""
    for session in (0, 7, 0xFFFFFFFF):
        header = build_header(dtype, session=session, counter=5)
        for tail in (16, 100, 1400):
            assert not stun.is_stun(header + bytes(tail))
    # what autovn must never send: flags equal to the length past 20 and the cookie as index
    assert stun.is_stun(build_header(dtype, flags=12, session=stun.MAGIC_COOKIE) + bytes(16))


@given(st.binary(min_size=0, max_size=64))
def test_is_stun_never_raises(data: bytes) -> None:
    assert stun.is_stun(data) in (True, False)


# ----------------------------------------------------------------------------------------------
# NAT-PMP

# RFC 6886 section 3.2: external address request and response (198.18.90.11, epoch 1200)
NATPMP_ADDRESS_REQUEST = hexbytes("00 00")
NATPMP_ADDRESS_RESPONSE = hexbytes("00 80 0000 000004b0 c6125a0b")
# Section 3.3: map UDP internal 40000, suggested 40000, lifetime 7200; the answer maps 40001
NATPMP_MAP_REQUEST = hexbytes("00 01 0000 9c40 9c40 00001c20")
NATPMP_MAP_RESPONSE = hexbytes("00 81 0000 000004b0 9c40 9c41 00001c20")


def test_natpmp_golden_bytes() -> None:
    assert natpmp.ExternalAddressRequest().encode() == NATPMP_ADDRESS_REQUEST
    assert natpmp.MapRequest(40000, 40000, 7200).encode() == NATPMP_MAP_REQUEST
    address = natpmp.parse_response(NATPMP_ADDRESS_RESPONSE)
    assert address == natpmp.ExternalAddressResponse(0, 1200, "198.18.90.11")
    mapping = natpmp.parse_response(NATPMP_MAP_RESPONSE)
    assert mapping == natpmp.MapResponse(0, 1200, 40000, 40001, 7200)
    assert address.encode() == NATPMP_ADDRESS_RESPONSE
    assert mapping.encode() == NATPMP_MAP_RESPONSE
    assert natpmp.parse_request(NATPMP_MAP_REQUEST) == natpmp.MapRequest(40000, 40000, 7200)
    assert natpmp.parse_request(NATPMP_ADDRESS_REQUEST) == natpmp.ExternalAddressRequest()


def test_natpmp_short_error_response_reads_as_zeros() -> None:
    """A gateway answering a version it does not speak may send the 8-byte header only."""
    response = natpmp.parse_response(hexbytes("00 81 0001 00000005"))
    assert response == natpmp.MapResponse(natpmp.Result.UNSUPPORTED_VERSION, 5, 0, 0, 0)
    with pytest.raises(RemoteProtocolError):
        natpmp.parse_response(hexbytes("00 81 0000 00000005"))  # success needs it all
    assert natpmp.result_name(2) == "not_authorized" and natpmp.result_name(9) == "result_9"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\0", "natpmp_truncated"),
        (hexbytes("02 80 0000 00000000 00000000"), "natpmp_bad_version"),
        (hexbytes("00 01 0000 00000000 00000000"), "natpmp_not_response"),
        (hexbytes("00 83 0000 00000000 00000000"), "natpmp_bad_opcode"),
    ],
)
def test_malformed_natpmp(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        natpmp.parse_response(data)
    assert err.value.reason == reason


# ----------------------------------------------------------------------------------------------
# PCP

NONCE = hexbytes("0102030405060708090a0b0c")
# RFC 6887 sections 7.1 and 11.1: MAP UDP internal 40000 of 198.19.1.10, lifetime 7200,
# suggesting 40000 and no address (::ffff:0.0.0.0).
PCP_MAP_REQUEST = hexbytes("""
    02 01 0000 00001c20  00000000 00000000 0000ffff c613010a
    0102030405060708090a0b0c  11 000000  9c40 9c40  00000000 00000000 0000ffff 00000000
""")
# Sections 7.2 and 11.1: success, lifetime 7200, epoch 1200, assigned 198.18.90.11:40001.
PCP_MAP_RESPONSE = hexbytes("""
    02 81 00 00 00001c20 000004b0 000000000000000000000000
    0102030405060708090a0b0c  11 000000  9c40 9c41  00000000 00000000 0000ffff c6125a0b
""")
PCP_ANNOUNCE_REQUEST = hexbytes("02 00 0000 00000000 00000000 00000000 0000ffff c613010a")
PCP_ANNOUNCE_RESPONSE = hexbytes("02 80 00 00 00000000 00000005 000000000000000000000000")


def test_pcp_golden_bytes() -> None:
    request = pcp.MapRequest(NONCE, 40000, 7200, "198.19.1.10", 40000)
    assert request.encode() == PCP_MAP_REQUEST
    assert pcp.parse_request(PCP_MAP_REQUEST) == request
    response = pcp.parse_response(PCP_MAP_RESPONSE)
    assert response == pcp.MapResponse(0, 7200, 1200, NONCE, 40000, 40001, "198.18.90.11")
    assert response.encode() == PCP_MAP_RESPONSE
    assert pcp.AnnounceRequest("198.19.1.10").encode() == PCP_ANNOUNCE_REQUEST
    assert pcp.parse_request(PCP_ANNOUNCE_REQUEST) == pcp.AnnounceRequest("198.19.1.10")
    assert pcp.parse_response(PCP_ANNOUNCE_RESPONSE) == pcp.AnnounceResponse(0, 5)
    assert pcp.AnnounceResponse(0, 5).encode() == PCP_ANNOUNCE_RESPONSE


def test_pcp_options_and_ipv6() -> None:
    request = pcp.MapRequest(
        NONCE, 4789, 60, "2001:db8::5", options=(pcp.Option(2), pcp.Option(3, b"\x01\x02\x03"))
    )
    data = request.encode()
    assert len(data) == 60 + 4 + 8 and len(data) % 4 == 0
    assert pcp.parse_request(data) == request


def test_pcp_error_without_payload() -> None:
    """An error answer may stop after the header: the MAP fields read as zeros."""
    header = hexbytes("02 81 00 03 00000000 00000007 000000000000000000000000")
    response = pcp.parse_response(header)
    assert isinstance(response, pcp.MapResponse)
    assert response.result == pcp.Result.MALFORMED_REQUEST and response.nonce == bytes(12)
    assert pcp.result_name(response.result) == "malformed_request"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (PCP_MAP_RESPONSE[:20], "pcp_bad_length"),
        (PCP_MAP_RESPONSE + b"\0", "pcp_bad_length"),
        (PCP_MAP_RESPONSE[:24], "pcp_truncated"),
        (b"\x01" + PCP_MAP_RESPONSE[1:], "pcp_bad_version"),
        (PCP_MAP_REQUEST, "pcp_not_response"),
        (hexbytes("02 82 0000") + PCP_MAP_RESPONSE[4:], "pcp_bad_opcode"),
        (PCP_MAP_RESPONSE + hexbytes("01 00 0008 00000000"), "pcp_bad_option"),
    ],
)
def test_malformed_pcp(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        pcp.parse_response(data)
    assert err.value.reason == reason


# ----------------------------------------------------------------------------------------------
# fuzzing: garbage only ever raises RemoteProtocolError

PARSERS: list[Callable[[bytes], object]] = [
    stun.parse,
    natpmp.parse_response,
    natpmp.parse_request,
    pcp.parse_response,
    pcp.parse_request,
]


@pytest.mark.parametrize("parse", PARSERS, ids=lambda f: f"{f.__module__}.{f.__name__}")
@given(data=st.binary(max_size=200))
def test_garbage_raises_only_remote_protocol_error(
    parse: Callable[[bytes], object], data: bytes
) -> None:
    try:
        parse(data)
    except RemoteProtocolError:
        pass


@st.composite
def stunlike(draw: st.DrawFn) -> bytes:
    """Well-framed STUN with random attributes: the paths past the header get exercised."""
    attrs = draw(
        st.lists(
            st.tuples(
                st.sampled_from([int(a) for a in stun.Attr] + [0x0024, 0x7FFF, 0xC000]),
                st.binary(max_size=24),
            ),
            max_size=5,
        )
    )
    cls = draw(st.sampled_from(list(stun.Class)))
    message = stun.encode(stun.Method.BINDING, cls, TID, attrs, fingerprint=draw(st.booleans()))
    flip = draw(st.integers(min_value=0, max_value=len(message)))
    if flip < len(message) and draw(st.booleans()):
        message = message[:flip] + bytes([message[flip] ^ 0xFF]) + message[flip + 1 :]
    return message


@given(stunlike())
def test_stun_fuzz_framed(data: bytes) -> None:
    try:
        message = stun.parse(data)
    except RemoteProtocolError:
        return
    assert stun.is_stun(data)
    message.unknown_required()


@st.composite
def pcplike(draw: st.DrawFn) -> bytes:
    head = PCP_MAP_RESPONSE if draw(st.booleans()) else PCP_ANNOUNCE_RESPONSE
    tail = draw(st.binary(max_size=24))
    data = bytearray(head + tail)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        i = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[i] = draw(st.integers(min_value=0, max_value=255))
    return bytes(data)


@given(pcplike())
def test_pcp_fuzz_framed(data: bytes) -> None:
    try:
        pcp.parse_response(data)
    except RemoteProtocolError:
        pass
