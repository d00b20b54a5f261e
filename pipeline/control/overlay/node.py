"""One node of the structured overlay (after Brunet/Symphony). Sans-I/O.

Theory of operation:

- **The circle.** Node ids are positions on a circle of 2^160 (``pipeline.nodeid``). A node
  keeps *connections* (logical overlay connections to other nodes' addresses): ``near``
  connections to the ``near_per_side`` (2) nearest nodes on each side, ``far`` connections
  (Symphony shortcuts) to about ``⌈½·log2 N⌉`` nodes drawn at distances ∝ 1/d, and ``leaf``
  connections to bootstrap addresses while it joins. N is estimated from the spacing of the near
  neighbours.
- **Connections.** ``Hello`` → ``HelloAck`` makes a connection on both sides (either side may
  start, both may start at once; a Hello on an existing connection refreshes or upgrades it).
  Any datagram from a connected address counts as a sign of life (routed traffic and neighbour
  lists too), so only a silent connection is pinged: a leaf connection or one of the
  ``near_per_side`` nearest on a side when silent for ``ping_after_s``, any other (far
  connections, surplus near connections) for ``far_ping_after_s``, each stretched by a
  per-connection random factor (``ping_jitter``) so the two ends seldom both ping; then every
  ``ping_retry_s`` (any unanswered ping is, whatever sent it), and closed after
  ``dead_after_s`` (``far_dead_after_s``) of silence or once its pings have gone unanswered
  for ``unanswered_dead_s``. Forwarding over a connection silent for ``use_ping_after_s``
  pings it too, and so does ``verify`` (the layer below relays datagrams over the node and
  hears nothing back); a connection whose ping has been unanswered for ``suspect_after_s``
  is routed around (if it is the only connection closer than this node, this node takes the
  message as the closest live one), so a crashed hop — even a crashed closest node — is found
  and avoided soon after it is used. The message that found it is not lost either: see
  *Re-routing*. A node that gets a Ping or a HelloAck for a connection it does not hold
  answers ``Close(unknown)``, so half-open connections do not linger.
- **Joining.** Hello to bootstrap addresses (a few at a time; any one reachable suffices), then
  a ``ConnectRequest`` toward the node's own id through each leaf peer that says it is on the
  circle (through any leaf peer if none is): routed greedily, never to the requester itself, it
  ends at the node closest to the requester, which answers with its neighbours nearest the
  requester. The requester connects to the candidates that fall among its ``near_per_side``
  nearest on a side, and refines with the neighbour lists its new neighbours send. It is
  *joined* when its successor and predecessor both know no node between themselves and it.
- **Keeping the circle.** Whenever a node's near set changes it sends its neighbour list (its
  connections nearest the receiver, ``neighbour_list_per_side`` a side) to each near neighbour,
  asking the nearest on each side (and new ones) for theirs; every ``stabilize_s`` it asks its
  nearest on each side again (not one whose list came within the last ¾ of that: it asked us,
  and one exchange a pair suffices). A list naming a node nearer than the current near
  neighbours makes a connection to it. So a lost neighbour is repaired by asking the next one on
  that side; a graceful leaver's ``Close`` carries its neighbours.
- **Far connections.** Once joined and N > ``shortcut_min_size``, while it has fewer than
  ``⌈shortcut_factor·log2 N⌉`` far connections (not counting those among the near neighbours), a
  node draws a distance d with log2 d uniform between log2(2^160/N) and 159, a random side, and
  routes a ``ConnectRequest`` to that point; the node closest to it answers and they connect.
  Both ends count the connection. More than twice the wanted number: one random far connection
  is closed.
- **Trimming** (as Brunet): after ``trim_quiet_s`` without a change of the near set, a near
  connection more than ``near_keep_per_side`` places away on both sides is closed (the farthest
  first); leaf connections close ``leaf_linger_s`` after the node has joined.
- **Routing** is greedy: to the connected node (or this one) closest to the key, never a leaf
  connection unless it is the destination itself or the node has nothing else; at most
  ``max_hops`` hops. ``send_to_key`` delivers at the closest node, ``send_to_node`` only at the
  node with exactly that id (else a ``RouteError`` goes back to the sender).
- **Re-routing.** Under churn the connections that lead to crashed nodes are the ones silent for
  a while (a far connection is closed only after ``far_dead_after_s`` of silence), and greedy
  paths run through them: a message lost at any hop of the way there or of the answer's way back
  costs the requester a whole retry. So a node that forwards an application message (``Data``)
  or a near ``ConnectRequest`` (a joiner's to its own id ends at a crashed node that was the
  closest to it, and its retry would come ``connect_timeout_s`` later) over a connection
  silent for ``use_ping_after_s`` — the connection it pings on use — keeps it,
  and if nothing has come from the connection ``suspect_after_s`` later (the connection is then
  suspect), routes it again from here, passing over that connection (delivering here if it was
  the only closer one). A next hop that shows a sign of life is taken to have the message. A
  ``send_to_node`` message whose next hop is the node it is for is not kept: there is no way
  around that one. No datagram is added but the re-routed message, and only hops that were
  silent anyway keep messages (at most ``HELD_MAX``). Otherwise datagrams may be lost, and the
  overlay does not retransmit: a message whose ping or pong was lost on a live connection can,
  rarely, arrive twice.
- **Several circles.** A joined node routes a ConnectRequest for its own id through a bootstrap
  address again ``bootstrap_probe_first_s`` after joining, then at doubling intervals up to
  every ``bootstrap_probe_s``: nodes that started at the same moment with the same bootstrap
  list may have founded more than one circle, and a partition leaves one on each side; that is
  how they find each other and zip together. A node that had structured connections and lost
  them all joins anew, through its bootstrap addresses and the addresses of its last
  ``KNOWN_ADDRESSES`` connections.

Drive it like aioquic's connection: inputs ``receive(message, source, now)``,
``handle_timer(now)``, ``send_to_key``, ``send_to_node``, ``leave``; after each, drain
``datagrams_to_send()`` and ``events()`` and arm one timer at ``next_deadline()``. ``now`` is
seconds on the caller's monotonic clock; all randomness comes from the ``rng`` given. Nothing
from the network raises out of ``receive``: malformed input is a counted drop
(``statistics()["dropped_<reason>"]``).

The core trusts the ``sender`` ids in messages: live, the driver must only hand it datagrams
from authenticated connections (``pipeline/control/connections.py``), and check that a
connection's authenticated id is the id it claims.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections import Counter
from collections.abc import Collection, Sequence

import msgspec

from pipeline import nodeid
from pipeline.control.overlay import wire as w
from pipeline.control.overlay.events import (
    ConnectionAdded,
    ConnectionInfo,
    ConnectionKind,
    ConnectionRemoved,
    Delivered,
    Joined,
    NeighboursChanged,
    OverlayEvent,
    RouteFailed,
)
from pipeline.control.overlay.wire import (
    Address,
    AddressCodec,
    CloseReason,
    HostPortCodec,
    Tunnel,
)
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import circle_distance, clockwise, id_from_bytes, id_to_bytes

LEAF, FAR, NEAR = ConnectionKind.LEAF, ConnectionKind.FAR, ConnectionKind.NEAR
KNOWN_ADDRESSES = 16  # addresses of recent connections kept to re-join through
OWN_ADDRESSES = 8  # addresses of our own that peers told us, kept
HELD_MAX = 4096  # messages kept for re-routing at once; beyond, they are not kept
INTRODUCERS_MAX = 1024  # who named which node to us, kept for tunnels
TUNNEL_AFTER_TRIES = 2  # unanswered Hellos to a near candidate before a tunnel is tried too
VERIFY_SPACING_S = 0.25  # pings on the layer below's word, at most this often a connection
TUNNEL_BROKEN = "tunnel_broken"  # a relay's RouteError: "I no longer reach the far end directly"


class OverlaySettings(msgspec.Struct, frozen=True):
    """Every knob of the overlay core; times in seconds. Defaults follow Brunet."""

    near_per_side: int = 2  # near neighbours wanted on each side
    near_keep_per_side: int = 4  # near connections this many places away on both sides are trimmed
    neighbour_list_per_side: int = 4  # entries a side in a neighbour list
    shortcut_factor: float = 0.5  # far connections wanted: ceil(factor * log2 N) ...
    shortcut_min_size: int = 10  # ... once the estimated size N is above this
    max_hops: int = 64  # hop limit of routed messages
    max_connections: int = 128  # Hellos beyond this many connections are refused
    tick_s: float = 1.0  # the maintenance heartbeat (jittered by ±25%)
    hello_retry_s: float = 1.0
    hello_tries: int = 4
    connect_timeout_s: float = 4.0
    ping_after_s: float = 15.0  # a near or leaf connection silent this long is pinged ...
    ping_retry_s: float = 1.0  # ... this often ...
    dead_after_s: float = 25.0  # ... and closed when silent this long
    unanswered_dead_s: float = 4.0  # ... or when its pings have gone unanswered this long
    far_ping_after_s: float = (
        40.0  # the same for the other connections (far connections, near connections
    )
    far_dead_after_s: float = 50.0  # beyond the near_per_side nearest on a side)
    ping_jitter: float = 0.2  # each connection's ping_after is stretched by a random 0..this
    use_ping_after_s: float = 2.0  # forwarding over a connection silent this long pings it too
    suspect_after_s: float = 1.0  # a connection whose ping is unanswered this long is routed around
    stabilize_s: float = 15.0  # ask the nearest neighbour on each side for its list
    far_retry_s: float = 5.0  # back-off after a failed far-connection attempt, doubling ...
    far_retry_max_s: float = 60.0  # ... up to this
    trim_quiet_s: float = 30.0  # near trimming waits this long after a near-set change
    leaf_linger_s: float = 60.0  # leaf connections close this long after joining
    suspect_s: float = 60.0  # a node that did not answer a Hello is not tried again for this long
    unreachable_s: float = 600.0  # ... and not knocked at directly (only through a tunnel)
    bootstrap_fanout: int = 2  # bootstrap addresses tried at once
    bootstrap_retry_s: float = 2.0  # back-off between bootstrap rounds, doubling ...
    bootstrap_retry_max_s: float = 60.0  # ... up to this
    bootstrap_probe_first_s: float = 5.0  # re-join through a bootstrap address this long
    bootstrap_probe_s: float = 120.0  # after joining, then ever less often up to this; 0: never
    address_codec: AddressCodec = HostPortCodec()


class NodeState(enum.Enum):
    IDLE = "idle"  # not started: no input yet
    JOINING = "joining"
    JOINED = "joined"
    LEFT = "left"


class _Connection(msgspec.Struct):
    node_id: int
    address: Address
    address_bytes: bytes
    kind: ConnectionKind
    since: float
    last_heard: float
    rtt: float | None = None
    last_ping: float = -math.inf
    on_circle: bool = False  # as it said in its latest Hello or HelloAck
    view: tuple[int, ...] | None = None  # the ids in its latest neighbour list
    view_at: float = -math.inf  # when that list came
    ping_since: float = math.inf  # first ping not yet answered (when last_heard is older)
    jitter: float = 1.0  # this connection's ping_after factor, 1 .. 1 + ping_jitter
    relayed_at: float = -math.inf  # a tunnel's Forward last crossed it: not trimmed meanwhile


class _PendingConnection(msgspec.Struct):
    """A Hello waiting for its HelloAck."""

    address: Address
    node_id: int | None  # None: a bootstrap address, id unknown
    kind: ConnectionKind
    token: int
    tries: int
    next_try: float
    probe: bool = False  # a leaf made to re-join through (bootstrap probe)
    sent: float = math.nan  # when the (last) Hello went: its HelloAck is a first RTT sample


class _Held(msgspec.Struct, frozen=True):
    """A Data message or ConnectRequest forwarded over a connection that had been silent:
    re-routed around the connection if nothing is heard from it within ``suspect_after_s``."""

    connection: int  # the id of the connection it went over
    sent: float
    msg: w.Data | w.ConnectRequest  # as it came here (hops not yet counted)
    dest: int


class _PendingConnect(msgspec.Struct):
    kind: ConnectionKind
    target: int
    deadline: float


_NAMES = {cls: name for cls, name in w.MESSAGE_NAMES.items()}
_SENT = {cls: f"sent_{name}" for cls, name in _NAMES.items()}
_RECEIVED = {cls: f"received_{name}" for cls, name in _NAMES.items()}


class OverlayNode:
    """One overlay node: connections, joining, maintenance and greedy routing. See the module."""

    def __init__(
        self,
        node_id: int,
        *,
        rng: random.Random,
        settings: OverlaySettings = OverlaySettings(),
        bootstrap: Sequence[Address] = (),
    ) -> None:
        if not 0 <= node_id < nodeid.SIZE:
            raise ValueError(f"a node id is in [0, 2**160), got {node_id}")
        self.node_id = node_id
        self.settings = settings
        self._id = id_to_bytes(node_id)
        self._rng = rng
        self._codec = settings.address_codec
        self._bootstrap = list(bootstrap)
        self._bootstrap_queue: list[Address] = []
        self._state = NodeState.IDLE
        self._now = 0.0
        self._connections: dict[int, _Connection] = {}
        self._by_address: dict[Address, int] = {}
        self._pending: dict[Address, _PendingConnection] = {}
        self._connects: dict[int, _PendingConnect] = {}
        self._arrived_from: Address | None = None  # where the routed message in hand came from
        self._suspects: dict[int, float] = {}
        self._own_addresses: dict[Address, None] = {}
        self._known: dict[Address, None] = {}  # addresses of recent connections, oldest first
        self._address: Address | None = None
        self._address_bytes = b""
        self._out: list[tuple[bytes, Address]] = []
        self._events: list[OverlayEvent] = []
        self._stats: Counter[str] = Counter()
        self._circle_cache: tuple[list[int], list[int]] | None = None
        self._routing_cache: list[_Connection] | None = None
        self._size_cache: int | None = None
        self._announced: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self._near_changed = 0.0
        self._joined_at: float | None = None
        self._had_structured = False
        self._next_tick = -math.inf
        self._next_stabilize = 0.0
        self._next_far = 0.0
        self._far_backoff = settings.far_retry_s
        self._next_bootstrap = 0.0
        self._bootstrap_backoff = settings.bootstrap_retry_s
        self._next_probe = 0.0
        self._probe_interval = settings.bootstrap_probe_first_s
        self._message_id = 0
        self._ping_seq = 0
        self._held: list[tuple[float, int, _Held]] = []  # a heap by deadline
        self._suspect_due: list[float] = []  # a heap: when pings out now turn suspect
        self._held_seq = 0
        self._introducers: dict[int, int] = {}  # node id -> the node that named it to us
        self._unreachable: dict[int, float] = {}  # node id -> until when not to knock direct

    def __repr__(self) -> str:
        state, count = self._state.value, len(self._connections)
        return f"<OverlayNode {nodeid.short(self.node_id)} {state} {count}>"

    # -- outputs -----------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """The datagrams to send since the last call, each with its destination address."""
        out, self._out = self._out, []
        return out

    def events(self) -> list[OverlayEvent]:
        """The events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must next be called: -inf before the first input (call it
        at once), None once the node has left."""
        if self._state is NodeState.LEFT:
            return None
        due = self._next_tick
        if self._held:
            due = min(due, self._held[0][0])
        if self._suspect_due:
            due = min(due, self._suspect_due[0])
        return due

    def statistics(self) -> dict[str, int]:
        """Counters: ``sent_<type>`` / ``received_<type>`` per message type, ``bytes_sent``,
        ``bytes_received``, ``dropped_<reason>``, ``connections_added_<kind>``,
        ``connections_removed_<reason>``, maintenance counts (``pings``, ``connects_<kind>``,
        ``hello_failed``, ...), routing (``forwarded``, ``delivered``, ``route_failed_<why>``,
        ``rerouted``) and gauges (``connections_near`` / ``connections_far`` / ``connections_leaf``,
        ``estimated_size``)."""
        stats = dict(self._stats)
        for kind in ConnectionKind:
            stats[f"connections_{kind.value}"] = 0
        for connection in self._connections.values():
            stats[f"connections_{connection.kind.value}"] += 1
        stats["estimated_size"] = self.estimated_size()
        return stats

    # -- queries -----------------------------------------------------------------------------

    @property
    def state(self) -> NodeState:
        return self._state

    @property
    def on_circle(self) -> bool:
        """Joined, or joining with a near or far connection made: the node knows its place on
        the circle (the layer above need not wait for ``Joined`` to use it: see the DHT)."""
        return self._state is not NodeState.LEFT and self._on_circle()

    @property
    def address(self) -> Address | None:
        """This node's own address as its peers see it (from Hello/HelloAck), if known."""
        return self._address

    def connections(self) -> list[ConnectionInfo]:
        """Every connection, in the order they were made."""
        return [
            ConnectionInfo(lk.node_id, lk.address, lk.kind, lk.rtt, self._now - lk.since)
            for lk in self._connections.values()
        ]

    def neighbours(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(successors, predecessors): the ``near_per_side`` nearest connected nodes clockwise
        and counter-clockwise, nearest first (leaf connections not counted)."""
        succ, pred = self._circle_view()
        k = self.settings.near_per_side
        return tuple(succ[:k]), tuple(pred[:k])

    def successor(self) -> int | None:
        """The nearest connected node clockwise, or None without structured connections."""
        succ, _ = self._circle_view()
        return succ[0] if succ else None

    def predecessor(self) -> int | None:
        """The nearest connected node counter-clockwise, or None without structured connections."""
        _, pred = self._circle_view()
        return pred[0] if pred else None

    def nearest(self, key: int, k: int) -> list[int]:
        """The ids of the k known nodes (this one and its near and far connections) nearest to key,
        nearest first: where DHT replicas of key go."""
        ids = [self.node_id, *(lk.node_id for lk in self._structured())]
        ids.sort(key=lambda i: (circle_distance(i, key), i))
        return ids[:k]

    def is_responsible(self, key: int) -> bool:
        """This node is the closest to key among itself and its near neighbours."""
        succ, pred = self.neighbours()
        best = self.node_id
        for nid in (*succ, *pred):
            if nodeid.closer(key, nid, best):
                best = nid
        return best == self.node_id

    def next_hop(self, key: int, avoid: Collection[int] = ()) -> int | None:
        """The id of the connection a message for key goes to next (passing over ``avoid`` as
        ``send_to_key`` does), or None when this node is the closest it knows."""
        connection = self._next_connection(key, None, avoid)
        return None if connection is None else connection.node_id

    def tunnel_relay(self, node_id: int) -> int | None:
        """The id of the node our connection to ``node_id`` is relayed through, if it is a
        tunnel (None: a direct connection, or none)."""
        connection = self._connections.get(node_id)
        if connection is None or not isinstance(connection.address, Tunnel):
            return None
        return self._by_address.get(connection.address.relay)

    def suspected(self, now: float) -> set[int]:
        """The ids of the connections whose pings have gone unanswered for ``suspect_after_s``
        (crashed, probably: routed around until they answer or are closed)."""
        cutoff = now - self.settings.suspect_after_s
        return {
            c.node_id for c in self._connections.values() if c.last_heard < c.ping_since <= cutoff
        }

    def verify(self, node_id: int, now: float) -> bool:
        """Traffic sent through the node ``node_id`` (not overlay messages: the layer below
        relays datagrams over it) has met silence: ping the connection now, unless a ping of
        it is out (sent within ``ping_retry_s``, unanswered) or one went within
        ``VERIFY_SPACING_S``. Every other connection silent for ``use_ping_after_s`` is
        pinged too (crashes come together: the next hop the layer below turns to may be
        dead as well, and is then known so at the same moment). True if the node was pinged.
        Unanswered, a connection is suspect ``suspect_after_s`` later and closed after
        ``unanswered_dead_s``."""
        self._now = now
        connection = self._connections.get(node_id)
        if connection is None or self._state is NodeState.LEFT:
            return False
        pinged = self._verify_ping(connection, now)
        if pinged:
            st = self.settings
            for other in self._connections.values():
                if other is not connection and now - other.last_heard >= st.use_ping_after_s:
                    self._verify_ping(other, now)
        return pinged

    def _verify_ping(self, connection: _Connection, now: float) -> bool:
        out = connection.last_heard < connection.last_ping
        spacing = self.settings.ping_retry_s if out else VERIFY_SPACING_S
        if now - connection.last_ping < spacing:
            return False
        self._stats["pings_on_report"] += 1
        self._ping(connection, now)
        return True

    def address_of(self, node_id: int) -> Address | None:
        """The address our connection to ``node_id`` uses, if we have one."""
        connection = self._connections.get(node_id)
        return None if connection is None else connection.address

    def readdress(self, node_id: int, address: Address) -> None:
        """The node moved: its authenticated datagrams now come from ``address`` (the layer
        under the overlay knows: the link's handshake came from there). The connection
        follows it, so the node's next messages are not taken for a stranger's."""
        connection = self._connections.get(node_id)
        if connection is None or connection.address == address:
            return
        if self._by_address.get(connection.address) == node_id:
            del self._by_address[connection.address]
        connection.address = address
        connection.address_bytes = self._codec_encode_or_empty(address)
        self._by_address[address] = node_id
        self._stats["readdressed"] += 1

    def estimated_size(self) -> int:
        """N, the estimated number of nodes, from the nodes this one knows near itself: its
        structured connections and the ids in its connections' latest neighbour lists (their
        nodes nearest to us). If those, up to ``neighbour_list_per_side`` on each side, meet
        around the circle, the node knows every node: N is their number plus one. Otherwise
        the k nearest on each side span 2k of the N gaps between the nodes: N is about
        (2k - 1/3) * 2^160 / span (2k - 1/3, not 2k: the span of 2k random gaps is more
        often short than long, its median is about (2k - 1/3) mean gaps), and never less
        than the nodes known plus one. (It was 4 * 2^160 over the span of the two nearest on
        each side, which read 33 on a 10-node network.)"""
        if self._size_cache is None:
            self._size_cache = self._estimate_size()
        return self._size_cache

    def _estimate_size(self) -> int:
        me = self.node_id
        known = {lk.node_id for lk in self._structured()}
        for lk in self._structured():
            if lk.view is not None:
                known.update(lk.view)
        known.discard(me)
        k = self.settings.neighbour_list_per_side
        if len(known) < 2 * k:
            return len(known) + 1  # the sides meet: every node is known
        succ = sorted(known, key=lambda i: clockwise(me, i))
        span = clockwise(me, succ[k - 1]) + clockwise(succ[-k], me)
        return max(len(known) + 1, (6 * k - 1) * nodeid.SIZE // (3 * max(span, 1)))

    # -- inputs ------------------------------------------------------------------------------

    def receive(self, message: bytes, source: Address, now: float) -> None:
        """A datagram from ``source``. Never raises on bad input: it is counted and dropped."""
        self._now = now
        self._stats["bytes_received"] += len(message)
        if self._state is NodeState.LEFT:
            self._receive_after_leave(message, source)
            return
        self._ensure_started(now)
        try:
            msg = w.decode(message)
            self._stats[_RECEIVED[type(msg)]] += 1
            nid = self._by_address.get(source)
            if nid is not None:
                connection = self._connections[nid]
                connection.last_heard = now
            self._dispatch(msg, source, now)
        except RemoteProtocolError as exc:
            self._stats[f"dropped_{exc.reason}"] += 1
        self._after_input(now)

    def handle_timer(self, now: float) -> None:
        """The deadline from ``next_deadline`` has come (an early call does no harm)."""
        self._now = now
        if self._state is NodeState.LEFT:
            return
        self._ensure_started(now)
        while self._suspect_due and self._suspect_due[0] <= now:
            heapq.heappop(self._suspect_due)  # (``suspected`` now says so: nothing to do)
        if self._held and self._held[0][0] <= now:
            self._reroute(now)
        if now >= self._next_tick:
            self._next_tick = now + self.settings.tick_s * (0.75 + 0.5 * self._rng.random())
            self._tick(now)
        self._after_input(now)

    def send_to_key(
        self, key: int, payload: bytes, now: float, *, avoid: Collection[int] = ()
    ) -> int:
        """Route payload greedily to the node closest to key; returns the message id that a
        ``RouteFailed`` would carry. Delivered there as a ``Delivered`` event. The first
        hop passes over the connections in ``avoid`` unless none other is closer than this node
        (a retry that goes around a first hop that may have crashed)."""
        return self._send_data(key, payload, now, exact=False, avoid=avoid)

    def send_to_node(
        self, node_id: int, payload: bytes, now: float, *, avoid: Collection[int] = ()
    ) -> int:
        """Route payload to the node whose id is exactly ``node_id``; returns the message id.
        If the closest node is another, the sender gets ``RouteFailed(no_such_node)``.
        ``avoid`` as for ``send_to_key``."""
        return self._send_data(node_id, payload, now, exact=True, avoid=avoid)

    def leave(self, now: float) -> None:
        """Leave gracefully: every connection gets a Close carrying our neighbours."""
        self._now = now
        if self._state is NodeState.LEFT:
            return
        for connection in list(self._connections.values()):
            entries = self._entries_for(connection.node_id)
            self._send(w.Close(self._id, CloseReason.LEAVE, entries), connection.address)
            self._drop_connection(connection, "left")
        self._pending.clear()
        self._connects.clear()
        self._held.clear()
        self._state = NodeState.LEFT

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, msg: w.Message, source: Address, now: float) -> None:
        if isinstance(msg, w.Forward):
            self._on_forward(msg, source, now)
        elif isinstance(msg, w.Data | w.ConnectRequest | w.RouteError):
            self._arrived_from = source
            try:
                self._route_in(msg)
            finally:
                self._arrived_from = None
        elif isinstance(msg, w.Ping):
            self._on_ping(msg, source)
        elif isinstance(msg, w.Pong):
            self._on_pong(msg, source, now)
        elif isinstance(msg, w.Neighbours):
            self._on_neighbours(msg, source)
        elif isinstance(msg, w.Hello):
            self._on_hello(msg, source, now)
        elif isinstance(msg, w.HelloAck):
            self._on_hello_ack(msg, source, now)
        elif isinstance(msg, w.Close):
            self._on_close(msg, source)
        else:
            self._on_connect_reply(msg, source, now)

    def _on_forward(self, msg: w.Forward, source: Address, now: float) -> None:
        """A message relayed for a tunnel: ours to handle, or to pass on to ``dest``."""
        if isinstance(source, Tunnel):
            raise RemoteProtocolError("nested_forward")
        dest = id_from_bytes(msg.dest)
        origin = id_from_bytes(msg.origin)
        if dest != self.node_id:
            # As the relay: only from the origin itself, only to a node we reach directly.
            connection = self._connections.get(dest)
            if msg.sender != msg.origin or self._by_address.get(source) != origin:
                raise RemoteProtocolError("forward_not_from_origin")
            if connection is None or isinstance(connection.address, Tunnel):
                # say so to the near end at once (it would find out only when its pings through
                # us go unanswered): it drops the tunnel and reaches ``dest`` another way
                broken = w.RouteError(
                    self._id, msg.origin, 0, self.settings.max_hops, 0, msg.dest, TUNNEL_BROKEN
                )
                self._send(broken, source)
                raise RemoteProtocolError("forward_no_connection")
            connection.relayed_at = now  # both legs of the tunnel stay while it is used
            self._connections[origin].relayed_at = now
            seen = self._codec_encode_or_empty(source)
            relayed = w.Forward(self._id, msg.origin, seen, msg.dest, msg.payload)
            self._stats["forwarded_tunnel"] += 1
            self._send(relayed, connection.address)
            return
        inner = w.decode(msg.payload)
        if isinstance(inner, w.Forward):
            raise RemoteProtocolError("nested_forward")
        relay = self._connections.get(self._by_address.get(source, -1))
        if relay is not None:
            relay.relayed_at = now  # (our leg of the tunnel: kept while used)
        tunnel = Tunnel(source, origin, msg.origin_address)
        nid = self._by_address.get(tunnel)
        if nid is not None:
            self._connections[nid].last_heard = now
        self._stats[_RECEIVED[type(inner)]] += 1
        self._dispatch(inner, tunnel, now)

    def _codec_encode_or_empty(self, address: Address) -> bytes:
        try:
            return self._codec.encode(address)
        except ValueError:
            return b""

    def _receive_after_leave(self, message: bytes, source: Address) -> None:
        try:
            msg = w.decode(message)
        except RemoteProtocolError:
            self._stats["dropped_after_leave"] += 1
            return
        if isinstance(msg, w.Hello | w.Ping | w.Neighbours):
            self._send(w.Close(self._id, CloseReason.LEAVE), source)
        else:
            self._stats["dropped_after_leave"] += 1

    # -- connections -------------------------------------------------------------------------------

    def _on_hello(self, msg: w.Hello, source: Address, now: float) -> None:
        sender = id_from_bytes(msg.sender)
        self._learn_address(msg.to)
        if sender == self.node_id:
            self._remember_own(source)
            self._send(w.HelloAck(self._id, msg.kind, msg.token, msg.to, False), source)
            return
        kind = ConnectionKind.from_code(msg.kind)
        if (
            sender not in self._connections
            and len(self._connections) >= self.settings.max_connections
        ):
            self._send(w.Close(self._id, CloseReason.FULL), source)
            self._stats["hellos_refused"] += 1
            return
        observed = self._encode_address(source)
        pending = self._pending.pop(source, None)
        if pending is not None and pending.kind.code > kind.code:
            kind = pending.kind  # we were making a stronger connection at the same moment
        connection = self._add_connection(sender, source, observed, kind, now)
        if connection is not None:
            connection.on_circle = msg.on_circle
        ack = w.HelloAck(self._id, msg.kind, msg.token, observed, self._on_circle())
        self._send(ack, source)

    def _on_hello_ack(self, msg: w.HelloAck, source: Address, now: float) -> None:
        sender = id_from_bytes(msg.sender)
        pending = self._pending.get(source)
        if pending is None or pending.token != msg.token:
            if sender not in self._connections and sender != self.node_id:
                self._send(w.Close(self._id, CloseReason.UNKNOWN), source)
                self._stats["dropped_unexpected_ack"] += 1
            return
        del self._pending[source]
        self._learn_address(msg.observed)
        if sender == self.node_id:
            self._remember_own(source)
            return
        connection = self._add_connection(
            sender, source, self._encode_address(source), pending.kind, now
        )
        if connection is None:
            return
        connection.on_circle = msg.on_circle
        if pending.tries == 1 and connection.rtt is None and 0.0 <= now - pending.sent < 60.0:
            connection.rtt = now - pending.sent  # (one Hello only: the ack is its answer)
        if pending.kind is FAR:
            self._far_backoff = self.settings.far_retry_s
            self._next_far = now
        if pending.kind is LEAF and (pending.probe or msg.on_circle):
            # In through a peer on the circle (a joining one could make an island with us).
            # With near connections already made through another leaf, this checks them: the
            # answer names nodes we know, unless we joined an island, which it then ends.
            self._connect(NEAR, self.node_id, via=connection)

    def _on_close(self, msg: w.Close, source: Address) -> None:
        sender = id_from_bytes(msg.sender)
        connection = self._connections.get(sender)
        pending = self._pending.pop(source, None)
        if pending is not None and pending.node_id is not None:
            self._suspects[pending.node_id] = self._now + self.settings.suspect_s
        if connection is not None and connection.address == source:
            try:
                why = CloseReason(msg.reason).name.lower()
            except ValueError:
                why = "other"
            self._drop_connection(connection, f"closed_{why}")
        if msg.entries:
            self._consider(self._decode_entries(msg.entries))

    def _on_ping(self, msg: w.Ping, source: Address) -> None:
        if self._by_address.get(source) == id_from_bytes(msg.sender):
            self._send(w.Pong(self._id, msg.seq, msg.sent), source)
        else:
            self._send(w.Close(self._id, CloseReason.UNKNOWN), source)

    def _on_pong(self, msg: w.Pong, source: Address, now: float) -> None:
        nid = self._by_address.get(source)
        if nid is None or nid != id_from_bytes(msg.sender):
            self._stats["dropped_unexpected_pong"] += 1
            return
        connection = self._connections[nid]
        sample = now - msg.sent
        if 0.0 <= sample < 60.0:
            connection.rtt = (
                sample if connection.rtt is None else 0.875 * connection.rtt + 0.125 * sample
            )

    def _add_connection(
        self, node_id: int, address: Address, address_bytes: bytes, kind: ConnectionKind, now: float
    ) -> _Connection | None:
        """Make or refresh the connection; an existing one moves to ``address`` and keeps the
        stronger kind."""
        other = self._by_address.get(address)
        if other is not None and other != node_id and other in self._connections:
            self._drop_connection(self._connections[other], "replaced")
        connection = self._connections.get(node_id)
        if connection is not None:
            if isinstance(address, Tunnel) and not isinstance(connection.address, Tunnel):
                pass  # a direct connection stays direct (a late tunnel's answer)
            elif connection.address != address:
                if self._by_address.get(connection.address) == node_id:
                    del self._by_address[connection.address]
                connection.address, connection.address_bytes = address, address_bytes
                self._by_address[address] = node_id
            if kind.code > connection.kind.code:
                connection.kind = kind
                self._had_structured |= kind is not LEAF
                self._changed()
            connection.last_heard = now
            return connection
        connection = _Connection(node_id, address, address_bytes, kind, now, now)
        connection.jitter = 1.0 + self.settings.ping_jitter * self._rng.random()
        self._connections[node_id] = connection
        self._known.pop(address, None)
        self._known[address] = None
        if len(self._known) > KNOWN_ADDRESSES:
            del self._known[next(iter(self._known))]
        self._by_address[address] = node_id
        self._suspects.pop(node_id, None)
        self._had_structured |= kind is not LEAF
        self._stats[f"connections_added_{kind.value}"] += 1
        self._events.append(ConnectionAdded(node_id, address, kind))
        self._changed()
        return connection

    def _drop_connection(
        self, connection: _Connection, reason: str, notify: CloseReason | None = None
    ) -> None:
        if self._connections.pop(connection.node_id, None) is None:
            return
        if self._by_address.get(connection.address) == connection.node_id:
            del self._by_address[connection.address]
        if notify is not None:
            self._send(w.Close(self._id, notify), connection.address)
        self._stats[f"connections_removed_{reason}"] += 1
        self._events.append(ConnectionRemoved(connection.node_id, reason))
        self._changed()
        if not isinstance(connection.address, Tunnel):
            # the tunnels through it are gone too (tried again through others when needed)
            for other in list(self._connections.values()):
                if isinstance(other.address, Tunnel) and other.address.relay == connection.address:
                    self._drop_connection(other, "relay_gone")
            for address in [a for a in self._pending if isinstance(a, Tunnel)]:
                if address.relay == connection.address:
                    del self._pending[address]

    def _changed(self) -> None:
        self._circle_cache = None
        self._routing_cache = None
        self._size_cache = None

    def _hello(
        self, address: Address, node_id: int | None, kind: ConnectionKind, *, probe: bool = False
    ) -> None:
        if (
            node_id is not None
            and not isinstance(address, Tunnel)
            and self._unreachable.get(node_id, -math.inf) > self._now
        ):
            # Direct Hellos to this node went unanswered lately while a tunnel reached it:
            # go through a tunnel at once, and do not knock at its address for a while
            # (each knock through a NAT that takes unsolicited packets leaves a stale
            # conntrack entry there, which spoils the node's own punching).
            if self._tunnel_to(node_id, address, kind):
                self._stats["hellos_tunnelled_unreachable"] += 1
                return
        pending = self._pending.get(address)
        if pending is not None:
            if kind.code > pending.kind.code:
                pending.kind = kind
            return
        token = self._rng.getrandbits(32)
        pending = _PendingConnection(
            address, node_id, kind, token, 1, self._now + self.settings.hello_retry_s, probe
        )
        self._pending[address] = pending
        self._send_hello(pending)

    def _send_hello(self, pending: _PendingConnection) -> None:
        try:
            to = self._codec.encode(pending.address)
        except ValueError:
            to = b""
        hello = w.Hello(self._id, pending.kind.code, pending.token, to, self._on_circle())
        pending.sent = self._now
        self._send(hello, pending.address)

    # -- neighbour lists ---------------------------------------------------------------------

    def _on_neighbours(self, msg: w.Neighbours, source: Address) -> None:
        sender = id_from_bytes(msg.sender)
        candidates = self._decode_entries(msg.entries)
        connection = self._connections.get(sender)
        if connection is not None and connection.address == source:
            connection.view = tuple(nid for nid, _ in candidates)
            connection.view_at = self._now
            self._size_cache = None
        self._introduced(msg.entries, sender)
        if sender != self.node_id and (connection is None or connection.kind is LEAF):
            candidates.append((sender, source))
        self._consider(candidates)
        if msg.want_reply:
            self._send(w.Neighbours(self._id, False, self._entries_for(sender)), source)

    def _entries_for(self, target: int) -> tuple[w.Entry, ...]:
        """Our structured connections nearest to target: up to ``neighbour_list_per_side`` on each
        side of it, target itself left out."""
        connections = [lk for lk in self._structured() if lk.node_id != target]
        per_side = self.settings.neighbour_list_per_side
        if len(connections) > 2 * per_side:
            after = sorted(connections, key=lambda lk: clockwise(target, lk.node_id))[:per_side]
            before = sorted(connections, key=lambda lk: clockwise(lk.node_id, target))[:per_side]
            connections = list({id(lk): lk for lk in (*after, *before)}.values())
        return tuple(
            (id_to_bytes(lk.node_id), lk.address_bytes, not isinstance(lk.address, Tunnel))
            for lk in connections
        )

    def _decode_entries(self, entries: tuple[w.Entry, ...]) -> list[tuple[int, Address]]:
        out = []
        for id_bytes, address_bytes, _direct in entries:
            try:
                address = self._codec.decode(address_bytes)
            except ValueError:
                self._stats["dropped_bad_entry"] += 1
                continue
            out.append((id_from_bytes(id_bytes), address))
        return out

    def _consider(self, candidates: list[tuple[int, Address]]) -> None:
        """Connect to each candidate that would be among our nearest ``near_per_side`` on a
        side."""
        now = self._now
        me = self.node_id
        candidates.sort(key=lambda c: circle_distance(c[0], me))
        for nid, address in candidates:
            if nid == me or address in self._own_addresses:
                continue
            connection = self._connections.get(nid)
            if connection is not None and connection.kind is not LEAF:
                continue
            if self._suspects.get(nid, -math.inf) > now:
                continue
            if not self._wants_near(nid):
                continue
            self._hello(connection.address if connection is not None else address, nid, NEAR)

    def _wants_near(self, nid: int) -> bool:
        me = self.node_id
        k = self.settings.near_per_side
        ids = [lk.node_id for lk in self._structured()]
        ids += [
            p.node_id for p in self._pending.values() if p.kind is NEAR and p.node_id is not None
        ]
        if nid in ids:
            return False
        if len(ids) < k:
            return True
        cw = sorted(clockwise(me, i) for i in ids)
        if clockwise(me, nid) < cw[k - 1]:
            return True
        ccw = sorted(clockwise(i, me) for i in ids)
        return clockwise(nid, me) < ccw[k - 1]

    # -- the circle view -----------------------------------------------------------------------

    def _structured(self) -> list[_Connection]:
        if self._routing_cache is None:
            self._routing_cache = [lk for lk in self._connections.values() if lk.kind is not LEAF]
        return self._routing_cache

    def _circle_view(self) -> tuple[list[int], list[int]]:
        """Structured connection ids sorted clockwise (successors) and counter-clockwise."""
        if self._circle_cache is None:
            me = self.node_id
            ids = [lk.node_id for lk in self._structured()]
            succ = sorted(ids, key=lambda i: clockwise(me, i))
            self._circle_cache = (succ, succ[::-1])
        return self._circle_cache

    def _after_input(self, now: float) -> None:
        """Announce a changed near set, and see whether we have joined."""
        if self._state is NodeState.LEFT:
            return
        succ, pred = self._circle_view()
        k = self.settings.near_per_side
        current = (tuple(succ[:k]), tuple(pred[:k]))
        if current != self._announced:
            old = set(self._announced[0]) | set(self._announced[1])
            self._announced = current
            self._near_changed = now
            self._events.append(NeighboursChanged(*current))
            ends = (succ[0], pred[0]) if succ else ()
            for nid in dict.fromkeys((*current[0], *current[1])):
                connection = self._connections[nid]
                want = nid in ends or nid not in old
                self._send(w.Neighbours(self._id, want, self._entries_for(nid)), connection.address)
        if self._state is NodeState.JOINING:
            self._check_joined(now)

    def _check_joined(self, now: float) -> None:
        succ, pred = self._circle_view()
        if not succ:
            return
        s, p = self._connections[succ[0]], self._connections[pred[0]]
        if s.view is None or p.view is None:
            return
        me = self.node_id
        live = [x for x in (*s.view, *p.view) if self._suspects.get(x, -math.inf) <= now]
        if any(nodeid.between(me, x, s.node_id) or nodeid.between(p.node_id, x, me) for x in live):
            return
        self._state = NodeState.JOINED
        self._joined_at = now
        self._next_stabilize = now + self.settings.stabilize_s * (0.5 + self._rng.random())
        self._probe_interval = self.settings.bootstrap_probe_first_s
        self._next_probe = now + self._probe_interval * (0.75 + 0.5 * self._rng.random())
        self._events.append(Joined(me, self.estimated_size()))

    # -- routing -----------------------------------------------------------------------------

    def _on_circle(self) -> bool:
        """Joined, or holding structured connections: this node knows its place on the circle."""
        return self._state is NodeState.JOINED or bool(self._structured())

    def _next_connection(
        self,
        key: int,
        exclude: int | None,
        avoid: Collection[int] = (),
        dead: int | None = None,
    ) -> _Connection | None:
        """The connection to forward to, or None if this node is the closest (if ``exclude`` is
        this node: if there is no connection to forward to).

        A node not on the circle (joining, leaf connections only) sends everything into the
        circle through a leaf peer that is on it, whoever is closer: were it to take a
        message for itself, two joining nodes could make an island. Only with no such
        peer does it route greedily over its leaf connections and itself: two lone nodes (a
        fresh overlay whose bootstrap lists name each other) found a circle that way.

        A connection whose ping has gone unanswered for ``suspect_after_s`` is passed over: if
        no other connection is closer than this node, this node is taken as the closest. Connections
        in ``avoid`` are passed over too, but taken when no other connection is closer than this
        node (a retry around a hop that may have crashed). The connection ``dead`` (one that let
        a message it was given go unacknowledged) is passed over like a suspect one."""
        connection = self._connections.get(key)
        if connection is not None and key != exclude and key not in avoid and key != dead:
            return connection
        best: _Connection | None = None
        candidates = self._structured()
        if not candidates and self._state is not NodeState.JOINED:
            connections = [lk for lk in self._connections.values() if lk.node_id != exclude]
            entry = [lk for lk in connections if lk.on_circle]
            if entry:
                return min(entry, key=lambda lk: (circle_distance(lk.node_id, key), lk.node_id))
            candidates = connections
        if exclude == self.node_id:
            best_d, best_id = nodeid.SIZE, -1
        else:
            best_d, best_id = circle_distance(self.node_id, key), self.node_id
        # A connection whose ping has gone unanswered for suspect_after_s is probably dead: route
        # around it, and deliver here if it is the only connection closer than this node.
        cutoff = self._now - self.settings.suspect_after_s
        suspect: _Connection | None = None
        suspect_d, suspect_id = best_d, best_id
        avoided: _Connection | None = None
        avoided_d, avoided_id = best_d, best_id
        for connection in candidates:
            nid = connection.node_id
            if nid == exclude:
                continue
            d = (nid - key) & nodeid.MASK
            if d > nodeid.HALF:
                d = nodeid.SIZE - d
            if d < best_d or (d == best_d and nid < best_id):
                if nid == dead or connection.last_heard < connection.ping_since <= cutoff:
                    if d < suspect_d or (d == suspect_d and nid < suspect_id):
                        suspect, suspect_d, suspect_id = connection, d, nid
                    continue
                if nid in avoid:
                    if d < avoided_d or (d == avoided_d and nid < avoided_id):
                        avoided, avoided_d, avoided_id = connection, d, nid
                    continue
                best, best_d, best_id = connection, d, nid
        if best is None and avoided is not None:
            return avoided  # only an avoided connection is closer than this node: take it anyway
        if best is None and suspect is not None and exclude != self.node_id:
            # Only a suspect connection is closer than this node: it has probably crashed, and
            # this node is then the closest live one (the delivery is at worst premature).
            self._stats["suspect_passed_over"] += 1
            return None
        if best is None and suspect is not None and suspect.node_id == dead:
            return None
        return best if best is not None else suspect

    def _route(
        self,
        msg: w.Routed,
        dest: int,
        exclude: int | None,
        avoid: Collection[int] = (),
        dead: int | None = None,
    ) -> None:
        connection = self._next_connection(dest, exclude, avoid, dead)
        if connection is None:
            if exclude == self.node_id:
                self._stats["route_failed_no_route"] += 1
                self._fail(msg, "no_route")
            else:
                self._deliver(msg, dest)
            return
        if msg.hops >= msg.ttl:
            self._stats["dropped_ttl"] += 1
            self._fail(msg, "ttl")
            return
        self._stats["forwarded"] += 1
        if (
            isinstance(msg, w.ConnectRequest)
            and msg.src != self._id  # the requester is the route's end anyway
            and len(msg.path) < w.MAX_PATH
        ):
            forwarded: w.Routed = msgspec.structs.replace(
                msg, hops=msg.hops + 1, path=(*msg.path, self._id)
            )
        else:
            forwarded = msgspec.structs.replace(msg, hops=msg.hops + 1)
        self._send(forwarded, connection.address)
        now = self._now
        st = self.settings
        if now - connection.last_heard <= st.use_ping_after_s:
            return
        if now - connection.last_ping >= st.ping_retry_s:
            self._stats["pings_on_use"] += 1
            self._ping(connection, now)
        if isinstance(msg, w.Data):
            keep = not (msg.exact and connection.node_id == dest)
        else:
            keep = isinstance(msg, w.ConnectRequest) and msg.kind == NEAR.code
        if keep and len(self._held) < HELD_MAX and isinstance(msg, w.Data | w.ConnectRequest):
            # Keep it until the connection shows a sign of life: if the ping goes unanswered
            # (the next hop has crashed), send it around the connection (_reroute). Not when
            # the connection is the node it is for: there is no way around that one. A near
            # ConnectRequest too: a joiner's, to its own id, ends at the node that was
            # closest to it, and that may be one that crashed just before (a restart).
            self._held_seq += 1
            held = _Held(connection.node_id, now, msg, dest)
            heapq.heappush(self._held, (now + st.suspect_after_s, self._held_seq, held))

    def _reroute(self, now: float) -> None:
        """Messages forwarded over connections that have stayed silent since (a crashed next
        hop, most likely) go again, around the connection."""
        due: list[_Held] = []
        while self._held and self._held[0][0] <= now:
            due.append(heapq.heappop(self._held)[2])
        for held in due:
            connection = self._connections.get(held.connection)
            if connection is not None and connection.last_heard >= held.sent:
                continue  # it answered: it got the message
            self._stats["rerouted"] += 1
            msg = held.msg
            exclude = id_from_bytes(msg.src) if isinstance(msg, w.ConnectRequest) else None
            self._route(msg, held.dest, exclude, dead=held.connection)

    def _route_in(self, msg: w.Routed) -> None:
        dest = id_from_bytes(msg.dest)
        exclude = id_from_bytes(msg.src) if isinstance(msg, w.ConnectRequest) else None
        self._route(msg, dest, exclude)

    def _deliver(self, msg: w.Routed, dest: int) -> None:
        if isinstance(msg, w.Data):
            if msg.exact and dest != self.node_id:
                self._fail(msg, "no_such_node")
                return
            self._stats["delivered"] += 1
            src = id_from_bytes(msg.src)
            self._events.append(
                Delivered(src, dest, msg.payload, msg.hops, msg.message_id, msg.exact)
            )
        elif isinstance(msg, w.ConnectRequest):
            self._answer_connect(msg)
        elif dest == self.node_id and msg.reason == TUNNEL_BROKEN:
            self._on_tunnel_broken(msg)
        elif dest == self.node_id:
            self._stats[f"route_failed_{msg.reason}"] += 1
            self._events.append(RouteFailed(msg.message_id, id_from_bytes(msg.key), msg.reason))
        else:
            self._stats["dropped_route_error_undeliverable"] += 1

    def _on_tunnel_broken(self, msg: w.RouteError) -> None:
        """Our relay to ``msg.key`` says it reaches that node directly no more: the tunnel
        through it is dropped (believed only from that relay itself, straight from it), so
        the node is reached another way (a tunnel through another relay, or routing around
        it) instead of after its pings through this one have gone unanswered."""
        far = id_from_bytes(msg.key)
        relay = self._arrived_from
        if relay is None or self._by_address.get(relay) != id_from_bytes(msg.src):
            self._stats["dropped_tunnel_broken_not_from_relay"] += 1
            return
        matched = False
        for address in [a for a in self._pending if isinstance(a, Tunnel)]:
            if address.relay == relay and address.node_id == far:  # a Hello on its way
                del self._pending[address]
                matched = True
        connection = self._connections.get(far)
        if (
            connection is not None
            and isinstance(connection.address, Tunnel)
            and connection.address.relay == relay
        ):
            self._drop_connection(connection, TUNNEL_BROKEN)
            matched = True
        if not matched:
            self._stats["dropped_tunnel_broken_unmatched"] += 1

    def _fail(self, msg: w.Routed, reason: str) -> None:
        """Tell the sender of a Data message that it was not delivered."""
        if not isinstance(msg, w.Data):
            return
        if msg.src == self._id:
            self._stats[f"route_failed_{reason}"] += 1
            self._events.append(RouteFailed(msg.message_id, id_from_bytes(msg.dest), reason))
            return
        error = w.RouteError(
            self._id, msg.src, 0, self.settings.max_hops, msg.message_id, msg.dest, reason
        )
        self._route(error, id_from_bytes(msg.src), None)

    def _send_data(
        self, key: int, payload: bytes, now: float, *, exact: bool, avoid: Collection[int] = ()
    ) -> int:
        self._now = now
        self._message_id += 1
        message_id = self._message_id
        if len(payload) > w.MAX_PAYLOAD:
            raise ValueError(f"a payload is at most {w.MAX_PAYLOAD} bytes, got {len(payload)}")
        if self._state is NodeState.LEFT:
            self._events.append(RouteFailed(message_id, key, "left"))
            return message_id
        self._ensure_started(now)
        msg = w.Data(
            self._id, id_to_bytes(key), exact, 0, self.settings.max_hops, message_id, payload
        )
        self._route(msg, key, None, avoid)
        self._after_input(now)
        return message_id

    # -- connect requests --------------------------------------------------------------------

    def _connect(
        self, kind: ConnectionKind, target: int, *, via: _Connection | None = None
    ) -> None:
        if self._address is None:
            self._stats["connect_without_address"] += 1
            return
        token = self._rng.getrandbits(32)
        msg = w.ConnectRequest(
            self._id,
            id_to_bytes(target),
            0,
            self.settings.max_hops,
            kind.code,
            token,
            self._address_bytes,
        )
        self._connects[token] = _PendingConnect(
            kind, target, self._now + self.settings.connect_timeout_s
        )
        self._stats[f"connects_{kind.value}"] += 1
        if via is not None:
            self._send(msgspec.structs.replace(msg, hops=1), via.address)
        else:
            self._route(msg, target, self.node_id)

    def _answer_connect(self, msg: w.ConnectRequest) -> None:
        """Answer back along the request's path, over connections (a requester behind a
        filtering NAT hears nothing from a node it did not speak to first); straight to the
        requester's address only if the path is broken here."""
        src = id_from_bytes(msg.src)
        if src == self.node_id:
            return
        entries = self._entries_for(src) if msg.kind == NEAR.code else ()
        self._stats["connects_answered"] += 1
        route = (*reversed(msg.path), msg.src)
        # the first node of the way back we hold a connection to (the path is a few seconds
        # old, and a re-routed request's last hop may have trimmed the one it came over)
        at, first = next(
            (
                (i, c)
                for i, hop in enumerate(route)
                if (c := self._connections.get(id_from_bytes(hop))) is not None
            ),
            (0, None),
        )
        reply = w.ConnectReply(
            self._id, msg.kind, msg.token, entries, self._id, self._address_bytes, route[at + 1 :]
        )
        if first is not None:
            if at:
                self._stats["connect_replies_skipped_ahead"] += 1
            self._send(reply, first.address)
        elif not msg.path and self._arrived_from is not None:
            # Straight from its requester (a probe through a bootstrap address, no
            # connection yet): back to where it came from, never to the address it names.
            self._stats["connect_replies_direct"] += 1
            self._send(msgspec.structs.replace(reply, route=()), self._arrived_from)
        else:
            # The way back is broken. The address in the request is only what its sender
            # claims: a reply there would aim our datagrams (and a link's handshake) wherever
            # a member likes. The requester tries again.
            self._stats["connect_replies_unroutable"] += 1

    def _pass_reply_on(self, msg: w.ConnectReply) -> None:
        """A ConnectReply going back along its request's path: on to the next hop, or to a
        later one of the path if this node has lost its connection to the next (trimmed
        meanwhile: the path is a few seconds old)."""
        at, nxt = next(
            (
                (i, c)
                for i, hop in enumerate(msg.route)
                if (c := self._connections.get(id_from_bytes(hop))) is not None
            ),
            (0, None),
        )
        if nxt is None:
            self._stats["dropped_reply_no_route"] += 1
            return
        if at:
            self._stats["connect_replies_skipped_ahead"] += 1
        self._stats["connect_replies_passed"] += 1
        forwarded = msgspec.structs.replace(msg, sender=self._id, route=msg.route[at + 1 :])
        self._send(forwarded, nxt.address)

    def _on_connect_reply(self, msg: w.ConnectReply, source: Address, now: float) -> None:
        if msg.route:
            self._pass_reply_on(msg)
            return
        pending = self._connects.pop(msg.token, None)
        if pending is None:
            self._stats["dropped_stale_connect_reply"] += 1
            return
        sender = id_from_bytes(msg.responder)
        if sender == self.node_id:
            return
        if msg.sender != msg.responder and msg.address:
            source = self._decode_address(msg.address)  # it came back along the path
        if pending.kind is NEAR:
            candidates = self._decode_entries(msg.entries)
            self._introduced(msg.entries, sender)
            candidates.append((sender, source))
            self._consider(candidates)
            return
        connection = self._connections.get(sender)
        if connection is not None and connection.kind is not LEAF:
            self._stats["far_redundant"] += 1
            self._next_far = now
        else:
            self._hello(source, sender, FAR)

    # -- the heartbeat -----------------------------------------------------------------------

    def _ensure_started(self, now: float) -> None:
        if self._state is not NodeState.IDLE:
            return
        self._next_tick = now
        if self._bootstrap:
            self._state = NodeState.JOINING
        else:
            self._state = NodeState.JOINED
            self._joined_at = now
            self._events.append(Joined(self.node_id, 1))

    def _tick(self, now: float) -> None:
        self._retry_hellos(now)
        for token, connect in list(self._connects.items()):
            if now >= connect.deadline:
                del self._connects[token]
                self._stats[f"connect_timeouts_{connect.kind.value}"] += 1
                if connect.kind is FAR:
                    self._far_failed(now)
        self._check_liveness(now)
        structured = self._structured()
        if self._state is NodeState.JOINED and not structured and self._had_structured:
            self._state = NodeState.JOINING  # alone again: join anew
            self._stats["rejoins"] += 1
        if self._state is NodeState.JOINING:
            self._join_step(now)
        elif self._state is NodeState.JOINED:
            if now >= self._next_stabilize:
                self._next_stabilize = now + self.settings.stabilize_s * (
                    0.75 + 0.5 * self._rng.random()
                )
                self._ask_neighbours(periodic=True)
            self._grow_far(now)
            self._trim(now)
            self._probe(now)

    def _retry_hellos(self, now: float) -> None:
        st = self.settings
        for address, pending in list(self._pending.items()):
            if now < pending.next_try:
                continue
            held = self._connections.get(pending.node_id) if pending.node_id is not None else None
            if (
                held is not None
                and held.address != address
                and not isinstance(held.address, Tunnel)
            ):
                # connected directly meanwhile, from another address (its NAT mapped it to
                # another port for us): knocking on goes nowhere, and where the NAT keeps
                # unsolicited packets it leaves stale entries there that spoil punching
                del self._pending[address]
                self._stats["hellos_superseded"] += 1
                continue
            if pending.tries == TUNNEL_AFTER_TRIES:
                self._tunnel_instead(pending)  # and go on trying directly: the first wins
            if pending.tries >= st.hello_tries:
                del self._pending[address]
                self._stats["hello_failed"] += 1
                nid = pending.node_id
                if nid is not None and isinstance(address, Tunnel):
                    self._unreachable.pop(nid, None)  # no way through: knock directly again
                if nid is not None and (nid in self._connections or self._tunnelling(nid)):
                    held = self._connections.get(nid)
                    through = held is not None and isinstance(held.address, Tunnel)
                    if not isinstance(address, Tunnel) and (through or self._tunnelling(nid)):
                        # direct failed where a tunnel works (or is on its way): a NAT
                        self._unreachable[nid] = now + st.unreachable_s
                    continue
                if pending.node_id is not None:
                    self._suspects[pending.node_id] = now + st.suspect_s
                if pending.kind is FAR:
                    self._far_failed(now)
                continue
            pending.tries += 1
            pending.next_try = now + st.hello_retry_s
            self._send_hello(pending)

    def _tunnel_instead(self, pending: _PendingConnection) -> bool:
        """Hellos to a near candidate go unanswered (it sits behind a NAT or firewall we
        cannot cross): try through the node that named it to us too, if we reach that one
        directly (a tunnel). True if a tunnel Hello went out."""
        nid = pending.node_id
        if nid is None or isinstance(pending.address, Tunnel):
            return False
        return self._tunnel_to(nid, pending.address, pending.kind)

    def _tunnel_to(self, nid: int, address: Address, kind: ConnectionKind) -> bool:
        held = self._connections.get(nid)
        if kind is LEAF or (held is not None and not isinstance(held.address, Tunnel)):
            return False  # (a direct connection is never traded for a tunnel)
        relay_id = self._introducers.get(nid)
        relay = self._connections.get(relay_id) if relay_id is not None else None
        if relay is None or relay_id == nid or isinstance(relay.address, Tunnel):
            return False
        seen = self._codec_encode_or_empty(address)
        self._stats["tunnels_tried"] += 1
        self._hello(Tunnel(relay.address, nid, seen), nid, kind)
        return True

    def _tunnelling(self, nid: int) -> bool:
        return any(isinstance(a, Tunnel) and a.node_id == nid for a in self._pending)

    def _introduced(self, entries: tuple[w.Entry, ...], relay: int) -> None:
        """Node ``relay`` named these nodes to us, and reaches those marked direct: if we
        reach it directly, it can be their relay should we fail to reach them."""
        for id_bytes, _, direct in entries:
            if not direct:
                continue
            nid = id_from_bytes(id_bytes)
            if nid != relay and nid != self.node_id:
                self._introducers.pop(nid, None)
                self._introducers[nid] = relay
        while len(self._introducers) > INTRODUCERS_MAX:
            del self._introducers[next(iter(self._introducers))]

    def _check_liveness(self, now: float) -> None:
        st = self.settings
        succ, pred = self.neighbours()
        close = {*succ, *pred}
        for connection in list(self._connections.values()):
            silent = now - connection.last_heard
            if connection.kind is LEAF or connection.node_id in close:
                ping_after, dead_after = st.ping_after_s, st.dead_after_s
            else:
                ping_after, dead_after = st.far_ping_after_s, st.far_dead_after_s
            # a ping is out, unanswered (``ping_since`` is infinite before the first one)
            pinging = connection.last_heard < connection.ping_since < math.inf
            unanswered = pinging and connection.ping_since <= now - st.unanswered_dead_s
            if silent > dead_after or unanswered:
                self._drop_connection(connection, "timeout")
            elif (
                # a ping on use or verify is retried too: one lost pong is no death
                (pinging or silent > ping_after * connection.jitter)
                and now - connection.last_ping >= st.ping_retry_s
            ):
                self._ping(connection, now)
        if len(self._suspects) > 64:
            self._suspects = {n: t for n, t in self._suspects.items() if t > now}
        if len(self._unreachable) > 1024:
            self._unreachable = {n: t for n, t in self._unreachable.items() if t > now}

    def _ping(self, connection: _Connection, now: float) -> None:
        if connection.last_heard >= connection.ping_since or connection.ping_since == math.inf:
            connection.ping_since = now
            # wake up when it turns suspect, were it still unanswered then
            heapq.heappush(self._suspect_due, now + self.settings.suspect_after_s)
        connection.last_ping = now
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF_FFFF
        self._stats["pings"] += 1
        self._send(w.Ping(self._id, self._ping_seq, now), connection.address)

    def _join_step(self, now: float) -> None:
        if not self._connections and not self._pending:
            if now < self._next_bootstrap:
                return
            candidates = [a for a in self._bootstrap if a not in self._own_addresses]
            if self._joined_at is not None:  # cut off after joining: peers we knew help too
                candidates += [a for a in self._known if a not in candidates]
            if not candidates:
                return
            for _ in range(min(self.settings.bootstrap_fanout, len(candidates))):
                if not self._bootstrap_queue:
                    self._bootstrap_queue = list(candidates)
                    self._rng.shuffle(self._bootstrap_queue)
                self._hello(self._bootstrap_queue.pop(), None, LEAF)
            self._next_bootstrap = now + self._bootstrap_backoff
            self._bootstrap_backoff = min(
                2 * self._bootstrap_backoff, self.settings.bootstrap_retry_max_s
            )
            return
        if not self._structured():
            if self._connections and not any(c.kind is NEAR for c in self._connects.values()):
                leaves = list(self._connections.values())
                entry = [lk for lk in leaves if lk.on_circle] or leaves
                self._connect(NEAR, self.node_id, via=self._rng.choice(entry))
            return
        self._bootstrap_backoff = self.settings.bootstrap_retry_s
        self._ask_neighbours()

    def _ask_neighbours(self, *, periodic: bool = False) -> None:
        """Exchange neighbour lists with the nearest node on each side; periodically, not
        with one whose list came lately (it asked us: one exchange a pair is enough)."""
        succ, pred = self._circle_view()
        fresh = self._now - 0.75 * self.settings.stabilize_s
        for nid in dict.fromkeys(succ[:1] + pred[:1]):
            connection = self._connections[nid]
            if periodic and connection.view_at > fresh:
                self._stats["stabilize_skipped"] += 1
                continue
            self._send(w.Neighbours(self._id, True, self._entries_for(nid)), connection.address)

    def _far_target(self) -> int:
        size = self.estimated_size()
        if size <= self.settings.shortcut_min_size:
            return 0
        return math.ceil(self.settings.shortcut_factor * math.log2(size))

    def _far_connections(self) -> list[_Connection]:
        succ, pred = self.neighbours()
        near = {*succ, *pred}
        return [lk for lk in self._structured() if lk.kind is FAR and lk.node_id not in near]

    def _grow_far(self, now: float) -> None:
        if now < self._next_far:
            return
        if any(c.kind is FAR for c in self._connects.values()):
            return
        if any(p.kind is FAR for p in self._pending.values()):
            return
        if len(self._far_connections()) >= self._far_target():
            return
        log_n = math.log2(self.estimated_size())
        exponent = (nodeid.BITS - 1) - (1.0 - self._rng.random()) * (log_n - 1)
        d = min(int(2.0**exponent), nodeid.HALF)
        target = (self.node_id + d if self._rng.random() < 0.5 else self.node_id - d) & nodeid.MASK
        self._next_far = now + self.settings.tick_s
        self._connect(FAR, target)

    def _far_failed(self, now: float) -> None:
        self._next_far = now + self._far_backoff
        self._far_backoff = min(2 * self._far_backoff, self.settings.far_retry_max_s)

    def _trim(self, now: float) -> None:
        st = self.settings
        if self._joined_at is not None and now - self._joined_at > st.leaf_linger_s:
            for connection in list(self._connections.values()):
                if connection.kind is LEAF and now - connection.since > st.leaf_linger_s:
                    self._drop_connection(connection, "trim_leaf", CloseReason.TRIM)
        far = self._far_connections()
        if len(far) > 2 * self._far_target():
            self._drop_connection(self._rng.choice(far), "trim_far", CloseReason.TRIM)
        if now - self._near_changed < st.trim_quiet_s:
            return
        succ, pred = self._circle_view()
        keep = {*succ[: st.near_keep_per_side], *pred[: st.near_keep_per_side]}
        # (a connection a tunnel runs over is kept while the tunnel is used: trimming it
        # would cut the tunnel, and its ends would find out only when their pings failed)
        extra = [
            lk
            for lk in self._structured()
            if lk.kind is NEAR and lk.node_id not in keep and now - lk.relayed_at > st.dead_after_s
        ]
        if extra:
            me = self.node_id
            farthest = max(extra, key=lambda lk: circle_distance(lk.node_id, me))
            self._drop_connection(farthest, "trim_near", CloseReason.TRIM)

    def _probe(self, now: float) -> None:
        """Re-join through a bootstrap address now and then (soon after joining, then ever
        less often): this merges circles made at once by nodes that started together, or
        on both sides of a partition. A bootstrap node we have no connection to is preferred."""
        st = self.settings
        if not st.bootstrap_probe_s or now < self._next_probe:
            return
        self._probe_interval = min(2 * self._probe_interval, st.bootstrap_probe_s)
        self._next_probe = now + self._probe_interval * (0.75 + 0.5 * self._rng.random())
        candidates = [a for a in self._bootstrap if a not in self._own_addresses]
        unconnected = [a for a in candidates if a not in self._by_address]
        if not candidates:
            return
        address = self._rng.choice(unconnected or candidates)
        self._stats["probes"] += 1
        nid = self._by_address.get(address)
        if nid is not None:
            self._connect(NEAR, self.node_id, via=self._connections[nid])
        else:
            self._hello(address, None, LEAF, probe=True)

    # -- helpers -----------------------------------------------------------------------------

    def _send(self, msg: w.Message, address: Address) -> None:
        data = w.encode(msg)
        if isinstance(address, Tunnel):
            # through the relay: wrapped for the node, sent to the relay's address
            self._stats[_SENT[type(msg)]] += 1
            relay = self._connections.get(self._by_address.get(address.relay, -1))
            if relay is not None:
                relay.relayed_at = self._now
            msg = w.Forward(self._id, self._id, b"", id_to_bytes(address.node_id), data)
            data = w.encode(msg)
            address = address.relay
        self._out.append((data, address))
        self._stats[_SENT[type(msg)]] += 1
        self._stats["bytes_sent"] += len(data)

    def _learn_address(self, data: bytes) -> None:
        if not data:
            return
        try:
            address = self._codec.decode(data)
        except ValueError:
            self._stats["dropped_bad_own_address"] += 1
            return
        self._address, self._address_bytes = address, data
        self._remember_own(address)

    def _remember_own(self, address: Address) -> None:
        """An address that reaches this node (never a candidate to connect to)."""
        self._own_addresses.pop(address, None)
        self._own_addresses[address] = None
        if len(self._own_addresses) > OWN_ADDRESSES:
            del self._own_addresses[next(iter(self._own_addresses))]

    def _decode_address(self, data: bytes) -> Address:
        try:
            return self._codec.decode(data)
        except ValueError:
            raise RemoteProtocolError("bad_address") from None

    def _encode_address(self, address: Address) -> bytes:
        if isinstance(address, Tunnel):
            return address.address_bytes  # where the relay sees the node ("" if unknown)
        try:
            return self._codec.encode(address)
        except ValueError:
            raise RemoteProtocolError("unencodable_source") from None
