"""Routing: links, the overlay, its DHT and the routes of the virtual network they give, as
one sans-I/O object. Pure. The layer under ``Addressing``; ``ControlCore`` (core.py) owns
both.

Theory of operation:

- **Links carry the overlay.** The overlay core (``overlay.OverlayNode``) names its peers
  by underlay endpoint. A message it sends to an endpoint goes out on the authenticated
  link (``links.LinkManager``) at that endpoint, as an OVERLAY payload sealed by
  overlay_io. Where there is no link yet (a bootstrap address, a node named in a neighbour
  list) this core asks the link manager for one (Noise XX: whoever answers must hold a
  certificate of this network) and holds the overlay's messages for that endpoint until
  the link is up (at most ``QUEUE_PER_ENDPOINT`` of them, for ``QUEUE_S``). Those go again
  ``FRESH_RESEND_S`` after the link came up unless the peer has spoken on it meanwhile: a
  fresh session's first datagrams race its keys into overlay_io on both sides (the peer's
  overlay_io opens them only once its control has read our last handshake message and
  passed the keys on; ours gets the keys over ZeroMQ, the message through a ring), and the
  one that loses is dropped; without this a joining node's first Hello waited a second for
  the overlay's retry. An overlay_io worker that (re)started gets the keys only when its
  request reaches control, at the node's start up to 0.1 s after the first link came up:
  the resends then count from that moment (``restart_fresh``). Any certified member may
  link to us. A message that arrives on a link is handed to the overlay with the link's
  endpoint as its source, and only if the sender id it claims is the node id the link
  authenticated (the overlay core trusts those ids).
- **Link lifetimes follow the overlay.** A link the overlay adds is kept (rekeyed) from
  this side; one it trims is released (it expires unless the peer keeps it, or a route
  uses it); one it finds dead is closed at once, so data stops going into the void, and
  the routes to its node are dropped (the next packet resolves again).
- **Relay hops.** overlay_io relays over direct links but the overlay's suspect
  connections (``relay_hops``); when it relays over one and hears nothing back
  (``hop_silent``) the overlay pings that node (a link that is no overlay connection gets
  a ping from the layer above), so a crashed relay is out of the hops a second after its
  ping went unanswered and its connection closed a few seconds later, not after the idle
  timers' 15 to 50 s.
- **Relayed links.** A node with no direct link is reached by a handshake routed through
  the overlay to its node id (``Data`` payloads tagged ``H``; ``links.Via``): its sessions
  are end to end, and overlay_io relays their datagrams greedily over direct links (a
  relay opens only the hop layer).
- **Addresses and routes.** Once on the circle (its first near connection: it need not
  wait for ``Joined``, see the DHT), the node creates the DHT record
  ``ip:<namespace>:<address>`` naming its node id (renewed by the DHT before its lease
  ends). A frame to an address without a route is a *miss* (from the classifier): a DHT
  get of that key, a record whose signer hashes to the node id inside it (else it is a
  forgery, dropped), then a link to that node (direct if one exists, else relayed) and a
  route. Routes are re-checked every ``ROUTE_REFRESH_S`` (a moved or released address is
  followed) and an address that resolved to nothing is not asked again for
  ``NEGATIVE_S``.
- **Bounded work per member.** A message that makes the overlay speak to an endpoint with no
  link yet costs a handshake; one member's messages may keep at most ``MEMBER_LINKS`` such
  endpoints waiting at once (the rest are counted refusals, ``links_refused_member_limit``),
  and the overlay never answers at an address a message merely names (overlay/node.py).
  Held messages are indexed: a link that comes up is looked up by endpoint once per change
  of the sessions, never by scanning the links per message, and held messages expire
  through a heap, so a message costs the same with 5,000 endpoints waiting as with none.
  At most ``RESOLVING_MAX`` address resolutions run at once (``resolves_refused_busy``).

Inputs: ``receive_overlay(slot, payload, now, wall)``, ``receive_handshake(datagram, source,
now, wall)``, ``handle_timer(now, wall)``, ``route_miss(address, now, wall)``,
``dht_get(key, now)``; the layer above makes DHT requests on ``dht`` and calls ``pump()``.
Outputs: ``overlay_to_send()`` (slot, payload), ``handshakes_to_send()`` (datagram,
endpoint), ``events()`` (typed log events: links, overlay, address record, routes),
``dht_results()`` (the DHT results this layer did not take), ``routes()`` and
``routes_version``; the link manager's sessions.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from typing import Any

import msgspec

from pipeline.control import crawl
from pipeline.control import events as ev
from pipeline.control.dht import Dht, DhtEvent, DhtSettings, GetResult
from pipeline.control.dht.authority import RecordAuthority
from pipeline.control.dht.events import CreateResult, LeaseLost
from pipeline.control.links import (
    Address,
    EventKind,
    LinkEvent,
    LinkManager,
    LinkSettings,
    PeerSpec,
    Via,
)
from pipeline.control.overlay import (
    ConnectionAdded,
    ConnectionRemoved,
    Delivered,
    Joined,
    NeighboursChanged,
    OverlayEvent,
    OverlayNode,
    OverlaySettings,
)
from pipeline.control.overlay import wire as ow
from pipeline.control.shortcuts import (
    POOL_SOCKETS,
    SPRAY_PROBES,
    Candidate,
    CandidateKind,
    PathFound,
    PathLost,
    PathMessage,
    RelayChosen,
    Shortcuts,
)
from pipeline.crypto.cert import Certificate, RevocationList
from pipeline.crypto.identity import Identity
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import id_from_bytes, id_to_bytes

HANDSHAKE_TAG = b"H"  # an overlay Data payload that carries a handshake datagram
QUEUE_PER_ENDPOINT = 16
QUEUE_S = 6.0
# a new link's first messages go again this long after it came up, unless answered
FRESH_RESEND_S = (0.03, 0.1, 0.4)
ROUTE_REFRESH_S = 30.0
NEGATIVE_S = 3.0
REGISTER_RETRY_S = 5.0
MAX_PUMP_ROUNDS = 16
LINKS_QUEUE = 256  # crawl messages held for the layer above between two of its looks
MEMBER_LINKS = 8  # endpoints without a link yet that one member's messages may make us try at once
RESOLVING_MAX = 256  # DHT gets for addresses under way at once
UNKNOWN_RTT_S = 1.0  # a relay offered before its first pong counts as this slow
NAMED_MAX = 4096  # endpoints remembered with the member whose message first named them


class Route(msgspec.Struct):
    address: IPv4Address
    node_id: bytes
    name: str
    since: float
    checked: float


class RouteEntry(msgspec.Struct, frozen=True):
    """One route as the classifier and overlay_io get it."""

    slot: int
    name: str
    addresses: tuple[str, ...]
    endpoint: str  # "host:port", or "via:<node id>" for a relayed link
    up: bool


class RoutingCore:
    def __init__(
        self,
        *,
        identity: Identity,
        certificate: Certificate,
        ca: Certificate,
        namespace: str,
        address: IPv4Address | None,
        peers: Sequence[PeerSpec],
        bootstrap: Sequence[Address],
        revoked: RevocationList,
        rng: random.Random,
        entropy: Callable[[int], bytes],
        link_settings: LinkSettings | None = None,
        overlay_settings: OverlaySettings | None = None,
        dht_settings: DhtSettings | None = None,
        lease_s: float = 300.0,
        register_address: bool = True,
        networks: Sequence[str] = (),
        shortcuts: bool = True,
        pool_sockets: int = POOL_SOCKETS,
        spray_probes: int = SPRAY_PROBES,
    ) -> None:
        self.identity = identity
        self.namespace = namespace
        self.address = address
        self.lease_s = lease_s
        self.register_address = register_address  # False: DHCP claims the address records
        self.links = LinkManager(
            identity=identity,
            certificate=certificate,
            ca=ca,
            network=namespace,
            peers=peers,
            revoked=revoked,
            rng=entropy,
            settings=link_settings or LinkSettings(),
            accept_members=True,
            networks=networks,
        )
        self.overlay_id = id_from_bytes(identity.node_id)
        seeds = list(dict.fromkeys([*bootstrap, *(p.endpoint for p in peers)]))
        self.overlay = OverlayNode(
            self.overlay_id,
            rng=random.Random(rng.getrandbits(64)),
            settings=overlay_settings or OverlaySettings(),
            bootstrap=seeds,
        )
        self._wall = 0.0
        authority = RecordAuthority(ca, lambda: self.links.revoked, lambda: self._wall)
        self.dht = Dht(
            self.overlay,
            identity,
            rng=random.Random(rng.getrandbits(64)),
            settings=dht_settings or DhtSettings(),
            certificate=certificate.encode(),
            authority=authority.check,
        )
        self.shortcuts = Shortcuts(
            identity.node_id,
            random.Random(rng.getrandbits(64)),
            pool_sockets=pool_sockets,
            spray_probes=spray_probes,
        )
        self._shortcuts_on = shortcuts
        self._local_endpoints: tuple[Address, ...] = ()
        self._mapping_varies = False  # the NAT maps per destination: no reflexive candidate
        self._public_ip: str | None = None  # then, where STUN sees the node
        self._extra_candidates: tuple[Candidate, ...] = ()
        self._candidates_from: tuple[object, ...] = ()
        self.counters: Counter[str] = Counter()
        self.routes_version = 0
        self._routes: dict[IPv4Address, Route] = {}
        self._resolving: dict[int, IPv4Address] = {}
        self._negative: dict[IPv4Address, float] = {}
        self._waiting: dict[Address, deque[tuple[float, bytes]]] = {}
        self._waiting_slot: dict[Address, int] = {}  # the link asked for at a waiting endpoint
        self._waiting_due: list[tuple[float, Address]] = []  # heap: (oldest message, endpoint)
        self._asked_by: dict[Address, bytes] = {}  # waiting endpoint -> the member who caused it
        self._asks: Counter[bytes] = Counter()  # member -> its waiting endpoints
        self._cause: bytes | None = None  # the member whose message is being handled
        # endpoint -> the member whose message first made us speak to it, until a link there
        # comes up: the overlay's later retries still count against that member
        self._named_by: OrderedDict[Address, bytes] = OrderedDict()
        self._ready: dict[Address, int] = {}  # endpoint -> slot of a link with a confirmed session
        self._ready_version = -1  # the sessions version ``_ready`` was built from
        self._flushed_version = -1  # the sessions version waiting messages were last flushed at
        # slot -> (when its link came up, resends made, the messages that waited for it), until
        # the peer speaks on it or the resends of FRESH_RESEND_S are made
        self._fresh: dict[int, tuple[float, int, list[bytes]]] = {}
        self._resolving_addresses: set[IPv4Address] = set()
        self._overlay_out: list[tuple[int, bytes]] = []
        self._handshakes_out: list[tuple[bytes, Address]] = []
        self._probes_out: list[tuple[int, Address, bytes]] = []
        self._pools_out: list[tuple[int, Address | None, bytes]] = []
        self._events: list[ev.LogEvent] = []
        self._dht_results: list[DhtEvent] = []
        self._links_in: list[tuple[bytes, bytes]] = []  # (source node id, crawl payload)
        self._registration: int | None = None  # request id of the address record's create
        self.registered = False
        self._register_at: float | None = None
        self._joined = False
        self._now = 0.0
        self._wall = 0.0

    # -- outputs ---------------------------------------------------------------------------------

    def overlay_to_send(self) -> list[tuple[int, bytes]]:
        out, self._overlay_out = self._overlay_out, []
        return out

    def handshakes_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._handshakes_out = self._handshakes_out, []
        return out

    def probes_to_send(self) -> list[tuple[int, Address, bytes]]:
        """(slot, endpoint, payload): PROBE datagrams to seal with the link's session and
        send to that endpoint (not the link's own): shortcut probes and path keepalives."""
        out, self._probes_out = self._probes_out, []
        return out

    def pools_to_send(self) -> list[tuple[int, Address | None, bytes]]:
        """(slot, endpoint, payload): a PROBE payload for overlay_io to seal with link
        ``slot``'s session and send from every socket of the link's pool (birthday
        probing: opened at the first) to ``endpoint``; (slot, None, b""): close the pool."""
        out, self._pools_out = self._pools_out, []
        return out

    def events(self) -> list[ev.LogEvent]:
        out, self._events = self._events, []
        return out

    def dht_results(self) -> list[DhtEvent]:
        """Results of ``dht_get`` (and of other requests made on ``dht`` directly)."""
        out, self._dht_results = self._dht_results, []
        return out

    def links_messages(self) -> list[tuple[bytes, bytes]]:
        """(source node id as routed, payload): the crawl's messages (``crawl``, ``b"L"``)
        delivered to this node since the last call."""
        out, self._links_in = self._links_in, []
        return out

    def send_links(self, node_id: bytes, payload: bytes, now: float, wall: float) -> None:
        """Route a crawl message to exactly ``node_id``."""
        self._now, self._wall = now, wall
        self.overlay.send_to_node(id_from_bytes(node_id), payload, now)
        self._pump()

    def map_connections(self) -> list[crawl.Connection]:
        """This node's connections as a crawl answer lists them: every overlay connection
        (``tunnel`` if it goes through a relay, else its kind), and every link made for
        routes that is no overlay connection (``shortcut``: direct once punched, relayed
        until then), the same rows ``link_table`` shows."""
        out: dict[bytes, crawl.Connection] = {}
        for info in self.overlay.connections():
            nid = id_to_bytes(info.node_id)
            relay = self.overlay.tunnel_relay(info.node_id)
            if relay is not None or isinstance(info.address, ow.Tunnel):
                via = id_to_bytes(relay) if relay is not None else b""
                out[nid] = crawl.Connection(nid, "tunnel", True, via)
            else:
                out[nid] = crawl.Connection(nid, info.kind.value, False)
        routed = {r.node_id for r in self._routes.values()}
        for link in self.links.links.values():
            cert = link.certificate
            if cert is None or cert.node_id in out or cert.node_id not in routed:
                continue
            relayed = isinstance(link.endpoint, Via)
            hop = self.relayed_via(cert.node_id) if relayed else None
            via = bytes.fromhex(hop) if hop else b""
            out[cert.node_id] = crawl.Connection(cert.node_id, "shortcut", relayed, via)
        return list(out.values())

    def routes(self) -> list[RouteEntry]:
        """The resolved routes, by link slot (several addresses of one node share one)."""
        by_slot: dict[int, list[Route]] = {}
        for route in self._routes.values():
            slot = self._slot_of(route.node_id)
            if slot is not None and self._member(slot):
                by_slot.setdefault(slot, []).append(route)
        out = []
        for slot, routes in sorted(by_slot.items()):
            link = self.links.links[slot]
            out.append(
                RouteEntry(
                    slot,
                    routes[0].name,
                    tuple(str(r.address) for r in routes),
                    _target_text(link.endpoint),
                    any(s.confirmed for s in link.sessions),
                )
            )
        return out

    def tunnels(self) -> tuple[tuple[bytes, bytes], ...]:
        """(node id, node id of its relay) of each overlay neighbour we reach only through
        a tunnel: overlay_io relays for them through the relay's link."""
        out = []
        for info in self.overlay.connections():
            relay = self.overlay.tunnel_relay(info.node_id)
            if relay is not None:
                out.append((id_to_bytes(info.node_id), id_to_bytes(relay)))
        return tuple(sorted(out))

    def relay_hops(self) -> tuple[bytes, ...]:
        """The node ids overlay_io may relay through: every direct link's but those of the
        overlay's suspect connections (pings gone unanswered: crashed, most likely). A
        direct link that is no overlay connection (made for a route) has no liveness here;
        overlay_io leaves such a hop out by itself when it stays silent after
        ``hop_silent`` (control pings it then)."""
        suspect = {id_to_bytes(nid) for nid in self.overlay.suspected(self._now)}
        return tuple(
            sorted(
                link.certificate.node_id
                for link in self.links.links.values()
                if link.certificate is not None
                and isinstance(link.endpoint, tuple)
                and link.certificate.node_id not in suspect
            )
        )

    def hop_silent(self, slot: int, now: float, wall: float) -> bool:
        """overlay_io relays over link ``slot`` and has heard nothing from it for a while:
        if the link's node is an overlay connection, the overlay pings it (and its other
        silent connections). False if it is not: the caller pings the link itself."""
        self._now, self._wall = now, wall
        link = self.links.links.get(slot)
        if link is None or link.certificate is None:
            self.counters["hop_silent_unlinked"] += 1
            return True
        nid = id_from_bytes(link.certificate.node_id)
        if self.overlay.address_of(nid) != link.endpoint:
            return False
        if self.overlay.verify(nid, now):
            self.counters["hop_pings"] += 1
        self._pump()
        return True

    def link_node_ids(self) -> dict[int, bytes]:
        """The authenticated node id of every link that has one, by slot."""
        return {
            slot: link.certificate.node_id
            for slot, link in self.links.links.items()
            if link.certificate is not None
        }

    def link_table(self, now: float) -> list[dict[str, Any]]:
        """Every link as ``supervisor status`` shows it."""
        overlay = {id_to_bytes(info.node_id): info for info in self.overlay.connections()}
        routed = {r.node_id for r in self._routes.values()}
        paths = self.shortcuts.paths(now)
        rows = []
        for slot, link in sorted(self.links.links.items()):
            cert = link.certificate
            nid = cert.node_id if cert is not None else link.want_id
            info = overlay.get(nid) if nid is not None else None
            kinds = [info.kind.value] if info is not None else []
            if isinstance(link.endpoint, Via):
                kinds.append("relayed")
            elif nid in routed and info is None:
                kinds.append("shortcut")
            newest = link.sessions[-1] if link.sessions else None
            rows.append(
                {
                    "slot": slot,
                    "name": link.spec.name or None,
                    "node_id": nid.hex() if nid else None,
                    "kind": "+".join(kinds) or ("static" if not link.dynamic else "idle"),
                    "endpoint": _target_text(link.endpoint),
                    "up": link.up,
                    "rtt_ms": None
                    if info is None or info.rtt is None
                    else round(info.rtt * 1000, 3),
                    "age_s": None if newest is None else round(now - newest.created, 1),
                    "cipher": None if newest is None else newest.cipher.value,
                    "routes": sorted(
                        str(r.address) for r in self._routes.values() if r.node_id == nid
                    ),
                    "path": "relayed" if isinstance(link.endpoint, Via) else "direct",
                    "via": self.relayed_via(nid) if isinstance(link.endpoint, Via) else None,
                    "shortcut": paths.get(slot),
                }
            )
        return rows

    def relayed_via(self, node_id: bytes | None) -> str | None:
        """The node (hex id) a relayed link's datagrams go to first: the overlay's next hop
        toward it (its tunnel's relay, if it is a tunnel neighbour)."""
        if node_id is None:
            return None
        slot = self._slot_of(node_id)
        chosen = self.shortcuts.relay(slot) if slot is not None else None
        if chosen is not None and chosen in self.relay_hops():
            return chosen.hex()
        nid = id_from_bytes(node_id)
        hop = self.overlay.tunnel_relay(nid) or self.overlay.next_hop(nid)
        return None if hop is None else id_to_bytes(hop).hex()

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must next run: the soonest of the overlay's, the DHT's and
        the links' timers, a registration retry, held overlay messages expiring, a route due
        for its re-check, a negative answer expiring."""
        times = [self.overlay.next_deadline(), self.dht.next_deadline(), self._register_at]
        times.append(self.links.next_deadline())
        if self._waiting_due:
            times.append(self._waiting_due[0][0] + QUEUE_S)
        times += [up + FRESH_RESEND_S[done] for up, done, _ in self._fresh.values()]
        resolving = self._resolving_addresses
        times += [
            r.checked + ROUTE_REFRESH_S for a, r in self._routes.items() if a not in resolving
        ]
        times += self._negative.values()
        times.append(self.shortcuts.next_deadline())
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def statistics(self) -> dict[str, Any]:
        return {
            "node_id": self.identity.node_id.hex(),
            "state": self.overlay.state.value,
            "estimated_size": self.overlay.estimated_size(),
            "registered": self.registered,
            "routes": len(self._routes),
            "waiting_endpoints": len(self._waiting),
            "resolving": len(self._resolving),
            "counters": dict(self.counters),
            "overlay": self.overlay.statistics(),
            "dht": self.dht.statistics(),
            "links": self.links.statistics(),
        }

    # -- inputs ----------------------------------------------------------------------------------

    def receive_overlay(self, slot: int, payload: bytes, now: float, wall: float) -> None:
        """An overlay message that arrived sealed on link ``slot``."""
        self._now, self._wall = now, wall
        link = self.links.links.get(slot)
        if link is None or link.certificate is None or not isinstance(link.endpoint, tuple):
            self.counters["overlay_not_on_a_direct_link"] += 1
            return
        try:
            msg = ow.decode(payload)
        except RemoteProtocolError as exc:
            self.counters[f"overlay_dropped_{exc.reason}"] += 1
            return
        sender = getattr(msg, "sender", None)
        if sender is not None and sender != link.certificate.node_id:
            self.counters["overlay_sender_mismatch"] += 1
            return
        self._fresh.pop(slot, None)  # the peer speaks on it: what waited got through
        nid = id_from_bytes(link.certificate.node_id)
        known = self.overlay.address_of(nid)
        if known is not None and known != link.endpoint and isinstance(known, tuple):
            self.overlay.readdress(nid, link.endpoint)  # it moved: its link follows it
        self._cause = link.certificate.node_id
        try:
            self.overlay.receive(payload, link.endpoint, now)
            self._pump()
        finally:
            self._cause = None

    def receive_handshake(self, datagram: bytes, source: Address, now: float, wall: float) -> None:
        self._now, self._wall = now, wall
        self.links.receive(datagram, source, now, wall)
        self._pump()

    def leave(self, now: float, wall: float) -> None:
        """The node stops: every overlay connection gets a Close (the neighbours mend the
        circle at once instead of after their timeouts)."""
        self._now, self._wall = now, wall
        connections = len(self.overlay.connections())
        self.overlay.leave(now)
        self._events.append(ev.OverlayLeft(connections=connections))
        self._pump()

    def handle_timer(self, now: float, wall: float) -> None:
        self._now, self._wall = now, wall
        self.links.handle_timer(now, wall)
        deadline = self.overlay.next_deadline()
        if deadline is None or deadline <= now:
            self.overlay.handle_timer(now)
        dht_due = self.dht.next_deadline()
        if dht_due is not None and dht_due <= now:
            self.dht.handle_timer(now)
        if self._register_at is not None and now >= self._register_at:
            self._register(now)
        self._expire_waiting(now)
        self._resend_fresh(now)
        self._refresh_routes(now, wall)
        self.shortcuts.handle_timer(now)
        self._pump()

    def route_miss(self, address: IPv4Address, now: float, wall: float) -> None:
        """A frame to ``address`` found no route: find its node in the DHT."""
        self._now, self._wall = now, wall
        if address in self._routes or address == self.address:
            return
        if address in self._resolving_addresses:
            return
        if self._negative.get(address, -1.0) > now:
            self.counters["resolve_negative_cached"] += 1
            return
        if len(self._resolving) >= RESOLVING_MAX:
            self.counters["resolves_refused_busy"] += 1
            return
        self._resolve(address, now)
        self.counters["resolves"] += 1
        self._pump()

    def set_address(self, address: IPv4Address | None) -> None:
        """This node's address changed (DHCP granted or ended a lease)."""
        if address == self.address:
            return
        self.address = address
        self.routes_version += 1  # the classifier learns it with the routes
        if address is not None:
            self._drop_route(address, "ours")

    def route_slot(self, address: IPv4Address) -> int | None:
        """The slot to send to ``address`` on now (its route's link, with a confirmed
        session), or None."""
        route = self._routes.get(address)
        if route is None:
            return None
        slot = self._slot_of(route.node_id)
        if slot is None or not any(s.confirmed for s in self.links.links[slot].sessions):
            return None
        return slot if self._member(slot) else None

    def _member(self, slot: int) -> bool:
        """Is the node on link ``slot`` certified for our virtual network? (Members of other
        networks may share the overlay, and could sign address records of ours: they never
        get a route.)"""
        cert = self.links.links[slot].certificate
        if cert is None or self.namespace in cert.networks:
            return True  # not authenticated yet: no confirmed session, nothing is sent
        self.counters["route_to_foreign_network"] += 1
        return False

    def unresolvable(self, address: IPv4Address, now: float) -> bool:
        """True while ``address`` is known to have no record (asked again after a while)."""
        return self._negative.get(address, -1.0) > now

    @property
    def joined(self) -> bool:
        """The node has had its place on the circle (DHT requests can reach their keys): its
        first near or far connection (``overlay_placed``), or ``Joined``."""
        return self._joined

    def pump(self) -> None:
        """Move what other users of ``dht`` and ``overlay`` made (the addressing core)."""
        self._pump()

    # -- shortcuts ---------------------------------------------------------------------------------

    def set_endpoints(
        self,
        local: Sequence[Address] = (),
        extra: Sequence[Candidate] = (),
        *,
        mapping_varies: bool = False,
        public_ip: str | None = None,
    ) -> None:
        """This node's own endpoints: the local addresses of its port, and candidates found
        otherwise (STUN, port mapping). The overlay's reflexive address is added here, unless
        the node's NAT maps per destination (``mapping_varies``: each peer would see another
        port); its ``public_ip`` (STUN's) then goes to birthday probing (the overlay's
        reflexive address stands in without it)."""
        self._local_endpoints = tuple(local)
        self._extra_candidates = tuple(extra)
        self._mapping_varies = mapping_varies
        self._public_ip = public_ip
        self._candidates_from = ()  # recomputed at the next pump

    def _refresh_candidates(self) -> None:
        reflexive = self.overlay.address
        key = (self._local_endpoints, self._extra_candidates, reflexive)
        if key == self._candidates_from:
            return
        self._candidates_from = key
        candidates = [Candidate(e, CandidateKind.LOCAL) for e in self._local_endpoints]
        candidates += self._extra_candidates
        public_ip: str | None = None
        if isinstance(reflexive, tuple) and len(reflexive) == 2:
            if not self._mapping_varies:
                endpoint = (str(reflexive[0]), int(reflexive[1]))
                candidates.append(Candidate(endpoint, CandidateKind.REFLEXIVE))
            else:  # its port is one peer's: only the IP is worth telling (birthday probing)
                public_ip = str(reflexive[0])
        if self._mapping_varies:
            public_ip = self._public_ip or public_ip
        self.shortcuts.set_candidates(candidates)
        self.shortcuts.set_varies(public_ip)

    def receive_path(self, slot: int, message: PathMessage, now: float, wall: float) -> None:
        """A shortcut message (offer, answer, go) that came over link ``slot``."""
        self._now, self._wall = now, wall
        link = self.links.links.get(slot)
        if link is None or link.certificate is None:
            self.counters["path_message_unlinked"] += 1
            return
        self._refresh_candidates()  # an answer carries them (and whether our NAT varies)
        self._refresh_relays()
        self.shortcuts.receive(slot, message, link.certificate.node_id, now)
        self._pump()

    def receive_probe(
        self, slot: int, payload: bytes, source: Address, now: float, wall: float
    ) -> None:
        """A PROBE datagram that came on link ``slot``'s session from ``source``."""
        self._now, self._wall = now, wall
        if slot not in self.links.links:
            self.counters["probe_unlinked"] += 1
            return
        self.shortcuts.receive_probe(slot, payload, source, now)
        self._pump()

    def moved(self, now: float, wall: float) -> None:
        """This node's addresses changed (it roamed): its shortcuts are gone, and every
        direct link handshakes again from the new address, which tells each peer where we
        are now (a link takes the endpoint a handshake came from)."""
        self._now, self._wall = now, wall
        self.shortcuts.moved(now)
        self._pump()
        for slot, link in self.links.links.items():
            if link.up and isinstance(link.endpoint, tuple):
                self.links.want(slot)  # peer-made links too: the peer must hear of the move
                self.links.request_rekey(slot)
        for route in self._routes.values():
            routed = self._slot_of(route.node_id)
            if routed is not None:
                self._want_shortcut(routed, route.node_id, now)
        self.counters["moved"] += 1
        self._pump()

    def peer_moved(self, slot: int, endpoint: Address, now: float, wall: float) -> None:
        """Link ``slot``'s peer sent an authentic datagram from ``endpoint``, a new place
        (WireGuard's roaming): a direct link sends there from now on, and the overlay's
        connection follows. A relayed link stays relayed (its datagrams' source is a relay)."""
        self._now, self._wall = now, wall
        link = self.links.links.get(slot)
        if link is None or not isinstance(link.endpoint, tuple) or link.endpoint == endpoint:
            return
        self.links.set_endpoint(slot, endpoint)
        if link.certificate is not None:
            self.overlay.readdress(id_from_bytes(link.certificate.node_id), endpoint)
        self.counters["peers_moved"] += 1
        self._pump()

    def _want_shortcut(self, slot: int, node_id: bytes, now: float) -> None:
        link = self.links.links.get(slot)
        if self._shortcuts_on and link is not None and link.up and isinstance(link.endpoint, Via):
            self._refresh_candidates()
            self._refresh_relays()
            self.shortcuts.want(slot, node_id, now)

    def _refresh_relays(self) -> None:
        """Behind a NAT that maps per destination: the overlay connections that may relay,
        with their RTTs, for a peer behind one too to choose a relay from."""
        if not self._mapping_varies:
            return
        hops = set(self.relay_hops())
        relays = [
            (id_to_bytes(info.node_id), UNKNOWN_RTT_S if info.rtt is None else info.rtt)
            for info in self.overlay.connections()
            if id_to_bytes(info.node_id) in hops
        ]
        self.shortcuts.set_relays(relays)

    def chosen_relays(self) -> dict[int, bytes]:
        """Relayed links whose relay was chosen (both NATs vary): slot -> the member's id."""
        return self.shortcuts.chosen_relays()

    def _move_shortcuts(self, now: float) -> bool:
        shortcuts = self.shortcuts
        moved = False
        for slot, payload in shortcuts.messages_to_send():
            self._overlay_out.append((slot, payload))
            moved = True
        for probe in shortcuts.probes_to_send():
            self._probes_out.append(probe)
            moved = True
        for pool in shortcuts.pools_to_send():
            self._pools_out.append(pool)
            moved = True
        for event in shortcuts.events():
            moved = True
            link = self.links.links.get(event.slot)
            cert = link.certificate if link is not None else None
            peer = cert.name if cert is not None else None
            if isinstance(event, PathFound):
                if link is not None and isinstance(link.endpoint, Via):
                    self.links.set_endpoint(event.slot, event.endpoint)
                    self.routes_version += 1
                self._events.append(
                    ev.ShortcutFormed(
                        peer,
                        event.slot,
                        _target_text(event.endpoint),
                        event.kind.value,
                        round(event.rtt * 1000, 3),
                        event.round,
                    )
                )
            elif isinstance(event, PathLost):
                if link is not None and cert is not None and link.endpoint == event.endpoint:
                    self.links.set_endpoint(event.slot, Via(cert.node_id))
                    self.routes_version += 1
                self._events.append(ev.ShortcutLost(peer, event.slot, _target_text(event.endpoint)))
            elif isinstance(event, RelayChosen):
                self._events.append(
                    ev.RelayChosen(
                        peer, event.slot, event.node_id.hex(), round(event.rtt * 1000, 3)
                    )
                )
            else:
                self._events.append(
                    ev.ShortcutFailed(peer, event.slot, event.rounds, event.retry_in)
                )
        return moved

    def dht_get(self, key: bytes, now: float) -> int:
        """A get for a tool (``supervisor dht get``); its ``GetResult`` comes as an event."""
        rid = self.dht.get(key, now)
        self._pump()
        return rid

    def set_revocations(self, revoked: RevocationList) -> None:
        self.links.set_revocations(revoked)
        self._pump()

    def confirm(self, recv_index: int) -> None:
        self.links.confirm(recv_index)
        self._pump()

    # -- the glue --------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Move everything the three cores produced until they are quiet."""
        now, wall = self._now, self._wall
        for _ in range(MAX_PUMP_ROUNDS):
            moved = False
            for event in self.overlay.events():
                moved = True
                self.dht.handle_overlay_event(event, now)
                self._on_overlay_event(event, now, wall)
            for dht_event in self.dht.events():
                moved = True
                self._on_dht_event(dht_event, now, wall)
            for datagram, target in self.links.datagrams_to_send():
                moved = True
                if isinstance(target, Via):
                    payload = HANDSHAKE_TAG + datagram
                    self.overlay.send_to_node(id_from_bytes(target.node_id), payload, now)
                else:
                    self._handshakes_out.append((datagram, target))
            for link_event in self.links.events():
                moved = True
                if link_event.kind is EventKind.LINK_CLOSED and link_event.slot is not None:
                    self.shortcuts.forget(link_event.slot)
                elif link_event.kind is EventKind.LINK_FORMED and link_event.slot is not None:
                    # a relayed link that routes need has come up: time for a shortcut
                    nid = bytes.fromhex(link_event.node_id)
                    if any(r.node_id == nid for r in self._routes.values()):
                        self._want_shortcut(link_event.slot, nid, now)
                self._events.append(_log_event(link_event))
            for message, address in self.overlay.datagrams_to_send():
                moved = True
                self._send_overlay(message, address, now, wall)
            moved = self._move_shortcuts(now) or moved
            moved = self._flush_waiting() or moved
            if not moved:
                return
        self.counters["pump_rounds_exhausted"] += 1

    def _send_overlay(self, message: bytes, address: object, now: float, wall: float) -> None:
        if not (isinstance(address, tuple) and len(address) == 2):
            self.counters["overlay_bad_address"] += 1
            return
        endpoint: Address = (str(address[0]), int(address[1]))
        slot = self._ready_slot(endpoint)
        if slot is not None:
            self._overlay_out.append((slot, message))
            return
        queue = self._waiting.get(endpoint)
        if queue is not None and self._waiting_slot.get(endpoint) not in self.links.links:
            # the link asked for is gone (closed meanwhile): ask again, as for a new endpoint
            self.counters["overlay_queue_link_gone"] += len(queue)
            self._forget_waiting(endpoint)
            queue = None
        if queue is None:
            cause = self._named_by.get(endpoint, self._cause)
            if cause is not None and endpoint not in self._named_by:
                self._named_by[endpoint] = cause
                while len(self._named_by) > NAMED_MAX:
                    self._named_by.popitem(last=False)
            if cause is not None and self._asks[cause] >= MEMBER_LINKS:
                self.counters["links_refused_member_limit"] += 1
                return
            asked = self._connect(endpoint, now, wall)
            if asked is None:
                return
            queue = self._waiting[endpoint] = deque(maxlen=QUEUE_PER_ENDPOINT)
            self._waiting_slot[endpoint] = asked
            heapq.heappush(self._waiting_due, (now, endpoint))
            if cause is not None:
                self._asked_by[endpoint] = cause
                self._asks[cause] += 1
        elif len(queue) == QUEUE_PER_ENDPOINT:
            self.counters["overlay_queue_full"] += 1
            queue.append((now, message))
            heapq.heappush(self._waiting_due, (queue[0][0], endpoint))  # its oldest moved on
            return
        queue.append((now, message))

    def _connect(self, endpoint: Address, now: float, wall: float) -> int | None:
        try:
            return self.links.connect(endpoint, now, wall)
        except RemoteProtocolError as exc:
            self.counters[f"connect_refused_{exc.reason}"] += 1
            return None

    def _ready_slot(self, endpoint: Address) -> int | None:
        """The slot of the link with a confirmed session at ``endpoint``: one dict lookup."""
        return self._ready_index().get(endpoint)

    def _ready_index(self) -> dict[Address, int]:
        """Endpoint -> slot of the links with a confirmed session, rebuilt when the links'
        sessions changed (not per message)."""
        version = self.links.sessions_version
        if version != self._ready_version:
            self._ready_version = version
            ready: dict[Address, int] = {}
            for slot, link in self.links.links.items():
                target = link.endpoint
                if isinstance(target, tuple) and any(s.confirmed for s in link.sessions):
                    ready.setdefault(target, slot)
                    self._named_by.pop(target, None)  # certified now: it answered there
            self._ready = ready
        return self._ready

    def _flush_waiting(self) -> bool:
        """Send what waited for endpoints whose link has come up: looked at only when the
        sessions changed, and then once per ready link, not per waiting endpoint."""
        version = self.links.sessions_version
        if version == self._flushed_version or not self._waiting:
            self._flushed_version = version
            return False
        self._flushed_version = version
        moved = False
        for endpoint, slot in self._ready_index().items():
            queue = self._waiting.get(endpoint)
            if queue is None:
                continue
            self._forget_waiting(endpoint)
            for _, message in queue:
                self._overlay_out.append((slot, message))
                moved = True
            if queue:
                self._fresh[slot] = (self._now, 0, [message for _, message in queue])
        return moved

    def restart_fresh(self, now: float) -> None:
        """An overlay_io worker got the session keys only now: the resends of what waited
        for a fresh link count from ``now`` (see ``ControlCore.io_worker_started``)."""
        for slot, (_up, _done, messages) in list(self._fresh.items()):
            self._fresh[slot] = (now, 0, messages)

    def _resend_fresh(self, now: float) -> None:
        """Send again what waited for a link that came up lately and has been silent since
        (see the module's docstring), at each of ``FRESH_RESEND_S`` after it came up."""
        for slot, (up, done, messages) in list(self._fresh.items()):
            if now < up + FRESH_RESEND_S[done]:
                continue
            link = self.links.links.get(slot)
            target = link.endpoint if link is not None else None
            if not isinstance(target, tuple) or self._ready_index().get(target) != slot:
                del self._fresh[slot]  # closed, or moved on: nothing to say there now
                continue
            self._overlay_out += [(slot, message) for message in messages]
            self.counters["overlay_fresh_resent"] += len(messages)
            if done + 1 < len(FRESH_RESEND_S):
                self._fresh[slot] = (up, done + 1, messages)
            else:
                del self._fresh[slot]

    def _forget_waiting(self, endpoint: Address) -> None:
        self._waiting.pop(endpoint, None)
        self._waiting_slot.pop(endpoint, None)
        member = self._asked_by.pop(endpoint, None)
        if member is not None:
            self._asks[member] -= 1
            if self._asks[member] <= 0:
                del self._asks[member]

    def _expire_waiting(self, now: float) -> None:
        due = self._waiting_due
        while due and due[0][0] + QUEUE_S <= now:
            oldest, endpoint = heapq.heappop(due)
            queue = self._waiting.get(endpoint)
            if queue is None or not queue or queue[0][0] != oldest:
                continue  # flushed, or its oldest message has moved on (another entry has it)
            while queue and now - queue[0][0] >= QUEUE_S:
                queue.popleft()
                self.counters["overlay_queue_expired"] += 1
            if queue:
                heapq.heappush(due, (queue[0][0], endpoint))
                continue
            slot = self._waiting_slot.get(endpoint)
            self._forget_waiting(endpoint)
            link = self.links.links.get(slot) if slot is not None else None
            if slot is not None and link is not None and link.endpoint == endpoint and not link.up:
                self.links.release(slot)

    def _slot_of(self, node_id: bytes) -> int | None:
        for slot, link in self.links.links.items():
            cert = link.certificate
            if (cert is not None and cert.node_id == node_id) or link.want_id == node_id:
                return slot
        return None

    def _on_overlay_event(self, event: OverlayEvent, now: float, wall: float) -> None:
        if isinstance(event, Delivered):
            if event.payload[:1] == HANDSHAKE_TAG:
                source = Via(id_to_bytes(event.src_id))
                self.links.receive(bytes(event.payload[1:]), source, now, wall)
            elif crawl.is_links(event.payload) and event.exact:
                if len(self._links_in) >= LINKS_QUEUE:
                    self.counters["map_queue_full"] += 1
                else:
                    self._links_in.append((id_to_bytes(event.src_id), bytes(event.payload)))
        elif isinstance(event, ConnectionAdded):
            slot = self._slot_of(id_to_bytes(event.node_id))
            if slot is not None:
                self.links.want(slot)
            self._events.append(
                ev.OverlayConnectionAdded(
                    node_id=id_to_bytes(event.node_id).hex(),
                    kind=event.kind.value,
                    endpoint=_target_text(event.address),
                )
            )
        elif isinstance(event, ConnectionRemoved):
            nid = id_to_bytes(event.node_id)
            slot = self._slot_of(nid)
            if event.reason != "left":  # our own leave: one overlay_left says it
                self._events.append(
                    ev.OverlayConnectionRemoved(node_id=nid.hex(), reason=event.reason)
                )
            if slot is None:
                return
            relayed = isinstance(self.links.links[slot].endpoint, Via)
            if event.reason == "closed_leave" or (event.reason == "timeout" and not relayed):
                # the node is gone: its link goes at once, so nothing is sent into the void
                self.links.close(slot, f"overlay_{event.reason}")
                self._drop_routes_to(nid, f"overlay_{event.reason}")
            elif not any(r.node_id == nid for r in self._routes.values()):
                # (a tunnel that timed out says only that its relay lost the way: a link
                # relayed end to end that routes use stays, it has its own liveness)
                self.links.release(slot)
        elif isinstance(event, Joined):
            self._events.append(
                ev.OverlayJoined(
                    node_id=self.identity.node_id.hex(), estimated_size=event.estimated_size
                )
            )
            self._placed(now)
        elif isinstance(event, NeighboursChanged) and self.overlay.on_circle:
            self._placed(now)

    def _placed(self, now: float) -> None:
        """The overlay is on the circle (its first near or far connection, or ``Joined``):
        the address record is created now, not at ``Joined`` (see the DHT's docstring)."""
        if self._joined:
            return
        self._joined = True
        self._events.append(
            ev.OverlayPlaced(
                node_id=self.identity.node_id.hex(), joined=self.overlay.state.value == "joined"
            )
        )
        self._register(now)

    # -- the address record and routes -------------------------------------------------------------

    def _address_key(self, address: IPv4Address) -> bytes:
        return f"ip:{self.namespace}:{address}".encode()

    def _register(self, now: float) -> None:
        self._register_at = None
        if not self.register_address or self.address is None:
            return
        self._registration = self.dht.create(
            self._address_key(self.address), self.identity.node_id, self.lease_s, now
        )
        self._events.append(ev.AddressRegistering(address=str(self.address)))

    def _on_dht_event(self, event: DhtEvent, now: float, wall: float) -> None:
        if isinstance(event, CreateResult) and event.request_id == self._registration:
            self._registration = None
            if event.ok:
                if not self.registered:
                    self._events.append(ev.AddressRegistered(address=str(self.address)))
                self.registered = True
                return
            holder = event.holder.hex() if event.holder else None
            self._events.append(
                ev.AddressNotRegistered(
                    address=str(self.address), reason=event.reason, holder=holder
                )
            )
            self._register_at = now + REGISTER_RETRY_S
        elif isinstance(event, LeaseLost):
            self._dht_results.append(event)  # DHCP's address, perhaps
            self.registered = False
            holder = event.holder.hex() if event.holder else None
            self._events.append(
                ev.AddressLost(key=event.key.decode(errors="replace"), holder=holder)
            )
        elif isinstance(event, GetResult) and event.request_id in self._resolving:
            address = self._resolving.pop(event.request_id)
            self._resolving_addresses.discard(address)
            self._resolved(address, event, now, wall)
        else:
            self._dht_results.append(event)

    def _resolved(self, address: IPv4Address, result: GetResult, now: float, wall: float) -> None:
        node_id = None
        for record in result.records:
            if record.deleted:
                continue
            if record.owner_id != record.value:  # signed by someone else than the node named
                self.counters["resolve_forged_record"] += 1
                continue
            node_id = bytes(record.value)
        old = self._routes.get(address)
        if node_id is None and old is not None and not any(r.deleted for r in result.records):
            # The re-check found no record and no tombstone: no replica answered, or those
            # that did had none (churn: the replicas may have died with other nodes, and
            # the owner re-publishes). No news of the address: the route stays (asked again
            # soon if the get failed). A released address leaves a tombstone.
            old.checked = now if result.ok else now - ROUTE_REFRESH_S + NEGATIVE_S
            self.counters["route_recheck_empty"] += 1
            return
        if node_id is None or node_id == self.identity.node_id:
            self._negative[address] = now + NEGATIVE_S
            if old is not None:
                self._drop_route(address, "released")
            else:
                reason = result.reason if not result.ok else "no_record"
                self._events.append(ev.ResolveFailed(address=str(address), reason=reason))
            return
        if old is not None and old.node_id == node_id:
            old.checked = now
            slot = self._ensure_link(node_id, now, wall)
            if slot is not None:
                self._want_shortcut(slot, node_id, now)
            return
        slot = self._ensure_link(node_id, now, wall)
        if slot is None:
            return
        name = self.links.links[slot].spec.name
        self._routes[address] = Route(address, node_id, name, now, now)
        self.routes_version += 1
        self._want_shortcut(slot, node_id, now)
        self._events.append(
            ev.RouteAdded(
                address=str(address), node_id=node_id.hex(), slot=slot, moved=old is not None
            )
        )

    def _resolve(self, address: IPv4Address, now: float) -> None:
        rid = self.dht.get(self._address_key(address), now)
        self._resolving[rid] = address
        self._resolving_addresses.add(address)

    def _ensure_link(self, node_id: bytes, now: float, wall: float) -> int | None:
        slot = self._slot_of(node_id)
        if slot is not None and self.links.links[slot].up:
            self.links.want(slot)
            return slot
        try:
            return self.links.connect(Via(node_id), now, wall, node_id=node_id)
        except RemoteProtocolError as exc:
            self.counters[f"connect_refused_{exc.reason}"] += 1
            return None

    def _refresh_routes(self, now: float, wall: float) -> None:
        for address, route in list(self._routes.items()):
            if now - route.checked >= ROUTE_REFRESH_S and address not in self._resolving_addresses:
                route.checked = now
                self._resolve(address, now)
        for address, until in list(self._negative.items()):
            if until <= now:
                del self._negative[address]

    def _drop_routes_to(self, node_id: bytes, reason: str) -> None:
        for address in [a for a, r in self._routes.items() if r.node_id == node_id]:
            self._drop_route(address, reason)

    def _drop_route(self, address: IPv4Address, reason: str) -> None:
        route = self._routes.pop(address, None)
        if route is None:
            return
        self.routes_version += 1
        self._events.append(ev.RouteRemoved(address=str(address), reason=reason))
        if not any(r.node_id == route.node_id for r in self._routes.values()):
            slot = self._slot_of(route.node_id)
            in_overlay = any(
                id_to_bytes(info.node_id) == route.node_id for info in self.overlay.connections()
            )
            if slot is not None and not in_overlay:
                self.links.release(slot)


def _target_text(target: object) -> str:
    if isinstance(target, Via):
        return str(target)
    if isinstance(target, tuple) and len(target) == 2:
        return f"{target[0]}:{target[1]}"
    return str(target)


def _log_event(event: LinkEvent) -> ev.LogEvent:
    """A link manager's event as the log has it."""
    source = _target_text(event.source) if event.source is not None else None
    if event.kind is EventKind.LINK_FORMED:
        return ev.LinkFormed(event.peer, event.slot, event.node_id, event.pattern, source)
    if event.kind is EventKind.SESSION_ESTABLISHED:
        return ev.SessionEstablished(event.peer, event.slot, event.pattern, event.cipher)
    if event.kind is EventKind.LINK_CLOSED:
        return ev.LinkClosed(event.peer, event.slot, event.reason)
    return ev.HandshakeRefused(event.reason, source, event.detail)
