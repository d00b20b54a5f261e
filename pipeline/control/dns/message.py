"""DNS messages: a strict reader for queries, a writer for responses. Pure.

The reader is our own, not dnslib's: a query needs only its header, one question and an
OPT record, and the reader is iterative, never follows a compression pointer and raises
nothing (dnslib's parser recurses once per pointer, so a crafted 64 KiB datagram exhausts
the stack, and it decodes the rdata of every record type in every section). The writer
uses dnslib (RFC 1035 encoding with name compression).

``read_query`` sorts a datagram into a ``Query`` to answer, a ``Malformed`` one to answer
with an error code and no question (its header was readable), or a ``Dropped`` one: shorter
than a header, or a response (answering responses could loop between two servers).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from ipaddress import IPv4Address

import msgspec
from dnslib import (  # type: ignore[import-untyped]
    EDNS0,
    PTR,
    QTYPE,
    RR,
    SOA,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

__all__ = [
    "Dropped",
    "Edns",
    "Header",
    "Malformed",
    "Query",
    "ResourceRecord",
    "Soa",
    "read_query",
    "write_response",
]

# RCODEs (RFC 1035 4.1.1; BADVERS is extended, RFC 6891)
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
RCODE_NAMES = {
    NOERROR: "noerror",
    FORMERR: "formerr",
    SERVFAIL: "servfail",
    NXDOMAIN: "nxdomain",
    NOTIMP: "notimp",
    REFUSED: "refused",
    BADVERS: "badvers",
}
# TYPEs and CLASSes
TYPE_A, TYPE_SOA, TYPE_PTR, TYPE_OPT, TYPE_IXFR, TYPE_AXFR, TYPE_ANY = 1, 6, 12, 41, 251, 252, 255
CLASS_IN, CLASS_ANY = 1, 255
TRANSFERS = frozenset({TYPE_IXFR, TYPE_AXFR})

MIN_PAYLOAD = 512  # what every client takes over UDP (RFC 1035), and EDNS sizes below it
_HEADER = struct.Struct("!6H")
_QR, _RD, _CD = 0x8000, 0x0100, 0x0010
_SOA_TIMES = (1, 3600, 600, 86400)  # serial, refresh, retry, expire: nothing transfers


class Header(msgspec.Struct, frozen=True):
    """What a response copies from its query's header."""

    id: int
    opcode: int
    rd: bool
    cd: bool


class Edns(msgspec.Struct, frozen=True):
    """The query's OPT record."""

    payload: int  # the largest UDP response the client takes (at least 512)
    version: int


class Query(msgspec.Struct, frozen=True):
    header: Header
    labels: tuple[bytes, ...]  # the question name as sent (case kept), root excluded
    qtype: int
    qclass: int
    edns: Edns | None


class Malformed(msgspec.Struct, frozen=True):
    """A query to answer with ``rcode`` (FORMERR, NOTIMP or BADVERS) and no question."""

    header: Header
    rcode: int
    edns: Edns | None = None


class Dropped(msgspec.Struct, frozen=True):
    reason: str  # "short" or "response"


class Soa(msgspec.Struct, frozen=True):
    mname: str
    rname: str
    minimum: int  # the negative-caching TTL (RFC 2308)


class ResourceRecord(msgspec.Struct, frozen=True):
    """One resource record of class IN: A (an address), PTR (a name) or SOA."""

    owner: tuple[bytes, ...]
    ttl: int
    data: IPv4Address | str | Soa


class _Bad(Exception):
    """The reader's way out of a malformed message; never leaves this module."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = _HEADER.size

    def take(self, n: int) -> bytes:
        end = self.offset + n
        if end > len(self.data):
            raise _Bad
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def u16(self) -> int:
        return int.from_bytes(self.take(2))

    def name(self) -> tuple[bytes, ...]:
        """An uncompressed name (a question's: nothing precedes it to point at)."""
        labels: list[bytes] = []
        size = 1
        while length := self.take(1)[0]:
            size += 1 + length
            if length > 63 or size > 255:
                raise _Bad
            labels.append(self.take(length))
        return tuple(labels)

    def skip_name(self) -> None:
        """A name that may end in a pointer, which is not followed."""
        while length := self.take(1)[0]:
            if length >= 0xC0:
                self.take(1)
                return
            if length > 63:
                raise _Bad
            self.take(length)

    def record(self) -> Edns | None:
        """Skips one resource record; its EDNS settings if it is an OPT record."""
        root_owner = self.data[self.offset : self.offset + 1] == b"\x00"
        self.skip_name()
        rtype, rclass = self.u16(), self.u16()
        ttl = int.from_bytes(self.take(4))
        self.take(self.u16())
        if rtype != TYPE_OPT:
            return None
        if not root_owner:
            raise _Bad
        return Edns(max(rclass, MIN_PAYLOAD), (ttl >> 16) & 0xFF)


def read_query(data: bytes) -> Query | Malformed | Dropped:
    """Never raises: every datagram is a query, a malformed query or a drop."""
    if len(data) < _HEADER.size:
        return Dropped("short")
    ident, flags, questions, answers, authorities, additionals = _HEADER.unpack_from(data)
    header = Header(ident, (flags >> 11) & 0xF, bool(flags & _RD), bool(flags & _CD))
    if flags & _QR:
        return Dropped("response")
    if header.opcode != 0:
        return Malformed(header, NOTIMP)
    if questions != 1:
        return Malformed(header, FORMERR)
    reader = _Reader(data)
    edns: Edns | None = None
    try:
        labels = reader.name()
        qtype, qclass = reader.u16(), reader.u16()
        for _ in range(answers + authorities):
            reader.record()
        for _ in range(additionals):
            opt = reader.record()
            if opt is not None:
                if edns is not None:
                    raise _Bad  # two OPT records (RFC 6891 6.1.1)
                edns = opt
        if reader.offset != len(data):
            raise _Bad
    except _Bad:
        return Malformed(header, FORMERR)
    if edns is not None and edns.version != 0:
        return Malformed(header, BADVERS, edns)
    return Query(header, labels, qtype, qclass, edns)


def write_response(
    header: Header,
    rcode: int,
    *,
    query: Query | None = None,
    authoritative: bool = False,
    answers: Sequence[ResourceRecord] = (),
    authority: Sequence[ResourceRecord] = (),
    edns: Edns | None = None,
    payload: int = 1232,
) -> tuple[bytes, bool]:
    """The response and whether it was truncated. ``query``: the question to echo (none for
    FORMERR and NOTIMP). With ``edns`` (the query's), the response carries an OPT record
    offering ``payload`` bytes and may be as large as the smaller of both sizes; without,
    512 bytes. A response too large loses its records and gets TC."""
    limit = MIN_PAYLOAD if edns is None else max(MIN_PAYLOAD, min(edns.payload, payload))
    wire = _pack(header, rcode, query, authoritative, answers, authority, edns, payload)
    if len(wire) <= limit:
        return wire, False
    return _pack(header, rcode, query, authoritative, (), (), edns, payload, tc=True), True


def _pack(
    header: Header,
    rcode: int,
    query: Query | None,
    authoritative: bool,
    answers: Sequence[ResourceRecord],
    authority: Sequence[ResourceRecord],
    edns: Edns | None,
    payload: int,
    *,
    tc: bool = False,
) -> bytes:
    bits = {"qr": 1, "opcode": header.opcode, "aa": int(authoritative), "tc": int(tc)}
    bits |= {"rd": int(header.rd), "cd": int(header.cd), "rcode": rcode & 0xF}
    message = DNSRecord(DNSHeader(id=header.id, bitmap=0, **bits))
    if query is not None:
        message.add_question(DNSQuestion(DNSLabel(list(query.labels)), query.qtype, query.qclass))
    for record in answers:
        message.add_answer(_rr(record))
    for record in authority:
        message.add_auth(_rr(record))
    if edns is not None:
        message.add_ar(EDNS0(udp_len=payload, ext_rcode=rcode >> 4))
    wire: bytes = message.pack()
    return wire


def _rr(record: ResourceRecord) -> RR:
    owner = DNSLabel(list(record.owner))
    data = record.data
    if isinstance(data, IPv4Address):
        return RR(owner, QTYPE.A, ttl=record.ttl, rdata=A(str(data)))
    if isinstance(data, str):
        return RR(owner, QTYPE.PTR, ttl=record.ttl, rdata=PTR(data))
    soa = SOA(data.mname, data.rname, (*_SOA_TIMES, data.minimum))
    return RR(owner, QTYPE.SOA, ttl=record.ttl, rdata=soa)
