"""The DHT's records and messages, and their versioned codec (version 1). Pure.

A DHT message is one overlay payload (``OverlayNode.send_to_key`` / ``send_to_node``)::

    b"D" | version (1 byte, = 1) | msgpack array [tag, field, field, ...]

Payloads that do not start with ``b"D"`` are not the DHT's (the overlay carries other
applications' data too) and are ignored; anything else that does not decode, or breaks a
limit, raises ``RemoteProtocolError`` from ``decode``, which ``Dht`` turns into a counted
drop.

A **record** is ``DhtRecord(key, value, owner, seq, lease_s, deleted, signature)``: the owner's
32-byte Ed25519 public key signs ``SIGN_CONTEXT + msgpack([key, value, owner, seq, lease_s,
deleted])``. ``lease_s`` is a duration: each node that stores the record computes its expiry
on its own clock (``now + lease_s`` when it comes from its owner, ``now + remaining_s`` when
a replica hands it over, never more than ``lease_s``). ``seq`` grows with every signature
the owner makes for the key (renewal, change, delete), so an old record cannot displace a
newer one. ``deleted`` marks a tombstone (a signed delete). See ``check_record``.

A record ends with ``certificate``: the owner's certificate from the network authority
(``pipeline/crypto/cert.py``, its binary encoding; empty in records of nodes that have
none). It is not under the owner's signature: it proves itself (the authority signed it, and
it must be for ``owner``). A record of a *namespaced* key, ``ip:<namespace>:...`` or
``name:<namespace>:...`` (``key_namespace``), is kept, served and believed only if that
certificate is valid and lists the namespace (``authority.RecordAuthority``): a member of
another virtual network sharing the overlay cannot hold our addresses or names.

Messages (``req`` is a 63-bit request id chosen by the sender; answers carry it back):

- 1 ``Create(req, record)``: routed to the key; put if absent, or renew by the same owner.
- 2 ``Get(req, key)``: routed to the key.
- 3 ``Delete(req, record)``: routed to the key; ``record`` is the owner's tombstone.
- 4 ``Store(req, held, want_ack)``: the responsible node to a replica (``want_ack``), or a
  holder handing a record over to a new replica (no ack).
- 5 ``Fetch(req, key)``: the responsible node, holding nothing for a key, asks a replica.
- 6 ``Reply(req, status, seq, held)``: the answer to any of the above (``Status``);
  ``held`` are records with the sender's remaining lease, ``seq`` the stored sequence on
  ``STALE``.
"""

# No ``from __future__ import annotations``: the records' annotations stay objects, so the
# msgspec decoders built at import need not evaluate strings (every node start imports this).

import enum
import hashlib
from typing import Annotated

import msgspec

from pipeline.crypto.identity import Identity, node_id, verify_signature
from pipeline.errors import RemoteProtocolError

MAGIC = b"D"
VERSION = 1
MAX_KEY = 256
MAX_VALUE = 1024
MAX_LEASE_S = 7 * 24 * 3600.0
MAX_HELD = 8
SIGN_CONTEXT = b"autovn-dht-record-v1\x00"
IP_PREFIX = b"ip:"
NAMESPACED_PREFIXES = (b"ip:", b"name:")  # keys of a virtual network: <prefix><namespace>:...
MAX_CERTIFICATE = 4096

Key = Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_KEY)]
Value = Annotated[bytes, msgspec.Meta(max_length=MAX_VALUE)]
PublicKey = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
U63 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Lease = Annotated[float, msgspec.Meta(gt=0.0, le=MAX_LEASE_S)]
Remaining = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_LEASE_S)]


class Status(enum.IntEnum):
    OK = 0
    EXISTS = 1  # another owner holds a live record for the key (``held`` names it)
    STALE = 2  # the stored record of this owner has a sequence >= the one sent (``seq``)
    NO_QUORUM = 3  # stored here, but too few replicas acknowledged in time
    REFUSED = 4  # invalid record, or a delete by someone other than the owner


StatusCode = Annotated[int, msgspec.Meta(ge=0, le=4)]


class DhtRecord(msgspec.Struct, array_like=True, frozen=True):
    key: Key
    value: Value
    owner: PublicKey
    seq: U63
    lease_s: Lease
    deleted: bool
    signature: Signature
    certificate: Annotated[bytes, msgspec.Meta(max_length=MAX_CERTIFICATE)] = b""

    @property
    def owner_id(self) -> bytes:
        """The owner's 20-byte node id (BLAKE2b-160 of its public key)."""
        return bytes(node_id(self.owner))


class Held(msgspec.Struct, array_like=True, frozen=True):
    record: DhtRecord
    remaining_s: Remaining


class Create(msgspec.Struct, tag=1, array_like=True, frozen=True):
    req: U63
    record: DhtRecord


class Get(msgspec.Struct, tag=2, array_like=True, frozen=True):
    req: U63
    key: Key


class Delete(msgspec.Struct, tag=3, array_like=True, frozen=True):
    req: U63
    record: DhtRecord


class Store(msgspec.Struct, tag=4, array_like=True, frozen=True):
    req: U63
    held: Held
    want_ack: bool


class Fetch(msgspec.Struct, tag=5, array_like=True, frozen=True):
    req: U63
    key: Key


class Reply(msgspec.Struct, tag=6, array_like=True, frozen=True):
    req: U63
    status: StatusCode
    seq: U63
    held: Annotated[tuple[Held, ...], msgspec.Meta(max_length=MAX_HELD)]


Message = Create | Get | Delete | Store | Fetch | Reply

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_PREFIX = MAGIC + bytes([VERSION])


def encode(message: Message) -> bytes:
    return _PREFIX + _encoder.encode(message)


def is_dht(payload: bytes) -> bool:
    """The payload claims to be a DHT message (its first byte)."""
    return payload[:1] == MAGIC


def decode(payload: bytes) -> Message:
    """The message in a payload; ``RemoteProtocolError`` for anything malformed."""
    if len(payload) < 2 or payload[:1] != MAGIC:
        raise RemoteProtocolError("not_dht")
    if payload[1] != VERSION:
        raise RemoteProtocolError("bad_version", str(payload[1]))
    try:
        message: Message = _decoder.decode(memoryview(payload)[2:])
    except ValueError as exc:  # msgspec's DecodeError/ValidationError, UnicodeDecodeError
        raise RemoteProtocolError("malformed", str(exc)[:80]) from None
    return message


# -- records -----------------------------------------------------------------------------------


def key_position(key: bytes) -> int:
    """A key's position on the circle: BLAKE2b-160 of its bytes, as an int."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=20).digest(), "big")


def _signed_bytes(
    key: bytes, value: bytes, owner: bytes, seq: int, lease_s: float, deleted: bool
) -> bytes:
    return SIGN_CONTEXT + _encoder.encode([key, value, owner, seq, float(lease_s), deleted])


def sign_record(
    identity: Identity,
    key: bytes,
    value: bytes,
    *,
    seq: int,
    lease_s: float,
    deleted: bool = False,
    certificate: bytes = b"",
) -> DhtRecord:
    """A record signed by ``identity`` (its owner), carrying the owner's ``certificate``
    (encoded). ValueError if a limit is broken."""
    if not 1 <= len(key) <= MAX_KEY:
        raise ValueError(f"a key is 1 to {MAX_KEY} bytes, got {len(key)}")
    if len(value) > MAX_VALUE:
        raise ValueError(f"a value is at most {MAX_VALUE} bytes, got {len(value)}")
    if len(certificate) > MAX_CERTIFICATE:
        raise ValueError(f"a certificate is at most {MAX_CERTIFICATE} bytes")
    if not 0.0 < lease_s <= MAX_LEASE_S:
        raise ValueError(f"a lease is in (0, {MAX_LEASE_S}] seconds, got {lease_s}")
    if not 0 <= seq < 1 << 63:
        raise ValueError(f"a sequence is in [0, 2**63), got {seq}")
    owner = identity.public_key
    lease = float(lease_s)
    signature = identity.sign(_signed_bytes(key, value, owner, seq, lease, deleted))
    return DhtRecord(key, value, owner, seq, lease, deleted, signature, certificate)


def check_record(record: DhtRecord) -> str | None:
    """Why the record is invalid (a drop reason), or None if it is valid: the owner's
    signature verifies, and a live record for an ``ip:`` key names its owner (its value is
    the owner's 20-byte node id: only the node an address record names may hold it)."""
    data = _signed_bytes(
        record.key, record.value, record.owner, record.seq, record.lease_s, record.deleted
    )
    if not verify_signature(record.owner, data, record.signature):
        return "bad_signature"
    if record.key.startswith(IP_PREFIX) and not record.deleted:
        try:
            if record.value != record.owner_id:
                return "not_owner"
        except ValueError:
            return "bad_owner"
    return None


def key_namespace(key: bytes) -> str | None:
    """The virtual network a key belongs to (``ip:<namespace>:...``,
    ``name:<namespace>:...``), or None for a key of no network. A namespaced prefix with no
    namespace (``b"ip:"``, ``b"ip::x"``) gives ``""``, which no certificate lists."""
    for prefix in NAMESPACED_PREFIXES:
        if key.startswith(prefix):
            namespace, _, _ = key[len(prefix) :].partition(b":")
            return namespace.decode("utf-8", errors="replace")
    return None


def tie_break(a: DhtRecord, b: DhtRecord) -> DhtRecord:
    """Of two valid live records of one key by different owners (a split brain after
    churn), the one every node keeps: the smaller BLAKE2b of the signature."""
    ha = hashlib.blake2b(a.signature, digest_size=16).digest()
    hb = hashlib.blake2b(b.signature, digest_size=16).digest()
    return a if ha <= hb else b
