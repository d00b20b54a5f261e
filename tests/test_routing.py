"""RoutingCore in memory: several cores on a fake underlay form the overlay over
authenticated links, register their addresses in the DHT, resolve each other's, and make
end-to-end sessions through the overlay with a node they cannot reach directly."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

import pytest

from pipeline.control import events as ev
from pipeline.control.links import Via
from pipeline.control.routing import RoutingCore
from pipeline.control.shortcuts import decode_path
from pipeline.crypto.cert import RevocationList
from pipeline.crypto.identity import Identity
from pipeline.crypto.screen import resync_hint
from pipeline.nodeid import id_from_bytes, id_to_bytes
from tests.test_links import WALL, ca_pair, member, rng_from

PORT = 4789


def endpoint(i: int) -> tuple[str, int]:
    return (f"198.18.0.{i + 1}", PORT)


def vip(i: int) -> IPv4Address:
    return IPv4Address(f"100.64.0.{i + 1}")


class Lab:
    """Cores on an underlay where every endpoint reaches every other, except ``blocked``
    pairs (both directions). A core in ``down`` is not running (not started yet, or
    crashed): no timers, and what it would send or receive is lost."""

    def __init__(
        self,
        n: int,
        *,
        blocked: tuple[tuple[int, int], ...] = (),
        seed: int = 7,
        dhcp: bool = False,
    ):
        ca, ca_cert = ca_pair()
        self.rng = random.Random(seed)
        self.blocked = {frozenset(p) for p in blocked}
        self.idents: list[Identity] = []
        self.cores: list[RoutingCore] = []
        for i in range(n):
            ident, cert = member(ca, ca_cert, 30 + i, f"n{i}")
            self.idents.append(ident)
            self.cores.append(
                RoutingCore(
                    identity=ident,
                    certificate=cert,
                    ca=ca_cert,
                    namespace="lab",
                    address=None if dhcp else vip(i),
                    peers=[],
                    bootstrap=[] if i == 0 else [endpoint(0)],
                    revoked=RevocationList.empty(),
                    rng=random.Random(seed * 100 + i),
                    entropy=rng_from(seed * 100 + i),
                    register_address=not dhcp,
                )
            )
        self.now = 1000.0
        self.by_endpoint = {endpoint(i): i for i in range(n)}
        self.down: set[int] = set()

    def wall(self) -> float:
        return WALL + self.now

    def step(self, dt: float = 0.05) -> None:
        self.now += dt
        for i, core in enumerate(self.cores):
            if i not in self.down:
                core.handle_timer(self.now, self.wall())
        self.after_timers()
        self.deliver()

    def after_timers(self) -> None:
        """A subclass's cores on top of these run their timers here."""

    def deliver(self) -> None:
        for _ in range(50):
            moved = False
            for i, core in enumerate(self.cores):
                if i in self.down:
                    core.handshakes_to_send(), core.overlay_to_send(), core.probes_to_send()
                    continue
                for datagram, to in core.handshakes_to_send():
                    j = self.by_endpoint.get(to)
                    if j is None or j in self.down or frozenset((i, j)) in self.blocked:
                        continue
                    moved = True
                    self.cores[j].receive_handshake(datagram, endpoint(i), self.now, self.wall())
                for slot, payload in core.overlay_to_send():
                    link = core.links.links.get(slot)
                    assert link is not None and link.certificate is not None
                    if isinstance(link.endpoint, Via):  # relayed: overlay_io's job, done here
                        j = self.idents.index(
                            next(x for x in self.idents if x.node_id == link.certificate.node_id)
                        )
                    else:
                        j = self.by_endpoint[link.endpoint]
                        if frozenset((i, j)) in self.blocked:
                            continue
                    if j in self.down:
                        continue
                    theirs = self.cores[j]._slot_of(self.idents[i].node_id)
                    if theirs is None:
                        continue
                    moved = True
                    theirs_core = self.cores[j]
                    if payload[:1] == b"\x01":  # the overlay codec's version byte
                        theirs_core.receive_overlay(theirs, payload, self.now, self.wall())
                    else:
                        path = decode_path(payload)
                        theirs_core.receive_path(theirs, path, self.now, self.wall())
                for _slot, to, payload in core.probes_to_send():
                    j = self.by_endpoint.get(to)
                    if j is None or j in self.down or frozenset((i, j)) in self.blocked:
                        continue
                    theirs = self.cores[j]._slot_of(self.idents[i].node_id)
                    if theirs is not None:
                        moved = True
                        self.cores[j].receive_probe(
                            theirs, payload, endpoint(i), self.now, self.wall()
                        )
            if not moved:
                return

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.05)):
            self.step()


def direct_ids(core: RoutingCore) -> set[bytes]:
    return {
        link.certificate.node_id
        for link in core.links.links.values()
        if link.certificate is not None and link.up and isinstance(link.endpoint, tuple)
    }


def test_nodes_given_one_bootstrap_address_form_the_overlay_and_register() -> None:
    lab = Lab(5)
    lab.run(20)
    for core in lab.cores:
        assert core.overlay.state.value == "joined", core.statistics()
        assert core.registered
        succ = core.overlay.successor()
        assert succ is not None
        assert id_to_bytes(succ) in direct_ids(core)  # the successor is an authenticated link
    # every link of the overlay is an authenticated link with the same node id
    for core in lab.cores:
        for info in core.overlay.connections():
            slot = core._slot_of(id_to_bytes(info.node_id))
            assert slot is not None and core.links.links[slot].up


def lose_first_on_each_link(core: RoutingCore) -> list[int]:
    """Drop the first overlay message ``core`` sends on each link, as overlay_io drops one
    that outruns its fresh session's keys (ours, or the peer's); the slots it was lost on."""
    lost: list[int] = []
    original = core.overlay_to_send

    def lossy() -> list[tuple[int, bytes]]:
        out = []
        for slot, payload in original():
            if slot in lost:
                out.append((slot, payload))
            else:
                lost.append(slot)
        return out

    core.overlay_to_send = lossy  # type: ignore[method-assign]
    return lost


def seconds_until_registered(lab: Lab, core: RoutingCore, limit: float = 5.0) -> float:
    started = lab.now
    while not core.registered and lab.now - started < limit:
        lab.step()
    return lab.now - started


def test_a_joiners_first_hello_lost_on_its_fresh_link_goes_again_at_once() -> None:
    lab = Lab(2)
    lost = lose_first_on_each_link(lab.cores[1])
    took = seconds_until_registered(lab, lab.cores[1])
    assert lost, "the Hello to the bootstrap node went out on a link and was lost"
    # sent again FRESH_RESEND_S[0] after the link came up, not at the overlay's retry (1 s)
    assert took <= 0.3, took
    assert lab.cores[1].counters["overlay_fresh_resent"] >= 1


def test_a_node_joining_next_to_one_that_crashed_registers_without_waiting_to_join() -> None:
    """Node 7 joins, runs, and crashes; 3 s later node 8, its neighbour on the circle,
    joins. The nodes still hold connections to 7 and name it in their neighbour lists:
    8's ConnectRequest ends at 7 and is re-routed around it, and 8 registers its address
    once it is on the circle, while ``Joined`` waits for 7 to be found dead (its Hellos
    unanswered). Before, 8 registered after 15 s."""
    lab = Lab(9)
    ids = [id_from_bytes(x.node_id) for x in lab.idents]
    order = sorted(range(9), key=lambda i: ids[i])
    assert order.index(8) == order.index(7) + 1  # 8 is 7's successor
    lab.down = {7, 8}
    lab.run(15)
    assert all(core.registered for core in lab.cores[:7])
    lab.down = {8}
    assert seconds_until_registered(lab, lab.cores[7]) <= 0.5
    lab.run(3)
    lab.down = {7}
    took = seconds_until_registered(lab, lab.cores[8], limit=15)
    assert took <= 3.0, took
    assert lab.cores[8].overlay.state.value == "joining"  # registered first
    lab.run(20)
    assert lab.cores[8].overlay.state.value == "joined"


def test_a_fresh_links_resends_count_from_when_overlay_io_got_the_keys() -> None:
    """At start, overlay_io's request for the routes (and the keys) can reach control 0.1 s
    late; what a link that came up meanwhile carried was dropped there, and the resends
    at 0.03 and 0.1 s may be too. They count again from when the worker registered."""
    lab = Lab(2)
    core = lab.cores[1]
    original = core.overlay_to_send
    keys = False

    def without_keys() -> list[tuple[int, bytes]]:
        out = original()
        return out if keys else []  # overlay_io holds no send session yet

    core.overlay_to_send = without_keys  # type: ignore[method-assign]
    lab.run(0.2)  # the link came up at the first step; its message and two resends lost
    assert core.counters["overlay_fresh_resent"] >= 2 and not core.registered
    keys = True
    core.restart_fresh(lab.now)
    assert seconds_until_registered(lab, core) <= 0.1  # not at the 0.4 s resend


def test_what_waited_for_a_link_is_not_sent_again_once_the_peer_answered() -> None:
    lab = Lab(2)
    took = seconds_until_registered(lab, lab.cores[1])
    lab.run(1.0)  # past every FRESH_RESEND_S
    assert took <= 0.1
    assert lab.cores[1].counters["overlay_fresh_resent"] == 0


def test_a_miss_resolves_through_the_dht_and_relays_the_handshake() -> None:
    lab = Lab(6, blocked=((1, 4),))
    lab.run(20)
    a, c = lab.cores[1], lab.cores[4]
    assert lab.idents[4].node_id not in direct_ids(a)
    a.route_miss(vip(4), lab.now, lab.wall())
    lab.run(3)
    (route,) = a.routes()
    assert route.addresses == (str(vip(4)),) and route.up
    assert route.endpoint == str(Via(lab.idents[4].node_id))
    # the sessions are end to end: the same keys on both ends, and only there
    a_keys = {s.send_key for s in a.links.sessions() if s.slot == route.slot}
    c_slot = c._slot_of(lab.idents[1].node_id)
    assert c_slot is not None
    c_keys = {s.recv_key for s in c.links.sessions() if s.slot == c_slot}
    assert a_keys and a_keys <= c_keys
    assert any(isinstance(e, ev.RouteAdded) for e in a.events())


def test_an_unknown_address_is_a_negative_answer() -> None:
    lab = Lab(3)
    lab.run(15)
    a = lab.cores[1]
    a.route_miss(IPv4Address("100.64.0.200"), lab.now, lab.wall())
    lab.run(2)
    assert not a.routes()
    assert any(isinstance(e, ev.ResolveFailed) for e in a.events())
    a.route_miss(IPv4Address("100.64.0.200"), lab.now, lab.wall())
    assert a.counters["resolve_negative_cached"] == 1


def test_a_record_signed_by_another_member_is_not_a_route() -> None:
    lab = Lab(4)
    lab.run(15)
    mallory = lab.cores[3]
    # mallory signs a record naming node 2, which never claimed that address
    rid = mallory.dht.create(b"ip:lab:100.64.0.99", lab.idents[2].node_id, 300.0, lab.now)
    lab.run(2)
    (result,) = mallory.dht_results()
    assert result.request_id == rid and not result.ok and result.reason == "refused"
    a = lab.cores[1]
    a.route_miss(IPv4Address("100.64.0.99"), lab.now, lab.wall())
    lab.run(2)
    assert not a.routes()
    assert any(getattr(e, "name", "") == "resolve_failed" for e in a.events())


def test_a_dead_neighbour_is_closed_and_its_routes_dropped() -> None:
    lab = Lab(5)
    lab.run(20)
    a = lab.cores[1]
    a.route_miss(vip(2), lab.now, lab.wall())
    lab.run(2)
    assert a.routes()
    dead = 2
    lab.blocked |= {frozenset((dead, j)) for j in range(5) if j != dead}
    lab.run(40)
    assert not any(r.addresses == (str(vip(dead)),) and r.up for r in a.routes())
    assert lab.idents[dead].node_id not in direct_ids(a)


@pytest.mark.parametrize("junk", [b"", b"\x01", b"\x01\x99garbage", bytes(range(256))])
def test_junk_on_a_link_is_a_counted_drop(junk: bytes) -> None:
    lab = Lab(2)
    lab.run(10)
    a = lab.cores[0]
    slot = a._slot_of(lab.idents[1].node_id)
    assert slot is not None
    a.receive_overlay(slot, junk, lab.now, lab.wall())
    assert sum(v for k, v in a.counters.items() if k.startswith("overlay_dropped")) == 1


def test_a_restarted_node_resyncs_peers_that_kept_its_old_sessions() -> None:
    """Node 2 restarts (same key, same endpoint); node 1 still holds sessions with its old
    incarnation and sends on them. The new node 2 cannot open them and answers with a resync
    hint echoing the index (overlay_io's screen does that); node 1 handshakes again. Node 2
    itself never handshakes toward the source of a datagram it could not open."""
    lab = Lab(3)
    lab.run(15)
    old = lab.cores[2]
    fresh = RoutingCore(
        identity=old.identity,
        certificate=old.links.certificate,
        ca=old.links.ca,
        namespace="lab",
        address=vip(2),
        peers=[],
        bootstrap=[endpoint(0)],
        revoked=RevocationList.empty(),
        rng=random.Random(99),
        entropy=rng_from(99),
    )
    lab.cores[2] = fresh
    slot = lab.cores[1]._slot_of(lab.idents[2].node_id)
    assert slot is not None
    stale = list(lab.cores[1].links.links[slot].sessions)
    hint = resync_hint(stale[-1].send_index)
    lab.cores[1].receive_handshake(hint, endpoint(2), lab.now, lab.wall())
    lab.deliver()
    newest = lab.cores[1].links.links[slot].sessions[-1]
    assert newest.send_key not in {s.send_key for s in stale}
    # node 2 sends on it at once (its side is confirmed), which confirms node 1's side
    assert any(s.confirmed and s.recv_key == newest.send_key for s in fresh.links.sessions())
    assert lab.cores[1].links.counters["resyncs"] == 1
    lab.cores[1].receive_handshake(hint, endpoint(2), lab.now, lab.wall())  # just made
    assert lab.cores[1].handshakes_to_send() == []


def test_a_relayed_link_that_carries_traffic_becomes_a_shortcut() -> None:
    """A resolves the address of a node it has no link with: the link is made through the
    overlay (relayed); the candidates go over it, the probes find the node's endpoint, and
    both ends go direct."""
    lab = Lab(10)
    lab.run(20)
    a = lab.cores[1]
    for i, core in enumerate(lab.cores):
        core.set_endpoints([endpoint(i)])
    j = next(j for j in range(2, 10) if lab.idents[j].node_id not in direct_ids(a))
    c = lab.cores[j]
    a.route_miss(vip(j), lab.now, lab.wall())
    lab.run(5)
    (route,) = a.routes()
    assert route.endpoint == f"{endpoint(j)[0]}:{endpoint(j)[1]}"
    formed = [e for e in a.events() if isinstance(e, ev.ShortcutFormed)]
    assert formed and formed[0].endpoint == f"198.18.0.{j + 1}:4789"
    c_slot = c._slot_of(lab.idents[1].node_id)
    assert c_slot is not None and c.links.links[c_slot].endpoint == endpoint(1)
    (row,) = [r for r in a.link_table(lab.now) if r["routes"] == [str(vip(j))]]
    assert row["kind"] == "shortcut"


def test_a_shortcut_that_cannot_be_punched_stays_relayed() -> None:
    lab = Lab(10)
    lab.run(20)
    a = lab.cores[1]
    for i, core in enumerate(lab.cores):
        core.set_endpoints([endpoint(i)])
    j = next(j for j in range(2, 10) if lab.idents[j].node_id not in direct_ids(a))
    lab.blocked.add(frozenset((1, j)))
    a.route_miss(vip(j), lab.now, lab.wall())
    lab.run(60)
    (route,) = a.routes()
    assert route.endpoint == str(Via(lab.idents[j].node_id)) and route.up
    assert [e for e in a.events() if isinstance(e, ev.ShortcutFailed)][0].rounds == 2


def test_a_silent_relay_hop_is_pinged_left_out_of_the_hops_and_closed() -> None:
    """overlay_io finds a hop it relays over silent (``hop_silent``): the overlay pings the
    node at once; unanswered, it is no relay hop a second later, and its link is closed and
    its routes dropped a few seconds after that (its idle timers alone take 15 to 25 s)."""
    lab = Lab(5)
    lab.run(20)
    a = lab.cores[1]
    dead = next(
        i
        for i in range(5)
        if i != 1 and lab.idents[i].node_id in a.relay_hops() and i in lab.by_endpoint.values()
    )
    dead_id = lab.idents[dead].node_id
    a.route_miss(vip(dead), lab.now, lab.wall())
    lab.run(2)
    assert any(r.addresses == (str(vip(dead)),) for r in a.routes())
    lab.blocked |= {frozenset((dead, j)) for j in range(5) if j != dead}
    slot = a._slot_of(dead_id)
    assert slot is not None
    pings = a.overlay.statistics().get("pings_on_report", 0)
    a.hop_silent(slot, lab.now, lab.wall())
    first = a.overlay.statistics()["pings_on_report"]
    a.hop_silent(slot, lab.now, lab.wall())  # a ping is out: not again before ping_retry_s
    assert first >= pings + 1 and a.overlay.statistics()["pings_on_report"] == first
    assert a.counters["hop_pings"] == 1
    assert dead_id in a.relay_hops()  # not yet: a ping takes its time
    lab.run(1.1)
    assert dead_id not in a.relay_hops()  # suspect: relayed traffic goes around it
    lab.run(4.0)
    assert dead_id not in direct_ids(a)  # closed, and its routes gone
    assert not any(r.addresses == (str(vip(dead)),) for r in a.routes())


def test_direct_links_but_suspect_connections_are_relay_hops() -> None:
    """Every direct link may carry relay payloads, links made for routes (shortcuts) too;
    ``hop_silent`` on one of those is the caller's to ping (no overlay connection)."""
    lab = Lab(12)
    lab.run(25)
    me = min(range(1, 12), key=lambda i: len(lab.cores[i].overlay.connections()))
    a = lab.cores[me]
    for i in range(12):
        a.route_miss(vip(i), lab.now, lab.wall())
    lab.run(5)
    overlay = {id_to_bytes(c.node_id) for c in a.overlay.connections()}
    routed_only = direct_ids(a) - overlay
    assert routed_only  # shortcuts punched for the routes: direct links, no connections
    assert set(a.relay_hops()) == direct_ids(a)
    slot = a._slot_of(next(iter(routed_only)))
    assert slot is not None and a.hop_silent(slot, lab.now, lab.wall()) is False
