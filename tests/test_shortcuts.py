"""The shortcut core between two nodes on a virtual clock, over a small model of Linux NAT
gateways: both behind port-preserving NATs punch in the first round; a gateway that accepts
unsolicited packets keeps a stale conntrack entry that makes the first round fail when its
node is second, and the swapped second round succeeds; port-randomising NATs on both sides
stay relayed and back off; two nodes on one LAN take the LAN path; a silent path is lost.
Birthday probing, where one side's NAT randomises ports: the hard side probes first from a
pool of sockets (the real ``SocketPools`` core of overlay_io, on stand-in ports), the easy
side sprays random ports, and a hit makes both sides direct."""

from __future__ import annotations

import dataclasses
import random

import msgspec

from pipeline.control import shortcuts as sc
from pipeline.control.shortcuts import Candidate, CandidateKind, PathFound, Shortcuts
from pipeline.overlay_io.pool import SocketPools

A_ID, B_ID = b"\x10" * 20, b"\x90" * 20
SLOT = 7


@dataclasses.dataclass
class Gateway:
    """A Linux NAT gateway: SNAT that keeps the port unless it clashes (or ``random``), and
    an input that drops unsolicited packets unless ``open`` (then it keeps them as
    unreplied conntrack entries)."""

    wan: str
    kind: str  # "eim", "open", "random", "none"
    entries: dict[tuple[tuple[str, int], tuple[str, int]], tuple[str, int]] = dataclasses.field(
        default_factory=dict
    )  # (inside, remote) -> outside
    stale: set[tuple[tuple[str, int], int]] = dataclasses.field(default_factory=set)
    next_port: int = 20000
    rng: random.Random | None = None  # random: ports drawn from 1024-65535, as Linux does

    def out(self, inside: tuple[str, int], remote: tuple[str, int]) -> tuple[str, int]:
        if self.kind == "none":
            return inside
        key = (inside, remote)
        if key not in self.entries:
            port = inside[1]
            if self.kind == "random" and self.rng is not None:
                port = self.rng.randint(*sc.SPRAY_PORTS)  # (a clash is too rare to model)
            elif self.kind == "random" or (remote, port) in self.stale:
                port, self.next_port = self.next_port, self.next_port + 1
            self.entries[key] = (self.wan, port)
        return self.entries[key]

    def inbound(self, remote: tuple[str, int], port: int) -> tuple[str, int] | None:
        """Where a packet from ``remote`` to our WAN ``port`` goes (None: dropped)."""
        for (inside, peer), outside in self.entries.items():
            if peer == remote and outside[1] == port:
                return inside
        if self.kind == "open":
            self.stale.add((remote, port))  # accepted on input: an unreplied entry stays
        return None


class Pair:
    """Two nodes, A (the initiator) and B, each behind its gateway (or on one LAN), whose
    relayed link is perfect and instant, and whose direct datagrams go through the NATs."""

    def __init__(self, a_kind: str, b_kind: str, *, same_lan: bool = False) -> None:
        self.a_local, self.b_local = ("198.19.1.2", 4789), ("198.19.2.2", 4789)
        if same_lan:
            self.b_local = ("198.19.1.3", 4789)
        self.gw = {
            "a": Gateway("198.18.90.11", a_kind),
            "b": Gateway("198.18.90.11" if same_lan else "198.18.90.12", b_kind),
        }
        self.same_lan = same_lan
        self.a = Shortcuts(A_ID, random.Random(1))
        self.b = Shortcuts(B_ID, random.Random(2))
        self.a.set_candidates(self.candidates("a"))
        self.b.set_candidates(self.candidates("b"))
        self.now = 0.0
        self.events: dict[str, list[sc.ShortcutEvent]] = {"a": [], "b": []}

    def candidates(self, who: str) -> list[Candidate]:
        local = self.a_local if who == "a" else self.b_local
        gw = self.gw[who]
        reflexive = (gw.wan, local[1]) if gw.kind != "none" else local
        return [
            Candidate(local, CandidateKind.LOCAL),
            Candidate(reflexive, CandidateKind.REFLEXIVE),
        ]

    def send(
        self, who: str, to: tuple[str, int], payload: bytes, src: tuple[str, int] | None = None
    ) -> None:
        """A PROBE datagram from ``who`` (its port, or the socket at ``src``) to endpoint
        ``to``, through the NATs."""
        src_local = src or (self.a_local if who == "a" else self.b_local)
        other = "b" if who == "a" else "a"
        dst_local = self.b_local if other == "b" else self.a_local
        if self.same_lan:
            if to == dst_local:
                self.shortcut(other).receive_probe(SLOT, payload, src_local, self.now)
            return  # the shared gateway does not hairpin
        outside = self.gw[who].out(src_local, to)
        gw_other = self.gw[other]
        if gw_other.kind == "none":
            inside = to if to == dst_local else None
        elif to[0] != gw_other.wan:
            inside = None  # a LAN address of the other site: not routed
        else:
            inside = gw_other.inbound(outside, to[1])
        if inside is not None:
            self.deliver(other, inside, payload, outside)

    def deliver(
        self, who: str, inside: tuple[str, int], payload: bytes, source: tuple[str, int]
    ) -> None:
        """A datagram from ``source`` came through to ``inside`` at ``who``'s site."""
        if inside == (self.a_local if who == "a" else self.b_local):
            self.shortcut(who).receive_probe(SLOT, payload, source, self.now)

    def pool(self, who: str, slot: int, to: tuple[str, int] | None, payload: bytes) -> None:
        raise AssertionError(f"{who} asked for a socket pool: its NAT does not vary")

    def found(self, who: str) -> list[PathFound]:
        return [e for e in self.events[who] if isinstance(e, PathFound)]

    def shortcut(self, who: str) -> Shortcuts:
        return self.a if who == "a" else self.b

    def step(self) -> None:
        for _ in range(20):
            moved = False
            for who, me, other, other_id in (
                ("a", self.a, self.b, A_ID),
                ("b", self.b, self.a, B_ID),
            ):
                for slot, payload in me.messages_to_send():
                    moved = True
                    other.receive(slot, sc.decode_path(payload), other_id, self.now)
                for _slot, to, payload in me.probes_to_send():
                    moved = True
                    self.send(who, to, payload)
                for slot, pool_to, payload in me.pools_to_send():
                    moved = True
                    self.pool(who, slot, pool_to, payload)
                self.events[who] += me.events()
            if not moved:
                return

    def run(self, until: float) -> None:
        while True:
            self.step()
            due = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
            if not due or min(due) > until:
                self.now = until
                return
            self.now = max(self.now, min(due))
            self.a.handle_timer(self.now)
            self.b.handle_timer(self.now)


def test_both_behind_port_preserving_nats_punch_at_once() -> None:
    pair = Pair("eim", "eim")
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(3.0)
    assert pair.a.direct(SLOT) == ("198.18.90.12", 4789)
    assert pair.b.direct(SLOT) == ("198.18.90.11", 4789)
    assert pair.found("a")[0].round == 1 and pair.found("a")[0].kind is CandidateKind.REFLEXIVE


def test_a_stale_conntrack_entry_fails_round_one_and_the_swapped_round_punches() -> None:
    """B's gateway accepts unsolicited packets: A's probes in round 1 (A first) leave stale
    entries there and B's own probes are re-mapped to other ports. After the quiet time,
    round 2 lets B go first, and it works."""
    pair = Pair("eim", "open")
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(sc.ROUND_S + 1.0)
    assert pair.a.direct(SLOT) is None and pair.gw["b"].stale
    pair.gw["b"].stale.clear()  # the gateway forgets unreplied entries after 30 s
    pair.gw["b"].entries.clear()
    pair.gw["a"].entries.clear()
    pair.run(sc.ROUND_S + sc.QUIET_S + sc.ROUND_S)
    assert pair.a.direct(SLOT) is not None and pair.b.direct(SLOT) is not None
    assert pair.found("a")[0].round == 2


def test_port_randomising_nats_on_both_sides_stay_relayed_and_back_off() -> None:
    pair = Pair("random", "random")
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(2 * sc.ROUND_S + sc.QUIET_S + 1.0)
    assert pair.a.direct(SLOT) is None and pair.b.direct(SLOT) is None
    (failed,) = [e for e in pair.events["a"] if isinstance(e, sc.ShortcutFailed)]
    assert failed.rounds == 2 and failed.retry_in == sc.RETRY_S
    paths = pair.a.paths(pair.now)[SLOT]
    assert paths["phase"] == "idle" and paths["attempts"] == 2
    pair.a.want(SLOT, B_ID, pair.now)  # more traffic: backing off, no new round yet
    assert pair.a.messages_to_send() == []
    pair.now += sc.RETRY_S
    pair.a.want(SLOT, B_ID, pair.now)  # after the back-off: a new attempt
    assert [sc.decode_path(m) for _, m in pair.a.messages_to_send()][0].round == 1


def test_one_lan_takes_the_local_path() -> None:
    pair = Pair("eim", "eim", same_lan=True)
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(3.0)
    assert pair.a.direct(SLOT) == pair.b_local
    assert pair.found("a")[0].kind is CandidateKind.LOCAL


def test_a_path_that_goes_silent_is_lost_and_tried_again() -> None:
    pair = Pair("eim", "eim")
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(3.0)
    assert pair.a.direct(SLOT) is not None
    pair.gw["b"].entries.clear()  # B's gateway restarted: the mapping is gone
    pair.gw["b"].kind = "random"
    pair.run(3.0 + sc.KEEPALIVE_S + sc.LOST_AFTER * sc.ACK_WAIT_S + 1.0)
    assert [e.endpoint for e in pair.events["a"] if isinstance(e, sc.PathLost)] == [
        ("198.18.90.12", 4789)
    ]
    assert pair.a.direct(SLOT) is None and pair.a.paths(pair.now)[SLOT]["phase"] == "idle"


def test_junk_candidates_and_probes_are_dropped() -> None:
    a = Shortcuts(A_ID, random.Random(1))
    offer = sc.PathOffer(1, True, (("not an ip", 1, "local"), ("224.0.0.1", 5, "local"),
                                   ("198.18.0.9", 0, "local"), ("198.18.0.9", 4789, "bogus"),
                                   ("198.18.0.9", 4789, "reflexive")))  # fmt: skip
    a.receive(SLOT, offer, B_ID, 0.0)
    assert a.paths(0.0)[SLOT]["candidates"] == ["198.18.0.9:4789 reflexive"]
    a.receive_probe(SLOT, b"\xff\x00junk", ("198.18.0.9", 4789), 0.0)
    assert a.counters["probe_undecodable"] == 1


# -- birthday probing ------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PoolSocket:
    """A stand-in for one of overlay_io's pool sockets: where it is bound, and if it is closed."""

    local: tuple[str, int]
    closed: bool = False

    def close(self) -> None:
        self.closed = True


class BirthdayPair(Pair):
    """A behind a port-randomising gateway (random ports from 1024-65535, seeded), the hard
    side: no reflexive candidate, its public IP told as ``varies``, and a socket pool (the
    real ``SocketPools``) bound at 198.19.1.2:50000 and up. B behind ``b_kind``."""

    def __init__(
        self,
        b_kind: str = "eim",
        *,
        seed: int = 1,
        pool_sockets: int = sc.POOL_SOCKETS,
        spray_probes: int = sc.SPRAY_PROBES,
    ) -> None:
        super().__init__("random", b_kind)
        self.gw["a"].rng = random.Random(seed)
        bounds = {"pool_sockets": pool_sockets, "spray_probes": spray_probes}
        self.a = Shortcuts(A_ID, random.Random(2 * seed + 1), **bounds)
        self.b = Shortcuts(B_ID, random.Random(2 * seed + 2), **bounds)
        self.a.set_candidates([Candidate(self.a_local, CandidateKind.LOCAL)])
        self.a.set_varies(self.gw["a"].wan)
        self.b.set_candidates(self.candidates("b"))
        self.sockets: dict[tuple[str, int], PoolSocket] = {}
        self.pools = SocketPools[PoolSocket](
            self._open, lambda port: port.close(), size=pool_sockets
        )
        self.pool_sends = 0

    def _open(self) -> PoolSocket:
        port = PoolSocket((self.a_local[0], 50000 + len(self.sockets)))
        self.sockets[port.local] = port
        return port

    def send(
        self, who: str, to: tuple[str, int], payload: bytes, src: tuple[str, int] | None = None
    ) -> None:
        pinned = self.pools.pinned.get(to) if who == "a" and src is None else None
        super().send(who, to, payload, src or (pinned.local if pinned else None))

    def deliver(
        self, who: str, inside: tuple[str, int], payload: bytes, source: tuple[str, int]
    ) -> None:
        port = self.sockets.get(inside) if who == "a" else None
        if port is None:
            super().deliver(who, inside, payload, source)
        elif not port.closed and self.pools.arrived(port, SLOT, source):
            self.a.receive_probe(SLOT, payload, source, self.now)

    def pool(self, who: str, slot: int, to: tuple[str, int] | None, payload: bytes) -> None:
        assert who == "a", "only the hard side opens a pool"
        if to is None:
            self.pools.close(slot)
            return
        for port in self.pools.ports_for(slot, self.now):
            self.pool_sends += 1
            self.send(who, to, payload, port.local)


def test_one_port_randomising_nat_is_met_by_birthday_probing() -> None:
    """A (hard, the initiator) probes first from its pool; B sprays A's public IP after A's
    PathGo; a spray probe lands on a port A's gateway mapped for a pool socket, A answers
    from that socket, and both go direct in round 1: A to B's reflexive endpoint from the
    pinned socket, B to the port A's gateway gave that socket."""
    pair = BirthdayPair(seed=2)  # (with seed 1 the spray hits the mapping of A's own port
    pair.a.want(SLOT, B_ID, pair.now)  # first, a path as good: about once in 500)
    pair.run(sc.ROUND_S)
    assert pair.a.direct(SLOT) == ("198.18.90.12", 4789)
    (pinned,) = pair.pools.pinned.values()
    mapped = pair.gw["a"].entries[(pinned.local, ("198.18.90.12", 4789))]
    assert pair.b.direct(SLOT) == mapped
    assert pair.found("a")[0].round == 1 and pair.found("b")[0].round == 1
    assert pair.a.paths(pair.now)[SLOT]["birthday"] and pair.b.paths(pair.now)[SLOT]["birthday"]
    # bounded: one pool of POOL_SOCKETS (all but the winner closed), one spray at most
    assert pair.pools.statistics()["pool_sockets_opened"] == sc.POOL_SOCKETS
    assert pair.pools.open_sockets == 1
    assert sum(not s.closed for s in pair.sockets.values()) == 1
    assert 0 < pair.b.counters["spray_probes_sent"] <= sc.SPRAY_PROBES
    # the path holds: keepalives go from the pinned socket and are answered
    pair.run(sc.ROUND_S + 3 * sc.KEEPALIVE_S)
    assert pair.a.direct(SLOT) is not None and not pair.events["a"][1:]


def test_the_hard_side_probes_first_when_the_easy_side_starts() -> None:
    """B (easy) offers first and would be first in round 1; A's answer says its NAT varies,
    so A probes first and B sprays only after A's PathGo (a spray before A's mappings exist
    would be dropped at A's gateway): direct in round 1 all the same."""
    pair = BirthdayPair(seed=2)
    pair.b.want(SLOT, A_ID, pair.now)
    pair.run(sc.ROUND_S)
    assert pair.a.direct(SLOT) is not None and pair.b.direct(SLOT) is not None
    assert pair.found("b")[0].round == 1


def test_birthday_probing_meets_as_often_as_the_estimate_says() -> None:
    """Over 40 seeds (random gateway ports, random spray ports), 256 sockets and 1024
    probes meet about 1 - exp(-256 * 1024 / 64512) = 98 % of the time."""
    met = 0
    for seed in range(40):
        pair = BirthdayPair(seed=seed)
        pair.a.want(SLOT, B_ID, pair.now)
        pair.run(sc.ROUND_S)
        met += pair.a.direct(SLOT) is not None and pair.b.direct(SLOT) is not None
    print(f"birthday probing met in {met} of 40")
    assert met >= 36


def test_birthday_probing_is_bounded_and_a_failed_round_closes_the_pool() -> None:
    """8 sockets and 16 probes almost never meet: each round opens one pool of 8 and sprays
    16 ports, the round's end closes the pool, and after two rounds the link backs off."""
    pair = BirthdayPair(seed=3, pool_sockets=8, spray_probes=16)
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(sc.ROUND_S + 1.0)
    assert pair.a.direct(SLOT) is None
    assert pair.pools.open_sockets == 0 and not pair.pools.pools
    assert pair.pools.statistics()["pool_sockets_opened"] == 8
    assert pair.b.counters["spray_probes_sent"] == 16
    pair.gw["a"].entries.clear()  # the quiet time outlasts the gateways' unreplied entries
    pair.gw["b"].entries.clear()
    pair.run(2 * sc.ROUND_S + sc.QUIET_S + 1.0)
    assert pair.pools.statistics()["pool_sockets_opened"] == 16
    assert pair.b.counters["spray_probes_sent"] == 32
    assert pair.pools.open_sockets == 0
    (failed,) = [e for e in pair.events["a"] if isinstance(e, sc.ShortcutFailed)]
    assert failed.rounds == 2


def test_when_both_nats_vary_nothing_is_sprayed_and_the_link_stays_relayed() -> None:
    pair = Pair("random", "random")
    for who, shortcut in (("a", pair.a), ("b", pair.b)):
        shortcut.set_candidates([Candidate(pair.a_local if who == "a" else pair.b_local,
                                           CandidateKind.LOCAL)])  # fmt: skip
        shortcut.set_varies(pair.gw[who].wan)
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(2 * sc.ROUND_S + sc.QUIET_S + 1.0)  # Pair.pool fails the test if one is asked for
    assert pair.a.direct(SLOT) is None and pair.b.direct(SLOT) is None
    assert "sprays" not in pair.a.counters and "sprays" not in pair.b.counters
    assert not pair.a.paths(pair.now)[SLOT]["birthday"]


def test_a_lost_birthday_path_closes_its_pool() -> None:
    pair = BirthdayPair(seed=2)
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(sc.ROUND_S)
    assert pair.pools.pinned
    pair.gw["b"].entries.clear()  # B's gateway restarted, now randomising: the path is gone
    pair.gw["b"].kind = "random"
    pair.run(sc.ROUND_S + sc.KEEPALIVE_S + sc.LOST_AFTER * sc.ACK_WAIT_S + 1.0)
    assert [type(e) for e in pair.events["a"]][:2] == [PathFound, sc.PathLost]
    assert not pair.pools.pinned and pair.pools.open_sockets == 0


def test_birthday_probing_off_behaves_as_before() -> None:
    """``pool_sockets = 0``: no pool, no spray, and the hard side is not forced first."""
    pair = BirthdayPair(seed=1, pool_sockets=0)
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(sc.ROUND_S + 1.0)
    assert pair.a.direct(SLOT) is None and pair.pool_sends == 0
    assert "sprays" not in pair.b.counters


def test_an_implausible_varies_address_is_ignored() -> None:
    a = Shortcuts(A_ID, random.Random(1))
    a.set_candidates([Candidate(("198.19.1.2", 4789), CandidateKind.LOCAL)])
    for junk in ("not an ip", "224.0.0.1", "0.0.0.0", "127.0.0.1"):
        a.forget(SLOT)
        a.receive(SLOT, sc.PathOffer(1, True, (), junk), B_ID, 0.0)
        assert not a.paths(0.0)[SLOT]["peer_varies"]

    class PathOffer(msgspec.Struct, tag=True, frozen=True):  # as nodes before ``varies``
        round: int
        sender_first: bool
        candidates: tuple[tuple[str, int, str], ...]

    old = sc.decode_path(msgspec.msgpack.encode(PathOffer(1, True, ())))
    assert isinstance(old, sc.PathOffer) and old.varies == ""


M1, M2, M3 = b"\x31" * 20, b"\x32" * 20, b"\x33" * 20


def test_when_both_nats_vary_both_choose_the_relay_with_the_least_rtt_sum() -> None:
    """A and B both vary: their offer and answer list their relays (direct links and RTTs);
    both pick M2 (A 30 ms + B 10 ms beats M1's 5 + 80 ms; M3 is A's only), tell it with
    RelayChosen, and still spray nothing."""
    pair = Pair("random", "random")
    for who, shortcut in (("a", pair.a), ("b", pair.b)):
        shortcut.set_candidates([Candidate(pair.a_local if who == "a" else pair.b_local,
                                           CandidateKind.LOCAL)])  # fmt: skip
        shortcut.set_varies(pair.gw[who].wan)
    pair.a.set_relays([(M1, 0.005), (M2, 0.030), (M3, 0.001)])
    pair.b.set_relays([(M1, 0.080), (M2, 0.010)])
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(1.0)
    chosen = {w: [e for e in pair.events[w] if isinstance(e, sc.RelayChosen)] for w in "ab"}
    assert chosen["a"] == chosen["b"] == [sc.RelayChosen(SLOT, M2, 0.04)]
    assert pair.a.relay(SLOT) == M2 and pair.a.chosen_relays() == {SLOT: M2}
    assert pair.a.paths(pair.now)[SLOT]["relay"] == M2.hex()
    assert "sprays" not in pair.b.counters
    pair.a.forget(SLOT)
    assert pair.a.relay(SLOT) is None


def test_a_relay_is_chosen_only_when_both_vary_and_share_one() -> None:
    pair = BirthdayPair(seed=2)  # B's NAT does not vary: birthday probing, no relay
    pair.a.set_relays([(M1, 0.005)])
    pair.b.set_relays([(M1, 0.005)])
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(sc.ROUND_S)
    assert pair.a.relay(SLOT) is None and pair.a.direct(SLOT) is not None
    a = Shortcuts(A_ID, random.Random(1))
    a.set_varies("198.18.90.11")
    a.set_relays([(M1, 0.005)])
    a.receive(SLOT, sc.PathOffer(1, True, (), "198.18.90.12", ((M2, 0.001),)), B_ID, 0.0)
    assert a.relay(SLOT) is None and a.counters["relay_none_shared"] == 1


def test_no_pool_and_no_spray_when_the_easy_side_has_a_mapped_port() -> None:
    """B's gateway maps B's port (PCP, NAT-PMP, UPnP): that takes A's ordinary probes
    unsolicited, so A opens no pool and B sprays nothing."""
    pair = BirthdayPair(seed=2)
    mapped = Candidate(("198.18.90.12", 4789), CandidateKind.MAPPED)
    pair.b.set_candidates([*pair.candidates("b"), mapped])
    pair.a.want(SLOT, B_ID, pair.now)
    pair.run(sc.ROUND_S + 1.0)
    assert pair.pool_sends == 0 and "sprays" not in pair.b.counters
    assert not pair.a.paths(pair.now)[SLOT]["birthday"]
