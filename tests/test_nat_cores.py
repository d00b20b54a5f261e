"""StunProbe and PortMapper driven by hand: explicit times, the exact datagrams they send,
the events they give back (aioquic's style)."""

from __future__ import annotations

import random

import pytest

from pipeline.control.nat import (
    Mapping,
    MappingChanged,
    MappingDeleted,
    MappingFailed,
    MappingLost,
    MappingObserved,
    Phase,
    PortMapper,
    PortMapSettings,
    ProbeDone,
    ProbeSettings,
    Protocol,
    ServerFailed,
    StunProbe,
)
from pipeline.control.nat.discovery import NatDiscovery
from pipeline.control.nat.retransmit import Retransmission
from pipeline.control.shortcuts import CandidateKind
from pipeline.errors import RemoteProtocolError
from pipeline.wire import natpmp, pcp, stun

S1 = ("198.18.90.3", 3478)
S2 = ("198.18.90.5", 3478)
ME = ("198.18.90.11", 40000)
GATEWAY = "198.19.1.1"
GW = (GATEWAY, 5351)
CLIENT = ("198.19.1.10", 40000)
EXTERNAL = ("198.18.90.11", 40000)


def test_retransmission_schedule() -> None:
    """RTO 0.5 s doubling, 4 sends: at 0, 0.5, 1.5, 3.5 s; given up at 7.5 s."""
    r = Retransmission(b"x", 0.5, 4, next_at=0.0)
    for t in (0.0, 0.5, 1.5, 3.5):
        assert r.next_at == t and r.due(t) and r.fire(t) == b"x"
    assert r.next_at == 7.5 and r.exhausted and r.first_sent_at == 0.0
    assert not r.due(7.4) and r.fire(7.5) is None


# ----------------------------------------------------------------------------------------------
# StunProbe


def probe(servers: tuple[tuple[str, int], ...] = (S1, S2)) -> StunProbe:
    return StunProbe(servers, 0.0, random.Random(7))


def requests(p: StunProbe) -> dict[tuple[str, int], stun.StunMessage]:
    out = {}
    for data, address in p.datagrams_to_send():
        message = stun.parse(data)
        assert (message.method, message.cls) == (stun.Method.BINDING, stun.Class.REQUEST)
        assert message.fingerprint
        out[address] = message
    return out


def test_probe_asks_every_server_at_once() -> None:
    p = probe()
    sent = requests(p)
    assert list(sent) == [S1, S2]
    assert sent[S1].transaction_id != sent[S2].transaction_id
    assert p.next_deadline() == 0.5 and not p.done and p.events() == []


def test_probe_retransmits_then_gives_up() -> None:
    p = probe((S1,))
    first = p.datagrams_to_send()
    for t in (0.5, 1.5, 3.5):
        assert p.next_deadline() == t
        p.handle_timer(t)
        assert p.datagrams_to_send() == first  # the same request, the same transaction
    assert p.next_deadline() == 7.5
    p.handle_timer(7.4)
    assert p.events() == []
    p.handle_timer(7.5)
    assert p.datagrams_to_send() == []
    report = p.report()
    assert p.events() == [ServerFailed(S1, "timeout"), ProbeDone(report)]
    assert p.done and p.next_deadline() is None
    assert report.varies is None and report.failed == ((S1, "timeout"),)
    assert p.statistics() == {"requests_sent": 4, "failed_timeout": 1}


def test_endpoint_independent_mapping() -> None:
    p = probe()
    sent = requests(p)
    assert p.receive(stun.binding_success(sent[S1].transaction_id, ME), S1, 0.02)
    assert p.events() == [MappingObserved(S1, ME, 0.02, 0.02)]
    p.handle_timer(0.5)  # S2 is asked again; S1 is not
    assert [a for _, a in p.datagrams_to_send()] == [S2]
    assert p.receive(stun.binding_success(sent[S2].transaction_id, ME), S2, 0.6)
    report = p.report()
    assert p.events() == [MappingObserved(S2, ME, 0.6, 0.6), ProbeDone(report)]
    assert report.varies is False and report.reflexive == ME
    assert p.done and p.next_deadline() is None


def test_port_randomising_nat_varies() -> None:
    p = probe()
    sent = requests(p)
    p.receive(stun.binding_success(sent[S1].transaction_id, ("198.18.90.14", 11146)), S1, 0.1)
    p.receive(stun.binding_success(sent[S2].transaction_id, ("198.18.90.14", 44685)), S2, 0.1)
    report = p.report()
    assert report.varies is True and report.reflexive is None
    assert [o.reflexive[1] for o in report.observations] == [11146, 44685]


def test_old_server_mapped_address_counts() -> None:
    p = probe((S1,))
    tid = requests(p)[S1].transaction_id
    p.receive(stun.binding_success(tid, ME, xor=False, plain=True), S1, 0.1)
    assert p.report().reflexive == ME


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda tid: stun.binding_error(tid, 400, "Bad Request"), "error_400"),
        (lambda tid: stun.binding_success(tid, ME, xor=False), "no_address"),
        (
            lambda tid: stun.encode(
                stun.Method.BINDING,
                stun.Class.SUCCESS,
                tid,
                [
                    (0x0024, b"\0\0\0\0"),
                    (stun.Attr.XOR_MAPPED_ADDRESS, stun.address_value(ME, tid)),
                ],
            ),
            "unknown_attribute",
        ),
    ],
)
def test_bad_answers_fail_the_server(answer: object, reason: str) -> None:
    p = probe((S1,))
    tid = requests(p)[S1].transaction_id
    assert callable(answer)
    assert p.receive(answer(tid), S1, 0.1)
    assert p.events() == [ServerFailed(S1, reason), ProbeDone(p.report())]


def test_answers_that_are_not_ours() -> None:
    p = probe((S1,))
    tid = requests(p)[S1].transaction_id
    assert not p.receive(stun.binding_success(bytes(12), ME), S1, 0.1)  # another transaction
    assert not p.receive(stun.binding_request(tid), S1, 0.1)  # a request, not an answer
    with pytest.raises(RemoteProtocolError):
        p.receive(b"\x01\x01" + bytes(30), S1, 0.1)  # an autovn datagram is not STUN
    assert p.receive(stun.binding_success(tid, ME), S1, 0.2)
    assert p.receive(stun.binding_success(tid, ME), S1, 0.3)  # a late duplicate: ours
    assert [type(e) for e in p.events()] == [MappingObserved, ProbeDone]
    assert p.statistics()["responses_late"] == 1


def test_probe_software_attribute() -> None:
    p = StunProbe([S1], 0.0, random.Random(1), ProbeSettings(software="autovn"))
    assert requests(p)[S1].software == "autovn"


# ----------------------------------------------------------------------------------------------
# PortMapper


def mapper(**settings: object) -> PortMapper:
    return PortMapper(GATEWAY, CLIENT, 0.0, random.Random(3), PortMapSettings(**settings))  # type: ignore[arg-type]


def sent(m: PortMapper) -> list[bytes]:
    out = m.datagrams_to_send()
    assert all(address == GW for _, address in out)
    return [data for data, _ in out]


def pcp_answer(
    data: bytes,
    *,
    result: int = 0,
    external: tuple[str, int] = EXTERNAL,
    lifetime: int | None = None,
) -> bytes:
    request = pcp.parse_request(data)
    assert isinstance(request, pcp.MapRequest)
    return pcp.MapResponse(
        result,
        request.lifetime_s if lifetime is None else lifetime,
        100,
        request.nonce,
        request.internal_port,
        external[1],
        external[0],
    ).encode()


def natpmp_answers(datagrams: list[bytes], port: int = 40000) -> list[bytes]:
    out = []
    for data in datagrams:
        request = natpmp.parse_request(data)
        if isinstance(request, natpmp.ExternalAddressRequest):
            out.append(natpmp.ExternalAddressResponse(0, 100, EXTERNAL[0]).encode())
        else:
            out.append(
                natpmp.MapResponse(0, 100, request.internal_port, port, request.lifetime_s).encode()
            )
    return out


def test_pcp_map_request_and_mapping() -> None:
    m = mapper()
    (request,) = sent(m)
    parsed = pcp.parse_request(request)
    assert parsed == pcp.MapRequest(m.nonce, 40000, 7200, "198.19.1.10", 40000, "0.0.0.0")
    assert (m.next_deadline(), m.phase) == (0.25, Phase.ASKING)
    assert m.receive(pcp_answer(request), GW, 0.01)
    mapping = Mapping(Protocol.PCP, EXTERNAL, 40000, 7200, 0.01)
    assert m.mapping == mapping and m.phase is Phase.MAPPED
    assert m.events() == [MappingChanged(mapping)]
    assert m.next_deadline() == 0.01 + 3600
    assert sent(m) == []


def test_pcp_renewal_at_half_lifetime_with_the_same_nonce() -> None:
    m = mapper()
    (request,) = sent(m)
    m.receive(pcp_answer(request, external=("198.18.90.11", 40007)), GW, 0.0)
    m.events()
    m.handle_timer(3599.9)
    assert sent(m) == []
    m.handle_timer(3600.0)
    (renewal,) = sent(m)
    parsed = pcp.parse_request(renewal)
    assert isinstance(parsed, pcp.MapRequest)
    assert parsed.nonce == m.nonce and parsed.suggested_external_port == 40007
    assert parsed.suggested_external_address == "198.18.90.11"
    m.receive(pcp_answer(renewal, external=("198.18.90.11", 40007)), GW, 3600.1)
    assert m.events() == []  # the same endpoint: nothing to tell
    assert m.mapping is not None and m.mapping.obtained_at == 3600.1
    assert m.statistics()["renewals"] == 1


def test_silent_pcp_then_natpmp() -> None:
    m = mapper()
    first = sent(m)
    for t in (0.25, 0.75):
        m.handle_timer(t)
        assert sent(m) == first
    assert m.next_deadline() == 1.75
    m.handle_timer(1.75)  # PCP gave up: NAT-PMP's two requests go at once
    datagrams = sent(m)
    assert [natpmp.parse_request(d) for d in datagrams] == [
        natpmp.ExternalAddressRequest(),
        natpmp.MapRequest(40000, 40000, 7200),
    ]
    address, mapping = natpmp_answers(datagrams, port=40001)
    assert m.receive(mapping, GW, 1.8) and m.mapping is None  # the address is still missing
    assert m.receive(address, GW, 1.9)
    expected = Mapping(Protocol.NATPMP, ("198.18.90.11", 40001), 40000, 7200, 1.9)
    assert m.mapping == expected and m.events() == [MappingChanged(expected)]


def test_natpmp_gateway_answering_pcp_moves_on_at_once() -> None:
    m = mapper()
    sent(m)
    unsupported = natpmp.MapResponse(natpmp.Result.UNSUPPORTED_VERSION, 0, 0, 0, 0).encode()
    assert m.receive(unsupported[:8], GW, 0.01)
    assert len(sent(m)) == 2  # NAT-PMP requests
    assert m.statistics()["refused_unsupported_version"] == 1


def test_all_fail_then_retry() -> None:
    m = mapper(retry_s=60.0)
    for t in (0.0, 0.25, 0.75, 1.75, 2.0, 2.5, 3.5):
        m.handle_timer(t)
    assert m.phase is Phase.FAILED
    assert m.events() == [
        MappingFailed(((Protocol.PCP, "timeout"), (Protocol.NATPMP, "timeout")), 63.5)
    ]
    assert m.next_deadline() == 63.5
    sent(m)
    m.handle_timer(63.5)
    (again,) = sent(m)
    assert isinstance(pcp.parse_request(again), pcp.MapRequest)


def test_refused_everywhere() -> None:
    m = mapper()
    (request,) = sent(m)
    m.receive(pcp_answer(request, result=pcp.Result.NOT_AUTHORIZED), GW, 0.1)
    address, _ = sent(m)
    m.receive(natpmp.ExternalAddressResponse(natpmp.Result.NETWORK_FAILURE, 1, "0.0.0.0").encode(),
              GW, 0.2)  # fmt: skip
    (failed,) = m.events()
    assert failed == MappingFailed(
        ((Protocol.PCP, "not_authorized"), (Protocol.NATPMP, "network_failure")), 300.2
    )


def test_stop_deletes_with_the_same_nonce() -> None:
    m = mapper()
    (request,) = sent(m)
    m.receive(pcp_answer(request), GW, 0.1)
    m.events()
    m.stop(10.0)
    (delete,) = sent(m)
    parsed = pcp.parse_request(delete)
    assert isinstance(parsed, pcp.MapRequest)
    assert parsed.nonce == m.nonce and parsed.lifetime_s == 0 and parsed.internal_port == 40000
    assert m.phase is Phase.STOPPING and not m.done
    assert m.receive(pcp_answer(delete, lifetime=0), GW, 10.01)
    assert m.events() == [MappingDeleted(Protocol.PCP, True)]
    assert m.done and m.mapping is None and m.next_deadline() is None
    assert not m.receive(pcp_answer(delete, lifetime=0), GW, 10.02)  # stopped: not ours


def test_stop_without_answer_gives_up() -> None:
    m = mapper(protocols=(Protocol.NATPMP,))
    datagrams = sent(m)
    for answer in natpmp_answers(datagrams):
        m.receive(answer, GW, 0.1)
    m.events()
    m.stop(1.0)
    (delete,) = sent(m)
    assert natpmp.parse_request(delete) == natpmp.MapRequest(40000, 0, 0)
    for t in (1.25, 1.75, 2.75):
        m.handle_timer(t)
    assert m.events() == [MappingDeleted(Protocol.NATPMP, False)] and m.done


def test_refused_renewal_loses_the_mapping_and_asks_again() -> None:
    m = mapper()
    (request,) = sent(m)
    m.receive(pcp_answer(request), GW, 0.0)
    m.events()
    m.handle_timer(3600.0)
    (renewal,) = sent(m)
    m.receive(pcp_answer(renewal, result=pcp.Result.NO_RESOURCES), GW, 3600.1)
    assert m.events() == [MappingLost(Protocol.PCP, "no_resources")]
    assert m.phase is Phase.ASKING and len(sent(m)) == 1


def test_renewals_unanswered_until_expiry() -> None:
    m = mapper(lifetime_s=100)
    (request,) = sent(m)
    m.receive(pcp_answer(request), GW, 0.0)
    m.events()
    t = 50.0
    while m.phase is Phase.MAPPED:
        assert m.next_deadline() == t
        m.handle_timer(t)
        sent(m)
        t = m.next_deadline() or 0.0
    # renewals at 50 (given up 51.75), 75.875 (77.625), ... then expiry at 100
    assert m.events() == [MappingLost(Protocol.PCP, "expired")]
    assert m.phase is Phase.ASKING


def test_answers_from_elsewhere_are_not_ours() -> None:
    m = mapper()
    (request,) = sent(m)
    assert not m.receive(pcp_answer(request), ("198.19.1.2", 5351), 0.1)
    assert not m.receive(pcp_answer(request), (GATEWAY, 5350), 0.1)
    other = pcp.MapResponse(0, 7200, 1, bytes(12), 40000, 40000, EXTERNAL[0]).encode()
    assert not m.receive(other, GW, 0.1)  # another nonce
    with pytest.raises(RemoteProtocolError):
        m.receive(b"\x02\x81", GW, 0.1)
    assert m.mapping is None


def test_announcement_renews_at_once() -> None:
    m = mapper()
    (request,) = sent(m)
    m.receive(pcp_answer(request), GW, 0.0)
    m.events()
    assert m.receive(pcp.AnnounceResponse(0, 0).encode(), GW, 20.0)
    (renewal,) = sent(m)
    assert pcp.parse_request(renewal) == pcp.MapRequest(
        m.nonce, 40000, 7200, "198.19.1.10", 40000, "198.18.90.11"
    )
    assert m.statistics()["announcements"] == 1


# --------------------------------------------------------------------------- NatDiscovery


@pytest.mark.parametrize(
    ("ports", "advertised"),
    [((40000, 40000), True), ((11146, 44685), False)],
    ids=["same-mapping", "mapping-varies"],
)
def test_a_reflexive_address_is_a_candidate_only_if_the_mapping_is_the_same_for_all(
    ports: tuple[int, int], advertised: bool
) -> None:
    """Behind a NAT that maps per destination, the address a STUN server saw is another
    peer's wrong port: it is shown (netcheck) but not advertised as a candidate; its IP is
    the public one birthday probing aims at. Either verdict is news for the owner (a new
    ``candidates_version``), even when the candidates stay the same."""
    nat = NatDiscovery(
        port=4789, stun_servers=(S1, S2), port_mapping=False, rng=random.Random(1), now=0.0
    )
    nat.set_local(["198.19.1.10"], "198.19.1.1", 0.0)
    before = nat.candidates_version
    nat.handle_timer(0.0)
    for data, server in nat.stun_to_send():
        request = stun.parse(data)
        port = ports[0] if server == S1 else ports[1]
        answer = stun.binding_success(request.transaction_id, ("198.18.90.14", port))
        assert nat.receive_stun(answer, server, 0.1)
    kinds = {c.kind for c in nat.candidates()}
    assert CandidateKind.LOCAL in kinds
    assert (CandidateKind.REFLEXIVE in kinds) is advertised
    assert nat.mapping_varies is not advertised
    assert nat.picture()["reflexive"].startswith("198.18.90.14:")
    assert nat.public_ip == "198.18.90.14" and nat.candidates_version > before
