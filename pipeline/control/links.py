"""Links: authenticated sessions with peers, made and remade by Noise handshakes. Sans-I/O.

Theory of operation:

- A *link* is this node's relation with one configured peer. It holds up to three
  *sessions* (pairs of keys, one per direction, each named by a random 32-bit index chosen
  by its receiver, and the data cipher they seal with): the current one, the one before it
  (so packets in flight during a rekey still decrypt) and a new one not yet confirmed.
- Each handshake agrees on its session's data cipher (``pipeline/crypto/handshake.py``): the
  initiator offers ``LinkSettings.ciphers``, the responder takes the first it allows too;
  none in common is a counted refusal (``no_common_cipher``), on either side.
- A handshake is Noise IK when the peer's public key is configured, XX when it is not. Each
  side's certificate travels in its encrypted payload and is checked against the network
  authority: signature, validity, network, revocation, that it is for the static key the
  peer proved it holds, that it is the configured peer's (its public key if configured, and
  the name the authority certified), and that the peer's configured addresses are ones its
  certificate allows. Any failure is a counted refusal.
- Sending on a session starts only once it is *confirmed*: the initiator's session is
  confirmed by the responder's answer (IK) and the responder's by the initiator's last
  message (XX) or by the first data that arrives on it (IK; ``confirm``). Until then the
  previous session carries the traffic, so a rekey leaves no gap.
- The session's initiator rekeys after ``rekey_after_s``; the responder does so if the
  initiator has not after ``rekey_after_s + 10``. Sessions are dropped after
  ``reject_after_s``. Two nodes that initiate at once: the one with the smaller node id
  ignores the other's initiation and keeps its own, which it sends again at once (once):
  the other's shows it listens now, and ours may have been lost before its port was bound.
- Junk costs little: without a valid mac1 (keyed by the network authority) a datagram is
  dropped before any Diffie-Hellman. Datagrams from an endpoint were screened by overlay_io
  before they came here (``pipeline/crypto/screen.py``: a bucket per source, cookies under
  load); the ones relayed through the overlay pass the same screen here, whose cookie
  replies go back the same way.
- A bare COOKIE header (a *resync hint*) echoing the index of one of our send sessions says
  the peer lost that session (it restarted): a new handshake to the endpoint we have for it.

Inputs: ``receive(datagram, source, now, wall)``, ``handle_timer(now, wall)``,
``confirm(index)``, ``request_rekey(slot)``, ``set_revocations(list, wall)``; ``now`` is the
monotonic clock and ``wall`` unix seconds (certificates and timestamps). Outputs:
``datagrams_to_send()``, ``events()``, ``next_deadline()``, ``sessions()``.
"""

from __future__ import annotations

import enum
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence

import msgspec

from pipeline.crypto import handshake as hs
from pipeline.crypto.cert import (
    Certificate,
    CertificateError,
    RevocationList,
    check_key,
    decode_certificate,
    verify,
)
from pipeline.crypto.ciphers import DEFAULT_CIPHERS, LEGACY_CIPHER, DataCipher
from pipeline.crypto.identity import Identity, x25519_public_from_ed25519
from pipeline.crypto.noise import CipherState, HandshakeState, NoiseError
from pipeline.crypto.screen import HandshakeScreen, ScreenSettings
from pipeline.errors import RemoteProtocolError
from pipeline.wire.overlay import HEADER_LEN, DatagramType
from pipeline.wire.stun import MAGIC_COOKIE as STUN_MAGIC_COOKIE

Address = tuple[str, int]
MAX_SESSIONS = 3
MAX_DYNAMIC_LINKS = 1024
MAX_SLOT = 0xFFFF
MAX_RESPONDING = 256
COOKIE_VALID_S = 110.0
RESYNC_S = 5.0  # a resync hint within this of a session's making is ignored


class LinkSettings(msgspec.Struct, frozen=True):
    rekey_after_s: float = 120.0
    reject_after_s: float = 180.0
    retry_s: float = 1.0
    retry_max_s: float = 16.0
    handshake_timeout_s: float = 5.0
    # an unanswered first message is sent again, the same bytes, after this, doubling, until
    # the timeout: a lost one (the peer's port not bound yet, at start) costs 0.2 s, not 5
    resend_s: float = 0.2
    load_threshold: int = 50  # handshake messages per second before cookies are demanded
    per_source_rate: float = 5.0  # handshakes per second and source address under load
    ciphers: tuple[DataCipher, ...] = DEFAULT_CIPHERS  # data ciphers allowed, best first


class Via(msgspec.Struct, frozen=True):
    """A node reached through the overlay, not at an endpoint: handshake datagrams to and
    from it travel inside overlay messages routed to its node id (the driver's job)."""

    node_id: bytes

    def __str__(self) -> str:
        return f"via:{self.node_id.hex()}"


Target = Address | Via
"""Where a link's datagrams go: an underlay endpoint, or through the overlay."""


class PeerSpec(msgspec.Struct, frozen=True):
    slot: int
    name: str
    endpoint: Address
    public_key: bytes | None  # Ed25519; None: learn it with XX
    addresses: tuple[str, ...]


class Session(msgspec.Struct):
    slot: int
    recv_index: int
    recv_key: bytes
    send_index: int
    send_key: bytes
    created: float
    initiator: bool
    confirmed: bool
    pattern: hs.Pattern
    cipher: DataCipher = LEGACY_CIPHER  # the data cipher the handshake agreed on


class _Pending(msgspec.Struct):
    state: HandshakeState
    pattern: hs.Pattern
    index: int
    started: float
    mac1: bytes
    cookie_used: bool
    datagram: bytes = b""  # the first message, as sent (resent as it is)
    resend_at: float = 0.0
    resends: int = 0
    crossed: bool = False  # sent again because the peer's own initiation crossed it


class _Responding(msgspec.Struct):
    """An XX handshake we answered, waiting for the initiator's last message."""

    state: HandshakeState
    index: int
    peer_index: int
    source: Target
    started: float
    cipher: DataCipher  # chosen from the initiator's first message, named in our answer


class Link(msgspec.Struct):
    spec: PeerSpec
    endpoint: Target
    dynamic: bool = False  # made by connect() or by an inbound member, not configured
    wanted: bool = True  # the driver needs it: (re)initiate handshakes; else let it expire
    want_id: bytes | None = None  # connect_node(): the node id the peer must prove
    sessions: list[Session] = msgspec.field(default_factory=list)
    pending: _Pending | None = None
    next_attempt: float = 0.0
    attempts: int = 0
    rekey_wanted: bool = False
    cookie: tuple[bytes, float] | None = None
    certificate: Certificate | None = None
    last_timestamp_ns: int = 0
    handshakes: int = 0

    @property
    def up(self) -> bool:
        return bool(self.sessions)


class EventKind(enum.Enum):
    LINK_FORMED = "link_formed"
    LINK_CLOSED = "link_closed"
    SESSION_ESTABLISHED = "session_established"
    HANDSHAKE_REFUSED = "handshake_refused"


class LinkEvent(msgspec.Struct, frozen=True):
    kind: EventKind
    slot: int | None
    peer: str | None
    reason: str = ""
    detail: str = ""
    source: Target | None = None
    node_id: str = ""
    pattern: str = ""
    cipher: str = ""  # SESSION_ESTABLISHED: the data cipher the handshake agreed on


class LinkManager:
    def __init__(
        self,
        *,
        identity: Identity,
        certificate: Certificate,
        ca: Certificate,
        network: str,
        peers: Sequence[PeerSpec],
        revoked: RevocationList,
        rng: Callable[[int], bytes],
        settings: LinkSettings = LinkSettings(),
        accept_members: bool = False,
        networks: Sequence[str] = (),
    ) -> None:
        self.identity = identity
        self.certificate = certificate
        self.ca = ca
        self.network = network
        self.revoked = revoked
        self.rng = rng
        self.settings = settings
        self.links = {p.slot: Link(p, p.endpoint) for p in peers}
        self.accept_members = accept_members
        self.networks = (network, *networks)  # members of these may link (the overlay's)
        self._next_slot = max(self.links, default=0) + 1
        self._mac1_key = hs.mac1_key(ca.public_key)
        self._cookie_key = hs.cookie_key(ca.public_key)
        self.counters: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        screening = ScreenSettings(
            load_threshold=settings.load_threshold, per_source_rate=settings.per_source_rate
        )
        self._screen = HandshakeScreen(ca.public_key, rng, 0.0, screening, self.refusals)
        self._responding: OrderedDict[int, _Responding] = OrderedDict()
        self._out: list[tuple[bytes, Target]] = []
        self._events: list[LinkEvent] = []
        self.sessions_version = 0

    # -- outputs ---------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Target]]:
        out, self._out = self._out, []
        return out

    def events(self) -> Iterator[LinkEvent]:
        while self._events:
            yield self._events.pop(0)

    def sessions(self) -> list[Session]:
        return [s for link in self.links.values() for s in link.sessions]

    def next_deadline(self) -> float:
        """When ``handle_timer`` must next run: a handshake to start or retry, one that times
        out, a session to rekey or drop, the cookie secret to change. Never in the past
        unless something is due now."""
        st = self.settings
        due = [math.inf]
        if self._responding:
            oldest = next(iter(self._responding.values()))
            due.append(oldest.started + st.handshake_timeout_s)
        for link in self.links.values():
            if link.pending is not None:
                due.append(link.pending.started + st.handshake_timeout_s)
                due.append(link.pending.resend_at)
            elif link.wanted:
                due.append(max(link.next_attempt, self._handshake_due(link)))
            if link.sessions:
                due.append(min(s.created for s in link.sessions) + st.reject_after_s)
        return min(due)

    def _handshake_due(self, link: Link) -> float:
        """When a wanted link with no handshake under way wants one (see
        ``_wants_handshake``)."""
        if link.rekey_wanted or not any(s.confirmed for s in link.sessions):
            return link.next_attempt
        newest = link.sessions[-1]
        return newest.created + self.settings.rekey_after_s + (0 if newest.initiator else 10.0)

    def statistics(self) -> dict[str, object]:
        return {**self.counters, **self._screen.counters, "refused": dict(self.refusals)}

    # -- timers ----------------------------------------------------------------------------------

    def handle_timer(self, now: float, wall: float) -> None:
        st = self.settings
        for index, resp in list(self._responding.items()):
            if now - resp.started >= st.handshake_timeout_s:
                del self._responding[index]
        for link in list(self.links.values()):
            self._expire(link, now)
            if link.spec.slot not in self.links:
                continue
            if link.pending and now - link.pending.started >= st.handshake_timeout_s:
                link.pending = None
                self.counters["handshake_timeouts"] += 1
            elif link.pending and now >= link.pending.resend_at:
                pending = link.pending
                pending.resends += 1
                pending.resend_at = now + st.resend_s * 2**pending.resends
                self._out.append((pending.datagram, link.endpoint))
                self.counters["initiations_resent"] += 1
            if (
                link.pending is None
                and now >= link.next_attempt
                and self._wants_handshake(link, now)
            ):
                self._initiate(link, now, wall)

    def _wants_handshake(self, link: Link, now: float) -> bool:
        if not link.wanted:
            return False
        if not any(s.confirmed for s in link.sessions):
            return True
        newest = link.sessions[-1]
        age = now - newest.created
        due = self.settings.rekey_after_s + (0 if newest.initiator else 10.0)
        return link.rekey_wanted or age >= due

    def _expire(self, link: Link, now: float) -> None:
        keep = [s for s in link.sessions if now - s.created < self.settings.reject_after_s]
        if len(keep) != len(link.sessions):
            link.sessions = keep
            self._changed()
            if not keep:
                self._close(link, "expired")
        if link.dynamic and not link.wanted and not link.sessions and link.pending is None:
            del self.links[link.spec.slot]

    # -- links the driver asks for ---------------------------------------------------------------

    def connect(
        self,
        target: Target,
        now: float,
        wall: float,
        node_id: bytes | None = None,
        *,
        want: bool = True,
    ) -> int:
        """A link to whoever answers at ``target`` (an endpoint, or ``Via`` a node id), or to
        the node ``node_id`` if given (the peer must prove it is that node); its slot. An
        existing link to that endpoint or node is reused (and wanted again). The handshake is
        XX: the peer's key is learnt from its certificate. ``want`` False: one handshake,
        and the link is kept only if the driver (``want``) or the peer keeps it."""
        for link in self.links.values():
            same_node = node_id is not None and (
                link.want_id == node_id
                or (link.certificate is not None and link.certificate.node_id == node_id)
            )
            if same_node or (node_id is None and link.endpoint == target):
                link.wanted = link.wanted or want
                if not link.up and link.pending is None and now >= link.next_attempt:
                    self._initiate(link, now, wall)
                return link.spec.slot
        link = self._new_link(target)
        link.want_id = node_id
        link.wanted = want
        self._initiate(link, now, wall)
        return link.spec.slot

    def release(self, slot: int) -> None:
        """The driver no longer needs this link: no more handshakes from this side; a link
        that the peer does not keep alive either expires with its sessions. A link that never
        came up is forgotten at once."""
        link = self.links.get(slot)
        if link is None or not link.dynamic:
            return
        link.wanted = False
        if not link.sessions:
            del self.links[slot]

    def close(self, slot: int, reason: str) -> None:
        """The peer is gone (the overlay found it dead): drop its sessions now, so nothing is
        sent into the void until it expires. A configured link tries again later."""
        link = self.links.get(slot)
        if link is None:
            return
        link.pending = None
        if link.sessions:
            link.sessions.clear()
            self._changed()
            self._close(link, reason)
        if link.dynamic:
            del self.links[slot]

    def want(self, slot: int) -> None:
        """Keep this link (one the peer made) alive from this side too."""
        link = self.links.get(slot)
        if link is not None:
            link.wanted = True

    def _new_link(self, target: Target) -> Link:
        dynamic = [lk for lk in self.links.values() if lk.dynamic]
        if len(dynamic) >= MAX_DYNAMIC_LINKS:
            raise RemoteProtocolError("too_many_links", f"{len(dynamic)} dynamic links")
        slot = self._next_slot
        while slot in self.links or slot > MAX_SLOT:
            slot = 1 if slot >= MAX_SLOT else slot + 1
        self._next_slot = slot + 1
        endpoint = target if isinstance(target, tuple) else ("0.0.0.0", 0)
        spec = PeerSpec(slot, "", endpoint, None, ())
        link = Link(spec, target, dynamic=True, wanted=False)
        self.links[slot] = link
        return link

    def set_endpoint(self, slot: int, target: Target) -> None:
        """The link's datagrams go to ``target`` from now on: a direct path found to a peer
        reached through the overlay (a shortcut), or back through the overlay when it is
        lost. The sessions stay; overlay_io learns the endpoint with the keys."""
        link = self.links.get(slot)
        if link is None or link.endpoint == target:
            return
        link.endpoint = target
        self._changed()

    def request_rekey(self, slot: int) -> None:
        link = self.links.get(slot)
        if link is not None:
            link.rekey_wanted = True

    def confirm(self, recv_index: int) -> None:
        for link in self.links.values():
            for s in link.sessions:
                if s.recv_index == recv_index and not s.confirmed:
                    s.confirmed = True
                    self._changed()

    def set_revocations(self, revoked: RevocationList) -> None:
        self.revoked = revoked
        for link in list(self.links.values()):
            if link.certificate is not None and revoked.contains(link.certificate):
                link.sessions.clear()
                link.pending = None
                link.certificate = None
                self._changed()
                self._close(link, "revoked")
                if link.dynamic:
                    del self.links[link.spec.slot]

    # -- initiating ------------------------------------------------------------------------------

    def _initiate(self, link: Link, now: float, wall: float) -> None:
        spec = link.spec
        pattern = hs.Pattern.IK if spec.public_key is not None else hs.Pattern.XX
        rs = x25519_public_from_ed25519(spec.public_key) if spec.public_key else None
        state = HandshakeState(
            pattern.protocol,
            initiator=True,
            prologue=hs.PROLOGUE,
            s=self.identity.x25519_private,
            rs=rs,
            rng=self.rng,
        )
        # XX's first message: the offer only (the answer, which picks, comes before our
        # certificate does)
        payload = self._payload(wall) if pattern is hs.Pattern.IK else self._offer()
        index = self._new_index()
        cookie = link.cookie[0] if link.cookie and now - link.cookie[1] < COOKIE_VALID_S else None
        datagram = hs.build_handshake(
            self._mac1_key,
            receiver_index=0,
            pattern=pattern,
            step=0,
            sender_index=index,
            noise=state.write_message(payload),
            cookie=cookie,
        )
        mac1 = datagram[-2 * hs.MAC_LEN : -hs.MAC_LEN]
        resend_at = now + self.settings.resend_s
        link.pending = _Pending(
            state, pattern, index, now, mac1, cookie is not None, datagram, resend_at
        )
        link.attempts += 1
        link.next_attempt = now + min(
            self.settings.retry_max_s, self.settings.retry_s * 2 ** min(link.attempts - 1, 8)
        )
        self._out.append((datagram, link.endpoint))
        self.counters["initiations_sent"] += 1

    def _payload(self, wall: float, choice: DataCipher | None = None) -> bytes:
        """Ours: the initiator's with its offer, the responder's with its ``choice``."""
        cert = self.certificate.encode()
        stamp = int(wall * 1e9)
        if choice is None:
            return hs.encode_payload(hs.HandshakePayload(cert, stamp, self.settings.ciphers))
        return hs.encode_payload(hs.HandshakePayload(cert, stamp, cipher=choice))

    def _offer(self) -> bytes:
        return hs.encode_payload(hs.HandshakePayload(b"", 0, self.settings.ciphers))

    def _new_index(self) -> int:
        used = {s.recv_index for link in self.links.values() for s in link.sessions}
        used |= {link.pending.index for link in self.links.values() if link.pending}
        used |= set(self._responding)
        while True:
            index = int.from_bytes(self.rng(4), "big")
            # never the STUN magic cookie: it is how a STUN answer on the node's port is told
            # apart from our own datagrams (pipeline/wire/stun.py, ``is_stun``)
            if index and index not in used and index != STUN_MAGIC_COOKIE:
                return index

    # -- receiving -------------------------------------------------------------------------------

    def receive(self, datagram: bytes, source: Target, now: float, wall: float) -> None:
        """A HANDSHAKE or COOKIE datagram from ``source``. Never raises on bad input."""
        if len(datagram) < HEADER_LEN:
            self._refuse("short_datagram", source)
            return
        try:
            if datagram[1] == DatagramType.COOKIE:
                self._receive_cookie(datagram, source, now, wall)
            else:
                self._receive_handshake(datagram, source, now, wall)
        except RemoteProtocolError as exc:
            self._refuse(exc.reason, source, exc.detail)

    def _receive_cookie(self, datagram: bytes, source: Target, now: float, wall: float) -> None:
        index = hs.cookie_receiver(datagram)
        if len(datagram) == HEADER_LEN:
            self._receive_resync_hint(index, source, now, wall)
            return
        link = next(
            (lk for lk in self.links.values() if lk.pending and lk.pending.index == index), None
        )
        if link is None or link.pending is None:
            raise RemoteProtocolError("unknown_index", f"cookie for {index}")
        cookie = hs.open_cookie_reply(self._cookie_key, datagram, link.pending.mac1)
        link.cookie = (cookie, now)
        self.counters["cookies_received"] += 1
        if not link.pending.cookie_used:  # answer at once with mac2, once per cookie
            link.pending = None
            self._initiate(link, now, wall)

    def _receive_resync_hint(self, index: int, source: Target, now: float, wall: float) -> None:
        """The peer does not hold the session we send on with ``index`` (it restarted): a
        new handshake toward the endpoint we have for it, not toward ``source``, unless one
        is under way or was made in the last ``RESYNC_S``. Only the peer (or whoever sees
        its traffic) knows the index: the hint's proof (``pipeline/crypto/screen.py``)."""
        link = next(
            (lk for lk in self.links.values() if any(s.send_index == index for s in lk.sessions)),
            None,
        )
        if link is None:
            raise RemoteProtocolError("unknown_index", f"resync hint for {index}")
        if link.pending is not None or any(now - s.created < RESYNC_S for s in link.sessions):
            self.counters["resync_hints_ignored"] += 1
            return
        self.counters["resyncs"] += 1
        self._initiate(link, now, wall)

    def _receive_handshake(self, datagram: bytes, source: Target, now: float, wall: float) -> None:
        msg = hs.parse_handshake(datagram)
        if not hs.check_mac1(self._mac1_key, datagram):
            self.counters["mac1_invalid"] += 1
            raise RemoteProtocolError("bad_mac1")
        if isinstance(source, Via) and not self._screen_relayed(datagram, source, now):
            return
        if msg.step == 0:
            self._respond(msg, source, now, wall)
        elif msg.step == 1:
            self._initiator_reply(msg, source, now, wall)
        else:
            self._responder_final(msg, source, now, wall)

    def _screen_relayed(self, datagram: bytes, source: Via, now: float) -> bool:
        """The screen overlay_io runs on datagrams from endpoints, for one that came through
        the overlay (``_pair``: counted by the node's id); its cookie replies go back so."""
        admitted = self._screen.screen(datagram, _pair(source), now)
        self._out += [(reply, source) for reply, _ in self._screen.datagrams_to_send()]
        return admitted

    def _respond(self, msg: hs.HandshakeMessage, source: Target, now: float, wall: float) -> None:
        state = HandshakeState(
            msg.pattern.protocol,
            initiator=False,
            prologue=hs.PROLOGUE,
            s=self.identity.x25519_private,
            rng=self.rng,
        )
        payload = _noise(state.read_message, msg.noise)
        self.counters["handshakes_received"] += 1
        if msg.pattern is hs.Pattern.XX:
            offer = hs.decode_payload(payload).ciphers if payload else ()  # b"": an old node
            cipher = hs.choose_cipher(offer, self.settings.ciphers)
            index = self._new_index()
            noise = state.write_message(self._payload(wall, cipher))
            self._responding[index] = _Responding(
                state, index, msg.sender_index, source, now, cipher
            )
            while len(self._responding) > MAX_RESPONDING:
                self._responding.popitem(last=False)
            self._send_step(msg.pattern, 1, index, msg.sender_index, noise, source)
            return
        link, cert, body = self._authenticate(state, payload, source, wall)
        cipher = hs.choose_cipher(body.ciphers, self.settings.ciphers)
        stamp = body.timestamp_ns
        if stamp == link.last_timestamp_ns:
            # the initiation we answered last, again: the peer sent it twice (it crossed
            # ours, or its resend timer fired before our answer came). Our answer is on its
            # way; this one is counted, not refused (a replay, if it is one, gains nothing)
            self.counters["initiations_repeated"] += 1
            return
        if stamp < link.last_timestamp_ns:
            raise RemoteProtocolError("replayed_initiation", f"timestamp {stamp}")
        if link.pending is not None and self.identity.node_id < cert.node_id:
            self.counters["crossed_initiations"] += 1
            # Our own initiation wins; theirs is dropped. Theirs shows the peer listens now:
            # if ours was lost while its port was not bound yet (both nodes starting at
            # once), it goes again at once, not at its next resend (up to 0.4 s away).
            # Once per initiation: a replay of theirs cannot make us send more.
            pending = link.pending
            if not pending.crossed:
                pending.crossed = True
                self._out.append((pending.datagram, link.endpoint))
                self.counters["initiations_resent"] += 1
            return
        link.last_timestamp_ns = stamp
        link.pending = None
        index = self._new_index()
        noise = state.write_message(self._payload(wall, cipher))
        self._send_step(msg.pattern, 1, index, msg.sender_index, noise, source)
        self._establish(
            link,
            state,
            index,
            msg.sender_index,
            source,
            now,
            initiator=False,
            confirmed=False,
            pattern=msg.pattern,
            cipher=cipher,
        )

    def _initiator_reply(
        self, msg: hs.HandshakeMessage, source: Target, now: float, wall: float
    ) -> None:
        link = next(
            (
                lk
                for lk in self.links.values()
                if lk.pending and lk.pending.index == msg.receiver_index
            ),
            None,
        )
        if link is None or link.pending is None or link.pending.pattern is not msg.pattern:
            raise RemoteProtocolError("unknown_index", f"reply for {msg.receiver_index}")
        pending = link.pending
        state = pending.state
        payload = _noise(state.read_message, msg.noise)
        found, cert, body = self._authenticate(state, payload, source, wall, expect=link)
        cipher = hs.offer_accepted(body.cipher, self.settings.ciphers)
        if msg.pattern is hs.Pattern.XX:
            noise = state.write_message(self._payload(wall))
            self._send_step(msg.pattern, 2, pending.index, msg.sender_index, noise, source)
        link.pending = None
        if found is not link:  # a placeholder that turned out to be a node we know
            found.wanted = found.wanted or link.wanted
            del self.links[link.spec.slot]
        self._establish(
            found,
            state,
            pending.index,
            msg.sender_index,
            source,
            now,
            initiator=True,
            # IK: the answer proves the responder holds the keys. XX: our last message gives
            # them; a first session may carry data at once (nothing to lose if it is lost),
            # a rekey waits for the peer's first datagram on it.
            confirmed=msg.pattern is hs.Pattern.IK or not any(s.confirmed for s in found.sessions),
            pattern=msg.pattern,
            cipher=cipher,
        )

    def _responder_final(
        self, msg: hs.HandshakeMessage, source: Target, now: float, wall: float
    ) -> None:
        resp = self._responding.get(msg.receiver_index)
        if resp is None:
            raise RemoteProtocolError("unknown_index", f"final for {msg.receiver_index}")
        payload = _noise(resp.state.read_message, msg.noise)
        del self._responding[msg.receiver_index]
        link, cert, body = self._authenticate(resp.state, payload, source, wall)
        link.last_timestamp_ns = max(link.last_timestamp_ns, body.timestamp_ns)
        self._establish(
            link,
            resp.state,
            resp.index,
            resp.peer_index,
            source,
            now,
            initiator=False,
            confirmed=True,
            pattern=msg.pattern,
            cipher=resp.cipher,
        )

    def _send_step(
        self, pattern: hs.Pattern, step: int, index: int, receiver: int, noise: bytes, to: Target
    ) -> None:
        datagram = hs.build_handshake(
            self._mac1_key,
            receiver_index=receiver,
            pattern=pattern,
            step=step,
            sender_index=index,
            noise=noise,
        )
        self._out.append((datagram, to))
        self.counters["responses_sent"] += 1

    # -- authentication --------------------------------------------------------------------------

    def _authenticate(
        self,
        state: HandshakeState,
        payload: bytes,
        source: Target,
        wall: float,
        expect: Link | None = None,
    ) -> tuple[Link, Certificate, hs.HandshakePayload]:
        """Who is this? The peer's certificate, checked every way; raises on any doubt. The
        link is ``expect`` (ours, that initiated), or the configured or known link of this
        node, or — for a member we accept — a new one."""
        body = hs.decode_payload(payload)
        cert = decode_certificate(body.certificate)
        network = next((n for n in self.networks if n in cert.networks), self.network)
        verify(cert, self.ca, now=wall, network=network, revoked=self.revoked)
        remote = state.remote_static
        if remote is None or x25519_public_from_ed25519(cert.public_key) != remote:
            raise CertificateError("key_mismatch", "the certificate is not for the handshake key")
        if isinstance(source, Via) and source.node_id != cert.node_id:
            raise RemoteProtocolError("wrong_node", f"routed from {source}, certified otherwise")
        if expect is not None and expect.want_id not in (None, cert.node_id):
            raise RemoteProtocolError("wrong_node", f"{cert.name} is not the node asked for")
        if cert.node_id == self.identity.node_id:
            raise RemoteProtocolError("self_link", "a handshake with this node itself")
        link = expect if expect is not None and not expect.dynamic else None
        link = link or self._link_for(cert, source, placeholder=expect)
        if link.dynamic:
            link.spec = msgspec.structs.replace(link.spec, name=cert.name)
            link.certificate = cert
            return link, cert, body
        if link.spec.public_key is not None:
            check_key(cert, link.spec.public_key)
        if cert.name != link.spec.name:  # the authority named this node otherwise
            raise RemoteProtocolError(
                "wrong_peer_name", f"certified as {cert.name!r}, configured as {link.spec.name!r}"
            )
        if cert.addresses:
            allowed = {str(a) for a in cert.addresses}
            if not set(link.spec.addresses) <= allowed:
                raise RemoteProtocolError("address_not_certified", f"{link.spec.name}")
        link.certificate = cert
        return link, cert, body

    def _link_for(self, cert: Certificate, source: Target, placeholder: Link | None = None) -> Link:
        """The link this certificate belongs to: a configured peer's (by public key where one
        is configured, else by the name the authority certified; never by address alone),
        else the link already made with this node, else ``placeholder`` (a link of ours to an
        endpoint, whose node we did not know), else a new link if members are accepted."""
        configured = [lk for lk in self.links.values() if not lk.dynamic]
        for link in configured:
            if link.spec.public_key == cert.public_key:
                return link
        for link in configured:
            if link.spec.public_key is None and link.spec.name == cert.name:
                return link
        for link in self.links.values():
            if link is placeholder:
                continue
            known = link.certificate is not None and link.certificate.node_id == cert.node_id
            if known or link.want_id == cert.node_id:
                return link
        if placeholder is not None:
            return placeholder
        if self.accept_members:
            return self._new_link(source)
        raise RemoteProtocolError("unknown_peer", f"{cert.name} ({cert.node_id.hex()})")

    def _establish(
        self,
        link: Link,
        state: HandshakeState,
        index: int,
        peer_index: int,
        source: Target,
        now: float,
        *,
        initiator: bool,
        confirmed: bool,
        pattern: hs.Pattern,
        cipher: DataCipher,
    ) -> None:
        i2r, r2i = state.split()
        send, recv = (i2r, r2i) if initiator else (r2i, i2r)
        was_up = link.up
        link.sessions.append(
            Session(
                link.spec.slot,
                index,
                _key(recv),
                peer_index,
                _key(send),
                now,
                initiator,
                confirmed,
                pattern,
                cipher,
            )
        )
        link.sessions = link.sessions[-MAX_SESSIONS:]
        if not (isinstance(source, Via) and was_up and isinstance(link.endpoint, tuple)):
            link.endpoint = source  # a direct endpoint is not given up for a relayed path
        link.attempts = 0
        link.rekey_wanted = False
        link.next_attempt = now + self.settings.retry_s
        link.handshakes += 1
        self.counters["handshakes_completed"] += 1
        self._changed()
        assert link.certificate is not None
        self._events.append(
            LinkEvent(
                EventKind.SESSION_ESTABLISHED,
                link.spec.slot,
                link.spec.name,
                node_id=link.certificate.node_id.hex(),
                pattern=pattern.name,
                source=source,
                cipher=cipher.value,
            )
        )
        if not was_up:
            self._events.append(
                LinkEvent(
                    EventKind.LINK_FORMED,
                    link.spec.slot,
                    link.spec.name,
                    node_id=link.certificate.node_id.hex(),
                    pattern=pattern.name,
                    source=source,
                )
            )

    def _close(self, link: Link, reason: str) -> None:
        self._events.append(
            LinkEvent(EventKind.LINK_CLOSED, link.spec.slot, link.spec.name, reason)
        )

    def _changed(self) -> None:
        self.sessions_version += 1

    def _refuse(self, reason: str, source: Target, detail: str = "") -> None:
        self.refusals[reason] += 1
        self._events.append(
            LinkEvent(EventKind.HANDSHAKE_REFUSED, None, None, reason, detail, source)
        )


def _pair(target: Target) -> Address:
    """A (host, port) pair for cookies and rate limits: a relayed node counts by its id."""
    return target if isinstance(target, tuple) else (target.node_id.hex(), 0)


def _noise(read: Callable[[bytes], bytes], message: bytes) -> bytes:
    try:
        return read(message)
    except NoiseError as exc:
        raise RemoteProtocolError("handshake_failed", exc.reason) from exc


def _key(cipher: CipherState) -> bytes:
    key = cipher.key
    assert key is not None, "a completed handshake has keys"
    return key
