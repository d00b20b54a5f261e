"""Handshake datagrams: their layout, the cheap MACs in front of them, and cookie replies.

A HANDSHAKE datagram (overlay header type 3)::

    overlay header (16) | pattern u8 | step u8 | sender index u32 | noise | mac1 (16) | mac2 (16)

The header's session field carries the receiver's index (0 in a first message). ``pattern``
is 1 for Noise IK (the peer's static key is known) and 2 for XX (it is not); ``step`` counts
the messages of the pattern from 0. The Noise payloads carry a ``HandshakePayload``: the
sender's certificate and a timestamp, and the data cipher's negotiation.

The data cipher (``DataCipher``: the AEAD of the session's DATA, OVERLAY and RELAY
datagrams): the initiator offers the ciphers it allows, in its order of preference
(``ciphers``); the responder takes the first of them that it allows too and names it
(``cipher``); the initiator checks that it is one it offered (``offer_accepted``). In XX the
initiator's first message carries a payload with the offer only (no certificate: the
responder is not known yet), as the responder answers before it sees the initiator's
certificate. No common cipher: the handshake is refused (``no_common_cipher``). A node
older than the negotiation sends neither field and ignores both: it means
ChaCha20-Poly1305. Every payload is in the Noise transcript (IK's first one encrypted, XX's
first one in the clear but hashed into every later message's AD), so an offer or choice
changed on the way fails the handshake: a downgrade needs a key.

``mac1`` is a keyed BLAKE2b-128 over everything before it, keyed by a hash of the network
authority's public key: a datagram without a valid mac1 was not made by someone holding the
network's CA certificate and is dropped before any Diffie-Hellman. ``mac2`` is the same MAC
keyed by a *cookie*; a responder under load answers messages without a valid mac2 with a
COOKIE datagram (type 4) instead of computing, and only then spends DH on an initiator that
proved it can receive at its source address (the idea of WireGuard's cookie reply)::

    overlay header (16, session = the initiator's sender index) | nonce (24) | sealed cookie (32)

The cookie is BLAKE2b-128 of the initiator's address under a secret that changes every two
minutes, sealed with XChaCha20-Poly1305 under the network key, the answered mac1 as AD.
Pure: no I/O, time and randomness come in as arguments.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from typing import Annotated, NamedTuple

import msgspec
from nacl import bindings

from pipeline.crypto.ciphers import LEGACY_CIPHER, DataCipher
from pipeline.errors import RemoteProtocolError
from pipeline.wire.overlay import HEADER_LEN, VERSION, DatagramType, build_header

MAC_LEN = 16
BODY = struct.Struct("!BBI")
BODY_LEN = BODY.size  # 6
MIN_HANDSHAKE_LEN = HEADER_LEN + BODY_LEN + 32 + 2 * MAC_LEN
COOKIE_NONCE_LEN = 24
COOKIE_LEN = 16
COOKIE_DATAGRAM_LEN = HEADER_LEN + COOKIE_NONCE_LEN + COOKIE_LEN + 16
PROLOGUE = b"autovn/1"


class Pattern(enum.IntEnum):
    IK = 1
    XX = 2

    @property
    def protocol(self) -> str:
        return f"Noise_{self.name}_25519_ChaChaPoly_BLAKE2b"

    @property
    def messages(self) -> int:
        return 2 if self is Pattern.IK else 3


class HandshakeMessage(NamedTuple):
    receiver_index: int
    pattern: Pattern
    step: int
    sender_index: int
    noise: bytes
    mac1: bytes
    mac2: bytes


CipherName = Annotated[str, msgspec.Meta(max_length=32)]  # a name we may not know (newer)


class HandshakePayload(msgspec.Struct, array_like=True, frozen=True):
    certificate: bytes  # b"": XX's first message, which carries the offer only
    timestamp_ns: int  # the sender's wall clock: a replayed first message is older
    # the initiator's: the data ciphers it allows, best first (); the responder's: ()
    ciphers: Annotated[tuple[CipherName, ...], msgspec.Meta(max_length=16)] = ()
    # the responder's: the one it took from the offer; the initiator's: ""
    cipher: CipherName = ""


_payload_decoder = msgspec.msgpack.Decoder(HandshakePayload)
_payload_encoder = msgspec.msgpack.Encoder()
_PATTERNS = {p.value: p for p in Pattern}


def encode_payload(payload: HandshakePayload) -> bytes:
    return _payload_encoder.encode(payload)


def decode_payload(data: bytes) -> HandshakePayload:
    try:
        payload: HandshakePayload = _payload_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise RemoteProtocolError("bad_payload", str(exc)) from exc
    return payload


def choose_cipher(offer: Sequence[str], allowed: Sequence[DataCipher]) -> DataCipher:
    """The responder's choice: the first cipher of the initiator's ``offer`` that this node
    ``allowed``s; no offer (an older node) means ``LEGACY_CIPHER``. Names we do not know (a
    newer node's) are passed over."""
    for name in offer or (LEGACY_CIPHER,):
        if name in allowed:
            return DataCipher(name)
    raise RemoteProtocolError(
        "no_common_cipher", f"offered {list(offer)}, allowed {[c.value for c in allowed]}"
    )


def offer_accepted(choice: str, offered: Sequence[DataCipher]) -> DataCipher:
    """The initiator's check of the responder's ``choice``: one it ``offered`` (no choice,
    from an older node, means ``LEGACY_CIPHER``, which it may not have offered)."""
    name = choice or LEGACY_CIPHER
    if name not in offered:
        reason = "no_common_cipher" if not choice else "cipher_not_offered"
        raise RemoteProtocolError(reason, f"{name!r} chosen, {[c.value for c in offered]} offered")
    return DataCipher(name)


def network_key(label: bytes, ca_public_key: bytes) -> bytes:
    return hashlib.blake2b(label + ca_public_key, digest_size=32).digest()


def mac1_key(ca_public_key: bytes) -> bytes:
    return network_key(b"autovn mac1", ca_public_key)


def cookie_key(ca_public_key: bytes) -> bytes:
    return network_key(b"autovn cookie", ca_public_key)


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=MAC_LEN, key=key).digest()


def build_handshake(
    msg_key: bytes,
    *,
    receiver_index: int,
    pattern: Pattern,
    step: int,
    sender_index: int,
    noise: bytes,
    cookie: bytes | None = None,
) -> bytes:
    head = build_header(DatagramType.HANDSHAKE, session=receiver_index)
    body = head + BODY.pack(pattern, step, sender_index) + noise
    mac1 = mac(msg_key, body)
    mac2 = mac(cookie, body + mac1) if cookie is not None else bytes(MAC_LEN)
    return body + mac1 + mac2


def parse_handshake(datagram: bytes) -> HandshakeMessage:
    """Layout only: the MACs are checked by ``check_mac1`` and ``check_mac2``."""
    if len(datagram) < MIN_HANDSHAKE_LEN:
        raise RemoteProtocolError("short_handshake", f"{len(datagram)} bytes")
    if datagram[0] != VERSION or datagram[1] != DatagramType.HANDSHAKE:
        raise RemoteProtocolError("bad_type")
    (receiver,) = struct.unpack_from("!I", datagram, 4)
    kind, step, sender = BODY.unpack_from(datagram, HEADER_LEN)
    pattern = _PATTERNS.get(kind)
    if pattern is None or step >= pattern.messages:
        raise RemoteProtocolError("bad_pattern", f"pattern {kind} step {step}")
    end = len(datagram) - 2 * MAC_LEN
    noise = datagram[HEADER_LEN + BODY_LEN : end]
    return HandshakeMessage(
        receiver, pattern, step, sender, noise, datagram[end:-MAC_LEN], datagram[-MAC_LEN:]
    )


def check_mac1(msg_key: bytes, datagram: bytes) -> bool:
    end = len(datagram) - 2 * MAC_LEN
    return end > 0 and hmac.compare_digest(mac(msg_key, datagram[:end]), datagram[end:-MAC_LEN])


def check_mac2(cookie: bytes, datagram: bytes) -> bool:
    end = len(datagram) - MAC_LEN
    return end > 0 and hmac.compare_digest(mac(cookie, datagram[:end]), datagram[end:])


def make_cookie(secret: bytes, source: tuple[str, int]) -> bytes:
    return mac(secret, f"{source[0]}:{source[1]}".encode())


def build_cookie_reply(
    seal_key: bytes, *, receiver_index: int, cookie: bytes, mac1: bytes, nonce: bytes
) -> bytes:
    sealed = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(cookie, mac1, nonce, seal_key)
    return build_header(DatagramType.COOKIE, session=receiver_index) + nonce + sealed


def open_cookie_reply(seal_key: bytes, datagram: bytes, mac1: bytes) -> bytes:
    """The cookie inside a COOKIE datagram answering the message that carried ``mac1``."""
    if len(datagram) != COOKIE_DATAGRAM_LEN:
        raise RemoteProtocolError("bad_cookie", f"{len(datagram)} bytes")
    nonce = datagram[HEADER_LEN : HEADER_LEN + COOKIE_NONCE_LEN]
    sealed = datagram[HEADER_LEN + COOKIE_NONCE_LEN :]
    try:
        cookie: bytes = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed, mac1, nonce, seal_key
        )
    except Exception as exc:  # nacl.exceptions.CryptoError: a forged or foreign cookie
        if isinstance(exc, (TypeError, ValueError)):
            raise
        raise RemoteProtocolError("bad_cookie", "does not open") from exc
    return cookie


def cookie_receiver(datagram: bytes) -> int:
    (index,) = struct.unpack_from("!I", datagram, 4)
    return int(index)
