"""The DNS responder of one virtual network. Sans-I/O.

The driver hands it the UDP payloads sent to port 53 of the virtual DNS address
(``receive``), the results of the DHT lookups it asked for (``resolved``) and the time
(``handle_timer`` at ``next_deadline()``); it takes back the responses to send
(``answers()``) and the lookups to start (``lookups()``). ``client`` is whatever the driver
needs to send a response back (e.g. ``(ip, port)``); it must be hashable and is only
compared and returned.

What it answers (names in ``names.py``):

- **Static names** (``C005032155.vpn.test``) and the **reverse names** of the subnet's
  addresses, from the name alone: A, and PTR to the static name. A PTR answer also names
  the host names that the cache holds for that address (from earlier lookups), after the
  static name, so the first record is always the same.
- **Host names** (``alpha.vpn.test``): a fresh cache entry answers at once; else the query
  waits for a ``Lookup`` of ``name:<namespace>:<host>`` (one per host, however many queries
  wait for it). ``resolved(token, address)`` answers every waiting query: an address in
  the subnet makes the name exist, None (or an address outside the subnet) makes it
  NXDOMAIN. Both outcomes are cached (``ttl``, ``negative_ttl``). A lookup unanswered after
  ``lookup_timeout_s`` answers SERVFAIL; beyond ``max_pending`` waiting queries the oldest
  is answered SERVFAIL. A query sent again (same client, ID and question) while it waits is
  dropped: the one answer serves both.
- A name of ours that exists but has no record of the type asked (AAAA, MX, TXT, ...):
  NOERROR with no answer (NODATA). NXDOMAIN and NODATA carry the zone's synthetic SOA in
  the authority section (TTL and minimum ``negative_ttl``). The domain itself answers SOA.
- **Foreign names** (outside the domain and the reverse zone), zone transfers and classes
  other than IN and ANY: REFUSED at once, so the stub resolver asks its next server.
- QTYPE ANY answers the records of the name's own type (A, PTR or SOA).
- Malformed queries: FORMERR; opcodes other than QUERY: NOTIMP; EDNS versions other than 0:
  BADVERS (all three without a question section); datagrams shorter than a header, and
  responses, are dropped. Every outcome is counted in ``statistics()``.

Responses copy ID, opcode, RD and CD; RA is never set; AA is set on every response about
our zones (NOERROR, NXDOMAIN, SERVFAIL) and not on REFUSED, FORMERR, NOTIMP and BADVERS,
which claim no authority. Responses fit in 512 bytes, or in the EDNS size of the query (up
to ``payload``); a larger one is sent without records and with TC.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Generic, NamedTuple, TypeVar

import msgspec

from pipeline.control.dns import message
from pipeline.control.dns.message import Malformed, Query, ResourceRecord, Soa
from pipeline.control.dns.names import (
    Name,
    NameKind,
    Zone,
    host_key,
    normalise_domain,
    static_name,
)

__all__ = ["Answer", "DnsResponder", "DnsSettings", "Lookup"]

ClientT = TypeVar("ClientT", bound=Hashable)

# responses about our zones; REFUSED, FORMERR, NOTIMP and BADVERS claim no authority
_AUTHORITATIVE = frozenset({message.NOERROR, message.NXDOMAIN, message.SERVFAIL})
_PTR_HOSTS_MAX = 4  # host names in one PTR answer, beside the static name
_COUNTERS = (
    "queries",
    "dropped_short",  # shorter than a DNS header
    "dropped_response",  # QR set: a response, never answered
    "dropped_duplicate",  # sent again while the first copy waits for its lookup
    *(f"answered_{name}" for name in message.RCODE_NAMES.values()),
    "truncated",
    "cache_hits",
    "cache_misses",
    "lookups_started",
    "lookups_found",
    "lookups_not_found",
    "lookups_outside_subnet",  # resolved to an address outside the subnet: not found
    "lookups_timed_out",
    "lookups_unknown_token",  # resolved after its timeout, or after all its queries left
    "evicted",  # waiting queries answered SERVFAIL to make room (max_pending)
)


class DnsSettings(msgspec.Struct, frozen=True):
    domain: str  # e.g. "vpn.test"; stored normalised (lower case, no trailing dot)
    subnet: IPv4Network  # the virtual network; a prefix of at least 8 bits
    namespace: str  # the virtual network's namespace, in DHT keys
    ttl: int = 60  # seconds, of positive answers and of positive cache entries
    negative_ttl: int = 10  # seconds, of negative answers and negative cache entries
    lookup_timeout_s: float = 5.0  # a lookup without a result this long answers SERVFAIL
    max_pending: int = 64  # queries waiting for lookups, at most
    cache_size: int = 256  # host names cached, at most (0: no cache)
    payload: int = 1232  # the largest response to an EDNS query, offered in its OPT record

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "domain", normalise_domain(self.domain))
        if self.subnet.prefixlen < 8:
            raise ValueError(f"subnet {self.subnet} spans more than one first octet")
        if not self.namespace:
            raise ValueError("namespace is empty")
        if min(self.ttl, self.negative_ttl, self.cache_size) < 0:
            raise ValueError("ttl, negative_ttl and cache_size must not be negative")
        if self.lookup_timeout_s <= 0 or self.max_pending < 1:
            raise ValueError("lookup_timeout_s and max_pending must be positive")
        if not message.MIN_PAYLOAD <= self.payload <= 65535:
            raise ValueError(f"payload {self.payload} outside 512..65535")


class Answer(NamedTuple, Generic[ClientT]):
    response: bytes  # a DNS message, the payload of one UDP datagram
    client: ClientT  # as given to ``receive``


class Lookup(NamedTuple):
    """A DHT get to start; its result goes to ``resolved(token, ...)``."""

    token: int
    host: str  # the host label, lower case
    key: bytes  # b"name:<namespace>:<host>"


class _Waiting(msgspec.Struct, Generic[ClientT], frozen=True):
    query: Query
    client: ClientT
    name: Name

    @property
    def key(self) -> tuple[Hashable, ...]:
        """What makes a retransmission the same query."""
        query = self.query
        labels = tuple(label.lower() for label in query.labels)
        return (self.client, query.header.id, labels, query.qtype, query.qclass)


class _Lookup(msgspec.Struct, Generic[ClientT]):
    token: int
    deadline: float
    waiting: dict[int, _Waiting[ClientT]]  # by arrival number


class DnsResponder(Generic[ClientT]):
    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self.zone = Zone(settings.domain, settings.subnet)
        self._answers: list[Answer[ClientT]] = []
        self._lookups: list[Lookup] = []
        self._pending: dict[str, _Lookup[ClientT]] = {}  # by host
        self._tokens: dict[int, str] = {}  # token → host
        self._arrivals: OrderedDict[int, str] = OrderedDict()  # waiting queries, oldest first
        self._waiting_keys: set[tuple[Hashable, ...]] = set()
        self._cache: OrderedDict[str, tuple[IPv4Address | None, float]] = OrderedDict()
        self._next_token = 1
        self._next_arrival = 0
        self._stats = dict.fromkeys(_COUNTERS, 0)

    # inputs

    def receive(self, query: bytes | bytearray | memoryview, client: ClientT, now: float) -> None:
        """One UDP payload sent to the DNS address by ``client``."""
        self._stats["queries"] += 1
        parsed = message.read_query(bytes(query))
        if isinstance(parsed, message.Dropped):
            self._stats[f"dropped_{parsed.reason}"] += 1
        elif isinstance(parsed, Malformed):
            self._reply(client, parsed, parsed.rcode)
        else:
            self._answer(parsed, client, now)

    def resolved(self, token: int, address: IPv4Address | None, now: float) -> None:
        """The result of ``Lookup`` ``token``: the host's address, or None if no record."""
        host = self._tokens.pop(token, None)
        if host is None:
            self._stats["lookups_unknown_token"] += 1
            return
        lookup = self._pending.pop(host)
        if address is not None and address not in self.settings.subnet:
            self._stats["lookups_outside_subnet"] += 1
            address = None
        self._stats["lookups_found" if address is not None else "lookups_not_found"] += 1
        self._cache_put(host, address, now)
        for arrival, waiting in lookup.waiting.items():
            self._forget(arrival, waiting)
            self._answer_host(waiting, address, self.settings.ttl)

    def handle_timer(self, now: float) -> None:
        """Answers SERVFAIL to the queries of every lookup past its deadline."""
        for host, lookup in list(self._pending.items()):
            if lookup.deadline <= now:
                self._stats["lookups_timed_out"] += 1
                del self._pending[host], self._tokens[lookup.token]
                for arrival, waiting in lookup.waiting.items():
                    self._forget(arrival, waiting)
                    self._fail(waiting)

    # outputs

    def answers(self) -> list[Answer[ClientT]]:
        """The responses to send since the last call, in order."""
        out, self._answers = self._answers, []
        return out

    def lookups(self) -> list[Lookup]:
        """The lookups to start since the last call."""
        out, self._lookups = self._lookups, []
        return out

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must run next; None when no lookup is pending."""
        return min((lookup.deadline for lookup in self._pending.values()), default=None)

    def statistics(self) -> dict[str, int]:
        """Counters since start (see ``_COUNTERS``), and ``pending`` (queries waiting now)
        and ``cache_entries``."""
        return self._stats | {"pending": len(self._arrivals), "cache_entries": len(self._cache)}

    # answering

    def _answer(self, query: Query, client: ClientT, now: float) -> None:
        name = self.zone.classify(query.labels)
        refused = name.kind is NameKind.FOREIGN or query.qtype in message.TRANSFERS
        if refused or query.qclass not in (message.CLASS_IN, message.CLASS_ANY):
            self._reply(client, query, message.REFUSED)
        elif name.kind is NameKind.HOST:
            self._answer_or_look_up(_Waiting(query, client, name), now)
        elif name.kind is NameKind.MISSING:
            self._negative(query, client, name, message.NXDOMAIN)
        else:
            self._positive(query, client, name, self._records(query, name, now))

    def _answer_or_look_up(self, waiting: _Waiting[ClientT], now: float) -> None:
        assert waiting.name.host is not None
        host = waiting.name.host
        cached = self._cache_get(host, now)
        if cached is not None:
            self._stats["cache_hits"] += 1
            address, remaining = cached
            self._answer_host(waiting, address, min(self.settings.ttl, remaining))
            return
        self._stats["cache_misses"] += 1
        key = waiting.key
        if key in self._waiting_keys:
            self._stats["dropped_duplicate"] += 1
            return
        if len(self._arrivals) >= self.settings.max_pending:
            self._evict_oldest()
        lookup = self._pending.get(host)
        if lookup is None:
            lookup = _Lookup(self._next_token, now + self.settings.lookup_timeout_s, {})
            self._next_token += 1
            self._pending[host] = lookup
            self._tokens[lookup.token] = host
            self._lookups.append(
                Lookup(lookup.token, host, host_key(self.settings.namespace, host))
            )
            self._stats["lookups_started"] += 1
        lookup.waiting[self._next_arrival] = waiting
        self._arrivals[self._next_arrival] = host
        self._waiting_keys.add(key)
        self._next_arrival += 1

    def _answer_host(
        self, waiting: _Waiting[ClientT], address: IPv4Address | None, ttl: int
    ) -> None:
        query, client, name = waiting.query, waiting.client, waiting.name
        if address is None:
            self._negative(query, client, name, message.NXDOMAIN)
        elif _wants(query, message.TYPE_A):
            self._positive(query, client, name, [ResourceRecord(query.labels, ttl, address)])
        else:
            self._positive(query, client, name, [])

    def _records(self, query: Query, name: Name, now: float) -> list[ResourceRecord]:
        """The records of ``name`` (a static, pointer or apex name) of ``query``'s type."""
        ttl, owner = self.settings.ttl, query.labels
        kind, address = name.kind, name.address
        if kind is NameKind.STATIC and _wants(query, message.TYPE_A):
            assert address is not None
            return [ResourceRecord(owner, ttl, address)]
        if kind is NameKind.POINTER and _wants(query, message.TYPE_PTR):
            assert address is not None
            targets = [static_name(address, self.settings.subnet, self.settings.domain)]
            targets += self._host_targets(address, now)
            return [ResourceRecord(owner, ttl, target) for target in targets]
        if kind is NameKind.APEX and _wants(query, message.TYPE_SOA):
            return [ResourceRecord(owner, ttl, self._soa())]
        return []

    def _positive(
        self, query: Query, client: ClientT, name: Name, records: list[ResourceRecord]
    ) -> None:
        if records:
            self._reply(client, query, message.NOERROR, answers=records)
        else:
            self._negative(query, client, name, message.NOERROR)

    def _negative(self, query: Query, client: ClientT, name: Name, rcode: int) -> None:
        """NXDOMAIN, or NODATA (``rcode`` NOERROR), with the zone's SOA (RFC 2308)."""
        soa = ResourceRecord(name.apex, self.settings.negative_ttl, self._soa())
        self._reply(client, query, rcode, authority=[soa])

    def _fail(self, waiting: _Waiting[ClientT]) -> None:
        self._reply(waiting.client, waiting.query, message.SERVFAIL)

    def _reply(
        self,
        client: ClientT,
        query: Query | Malformed,
        rcode: int,
        *,
        answers: Sequence[ResourceRecord] = (),
        authority: Sequence[ResourceRecord] = (),
    ) -> None:
        """Queues the response; a malformed query's has no question section."""
        wire, truncated = message.write_response(
            query.header,
            rcode,
            query=query if isinstance(query, Query) else None,
            authoritative=rcode in _AUTHORITATIVE,
            answers=answers,
            authority=authority,
            edns=query.edns,
            payload=self.settings.payload,
        )
        self._stats[f"answered_{message.RCODE_NAMES[rcode]}"] += 1
        self._stats["truncated"] += truncated
        self._answers.append(Answer(wire, client))

    def _soa(self) -> Soa:
        domain = self.settings.domain
        return Soa(domain, "hostmaster." + domain, self.settings.negative_ttl)

    def _host_targets(self, address: IPv4Address, now: float) -> list[str]:
        hosts = sorted(
            host
            for host, (cached, expires) in self._cache.items()
            if cached == address and expires > now
        )
        return [f"{host}.{self.settings.domain}" for host in hosts[:_PTR_HOSTS_MAX]]

    # pending queries and the cache

    def _evict_oldest(self) -> None:
        arrival, host = self._arrivals.popitem(last=False)
        lookup = self._pending[host]
        waiting = lookup.waiting.pop(arrival)
        self._waiting_keys.discard(waiting.key)
        if not lookup.waiting:
            del self._pending[host], self._tokens[lookup.token]
        self._stats["evicted"] += 1
        self._fail(waiting)

    def _forget(self, arrival: int, waiting: _Waiting[ClientT]) -> None:
        del self._arrivals[arrival]
        self._waiting_keys.discard(waiting.key)

    def _cache_get(self, host: str, now: float) -> tuple[IPv4Address | None, int] | None:
        """A fresh entry: the address (None: no such host) and its remaining whole seconds."""
        entry = self._cache.get(host)
        if entry is None:
            return None
        address, expires = entry
        if expires <= now:
            del self._cache[host]
            return None
        self._cache.move_to_end(host)
        return address, math.ceil(expires - now)

    def _cache_put(self, host: str, address: IPv4Address | None, now: float) -> None:
        lifetime = self.settings.ttl if address is not None else self.settings.negative_ttl
        self._cache[host] = (address, now + lifetime)
        self._cache.move_to_end(host)
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)


def _wants(query: Query, rtype: int) -> bool:
    return query.qtype in (rtype, message.TYPE_ANY)
