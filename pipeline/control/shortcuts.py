"""Shortcuts: direct paths between two nodes whose link is relayed, punched through NATs.
Sans-I/O. Pure.

Theory of operation:

- **When.** A link whose datagrams are relayed through the overlay (its endpoint is
  ``Via`` a node id) and that carries traffic (a route uses it: the driver says ``want``)
  gets a shortcut attempt at once. A link that is direct already needs none.
- **Candidates.** Each node knows its own candidate endpoints (``set_candidates``): the
  local addresses of its port, its reflexive addresses (the overlay's HelloAck and STUN
  say where it is seen from) and port mappings its gateway granted. Candidates travel over
  the relayed link itself (end to end sealed, so only the peer reads them).
- **Rounds, and who punches first.** A Linux NAT gateway that accepts unsolicited packets
  on its WAN keeps the peer's early probe as an ``[UNREPLIED]`` conntrack entry, and the
  node behind it then has its own probe re-mapped to another port: the punch fails. It
  does not fail if the node behind that gateway sends first. So each round has a *first*
  side, that probes as soon as it has the other's candidates, and a *second* side, that
  probes only once the first says ``PathGo`` (sent after its first probe left, so the
  first's NAT mapping exists when the second's probes arrive). Round 1: the initiator is
  first; round 2 swaps. Between rounds both sides stay quiet for ``QUIET_S`` (longer than
  the 30 s a Linux gateway keeps an unreplied UDP entry), so a stale entry of the round
  before is gone. After ``ROUNDS`` rounds the link stays relayed and the attempt starts
  over after a back-off (``RETRY_S``, doubling up to ``RETRY_MAX_S``).
- **Probes.** A ``Probe`` goes to every candidate of the peer, sealed with the link's own
  session as a PROBE datagram (overlay_io seals it: ``probes_to_send``), at
  ``PROBE_TIMES`` after the side starts. A probe that arrives is answered with a
  ``ProbeAck`` to the endpoint it came from (which tells the prober where it was seen).
  The first ``ProbeAck`` is a working path: ``PathFound``. A path found over a *local*
  candidate (both nodes on one LAN) replaces one found over another kind, if it comes
  within ``PREFER_LOCAL_S``: hairpinning through the shared gateway is not assumed.
- **Birthday probing** (one side's NAT maps per destination: ``MASQUERADE --random-fully``).
  Such a node (``set_varies(public_ip)``: netcheck saw two ports) advertises no reflexive
  candidate, but its offer and answer carry its public IP (``varies``). Then the *hard*
  side probes first in every round: besides its usual probes it asks overlay_io for a pool
  of ``pool_sockets`` extra UDP sockets (``pools_to_send``: slot, endpoint, payload) and
  sends one sealed Probe from each to every reflexive candidate of the easy side
  (``POOL_SENDS`` times): each opens a mapping on its gateway to a random public port. The
  *easy* side, on ``PathGo``, sprays ``spray_probes`` Probes to distinct random ports
  (``SPRAY_PORTS``) of the hard side's IP over ``SPRAY_S`` (``SPRAY_TICK_S`` apart, so
  about 340 a second at the defaults). A spray probe that lands on a port the hard side's
  gateway mapped passes its conntrack entry (the reply direction of the pool socket's
  probe) and reaches that pool socket; overlay_io keeps the first socket an authentic
  datagram of the link arrives on for the link, and closes the rest. Its answer goes back
  through the same entry and passes the easy side's gateway, which holds the spray's own
  entry to that port: both sides find the path as above. With 256 sockets and 1024
  probes over the 64512 ports a Linux NAT picks from, a hit has probability
  ``1 - exp(-256 * 1024 / 64512)``, about 98 %. An easy side with a mapped port (PCP,
  NAT-PMP, UPnP) needs none of it: the hard side's ordinary probes reach that port, so
  there is no pool and no spray. A round that ends without a path closes the pool
  (``pools_to_send`` with endpoint None). Where both sides vary, nothing of this runs: the
  link stays relayed, and the relay is chosen (below).
- **A chosen relay** (both sides' NATs map per destination). A hard node's offer and answer
  also list its direct links that may relay (``set_relays``: node id and RTT, at most
  ``RELAYS_MAX``, the fastest). With both lists, each side picks the same member: the one
  in both with the least sum of the two RTTs (ties: the smaller id), and says so
  (``RelayChosen``): the link's relayed datagrams go to that member first (which reaches
  the peer directly), not along the overlay's greedy path. (Each side's choice steers only
  what it sends; two lists that changed in between may make two choices, both good.)
- **Keeping it.** Every ``KEEPALIVE_S`` the path is probed again (that holds the NAT
  mappings open); ``LOST_AFTER`` unanswered keepalives in a row lose it (``PathLost``):
  the link goes back to its relay and a new attempt follows.

Inputs: ``want(slot, node_id, initiator, now)``, ``forget(slot)``, ``set_candidates``,
``receive(slot, message, now)`` (PathOffer, PathAnswer, PathGo that came over the link),
``receive_probe(slot, payload, source, now)`` (a PROBE datagram's payload and where it
came from), ``handle_timer(now)``. Outputs: ``messages_to_send()`` (slot, payload: over
the link), ``probes_to_send()`` (slot, endpoint, payload), ``events()`` (``PathFound``,
``PathLost``, ``ShortcutFailed``), ``next_deadline()``, ``paths()`` for status.
"""

# No ``from __future__ import annotations``: the records' annotations stay objects, so the
# msgspec decoders built at import need not evaluate strings (every node start imports this).

import enum
import ipaddress
import random
from collections.abc import Sequence

import msgspec

Address = tuple[str, int]

ROUNDS = 2
QUIET_S = 35.0
PROBE_TIMES = (0.0, 0.25, 0.5, 1.0, 1.5, 2.5, 4.0)
ROUND_S = 6.0  # a round without a path ends this long after it started
OFFER_RETRY_S = 1.0  # an unanswered offer goes again (the link may have been half made)
RETRY_S = 60.0
RETRY_MAX_S = 600.0
PREFER_LOCAL_S = 1.0
POOL_SOCKETS = 256  # birthday probing: the hard side's extra sockets (``[nat] pool_sockets``)
SPRAY_PROBES = 1024  # ... and the easy side's probes to random ports (``[nat] spray_probes``)
SPRAY_S = 3.0  # the spray is spread over this long ...
SPRAY_TICK_S = 0.1  # ... in batches this far apart
SPRAY_PORTS = (1024, 65535)  # the ports a Linux NAT picks from for a source port >= 1024
POOL_SENDS = (0, 3)  # the pool's probe goes out with the first and fourth regular probes
RELAYS_MAX = 8  # direct links a hard node offers as relays (the fastest)
KEEPALIVE_S = 20.0
ACK_WAIT_S = 5.0
LOST_AFTER = 3
MAX_CANDIDATES = 8


class CandidateKind(enum.StrEnum):
    LOCAL = "local"  # an address of the node's own interface
    MAPPED = "mapped"  # a port mapping the gateway granted (NAT-PMP, PCP, UPnP)
    REFLEXIVE = "reflexive"  # where others see the node (HelloAck, STUN)


_RANK = {CandidateKind.LOCAL: 0, CandidateKind.MAPPED: 1, CandidateKind.REFLEXIVE: 2}


class Candidate(msgspec.Struct, frozen=True):
    endpoint: Address
    kind: CandidateKind


# -- messages (msgpack, inside OVERLAY and PROBE datagrams of the link) -----------------------


class PathOffer(msgspec.Struct, tag=True, frozen=True):
    """Here are my candidates; in round ``round`` the sender probes first if
    ``sender_first``; ``varies``: the sender's NAT maps per destination, and this is its
    public IPv4 address ("" if not: older nodes send none)."""

    round: int
    sender_first: bool
    candidates: tuple[tuple[str, int, str], ...]
    varies: str = ""
    relays: tuple[tuple[bytes, float], ...] = ()  # (node id, RTT s): see set_relays


class PathAnswer(msgspec.Struct, tag=True, frozen=True):
    round: int
    candidates: tuple[tuple[str, int, str], ...]
    varies: str = ""
    relays: tuple[tuple[bytes, float], ...] = ()


class PathGo(msgspec.Struct, tag=True, frozen=True):
    """The first side's probes are out: the second may probe now."""

    round: int


class Probe(msgspec.Struct, tag=True, frozen=True):
    nonce: int
    sent: float


class ProbeAck(msgspec.Struct, tag=True, frozen=True):
    nonce: int
    sent: float
    seen: str  # "host:port" the probe came from


PathMessage = PathOffer | PathAnswer | PathGo
ProbeMessage = Probe | ProbeAck
_encoder = msgspec.msgpack.Encoder()
_path_decoder = msgspec.msgpack.Decoder(PathMessage)
_probe_decoder = msgspec.msgpack.Decoder(ProbeMessage)


def encode(msg: PathMessage | ProbeMessage) -> bytes:
    return _encoder.encode(msg)


def decode_path(data: bytes) -> PathMessage:
    """ValueError for anything that is not a path message."""
    msg: PathMessage = _path_decoder.decode(data)
    return msg


def decode_probe(data: bytes) -> ProbeMessage:
    msg: ProbeMessage = _probe_decoder.decode(data)
    return msg


# -- events -------------------------------------------------------------------------------------


class PathFound(msgspec.Struct, frozen=True):
    slot: int
    endpoint: Address
    kind: CandidateKind
    rtt: float
    round: int


class PathLost(msgspec.Struct, frozen=True):
    slot: int
    endpoint: Address


class ShortcutFailed(msgspec.Struct, frozen=True):
    slot: int
    rounds: int
    retry_in: float


class RelayChosen(msgspec.Struct, frozen=True):
    """Both NATs map per destination: link ``slot`` is relayed through ``node_id`` (the
    sum of both sides' RTTs to it: ``rtt``)."""

    slot: int
    node_id: bytes
    rtt: float


ShortcutEvent = PathFound | PathLost | ShortcutFailed | RelayChosen


class _Phase(enum.Enum):
    OFFERED = "offered"  # we sent an offer, wait for the answer
    PROBING = "probing"  # our probes go out (on schedule)
    WAITING = "waiting"  # second side: answered, wait for the first's PathGo
    QUIET = "quiet"  # between rounds
    DIRECT = "direct"  # a path works
    IDLE = "idle"  # failed: back off until retry_at


class _Path(msgspec.Struct):
    slot: int
    node_id: bytes
    initiator: bool
    phase: _Phase = _Phase.IDLE
    round: int = 0
    first: bool = True  # we probe first in this round
    started: float = 0.0
    theirs: tuple[Candidate, ...] = ()
    probes_sent: int = 0
    next_probe: float | None = None
    round_ends: float = 0.0
    offer_at: float = 0.0
    retry_at: float = 0.0
    backoff: float = RETRY_S
    nonces: dict[int, Candidate] = msgspec.field(default_factory=dict)
    endpoint: Address | None = None
    kind: CandidateKind | None = None
    found_at: float = 0.0
    confirmed: float = 0.0
    rtt: float | None = None
    keepalive_at: float = 0.0
    keepalive_sent: float | None = None
    unanswered: int = 0
    attempts: int = 0
    their_varies: str = ""  # the peer's public IP if its NAT maps per destination
    pooled: bool = False  # overlay_io holds a socket pool for this link (we are the hard side)
    spray: list[int] = msgspec.field(default_factory=list)  # ports still to spray
    spray_at: float | None = None
    spray_nonce: int = 0
    birthday: bool = False  # the path was found in a round with birthday probing
    relay: bytes = b""  # both NATs vary: the member chosen to relay through


class Shortcuts:
    def __init__(
        self,
        own_id: bytes,
        rng: random.Random,
        *,
        pool_sockets: int = POOL_SOCKETS,
        spray_probes: int = SPRAY_PROBES,
    ) -> None:
        """``own_id``: this node's id (two offers crossing: the larger id's stands);
        ``pool_sockets``, ``spray_probes``: birthday probing's bounds (0: none of it)."""
        self._own_id = own_id
        self._rng = rng
        self._pool_sockets = pool_sockets
        self._spray_probes = min(spray_probes, SPRAY_PORTS[1] - SPRAY_PORTS[0] + 1)
        self._own: tuple[Candidate, ...] = ()
        self._varies = ""  # our public IP if our NAT maps per destination
        self._relays: tuple[tuple[bytes, float], ...] = ()  # our direct links that may relay
        self._paths: dict[int, _Path] = {}
        self._messages: list[tuple[int, bytes]] = []
        self._probes: list[tuple[int, Address, bytes]] = []
        self._pools: list[tuple[int, Address | None, bytes]] = []
        self._events: list[ShortcutEvent] = []
        self.counters: dict[str, int] = {}

    # -- outputs ---------------------------------------------------------------------------------

    def messages_to_send(self) -> list[tuple[int, bytes]]:
        out, self._messages = self._messages, []
        return out

    def probes_to_send(self) -> list[tuple[int, Address, bytes]]:
        out, self._probes = self._probes, []
        return out

    def pools_to_send(self) -> list[tuple[int, Address | None, bytes]]:
        """(slot, endpoint, payload): a Probe for overlay_io to seal with link ``slot``'s
        session and send from every socket of the link's pool (opened at the first) to
        ``endpoint``; (slot, None, b""): close the link's pool."""
        out, self._pools = self._pools, []
        return out

    def events(self) -> list[ShortcutEvent]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        times: list[float] = []
        for p in self._paths.values():
            if p.phase is _Phase.PROBING and p.next_probe is not None:
                times.append(p.next_probe)
            if p.phase is _Phase.PROBING and p.spray_at is not None:
                times.append(p.spray_at)
            if p.phase is _Phase.OFFERED:
                times.append(min(p.round_ends, p.offer_at))
            elif p.phase in (_Phase.PROBING, _Phase.WAITING):
                times.append(p.round_ends)
            elif p.phase is _Phase.QUIET:
                times.append(p.retry_at)
            elif p.phase is _Phase.DIRECT:
                times.append(p.keepalive_at)
        return min(times) if times else None

    def paths(self, now: float) -> dict[int, dict[str, object]]:
        """What status shows of each link's path attempt."""
        return {
            slot: {
                "phase": p.phase.value,
                "round": p.round,
                "endpoint": _text(p.endpoint) if p.endpoint else None,
                "kind": p.kind.value if p.kind else None,
                "rtt_ms": None if p.rtt is None else round(p.rtt * 1000, 3),
                "confirmed_s_ago": round(now - p.confirmed, 1) if p.endpoint else None,
                "candidates": [f"{_text(c.endpoint)} {c.kind}" for c in p.theirs],
                "attempts": p.attempts,
                "birthday": p.birthday,
                "peer_varies": bool(p.their_varies),
                "relay": p.relay.hex() if p.relay else None,
            }
            for slot, p in self._paths.items()
        }

    def direct(self, slot: int) -> Address | None:
        p = self._paths.get(slot)
        return p.endpoint if p is not None and p.phase is _Phase.DIRECT else None

    # -- inputs ----------------------------------------------------------------------------------

    def set_candidates(self, candidates: Sequence[Candidate]) -> None:
        """This node's candidate endpoints, best first (local, mapped, reflexive)."""
        unique = list(dict.fromkeys(candidates))
        unique.sort(key=lambda c: _RANK[c.kind])
        self._own = tuple(unique[:MAX_CANDIDATES])

    def set_varies(self, public_ip: str | None) -> None:
        """This node's NAT maps per destination (None: it does not), and its public IP is
        ``public_ip``: peers behind an endpoint-independent NAT may find it by birthday
        probing."""
        self._varies = public_ip or ""

    def set_relays(self, relays: Sequence[tuple[bytes, float]]) -> None:
        """This node's direct links that may relay, with their RTTs in seconds: offered to a
        peer whose NAT maps per destination too (the fastest ``RELAYS_MAX``)."""
        fastest = sorted(relays, key=lambda r: (r[1], r[0]))[:RELAYS_MAX]
        self._relays = tuple((node_id, round(rtt, 6)) for node_id, rtt in fastest)

    def chosen_relays(self) -> dict[int, bytes]:
        """Slot -> the member chosen to relay it through, for every link that has one."""
        return {slot: p.relay for slot, p in self._paths.items() if p.relay}

    def relay(self, slot: int) -> bytes | None:
        """The member chosen to relay link ``slot`` through, if one is."""
        p = self._paths.get(slot)
        return p.relay if p is not None and p.relay else None

    def want(self, slot: int, node_id: bytes, now: float) -> None:
        """Link ``slot`` (to ``node_id``) is relayed and carries traffic: find a direct path,
        unless an attempt is under way or backing off."""
        p = self._paths.get(slot)
        if p is None:
            p = self._paths[slot] = _Path(slot, node_id, initiator=True)
            self._start_round(p, 1, now)
        elif p.phase is _Phase.IDLE and now >= p.retry_at:
            p.initiator = True
            self._start_round(p, 1, now)

    def moved(self, now: float) -> None:
        """This node's own addresses changed (it roamed): every direct path is lost (its NAT
        mappings were those of the old address); the links go back to their relays, and a
        new attempt follows at the next traffic."""
        for p in self._paths.values():
            if p.phase is _Phase.DIRECT and p.endpoint is not None:
                self._lose(p, now)

    def _lose(self, p: _Path, now: float) -> None:
        assert p.endpoint is not None
        self._events.append(PathLost(p.slot, p.endpoint))
        self._count("paths_lost")
        p.endpoint, p.kind, p.keepalive_sent = None, None, None
        p.phase = _Phase.IDLE
        p.retry_at = now  # try again at the next traffic
        p.birthday = False
        self._close_pool(p)

    def forget(self, slot: int) -> None:
        """The link is gone (or became direct by other means)."""
        p = self._paths.pop(slot, None)
        if p is not None:
            self._close_pool(p)

    def _close_pool(self, p: _Path) -> None:
        if p.pooled:
            p.pooled = False
            self._pools.append((p.slot, None, b""))

    def receive(self, slot: int, message: PathMessage, node_id: bytes, now: float) -> None:
        """A path message that came over link ``slot`` (node ``node_id``)."""
        p = self._paths.get(slot)
        if isinstance(message, PathOffer):
            if (
                p is None
                or p.phase in (_Phase.IDLE, _Phase.QUIET, _Phase.DIRECT)
                or (p.phase is _Phase.OFFERED and self._own_id < node_id)
            ):
                p = p or _Path(slot, node_id, initiator=False)
                self._paths[slot] = p
                if p.phase is _Phase.DIRECT and p.endpoint is not None:
                    self._lose(p, now)  # the peer looks for a path again: it moved
                p.initiator = False
                p.round = message.round
                p.theirs = _candidates(message.candidates)
                p.their_varies = _ip(message.varies)
                self._choose_relay(p, message.relays)
                p.first = self._first(p, not message.sender_first)
                p.started = now
                p.round_ends = now + ROUND_S
                p.attempts += 1
                p.spray, p.spray_at = [], None
                self._messages.append((slot, encode(self._answer(p))))
                if p.first:
                    self._probe_from(p, now)
                    self._messages.append((slot, encode(PathGo(p.round))))
                else:
                    p.phase = _Phase.WAITING
            elif p.round == message.round and not p.initiator and p.phase is not _Phase.OFFERED:
                # our answer (or the offer's first copy) was lost: answer again
                self._messages.append((slot, encode(self._answer(p))))
                if p.first and p.phase is _Phase.PROBING:
                    self._messages.append((slot, encode(PathGo(p.round))))
                self._count("offer_repeated")
            else:
                self._count("offer_ignored")
        elif isinstance(message, PathAnswer):
            if p is None or p.phase is not _Phase.OFFERED or message.round != p.round:
                self._count("answer_ignored")
                return
            p.theirs = _candidates(message.candidates)
            p.their_varies = _ip(message.varies)
            self._choose_relay(p, message.relays)
            p.first = self._first(p, p.first)
            if p.first:
                self._probe_from(p, now)
                self._messages.append((slot, encode(PathGo(p.round))))
            else:
                p.phase = _Phase.WAITING
        elif isinstance(message, PathGo):
            if p is None or p.phase is not _Phase.WAITING or message.round != p.round:
                self._count("go_ignored")
                return
            self._probe_from(p, now)

    def receive_probe(self, slot: int, payload: bytes, source: Address, now: float) -> None:
        """A PROBE datagram on link ``slot`` from ``source`` (authentic: overlay_io opened
        it with the link's session)."""
        try:
            msg = decode_probe(payload)
        except ValueError:
            self._count("probe_undecodable")
            return
        p = self._paths.get(slot)
        if isinstance(msg, Probe):
            ack = ProbeAck(msg.nonce, msg.sent, _text(source))
            self._probes.append((slot, source, encode(ack)))
            self._count("probes_answered")
            if p is not None and p.phase is _Phase.WAITING:
                self._probe_from(p, now)  # the first side's mapping exists: our turn
            if p is not None and p.phase is not _Phase.DIRECT:
                # Their probe came through from ``source``: our answers go back the same way
                # (the reply direction of their NAT's mapping): a path for us too.
                kind = next((c.kind for c in p.theirs if c.endpoint == source), None)
                self._found(p, source, kind or CandidateKind.REFLEXIVE, None, now)
            return
        candidate = p.nonces.get(msg.nonce) if p is not None else None
        if p is None or candidate is None:
            self._count("ack_unexpected")
            return
        rtt = max(0.0, now - msg.sent)
        if p.phase is _Phase.DIRECT and p.endpoint == source:
            p.confirmed, p.unanswered, p.keepalive_sent = now, 0, None
            p.keepalive_at = now + KEEPALIVE_S
            p.rtt = rtt if p.rtt is None else 0.8 * p.rtt + 0.2 * rtt
            return
        better = (
            p.phase is _Phase.DIRECT
            and candidate.kind is CandidateKind.LOCAL
            and p.kind is not CandidateKind.LOCAL
            and now - p.found_at <= PREFER_LOCAL_S
        )
        if p.phase is _Phase.DIRECT and not better:
            return
        self._found(p, source, candidate.kind, rtt, now)

    def _found(
        self, p: _Path, endpoint: Address, kind: CandidateKind, rtt: float | None, now: float
    ) -> None:
        p.phase = _Phase.DIRECT
        p.endpoint, p.kind, p.rtt = endpoint, kind, rtt
        p.found_at = p.confirmed = now
        p.keepalive_at = now + (KEEPALIVE_S if rtt is not None else 0.0)
        p.keepalive_sent = None
        p.unanswered = 0
        p.backoff = RETRY_S
        p.spray, p.spray_at = [], None
        p.birthday = self._probing(p)
        self._count("birthday_paths_found" if p.birthday else "paths_found")
        self._events.append(PathFound(p.slot, endpoint, kind, rtt or 0.0, p.round))

    def handle_timer(self, now: float) -> None:
        for p in list(self._paths.values()):
            if p.phase is _Phase.PROBING and p.next_probe is not None and now >= p.next_probe:
                self._send_probes(p, now)
            if p.phase is _Phase.PROBING and p.spray_at is not None and now >= p.spray_at:
                self._send_spray(p, now)
            if p.phase in (_Phase.OFFERED, _Phase.PROBING, _Phase.WAITING) and now >= p.round_ends:
                self._end_round(p, now)
            elif p.phase is _Phase.OFFERED and now >= p.offer_at:
                self._send_offer(p, now)  # not answered yet: it may have been lost
            elif p.phase is _Phase.QUIET and now >= p.retry_at:
                if p.initiator:
                    self._start_round(p, p.round + 1, now)
                else:
                    p.phase = _Phase.IDLE  # the initiator starts the next round
                    p.retry_at = now + RETRY_MAX_S
            elif p.phase is _Phase.DIRECT and now >= p.keepalive_at:
                self._keepalive(p, now)

    # -- rounds ----------------------------------------------------------------------------------

    def _start_round(self, p: _Path, round_: int, now: float) -> None:
        p.round = round_
        p.first = self._first(p, (round_ % 2 == 1) == p.initiator)
        p.phase = _Phase.OFFERED
        p.spray, p.spray_at = [], None
        p.started = now
        p.round_ends = now + ROUND_S
        p.nonces.clear()
        p.attempts += 1
        self._send_offer(p, now)

    def _send_offer(self, p: _Path, now: float) -> None:
        offer = PathOffer(p.round, p.first, _wire(self._own), self._varies, self._offered())
        self._messages.append((p.slot, encode(offer)))
        p.offer_at = now + OFFER_RETRY_S
        self._count("offers_sent")

    def _probe_from(self, p: _Path, now: float) -> None:
        p.phase = _Phase.PROBING
        p.started = now
        p.round_ends = now + ROUND_S
        p.probes_sent = 0
        p.next_probe = now
        self._send_probes(p, now)

    def _send_probes(self, p: _Path, now: float) -> None:
        for candidate in p.theirs:
            nonce = self._rng.getrandbits(63)
            p.nonces[nonce] = candidate
            self._probes.append((p.slot, candidate.endpoint, encode(Probe(nonce, now))))
        self._count("probes_sent", len(p.theirs))
        if self._probing(p):
            if self._varies and p.probes_sent in POOL_SENDS:
                self._send_pool(p, now)
            elif p.their_varies and p.probes_sent == 0:
                self._start_spray(p, now)
        p.probes_sent += 1
        if p.probes_sent < len(PROBE_TIMES):
            p.next_probe = p.started + PROBE_TIMES[p.probes_sent]
        else:
            p.next_probe = None

    # -- birthday probing (see the module docstring) -------------------------------------------

    def _first(self, p: _Path, first: bool) -> bool:
        """Who probes first: the hard side, in every round, when birthday probing runs (its
        pool's mappings must exist before the spray arrives); else as the rounds say."""
        if self._birthday(p):
            return bool(self._varies)
        return first

    def _birthday(self, p: _Path) -> bool:
        """Exactly one side's NAT maps per destination, and birthday probing is on."""
        if not self._pool_sockets or not self._spray_probes:
            return False
        return bool(self._varies) != bool(p.their_varies)

    def _probing(self, p: _Path) -> bool:
        """Birthday probing runs in this round: not if the easy side has a mapped port,
        which takes unsolicited probes (the ordinary ones get through there)."""
        easy = p.theirs if self._varies else self._own
        return self._birthday(p) and not any(c.kind is CandidateKind.MAPPED for c in easy)

    def _answer(self, p: _Path) -> PathAnswer:
        return PathAnswer(p.round, _wire(self._own), self._varies, self._offered())

    def _offered(self) -> tuple[tuple[bytes, float], ...]:
        """The relays we offer: only a node whose NAT varies (the peer's may too)."""
        return self._relays if self._varies else ()

    def _choose_relay(self, p: _Path, theirs: Sequence[tuple[bytes, float]]) -> None:
        """Both NATs vary: the member both reach with the least sum of RTTs relays the link
        (both sides compute the same one from the same two lists)."""
        if not (self._varies and p.their_varies):
            return
        ours = dict(self._relays)
        best: tuple[float, bytes] | None = None
        for node_id, rtt in theirs[:RELAYS_MAX]:
            if isinstance(node_id, bytes) and node_id in ours and rtt >= 0:
                score = (round(ours[node_id] + rtt, 6), node_id)
                best = score if best is None or score < best else best
        if best is None:
            self._count("relay_none_shared")
            return
        if best[1] != p.relay:
            p.relay = best[1]
            self._events.append(RelayChosen(p.slot, best[1], best[0]))
            self._count("relays_chosen")

    def _send_pool(self, p: _Path, now: float) -> None:
        """The hard side: one Probe from each socket of the pool to each reflexive endpoint
        of the peer."""
        targets = [c for c in p.theirs if c.kind is CandidateKind.REFLEXIVE]
        for candidate in targets:
            nonce = self._rng.getrandbits(63)
            p.nonces[nonce] = candidate
            self._pools.append((p.slot, candidate.endpoint, encode(Probe(nonce, now))))
        if targets:
            p.pooled = True
            self._count("pool_probes", len(targets))

    def _start_spray(self, p: _Path, now: float) -> None:
        """The easy side: ``spray_probes`` distinct random ports of the hard side's IP, to be
        probed over ``SPRAY_S``; one nonce for them all (where the answer came from is
        what counts)."""
        low, high = SPRAY_PORTS
        p.spray = self._rng.sample(range(low, high + 1), self._spray_probes)
        p.spray_nonce = self._rng.getrandbits(63)
        p.nonces[p.spray_nonce] = Candidate((p.their_varies, 0), CandidateKind.REFLEXIVE)
        p.spray_at = now
        self._count("sprays")
        self._send_spray(p, now)

    def _send_spray(self, p: _Path, now: float) -> None:
        ticks = max(1, round(SPRAY_S / SPRAY_TICK_S))
        batch = -(-self._spray_probes // ticks)
        ports, p.spray = p.spray[:batch], p.spray[batch:]
        payload = encode(Probe(p.spray_nonce, now))
        for port in ports:
            self._probes.append((p.slot, (p.their_varies, port), payload))
        self._count("spray_probes_sent", len(ports))
        p.spray_at = now + SPRAY_TICK_S if p.spray else None

    def _end_round(self, p: _Path, now: float) -> None:
        p.spray, p.spray_at = [], None
        self._close_pool(p)
        if p.round < ROUNDS:
            p.phase = _Phase.QUIET
            p.retry_at = now + QUIET_S
            self._count("rounds_failed")
            return
        p.phase = _Phase.IDLE
        p.retry_at = now + p.backoff
        self._events.append(ShortcutFailed(p.slot, p.round, p.backoff))
        p.backoff = min(2 * p.backoff, RETRY_MAX_S)
        self._count("shortcuts_failed")

    def _keepalive(self, p: _Path, now: float) -> None:
        """Probe the path; an answer (``receive_probe``) puts the next probe KEEPALIVE_S
        later, no answer within ACK_WAIT_S sends another, and LOST_AFTER unanswered in a row
        lose the path."""
        assert p.endpoint is not None and p.kind is not None
        if p.keepalive_sent is not None:
            p.unanswered += 1
            if p.unanswered >= LOST_AFTER:
                self._lose(p, now)
                return
        nonce = self._rng.getrandbits(63)
        p.nonces = {nonce: Candidate(p.endpoint, p.kind)}
        self._probes.append((p.slot, p.endpoint, encode(Probe(nonce, now))))
        p.keepalive_sent = now
        p.keepalive_at = now + ACK_WAIT_S

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


def _wire(candidates: Sequence[Candidate]) -> tuple[tuple[str, int, str], ...]:
    return tuple((c.endpoint[0], c.endpoint[1], c.kind.value) for c in candidates)


def _candidates(wire: Sequence[tuple[str, int, str]]) -> tuple[Candidate, ...]:
    """The peer's candidates that are plausible: IPv4 unicast literals and real ports."""
    out = []
    for host, port, kind in wire[:MAX_CANDIDATES]:
        try:
            address = ipaddress.IPv4Address(host)
            if not 0 < int(port) < 65536 or address.is_multicast or address.is_unspecified:
                continue
            out.append(Candidate((str(address), int(port)), CandidateKind(kind)))
        except ValueError:
            continue
    return tuple(out)


def _ip(text: str) -> str:
    """A peer's public IP as it sent it, if it is a plausible unicast IPv4 literal; else ""."""
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        return ""
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        return ""
    return str(address)


def _text(endpoint: Address) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"
