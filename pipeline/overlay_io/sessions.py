"""overlay_io's session table: which session seals for a peer, which opens a datagram, and what
to tell control. Pure: control's messages, datagram facts and ``now`` in; entries and
messages out. No clock, socket or ZeroMQ; the driver (``stage.py``) moves the bytes.

Theory of operation
===================

A *link* is control's authenticated relation with a peer (``pipeline/control/links.py``),
named on the rings by its slot; a *session* is one pair of keys of a link. The table holds
an entry per session direction:

- ``recv``: by our session index (what a datagram's header names), a ``RecvEntry`` per
  session control holds, confirmed or not: its ``RecvSession`` (and replay window), the slot
  of its link, and whether the peer is known to hold the keys (``confirmed``).
- ``send``: by slot, the ``SendEntry`` this worker seals with for a peer it reaches
  directly: the newest *confirmed* session of the link, its endpoint, and the peer's node id.
- ``relayed``: the same for links without a direct endpoint (made through the overlay):
  their datagrams are sealed end to end and wrapped in a relay payload for ``hop``, the slot
  of the direct link closest to the peer (``RelayTable``, computed when installed), or of
  the member control chose to relay through (``KeyEntry.via``: both NATs map per
  destination), while that one is a hop.
- ``by_source``: plaintext mode only (below): the receive entry of a peer by its endpoint.

Rules, kept from one ``install_keys`` to the next (control sends every session it holds,
on every change):

1. A session object lives as long as its key: an entry whose key is unchanged keeps its
   ``RecvSession`` (window) or ``SendSession`` (counter, byte volume), even when it moves
   between ``send`` and ``relayed`` (an endpoint found or lost): one send session object per
   key, so a nonce is never used twice.
2. Only confirmed sessions seal, the newest (by ``created``) of each link: a new session is
   used once the peer has shown it holds the keys, so a rekey leaves no gap. Confirmed is
   sticky: a datagram opened here confirms it before control hears of it.
3. Only the slots this worker owns (``worker_for_peer``) are sealed here: their counters
   live in this worker only. ``relay_table`` still takes every direct link of the node:
   whether this worker may seal for the hop is the sender's question (``owns``); if not,
   the relay payload goes to the owner through control.

What the table tells control, queued until ``reports_to_send()``:

- ``PeerMoved(slot, endpoint)``: an authentic datagram of a session came (not through a
  relay) from another endpoint than the session's previous one (``moved``): the peer
  roamed or its NAT remapped it, and control sends there from now on;
- ``SessionConfirmed(index)``: the first datagram opened on an unconfirmed session
  (``confirm``), once per session;
- ``RekeyRequest(slot)``: a send session carried its volume or its time (``check_rekeys``),
  once per session;
- ``HopSilent(slot)``: relay payloads go out over link ``slot`` but nothing has been opened
  from it for ``HOP_SILENT_S`` (``relayed_over``; the driver keeps ``heard``): at most once
  per ``HOP_REPORT_S`` a slot. Control pings the node and, if it stays silent, takes it out
  of the relay hops (``SessionKeys.hops``): relayed traffic goes around a crashed node
  within about two seconds, not when the overlay's timers close its link.

Plaintext mode (``security.insecure_plaintext``, for measuring the pipeline alone) has no
handshakes and no keys: ``install_routes`` puts a *null session* for each configured peer of
control's route snapshot into ``send`` (sealing is writing the header) and into
``by_source`` (opening is checking it), so the driver has one send path and one receive
path. Headers carry index 0 there, which no real session has; the driver looks a datagram's
entry up by index and, only when that misses, by source. Handshake datagrams are not passed
to control (``handshake_types`` is empty) and RELAY datagrams are ``bad_type``.

Later (GSO/GRO batches, NAT traversal): a ``SendEntry`` is the unit a batch to one peer is
sealed with, and its ``endpoint`` is an attribute the table may change under traffic (a
relayed peer found directly moves from ``relayed`` to ``send`` with the same object).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pipeline import messages
from pipeline.crypto.datapath import Parts, Payloads, ReadableBuffer, RecvSession, SendSession
from pipeline.errors import RemoteProtocolError
from pipeline.overlay_io.relay import RelayTable
from pipeline.topology import worker_for_peer
from pipeline.wire.overlay import HEADER, HEADER_LEN, VERSION, DatagramType

__all__ = [
    "NO_ENDPOINT",
    "Address",
    "NullRecvSession",
    "NullSendSession",
    "RecvEntry",
    "SendEntry",
    "SessionTable",
    "parse_address",
]

Address = tuple[str, int]  # an underlay endpoint: IPv4 address text, UDP port
NO_ENDPOINT: Address = ("", 0)  # a relayed session's endpoint: never sent to

HOPS_TOLD_MAX = 1024  # hop slots remembered for HopSilent before the memory is cleared
HOP_SILENT_S = 0.5  # a hop relayed over and not heard from this long is reported ...
HOP_REPORT_S = 0.5  # ... at most this often; control pings it, and a hop that has not
HOP_ANSWER_S = 1.0  # answered this long after the first report is left out until heard

# plain ints, not the IntEnum members: Python 3.11 specializes int hashing and indexing
_HANDSHAKE_TYPES = frozenset((int(DatagramType.HANDSHAKE), int(DatagramType.COOKIE)))
_PLAIN_TYPES = frozenset((int(DatagramType.DATA), int(DatagramType.OVERLAY)))
_PLAIN_HEADERS = tuple(HEADER.pack(VERSION, t, 0, 0, 0) for t in range(max(DatagramType) + 1))
_K = TypeVar("_K")
_V = TypeVar("_V")


def parse_address(text: str) -> Address:
    """``"host:port"`` as an ``Address``; ValueError if the port is not a number."""
    host, _, port = text.rpartition(":")
    return host, int(port)


class Sealer(Protocol):
    """What a send entry seals with: ``SendSession``, or ``NullSendSession`` in plaintext."""

    def seal(
        self, dtype: int, payload: ReadableBuffer, flags: int = 0
    ) -> Sequence[ReadableBuffer]: ...

    def seal_each(self, parts: Parts, dtype: int, payloads: Payloads, flags: int = 0) -> int: ...

    def needs_rekey(self, now: float) -> bool: ...


class Opener(Protocol):
    """What a receive entry opens with: ``RecvSession``, or ``NullRecvSession`` in plaintext."""

    @property
    def index(self) -> int: ...

    def open(self, datagram: ReadableBuffer) -> ReadableBuffer: ...

    def open_run(
        self,
        batch: memoryview,
        at: int,
        segment: int,
        dtype: int,
        opened: list[tuple[bytes, int]],
        drops: dict[str, int],
    ) -> tuple[int, int]: ...


class NullSendSession:
    """Plaintext mode's send session: ``SendSession``'s interface, no key and no counter."""

    __slots__ = ()

    def seal(self, dtype: int, payload: ReadableBuffer, flags: int = 0) -> list[ReadableBuffer]:
        """``[header, payload]``: the header with index and counter 0, the payload as given.
        (This call is all the work: keep it a plain positional one, which Python 3.11
        specializes; keyword-only parameters would cost 40-60 ns more per datagram.)"""
        if flags:
            return [HEADER.pack(VERSION, dtype, flags, 0, 0), payload]
        return [_PLAIN_HEADERS[dtype], payload]

    def seal_each(self, parts: Parts, dtype: int, payloads: Payloads, flags: int = 0) -> int:
        """``seal`` of each payload appended to ``parts``, each payload copied (a segment's
        view is overwritten by the next segment's headers before the batch goes out); returns
        the bytes of these datagrams."""
        header = HEADER.pack(VERSION, dtype, flags, 0, 0) if flags else _PLAIN_HEADERS[dtype]
        nbytes = 0
        for payload in payloads:
            parts.append(header)
            parts.append(bytes(payload))
            nbytes += HEADER_LEN + len(payload)
        return nbytes

    def needs_rekey(self, now: float) -> bool:
        return False


class NullRecvSession:
    """Plaintext mode's receive session: ``RecvSession``'s interface, no key and no window."""

    __slots__ = ()

    index = 0

    def open(self, datagram: ReadableBuffer) -> ReadableBuffer:
        """The payload after the header (a view when ``datagram`` is one).

        RemoteProtocolError: ``short_datagram``, ``bad_version``, ``bad_type`` (anything
        but DATA and OVERLAY: there are no handshakes and no relaying in plaintext)."""
        if len(datagram) < HEADER_LEN:
            raise RemoteProtocolError("short_datagram", f"{len(datagram)} bytes")
        if datagram[0] != VERSION:
            raise RemoteProtocolError("bad_version", f"version {datagram[0]}")
        if datagram[1] not in _PLAIN_TYPES:
            raise RemoteProtocolError("bad_type", f"type {datagram[1]}")
        return datagram[HEADER_LEN:]

    def open_run(
        self,
        batch: memoryview,
        at: int,
        segment: int,
        dtype: int,
        opened: list[tuple[bytes, int]],
        drops: dict[str, int],
    ) -> tuple[int, int]:
        """Plaintext peers are found by their endpoint, not by a session index: the driver
        opens their datagrams one by one. Nothing is opened here."""
        return at, 0


NULL_SEND = NullSendSession()
NULL_RECV = NullRecvSession()


@dataclass(slots=True, eq=False)
class SendEntry:
    """One send session of a link, where its datagrams go, and how."""

    session: Sealer
    key: bytes  # b"" for a null session
    endpoint: Address  # relayed: NO_ENDPOINT
    dest: bytes = b""  # the peer's node id: the dest of relay payloads
    hop: int = -1  # relayed: the slot of the direct link to hand them to (-1: none closer)
    via: bytes = b""  # relayed: the node id of a chosen relay (b"": the greedy next hop)
    rekey_asked: bool = False
    seal: Callable[..., Sequence[ReadableBuffer]] = field(init=False)  # (dtype, payload, flags)
    seal_each: Callable[..., int] = field(init=False)  # (parts, dtype, payloads, flags)

    def __post_init__(self) -> None:
        self.seal = self.session.seal  # bound once: the driver calls it per datagram
        self.seal_each = self.session.seal_each


@dataclass(slots=True, eq=False)
class RecvEntry:
    """One receive session of a link, and where what it opens goes."""

    session: Opener
    slot: int
    key: bytes  # b"" for a null session
    confirmed: bool
    classifier: int = 0  # the classifier worker of the slot (``worker_for_peer``)
    seen: Address | None = None  # where its latest datagram came from (direct, keyed only)
    open: Callable[[ReadableBuffer], ReadableBuffer] = field(init=False)

    def __post_init__(self) -> None:
        self.open = self.session.open  # bound once: the driver calls it per datagram


class SessionTable:
    """The sessions of one overlay_io worker (see the module docstring).

    ``send``, ``relayed``, ``recv`` and ``by_source`` are updated in place, so a driver may
    hold them; it reads them and the entries' ``seal``/``open``/``endpoint``/``slot``/
    ``classifier``, and asks the table everything else.
    """

    def __init__(
        self,
        *,
        worker: int,
        workers: int,
        classifiers: int,
        plaintext: bool = False,
        rekey_after_bytes: int | None = None,
    ) -> None:
        """``worker`` of ``workers`` overlay_io workers; ``classifiers``: how many classifier
        workers there are (the shards of inbound packets); ``rekey_after_bytes``: the
        payload volume after which a send session asks for a new one (None: no limit)."""
        self.worker = worker
        self.workers = workers
        self.classifiers = classifiers
        self.plaintext = plaintext
        self.rekey_after_bytes = rekey_after_bytes
        self.send: dict[int, SendEntry] = {}
        self.relayed: dict[int, SendEntry] = {}
        self.recv: dict[int, RecvEntry] = {}
        self.by_source: dict[Address, RecvEntry] = {}
        self.relay_table = RelayTable(b"", ())
        self.version = -1  # of the last SessionKeys installed
        # types passed to control as they are (no session): none without handshakes
        self.handshake_types: frozenset[int] = frozenset() if plaintext else _HANDSHAKE_TYPES
        self.no_route = "no_endpoint" if plaintext else "no_session"  # drop: slot unknown
        self._reports: list[messages.Message] = []
        self.heard: dict[int, float] = {}  # slot -> when a datagram of it was last opened
        self._hop_told: dict[int, float] = {}  # hop slot -> when HopSilent last went
        self._hop_asked: dict[int, float] = {}  # hop slot -> the first HopSilent of its silence
        self.suspect_hops: set[int] = set()  # hops left out: silent after control's ping
        self.hops_suspected = 0  # how often a hop was left out so
        self._own_id = b""
        self._hops: list[tuple[int, bytes]] = []  # (slot, node id) as control named them

    # -- installing ---------------------------------------------------------------------------

    def install_keys(self, keys: messages.SessionKeys) -> None:
        """Take control's sessions (every one it holds); keep the objects, counters and
        replay windows of the keys we have (rules 1-3). Ignored in plaintext mode."""
        if self.plaintext:
            return
        recv: dict[int, RecvEntry] = {}
        newest: dict[int, messages.KeyEntry] = {}
        for e in keys.entries:
            old = self.recv.get(e.recv_index)
            if old is not None and old.key == e.recv_key:
                old.confirmed = old.confirmed or e.confirmed
                recv[e.recv_index] = old
            else:
                opener = RecvSession(
                    e.recv_key, index=e.recv_index, created=e.created, cipher=e.cipher
                )
                shard = worker_for_peer(e.slot, self.classifiers)
                entry = RecvEntry(opener, e.slot, e.recv_key, e.confirmed, shard)
                entry.seen = parse_address(e.endpoint) if e.endpoint else None
                recv[e.recv_index] = entry
            if recv[e.recv_index].confirmed and (
                e.slot not in newest or newest[e.slot].created < e.created
            ):
                newest[e.slot] = e
        send: dict[int, SendEntry] = {}
        relayed: dict[int, SendEntry] = {}
        hops: list[tuple[int, bytes]] = []  # every direct link, whichever worker owns it
        allowed = None if keys.hops is None else frozenset(keys.hops)
        for slot, e in newest.items():
            if e.endpoint and (allowed is None or e.node_id in allowed):
                hops.append((slot, e.node_id))
            if not self.owns(slot):
                continue
            out = self._send_entry(slot, e)
            out.dest = e.node_id
            if e.endpoint:
                out.endpoint = parse_address(e.endpoint)
                send[slot] = out
            else:
                out.endpoint = NO_ENDPOINT
                out.via = e.via
                relayed[slot] = out
        by_node = {node_id: slot for slot, node_id in hops}
        for node_id, relay_id in keys.tunnels:  # tunnel neighbours: under their relay's slot
            relay_slot = by_node.get(relay_id)
            if relay_slot is not None and node_id not in by_node:
                hops.append((relay_slot, node_id))
        self._own_id, self._hops = keys.node_id, hops
        self.suspect_hops &= {slot for slot, _ in hops}
        _replace(self.recv, recv)
        _replace(self.send, send)
        _replace(self.relayed, relayed)
        self._route_relayed()
        self.version = keys.version

    def _route_relayed(self) -> None:
        """The relay table from the hops control named but the suspect ones, and each
        relayed session's hop from it."""
        hops = [(slot, node) for slot, node in self._hops if slot not in self.suspect_hops]
        self.relay_table = RelayTable(self._own_id, hops)
        by_node = {node: slot for slot, node in hops}
        for out in self.relayed.values():
            hop = by_node.get(out.via) if out.via else None
            if hop is None:
                hop = self.relay_table.next_hop(out.dest)
            out.hop = -1 if hop is None else hop

    def _send_entry(self, slot: int, e: messages.KeyEntry) -> SendEntry:
        """The entry that already seals with this key, wherever it was (its counter must go
        on), or a new one starting at the counter control reserved for this incarnation."""
        old = self.send.get(slot) or self.relayed.get(slot)
        if old is not None and old.key == e.send_key:
            return old
        sealer = SendSession(
            e.send_key,
            index=e.send_index,
            created=e.created,
            cipher=e.cipher,
            counter_start=e.counter_start,
            rekey_after_bytes=self.rekey_after_bytes,
        )
        return SendEntry(sealer, e.send_key, NO_ENDPOINT)

    def install_routes(self, snapshot: messages.RouteSnapshot) -> None:
        """Plaintext mode: a null session for each peer of control's route snapshot, sent
        to and known by its configured endpoint (a peer without one is left out). Ignored
        with keys: their endpoints come with the sessions."""
        if not self.plaintext:
            return
        send: dict[int, SendEntry] = {}
        by_source: dict[Address, RecvEntry] = {}
        for peer in snapshot.peers:
            try:
                endpoint = parse_address(peer.endpoint)
            except ValueError:
                continue
            shard = worker_for_peer(peer.slot, self.classifiers)
            send[peer.slot] = SendEntry(NULL_SEND, b"", endpoint)
            by_source[endpoint] = RecvEntry(NULL_RECV, peer.slot, b"", True, shard)
        _replace(self.send, send)
        _replace(self.by_source, by_source)
        self.version = snapshot.version

    # -- questions of the driver -----------------------------------------------------------------

    def owns(self, slot: int) -> bool:
        """Does this worker seal for ``slot`` (is its send counter here)?"""
        return worker_for_peer(slot, self.workers) == self.worker

    def relay_route(self, slot: int) -> SendEntry | str:
        """For a slot without a direct send session: the end-to-end entry to seal with and
        wrap for its ``hop``, or the drop reason (``no_session``, or ``no_endpoint`` in
        plaintext mode; ``relay_no_route`` when no direct link is closer to the peer)."""
        e2e = self.relayed.get(slot)
        if e2e is None:
            return self.no_route
        if e2e.hop < 0:
            return "relay_no_route"
        return e2e

    # -- what happened, and what to tell control ----------------------------------------------

    def relayed_over(self, hop: int, now: float) -> None:
        """A relay payload went out over link ``hop``: if nothing has been opened from that
        link for ``HOP_SILENT_S``, tell control (``HopSilent``, at most once a
        ``HOP_REPORT_S``), which pings the node; if that stays unanswered for
        ``HOP_ANSWER_S`` after the first report, the hop is suspect: left out of the relay
        table (relayed traffic takes the next closest hop) until it is heard again
        (``hop_heard``)."""
        heard = self.heard.get(hop, -HOP_SILENT_S)
        if now - heard < HOP_SILENT_S:
            return
        asked = self._hop_asked.get(hop)
        if asked is not None and asked > heard and now - asked >= HOP_ANSWER_S:
            self.suspect_hops.add(hop)
            self.hops_suspected += 1
            self._route_relayed()
            return
        if now - self._hop_told.get(hop, -HOP_REPORT_S) < HOP_REPORT_S:
            return
        if len(self._hop_told) >= HOPS_TOLD_MAX:
            self._hop_told.clear()
            self._hop_asked.clear()
        if asked is None or asked <= heard:
            self._hop_asked[hop] = now
        self._hop_told[hop] = now
        self._reports.append(messages.HopSilent(hop))

    def hop_heard(self, slot: int) -> None:
        """A datagram of suspect hop ``slot`` was opened: it is alive, a hop again."""
        if slot in self.suspect_hops:
            self.suspect_hops.discard(slot)
            self._hop_asked.pop(slot, None)
            self._route_relayed()

    def confirm(self, entry: RecvEntry) -> None:
        """A datagram opened on ``entry``: the peer holds its keys. Reported once."""
        if not entry.confirmed:
            entry.confirmed = True
            self._reports.append(messages.SessionConfirmed(entry.session.index))

    def moved(self, entry: RecvEntry, source: Address) -> None:
        """An authentic datagram of ``entry`` came from ``source``, not from where its
        previous one came: the peer moved (roaming, or a new NAT mapping). Control hears of
        it (``PeerMoved``) and sends there from now on. The first datagram only sets where
        the session is seen."""
        if entry.seen is not None and not self.plaintext:
            self._reports.append(messages.PeerMoved(entry.slot, f"{source[0]}:{source[1]}"))
        entry.seen = source

    def check_rekeys(self, now: float) -> None:
        """After sealing: ask control once for a new session for each send session that
        carried its volume or reached its age (``SendSession.needs_rekey(now)``)."""
        if self.plaintext:
            return  # null sessions never ask
        for slot, out in itertools.chain(self.send.items(), self.relayed.items()):
            if not out.rekey_asked and out.session.needs_rekey(now):
                out.rekey_asked = True
                self._reports.append(messages.RekeyRequest(slot))

    def reports_to_send(self) -> list[messages.Message]:
        """The messages for control since the last call, in order; the queue is emptied."""
        reports, self._reports = self._reports, []
        return reports

    def statistics(self) -> dict[str, int]:
        """How many keyed sessions the table holds (null sessions are none)."""
        send = 0 if self.plaintext else len(self.send) + len(self.relayed)
        return {"receive": len(self.recv), "send": send}

    def send_ciphers(self) -> dict[str, int]:
        """How many keyed send sessions seal with each data cipher (the handshakes' choice)."""
        out: dict[str, int] = {}
        for entry in (*self.send.values(), *self.relayed.values()):
            session = entry.session
            if isinstance(session, SendSession):  # not a null session (plaintext)
                name = session.cipher.value
                out[name] = out.get(name, 0) + 1
        return out


def _replace(table: dict[_K, _V], new: dict[_K, _V]) -> None:
    table.clear()
    table.update(new)
