"""control's top core: everything the control stage decides, as one sans-I/O object. Pure.

Theory of operation (the shape of aioquic's ``H3Connection`` over its ``QuicConnection``):

- ``ControlCore`` owns the layers and is the only thing its driver talks to. Under it,
  ``RoutingCore`` (routing.py) runs the links, the overlay, the DHT and the routes they
  give; ``Addressing`` (addressing.py) sits on that layer and answers DHCP and DNS and holds
  packets that wait for a route; ``PeerTable`` (peers.py) keeps the static peers' liveness.
  After every input the core moves what each layer produced to the others until all are
  quiet (DHT results to addressing, addressing's DHT requests into the DHT, ...), so the
  driver never glues layers.
- **Inputs** (``now`` is the monotonic clock in seconds, ``wall`` unix seconds):
  ``receive_overlay`` (an OVERLAY record: an overlay message, or a static peer's ping),
  ``receive_handshake``, ``frame_from_tap`` / ``packet_to_resolve`` /
  ``packet_from_unknown`` / ``claim`` (the classifier's FRAME, RESOLVE, VERIFY and CLAIM
  records), the overlay_io workers' messages (``io_worker_started``,
  ``session_confirmed``, ``rekey_requested``), tool requests
  (``dht_get``, ``dht_put``, ``ping``, ``netcheck``, ``map``: the overlay crawl of
  crawl.py, whose queries this core also answers), ``set_revocations`` and
  ``handle_timer``.
- **Outputs**, drained by the driver after every input: ``handshakes_to_send()`` (datagram,
  endpoint, the slot whose overlay_io worker sends it), ``overlay_to_send()`` and
  ``packets_to_send()`` (slot, bytes), ``frames_to_tap()``, ``keys_to_send()`` (one
  ``SessionKeys`` per overlay_io worker that needs them), ``snapshot_to_publish()`` (the
  route table when it changed, and every ``REPUBLISH_S`` so a subscriber that missed one
  resyncs), ``events()`` (typed: log events and effects, events.py) and ``next_deadline()``,
  the one time the driver must call ``handle_timer`` (it arms it after every input).
- **Nonces never repeat across overlay_io restarts.** Every session key goes to each
  overlay_io worker with a send counter range of that worker's incarnation: incarnation g
  of a worker sends from ``g << GENERATION_SHIFT``; a worker that comes back with a new pid
  gets the next g for every key it held.
- **The log is not a flood target.** At most ``REFUSALS_LOGGED_PER_S`` handshake refusals a
  second become log events; the rest are counted (``links.refused``) and summed up in one
  ``handshake_refusals_suppressed`` event.
- **Plaintext** (``encrypted`` off, for measuring the pipeline alone): no identity, no links,
  overlay or DHT; the static peers are the routes, pinged in the clear. Inputs that need the
  network's layers are counted drops.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import msgspec

from pipeline import messages
from pipeline.control import crawl
from pipeline.control import events as ev
from pipeline.control.addressing import Addressing, AddressingSettings, machines_from_leases
from pipeline.control.dht import CreateResult, GetResult, key_position
from pipeline.control.links import Address, LinkSettings, PeerSpec, Via
from pipeline.control.nat.discovery import NatDiscovery
from pipeline.control.nat.portmap import PortMapSettings, Protocol
from pipeline.control.nat.upnp import UpnpCommand, UpnpResult
from pipeline.control.overlay import wire as overlay_wire
from pipeline.control.peers import PeerState, PeerTable
from pipeline.control.routing import RoutingCore
from pipeline.control.shortcuts import POOL_SOCKETS, SPRAY_PROBES, CandidateKind, decode_path
from pipeline.crypto.cert import Certificate, RevocationList
from pipeline.crypto.identity import Identity
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import id_to_bytes

REPUBLISH_S = 10.0  # a backstop: a subscriber asks for the table when it starts
GENERATION_SHIFT = 40  # send counters of incarnation g start at g << 40
REFUSALS_LOGGED_PER_S = 10
TOOL_PING_BASE = 1 << 31  # supervisor ping's Ping seqs start here (liveness's stay below)
HOP_PING_BASE = 1 << 30  # pings of silent relay hops (hop_silent) up to TOOL_PING_BASE
TOOL_PING_KEEP_S = 10.0
MAP_NODES_MAX = 10_000  # what a supervisor map request may ask for, at most
MAP_TIMEOUT_MAX_S = 600.0

_OVERLAY_VERSION = overlay_wire.VERSION


class ControlSettings(msgspec.Struct, frozen=True):
    """What control's core is told about the node (the driver builds it from the config)."""

    node_name: str
    namespace: str
    subnet: IPv4Network
    address: IPv4Address | None  # static; None: DHCP (or router mode)
    peers: tuple[PeerSpec, ...] = ()  # the static peers, slots 1..n
    bootstrap: tuple[Address, ...] = ()
    networks: tuple[str, ...] = ()  # other virtual networks sharing the overlay
    keepalive_interval_s: float = 1.0
    peer_timeout_s: float = 5.0
    links: LinkSettings = LinkSettings()
    addressing: AddressingSettings | None = None
    encrypted: bool = True
    listen_port: int = 4789
    stun_servers: tuple[Address, ...] = ()
    port_mapping: bool = False
    port_mapping_protocols: tuple[str, ...] = ("pcp", "nat-pmp", "upnp")  # asked in this order
    shortcuts: bool = True
    pool_sockets: int = POOL_SOCKETS  # birthday probing's bounds (``shortcuts.py``)
    spray_probes: int = SPRAY_PROBES
    map_answers_per_s: float = crawl.ANSWERS_PER_S  # crawl queries answered a second


class Credentials(msgspec.Struct, frozen=True):
    """This node's membership: its identity, certificate, the authority, the revocations."""

    identity: Identity
    certificate: Certificate
    ca: Certificate
    revoked: RevocationList


class ControlCore:
    def __init__(
        self,
        settings: ControlSettings,
        *,
        credentials: Credentials | None,
        rng: random.Random,
        entropy: Callable[[int], bytes],
        epoch: int,
        preferred: IPv4Address | None = None,
        held_leases: Sequence[dict[str, Any]] = (),
        now: float = 0.0,
    ) -> None:
        """``credentials`` None only in plaintext mode. ``epoch``: a random number that
        changes with every start of control (route snapshots of another epoch replace any
        version). ``preferred``: the address DHCP granted before; ``held_leases``: router
        mode's machines from before (both from the state directory)."""
        self.settings = settings
        self.epoch = epoch
        self.counters: Counter[str] = Counter()
        self.liveness = PeerTable(
            settings.node_name,
            [(p.slot, p.name) for p in settings.peers],
            interval_s=settings.keepalive_interval_s,
            timeout_s=settings.peer_timeout_s,
        )
        self.routing: RoutingCore | None = None
        self.addressing: Addressing | None = None
        self.nat: NatDiscovery | None = None
        self._candidates_seen = -1
        if settings.encrypted:
            if credentials is None:
                raise ValueError("an encrypted node needs credentials")
            self._make_layers(settings, credentials, rng, entropy, preferred, held_leases, now)
        self._handshakes_out: list[tuple[bytes, Address, int]] = []
        self._overlay_out: list[tuple[int, bytes]] = []
        self._probes_out: list[tuple[int, Address, bytes]] = []
        self._pools_out: list[tuple[int, Address | None, bytes]] = []
        self._packets_out: list[tuple[int, bytes]] = []
        self._tap_out: list[bytes] = []
        self._events: list[ev.ControlEvent] = []
        self._tool_requests: dict[int, tuple[bytes, str]] = {}  # DHT request id -> (to, key)
        # supervisor ping: Ping seq -> (to, peer, the tool's seq, slot, sent)
        self._tool_pings: dict[int, tuple[bytes, str, int, int, float]] = {}
        # supervisor map: crawl id -> (to, the crawl); query ids are unique across crawls
        self._crawls: dict[int, tuple[bytes, crawl.Crawl]] = {}
        self._query_id = 0
        self._crawl_seq = 0
        self._hop_ping_seq = 0
        self._answers = crawl.AnswerLimiter(settings.map_answers_per_s)
        self._io_workers: dict[bytes, int] = {}  # overlay_io worker -> its pid
        self._generations: dict[tuple[int, bytes], int] = {}  # (send index, worker) -> g
        self._keys_due: set[bytes] = set()
        self._keys_version: tuple[object, ...] = ()
        self._version = 1  # of the route snapshot
        self._layers_seen = (0, 0, 0)  # the routes, sessions and machines versions it holds
        self._published_version = -1
        self._publish_at = now
        self._refusal_window = -1.0
        self._refusals_logged = 0
        self._refusals_suppressed = 0
        self._now = now

    def _make_layers(
        self,
        s: ControlSettings,
        cred: Credentials,
        rng: random.Random,
        entropy: Callable[[int], bytes],
        preferred: IPv4Address | None,
        held_leases: Sequence[dict[str, Any]],
        now: float,
    ) -> None:
        dhcp = s.addressing is not None and s.addressing.dhcp
        routing = RoutingCore(
            identity=cred.identity,
            certificate=cred.certificate,
            ca=cred.ca,
            namespace=s.namespace,
            address=s.address,
            peers=s.peers,
            bootstrap=s.bootstrap,
            revoked=cred.revoked,
            rng=random.Random(rng.getrandbits(64)),
            entropy=entropy,
            link_settings=s.links,
            register_address=not dhcp,
            networks=s.networks,
            shortcuts=s.shortcuts,
            pool_sockets=s.pool_sockets,
            spray_probes=s.spray_probes,
        )
        self.routing = routing
        self.nat = NatDiscovery(
            port=s.listen_port,
            stun_servers=s.stun_servers,
            port_mapping=s.port_mapping,
            rng=random.Random(rng.getrandbits(64)),
            now=now,
            portmap=PortMapSettings(
                protocols=tuple(Protocol(p) for p in s.port_mapping_protocols),
                description=f"autovn {s.node_name}"[:64],
            ),
        )
        if s.addressing is None:
            return
        addressing = Addressing(
            routing,
            s.addressing,
            rng=random.Random(rng.getrandbits(64)),
            preferred=preferred if dhcp else None,
        )
        self.addressing = addressing
        if s.addressing.router and held_leases:
            try:
                addressing.restore(machines_from_leases(list(held_leases), now))
            except ValueError as exc:
                self._events.append(ev.LeasesNotRestored(error=str(exc)))
        if not dhcp:
            addressing.register_names(now)  # (its clock read 0: the create timed out at once)

    # -- outputs ---------------------------------------------------------------------------------

    def handshakes_to_send(self) -> list[tuple[bytes, Address, int]]:
        """(datagram, endpoint, slot): HANDSHAKE and COOKIE datagrams to send as they are;
        ``slot`` is the link at that endpoint (0: none), whose overlay_io worker sends it."""
        out, self._handshakes_out = self._handshakes_out, []
        return out

    def overlay_to_send(self) -> list[tuple[int, bytes]]:
        """(slot, payload): overlay messages and static peers' pings, to seal for a link."""
        out, self._overlay_out = self._overlay_out, []
        return out

    def packets_to_send(self) -> list[tuple[int, bytes]]:
        """(slot, packet): IP packets that waited here for their route."""
        out, self._packets_out = self._packets_out, []
        return out

    def stun_to_send(self) -> list[tuple[bytes, Address]]:
        """(datagram, server): STUN requests to send from the node's UDP port (overlay_io)."""
        return self.nat.stun_to_send() if self.nat is not None else []

    def portmap_to_send(self) -> list[tuple[bytes, Address]]:
        """(datagram, gateway): PCP and NAT-PMP requests for the driver's own socket."""
        return self.nat.portmap_to_send() if self.nat is not None else []

    def upnp_to_run(self) -> list[UpnpCommand]:
        """UPnP IGD commands (``nat/upnp.py``) for the driver to run off its event loop, in
        order; each one's result comes back through ``receive_upnp``."""
        return self.nat.upnp_to_run() if self.nat is not None else []

    def probes_to_send(self) -> list[tuple[int, Address, bytes]]:
        """(slot, endpoint, payload): PROBE datagrams for overlay_io to seal with link
        ``slot``'s session and send to ``endpoint``."""
        out, self._probes_out = self._probes_out, []
        return out

    def pools_to_send(self) -> list[tuple[int, Address | None, bytes]]:
        """(slot, endpoint, payload): birthday probing's pool commands for overlay_io
        (``RoutingCore.pools_to_send``): a PROBE payload to send from every socket of link
        ``slot``'s pool to ``endpoint``, or (slot, None, b"") to close the pool."""
        out, self._pools_out = self._pools_out, []
        return out

    def frames_to_tap(self) -> list[bytes]:
        """Ethernet frames for the TAP: DHCP and DNS answers, ICMP errors, verified packets."""
        out, self._tap_out = self._tap_out, []
        return out

    def events(self) -> list[ev.ControlEvent]:
        out, self._events = self._events, []
        return out

    def keys_to_send(self) -> list[tuple[bytes, messages.SessionKeys]]:
        """(overlay_io worker, its SessionKeys): to every worker when the sessions changed,
        and to a worker that (re)started."""
        routing = self.routing
        if routing is None:
            self._keys_due.clear()
            return []
        version = (
            routing.links.sessions_version,
            routing.tunnels(),
            routing.relay_hops(),
            tuple(sorted(routing.chosen_relays().items())),
        )
        if version != self._keys_version:
            self._keys_version = version
            self._keys_due |= set(self._io_workers)
        out = [(worker, self._session_keys(worker)) for worker in sorted(self._keys_due)]
        self._keys_due.clear()
        return out

    def snapshot_to_publish(self, now: float) -> messages.RouteSnapshot | None:
        """The route table, when it changed since it was last published or ``REPUBLISH_S``
        have passed; else None."""
        self._sync_version()
        if self._version == self._published_version and now < self._publish_at:
            return None
        self._published_version = self._version
        self._publish_at = now + REPUBLISH_S
        return self.snapshot()

    def next_deadline(self) -> float:
        """When ``handle_timer`` must next be called."""
        times: list[float | None] = [self.liveness.next_deadline(), self._publish_at]
        if self.routing is not None:
            times.append(self.routing.next_deadline())
        if self.addressing is not None:
            times.append(self.addressing.next_deadline())
        if self.nat is not None:
            times.append(self.nat.next_deadline())
        times += [c.next_deadline() for _, c in self._crawls.values()]
        return min(t for t in times if t is not None)

    # -- inputs: records -------------------------------------------------------------------------

    def receive_overlay(self, slot: int, payload: bytes, now: float, wall: float) -> None:
        """An OVERLAY record from link ``slot``: an overlay message (its codec's version byte
        first), or a static peer's ping or pong (a msgpack map)."""
        self._now = now
        if payload[:1] == bytes((_OVERLAY_VERSION,)):
            if self.routing is None:
                self.counters["overlay_without_links"] += 1
                return
            self.routing.receive_overlay(slot, payload, now, wall)
            self._after(now, wall)
            return
        try:
            msg = messages.decode_overlay(payload)
        except ValueError:  # msgspec's errors and UnicodeDecodeError alike
            self._receive_path(slot, payload, now, wall)
            return
        if isinstance(msg, messages.Pong) and msg.seq >= TOOL_PING_BASE:
            self._tool_pong(slot, msg, now)
            return
        if isinstance(msg, messages.Pong) and msg.seq >= HOP_PING_BASE:
            self.counters["hop_pongs"] += 1  # overlay_io has heard the hop: that was all
            return
        reply = self.liveness.receive(slot, msg, now)
        if reply is None and isinstance(msg, messages.Ping):
            reply = messages.Pong(msg.seq, msg.sent_ns, self.settings.node_name)  # any link
        if reply is not None:
            self._overlay_out.append((slot, messages.encode_overlay(reply)))
        self._liveness_events()

    def _receive_path(self, slot: int, payload: bytes, now: float, wall: float) -> None:
        """A shortcut message (offer, answer, go) over a link, or junk."""
        try:
            msg = decode_path(payload)
        except ValueError:
            self.counters["undecodable_overlay"] += 1
            return
        if self.routing is None:
            self.counters["path_without_links"] += 1
            return
        self.routing.receive_path(slot, msg, now, wall)
        self._after(now, wall)

    def receive_probe(
        self, slot: int, payload: bytes, source: Address, now: float, wall: float
    ) -> None:
        """A PROBE record: a probe or its answer that came on link ``slot`` from ``source``."""
        if self.routing is None:
            self.counters["probe_without_links"] += 1
            return
        self.routing.receive_probe(slot, payload, source, now, wall)
        self._after(now, wall)

    def set_local_addresses(
        self, addresses: Sequence[str], gateway: str | None, now: float, wall: float
    ) -> None:
        """The addresses of the node's interfaces (not the TAP's) and its default gateway,
        at start and whenever they change (the node moved)."""
        if self.nat is not None:
            moved = self.nat.set_local(addresses, gateway, now)
            if moved and self.routing is not None:
                self._events.append(ev.AddressesMoved(tuple(addresses), gateway))
                self._after(now, wall)  # the new candidates first
                self.routing.moved(now, wall)
            self._after(now, wall)

    def receive_stun(self, datagram: bytes, source: Address, now: float, wall: float) -> None:
        """A STUN record: a STUN datagram that came to the node's UDP port."""
        receive = None if self.nat is None else self.nat.receive_stun
        self._nat_datagram(receive, "stun_unexpected", datagram, source, now, wall)

    def receive_portmap(self, datagram: bytes, source: Address, now: float, wall: float) -> None:
        """An answer of the gateway on the driver's port mapping socket."""
        receive = None if self.nat is None else self.nat.receive_portmap
        self._nat_datagram(receive, "portmap_unexpected", datagram, source, now, wall)

    def _nat_datagram(
        self,
        receive: Callable[[bytes, Address, float], bool] | None,
        unexpected: str,
        datagram: bytes,
        source: Address,
        now: float,
        wall: float,
    ) -> None:
        """A datagram for NAT discovery, from anyone: one that does not parse is counted by
        its reason, one that answers nothing we asked as ``unexpected``."""
        try:
            taken = receive is not None and receive(datagram, source, now)
        except RemoteProtocolError as exc:
            self.counters[exc.reason] += 1
            return
        if not taken:
            self.counters[unexpected] += 1
            return
        self._after(now, wall)

    def receive_upnp(self, result: UpnpResult, now: float, wall: float) -> None:
        """The result of a UPnP command the driver ran."""
        if self.nat is None or not self.nat.receive_upnp(result, now):
            self.counters["upnp_unexpected"] += 1
            return
        self._after(now, wall)

    def stop(self, now: float, wall: float) -> None:
        """The node stops: leave the overlay (a Close to every connection) and give the
        gateway its port back."""
        if self.routing is not None:
            self.routing.leave(now, wall)
        if self.nat is not None:
            self.nat.stop(now)
        self._after(now, wall)

    def receive_handshake(self, datagram: bytes, source: Address, now: float, wall: float) -> None:
        """A HANDSHAKE or COOKIE datagram from ``source``."""
        self._now = now
        if self.routing is None:
            self.counters["handshake_without_links"] += 1
            return
        self.routing.receive_handshake(datagram, source, now, wall)
        self._after(now, wall)

    def frame_from_tap(self, frame: bytes, now: float, wall: float) -> None:
        """A FRAME from the classifier: DHCP, or DNS to the virtual gateway."""
        if self._addressing_missing("frame"):
            return
        assert self.addressing is not None
        self.addressing.frame_from_tap(frame, now)
        self._after(now, wall)

    def packet_to_resolve(self, packet: bytes, now: float, wall: float) -> None:
        """A RESOLVE record: a packet to an address without a route."""
        if self._addressing_missing("resolve"):
            return
        assert self.addressing is not None
        self.addressing.packet_to_resolve(packet, now, wall)
        self._after(now, wall)

    def packet_from_unknown(self, slot: int, packet: bytes, now: float, wall: float) -> None:
        """A VERIFY record: a packet from link ``slot`` whose source has no route."""
        if self._addressing_missing("verify"):
            return
        assert self.addressing is not None
        self.addressing.packet_from_unknown(slot, packet, now, wall)
        self._after(now, wall)

    def claim(self, frame: bytes, now: float, wall: float) -> None:
        """A CLAIM record (router mode): a frame from a machine with an address of its own."""
        if self._addressing_missing("claim"):
            return
        assert self.addressing is not None
        self.addressing.static_seen(frame, now)
        self._after(now, wall)

    def _addressing_missing(self, what: str) -> bool:
        if self.addressing is None:
            self.counters[f"{what}_without_addressing"] += 1
            return True
        return False

    # -- inputs: messages from the workers and tools ---------------------------------------------

    def io_worker_started(self, worker: bytes, pid: int, now: float | None = None) -> None:
        """An overlay_io worker asked for the routes: it gets the session keys, and a new
        incarnation (pid) gets fresh send counter ranges for every key. A new one gets the
        keys only now: what a link that came up before carried was dropped there (at start,
        its request can come 0.1 s late: its socket connected before control's was bound,
        and ZeroMQ tries again 0.1 s later), so the resends of a fresh link's first
        messages count from ``now``."""
        if self._io_workers.get(worker) != pid:
            self._io_workers[worker] = pid
            for key in [k for k in self._generations if k[1] == worker]:
                self._generations[key] += 1
            if self.routing is not None and now is not None:
                self.routing.restart_fresh(now)
        self._keys_due.add(worker)

    def session_confirmed(self, recv_index: int, now: float, wall: float) -> None:
        if self.routing is not None:
            self.routing.confirm(recv_index)
            self._after(now, wall)

    def rekey_requested(self, slot: int, now: float, wall: float) -> None:
        if self.routing is not None:
            self.routing.links.request_rekey(slot)
            self._after(now, wall)

    def peer_moved(self, slot: int, endpoint: str, now: float, wall: float) -> None:
        """An authentic datagram of link ``slot`` came from a new ``endpoint`` ("host:port")."""
        host, _, port = endpoint.rpartition(":")
        if self.routing is None or not port.isdigit():
            self.counters["bad_peer_moved"] += 1
            return
        self.routing.peer_moved(slot, (host, int(port)), now, wall)
        self._after(now, wall)

    def hop_silent(self, slot: int, now: float, wall: float) -> None:
        """overlay_io relays over link ``slot`` and hears nothing back from it."""
        self._now = now
        if self.routing is None:
            self.counters["bad_hop_silent"] += 1
            return
        if not self.routing.hop_silent(slot, now, wall):
            # a link made for a route: a Ping that any node answers; the Pong itself is
            # what overlay_io waits for (a datagram heard from the hop)
            self._hop_ping_seq = (self._hop_ping_seq + 1) % HOP_PING_BASE
            ping = messages.Ping(HOP_PING_BASE + self._hop_ping_seq, int(now * 1e9), "")
            self._overlay_out.append((slot, messages.encode_overlay(ping)))
            self.counters["hop_link_pings"] += 1
        self._after(now, wall)

    def dht_get(self, to: bytes, key: str, now: float, wall: float) -> None:
        """``supervisor dht get``: the answer comes as a ``Reply`` effect to ``to``."""
        if self.routing is None:
            reply = messages.DhtGetReply(key, False, "no_overlay", (), "", ())
            self._events.append(ev.Reply(to, reply))
            return
        self._tool_requests[self.routing.dht_get(key.encode(), now)] = (to, key)
        self._after(now, wall)

    def dht_put(
        self, to: bytes, key: str, value: bytes, lease_s: float, now: float, wall: float
    ) -> None:
        """``supervisor dht put``: a record signed by this node; the answer is a ``Reply``."""
        if self.routing is None:
            self._events.append(ev.Reply(to, messages.DhtPutReply(key, False, "no_overlay", "")))
            return
        try:
            rid = self.routing.dht.create(key.encode(), value, lease_s, now)
        except ValueError as exc:  # too long, bad lease
            reply = messages.DhtPutReply(key, False, f"invalid: {exc}", "")
            self._events.append(ev.Reply(to, reply))
            return
        self._tool_requests[rid] = (to, key)
        self.routing.pump()
        self._after(now, wall)

    def ping(self, to: bytes, peer: str, seq: int, now: float, wall: float) -> None:
        """``supervisor ping``: one Ping over the link to ``peer`` (a node name, a virtual
        address or a node id); the answer, with the path it took, is a ``Reply`` when the
        Pong comes (the tool gives up on its own after a while)."""
        slot, reason = self._find_peer(peer, now, wall)
        if slot is None:
            self._events.append(ev.Reply(to, messages.PingReply(peer, seq, False, reason)))
            return
        token = TOOL_PING_BASE + (seq % TOOL_PING_BASE)
        self._tool_pings[token] = (to, peer, seq, slot, now)
        for old in [k for k, v in self._tool_pings.items() if now - v[4] > TOOL_PING_KEEP_S]:
            del self._tool_pings[old]
        ping = messages.Ping(token, int(now * 1e9), self.settings.node_name)
        self._overlay_out.append((slot, messages.encode_overlay(ping)))

    def _find_peer(self, peer: str, now: float, wall: float) -> tuple[int | None, str]:
        routing = self.routing
        for p in self.settings.peers:
            if peer in (p.name, *p.addresses):
                return p.slot, ""
        if routing is None:
            return None, "unknown_peer"
        links = routing.links.links
        for slot, link in links.items():
            cert = link.certificate
            if link.up and cert is not None and peer in (cert.name, cert.node_id.hex()):
                return slot, ""
        try:
            address = IPv4Address(peer)
        except ValueError:
            return None, "unknown_peer"
        routed = routing.route_slot(address)
        if routed is not None:
            return routed, ""
        if address in self.settings.subnet:
            routing.route_miss(address, now, wall)  # resolve it: the next probe may find it
            self._after(now, wall)
            return None, "resolving"
        return None, "not_in_subnet"

    def _tool_pong(self, slot: int, pong: messages.Pong, now: float) -> None:
        pending = self._tool_pings.pop(pong.seq, None)
        if pending is None or pending[3] != slot:
            self.counters["tool_pong_unexpected"] += 1
            return
        to, peer, seq, _, sent = pending
        path, where, node = "direct", "", pong.node
        if self.routing is not None:
            link = self.routing.links.links.get(slot)
            if link is not None:
                if isinstance(link.endpoint, Via):
                    path = "relayed"
                    where = self.routing.relayed_via(link.endpoint.node_id) or ""
                else:
                    where = _text(link.endpoint)
                if link.certificate is not None:
                    node = f"{link.certificate.name} {link.certificate.node_id.hex()}"
        reply = messages.PingReply(
            peer, seq, True, "", round((now - sent) * 1000, 3), path, where, node
        )
        self._events.append(ev.Reply(to, reply))

    def netcheck(self, to: bytes, now: float) -> None:
        """``supervisor netcheck``: the NAT picture (local, reflexive and mapped endpoints,
        whether the mapping depends on the destination, the port mapping) as a Reply."""
        picture: dict[str, Any] = {"encrypted": self.routing is not None}
        if self.nat is not None:
            picture.update(self.nat.picture())
        if self.routing is not None:
            overlay = self.routing.overlay.address
            picture["overlay_reflexive"] = (
                f"{overlay[0]}:{overlay[1]}" if isinstance(overlay, tuple) else None
            )
            picture["shortcuts"] = self.routing.shortcuts.paths(now)
        self._events.append(ev.Reply(to, messages.NetcheckReply(picture)))

    def set_revocations(self, revoked: RevocationList, now: float, wall: float) -> None:
        if self.routing is not None:
            self.routing.set_revocations(revoked)
            self._after(now, wall)

    def handle_timer(self, now: float, wall: float) -> None:
        self._now = now
        routing = self.routing
        linked = None if routing is None else {s.slot for s in routing.links.sessions()}
        for slot, ping in self.liveness.handle_timer(now):
            if linked is None or slot in linked:
                self._overlay_out.append((slot, messages.encode_overlay(ping)))
        self._liveness_events()
        if self.nat is not None:
            self.nat.handle_timer(now)
        if routing is not None:
            routing.handle_timer(now, wall)
        if self.addressing is not None:
            self.addressing.handle_timer(now, wall)
        for _, c in self._crawls.values():
            c.handle(now)
        self._after(now, wall)

    # -- the glue --------------------------------------------------------------------------------

    def _after(self, now: float, wall: float) -> None:
        """Move what the layers produced between them and into the outputs, until quiet."""
        routing, addressing, nat = self.routing, self.addressing, self.nat
        if routing is None:
            return
        if nat is not None:
            self._events += nat.events()
            if nat.candidates_version != self._candidates_seen:
                self._candidates_seen = nat.candidates_version
                found = nat.candidates()
                local = [c.endpoint for c in found if c.kind is CandidateKind.LOCAL]
                routing.set_endpoints(
                    local,
                    [c for c in found if c.kind is not CandidateKind.LOCAL],
                    mapping_varies=nat.mapping_varies,
                    public_ip=nat.public_ip,
                )
                routing.pump()
        self._links_step(now, wall)
        while True:
            results = routing.dht_results()
            for result in results:
                request = self._tool_requests.pop(getattr(result, "request_id", -1), None)
                if request is not None:
                    self._reply(request, result)
                elif addressing is not None:
                    addressing.dht_result(result, now)
            if not results:
                break
        if addressing is not None:
            self._tap_out += addressing.frames_to_tap()
            self._packets_out += addressing.packets_to_send()
            self._events += addressing.events()
        links = routing.links.links
        for datagram, to in routing.handshakes_to_send():
            slot = next((sl for sl, lk in links.items() if lk.endpoint == to), 0)
            self._handshakes_out.append((datagram, to, slot))
        self._overlay_out += routing.overlay_to_send()
        self._probes_out += routing.probes_to_send()
        self._pools_out += routing.pools_to_send()
        for event in routing.events():
            if isinstance(event, ev.HandshakeRefused):
                self._log_refusal(event, now)
            else:
                self._events.append(event)

    # -- supervisor map: the crawl -----------------------------------------------------------------

    def map(self, to: bytes, max_nodes: int, timeout_s: float, now: float, wall: float) -> None:
        """``supervisor map``: crawl the overlay breadth first through the overlay (crawl.py);
        the map is a ``MapReply`` when the crawl ends (complete, at ``max_nodes`` nodes, or
        after ``timeout_s``)."""
        self._now = now
        if self.routing is None:
            self._events.append(ev.Reply(to, messages.MapReply({"error": "no_overlay"})))
            return
        job = crawl.Crawl(
            self._own_links(),
            now=now,
            timeout_s=min(max(timeout_s, 0.1), MAP_TIMEOUT_MAX_S),
            next_id=self._new_query_id,
            max_nodes=min(max(max_nodes, 1), MAP_NODES_MAX),
        )
        self._crawl_seq += 1
        self._crawls[self._crawl_seq] = (to, job)
        self._after(now, wall)

    def _new_query_id(self) -> int:
        self._query_id = (self._query_id + 1) & 0xFFFF_FFFF
        return self._query_id

    def _own_links(self) -> crawl.NodeLinks:
        assert self.routing is not None
        address = self.address
        return crawl.own_links(
            self.routing.identity.node_id,
            self.settings.node_name,
            [str(address)] if address is not None else [],
            self.routing.map_connections(),
        )

    def _links_step(self, now: float, wall: float) -> None:
        """Answer crawl queries, take crawl answers, send the crawls' queries, reply for the
        crawls that ended."""
        routing = self.routing
        assert routing is not None
        links = routing.links
        for src, payload in routing.links_messages():
            try:
                msg = crawl.decode(payload)
            except RemoteProtocolError as exc:
                self.counters[f"map_dropped_{exc.reason}"] += 1
                continue
            if isinstance(msg, crawl.LinksQuery):
                if not self._answers.allow(now):
                    self.counters["map_queries_dropped"] += 1
                    continue
                self.counters["map_queries_answered"] += 1
                answer = crawl.make_answer(
                    self._own_links(),
                    crawler=src,
                    query_id=msg.query_id,
                    identity=routing.identity,
                    certificate=links.certificate,
                )
                routing.send_links(src, answer, now, wall)
                continue
            job = next((c for _, c in self._crawls.values() if c.expects(msg.query_id)), None)
            if job is None:
                self.counters["map_answer_unexpected"] += 1
                continue
            try:
                found = crawl.check_answer(
                    msg,
                    src=src,
                    crawler=routing.identity.node_id,
                    ca=links.ca,
                    revoked=links.revoked,
                    networks=links.networks,
                    wall=wall,
                )
            except RemoteProtocolError as exc:
                self.counters[f"map_refused_{exc.reason}"] += 1
                job.refused += 1
                continue
            if not job.answer(msg.query_id, found, now):
                self.counters["map_refused_wrong_node"] += 1
                job.refused += 1
        for key, (to, job) in list(self._crawls.items()):
            for node_id, query_id in job.queries_to_send():
                routing.send_links(node_id, crawl.encode(crawl.LinksQuery(query_id)), now, wall)
            if job.finished:
                del self._crawls[key]
                self._events.append(ev.Reply(to, messages.MapReply(job.result())))

    def _reply(self, request: tuple[bytes, str], result: object) -> None:
        to, key = request
        if isinstance(result, GetResult):
            assert self.routing is not None
            position = key_position(key.encode())
            replicas = self.routing.overlay.nearest(position, self.routing.dht.settings.replicas)
            reply: messages.Message = messages.DhtGetReply(
                key,
                result.ok,
                result.reason,
                tuple(
                    messages.DhtRecordSummary(
                        r.value, r.owner_id.hex(), r.seq, r.lease_s, r.deleted
                    )
                    for r in result.records
                ),
                id_to_bytes(position).hex(),
                tuple(id_to_bytes(n).hex() for n in replicas),
            )
        elif isinstance(result, CreateResult):
            holder = result.holder.hex() if result.holder else ""
            reply = messages.DhtPutReply(key, result.ok, result.reason, holder)
        else:
            return
        self._events.append(ev.Reply(to, reply))

    def _log_refusal(self, event: ev.HandshakeRefused, now: float) -> None:
        if now - self._refusal_window >= 1.0:
            if self._refusals_suppressed:
                self._events.append(ev.HandshakeRefusalsSuppressed(self._refusals_suppressed))
            self._refusal_window, self._refusals_logged, self._refusals_suppressed = now, 0, 0
        if self._refusals_logged >= REFUSALS_LOGGED_PER_S:
            self._refusals_suppressed += 1
            return
        self._refusals_logged += 1
        self._events.append(event)

    def _liveness_events(self) -> None:
        for change in self.liveness.events():
            self._version += 1
            rtt_ms = None if change.rtt_s is None else round(change.rtt_s * 1000, 3)
            if change.state is PeerState.UP:
                self._events.append(ev.PeerUp(change.name, change.slot, rtt_ms))
            else:
                self._events.append(ev.PeerDown(change.name, change.slot))

    # -- routes and keys -------------------------------------------------------------------------

    def _sync_version(self) -> None:
        """Bump the snapshot version if a layer's table changed since the last look."""
        routing, addressing = self.routing, self.addressing
        seen = (
            routing.routes_version if routing else 0,
            routing.links.sessions_version if routing else 0,
            addressing.machines_version if addressing else 0,
        )
        if seen != self._layers_seen:
            self._layers_seen = seen
            self._version += 1

    @property
    def address(self) -> IPv4Address | None:
        return self.routing.address if self.routing is not None else self.settings.address

    def snapshot(self) -> messages.RouteSnapshot:
        """The route table as classifier and overlay_io workers get it."""
        peers = tuple(
            messages.PeerRoute(
                slot=p.slot,
                name=p.name,
                addresses=p.addresses,
                endpoint=f"{p.endpoint[0]}:{p.endpoint[1]}",
                up=self.liveness.peers[p.slot].state is PeerState.UP,
            )
            for p in self.settings.peers
        )
        if self.routing is not None:
            peers += tuple(
                messages.PeerRoute(r.slot, r.name, r.addresses, r.endpoint, r.up)
                for r in self.routing.routes()
            )
        local: tuple[tuple[str, str], ...] = ()
        addressing = self.addressing
        if addressing is not None and addressing.settings.router:
            local = tuple((str(m.address), m.mac.hex()) for m in addressing.machines.values())
        address = self.address
        return messages.RouteSnapshot(
            self.epoch, self._version, peers, str(address) if address else "", local
        )

    def _session_keys(self, worker: bytes) -> messages.SessionKeys:
        assert self.routing is not None
        links = self.routing.links
        chosen = self.routing.chosen_relays()
        entries = []
        for sess in links.sessions():
            gen = self._generations.setdefault((sess.send_index, worker), 0)
            link = links.links[sess.slot]
            direct = isinstance(link.endpoint, tuple)
            entries.append(
                messages.KeyEntry(
                    slot=sess.slot,
                    recv_index=sess.recv_index,
                    recv_key=sess.recv_key,
                    send_index=sess.send_index,
                    send_key=sess.send_key,
                    counter_start=gen << GENERATION_SHIFT,
                    created=sess.created,
                    confirmed=sess.confirmed,
                    endpoint=_text(link.endpoint) if direct else "",
                    node_id=link.certificate.node_id if link.certificate else b"",
                    via=b"" if direct else chosen.get(sess.slot, b""),
                    cipher=sess.cipher,
                )
            )
        return messages.SessionKeys(
            links.sessions_version,
            tuple(entries),
            self.routing.identity.node_id,
            self.routing.tunnels(),
            self.routing.relay_hops(),
        )

    # -- what status shows -----------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """control's part of ``supervisor status``."""
        routing = self.routing
        links = routing.links if routing is not None else None
        sessions = links.sessions() if links is not None else []
        peers = []
        for p in self.settings.peers:
            live = self.liveness.peers[p.slot]
            link = links.links.get(p.slot) if links is not None else None
            mine = [x for x in sessions if x.slot == p.slot]
            cert = link.certificate if link is not None else None
            peers.append(
                {
                    "name": p.name,
                    "slot": p.slot,
                    "endpoint": _text(link.endpoint if link is not None else p.endpoint),
                    "addresses": list(p.addresses),
                    "state": live.state.value,
                    "rtt_ms": None if live.rtt_s is None else round(live.rtt_s * 1000, 3),
                    "last_heard_s": None
                    if live.last_heard is None
                    else round(now - live.last_heard, 1),
                    "pings_sent": live.pings_sent,
                    "pongs_received": live.pongs_received,
                    "node_id": cert.node_id.hex() if cert is not None else None,
                    "sessions": len(mine),
                    "session_age_s": round(now - mine[-1].created, 1) if mine else None,
                    "pattern": mine[-1].pattern.name if mine else None,
                    "cipher": mine[-1].cipher.value if mine else None,
                    "handshakes": link.handshakes if link is not None else 0,
                }
            )
        address = self.address
        out: dict[str, Any] = {
            "peers": peers,
            "route_version": self._version,
            "drops": dict(self.counters),
            "address": str(address) if address else None,
        }
        if self.addressing is not None:
            out["addressing"] = self.addressing.statistics()
        if self.nat is not None:
            out["port_mapping"] = self.nat.port_mapping()
        if routing is not None:
            out["node_id"] = routing.identity.node_id.hex()
            out["links"] = routing.links.statistics()
            out["overlay"] = routing.statistics()
            out["link_table"] = routing.link_table(now)
        return out


def _text(target: object) -> str:
    if isinstance(target, Via):
        return str(target)
    if isinstance(target, tuple) and len(target) == 2:
        return f"{target[0]}:{target[1]}"
    return str(target)
