"""The shortcut core between two nodes on a virtual clock, over a small model of Linux NAT
gateways: both behind port-preserving NATs punch in the first round; a gateway that accepts
unsolicited packets keeps a stale conntrack entry that makes the first round fail when its
node is second, and the swapped second round succeeds; port-randomising NATs on both sides
stay relayed and back off; two nodes on one LAN take the LAN path; a silent path is lost."""

from __future__ import annotations

import dataclasses
import random

from pipeline.control import shortcuts as sc
from pipeline.control.shortcuts import Candidate, CandidateKind, PathFound, Shortcuts

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

    def out(self, inside: tuple[str, int], remote: tuple[str, int]) -> tuple[str, int]:
        if self.kind == "none":
            return inside
        key = (inside, remote)
        if key not in self.entries:
            port = inside[1]
            if self.kind == "random" or (remote, port) in self.stale:
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

    def send(self, who: str, to: tuple[str, int], payload: bytes) -> None:
        """A PROBE datagram from ``who`` to endpoint ``to``, through the NATs."""
        src_local = self.a_local if who == "a" else self.b_local
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
        if inside == dst_local:
            self.shortcut(other).receive_probe(SLOT, payload, outside, self.now)

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
