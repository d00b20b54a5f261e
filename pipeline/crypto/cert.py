"""autovn certificates: a network authority (CA) binds a node's Ed25519 key to its name, the
virtual networks it may join and, optionally, fixed virtual addresses.

Wire format (version 1)::

    offset  size  field
    0       4     magic b"AVNC"
    4       1     version, 1
    5       n     body: a msgpack array, the canonical msgspec encoding of
                    [serial, name, public_key, networks, addresses,
                     not_before, not_after, issuer, is_ca]
    5+n     64    Ed25519 signature, by the issuer, of bytes [0, 5+n)

Body fields:

- ``serial``: unsigned 64-bit integer, chosen at random by the issuer (revocation by serial).
- ``name``: the node's name, 1-64 characters of letters, digits, ``-``, ``_``, ``.`` (the rule
  of ``node.name`` in the configuration).
- ``public_key``: the node's 32-byte Ed25519 public key. Its node id and its X25519 Noise key
  are derived from it (``pipeline/crypto/identity.py``).
- ``networks``: the namespace names (``network.namespace``) the node may join; no repeats.
- ``addresses``: fixed virtual IPv4 addresses, each 4 bytes (network order); no repeats; may be
  empty.
- ``not_before``, ``not_after``: unix seconds; the certificate is valid for
  ``not_before <= now <= not_after``.
- ``issuer``: the CA's 8-byte key id, the first 8 bytes of BLAKE2b-512 of its public key.
- ``is_ca``: true only for the CA's own, self-signed certificate.

A body must be the canonical encoding (what msgspec writes for the same values: smallest
integer and length forms), so a certificate has exactly one encoding: the signature cannot be
kept while the bytes change, and the fingerprint (BLAKE2b-160 of the whole encoding, hex) names
one certificate. At most ``MAX_CERT_LEN`` bytes, 32 networks and 32 addresses.

The text form (``to_pem``/``from_pem``) is the encoding in base64 between
``-----BEGIN AUTOVN CERTIFICATE-----`` and ``-----END AUTOVN CERTIFICATE-----`` lines, so a
certificate can be pasted into a terminal or a mail.

Pure: time comes in as ``now`` (unix seconds), randomness (the serial) from the caller.
"""

# No ``from __future__ import annotations``: the records' annotations stay objects, so
# building ``_DECODER`` (0.75 -> 0.15 ms) at import need not evaluate strings.

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Annotated, ClassVar, Self

import msgspec

from pipeline.crypto.identity import (
    PUBLIC_KEY_LEN,
    SIGNATURE_LEN,
    HidingRepr,
    Identity,
    NodeId,
    node_id,
    parse_node_id,
    verify_signature,
    x25519_public_from_ed25519,
)
from pipeline.errors import RemoteProtocolError

MAGIC = b"AVNC"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
KEY_ID_LEN = 8
MAX_CERT_LEN = 4096
MAX_NETWORKS = 32
MAX_ADDRESSES = 32
MAX_TIME = (1 << 63) - 1
PEM_LABEL = "AUTOVN CERTIFICATE"
_PEM_BEGIN = f"-----BEGIN {PEM_LABEL}-----"
_PEM_END = f"-----END {PEM_LABEL}-----"

REASONS = frozenset(
    {
        "malformed",
        "bad_version",
        "bad_signature",
        "foreign_ca",
        "expired",
        "not_yet_valid",
        "wrong_network",
        "revoked",
        "not_a_ca",
        "key_mismatch",
    }
)


class CertificateError(RemoteProtocolError):
    """A certificate is unusable. ``reason`` is one of ``REASONS``; ``detail`` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(reason, detail)


def key_id(public_key: bytes) -> bytes:
    """A CA's 8-byte key id: the first 8 bytes of BLAKE2b-512 of its Ed25519 public key."""
    return hashlib.blake2b(public_key).digest()[:KEY_ID_LEN]


def check_name(value: str) -> str | None:
    """The rule for node and network names (as in the configuration); None if ``value`` is ok."""
    ok = value and len(value) <= 64 and all(c.isalnum() or c in "-_." for c in value)
    return (
        None if ok else f"must be 1-64 characters of letters, digits, '-', '_', '.', got {value!r}"
    )


class _Body(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    serial: Annotated[int, msgspec.Meta(ge=0)]  # < 2**64: msgpack has no larger integers
    name: str
    public_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    networks: Annotated[list[str], msgspec.Meta(max_length=MAX_NETWORKS)]
    addresses: Annotated[
        list[Annotated[bytes, msgspec.Meta(min_length=4, max_length=4)]],
        msgspec.Meta(max_length=MAX_ADDRESSES),
    ]
    not_before: Annotated[int, msgspec.Meta(ge=0, le=MAX_TIME)]
    not_after: Annotated[int, msgspec.Meta(ge=0, le=MAX_TIME)]
    issuer: Annotated[bytes, msgspec.Meta(min_length=KEY_ID_LEN, max_length=KEY_ID_LEN)]
    is_ca: bool


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Body)
_NO_SIGNATURE = bytes(SIGNATURE_LEN)


class Certificate(HidingRepr, frozen=True):
    """A decoded (or freshly issued) certificate. Always well-formed: the constructor checks
    every field (ValueError), so any instance encodes. It says nothing about trust: that is
    ``verify``."""

    hidden: ClassVar[frozenset[str]] = frozenset({"signature"})

    serial: int
    name: str
    public_key: bytes
    networks: tuple[str, ...]
    addresses: tuple[IPv4Address, ...]
    not_before: int
    not_after: int
    issuer: bytes
    is_ca: bool
    signature: bytes

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem is not None:
            raise ValueError(problem)

    def _problem(self) -> str | None:
        if type(self.serial) is not int or not 0 <= self.serial < 1 << 64:
            return f"serial must be an unsigned 64-bit integer, got {self.serial!r}"
        if (msg := check_name(self.name)) is not None:
            return f"name {msg}"
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_LEN:
            return f"public_key must be {PUBLIC_KEY_LEN} bytes"
        if not isinstance(self.networks, tuple) or len(self.networks) > MAX_NETWORKS:
            return f"networks must be a tuple of at most {MAX_NETWORKS} names"
        for net in self.networks:
            if not isinstance(net, str) or (msg := check_name(net)) is not None:
                return f"network name {msg or 'must be a string'}"
        if len(set(self.networks)) != len(self.networks):
            return "networks must not repeat a name"
        if not isinstance(self.addresses, tuple) or len(self.addresses) > MAX_ADDRESSES:
            return f"addresses must be a tuple of at most {MAX_ADDRESSES} IPv4 addresses"
        if not all(isinstance(a, IPv4Address) for a in self.addresses):
            return "addresses must be IPv4 addresses"
        if len(set(self.addresses)) != len(self.addresses):
            return "addresses must not repeat an address"
        for field in ("not_before", "not_after"):
            value = getattr(self, field)
            if type(value) is not int or not 0 <= value <= MAX_TIME:
                return f"{field} must be unix seconds (a non-negative integer), got {value!r}"
        if self.not_after < self.not_before:
            return f"not_after ({self.not_after}) is before not_before ({self.not_before})"
        if not isinstance(self.issuer, bytes) or len(self.issuer) != KEY_ID_LEN:
            return f"issuer must be a {KEY_ID_LEN}-byte key id"
        if type(self.is_ca) is not bool:
            return "is_ca must be a boolean"
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_LEN:
            return f"signature must be {SIGNATURE_LEN} bytes"
        return None

    def signed_bytes(self) -> bytes:
        """Everything the signature covers: magic, version and body."""
        body = _Body(
            serial=self.serial,
            name=self.name,
            public_key=self.public_key,
            networks=list(self.networks),
            addresses=[a.packed for a in self.addresses],
            not_before=self.not_before,
            not_after=self.not_after,
            issuer=self.issuer,
            is_ca=self.is_ca,
        )
        return HEADER + _ENCODER.encode(body)

    def encode(self) -> bytes:
        return self.signed_bytes() + self.signature

    @property
    def fingerprint(self) -> str:
        """BLAKE2b-160 of the whole encoding, in hex: names exactly this certificate."""
        return hashlib.blake2b(self.encode(), digest_size=20).hexdigest()

    @property
    def node_id(self) -> NodeId:
        return node_id(self.public_key)

    @property
    def key_id(self) -> bytes:
        """This certificate's key as an issuer would name it (meaningful for a CA)."""
        return key_id(self.public_key)

    def valid_at(self, now: float) -> bool:
        """Only the validity window; ``verify`` checks everything."""
        return self.not_before <= now <= self.not_after


def decode_certificate(data: bytes) -> Certificate:
    """Parse (not verify) a certificate. Raises CertificateError ``malformed`` or
    ``bad_version``, and nothing else, whatever ``data`` holds."""
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise CertificateError("malformed", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_CERT_LEN:
        raise CertificateError("malformed", f"{len(data)} bytes, at most {MAX_CERT_LEN}")
    if len(data) < len(HEADER) + SIGNATURE_LEN + 1:
        raise CertificateError("malformed", f"too short ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise CertificateError("malformed", "not an autovn certificate (bad magic)")
    if data[len(MAGIC)] != VERSION:
        raise CertificateError("bad_version", f"version {data[len(MAGIC)]}, expected {VERSION}")
    body_bytes = data[len(HEADER) : -SIGNATURE_LEN]
    try:
        body = _DECODER.decode(body_bytes)
    except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8
        raise CertificateError("malformed", str(exc)) from None
    try:
        addresses = tuple(IPv4Address(a) for a in body.addresses)
        cert = Certificate(
            serial=body.serial,
            name=body.name,
            public_key=body.public_key,
            networks=tuple(body.networks),
            addresses=addresses,
            not_before=body.not_before,
            not_after=body.not_after,
            issuer=body.issuer,
            is_ca=body.is_ca,
            signature=data[-SIGNATURE_LEN:],
        )
    except ValueError as exc:
        raise CertificateError("malformed", str(exc)) from None
    if cert.encode() != data:
        raise CertificateError("malformed", "not the canonical encoding")
    return cert


def _signed(cert: Certificate, signer: Identity) -> Certificate:
    return msgspec.structs.replace(cert, signature=signer.sign(cert.signed_bytes()))


def make_ca(
    identity: Identity, *, name: str, not_before: int, not_after: int, serial: int
) -> Certificate:
    """The self-signed certificate of a network authority (``is_ca`` true, no networks)."""
    unsigned = Certificate(
        serial=serial,
        name=name,
        public_key=identity.public_key,
        networks=(),
        addresses=(),
        not_before=not_before,
        not_after=not_after,
        issuer=key_id(identity.public_key),
        is_ca=True,
        signature=_NO_SIGNATURE,
    )
    return _signed(unsigned, identity)


def issue(
    ca: Identity,
    ca_cert: Certificate,
    *,
    public_key: bytes,
    name: str,
    networks: Iterable[str],
    addresses: Iterable[IPv4Address | str] = (),
    not_before: int,
    not_after: int,
    serial: int,
) -> Certificate:
    """A node certificate signed by ``ca``.

    Raises CertificateError ``not_a_ca`` (``ca_cert`` is not a CA certificate) or
    ``key_mismatch`` (``ca`` is not the key of ``ca_cert``), and ValueError for a bad field, an
    unusable public key, no network, or a validity that outlasts the CA certificate."""
    if not ca_cert.is_ca:
        raise CertificateError("not_a_ca", f"{ca_cert.name!r} is not a CA certificate")
    if ca.public_key != ca_cert.public_key:
        raise CertificateError("key_mismatch", "the CA key does not belong to the CA certificate")
    x25519_public_from_ed25519(public_key)
    nets = tuple(networks)
    if not nets:
        raise ValueError("a node certificate must name at least one network")
    if not_after > ca_cert.not_after:
        raise ValueError(
            f"not_after ({not_after}) is after the CA certificate expires ({ca_cert.not_after})"
        )
    unsigned = Certificate(
        serial=serial,
        name=name,
        public_key=bytes(public_key),
        networks=nets,
        addresses=tuple(_address(a) for a in addresses),
        not_before=not_before,
        not_after=not_after,
        issuer=key_id(ca_cert.public_key),
        is_ca=False,
        signature=_NO_SIGNATURE,
    )
    return _signed(unsigned, ca)


def _address(value: IPv4Address | str) -> IPv4Address:
    try:
        return IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


class RevocationList(msgspec.Struct, frozen=True):
    """Revoked certificates, by serial or by node id (which revokes every certificate of that
    key). The text form, one entry per line::

        # lost laptop
        serial 1234567890123
        node 3f2a...40 hex digits...  # comments may also end a line
    """

    serials: frozenset[int] = frozenset()
    node_ids: frozenset[NodeId] = frozenset()

    @classmethod
    def empty(cls) -> Self:
        return cls()

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse the text form; ValueError naming the (1-based) line of the first bad entry."""
        serials: set[int] = set()
        nodes: set[NodeId] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            if len(words) != 2:
                raise ValueError(
                    f"line {number}: expected 'serial <decimal>' or 'node <40 hex digits>', "
                    f"got {line!r}"
                )
            kind, value = words
            if kind == "serial":
                if not re.fullmatch(r"[0-9]{1,20}", value) or int(value) >= 1 << 64:
                    raise ValueError(
                        f"line {number}: a serial is an unsigned 64-bit decimal, got {value!r}"
                    )
                serials.add(int(value))
            elif kind == "node":
                try:
                    nodes.add(parse_node_id(value))
                except ValueError as exc:
                    raise ValueError(f"line {number}: {exc}") from None
            else:
                raise ValueError(f"line {number}: unknown entry {kind!r} (use 'serial' or 'node')")
        return cls(frozenset(serials), frozenset(nodes))

    def contains(self, cert: Certificate) -> bool:
        return cert.serial in self.serials or cert.node_id in self.node_ids

    def __len__(self) -> int:
        return len(self.serials) + len(self.node_ids)


def _check_ca(ca_cert: Certificate, now: float) -> None:
    if not ca_cert.is_ca:
        raise CertificateError("not_a_ca", f"{ca_cert.name!r} is not a CA certificate")
    if ca_cert.issuer != ca_cert.key_id or not verify_signature(
        ca_cert.public_key, ca_cert.signed_bytes(), ca_cert.signature
    ):
        raise CertificateError("bad_signature", "the CA certificate is not validly self-signed")
    if now < ca_cert.not_before:
        raise CertificateError(
            "not_yet_valid", f"the CA certificate is valid from {ca_cert.not_before}"
        )
    if now > ca_cert.not_after:
        raise CertificateError("expired", f"the CA certificate expired at {ca_cert.not_after}")


def verify(
    cert: Certificate,
    ca_cert: Certificate,
    *,
    now: float,
    network: str | None,
    revoked: RevocationList,
) -> None:
    """Check that ``cert`` is trustworthy now; raise CertificateError with the first reason
    it is not. In order: ``ca_cert`` is a valid, self-signed CA certificate (``not_a_ca``,
    ``bad_signature``, ``not_yet_valid``, ``expired``); ``cert`` names that CA as issuer
    (``foreign_ca``) and carries its signature (``bad_signature``); it is not revoked
    (``revoked``); ``now`` is in its validity window (``not_yet_valid``, ``expired``); it lists
    ``network`` unless that is None (``wrong_network``)."""
    _check_ca(ca_cert, now)
    if cert.issuer != ca_cert.key_id:
        raise CertificateError(
            "foreign_ca", f"issued by key {cert.issuer.hex()}, not by {ca_cert.key_id.hex()}"
        )
    if not verify_signature(ca_cert.public_key, cert.signed_bytes(), cert.signature):
        raise CertificateError("bad_signature", "the CA's signature does not match")
    if revoked.contains(cert):
        raise CertificateError("revoked", f"serial {cert.serial}, node {cert.node_id.hex()}")
    if now < cert.not_before:
        raise CertificateError("not_yet_valid", f"valid from {cert.not_before}, now {int(now)}")
    if now > cert.not_after:
        raise CertificateError("expired", f"expired at {cert.not_after}, now {int(now)}")
    if network is not None and network not in cert.networks:
        joined = ", ".join(cert.networks) or "none"
        raise CertificateError("wrong_network", f"not allowed on {network!r} (allowed: {joined})")


def check_key(cert: Certificate, public_key: bytes) -> None:
    """Raise CertificateError ``key_mismatch`` unless ``cert`` is for ``public_key`` (the key a
    peer proved it holds, or this node's own identity)."""
    if cert.public_key != public_key:
        raise CertificateError(
            "key_mismatch",
            f"the certificate is for node {cert.node_id.hex()}, "
            f"the key is node {node_id(public_key).hex()}",
        )


def to_pem(cert: Certificate) -> str:
    """The pasteable text form: base64 in 64-character lines between BEGIN/END lines."""
    b64 = base64.b64encode(cert.encode()).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([_PEM_BEGIN, *lines, _PEM_END]) + "\n"


def from_pem(text: str) -> Certificate:
    """Parse the text form (text around the block is ignored; exactly one block).
    Raises CertificateError ``malformed``/``bad_version`` and nothing else."""
    lines = [line.strip() for line in text.splitlines()]
    begins = [i for i, line in enumerate(lines) if line == _PEM_BEGIN]
    ends = [i for i, line in enumerate(lines) if line == _PEM_END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise CertificateError(
            "malformed", f"expected exactly one {_PEM_BEGIN} ... {_PEM_END} block"
        )
    payload = "".join(lines[begins[0] + 1 : ends[0]])
    try:
        data = base64.b64decode(payload.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise CertificateError("malformed", "the certificate block is not valid base64") from None
    return decode_certificate(data)
