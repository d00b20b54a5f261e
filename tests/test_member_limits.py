"""Bounded work per member and records that carry authority, on in-memory cores (the
``Lab`` of test_routing.py: RoutingCores on a fake underlay, a virtual clock).

- a ConnectRequest naming a made-up address gets no datagram (and no handshake) there;
- one member's messages keep at most ``MEMBER_LINKS`` endpoints waiting for a link;
- a message costs the same number of link-table scans with 100 or 1,000 endpoints waiting;
- a DHT record of ``ip:<ns>:...`` / ``name:<ns>:...`` is stored and believed only with its
  signer's certificate for ``<ns>``: a foreign network's member is refused and counted;
- one node has at most ``serving_per_node`` DHT requests served at once by another;
- one link's packets keep at most ``MEMBER_UNKNOWN`` unknown sources resolving.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

import msgspec

from pipeline.control.addressing import MEMBER_UNKNOWN
from pipeline.control.dht import wire as dw
from pipeline.control.dht.authority import RecordAuthority
from pipeline.control.links import Link
from pipeline.control.overlay import wire as ow
from pipeline.control.routing import MEMBER_LINKS, RoutingCore
from pipeline.crypto.cert import RevocationList
from pipeline.nodeid import id_from_bytes, id_to_bytes
from tests.test_addressing import AddressLab, icmp_packet, lease
from tests.test_links import WALL, ca_pair, member, rng_from
from tests.test_routing import Lab, endpoint

CODEC = ow.HostPortCodec()


def junk_endpoint(i: int) -> tuple[str, int]:
    """Made-up addresses nobody holds (198.19.0.0/16)."""
    return (f"198.19.{(i >> 8) & 0xFF}.{i & 0xFF}", 4789)


def is_junk(to: object) -> bool:
    return isinstance(to, tuple) and str(to[0]).startswith("198.19.")


def member_slot(core: RoutingCore, node_id: bytes) -> int:
    slot = core._slot_of(node_id)
    assert slot is not None and core.links.links[slot].up
    return slot


def test_a_connect_request_naming_a_made_up_address_sends_nothing_there() -> None:
    lab = Lab(3)
    lab.run(15)
    target, mallory = lab.cores[1], lab.idents[2]
    slot = member_slot(target, mallory.node_id)
    rng = random.Random(5)
    for i in range(300):
        # a requester id nobody holds, this node as the destination (it answers), a made-up
        # address; half with a path naming a node this one is not connected to
        path = () if i % 2 else (rng.randbytes(20),)
        request = ow.ConnectRequest(
            rng.randbytes(20),
            target.identity.node_id,
            1,
            64,
            2,
            rng.getrandbits(32),
            CODEC.encode(junk_endpoint(i)),
            path,
        )
        target.receive_overlay(slot, ow.encode(request), lab.now, lab.wall())
    sent = target.handshakes_to_send()
    replies = target.overlay_to_send()
    assert not [to for _, to in sent if is_junk(to)]
    assert not [lk for lk in target.links.links.values() if is_junk(lk.endpoint)]
    stats = target.overlay.statistics()
    assert stats["connect_replies_unroutable"] == 150
    # the others go back to where they came from: the member's own link
    assert {s for s, _ in replies} == {slot} and len(replies) >= 150
    lab.run(2)
    assert not [lk for lk in target.links.links.values() if is_junk(lk.endpoint)]


def near_ids(center: bytes, n: int, start: int) -> Iterator[bytes]:
    c = id_from_bytes(center)
    for k in range(n):
        yield id_to_bytes((c + start + k + 1) % (1 << 160))


def test_one_member_keeps_only_a_few_endpoints_waiting() -> None:
    """Neighbour lists naming ever nearer made-up nodes: the node tries at most
    ``MEMBER_LINKS`` of their endpoints at once for that member, and counts the rest."""
    lab = Lab(3)
    lab.run(15)
    target, mallory = lab.cores[1], lab.idents[2]
    slot = member_slot(target, mallory.node_id)
    tried: set[object] = set()
    for round_ in range(40):
        start = 10_000 - round_ * 200  # nearer every round: each is wanted as a neighbour
        entries = tuple(
            (nid, CODEC.encode(junk_endpoint(round_ * 32 + k)), True)
            for k, nid in enumerate(near_ids(target.identity.node_id, 32, start))
        )
        msg = ow.Neighbours(mallory.node_id, False, entries)
        target.receive_overlay(slot, ow.encode(msg), lab.now, lab.wall())
        tried |= {to for _, to in target.handshakes_to_send() if is_junk(to)}
        waiting = [e for e in target._waiting if is_junk(e)]
        assert len(waiting) <= MEMBER_LINKS
    assert target.counters["links_refused_member_limit"] > 0
    assert len(tried) <= MEMBER_LINKS
    # the overlay retries its Hellos on its own timers: they still count against the member
    handshakes = target.handshakes_to_send

    def spy() -> list[tuple[bytes, object]]:
        out = handshakes()
        tried.update(to for _, to in out if is_junk(to))
        return out

    target.handshakes_to_send = spy  # type: ignore[method-assign]
    lab.run(5)
    assert len(tried) <= MEMBER_LINKS
    assert len([e for e in target._waiting if is_junk(e)]) <= MEMBER_LINKS


class CountingLinks(dict[int, Link]):
    """The link table, counting whole-table scans."""

    scans = 0

    def items(self) -> Any:
        CountingLinks.scans += 1
        return super().items()

    def values(self) -> Any:
        CountingLinks.scans += 1
        return super().values()

    def __iter__(self) -> Any:
        CountingLinks.scans += 1
        return super().__iter__()


def scans_per_message(waiting: int) -> tuple[int, int]:
    """(link-table scans for 50 overlay messages on a member's link, endpoints waiting)
    with ``waiting`` made-up endpoints waiting for a link."""
    lab = Lab(2)
    lab.run(10)
    core, other = lab.cores[1], lab.idents[0]
    slot = member_slot(core, other.node_id)
    for i in range(waiting):
        core._send_overlay(b"\x01held", junk_endpoint(i), lab.now, lab.wall())
    core.handshakes_to_send()
    core.links.links = CountingLinks(core.links.links)
    CountingLinks.scans = 0
    for seq in range(50):
        ping = ow.Ping(other.node_id, seq, lab.now)
        core.receive_overlay(slot, ow.encode(ping), lab.now, lab.wall())
    pongs = [p for s, p in core.overlay_to_send() if s == slot]
    assert len(pongs) == 50  # every message was handled (answered on the member's link)
    return CountingLinks.scans, len(core._waiting)


def test_a_message_costs_no_more_with_a_thousand_endpoints_waiting() -> None:
    few, held_few = scans_per_message(100)
    many, held_many = scans_per_message(1000)
    assert (held_few, held_many) == (100, 1000)
    assert many == few  # the same work per message, whatever waits
    assert few <= 50  # and no scan of the link table per waiting endpoint


def test_waiting_messages_expire_through_their_heap() -> None:
    lab = Lab(2)
    lab.run(10)
    core = lab.cores[1]
    for i in range(200):
        core._send_overlay(b"\x01held", junk_endpoint(i), lab.now, lab.wall())
    assert len(core._waiting) == 200
    deadline = core.next_deadline()
    assert deadline is not None
    lab.run(7)  # QUEUE_S is 6
    assert not core._waiting and not core._waiting_due
    assert core.counters["overlay_queue_expired"] == 200
    assert not [lk for lk in core.links.links.values() if is_junk(lk.endpoint)]


# -- records carry authority ------------------------------------------------------------------


def foreign_lab() -> tuple[Lab, RoutingCore]:
    """Three members of "lab" and one of "other" only, sharing one overlay (one authority)."""
    lab = Lab(3)
    ca, ca_cert = ca_pair()
    ident, cert = member(ca, ca_cert, 90, "foreigner", networks=("other",))
    for core in lab.cores:
        core.links.networks = ("lab", "other")
    foreign = RoutingCore(
        identity=ident,
        certificate=cert,
        ca=ca_cert,
        namespace="other",
        address=IPv4Address("100.64.0.200"),
        peers=[],
        bootstrap=[endpoint(0)],
        revoked=RevocationList.empty(),
        rng=random.Random(90),
        entropy=rng_from(90),
        networks=("lab",),
    )
    lab.idents.append(ident)
    lab.cores.append(foreign)
    lab.by_endpoint[endpoint(3)] = 3
    return lab, foreign


def test_a_foreign_networks_member_cannot_hold_our_addresses_or_names() -> None:
    lab, foreign = foreign_lab()
    lab.run(20)
    assert foreign.joined
    for key in (b"ip:lab:100.64.0.50", b"name:lab:www"):
        value = foreign.identity.node_id if key.startswith(b"ip:") else b"x"
        rid = foreign.dht.create(key, value, 300.0, lab.now)
        lab.run(3)
        (result,) = [r for r in foreign.dht_results() if r.request_id == rid]
        assert not result.ok and result.reason == "refused"
    refused = sum(c.dht.statistics().get("refused_record_wrong_network", 0) for c in lab.cores)
    assert refused >= 2
    # its own network's keys it may hold
    rid = foreign.dht.create(b"ip:other:100.64.0.200", foreign.identity.node_id, 300.0, lab.now)
    lab.run(3)
    (result,) = [r for r in foreign.dht_results() if r.request_id == rid]
    assert result.ok
    # and the address stays ours to take
    a = lab.cores[1]
    rid = a.dht.create(b"ip:lab:100.64.0.50", a.identity.node_id, 300.0, lab.now)
    lab.run(3)
    (result,) = [r for r in a.dht_results() if r.request_id == rid]
    assert result.ok


def test_a_foreign_record_handed_over_is_not_stored() -> None:
    """A Store (a replica's hand-over, no create) of a foreign member's record: refused."""
    lab, foreign = foreign_lab()
    lab.run(20)
    record = dw.sign_record(
        foreign.identity,
        b"ip:lab:100.64.0.51",
        foreign.identity.node_id,
        seq=1,
        lease_s=300.0,
        certificate=foreign.links.certificate.encode(),
    )
    store = dw.encode(dw.Store(0, dw.Held(record, 300.0), False))
    for core in lab.cores[:3]:
        foreign.overlay.send_to_node(id_from_bytes(core.identity.node_id), store, lab.now)
    foreign.pump()
    lab.run(2)
    for core in lab.cores[:3]:
        assert b"ip:lab:100.64.0.51" not in core.dht.records(lab.now)
    refused = sum(c.dht.statistics().get("refused_record_wrong_network", 0) for c in lab.cores)
    assert refused >= 3


def test_the_authority_checks_the_certificate_a_record_carries() -> None:
    ca, ca_cert = ca_pair()
    other_ca, other_ca_cert = ca_pair(seed=2)
    ident, cert = member(ca, ca_cert, 70, "a")
    _, alien = member(other_ca, other_ca_cert, 70, "a")  # same key, another authority
    other_ident, other_cert = member(ca, ca_cert, 71, "b")
    _, old = member(ca, ca_cert, 70, "a", not_after=int(WALL) - 10)
    revoked = RevocationList.empty()
    authority = RecordAuthority(ca_cert, lambda: revoked, lambda: WALL)

    def record(key: bytes, certificate: bytes) -> dw.DhtRecord:
        return dw.sign_record(
            ident, key, ident.node_id, seq=1, lease_s=60.0, certificate=certificate
        )

    key = b"ip:lab:100.64.0.9"
    assert authority.check(record(key, cert.encode())) is None
    assert authority.check(record(b"name:lab:a", cert.encode())) is None
    assert authority.check(record(b"ip:other:100.64.0.9", cert.encode())) == (
        "record_wrong_network"
    )
    assert authority.check(record(b"ip::1", cert.encode())) == "record_wrong_network"
    assert authority.check(record(key, b"")) == "record_no_certificate"
    assert authority.check(record(key, other_cert.encode())) == "record_key_mismatch"
    assert authority.check(record(key, alien.encode())) == "record_foreign_ca"
    assert authority.check(record(key, old.encode())) == "record_expired"
    assert authority.check(record(key, b"AVNC\x01junk" + bytes(70))) == "record_malformed"
    assert authority.check(record(b"free-form", b"")) is None  # a key of no network
    assert other_ident.node_id != ident.node_id


def test_a_record_with_a_certificate_round_trips_the_codec() -> None:
    ca, ca_cert = ca_pair()
    ident, cert = member(ca, ca_cert, 70, "a")
    rec = dw.sign_record(
        ident, b"ip:lab:1.2.3.4", ident.node_id, seq=3, lease_s=9.0, certificate=cert.encode()
    )
    msg = dw.Create(1, rec)
    assert dw.decode(dw.encode(msg)) == msg
    assert dw.check_record(rec) is None
    # an older record (no certificate field) still decodes: the field is optional
    short = (
        dw.MAGIC
        + bytes([dw.VERSION])
        + msgspec.msgpack.encode([1, 1, list(msgspec.structs.astuple(rec))[:7]])
    )
    assert dw.decode(short) == dw.Create(1, msgspec.structs.replace(rec, certificate=b""))


# -- per-member limits on DHT work and resolutions ---------------------------------------------


def test_one_node_has_only_a_few_requests_served_at_once() -> None:
    lab = Lab(5)
    lab.run(20)
    mallory = lab.cores[4]
    for i in range(400):
        mallory.dht.get(f"ip:lab:10.9.{i >> 8}.{i & 0xFF}".encode(), lab.now)
    mallory.pump()
    lab.deliver()
    busy = sum(c.dht.statistics().get("refused_member_busy", 0) for c in lab.cores[:4])
    assert busy > 0
    limit = lab.cores[0].dht.settings.serving_per_node
    for core in lab.cores[:4]:
        assert core.dht._serving_for[id_from_bytes(mallory.identity.node_id)] <= limit
    lab.run(5)
    # and a well-behaved member is served meanwhile
    a = lab.cores[1]
    rid = a.dht.get(b"ip:lab:100.64.0.1", lab.now)
    a.pump()
    lab.run(3)
    (result,) = [r for r in a.dht_results() if r.request_id == rid]
    assert result.ok and result.records


def test_one_link_keeps_only_a_few_sources_resolving() -> None:
    lab = AddressLab(3)
    lab.run(15)
    a = lease(lab, 1)
    lab.run(2)
    addressing, core = lab.addressing[1], lab.cores[1]
    slot = member_slot(core, lab.idents[2].node_id)
    for i in range(100):
        src = IPv4Address(f"100.64.0.{100 + i}")
        addressing.packet_from_unknown(slot, icmp_packet(src, a), lab.now, lab.wall())
    assert addressing.counters["dropped_member_resolves"] == 100 - MEMBER_UNKNOWN
    other = member_slot(core, lab.idents[0].node_id)
    b = IPv4Address("100.64.0.250")
    addressing.packet_from_unknown(other, icmp_packet(b, a), lab.now, lab.wall())
    assert addressing.counters["dropped_member_resolves"] == 100 - MEMBER_UNKNOWN
    lab.run(3)
    assert not addressing._unknown and not addressing._unknown_per_link
