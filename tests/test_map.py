"""supervisor map's crawl (pipeline/control/crawl.py): the messages, who is believed, the rate
limit, the breadth-first crawl on a virtual clock, and six ``ControlCore`` s in memory that
crawl each other through the overlay; a forged or foreign answer is refused and counted."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pipeline import messages
from pipeline.control import crawl
from pipeline.control import events as ev
from pipeline.control.core import ControlCore, ControlSettings, Credentials
from pipeline.control.links import Via
from pipeline.crypto.cert import RevocationList
from pipeline.crypto.identity import Identity
from pipeline.errors import RemoteProtocolError
from tests.test_links import WALL, ca_pair, member, rng_from

NETWORKS = ("lab",)


def nid(i: int) -> bytes:
    return bytes([i]) * 20


def links_of(i: int, peers: list[int], kind: str = "near") -> crawl.NodeLinks:
    return crawl.own_links(
        nid(i), f"n{i}", [f"100.64.0.{i}"], [crawl.Connection(nid(p), kind, False) for p in peers]
    )


# -- the messages and who is believed ----------------------------------------------------------


def signed(
    seed: int = 40, *, crawler: bytes = nid(99), query_id: int = 5, other_ca: bool = False
) -> tuple[bytes, Identity, Any]:
    ca, ca_cert = ca_pair(2 if other_ca else 1)
    ident, cert = member(ca, ca_cert, seed, "n1")
    links = crawl.own_links(
        ident.node_id,
        "n1",
        ["100.64.0.1"],
        [
            crawl.Connection(nid(2), "near", False),
            crawl.Connection(nid(3), "tunnel", True, nid(4)),
            crawl.Connection(nid(5), "shortcut", True, nid(2)),
        ],
    )
    payload = crawl.make_answer(
        links, crawler=crawler, query_id=query_id, identity=ident, certificate=cert
    )
    return payload, ident, ca_cert


def check(payload: bytes, src: bytes, *, crawler: bytes = nid(99)) -> crawl.NodeLinks:
    _, ca_cert = ca_pair(1)
    answer = crawl.decode(payload)
    assert isinstance(answer, crawl.LinksAnswer)
    return crawl.check_answer(
        answer,
        src=src,
        crawler=crawler,
        ca=ca_cert,
        revoked=RevocationList.empty(),
        networks=NETWORKS,
        wall=WALL,
    )


def test_a_signed_answer_of_a_member_is_believed() -> None:
    payload, ident, _ = signed()
    links = check(payload, ident.node_id)
    assert links.node_id == ident.node_id and links.name == "n1"
    assert links.addresses == ("100.64.0.1",)
    assert [(c.kind, c.relayed, c.via) for c in links.connections] == [
        ("near", False, b""),
        ("tunnel", True, nid(4)),
        ("shortcut", True, nid(2)),
    ]
    assert crawl.decode(crawl.encode(crawl.LinksQuery(7))) == crawl.LinksQuery(7)


def test_an_answer_of_a_non_member_is_refused() -> None:
    payload, ident, _ = signed(other_ca=True)
    with pytest.raises(RemoteProtocolError) as info:
        check(payload, ident.node_id)
    assert info.value.reason == "bad_certificate"


def test_an_answer_routed_from_another_node_is_refused() -> None:
    """A member passing on another member's genuine answer as its own."""
    payload, _, _ = signed()
    other, _ = member(*ca_pair(1), 41, "n2")
    with pytest.raises(RemoteProtocolError) as info:
        check(payload, other.node_id)
    assert info.value.reason == "wrong_node"


def test_a_tampered_answer_is_refused() -> None:
    payload, ident, _ = signed()
    answer = crawl.decode(payload)
    assert isinstance(answer, crawl.LinksAnswer)
    body = msgspec.msgpack.decode(answer.body)
    body[3] = "evil"  # the name
    forged = msgspec.structs.replace(answer, body=msgspec.msgpack.encode(body))
    with pytest.raises(RemoteProtocolError) as info:
        check(crawl.encode(forged), ident.node_id)
    assert info.value.reason == "bad_signature"


def test_an_answer_for_another_crawler_or_query_is_refused() -> None:
    payload, ident, _ = signed(crawler=nid(98))
    with pytest.raises(RemoteProtocolError) as info:
        check(payload, ident.node_id)
    assert info.value.reason == "not_for_us"
    answer = crawl.decode(signed()[0])
    assert isinstance(answer, crawl.LinksAnswer)
    replayed = crawl.encode(msgspec.structs.replace(answer, query_id=6))
    with pytest.raises(RemoteProtocolError) as info:
        check(replayed, ident.node_id)
    assert info.value.reason == "not_for_us"


@pytest.mark.parametrize("junk", [b"", b"L", b"L\x02\x91\x01", b"L\x01\xc1", b"D\x01\x91\x01"])
def test_junk_is_a_protocol_error(junk: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        crawl.decode(junk)


def test_an_answer_has_at_most_max_entries() -> None:
    many = links_of(1, list(range(2, 2 + crawl.MAX_ENTRIES + 10)))
    assert len(many.connections) == crawl.MAX_ENTRIES and many.truncated


def test_a_node_answers_at_most_n_queries_a_second() -> None:
    limiter = crawl.AnswerLimiter(5)
    assert sum(limiter.allow(10.0) for _ in range(20)) == 5
    assert sum(limiter.allow(10.5) for _ in range(20)) == 2  # half a second: 2.5 tokens
    assert sum(limiter.allow(20.0) for _ in range(20)) == 5  # never more than a burst of N


# -- the crawl, pure ---------------------------------------------------------------------------


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def drive(
    graph: dict[int, list[int]],
    *,
    max_nodes: int = 200,
    silent: frozenset[int] = frozenset(),
    timeout_s: float = 30.0,
) -> tuple[crawl.Crawl, float]:
    """Crawl ``graph`` from node 1: each query is answered 0.1 s later unless silent."""
    now = 0.0
    job = crawl.Crawl(
        links_of(1, graph[1]), now=now, timeout_s=timeout_s, next_id=Ids(), max_nodes=max_nodes
    )
    asked: list[tuple[float, bytes, int]] = []
    while not job.finished:
        asked += [(now + 0.1, n, q) for n, q in job.queries_to_send()]
        due = [a for a in asked if a[0] <= now]
        asked = [a for a in asked if a[0] > now]
        for _, node, qid in due:
            i = node[0]
            if i not in silent:
                job.answer(qid, links_of(i, graph[i]), now)
        job.handle(now)
        now += 0.05
        assert now < 100
    return job, now


def ring(n: int) -> dict[int, list[int]]:
    return {i: [(i % n) + 1, ((i - 2) % n) + 1] for i in range(1, n + 1)}


def test_the_crawl_finds_every_node_breadth_first() -> None:
    job, now = drive(ring(12))
    out = job.result()
    assert out["stopped"] == "complete" and out["complete"] and not out["sampled"]
    assert [n["name"] for n in out["nodes"]] == [f"n{i}" for i in range(1, 13)]
    assert out["unanswered"] == [] and now < 2.0  # 8 in parallel


def test_the_crawl_stops_at_max_nodes_and_says_it_sampled() -> None:
    job, _ = drive(ring(30), max_nodes=10)
    out = job.result()
    assert out["stopped"] == "max_nodes" and out["sampled"] and not out["complete"]
    assert len(out["nodes"]) == 10 and out["not_asked"]


def test_a_silent_node_is_asked_again_then_given_up() -> None:
    job, now = drive(ring(6), silent=frozenset({4}))
    out = job.result()
    assert out["stopped"] == "complete" and not out["complete"]
    assert out["unanswered"] == [nid(4).hex()]
    assert len(out["nodes"]) == 5
    assert now >= job.query_timeout_s * job.tries  # three tries, then given up


def test_the_crawl_ends_at_its_deadline() -> None:
    job, now = drive(ring(6), silent=frozenset({2, 3, 4, 5, 6}), timeout_s=1.0)
    out = job.result()
    assert out["stopped"] == "deadline" and 1.0 <= now < 1.2
    assert len(out["nodes"]) == 1 and out["unanswered"]


def test_an_answer_to_an_unknown_query_or_from_the_wrong_node_is_not_taken() -> None:
    job = crawl.Crawl(links_of(1, [2, 3]), now=0.0, timeout_s=5.0, next_id=Ids())
    (n2, q2), (n3, q3) = job.queries_to_send()
    assert not job.answer(q3, links_of(2, []), 0.1)  # node 2 answering node 3's query
    assert not job.answer(99, links_of(2, []), 0.1)
    assert job.answer(q2, links_of(2, []), 0.1)
    assert not job.answer(q2, links_of(2, []), 0.1)  # once only


# -- six control cores, crawling each other through the overlay ---------------------------------


def endpoint(i: int) -> tuple[str, int]:
    return (f"198.18.0.{i + 1}", 4789)


class CoreLab:
    """``ControlCore`` s on an underlay where every endpoint reaches every other; overlay_io
    is played here (sessions confirmed, relayed overlay payloads handed over)."""

    def __init__(self, n: int) -> None:
        ca, ca_cert = ca_pair()
        self.ca, self.ca_cert = ca, ca_cert
        self.idents: list[Identity] = []
        self.cores: list[ControlCore] = []
        self.now = 1000.0
        for i in range(n):
            ident, cert = member(ca, ca_cert, 30 + i, f"n{i}")
            self.idents.append(ident)
            settings = ControlSettings(
                node_name=f"n{i}",
                namespace="lab",
                subnet=IPv4Network("100.64.0.0/24"),
                address=IPv4Address(f"100.64.0.{i + 1}"),
                bootstrap=() if i == 0 else (endpoint(0),),
            )
            self.cores.append(
                ControlCore(
                    settings,
                    credentials=Credentials(ident, cert, ca_cert, RevocationList.empty()),
                    rng=random.Random(700 + i),
                    entropy=rng_from(700 + i),
                    epoch=i,
                    now=self.now,
                )
            )
        self.by_endpoint = {endpoint(i): i for i in range(n)}
        self.replies: list[list[messages.Message]] = [[] for _ in range(n)]

    def wall(self) -> float:
        return WALL + self.now

    def step(self, dt: float = 0.05) -> None:
        self.now += dt
        for core in self.cores:
            core.handle_timer(self.now, self.wall())
        self.deliver()

    def deliver(self) -> None:
        for _ in range(50):
            moved = False
            for i, core in enumerate(self.cores):
                for datagram, to, _slot in core.handshakes_to_send():
                    j = self.by_endpoint.get(to)
                    if j is not None:
                        moved = True
                        self.cores[j].receive_handshake(
                            datagram, endpoint(i), self.now, self.wall()
                        )
                for slot, payload in core.overlay_to_send():
                    assert core.routing is not None
                    link = core.routing.links.links[slot]
                    assert link.certificate is not None
                    if isinstance(link.endpoint, Via):
                        j = next(
                            k
                            for k, x in enumerate(self.idents)
                            if x.node_id == link.certificate.node_id
                        )
                    else:
                        j = self.by_endpoint[link.endpoint]
                    other = self.cores[j]
                    assert other.routing is not None
                    theirs = other.routing._slot_of(self.idents[i].node_id)
                    if theirs is not None:
                        moved = True
                        other.receive_overlay(theirs, payload, self.now, self.wall())
                for _slot, to, payload in core.probes_to_send():
                    j = self.by_endpoint.get(to)
                    other = self.cores[j] if j is not None else None
                    if other is not None and other.routing is not None:
                        theirs = other.routing._slot_of(self.idents[i].node_id)
                        if theirs is not None:
                            moved = True
                            other.receive_probe(theirs, payload, endpoint(i), self.now, self.wall())
                assert core.routing is not None
                for session in core.routing.links.sessions():
                    if not session.confirmed:
                        moved = True
                        core.session_confirmed(session.recv_index, self.now, self.wall())
                for event in core.events():
                    if isinstance(event, ev.Reply):
                        self.replies[i].append(event.message)
            if not moved:
                return

    def run(self, seconds: float) -> None:
        for _ in range(int(seconds / 0.05)):
            self.step()

    def map_of(self, i: int, max_nodes: int = 200, timeout_s: float = 20.0) -> dict[str, Any]:
        self.cores[i].map(b"tool", max_nodes, timeout_s, self.now, self.wall())
        for _ in range(int(timeout_s / 0.05) + 2):
            self.deliver()
            done = [m for m in self.replies[i] if isinstance(m, messages.MapReply)]
            if done:
                self.replies[i].clear()
                return done[0].map
            self.step()
        raise AssertionError("no map")


@pytest.fixture(scope="module")
def lab() -> CoreLab:
    lab = CoreLab(6)
    lab.run(25)
    for core in lab.cores:
        assert core.routing is not None and core.routing.overlay.state.value == "joined"
    return lab


def test_six_cores_crawl_each_other_through_the_overlay(lab: CoreLab) -> None:
    got = lab.map_of(2)
    assert got["stopped"] == "complete" and got["complete"] and not got["sampled"]
    assert got["crawler"] == lab.idents[2].node_id.hex()
    by_id = {n["node_id"]: n for n in got["nodes"]}
    assert set(by_id) == {x.node_id.hex() for x in lab.idents}
    for i, core in enumerate(lab.cores):
        assert core.routing is not None
        mine = by_id[lab.idents[i].node_id.hex()]
        assert mine["name"] == f"n{i}" and mine["addresses"] == [f"100.64.0.{i + 1}"]
        want = {(c.node_id.hex(), c.kind) for c in core.routing.map_connections()}
        assert {(c["node_id"], c["kind"]) for c in mine["connections"]} == want
        assert want  # every node has connections
    answered = sum(c.counters["map_queries_answered"] for c in lab.cores)
    assert answered == 5  # each other node once
    assert got["refused"] == 0


def test_a_crawl_at_max_nodes_samples(lab: CoreLab) -> None:
    got = lab.map_of(0, max_nodes=3)
    assert got["stopped"] == "max_nodes" and got["sampled"] and len(got["nodes"]) == 3


def test_a_forged_or_foreign_answer_is_refused_and_counted(lab: CoreLab) -> None:
    """A member (n4) answers a crawl query of n1's meant for n4 first with an answer signed
    by a non-member key, then with n5's genuine answer passed off as its own: both are
    refused and counted; n4's own answer still counts."""
    a, c = lab.cores[1], lab.cores[4]
    assert a.routing is not None and c.routing is not None
    a.map(b"tool", 200, 20.0, lab.now, lab.wall())
    job = next(iter(a._crawls.values()))[1]
    target = lab.idents[4].node_id
    pending = [q for q, p in job._pending.items() if p.node_id == target]
    qid = pending[0] if pending else 4242
    if not pending:  # n4 is not among n1's own connections: as if asked already
        job._pending[qid] = crawl._Query(target, lab.now, 1)
    crawler = lab.idents[1].node_id
    outsider_ca, outsider_ca_cert = ca_pair(9)
    outsider, outsider_cert = member(outsider_ca, outsider_ca_cert, 77, "n4")
    fake = crawl.own_links(target, "n4", ["100.64.0.5"], [])
    foreign = crawl.make_answer(
        fake, crawler=crawler, query_id=qid, identity=outsider, certificate=outsider_cert
    )
    n5_cert = lab.cores[5].routing.links.certificate  # type: ignore[union-attr]
    n5_links = crawl.own_links(lab.idents[5].node_id, "n5", [], [])
    passed_off = crawl.make_answer(
        n5_links, crawler=crawler, query_id=qid, identity=lab.idents[5], certificate=n5_cert
    )
    for payload in (foreign, passed_off):
        c.routing.send_links(crawler, payload, lab.now, lab.wall())
    c.handle_timer(lab.now, lab.wall())
    lab.deliver()
    assert a.counters["map_refused_bad_certificate"] == 1
    assert a.counters["map_refused_wrong_node"] == 1
    assert job.refused == 2
    for _ in range(400):
        if job.finished:
            break
        lab.step()
    out = job.result()
    assert out["refused"] == 2 and out["complete"]
    n4 = next(n for n in out["nodes"] if n["node_id"] == target.hex())
    assert n4["connections"]  # n4's own answer, not the forgeries (which listed none)


# -- the drawing --------------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def sample_crawl() -> dict[str, Any]:
    """Five nodes answered: a ring of near links, a far link seen as near from its other
    end, a tunnel through n3, a relayed shortcut and a leaf; n9 named but silent."""

    def c(i: int, kind: str, relayed: bool = False, via: int = 0) -> crawl.Connection:
        return crawl.Connection(nid(i), kind, relayed, nid(via) if via else b"")

    graph = {
        1: [c(2, "near"), c(5, "near"), c(3, "far"), c(9, "leaf")],
        2: [c(1, "near"), c(3, "near"), c(4, "tunnel", True, 3)],
        3: [c(2, "near"), c(4, "near"), c(1, "near")],
        4: [c(3, "near"), c(5, "near"), c(2, "tunnel", True, 3), c(1, "shortcut", True, 5)],
        5: [c(4, "near"), c(1, "near")],
        9: [],
    }
    job = crawl.Crawl(
        crawl.own_links(nid(1), "n1", ["100.64.0.1"], graph[1]),
        now=0.0,
        timeout_s=10.0,
        next_id=Ids(),
        max_nodes=200,
        query_timeout_s=1.0,
        tries=1,
    )
    now = 0.0
    while not job.finished:
        for node, qid in job.queries_to_send():
            i = node[0]
            if i != 9:
                links = crawl.own_links(node, f"n{i}", [f"100.64.0.{i}"], graph[i])
                job.answer(qid, links, now)
        now += 0.5
        job.handle(now)
    return job.result()


def test_links_are_pairs_once_with_the_strongest_kind() -> None:
    from supervisor.mapview import links_of

    links = {(lk["a"][:2], lk["b"][:2]): lk for lk in links_of(sample_crawl())}
    assert len(links) == 9  # 1-2 1-3 1-4 1-5 1-9 2-3 2-4 3-4 4-5
    assert links[("01", "03")]["kind"] == "near" and links[("01", "03")]["kinds"] == ["near", "far"]
    assert links[("02", "04")]["kind"] == "tunnel" and links[("02", "04")]["relayed"]
    assert links[("02", "04")]["via"] == [nid(3).hex()]
    assert links[("01", "04")]["kind"] == "shortcut" and links[("01", "04")]["relayed"]


def test_the_svg_has_a_circle_a_node_and_a_line_a_link_in_the_kind_s_style() -> None:
    import xml.etree.ElementTree as ET

    from supervisor.mapview import STYLE, links_of, render_svg

    found = sample_crawl()
    assert found["unanswered"] == [nid(9).hex()]
    root = ET.fromstring(render_svg(found))  # well-formed
    nodes = [e for e in root.iter(f"{SVG}circle") if "node" in e.get("class", "").split()]
    assert sorted(e.get("data-node-id") for e in nodes) == sorted(
        [n["node_id"] for n in found["nodes"]] + found["unanswered"]
    )
    assert [e.get("class") for e in nodes].count("node unanswered") == 1
    lines = [e for e in root.iter(f"{SVG}line") if "link" in e.get("class", "").split()]
    links = links_of(found)
    assert len(lines) == len(links)
    for line, link in zip(lines, links, strict=True):
        classes = line.get("class", "").split()
        assert f"kind-{link['kind']}" in classes
        assert line.get("stroke") == STYLE[link["kind"]][0]
        assert ("relayed" in classes) == link["relayed"] == (line.get("stroke-dasharray") == "7,4")
    kinds = {c.split("-", 1)[1] for e in lines for c in e.get("class", "").split() if "kind-" in c}
    assert kinds == {"near", "tunnel", "shortcut", "leaf"}
    labels = [e.text or "" for e in root.iter(f"{SVG}text") if e.get("class") == "label"]
    assert "n4 100.64.0.4" in labels
    legend = "".join(e.text or "" for g in root.iter(f"{SVG}g") for e in g.iter(f"{SVG}text"))
    for word in ("near", "far", "leaf", "tunnel", "shortcut", "relayed"):
        assert word in legend
    # placed by node id: n1 (0x01...) just right of the top, n9 (0x09...) further round
    n1 = next(e for e in nodes if e.get("data-node-id") == nid(1).hex())
    assert float(n1.get("cx", 0)) > 440 and float(n1.get("cy", 0)) < 470


def test_the_map_as_text_says_whether_it_sampled() -> None:
    from supervisor.mapview import format_map

    text = format_map(sample_crawl())
    assert text.splitlines()[0].startswith("5 nodes, 9 links")
    assert "1 did not answer" in text and "tunnel    n4" in text and "via n3" in text
    sampled = dict(sample_crawl(), sampled=True, stopped="max_nodes", not_asked=["ab" * 20])
    assert "a sample: stopped at 200 nodes (1 not asked)" in format_map(sampled)


def test_png_only_with_the_optional_extra(tmp_path: Path) -> None:
    from supervisor.mapview import render_svg, write_png

    svg = render_svg(sample_crawl())
    try:
        import cairosvg  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except (ImportError, OSError):
        why = write_png(svg, tmp_path / "map.png")
        assert why is not None and "autovn[map]" in why
        assert not (tmp_path / "map.png").exists()
        return
    assert write_png(svg, tmp_path / "map.png") is None
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_map_and_demo_map_arguments() -> None:
    from supervisor.cli import build_parser

    args = build_parser().parse_args(["map", "node.toml"])
    assert (args.max_nodes, args.timeout, args.svg, args.png, args.json) == (
        200,
        20.0,
        None,
        None,
        False,
    )
    args = build_parser().parse_args(["demo", "--map", "demo.svg"])
    assert args.map == Path("demo.svg")
