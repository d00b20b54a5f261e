"""The DNS responder core: static names, PTR, host names through lookups, refusals, errors."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from dnslib import EDNS0, QTYPE, RCODE, DNSError, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.control.dns import (
    DnsResponder,
    DnsSettings,
    Lookup,
    host_key,
    host_label,
    message,
    static_address,
    static_name,
)
from pipeline.control.dns.message import Header, Query, ResourceRecord

Client = tuple[str, int]
CLIENT: Client = ("100.64.0.2", 40000)
CGNAT = IPv4Network("100.64.0.0/10")
TEN = IPv4Network("10.0.0.0/8")


def make(subnet: IPv4Network = CGNAT, **overrides: Any) -> DnsResponder[Client]:
    return DnsResponder(DnsSettings("vpn.test", subnet, "lab", **overrides))


def query(
    name: str, qtype: str = "A", *, ident: int = 0x1234, rd: bool = True, edns: int | None = None
) -> bytes:
    record = DNSRecord(DNSHeader(id=ident, rd=int(rd)), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns))
    wire: bytes = record.pack()
    return wire


def answers(responder: DnsResponder[Client]) -> list[DNSRecord]:
    out = responder.answers()
    assert all(client == CLIENT for _, client in out)
    return [DNSRecord.parse(response) for response, _ in out]


def ask(
    responder: DnsResponder[Client], name: str, qtype: str = "A", now: float = 0.0, **kw: Any
) -> DNSRecord:
    responder.receive(query(name, qtype, **kw), CLIENT, now)
    (response,) = answers(responder)
    return response


def rdata(response: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in response.rr]


def rcode(response: DNSRecord) -> str:
    return str(RCODE[response.header.rcode])


def assert_negative(response: DNSRecord, code: str, apex: str = "vpn.test.") -> None:
    assert rcode(response) == code and response.header.aa and not response.rr
    (soa,) = response.auth
    assert soa.rtype == QTYPE.SOA and str(soa.rname) == apex and soa.ttl == 10
    assert str(soa.rdata) == "vpn.test. hostmaster.vpn.test. 1 3600 600 86400 10"


# static names


def test_static_names_in_ten_slash_eight() -> None:
    assert static_name(IPv4Address("10.5.32.155"), TEN, "vpn.test") == "C005032155.vpn.test"
    assert static_address("C005032155.vpn.test", TEN, "vpn.test") == IPv4Address("10.5.32.155")
    assert static_address("c005032155.VPN.Test.", TEN, "VPN.test.") == IPv4Address("10.5.32.155")


def test_static_names_inside_a_subnet_of_one_first_octet() -> None:
    assert static_name(IPv4Address("100.64.1.2"), CGNAT, "vpn.test") == "C064001002.vpn.test"
    assert static_address("C064001002.vpn.test", CGNAT, "vpn.test") == IPv4Address("100.64.1.2")
    assert static_address("C005001002.vpn.test", CGNAT, "vpn.test") is None  # 100.5.1.2
    with pytest.raises(ValueError):
        static_name(IPv4Address("100.5.1.2"), CGNAT, "vpn.test")
    with pytest.raises(ValueError):
        static_name(IPv4Address("10.5.1.2"), IPv4Network("10.0.0.0/7"), "vpn.test")


@pytest.mark.parametrize(
    "name",
    [
        "C256000001.vpn.test",  # an octet above 255
        "C05032155.vpn.test",  # eight digits
        "D005032155.vpn.test",
        "C005032155.vpn.test.example",
        "C005032155",  # not qualified: the resolver's search list adds the domain
        "x.C005032155.vpn.test",
    ],
)
def test_not_static_names(name: str) -> None:
    assert static_address(name, TEN, "vpn.test") is None


@given(st.sampled_from([TEN, CGNAT, IPv4Network("10.200.0.0/16")]), st.integers(0, 2**32 - 1))
def test_static_name_round_trip(subnet: IPv4Network, number: int) -> None:
    address = subnet.network_address + number % subnet.num_addresses
    name = static_name(address, subnet, "vpn.test")
    assert static_address(name, subnet, "vpn.test") == address
    assert static_address(name.lower(), subnet, "vpn.test") == address


def test_host_labels_and_keys() -> None:
    assert host_label("Alpha-1") == "alpha-1"
    assert host_key("lab", "Alpha-1") == b"name:lab:alpha-1"
    for bad in ["", "-a", "a-", "a_b", "a.b", "é", "x" * 64, "C005032155", "c999999999"]:
        assert host_label(bad) is None
    with pytest.raises(ValueError):
        host_key("lab", "a_b")


def test_settings_are_checked_and_the_domain_normalised() -> None:
    assert DnsSettings("VPN.Test.", CGNAT, "lab").domain == "vpn.test"
    for domain in ["", ".", "a..test", "-a.test", "a_b.test"]:
        with pytest.raises(ValueError):
            DnsSettings(domain, CGNAT, "lab")
    with pytest.raises(ValueError):
        DnsSettings("vpn.test", IPv4Network("96.0.0.0/4"), "lab")
    with pytest.raises(ValueError):
        DnsSettings("vpn.test", CGNAT, "lab", max_pending=0)


# the responder: names answered from the name alone

RFC1035_QUERY = bytes.fromhex(
    "1234"  # ID
    "0100"  # QR=0 OPCODE=0 AA=0 TC=0 RD=1 RA=0 Z=0 RCODE=0
    "0001 0000 0000 0000"  # QDCOUNT=1, ANCOUNT, NSCOUNT, ARCOUNT
    "0a 43 30 30 35 30 33 32 31 35 35"  # QNAME: 10 "C005032155"
    "03 76 70 6e 04 74 65 73 74 00"  # 3 "vpn" 4 "test" 0
    "0001 0001"  # QTYPE=A QCLASS=IN
)


def test_a_static_name_answers_byte_for_byte() -> None:
    responder = make(TEN)
    responder.receive(RFC1035_QUERY, CLIENT, 0.0)
    ((response, client),) = responder.answers()
    assert client == CLIENT
    assert (
        response
        == bytes.fromhex(
            "1234"
            "8500"  # QR=1 AA=1 RD=1, RA=0, NOERROR
            "0001 0001 0000 0000"
            + RFC1035_QUERY[12:].hex()
            + "c00c 0001 0001 0000003c 0004 0a05209b"  # the QNAME, A IN, TTL 60, 10.5.32.155
        )
    )
    assert not responder.lookups()


def test_a_static_name_in_a_smaller_subnet() -> None:
    response = ask(make(), "C064001002.vpn.test")
    assert rcode(response) == "NOERROR" and rdata(response) == ["100.64.1.2"]
    assert response.rr[0].ttl == 60


def test_a_static_name_outside_the_subnet_does_not_exist() -> None:
    assert_negative(ask(make(), "C005001002.vpn.test"), "NXDOMAIN")
    assert_negative(ask(make(), "C300001002.vpn.test"), "NXDOMAIN")


def test_names_are_case_insensitive_and_the_question_keeps_its_case() -> None:
    response = ask(make(), "c064001002.VpN.TeSt")
    assert rdata(response) == ["100.64.1.2"]
    assert str(response.q.qname) == "c064001002.VpN.TeSt."
    assert str(response.rr[0].rname) == "c064001002.VpN.TeSt."


def test_ptr_of_an_address_in_the_subnet() -> None:
    response = ask(make(TEN), "155.32.5.10.in-addr.arpa", "PTR")
    assert rcode(response) == "NOERROR" and response.header.aa
    assert rdata(response) == ["C005032155.vpn.test."]
    response = ask(make(), "2.1.64.100.IN-ADDR.ARPA", "PTR")
    assert rdata(response) == ["C064001002.vpn.test."]


@pytest.mark.parametrize(
    "name",
    [
        "2.1.5.100.in-addr.arpa",  # 100.5.1.2: not ours
        "100.in-addr.arpa",  # holds addresses outside 100.64.0.0/10
        "in-addr.arpa",
        "1.0.0.10.in-addr.arpa",
        "example.test",
        "vpn.test.example",
        "test",
    ],
)
def test_foreign_names_are_refused_at_once(name: str) -> None:
    responder = make()
    for qtype in ["A", "PTR", "AAAA"]:
        response = ask(responder, name, qtype)
        assert rcode(response) == "REFUSED" and not response.header.aa
        assert not response.rr and not response.auth and str(response.q.qname) == name + "."
    assert not responder.lookups() and responder.next_deadline() is None


def test_reverse_zone_names_that_hold_nothing() -> None:
    responder = make()
    assert_negative(
        ask(responder, "2.1.64.100.in-addr.arpa", "A"), "NOERROR", "64.100.in-addr.arpa."
    )
    assert_negative(
        ask(responder, "1.64.100.in-addr.arpa", "PTR"), "NOERROR", "64.100.in-addr.arpa."
    )
    for name in [
        "x.1.64.100.in-addr.arpa",
        "01.1.64.100.in-addr.arpa",
        "3.2.1.64.100.in-addr.arpa",
    ]:
        assert_negative(ask(responder, name, "PTR"), "NXDOMAIN", "64.100.in-addr.arpa.")
    assert_negative(ask(make(TEN), "x.10.in-addr.arpa", "PTR"), "NXDOMAIN", "10.in-addr.arpa.")


def test_the_apex_answers_soa() -> None:
    responder = make()
    response = ask(responder, "vpn.test", "SOA")
    assert rdata(response) == ["vpn.test. hostmaster.vpn.test. 1 3600 600 86400 10"]
    assert_negative(ask(responder, "vpn.test", "A"), "NOERROR")
    response = ask(responder, "64.100.in-addr.arpa", "SOA")
    assert rcode(response) == "NOERROR" and str(response.rr[0].rname) == "64.100.in-addr.arpa."


def test_aaaa_and_other_types_of_a_static_name_are_nodata() -> None:
    responder = make()
    for qtype in ["AAAA", "MX", "TXT", "PTR"]:
        assert_negative(ask(responder, "C064001002.vpn.test", qtype), "NOERROR")


def test_any_answers_the_names_own_records() -> None:
    assert rdata(ask(make(), "C064001002.vpn.test", "ANY")) == ["100.64.1.2"]


@pytest.mark.parametrize("name", ["a.b.vpn.test", "under_score.vpn.test", "-x.vpn.test"])
def test_names_that_cannot_exist(name: str) -> None:
    responder = make()
    assert_negative(ask(responder, name), "NXDOMAIN")
    assert not responder.lookups()


# host names through lookups


def test_host_name_through_a_lookup() -> None:
    responder = make()
    responder.receive(query("Alpha.vpn.test", ident=7), CLIENT, 1.0)
    assert responder.answers() == []
    assert responder.lookups() == [Lookup(1, "alpha", b"name:lab:alpha")]
    assert responder.next_deadline() == 6.0
    responder.resolved(1, IPv4Address("100.64.0.7"), 1.5)
    (response,) = answers(responder)
    assert response.header.id == 7 and rdata(response) == ["100.64.0.7"]
    assert str(response.rr[0].rname) == "Alpha.vpn.test." and response.rr[0].ttl == 60
    assert responder.next_deadline() is None
    # from the cache, with the time left, and the PTR now names the host too
    response = ask(responder, "alpha.vpn.test", now=31.0)
    assert rdata(response) == ["100.64.0.7"] and response.rr[0].ttl == 31
    assert not responder.lookups()
    ptr = ask(responder, "7.0.64.100.in-addr.arpa", "PTR", now=31.0)
    assert rdata(ptr) == ["C064000007.vpn.test.", "alpha.vpn.test."]
    stats = responder.statistics()
    assert stats["cache_hits"] == 1 and stats["lookups_started"] == 1
    assert stats["lookups_found"] == 1 and stats["pending"] == 0


def test_queries_for_one_host_share_one_lookup() -> None:
    responder = make()
    responder.receive(query("alpha.vpn.test", "A", ident=1), CLIENT, 0.0)
    responder.receive(query("alpha.vpn.test", "AAAA", ident=2), CLIENT, 0.0)
    assert len(responder.lookups()) == 1
    responder.resolved(1, IPv4Address("100.64.0.7"), 0.1)
    a, aaaa = answers(responder)
    assert a.header.id == 1 and rdata(a) == ["100.64.0.7"]
    assert aaaa.header.id == 2
    assert_negative(aaaa, "NOERROR")


def test_an_unknown_host_is_nxdomain_and_cached_negatively() -> None:
    responder = make()
    responder.receive(query("ghost.vpn.test", "AAAA"), CLIENT, 0.0)
    ((token, host, key),) = responder.lookups()
    responder.resolved(token, None, 0.5)
    (response,) = answers(responder)
    assert_negative(response, "NXDOMAIN")
    assert_negative(ask(responder, "ghost.vpn.test", now=10.0), "NXDOMAIN")
    assert not responder.lookups()
    responder.receive(query("ghost.vpn.test"), CLIENT, 10.5)  # the negative entry has expired
    assert [lookup.host for lookup in responder.lookups()] == ["ghost"]


def test_an_address_outside_the_subnet_is_not_an_answer() -> None:
    responder = make()
    responder.receive(query("alpha.vpn.test"), CLIENT, 0.0)
    responder.resolved(1, IPv4Address("10.0.0.7"), 0.1)
    (response,) = answers(responder)
    assert_negative(response, "NXDOMAIN")
    assert responder.statistics()["lookups_outside_subnet"] == 1


def test_a_lookup_times_out_with_servfail() -> None:
    responder = make(lookup_timeout_s=2.0)
    responder.receive(query("alpha.vpn.test", ident=9), CLIENT, 1.0)
    (lookup,) = responder.lookups()
    responder.handle_timer(2.9)
    assert responder.answers() == []
    assert responder.next_deadline() == 3.0
    responder.handle_timer(3.0)
    (response,) = answers(responder)
    assert rcode(response) == "SERVFAIL" and response.header.id == 9 and not response.rr
    assert responder.next_deadline() is None
    responder.resolved(lookup.token, IPv4Address("100.64.0.7"), 3.5)  # too late: ignored
    assert responder.answers() == []
    assert responder.statistics()["lookups_timed_out"] == 1
    assert responder.statistics()["lookups_unknown_token"] == 1


def test_pending_queries_are_bounded_and_the_oldest_fails() -> None:
    responder = make(max_pending=2)
    for ident, host in enumerate(["a", "b", "c"]):
        responder.receive(query(f"{host}.vpn.test", ident=ident), CLIENT, float(ident))
    assert [lookup.host for lookup in responder.lookups()] == ["a", "b", "c"]
    (response,) = answers(responder)
    assert rcode(response) == "SERVFAIL" and response.header.id == 0
    assert responder.statistics()["pending"] == 2 and responder.next_deadline() == 6.0
    responder.resolved(1, IPv4Address("100.64.0.1"), 3.0)  # a's lookup left with its query
    assert responder.answers() == []
    responder.resolved(3, IPv4Address("100.64.0.3"), 3.0)
    (response,) = answers(responder)
    assert response.header.id == 2 and rdata(response) == ["100.64.0.3"]


def test_a_retransmitted_query_waits_once() -> None:
    responder = make()
    for _ in range(3):
        responder.receive(query("alpha.vpn.test", ident=5), CLIENT, 0.0)
    responder.receive(query("alpha.vpn.test", ident=5), ("100.64.0.3", 53), 0.0)
    assert len(responder.lookups()) == 1
    assert responder.statistics()["dropped_duplicate"] == 2
    responder.resolved(1, IPv4Address("100.64.0.7"), 0.1)
    assert [client for _, client in responder.answers()] == [CLIENT, ("100.64.0.3", 53)]


# the message layer: headers, EDNS, errors


def test_responses_copy_id_rd_and_cd_and_never_offer_recursion() -> None:
    responder = make()
    for ident, rd in [(0, False), (0xFFFF, True), (4242, False)]:
        response = ask(responder, "C064001002.vpn.test", ident=ident, rd=rd)
        assert response.header.id == ident and response.header.rd == rd
        assert response.header.ra == 0 and response.header.qr == 1
    raw = bytearray(query("C064001002.vpn.test"))
    raw[3] |= 0x10  # CD
    responder.receive(bytes(raw), CLIENT, 0.0)
    (response,) = answers(responder)
    assert response.header.cd == 1


def test_edns_queries_get_an_opt_record() -> None:
    response = ask(make(), "C064001002.vpn.test", edns=4096)
    (opt,) = response.ar
    assert opt.rtype == QTYPE.OPT and opt.rclass == 1232 and opt.ttl == 0


def test_an_unknown_edns_version_is_badvers() -> None:
    record = DNSRecord.question("C064001002.vpn.test")
    record.add_ar(EDNS0(udp_len=1232, version=1))
    responder = make()
    responder.receive(record.pack(), CLIENT, 0.0)
    (response,) = answers(responder)
    (opt,) = response.ar
    assert response.header.rcode == 0 and opt.ttl >> 24 == 1  # extended RCODE 16
    assert response.header.q == 0 and responder.statistics()["answered_badvers"] == 1


def _with_flags(wire: bytes, bits: int) -> bytes:
    """``wire`` with ``bits`` set in its header's flags (QR 0x8000, OPCODE n << 11)."""
    flags = int.from_bytes(wire[2:4]) | bits
    return wire[:2] + flags.to_bytes(2) + wire[4:]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (_with_flags(RFC1035_QUERY, 2 << 11), "NOTIMP"),  # STATUS
        (_with_flags(RFC1035_QUERY, 5 << 11), "NOTIMP"),  # UPDATE
        (RFC1035_QUERY[:5] + b"\x02" + RFC1035_QUERY[6:], "FORMERR"),  # QDCOUNT 2, one there
        (RFC1035_QUERY[:5] + b"\x02" + RFC1035_QUERY[6:] + RFC1035_QUERY[12:], "FORMERR"),
        (RFC1035_QUERY[:5] + b"\x00" + RFC1035_QUERY[6:12], "FORMERR"),  # no question
        (RFC1035_QUERY[:-3], "FORMERR"),  # cut short
        (RFC1035_QUERY + b"\x00", "FORMERR"),  # trailing garbage
        (RFC1035_QUERY[:12] + b"\xc0\x0c\x00\x01\x00\x01", "FORMERR"),  # a pointer as QNAME
        (RFC1035_QUERY[:12] + b"\x40" + b"x" * 64 + RFC1035_QUERY[-5:], "FORMERR"),  # label 64
        (RFC1035_QUERY[:12] + (b"\x3f" + b"x" * 63) * 5 + RFC1035_QUERY[-5:], "FORMERR"),
    ],
)
def test_malformed_queries_get_an_error_without_a_question(wire: bytes, code: str) -> None:
    responder = make(TEN)
    responder.receive(wire, CLIENT, 0.0)
    (response,) = answers(responder)
    assert rcode(response) == code and response.header.id == 0x1234
    assert response.header.q == 0 and not response.header.aa


def test_two_opt_records_are_formerr() -> None:
    record = DNSRecord.question("C064001002.vpn.test")
    record.add_ar(EDNS0(udp_len=1232))
    record.add_ar(EDNS0(udp_len=1232))
    assert rcode(_single_answer(record.pack())) == "FORMERR"


def _single_answer(wire: bytes) -> DNSRecord:
    responder = make()
    responder.receive(wire, CLIENT, 0.0)
    (response,) = answers(responder)
    return response


def test_short_datagrams_and_responses_are_dropped() -> None:
    responder = make()
    responder.receive(b"", CLIENT, 0.0)
    responder.receive(RFC1035_QUERY[:11], CLIENT, 0.0)
    responder.receive(_with_flags(RFC1035_QUERY, 0x8000), CLIENT, 0.0)
    assert responder.answers() == []
    stats = responder.statistics()
    assert stats["dropped_short"] == 2 and stats["dropped_response"] == 1 and stats["queries"] == 3


def test_other_classes_and_zone_transfers_are_refused() -> None:
    record = DNSRecord(DNSHeader(id=3), q=DNSQuestion("C064001002.vpn.test", QTYPE.A, 3))  # CH
    assert rcode(_single_answer(record.pack())) == "REFUSED"
    assert rcode(ask(make(), "vpn.test", "AXFR")) == "REFUSED"


def test_a_response_too_large_is_truncated() -> None:
    header = Header(77, 0, True, False)
    question = Query(header, (b"x", b"vpn", b"test"), 1, 1, None)
    many = [ResourceRecord(question.labels, 60, IPv4Address("100.64.0.1") + i) for i in range(40)]
    wire, truncated = message.write_response(header, 0, query=question, answers=many)
    response = DNSRecord.parse(wire)
    assert truncated and len(wire) <= 512 and response.header.tc and not response.rr
    assert response.header.id == 77
    edns = message.Edns(payload=4096, version=0)
    wire, truncated = message.write_response(header, 0, query=question, answers=many, edns=edns)
    assert not truncated and len(DNSRecord.parse(wire).rr) == 40


# fuzzing: nothing raises, every response parses and carries the query's ID

NAMES = [
    "C064001002.vpn.test",
    "alpha.vpn.test",
    "2.1.64.100.in-addr.arpa",
    "example.test",
    "vpn.test",
]
valid_queries = st.builds(
    lambda name, qtype, ident, edns: query(name, qtype, ident=ident, edns=edns),
    st.sampled_from(NAMES),
    st.sampled_from(["A", "AAAA", "PTR", "SOA", "ANY", "TXT"]),
    st.integers(0, 0xFFFF),
    st.none() | st.integers(0, 0xFFFF),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(valid_queries))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(wire)))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip" and where < len(wire):
            wire[where] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del wire[where : where + draw(st.integers(1, 8))]
        else:
            wire[where:where] = draw(st.binary(min_size=1, max_size=8))
    return bytes(wire)


def check_invariants(responder: DnsResponder[Client], sent: list[bytes]) -> None:
    stats = responder.statistics()
    handled = sum(v for k, v in stats.items() if k.startswith(("answered_", "dropped_")))
    assert stats["queries"] == len(sent) == handled + stats["pending"]
    assert stats["pending"] <= responder.settings.max_pending


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300) | mutated() | valid_queries, max_size=12))
def test_fuzzed_datagrams_never_raise(datagrams: list[bytes]) -> None:
    responder = make(max_pending=4)
    ids: set[bytes] = set()
    for wire in datagrams:
        ids.add(bytes(wire[:2]))
        responder.receive(wire, CLIENT, 0.0)
        for response, client in responder.answers():
            assert client == CLIENT
            assert bytes(response[:2]) in ids  # the ID of this query, or of one evicted by it
            assert response[2] & 0x80 and not response[3] & 0x80  # QR, and no RA
            assert len(response) <= 1232
            try:
                DNSRecord.parse(response)
            except DNSError as error:  # an echoed label that is not UTF-8: DNS allows it
                assert "Invalid label" in str(error)
    check_invariants(responder, datagrams)
    responder.handle_timer(100.0)
    assert responder.statistics()["pending"] == 0 and responder.next_deadline() is None


@settings(max_examples=300)
@given(st.sampled_from([TEN, CGNAT]), st.integers(0, 2**32 - 1), st.booleans())
def test_every_address_in_the_subnet_answers_a_and_ptr(
    subnet: IPv4Network, number: int, upper: bool
) -> None:
    address = subnet.network_address + number % subnet.num_addresses
    name = static_name(address, subnet, "vpn.test")
    responder = make(subnet)
    assert rdata(ask(responder, name.upper() if upper else name)) == [str(address)]
    assert rdata(ask(responder, address.reverse_pointer, "PTR")) == [name + "."]
