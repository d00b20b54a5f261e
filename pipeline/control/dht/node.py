"""The DHT: signed, leased, replicated records on the structured overlay. Sans-I/O.

Layered like HTTP/3 on QUIC: ``Dht`` consumes the events of an ``OverlayNode``
(``handle_overlay_event``) and calls its methods (``send_to_key``, ``send_to_node``,
``nearest``); it never sees a socket. ``now`` is the caller's monotonic clock; the only
randomness is the ``rng`` given (request ids).

Theory of operation:

- **Placement.** A key (bytes, e.g. ``b"ip:lab:100.64.0.7"``) sits at BLAKE2b-160(key) on
  the circle. Its *responsible* node is the live node closest to that point (where
  ``send_to_key`` delivers); its *replicas* are the ``replicas`` (R, default 4) nodes
  nearest the point as the responsible node sees them (``nearest(key, R)``, itself first).
- **Records** are signed by their owner (``wire.DhtRecord``); every node checks the signature
  (and, for ``ip:`` keys, that the value is the owner's node id) on every store and every
  read result, and drops what fails (``statistics()["dropped_invalid_record"]``). The
  ``authority`` given (``authority.RecordAuthority``) checks the certificate a record
  carries the same way: a record of ``ip:<namespace>:`` or ``name:<namespace>:`` whose
  signer is not certified for the namespace is refused (``refused_record_<reason>``), and
  an ``EXISTS`` answer naming no record we may believe is asked again.
- **Bounded work per node.** The responsible node serves at most ``serving_per_node`` of
  one node's creates and gets at once (``refused_member_busy``: answered ``REFUSED``) and
  holds at most ``records_per_owner`` records of one owner (``refused_owner_full``). A record
  lives until its lease ends on the storing node's clock; tombstones (signed deletes) live
  ``min(lease, tombstone_max_s)`` so that a stale copy cannot resurrect a deleted record.
- **Create** (put if absent) goes to the responsible node, which decides alone and at once
  (it is single-threaded, so creates of one key are *serialised* there): no live record,
  or a tombstone → accept; a record of the same owner → accept if the sequence is higher
  (a renewal or a change; the same record again is an idempotent retry), else ``STALE``
  (the owner bumps its sequence past the stored one and tries again, once); a live record
  of another owner → ``EXISTS``, naming the holder. An accepted record is sent to the
  other replicas (``Store`` with an ack); the creator is told ``OK`` once a **majority of
  the replicas, the responsible node included,** hold it, ``NO_QUORUM`` after
  ``replica_timeout_s`` without one. A replica that holds a different live record of
  another owner keeps the one that wins ``wire.tie_break`` and answers with it; the
  responsible node merges it the same way, and the creator is told ``EXISTS`` if it lost.
- **Get** goes to the responsible node, which answers from its store; holding nothing for
  the key (it may have just become responsible), it first fetches from its replicas and
  keeps what they have (read repair).
- **Delete** is a signed tombstone with a higher sequence, accepted only over a record of
  the same owner (or over nothing); it is replicated like a create.
- **Replication under churn.** On ``NeighboursChanged`` every node sends each record it
  holds to the nodes of ``nearest(key, R)`` it has not yet sent it to (``Store`` without
  ack, carrying the remaining lease); every ``rehandover_s`` the responsible node sends
  each of its records to all its replicas again (lost datagrams, silent repairs). The
  receiver keeps the newer record, or the tie-break winner, and if its own record wins it
  sends it back, so both ends keep the same one. Expired records are dropped every
  ``sweep_s``; copies on nodes that are no longer replicas are not dropped before.
- **Owners renew**: a node re-creates each record it owns (a higher sequence) at half its
  lease, ``renew_retry_s`` later again after a failure; a renewal answered ``EXISTS``
  ends the ownership with a ``LeaseLost`` event.
- **Requests** time out after ``request_timeout_s`` and are sent again
  (``request_tries`` in all; at once on a ``RouteFailed``); then the result event says
  ``timeout``. A retry after no answer or a ``RouteFailed`` avoids the first hops of the
  earlier tries (``send_to_key(avoid=...)``), which may have crashed unnoticed; a crashed
  hop further on (on the way to the key or on the answer's way back) is the overlay's to
  go around (it re-routes what it forwarded over a link that then stayed silent), so a
  late answer to an earlier try still completes the request. A try made while the
  overlay node is not yet on the circle (idle, or joining without a near or far
  connection: ``on_circle``) waits until it is (its timeout running): the answer, routed
  to this node's id, could not find it before its neighbours link to it. It goes at the
  first ``NeighboursChanged`` that finds the node on the circle, not at ``Joined``: a
  joining node knows its place once the node closest to it has named its neighbours and
  one has answered its Hello, while ``Joined`` waits until its nearest neighbours' lists
  name no node between them and it, and a crashed node still named there holds that up
  for seconds (until its Hellos go unanswered). Such an early try's answer may miss this
  node (routed through a node between it and its neighbours that does not know it yet),
  so at ``Joined`` a try sent before it that is still unanswered goes again at once, the
  same try (``resent_on_join``).

**Consistency rule for create.** A key's creates are serialised at its responsible node;
a create succeeds when that node accepted it and a majority of the key's R replicas (the
responsible node counted) acknowledged it; of two creates of a free key at the same
responsible node, exactly the first wins. What churn can break: if the responsible node
changes (a node joins closer to the key, or the responsible one fails) before the records
have been handed over, two nodes can each see the key as free and two owners can each be
told ``OK``. The replicas then converge on one record (``wire.tie_break``, applied on
every store and handover, so every node keeps the same winner); the loser finds out at
its next renewal (``EXISTS`` → ``LeaseLost``), at most ``lease/2`` later, and must give
the name up (DHCP picks another address). Renewals also repair lost copies: a record
whose replicas all failed comes back with its owner's next renewal. A create that fails
with ``NO_QUORUM`` or ``timeout`` may still have been stored; it then holds the key until
its lease ends unless the owner retries (which renews it) or deletes it.

What the signatures do not stop: a replayed copy of an owner's latest record can be
stored again for at most its lease after the owner stopped renewing it (no trusted time
in the record); the tie-break can be biased by an owner that grinds signatures (it still
only gets keys no-one else holds at its responsible node). Inputs from the overlay never
raise: malformed payloads are counted drops (``statistics()["dropped_<reason>"]``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Collection
from typing import Protocol

import msgspec

from pipeline.control.dht import wire as w
from pipeline.control.dht.events import (
    CreateResult,
    DeleteResult,
    DhtEvent,
    GetResult,
    LeaseLost,
)
from pipeline.control.dht.wire import DhtRecord, Held, Status, check_record, key_position
from pipeline.control.overlay.events import Delivered, Joined, NeighboursChanged, RouteFailed
from pipeline.control.overlay.node import NodeState
from pipeline.crypto.identity import Identity
from pipeline.errors import RemoteProtocolError


class OverlayApi(Protocol):
    """The part of ``OverlayNode`` the DHT uses."""

    node_id: int

    def send_to_key(
        self, key: int, payload: bytes, now: float, *, avoid: Collection[int] = ()
    ) -> int: ...

    def send_to_node(self, node_id: int, payload: bytes, now: float) -> int: ...

    def nearest(self, key: int, k: int) -> list[int]: ...


class DhtSettings(msgspec.Struct, frozen=True):
    replicas: int = 4  # R: copies of each record, on the nodes nearest its key
    request_timeout_s: float = 3.0  # a client request without an answer this long ...
    request_tries: int = 3  # ... is sent again, this many times in all
    replica_timeout_s: float = 2.0  # the responsible node waits this long for replica acks
    fetch_timeout_s: float = 1.5  # ... and this long for replicas' records on a get
    renew_retry_s: float = 15.0  # a failed renewal is tried again after this (or lease/4)
    sweep_s: float = 10.0  # expired records are dropped this often
    rehandover_s: float = 60.0  # every record is offered to its replicas again this often
    tombstone_max_s: float = 600.0  # a tombstone lives at most this long
    max_records: int = 100_000  # records held for others; new keys beyond are refused
    records_per_owner: int = 4096  # records of one owner held; new keys beyond are refused
    serving_per_node: int = 32  # one node's creates and gets served here at once, at most


class _Entry(msgspec.Struct):
    record: DhtRecord
    expires: float
    sent_to: set[int]


class _Request(msgspec.Struct):
    """One of our own requests (create, get, delete), waiting for its Reply."""

    kind: str  # "create" | "get" | "delete"
    key: bytes
    record: DhtRecord | None
    deadline: float
    tries: int = 0
    internal: bool = False  # a renewal: no CreateResult
    stale_retried: bool = False
    message_id: int = -1
    first_hop: int | None = None  # where the last try went first
    avoid: tuple[int, ...] = ()  # first hops of tries that got no answer
    waiting: bool = False  # this try waits for the overlay to be on the circle
    early: bool = False  # this try went before Joined: again at Joined if unanswered


class _Serving(msgspec.Struct):
    """A request the responsible node is serving with its replicas' help."""

    kind: str  # "write" | "fetch"
    key: bytes
    client: int  # the requester's node id
    client_req: int
    record: DhtRecord | None  # write: the record being replicated
    waiting: set[int]
    needed: int  # write: acks still wanted from replicas
    deadline: float
    answered: bool = False


class _Owned(msgspec.Struct):
    value: bytes
    lease_s: float
    renew_at: float
    in_flight: int | None = None  # the renewal request id


class Dht:
    """One node's DHT over one overlay node. See the module docstring."""

    def __init__(
        self,
        overlay: OverlayApi,
        identity: Identity,
        *,
        rng: random.Random,
        settings: DhtSettings | None = None,
        seq_base: int = 0,
        certificate: bytes = b"",
        authority: Callable[[DhtRecord], str | None] | None = None,
    ) -> None:
        """``certificate``: this node's, encoded, carried by every record it signs;
        ``authority``: why a valid signed record may still not be held (``authority.py``),
        asked on every store and every read result."""
        self.overlay = overlay
        self.identity = identity
        self.settings = settings or DhtSettings()
        self._rng = rng
        self._seq = seq_base  # the owner's sequence: a driver passes e.g. wall-clock ms
        self._store: dict[bytes, _Entry] = {}
        self._certificate = certificate
        self._authority = authority
        self._per_owner: Counter[bytes] = Counter()  # owner key -> records held
        self._serving_for: Counter[int] = Counter()  # node id -> requests served for it now
        self._requests: dict[int, _Request] = {}
        self._by_message: dict[int, int] = {}
        self._serving: dict[int, _Serving] = {}
        self._owned: dict[bytes, _Owned] = {}
        self._events: list[DhtEvent] = []
        self._stats: Counter[str] = Counter()
        self._next_sweep: float | None = None
        self._next_rehandover: float | None = None

    # -- outputs and queries -----------------------------------------------------------------

    def events(self) -> list[DhtEvent]:
        out, self._events = self._events, []
        return out

    def statistics(self) -> dict[str, int]:
        return dict(self._stats)

    def next_deadline(self) -> float | None:
        times = [r.deadline for r in self._requests.values()]
        times += [s.deadline for s in self._serving.values()]
        times += [o.renew_at for o in self._owned.values() if o.in_flight is None]
        if self._next_sweep is not None:
            times.append(self._next_sweep)
        if self._next_rehandover is not None:
            times.append(self._next_rehandover)
        return min(times) if times else None

    def records(self, now: float) -> dict[bytes, DhtRecord]:
        """The live (not deleted, unexpired) records this node holds, by key."""
        return {
            k: e.record for k, e in self._store.items() if e.expires > now and not e.record.deleted
        }

    def owned(self) -> list[bytes]:
        """The keys this node owns and renews."""
        return list(self._owned)

    # -- commands ----------------------------------------------------------------------------

    def create(self, key: bytes, value: bytes, lease_s: float, now: float) -> int:
        """Put (key, value) if the key is free, or renew (and change) our own record; the
        answer is a ``CreateResult`` with the returned id. Renewed at half the lease from
        then on. ValueError if a limit is broken (key 1..256 bytes, value ≤ 1 KiB)."""
        record = self._sign(key, value, lease_s, deleted=False)
        return self._start("create", key, record, now)

    def get(self, key: bytes, now: float) -> int:
        """The live verified records of key, as a ``GetResult`` with the returned id."""
        if not 1 <= len(key) <= w.MAX_KEY:
            raise ValueError(f"a key is 1 to {w.MAX_KEY} bytes, got {len(key)}")
        return self._start("get", key, None, now)

    def delete(self, key: bytes, now: float) -> int:
        """Delete our record of key (a signed tombstone) and stop renewing it; the answer is
        a ``DeleteResult``. Only the owner's delete is accepted."""
        owned = self._owned.pop(key, None)
        lease = owned.lease_s if owned is not None else self.settings.tombstone_max_s
        record = self._sign(key, b"", min(lease, self.settings.tombstone_max_s), deleted=True)
        return self._start("delete", key, record, now)

    def handle_overlay_event(self, event: object, now: float) -> None:
        """Feed every event of the overlay node here (others' payloads are ignored)."""
        self._ensure_timers(now)
        if isinstance(event, Delivered):
            self._on_delivered(event, now)
        elif isinstance(event, RouteFailed):
            rid = self._by_message.pop(event.message_id, -1)
            request = self._requests.get(rid)
            if request is not None:
                self._stats["route_failed"] += 1
                self._retry_or_fail(rid, request, now, "route_failed")
        elif isinstance(event, NeighboursChanged):
            self._handover(now)
            if getattr(self.overlay, "on_circle", False):
                self._send_waiting(now)
        elif isinstance(event, Joined):
            self._send_waiting(now)
            for rid, request in list(self._requests.items()):
                if request.early and rid in self._requests:
                    self._stats["resent_on_join"] += 1
                    self._by_message.pop(request.message_id, None)
                    request.deadline = now + self.settings.request_timeout_s
                    self._transmit(rid, request, now)

    def _send_waiting(self, now: float) -> None:
        for rid, request in list(self._requests.items()):
            if request.waiting and rid in self._requests:
                request.deadline = now + self.settings.request_timeout_s
                self._transmit(rid, request, now)

    def handle_timer(self, now: float) -> None:
        self._ensure_timers(now)
        for rid, request in list(self._requests.items()):
            if request.deadline <= now and rid in self._requests:
                self._stats["request_timeouts"] += 1
                self._retry_or_fail(rid, request, now, "timeout")
        for sid, serving in list(self._serving.items()):
            if serving.deadline <= now:
                self._finish_serving(sid, serving, now)
        for key, owned in list(self._owned.items()):
            if owned.in_flight is None and owned.renew_at <= now:
                self._stats["renewals"] += 1
                record = self._sign(key, owned.value, owned.lease_s, deleted=False)
                owned.in_flight = self._start("create", key, record, now, internal=True)
        if self._next_sweep is not None and now >= self._next_sweep:
            self._next_sweep = now + self.settings.sweep_s
            for key, entry in list(self._store.items()):
                if entry.expires <= now:
                    self._drop(key)
                    self._stats["expired"] += 1
        if self._next_rehandover is not None and now >= self._next_rehandover:
            self._next_rehandover = now + self.settings.rehandover_s
            self._handover(now, periodic=True)

    # -- client side -------------------------------------------------------------------------

    def _sign(self, key: bytes, value: bytes, lease_s: float, *, deleted: bool) -> DhtRecord:
        self._seq += 1
        return w.sign_record(
            self.identity,
            key,
            value,
            seq=self._seq,
            lease_s=lease_s,
            deleted=deleted,
            certificate=self._certificate,
        )

    def _new_id(self) -> int:
        rid = self._rng.getrandbits(63)
        while rid in self._requests or rid in self._serving:
            rid = self._rng.getrandbits(63)
        return rid

    def _start(
        self, kind: str, key: bytes, record: DhtRecord | None, now: float, *, internal: bool = False
    ) -> int:
        self._ensure_timers(now)
        rid = self._new_id()
        request = _Request(kind, key, record, now, internal=internal)
        self._requests[rid] = request
        self._send_request(rid, request, now)
        return rid

    def _send_request(self, rid: int, request: _Request, now: float) -> None:
        """The next try of a request (at once, or once the overlay is on the circle)."""
        request.tries += 1
        request.deadline = now + self.settings.request_timeout_s
        self._by_message.pop(request.message_id, None)
        request.first_hop = None
        if not self._on_circle():
            # Not on the circle yet: the answer could not find its way back.
            request.waiting = True
            self._stats["waiting_for_join"] += 1
            return
        self._transmit(rid, request, now)

    def _on_circle(self) -> bool:
        state = getattr(self.overlay, "state", None)
        if state not in (NodeState.IDLE, NodeState.JOINING):
            return True
        return state is NodeState.JOINING and bool(getattr(self.overlay, "on_circle", False))

    def _transmit(self, rid: int, request: _Request, now: float) -> None:
        msg: w.Message
        if request.kind == "get":
            msg = w.Get(rid, request.key)
        elif request.kind == "create":
            assert request.record is not None
            msg = w.Create(rid, request.record)
        else:
            assert request.record is not None
            msg = w.Delete(rid, request.record)
        request.waiting = False
        request.early = getattr(self.overlay, "state", None) is NodeState.JOINING
        self._stats[f"sent_{request.kind}"] += 1
        pos = key_position(request.key)
        next_hop = getattr(self.overlay, "next_hop", None)
        if request.avoid:
            request.first_hop = next_hop(pos, request.avoid) if next_hop else None
            request.message_id = self.overlay.send_to_key(
                pos, w.encode(msg), now, avoid=request.avoid
            )
        else:
            request.first_hop = next_hop(pos) if next_hop else None
            request.message_id = self.overlay.send_to_key(pos, w.encode(msg), now)
        self._by_message[request.message_id] = rid

    def _retry_or_fail(self, rid: int, request: _Request, now: float, reason: str) -> None:
        if request.tries < self.settings.request_tries:
            self._stats["retries"] += 1
            if request.first_hop is not None and request.first_hop not in request.avoid:
                # No answer: the first hop may have crashed; go around it this time.
                request.avoid = (*request.avoid, request.first_hop)
            self._send_request(rid, request, now)
        else:
            self._complete(rid, request, now, ok=False, reason=reason)

    def _complete(
        self,
        rid: int,
        request: _Request,
        now: float,
        *,
        ok: bool,
        reason: str,
        holder: bytes | None = None,
        records: tuple[DhtRecord, ...] = (),
    ) -> None:
        self._requests.pop(rid, None)
        self._by_message.pop(request.message_id, None)
        key = request.key
        if request.kind == "get":
            self._events.append(GetResult(rid, key, ok, records, reason))
            return
        if request.kind == "delete":
            self._events.append(DeleteResult(rid, key, ok, reason))
            return
        assert request.record is not None
        owned = self._owned.get(key)
        if ok:
            lease = request.record.lease_s
            if not request.internal or (owned is not None and owned.in_flight == rid):
                self._owned[key] = _Owned(request.record.value, lease, now + lease / 2)
        elif reason == "exists":
            if owned is not None and (owned.in_flight == rid or not request.internal):
                del self._owned[key]
            if request.internal:
                self._events.append(LeaseLost(key, holder))
        elif owned is not None and owned.in_flight == rid:
            retry = min(self.settings.renew_retry_s, owned.lease_s / 4)
            owned.in_flight, owned.renew_at = None, now + retry
        if not request.internal:
            self._events.append(CreateResult(rid, key, ok, reason, holder))
        else:
            self._stats[f"renewal_{reason}"] += 1

    def _on_client_reply(self, rid: int, request: _Request, msg: w.Reply, now: float) -> None:
        status = msg.status
        if request.kind == "get":
            if status != Status.OK:
                self._complete(rid, request, now, ok=False, reason=Status(status).name.lower())
                return
            records = []
            for held in msg.held:
                rec = held.record
                if rec.key != request.key:
                    self._stats["dropped_invalid_record"] += 1
                elif self._invalid(rec):
                    continue
                elif not rec.deleted and held.remaining_s > 0:
                    records.append(rec)
            self._complete(rid, request, now, ok=True, reason="ok", records=tuple(records))
            return
        if status == Status.OK:
            self._complete(rid, request, now, ok=True, reason="ok")
        elif status == Status.STALE and not request.stale_retried and request.record is not None:
            # Our sequence restarted below the stored one (a restart): go past it, once.
            request.stale_retried = True
            self._seq = max(self._seq, msg.seq)
            old = request.record
            request.record = self._sign(old.key, old.value, old.lease_s, deleted=old.deleted)
            request.tries -= 1
            self._send_request(rid, request, now)
        elif status == Status.EXISTS:
            holder = None
            for held in msg.held:
                if held.record.key != request.key:
                    self._stats["dropped_invalid_record"] += 1
                elif not self._invalid(held.record):
                    holder = held.record.owner_id
            if holder is None and request.tries < self.settings.request_tries:
                # "held by someone" with no record we may believe: ask again (another way)
                self._stats["exists_unproven"] += 1
                self._send_request(rid, request, now)
                return
            self._complete(rid, request, now, ok=False, reason="exists", holder=holder)
        elif status == Status.NO_QUORUM and request.tries < self.settings.request_tries:
            self._stats["retries"] += 1
            self._send_request(rid, request, now)
        else:
            self._complete(rid, request, now, ok=False, reason=Status(status).name.lower())

    # -- server side -------------------------------------------------------------------------

    def _on_delivered(self, event: Delivered, now: float) -> None:
        payload = event.payload
        if not w.is_dht(payload):
            self._stats["ignored_foreign"] += 1
            return
        try:
            msg = w.decode(payload)
        except RemoteProtocolError as exc:
            self._stats[f"dropped_{exc.reason}"] += 1
            return
        src = event.src_id
        self._stats[f"received_{type(msg).__name__.lower()}"] += 1
        if isinstance(msg, w.Create | w.Delete):
            self._on_write(src, msg.req, msg.record, now, delete=isinstance(msg, w.Delete))
        elif isinstance(msg, w.Get):
            self._on_get(src, msg, now)
        elif isinstance(msg, w.Store):
            self._on_store(src, msg, now)
        elif isinstance(msg, w.Fetch):
            entry = self._live(msg.key, now)
            held = () if entry is None else (self._held(entry, now),)
            self._reply(src, msg.req, Status.OK, 0, held, now)
        else:
            self._on_reply(src, msg, now)

    def _on_reply(self, src: int, msg: w.Reply, now: float) -> None:
        request = self._requests.get(msg.req)
        if request is not None:
            self._on_client_reply(msg.req, request, msg, now)
            return
        serving = self._serving.get(msg.req)
        if serving is None or src not in serving.waiting:
            self._stats["late_replies"] += 1
            return
        serving.waiting.discard(src)
        for held in msg.held:
            if held.record.key == serving.key:
                self._merge(held.record, held.remaining_s, now, src)
            else:
                self._stats["dropped_wrong_key"] += 1
        if serving.kind == "write":
            if msg.status == Status.OK:
                serving.needed -= 1
            entry = self._live(serving.key, now)
            if entry is None or entry.record != serving.record:
                self._finish_serving(msg.req, serving, now)  # lost to another record
                return
            if serving.needed <= 0 and not serving.answered:
                serving.answered = True
                self._reply(serving.client, serving.client_req, Status.OK, 0, (), now)
        if not serving.waiting:
            self._finish_serving(msg.req, serving, now)

    def _finish_serving(self, sid: int, serving: _Serving, now: float) -> None:
        if self._serving.pop(sid, None) is not None:
            self._release_serving(serving.client)
        if serving.answered:
            return
        serving.answered = True
        entry = self._live(serving.key, now)
        if serving.kind == "fetch":
            held = () if entry is None or entry.record.deleted else (self._held(entry, now),)
            self._reply(serving.client, serving.client_req, Status.OK, 0, held, now)
            return
        assert serving.record is not None
        if entry is not None and entry.record != serving.record:
            stored = entry.record
            if stored.owner == serving.record.owner:
                self._reply(serving.client, serving.client_req, Status.STALE, stored.seq, (), now)
            else:
                held = (self._held(entry, now),)
                self._reply(serving.client, serving.client_req, Status.EXISTS, 0, held, now)
        elif serving.needed <= 0:
            self._reply(serving.client, serving.client_req, Status.OK, 0, (), now)
        else:
            self._stats["no_quorum"] += 1
            self._reply(serving.client, serving.client_req, Status.NO_QUORUM, 0, (), now)

    def _on_write(self, src: int, req: int, record: DhtRecord, now: float, *, delete: bool) -> None:
        """A create or a delete at the node responsible for its key: decide, replicate."""
        if record.deleted != delete:
            self._stats["dropped_invalid_record"] += 1
            self._reply(src, req, Status.REFUSED, 0, (), now)
            return
        if self._invalid(record) or not self._may_serve(src):
            self._reply(src, req, Status.REFUSED, 0, (), now)
            return
        entry = self._live(record.key, now)
        if entry is not None:
            stored = entry.record
            if stored.owner == record.owner:
                if record.seq < stored.seq or (record.seq == stored.seq and record != stored):
                    self._reply(src, req, Status.STALE, stored.seq, (), now)
                    return
            elif not stored.deleted:
                status = Status.REFUSED if delete else Status.EXISTS
                self._stats[f"write_{status.name.lower()}"] += 1
                self._reply(src, req, status, 0, (self._held(entry, now),), now)
                return
        if entry is None and not self._room_for(record):
            self._reply(src, req, Status.REFUSED, 0, (), now)
            return
        self._put(record, now + self._lease(record), src)
        self._stats["accepted_delete" if delete else "accepted_create"] += 1
        self._replicate(src, req, record, now)

    def _replicate(self, client: int, client_req: int, record: DhtRecord, now: float) -> None:
        pos = key_position(record.key)
        me = self.overlay.node_id
        replicas = [r for r in self.overlay.nearest(pos, self.settings.replicas) if r != me]
        needed = (len(replicas) + 1) // 2  # a majority of replicas + this node, this one counted
        if not replicas or needed <= 0:
            self._reply(client, client_req, Status.OK, 0, (), now)
            return
        sid = self._new_id()
        deadline = now + self.settings.replica_timeout_s
        self._serving_for[client] += 1
        self._serving[sid] = _Serving(
            "write", record.key, client, client_req, record, set(replicas), needed, deadline
        )
        entry = self._store[record.key]
        payload = w.encode(w.Store(sid, Held(record, record.lease_s), True))
        for replica in replicas:
            entry.sent_to.add(replica)
            self._stats["sent_store"] += 1
            self.overlay.send_to_node(replica, payload, now)

    def _on_get(self, src: int, msg: w.Get, now: float) -> None:
        entry = self._live(msg.key, now)
        me = self.overlay.node_id
        if entry is None:
            pos = key_position(msg.key)
            replicas = [r for r in self.overlay.nearest(pos, self.settings.replicas) if r != me]
            if replicas:
                if not self._may_serve(src):
                    self._reply(src, msg.req, Status.REFUSED, 0, (), now)
                    return
                sid = self._new_id()
                deadline = now + self.settings.fetch_timeout_s
                self._serving_for[src] += 1
                self._serving[sid] = _Serving(
                    "fetch", msg.key, src, msg.req, None, set(replicas), 0, deadline
                )
                payload = w.encode(w.Fetch(sid, msg.key))
                for replica in replicas:
                    self._stats["sent_fetch"] += 1
                    self.overlay.send_to_node(replica, payload, now)
                return
        held = () if entry is None or entry.record.deleted else (self._held(entry, now),)
        self._reply(src, msg.req, Status.OK, 0, held, now)

    def _on_store(self, src: int, msg: w.Store, now: float) -> None:
        status, winner = self._merge(msg.held.record, msg.held.remaining_s, now, src)
        if msg.want_ack:
            held = () if winner is None else (self._held(winner, now),)
            seq = 0 if winner is None else winner.record.seq
            self._reply(src, msg.req, status, seq, held, now)
        elif winner is not None and status in (Status.EXISTS, Status.STALE):
            # A holder handed over a record that loses to ours: hand ours back, so that
            # both keep the same one (it wins there too, so this never ping-pongs).
            self._stats["sent_pushback"] += 1
            payload = w.encode(w.Store(0, self._held(winner, now), False))
            self.overlay.send_to_node(src, payload, now)

    def _merge(
        self, record: DhtRecord, remaining_s: float, now: float, src: int
    ) -> tuple[Status, _Entry | None]:
        """Keep the better of a stored record and one from another node (a replica or a
        holder handing over); returns the status for the sender and, when its record was
        not kept, what was."""
        if self._invalid(record):
            return Status.REFUSED, None
        expires = now + min(remaining_s, self._lease(record))
        if expires <= now:
            return Status.OK, None
        entry = self._live(record.key, now)
        if entry is None:
            if not self._room_for(record):
                return Status.REFUSED, None
            self._put(record, expires, src)
            self._stats["stored"] += 1
            return Status.OK, None
        stored = entry.record
        if stored == record:
            entry.expires = max(entry.expires, expires)
            entry.sent_to.add(src)
            return Status.OK, None
        if stored.owner == record.owner:
            newer = record.seq > stored.seq or (
                record.seq == stored.seq and w.tie_break(stored, record) is record
            )
            if not newer:
                return Status.STALE, entry
        elif record.deleted:
            if not stored.deleted:
                self._stats["refused_foreign_delete"] += 1
                return Status.REFUSED, entry
            return Status.OK, None  # two tombstones of different owners: keep ours
        elif not stored.deleted and w.tie_break(stored, record) is stored:
            self._stats["conflicts_kept"] += 1
            return Status.EXISTS, entry
        elif not stored.deleted:
            self._stats["conflicts_replaced"] += 1
        self._put(record, expires, src)
        self._stats["stored"] += 1
        return Status.OK, None

    # -- helpers -----------------------------------------------------------------------------

    def _lease(self, record: DhtRecord) -> float:
        if record.deleted:
            return min(record.lease_s, self.settings.tombstone_max_s)
        return record.lease_s

    def _invalid(self, record: DhtRecord) -> bool:
        """Is the record not to be held or believed? Counted: ``dropped_invalid_record``
        (its signature, an ``ip:`` record naming another node), ``refused_record_<reason>``
        (the authority's: a foreign network's member, no certificate, ...)."""
        if check_record(record) is not None:
            self._stats["dropped_invalid_record"] += 1
            return True
        reason = self._authority(record) if self._authority is not None else None
        if reason is not None:
            self._stats[f"refused_{reason}"] += 1
            return True
        return False

    def _may_serve(self, client: int) -> bool:
        """One node may have at most ``serving_per_node`` requests served here at once."""
        if self._serving_for[client] >= self.settings.serving_per_node:
            self._stats["refused_member_busy"] += 1
            return False
        return True

    def _release_serving(self, client: int) -> None:
        self._serving_for[client] -= 1
        if self._serving_for[client] <= 0:
            del self._serving_for[client]

    def _room_for(self, record: DhtRecord) -> bool:
        """Room for a new key: in all (``max_records``) and for its owner."""
        if len(self._store) >= self.settings.max_records:
            self._stats["refused_full"] += 1
            return False
        if self._per_owner[record.owner] >= self.settings.records_per_owner:
            self._stats["refused_owner_full"] += 1
            return False
        return True

    def _put(self, record: DhtRecord, expires: float, src: int) -> None:
        old = self._store.get(record.key)
        if old is not None:
            self._uncount(old.record.owner)
        self._per_owner[record.owner] += 1
        self._store[record.key] = _Entry(record, expires, {src, self.overlay.node_id})

    def _drop(self, key: bytes) -> None:
        entry = self._store.pop(key)
        self._uncount(entry.record.owner)

    def _uncount(self, owner: bytes) -> None:
        self._per_owner[owner] -= 1
        if self._per_owner[owner] <= 0:
            del self._per_owner[owner]

    def _live(self, key: bytes, now: float) -> _Entry | None:
        entry = self._store.get(key)
        if entry is not None and entry.expires <= now:
            self._drop(key)
            self._stats["expired"] += 1
            return None
        return entry

    def _held(self, entry: _Entry, now: float) -> Held:
        remaining = min(max(entry.expires - now, 0.0), w.MAX_LEASE_S)
        return Held(entry.record, remaining)

    def _reply(
        self, dst: int, req: int, status: Status, seq: int, held: tuple[Held, ...], now: float
    ) -> None:
        self._stats["sent_reply"] += 1
        self.overlay.send_to_node(dst, w.encode(w.Reply(req, int(status), seq, held)), now)

    def _handover(self, now: float, *, periodic: bool = False) -> None:
        """Offer each record to the replicas it was not yet sent to; ``periodic``: the
        responsible node offers each of its records to all its replicas again."""
        me = self.overlay.node_id
        count = self.settings.replicas
        for key, entry in list(self._store.items()):
            if entry.expires <= now:
                continue
            nearest = self.overlay.nearest(key_position(key), count)
            if periodic:
                if not nearest or nearest[0] != me:
                    continue
                entry.sent_to.clear()
            targets = [r for r in nearest if r != me and r not in entry.sent_to]
            if not targets:
                continue
            payload = w.encode(w.Store(0, self._held(entry, now), False))
            for target in targets:
                entry.sent_to.add(target)
                self._stats["sent_handover"] += 1
                self.overlay.send_to_node(target, payload, now)

    def _ensure_timers(self, now: float) -> None:
        if self._next_sweep is None:
            self._next_sweep = now + self.settings.sweep_s
            jitter = 0.75 + 0.5 * self._rng.random()
            self._next_rehandover = now + self.settings.rehandover_s * jitter
