"""The overlay crawl behind ``supervisor map``: each node answers a request for its overlay
connections (as Brunet's crawler did), and a crawler walks the overlay breadth first. Pure.

Messages ride inside overlay ``Data`` routed to an exact node id (``send_to_node``), like
the DHT's (``b"D"``) and routed handshakes (``b"H"``)::

    b"L" | version (1 byte, = 1) | msgpack array [tag, field, field, ...]

- 1 ``LinksQuery(query_id)``: "list your connections"; answered to the routed message's
  source id.
- 2 ``LinksAnswer(query_id, body, signature, certificate)``: ``body`` is the msgpack array
  ``AnswerBody(node_id, crawler, query_id, name, addresses, entries, truncated)``, signed
  with the answering node's Ed25519 key over ``SIGN_CONTEXT + body``; ``certificate`` is
  its certificate. ``entries`` are ``[peer node id, kind, relayed, via]`` (``KINDS``:
  near, far, leaf, tunnel, shortcut; ``via``: the relay's node id, or empty), at most
  ``MAX_ENTRIES`` (``truncated`` says some were left out).

**Who is believed.** Overlay messages travel over authenticated links, but a routed
message's source id is only what its first hop claimed. So an answer counts only if its
certificate is valid for this network now (the authority's signature, not revoked, a
network of this overlay), the certificate's node id is the body's node id *and* the
routed message's source, the signature over the body is the certificate key's, and the
body names this crawler and a query it has outstanding to that very node. Anything else
raises ``RemoteProtocolError`` (``check_answer``), which the caller counts
(``map_refused_<reason>``). A node answers at most ``answers_per_s`` queries a second
(``AnswerLimiter``; the rest are counted drops).

**The crawl.** ``Crawl`` starts from the crawler's own connections (its own entry needs no
query), asks up to ``parallel`` nodes at once, re-asks a silent one after
``query_timeout_s`` (``tries`` in all), and queues every node an answer names. It stops
when nothing is left to ask (``complete``), when ``max_nodes`` nodes have been asked
(``max_nodes``: the result is a *sample*, and says so) or at its deadline (``deadline``).
Inputs: ``handle(now)``, ``answer(query_id, links, now)``; outputs: ``queries_to_send()``,
``finished``, ``next_deadline()``, ``result()``.
"""

# No ``from __future__ import annotations``: the records' annotations stay objects, so the
# msgspec decoders built at import need not evaluate strings (every node start imports this).

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Annotated, Any

import msgspec

from pipeline.crypto.cert import Certificate, RevocationList, decode_certificate, verify
from pipeline.crypto.identity import Identity, verify_signature
from pipeline.errors import RemoteProtocolError

MAGIC = b"L"
VERSION = 1
SIGN_CONTEXT = b"autovn-links-answer-v1\x00"
MAX_ENTRIES = 64  # connections in one answer (M)
MAX_ADDRESSES = 8
ANSWERS_PER_S = 20.0  # queries a node answers a second (N); a burst of as many
KINDS = ("leaf", "far", "near", "tunnel", "shortcut")
_KIND_ORDER = {"near": 0, "far": 1, "tunnel": 2, "shortcut": 3, "leaf": 4}

IdBytes = Annotated[bytes, msgspec.Meta(min_length=20, max_length=20)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
KindCode = Annotated[int, msgspec.Meta(ge=0, le=len(KINDS) - 1)]
Via = Annotated[bytes, msgspec.Meta(max_length=20)]


class WireEntry(msgspec.Struct, array_like=True, frozen=True):
    node_id: IdBytes
    kind: KindCode
    relayed: bool
    via: Via = b""


class AnswerBody(msgspec.Struct, array_like=True, frozen=True):
    node_id: IdBytes
    crawler: IdBytes
    query_id: U32
    name: Annotated[str, msgspec.Meta(max_length=64)]
    addresses: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=45)], ...],
        msgspec.Meta(max_length=MAX_ADDRESSES),
    ]
    entries: Annotated[tuple[WireEntry, ...], msgspec.Meta(max_length=MAX_ENTRIES)]
    truncated: bool


class LinksQuery(msgspec.Struct, tag=1, array_like=True, frozen=True):
    query_id: U32


class LinksAnswer(msgspec.Struct, tag=2, array_like=True, frozen=True):
    query_id: U32
    body: Annotated[bytes, msgspec.Meta(max_length=8192)]
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
    certificate: Annotated[bytes, msgspec.Meta(max_length=4096)]


Message = LinksQuery | LinksAnswer

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_body_decoder = msgspec.msgpack.Decoder(AnswerBody)
_PREFIX = MAGIC + bytes([VERSION])


def is_links(payload: bytes) -> bool:
    return payload[:1] == MAGIC


def encode(message: Message) -> bytes:
    return _PREFIX + _encoder.encode(message)


def decode(payload: bytes) -> Message:
    """The message in an overlay payload; ``RemoteProtocolError`` for anything malformed."""
    if payload[:1] != MAGIC:
        raise RemoteProtocolError("not_links")
    if payload[1:2] != bytes([VERSION]):
        raise RemoteProtocolError("bad_version")
    try:
        message: Message = _decoder.decode(memoryview(payload)[2:])
    except ValueError as exc:
        raise RemoteProtocolError("malformed", str(exc)[:80]) from None
    return message


# -- what a node says about itself ---------------------------------------------------------------


class Connection(msgspec.Struct, frozen=True):
    """One connection of a node: ``kind`` one of ``KINDS``; ``via`` the relay's node id
    (a tunnel's relay, or a relayed link's first hop), or b""."""

    node_id: bytes
    kind: str
    relayed: bool
    via: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id.hex(),
            "kind": self.kind,
            "path": "relayed" if self.relayed else "direct",
            "via": self.via.hex() or None,
        }


class NodeLinks(msgspec.Struct, frozen=True):
    """A node as it describes itself: name, virtual addresses, connections."""

    node_id: bytes
    name: str
    addresses: tuple[str, ...]
    connections: tuple[Connection, ...]
    truncated: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id.hex(),
            "name": self.name,
            "addresses": list(self.addresses),
            "connections": [c.to_json() for c in self.connections],
            "truncated": self.truncated,
        }


def own_links(
    node_id: bytes,
    name: str,
    addresses: Sequence[str],
    connections: Iterable[Connection],
    max_entries: int = MAX_ENTRIES,
) -> NodeLinks:
    """A node's description, its connections in a stable order (near, far, tunnel,
    shortcut, leaf; then by id), cut at ``max_entries``."""
    ordered = sorted(connections, key=lambda c: (_KIND_ORDER.get(c.kind, 9), c.node_id))
    return NodeLinks(
        node_id,
        name,
        tuple(addresses)[:MAX_ADDRESSES],
        tuple(ordered[:max_entries]),
        len(ordered) > max_entries,
    )


def make_answer(
    links: NodeLinks,
    *,
    crawler: bytes,
    query_id: int,
    identity: Identity,
    certificate: Certificate,
) -> bytes:
    """The signed ``LinksAnswer`` payload for ``crawler``'s query ``query_id``."""
    body = AnswerBody(
        links.node_id,
        crawler,
        query_id,
        links.name,
        links.addresses,
        tuple(
            WireEntry(c.node_id, KINDS.index(c.kind), c.relayed, c.via) for c in links.connections
        ),
        links.truncated,
    )
    data = _encoder.encode(body)
    signature = identity.sign(SIGN_CONTEXT + data)
    return encode(LinksAnswer(query_id, data, signature, certificate.encode()))


def check_answer(
    answer: LinksAnswer,
    *,
    src: bytes,
    crawler: bytes,
    ca: Certificate,
    revoked: RevocationList,
    networks: Sequence[str],
    wall: float,
) -> NodeLinks:
    """What an answer that came routed from ``src`` says, if it is to be believed (see the
    module); else ``RemoteProtocolError``: ``bad_certificate`` (not a member now),
    ``wrong_node`` (certified, signed or routed as someone else), ``bad_signature``,
    ``malformed``, ``not_for_us`` (another crawler's, or another query's)."""
    try:
        cert = decode_certificate(answer.certificate)
        network = next((n for n in networks if n in cert.networks), networks[0])
        verify(cert, ca, now=wall, network=network, revoked=revoked)
    except RemoteProtocolError as exc:  # CertificateError is one
        raise RemoteProtocolError("bad_certificate", exc.reason) from None
    if cert.node_id != src:
        raise RemoteProtocolError("wrong_node", "the certificate is not the sender's")
    if not verify_signature(cert.public_key, SIGN_CONTEXT + answer.body, answer.signature):
        raise RemoteProtocolError("bad_signature")
    try:
        body = _body_decoder.decode(answer.body)
    except ValueError as exc:
        raise RemoteProtocolError("malformed", str(exc)[:80]) from None
    if body.node_id != src:
        raise RemoteProtocolError("wrong_node", "the body names another node")
    if body.crawler != crawler or body.query_id != answer.query_id:
        raise RemoteProtocolError("not_for_us")
    return NodeLinks(
        body.node_id,
        body.name,
        body.addresses,
        tuple(Connection(e.node_id, KINDS[e.kind], e.relayed, e.via) for e in body.entries),
        body.truncated,
    )


class AnswerLimiter:
    """At most ``per_s`` answers a second (a token bucket of as many)."""

    def __init__(self, per_s: float = ANSWERS_PER_S) -> None:
        self.per_s = per_s
        self._tokens = per_s
        self._stamp: float | None = None

    def allow(self, now: float) -> bool:
        if self._stamp is not None:
            self._tokens = min(self.per_s, self._tokens + (now - self._stamp) * self.per_s)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# -- the crawler -----------------------------------------------------------------------------


class _Query(msgspec.Struct):
    node_id: bytes
    sent: float
    tries: int


class Crawl:
    """A breadth-first crawl from ``own`` (see the module). ``next_id`` hands out query
    ids unique among the caller's crawls."""

    def __init__(
        self,
        own: NodeLinks,
        *,
        now: float,
        timeout_s: float,
        next_id: Callable[[], int],
        max_nodes: int = 200,
        parallel: int = 8,
        query_timeout_s: float = 2.0,
        tries: int = 3,
    ) -> None:
        if max_nodes < 1:
            raise ValueError("max_nodes is at least 1")
        self.started = now
        self.deadline = now + timeout_s
        self.max_nodes = max_nodes
        self.parallel = parallel
        self.query_timeout_s = query_timeout_s
        self.tries = tries
        self.refused = 0  # answers not believed (the caller counts them by reason)
        self.stopped: str | None = None
        self.ended: float | None = None
        self._next_id = next_id
        self._own = own.node_id
        self.nodes: dict[bytes, NodeLinks] = {}
        self._seen: set[bytes] = {own.node_id}
        self._queue: deque[bytes] = deque()
        self._asked: set[bytes] = {own.node_id}
        self._pending: dict[int, _Query] = {}
        self._unanswered: set[bytes] = set()
        self._out: list[tuple[bytes, int]] = []
        self._learn(own)
        self.handle(now)

    @property
    def finished(self) -> bool:
        return self.stopped is not None

    def queries_to_send(self) -> list[tuple[bytes, int]]:
        """(node id, query id): ``LinksQuery`` messages to route to those nodes."""
        out, self._out = self._out, []
        return out

    def expects(self, query_id: int) -> bytes | None:
        """The node a pending query went to."""
        query = self._pending.get(query_id)
        return None if query is None else query.node_id

    def next_deadline(self) -> float | None:
        if self.finished:
            return None
        times = [q.sent + self.query_timeout_s for q in self._pending.values()]
        return min([self.deadline, *times])

    def answer(self, query_id: int, links: NodeLinks, now: float) -> bool:
        """A believed answer (``check_answer``'s); False if no pending query of this crawl
        to that node has this id."""
        query = self._pending.get(query_id)
        if self.finished or query is None or query.node_id != links.node_id:
            return False
        del self._pending[query_id]
        self._unanswered.discard(links.node_id)
        self._learn(links)
        self.handle(now)
        return True

    def handle(self, now: float) -> None:
        if self.finished:
            return
        for qid, query in list(self._pending.items()):
            if now - query.sent >= self.query_timeout_s:
                del self._pending[qid]
                if query.tries < self.tries:
                    self._ask(query.node_id, now, query.tries + 1)
                else:
                    self._unanswered.add(query.node_id)
        while self._queue and len(self._pending) < self.parallel:
            if len(self._asked) >= self.max_nodes:
                break
            nid = self._queue.popleft()
            self._asked.add(nid)
            self._ask(nid, now, 1)
        if now >= self.deadline:
            self._stop("deadline", now)
        elif not self._pending and (not self._queue or len(self._asked) >= self.max_nodes):
            self._stop("max_nodes" if self._queue else "complete", now)

    def _ask(self, nid: bytes, now: float, tries: int) -> None:
        qid = self._next_id()
        self._pending[qid] = _Query(nid, now, tries)
        self._out.append((nid, qid))

    def _learn(self, links: NodeLinks) -> None:
        self.nodes[links.node_id] = links
        for c in links.connections:
            for nid in (c.node_id, c.via):
                if nid and nid not in self._seen:
                    self._seen.add(nid)
                    self._queue.append(nid)

    def _stop(self, why: str, now: float) -> None:
        self.stopped = why
        self.ended = now
        for query in self._pending.values():
            self._unanswered.add(query.node_id)
        self._pending.clear()

    def result(self) -> dict[str, Any]:
        """The crawl as ``supervisor map --json`` prints it."""
        unanswered = self._unanswered - set(self.nodes)
        not_asked = self._seen - self._asked
        end = self.ended if self.ended is not None else self.started
        return {
            "crawler": self._own.hex(),
            "stopped": self.stopped,
            "complete": self.stopped == "complete" and not unanswered,
            "sampled": bool(not_asked),
            "max_nodes": self.max_nodes,
            "elapsed_s": round(end - self.started, 3),
            "refused": self.refused,
            "nodes": [self.nodes[n].to_json() for n in sorted(self.nodes)],
            "unanswered": sorted(n.hex() for n in unanswered),
            "not_asked": sorted(n.hex() for n in not_asked),
        }
