"""The overlay core driven by hand: joins step by step, greedy routing on a topology built
connection by connection, connection death, repair, graceful leave. Time is passed explicitly;
datagrams are moved between nodes by the test (aioquic style)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from pipeline.control.overlay import (
    ConnectionAdded,
    ConnectionKind,
    ConnectionRemoved,
    Delivered,
    Joined,
    NeighboursChanged,
    NodeState,
    OverlayEvent,
    OverlayNode,
    OverlaySettings,
    RouteFailed,
)
from pipeline.control.overlay import wire as w
from pipeline.nodeid import SIZE, id_to_bytes

Address = tuple[str, int]
EIGHTH = SIZE // 8
SETTINGS = OverlaySettings()


def addr(i: int) -> Address:
    return (f"198.18.{i // 250}.{i % 250 + 1}", 4000)


def kinds(datagrams: Sequence[tuple[bytes, object]]) -> list[str]:
    return [type(w.decode(data)).__name__ for data, _ in datagrams]


class Mesh:
    """Nodes at addresses with instant delivery; the test says when time moves."""

    def __init__(self, settings: OverlaySettings = SETTINGS) -> None:
        self.settings = settings
        self.nodes: dict[Address, OverlayNode] = {}
        self.down: set[Address] = set()
        self.events: dict[Address, list[OverlayEvent]] = {}
        self.now = 0.0
        self.allow: Callable[[w.Message], bool] = lambda msg: True
        self.blocked: set[frozenset[Address]] = set()  # pairs that cannot reach each other

    def add(self, i: int, node_id: int, bootstrap: Sequence[int] = ()) -> OverlayNode:
        node = OverlayNode(
            node_id,
            rng=random.Random(i),
            settings=self.settings,
            bootstrap=[addr(b) for b in bootstrap],
        )
        self.nodes[addr(i)] = node
        self.events[addr(i)] = []
        node.handle_timer(self.now)
        self.flush()
        return node

    def flush(self) -> int:
        """Deliver every datagram, and those they cause, at the current time."""
        moved = 0
        while True:
            batch = [
                (data, src, dst)
                for src, node in self.nodes.items()
                if src not in self.down
                for data, dst in node.datagrams_to_send()
            ]
            for src, node in self.nodes.items():
                self.events[src] += node.events()
            if not batch:
                return moved
            for data, src, dst in batch:
                target = self.nodes.get(dst)  # type: ignore[call-overload]
                if target is None or dst in self.down or not self.allow(w.decode(data)):
                    continue
                if frozenset((src, dst)) in self.blocked:
                    continue
                target.receive(data, src, self.now)
                moved += 1

    def run(self, until: float) -> None:
        """Fire every timer due up to ``until``, in time order, flushing after each."""
        while True:
            due = [
                (deadline, a)
                for a, node in self.nodes.items()
                if a not in self.down and (deadline := node.next_deadline()) is not None
            ]
            if not due:
                break
            deadline, a = min(due)
            if deadline > until:
                break
            self.now = max(self.now, deadline)
            self.nodes[a].handle_timer(self.now)
            self.flush()
        self.now = until

    def of(self, node: OverlayNode) -> list[OverlayEvent]:
        for a, n in self.nodes.items():
            if n is node:
                return self.events[a]
        raise KeyError(node)


def feed(
    node: OverlayNode, datagrams: list[tuple[bytes, object]], source: Address, now: float
) -> None:
    for data, _ in datagrams:
        node.receive(data, source, now)


class TestFirstNode:
    def test_joined_at_once_and_ticks(self) -> None:
        node = OverlayNode(5, rng=random.Random(0))
        assert node.next_deadline() == float("-inf")  # call handle_timer at once
        node.handle_timer(100.0)
        assert node.events() == [Joined(5, 1)]
        assert node.state is NodeState.JOINED
        assert node.datagrams_to_send() == []
        deadline = node.next_deadline()
        assert deadline is not None and 100.75 <= deadline <= 101.25

    def test_alone_it_delivers_to_itself(self) -> None:
        node = OverlayNode(5, rng=random.Random(0))
        node.handle_timer(0.0)
        node.events()
        message_id = node.send_to_key(12345, b"hi", 1.0)
        assert node.events() == [Delivered(5, 12345, b"hi", 0, message_id, False)]
        assert node.is_responsible(12345) and node.nearest(7, 3) == [5]

    def test_send_to_missing_node_fails(self) -> None:
        node = OverlayNode(5, rng=random.Random(0))
        node.handle_timer(0.0)
        node.events()
        message_id = node.send_to_node(6, b"hi", 1.0)
        assert node.events() == [RouteFailed(message_id, 6, "no_such_node")]


class TestTwoNodeJoin:
    def test_step_by_step(self) -> None:
        a_id, b_id = 2 * EIGHTH, 5 * EIGHTH
        a = OverlayNode(a_id, rng=random.Random(1))
        b = OverlayNode(b_id, rng=random.Random(2), bootstrap=[addr(1)])
        a.handle_timer(0.0)
        assert a.events() == [Joined(a_id, 1)]

        # B starts: a leaf Hello to its bootstrap address.
        b.handle_timer(0.0)
        out = b.datagrams_to_send()
        assert [(k, to) for k, (_, to) in zip(kinds(out), out, strict=True)] == [("Hello", addr(1))]
        hello = w.decode(out[0][0])
        assert isinstance(hello, w.Hello) and hello.kind == ConnectionKind.LEAF.code

        # A connections B as a leaf, tells B where it saw it, and learns its own address.
        feed(a, out, addr(2), 0.01)
        assert a.events() == [ConnectionAdded(b_id, addr(2), ConnectionKind.LEAF)]
        assert a.address == addr(1)
        out = a.datagrams_to_send()
        assert kinds(out) == ["HelloAck"]

        # B: leaf connection up; a ConnectRequest for its own id goes in through it.
        feed(b, out, addr(1), 0.02)
        assert b.events() == [ConnectionAdded(a_id, addr(1), ConnectionKind.LEAF)]
        assert b.address == addr(2)
        # its first RTT: from the Hello (0.0) to the HelloAck (0.02), before any ping
        assert [lk.rtt for lk in b.connections()] == [0.02]
        out = b.datagrams_to_send()
        request = w.decode(out[0][0])
        assert isinstance(request, w.ConnectRequest)
        assert (request.dest, request.hops, request.kind) == (id_to_bytes(b_id), 1, 2)

        # A is the closest node to B (the only one): it answers B directly.
        feed(a, out, addr(2), 0.03)
        out = a.datagrams_to_send()
        assert [(k, to) for k, (_, to) in zip(kinds(out), out, strict=True)] == [
            ("ConnectReply", addr(2))
        ]

        # B wants A as a near neighbour: it upgrades the leaf connection.
        feed(b, out, addr(1), 0.04)
        out = b.datagrams_to_send()
        hello = w.decode(out[0][0])
        assert isinstance(hello, w.Hello) and hello.kind == ConnectionKind.NEAR.code

        # A upgrades, acks, and, its near set changed, sends its neighbour list.
        feed(a, out, addr(2), 0.05)
        assert a.events() == [NeighboursChanged((b_id,), (b_id,))]
        out_a = a.datagrams_to_send()
        assert kinds(out_a) == ["HelloAck", "Neighbours"]

        feed(b, out_a, addr(1), 0.06)
        assert b.events() == [NeighboursChanged((a_id,), (a_id,)), Joined(b_id, 2)]
        assert b.state is NodeState.JOINED
        assert b.successor() == b.predecessor() == a_id
        assert a.successor() == a.predecessor() == b_id
        assert {(lk.node_id, lk.kind) for lk in b.connections()} == {(a_id, ConnectionKind.NEAR)}
        assert {(lk.node_id, lk.kind) for lk in a.connections()} == {(b_id, ConnectionKind.NEAR)}

    def test_self_in_bootstrap_list_is_skipped(self) -> None:
        mesh = Mesh()
        a = mesh.add(1, 1 * EIGHTH, bootstrap=[1])  # only itself: waits for others
        assert a.state is NodeState.JOINING and a.connections() == []
        b = mesh.add(2, 5 * EIGHTH, bootstrap=[1, 2])
        mesh.run(10.0)
        assert a.successor() == b.node_id and b.successor() == a.node_id
        assert a.state is b.state is NodeState.JOINED


class TestThreeNodes:
    def test_third_node_finds_its_place(self) -> None:
        mesh = Mesh()
        a = mesh.add(1, 1 * EIGHTH)
        b = mesh.add(2, 5 * EIGHTH, bootstrap=[1])
        mesh.run(5.0)
        c = mesh.add(3, 3 * EIGHTH, bootstrap=[2])  # joins through B; lands between A and B
        mesh.run(10.0)
        assert (a.successor(), a.predecessor()) == (c.node_id, b.node_id)
        assert (c.successor(), c.predecessor()) == (b.node_id, a.node_id)
        assert (b.successor(), b.predecessor()) == (a.node_id, c.node_id)
        assert [e for e in mesh.of(c) if isinstance(e, Joined)] == [Joined(c.node_id, 3)]
        assert c.is_responsible(3 * EIGHTH + 5) and not a.is_responsible(3 * EIGHTH + 5)
        assert c.nearest(3 * EIGHTH + 5, 2) == [c.node_id, b.node_id]

    def test_leaf_links_close_after_joining(self) -> None:
        mesh = Mesh()
        a = mesh.add(1, 1 * EIGHTH)
        mesh.add(2, 5 * EIGHTH, bootstrap=[1])
        mesh.run(5.0)
        c = mesh.add(3, 3 * EIGHTH, bootstrap=[2])
        mesh.run(100.0)
        assert {lk.kind for lk in c.connections()} == {ConnectionKind.NEAR}  # B's leaf became near
        assert len(c.connections()) == 2 and len(a.connections()) == 2


class TestKnockingAtAStaleAddress:
    def test_a_node_connected_from_another_address_is_not_knocked_at_nor_tunnelled_to(
        self,
    ) -> None:
        """R names B at the address it saw B at; B's NAT maps B to another port for P (an
        unsolicited packet took the first: what a gateway that keeps them does). Once B is
        connected to P from there, P stops knocking at the named address, and never trades
        the direct connection for a tunnel through R."""
        mesh = Mesh()
        r = mesh.add(0, 1 * EIGHTH)
        p = mesh.add(1, 3 * EIGHTH, bootstrap=[0])
        mesh.run(5.0)
        named = ("198.18.250.1", 4000)  # where R says B is: nothing answers there
        b_id = 2 * EIGHTH
        entry = (id_to_bytes(b_id), w.HostPortCodec().encode(named), True)
        p.receive(w.encode(w.Neighbours(id_to_bytes(r.node_id), False, (entry,))), addr(0), 5.0)
        hellos = [to for _, to in p.datagrams_to_send()]
        assert named in hellos  # P knocks at the named address
        b = mesh.add(2, b_id, bootstrap=[0])
        mesh.run(60.0)
        held = {c.node_id: c for c in p.connections()}
        assert b_id in held and held[b_id].address == addr(2)  # direct, where B came from
        assert p.tunnel_relay(b_id) is None
        stats = p.statistics()
        assert stats.get("hellos_superseded", 0) >= 1
        assert stats.get("tunnels_tried", 0) == 0
        assert b.state is NodeState.JOINED


def tunnelled_trio() -> tuple[Mesh, OverlayNode, OverlayNode, OverlayNode]:
    """B (the bootstrap) reaches A and C; A and C cannot reach each other (NATs on both
    sides), so they link through a tunnel that B relays."""
    mesh = Mesh()
    mesh.blocked.add(frozenset((addr(0), addr(2))))
    b = mesh.add(1, 4 * EIGHTH)
    a = mesh.add(0, 1 * EIGHTH, bootstrap=[1])
    c = mesh.add(2, 2 * EIGHTH, bootstrap=[1])
    mesh.run(60.0)
    assert a.tunnel_relay(c.node_id) == b.node_id
    return mesh, a, b, c


class TestTunnelRelay:
    def test_a_relay_that_lost_the_far_end_says_so_and_the_tunnel_is_dropped(self) -> None:
        """B loses its direct connection to C: A's next message through the tunnel gets a
        RouteError back from B at once, and A drops the tunnel instead of waiting for its
        pings through it to go unanswered."""
        mesh, a, b, c = tunnelled_trio()
        close = w.Close(id_to_bytes(c.node_id), w.CloseReason.TRIM)
        b.receive(w.encode(close), addr(2), mesh.now)
        assert c.node_id not in {lk.node_id for lk in b.connections()}
        b.datagrams_to_send()
        a.send_to_node(c.node_id, b"hello", mesh.now)
        out = a.datagrams_to_send()
        assert out and {to for _, to in out} == {addr(1)}  # into the tunnel, through B
        assert set(kinds(out)) == {"Forward"}  # the message (and a ping: C was silent)
        feed(b, out, addr(0), mesh.now)
        back = b.datagrams_to_send()
        assert kinds(back) == ["RouteError"] * len(out)
        assert {to for _, to in back} == {addr(0)}
        assert b.statistics()["dropped_forward_no_connection"] == len(out)
        feed(a, back, addr(1), mesh.now)
        assert a.tunnel_relay(c.node_id) is None
        assert c.node_id not in {lk.node_id for lk in a.connections()}
        assert a.statistics()["connections_removed_tunnel_broken"] == 1

    def test_only_the_relay_itself_can_break_a_tunnel(self) -> None:
        """The same RouteError from another node (here C, straight to A's address), or naming
        a node A holds no tunnel to, changes nothing."""
        mesh, a, b, c = tunnelled_trio()
        forged = w.RouteError(
            id_to_bytes(b.node_id), id_to_bytes(a.node_id), 0, 8, 0, id_to_bytes(c.node_id),
            "tunnel_broken",
        )  # fmt: skip
        a.receive(w.encode(forged), addr(2), mesh.now)  # from C's address, not B's
        assert a.tunnel_relay(c.node_id) == b.node_id
        other = dataclass_replace_key(forged, 7 * EIGHTH)
        a.receive(w.encode(other), addr(1), mesh.now)  # from B, about a node not tunnelled
        assert a.tunnel_relay(c.node_id) == b.node_id
        stats = a.statistics()
        assert stats["dropped_tunnel_broken_not_from_relay"] == 1
        assert stats["dropped_tunnel_broken_unmatched"] == 1

    def test_a_connection_a_tunnel_runs_over_is_not_trimmed(self) -> None:
        """Neither B nor C trims the connection between them, though each holds more near
        connections than it keeps, while A's tunnel to C runs over it."""
        mesh, a, b, c = tunnelled_trio()
        # four nodes between C (2/8) and B (4/8), four between B and A (1/8) the other way:
        # C is then fifth on both sides of B, beyond the four B keeps (near_keep_per_side)
        places = [2.2, 2.6, 3.0, 3.4, 5.0, 6.0, 7.0, 0.2]
        for i, place in enumerate(places, start=3):
            mesh.add(i, int(place * EIGHTH), bootstrap=[1])
            mesh.run(mesh.now + 5.0)
        mesh.run(mesh.now + 120.0)  # trimming has had its quiet time, many times over
        trimmed = sum(
            n.statistics().get("connections_removed_trim_near", 0) for n in mesh.nodes.values()
        )
        assert trimmed > 0  # near connections beyond the kept four were trimmed
        assert a.tunnel_relay(c.node_id) == b.node_id
        assert c.node_id in {lk.node_id for lk in b.connections()}


def dataclass_replace_key(msg: w.RouteError, key: int) -> w.RouteError:
    return w.RouteError(
        msg.src, msg.dest, msg.hops, msg.ttl, msg.message_id, id_to_bytes(key), msg.reason
    )


def hand_built_ring(mesh: Mesh) -> list[OverlayNode]:
    """Eight nodes at k/8 of the circle, each connected to k±1, plus one far connection 0–4."""
    nodes = [
        OverlayNode(k * EIGHTH, rng=random.Random(k), settings=mesh.settings) for k in range(8)
    ]
    for k, node in enumerate(nodes):
        mesh.nodes[addr(k)] = node
        mesh.events[addr(k)] = []

    def connection(i: int, j: int, kind: ConnectionKind) -> None:
        hello = w.Hello(id_to_bytes(nodes[j].node_id), kind.code, 1, b"", True)
        nodes[i].receive(w.encode(hello), addr(j), 0.0)

    for k in range(8):
        connection(k, (k + 1) % 8, ConnectionKind.NEAR)
        connection((k + 1) % 8, k, ConnectionKind.NEAR)
    connection(0, 4, ConnectionKind.FAR)
    connection(4, 0, ConnectionKind.FAR)
    for node in nodes:
        node.datagrams_to_send()
        node.events()
    return nodes


class TestGreedyRouting:
    def test_next_hops(self) -> None:
        mesh = Mesh()
        n = hand_built_ring(mesh)
        assert n[0].next_hop(6 * EIGHTH) == n[7].node_id  # 1/8 away beats the far connection's 2/8
        assert n[0].next_hop(3 * EIGHTH) == n[4].node_id  # the far connection
        assert n[0].next_hop(0 * EIGHTH + 5) is None  # here
        # Half-way between 2 and 3: both are as close; the smaller id wins, everywhere.
        key = 2 * EIGHTH + EIGHTH // 2
        assert n[0].next_hop(key) == n[1].node_id  # 1 and 4 tie at 1.5/8: the smaller
        assert n[1].next_hop(key) == n[2].node_id
        assert n[2].next_hop(key) is None
        assert n[3].next_hop(key) == n[2].node_id

    def test_messages_follow_the_greedy_path(self) -> None:
        mesh = Mesh()
        n = hand_built_ring(mesh)
        mesh.allow = lambda msg: isinstance(msg, w.Data | w.RouteError)  # the topology stays
        mid = n[0].send_to_node(n[6].node_id, b"to six", 1.0)
        mesh.flush()
        assert mesh.events[addr(6)] == [Delivered(0, 6 * EIGHTH, b"to six", 2, mid, True)]
        key = 3 * EIGHTH + 17
        mid = n[0].send_to_key(key, b"to a key", 1.0)
        mesh.flush()
        assert mesh.events[addr(3)] == [Delivered(0, key, b"to a key", 2, mid, False)]
        assert n[4].statistics()["forwarded"] == 1

    def test_avoided_first_hop(self) -> None:
        mesh = Mesh()
        n = hand_built_ring(mesh)
        mesh.allow = lambda msg: isinstance(msg, w.Data | w.RouteError)
        key = 3 * EIGHTH + 17
        assert n[0].next_hop(key, avoid=(n[4].node_id,)) == n[1].node_id  # around the far one
        mid = n[0].send_to_key(key, b"around", 1.0, avoid=(n[4].node_id,))
        mesh.flush()
        assert mesh.events[addr(3)] == [Delivered(0, key, b"around", 3, mid, False)]
        assert n[4].statistics().get("forwarded", 0) == 0
        # Only the avoided connection is closer than this node: it is taken all the same.
        assert n[1].next_hop(2 * EIGHTH, avoid=(n[2].node_id,)) == n[2].node_id
        # A direct connection to the key's node is passed over too, if another one is closer.
        assert n[0].next_hop(n[4].node_id, avoid=(n[4].node_id,)) == n[1].node_id

    def test_message_to_a_crashed_hop_is_rerouted(self) -> None:
        """A message forwarded over a connection silent for a while is kept; if its ping goes
        unanswered, it goes again around the connection (the next hop crashed unnoticed)."""
        mesh = Mesh()
        n = hand_built_ring(mesh)
        mesh.allow = lambda msg: isinstance(msg, w.Data | w.RouteError | w.Ping | w.Pong)
        key = 3 * EIGHTH + 17
        mesh.now = 10.0  # every connection silent since t=0
        mesh.down.add(addr(4))  # the far connection's end has crashed
        mid = n[0].send_to_key(key, b"via four", mesh.now)
        mesh.flush()
        assert mesh.events[addr(3)] == []  # lost at n4
        n[0].handle_timer(mesh.now + SETTINGS.suspect_after_s - 0.1)
        mesh.flush()
        assert mesh.events[addr(3)] == []  # the ping may still be answered
        mesh.now += SETTINGS.suspect_after_s
        assert n[0].next_deadline() == mesh.now
        n[0].handle_timer(mesh.now)
        mesh.flush()
        assert mesh.events[addr(3)] == [Delivered(0, key, b"via four", 3, mid, False)]
        assert n[0].statistics()["rerouted"] == 1
        # A next hop that answers its ping got the message: nothing is sent again.
        mesh.down.clear()
        key = 1 * EIGHTH + 17
        mid = n[4].send_to_key(key, b"via zero", mesh.now)  # over the far connection, silent too
        mesh.flush()
        want = [Delivered(4 * EIGHTH, key, b"via zero", 2, mid, False)]
        assert mesh.events[addr(1)] == want
        mesh.now += SETTINGS.suspect_after_s
        for node in n:
            node.handle_timer(mesh.now)
        mesh.flush()
        assert mesh.events[addr(1)] == want
        assert n[0].statistics()["rerouted"] == 1
        assert sum(node.statistics().get("rerouted", 0) for node in n) == 1

    def test_a_joiners_connect_request_goes_around_a_crashed_closest_node(self) -> None:
        """The node closest to a joiner's id crashed unnoticed (a restart: the joiner is new):
        the ConnectRequest the joiner routes to its own id is kept by each hop that forwards
        it over a silent connection and goes again around it once the ping is unanswered, so
        the joiner is on the circle seconds before its connect timeout would try again."""
        mesh = Mesh()
        n = hand_built_ring(mesh)
        mesh.now = 10.0  # every connection silent since t=0
        mesh.down.add(addr(3))
        joiner = mesh.add(9, 3 * EIGHTH + 5, bootstrap=[0])  # n3 is the closest to it
        mesh.run(mesh.now + SETTINGS.suspect_after_s - 0.1)
        assert not joiner.on_circle  # the request went n0 -> n4 -> n3 and was lost there
        mesh.run(mesh.now + 2 * SETTINGS.suspect_after_s)
        assert SETTINGS.connect_timeout_s > 3 * SETTINGS.suspect_after_s
        assert joiner.on_circle
        assert sum(node.statistics().get("rerouted", 0) for node in n) >= 1
        assert joiner.statistics().get("connect_timeouts_near", 0) == 0
        assert joiner.statistics()["sent_connect_request"] == 1
        near = {c.node_id for c in joiner.connections() if c.kind is ConnectionKind.NEAR}
        assert n[4].node_id in near and n[3].node_id not in near

    def test_missing_node_is_reported_back(self) -> None:
        mesh = Mesh()
        n = hand_built_ring(mesh)
        mesh.allow = lambda msg: isinstance(msg, w.Data | w.RouteError)
        mid = n[1].send_to_node(3 * EIGHTH + 17, b"anyone?", 1.0)
        mesh.flush()
        assert mesh.events[addr(1)] == [RouteFailed(mid, 3 * EIGHTH + 17, "no_such_node")]
        assert n[3].statistics()["sent_route_error"] == 1

    def test_hop_limit(self) -> None:
        mesh = Mesh(OverlaySettings(max_hops=1))
        n = hand_built_ring(mesh)
        mesh.allow = lambda msg: isinstance(msg, w.Data | w.RouteError)
        mid = n[0].send_to_key(6 * EIGHTH, b"far", 1.0)  # needs 2 hops
        mesh.flush()
        assert mesh.events[addr(0)] == [RouteFailed(mid, 6 * EIGHTH, "ttl")]
        assert n[7].statistics()["dropped_ttl"] == 1

    def test_size_estimate_from_spacing(self) -> None:
        mesh = Mesh()
        n = hand_built_ring(mesh)
        assert n[2].estimated_size() == 3  # only 2 structured connections: connections + 1
        mesh.allow = lambda msg: True
        mesh.run(30.0)  # neighbour lists fill in the second neighbours on each side
        assert n[2].neighbours() == ((3 * EIGHTH, 4 * EIGHTH), (1 * EIGHTH, 0))
        assert n[2].estimated_size() == 8


def five_node_ring() -> tuple[Mesh, list[OverlayNode]]:
    mesh = Mesh()
    nodes = [mesh.add(1, 0)]
    for k in range(1, 5):
        nodes.append(mesh.add(k + 1, k * SIZE // 5, bootstrap=[1]))
        mesh.run(mesh.now + 5.0)
    mesh.run(mesh.now + 10.0)
    for i, node in enumerate(nodes):
        assert node.successor() == nodes[(i + 1) % 5].node_id
        assert node.predecessor() == nodes[i - 1].node_id
    return mesh, nodes


class TestLinkDeathAndRepair:
    def test_silent_link_is_pinged_then_closed(self) -> None:
        mesh = Mesh()
        a = mesh.add(1, 1 * EIGHTH)
        b = mesh.add(2, 5 * EIGHTH, bootstrap=[1])
        mesh.run(10.0)
        mesh.down.add(addr(2))  # B crashes at t=10
        a.statistics()
        pings_before = a.statistics().get("pings", 0)
        mesh.run(60.0)
        removed = [e for e in mesh.events[addr(1)] if isinstance(e, ConnectionRemoved)]
        assert removed == [ConnectionRemoved(b.node_id, "timeout")]
        assert a.statistics()["pings"] - pings_before >= 3
        assert a.connections() == [] and a.successor() is None

    def test_a_lost_pong_is_retried_not_taken_for_death(self) -> None:
        """Forwarding over a silent connection pings it; when that one pong is lost (a
        moment's loss on the underlay) the ping goes again every ``ping_retry_s``, so the
        connection lives on. Before, only a connection silent for ``ping_after_s`` was pinged
        again, and one lost pong closed a live connection ``unanswered_dead_s`` later."""
        mesh = Mesh()
        a = mesh.add(1, 1 * EIGHTH)
        b = mesh.add(2, 5 * EIGHTH, bootstrap=[1])
        mesh.run(10.0)
        mesh.allow = lambda msg: isinstance(msg, w.Data | w.Ping | w.Pong)  # nothing else heard
        pair = frozenset((addr(1), addr(2)))
        mesh.blocked.add(pair)
        pings = a.statistics().get("pings_on_use", 0)
        a.send_to_node(b.node_id, b"lost", mesh.now)
        mesh.flush()
        assert a.statistics()["pings_on_use"] == pings + 1  # its pong cannot come back
        mesh.run(mesh.now + 0.5)
        mesh.blocked.discard(pair)
        mesh.run(mesh.now + 3 * SETTINGS.unanswered_dead_s)
        for node in (a, b):
            assert not [e for e in mesh.of(node) if isinstance(e, ConnectionRemoved)]
        assert [c.node_id for c in a.connections()] == [b.node_id]
        assert a.suspected(mesh.now) == set()

    def test_timeout_is_between_dead_after_and_one_more_tick(self) -> None:
        mesh = Mesh()
        a = mesh.add(1, 1 * EIGHTH)
        mesh.add(2, 5 * EIGHTH, bootstrap=[1])
        mesh.run(10.0)
        mesh.down.add(addr(2))
        last_heard = 10.0
        while a.connections():
            deadline = a.next_deadline()
            assert deadline is not None
            mesh.run(deadline)
        assert last_heard + SETTINGS.dead_after_s - 15.0 < mesh.now
        assert mesh.now <= last_heard + SETTINGS.dead_after_s + 1.25 * SETTINGS.tick_s

    def test_crashed_neighbour_is_repaired(self) -> None:
        mesh, n = five_node_ring()
        mesh.down.add(addr(3))  # n[2] crashes
        mesh.run(mesh.now + 40.0)
        alive = [n[0], n[1], n[3], n[4]]
        for i, node in enumerate(alive):
            assert node.successor() == alive[(i + 1) % 4].node_id
            assert node.predecessor() == alive[i - 1].node_id
        assert ConnectionRemoved(n[2].node_id, "timeout") in mesh.events[addr(2)]

    def test_graceful_leave_repairs_at_once(self) -> None:
        mesh, n = five_node_ring()
        n[2].leave(mesh.now)
        mesh.flush()  # same instant: no timer has run
        mesh.down.add(addr(3))
        assert n[1].successor() == n[3].node_id and n[3].predecessor() == n[1].node_id
        assert ConnectionRemoved(n[2].node_id, "closed_leave") in mesh.events[addr(2)]
        assert n[2].next_deadline() is None
        mid = n[2].send_to_key(1, b"late", mesh.now)
        assert n[2].events()[-1] == RouteFailed(mid, 1, "left")

    def test_ping_for_a_forgotten_link_closes_it(self) -> None:
        mesh = Mesh()
        a = mesh.add(1, 1 * EIGHTH)
        b = mesh.add(2, 5 * EIGHTH, bootstrap=[1])
        mesh.run(10.0)
        # B restarts with its id at its address, knowing nobody; A still holds the connection.
        fresh = OverlayNode(b.node_id, rng=random.Random(99))
        fresh.handle_timer(10.0)
        fresh.events()
        fresh.receive(w.encode(w.Ping(id_to_bytes(a.node_id), 1, 10.0)), addr(1), 10.1)
        out = fresh.datagrams_to_send()
        assert kinds(out) == ["Close"] and out[0][1] == addr(1)
        feed(a, out, addr(2), 10.2)
        assert a.events()[0] == ConnectionRemoved(b.node_id, "closed_unknown")
        assert a.connections() == []

    def test_unexpected_hello_ack_is_answered_with_close(self) -> None:
        a = OverlayNode(1 * EIGHTH, rng=random.Random(1))
        a.handle_timer(0.0)
        a.receive(w.encode(w.HelloAck(id_to_bytes(7), 2, 99, b"", True)), addr(9), 1.0)
        assert kinds(a.datagrams_to_send()) == ["Close"]
        assert a.connections() == [] and a.statistics()["dropped_unexpected_ack"] == 1

    def test_restarted_peer_is_linked_again(self) -> None:
        mesh, n = five_node_ring()
        fresh = OverlayNode(n[2].node_id, rng=random.Random(99), settings=SETTINGS)
        fresh.handle_timer(mesh.now)
        mesh.nodes[addr(3)] = fresh
        mesh.run(mesh.now + 40.0)
        assert fresh.successor() == n[3].node_id and fresh.predecessor() == n[1].node_id
        assert n[1].successor() == n[3].predecessor() == fresh.node_id


class TestDeterminism:
    def run_once(self) -> list[bytes]:
        mesh = Mesh()
        trace: list[bytes] = []
        allow = mesh.allow

        def record(msg: w.Message) -> bool:
            trace.append(w.encode(msg))
            return allow(msg)

        mesh.allow = record
        mesh.add(1, 0)
        for k in range(1, 6):
            mesh.add(k + 1, k * SIZE // 6, bootstrap=[1])
            mesh.run(mesh.now + 3.0)
        mesh.run(mesh.now + 30.0)
        return trace

    def test_same_seeds_same_datagrams(self) -> None:
        assert self.run_once() == self.run_once()


class TestStatistics:
    def test_counts_by_type_and_gauges(self) -> None:
        mesh, n = five_node_ring()
        stats = n[0].statistics()
        assert stats["sent_hello_ack"] >= 1 and stats["received_hello"] >= 1
        assert (
            stats["connections_near"] == len(n[0].connections()) and stats["connections_leaf"] == 0
        )
        assert stats["bytes_sent"] > 0 and stats["estimated_size"] == 5
        info = n[0].connections()[0]
        assert info.age > 0 and info.kind is ConnectionKind.NEAR
