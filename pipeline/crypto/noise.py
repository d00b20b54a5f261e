"""The Noise Protocol Framework (revision 34): 25519, ChaChaPoly, BLAKE2b/SHA256/SHA512.

Theory of operation
-------------------
A Noise protocol is named ``Noise_<pattern>_<dh>_<cipher>_<hash>``. The pattern is data: two
pre-messages (public keys each side knows of the other before the first message) and a list of
messages, each a list of tokens, sent alternately by the initiator and the responder. Every
pattern of the spec is written below as one table row; a PSK modifier (``psk0`` ... ``pskN``,
several joined by ``+``) rewrites a pattern by inserting ``psk`` tokens.

Three nested objects carry the state, exactly as in the spec:

- ``CipherState``: a key ``k`` (or none) and a 64-bit nonce ``n``; AEAD with the handshake hash
  as associated data during the handshake, with ``b""`` afterwards.
- ``SymmetricState``: the chaining key ``ck`` (everything mixed by DH and PSK, via HKDF) and the
  handshake hash ``h`` (everything sent or received, via HASH), plus the ``CipherState``.
- ``HandshakeState``: the local key pairs, the remote public keys, the pattern and its position.
  ``write_message``/``read_message`` run one message's tokens; after the last message ``split``
  derives the two transport ``CipherState``s.

Everything here is sans-I/O and deterministic: no clock, no OS randomness. Ephemeral private
keys come from an injected ``rng(n) -> n bytes`` or are passed in (test vectors).

Errors: ``NoiseError`` (a ``RemoteProtocolError``) for anything the remote can cause: a failed
authentication, a truncated, oversize or out-of-turn message, a low-order public key.
``read_message`` works on a copy of the state and commits only on success, so a rejected
message leaves the handshake exactly where it was. ``ValueError`` is for our own mistakes: an
unknown protocol name, a missing or malformed key, an oversize payload, use out of turn.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from enum import Enum
from typing import ClassVar

import msgspec
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)

from pipeline.crypto.identity import HidingRepr
from pipeline.errors import RemoteProtocolError

__all__ = [
    "DH_LEN",
    "HASHES",
    "KEY_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "PATTERNS",
    "TAG_LEN",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "HashFunction",
    "NoiseError",
    "NoiseProtocol",
    "SymmetricState",
    "Token",
    "public_key",
    "protocol_name_parts",
]

MAX_MESSAGE_LEN = 65535
DH_LEN = 32
KEY_LEN = 32
TAG_LEN = 16
MAX_NONCE = 2**64 - 1  # reserved: used by REKEY, never by a message

_NONCE = struct.Struct("<4xQ")  # ChaChaPoly: 32 bits of zeros, then n little-endian
_ZERO_KEY = bytes(KEY_LEN)
_PROBE_SCALAR = bytes([9]) * DH_LEN  # any scalar: clamping makes it a multiple of 8


class NoiseError(RemoteProtocolError):
    """A handshake or transport message from the remote is bad; ``reason`` says how."""


# -- primitives ------------------------------------------------------------------------------


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamped as libsodium does)."""
    _check_len("private key", private, DH_LEN)
    return crypto_scalarmult_base(private)


def _dh(private: bytes, public: bytes) -> bytes:
    """X25519; a low-order ``public`` (all-zero shared secret) is the remote's fault."""
    try:
        return crypto_scalarmult(private, public)
    except RuntimeError as exc:  # nacl.exceptions.RuntimeError: libsodium refused the point
        raise NoiseError("noise_bad_public_key", "low-order point") from exc


def _is_low_order(public: bytes) -> bool:
    try:
        crypto_scalarmult(_PROBE_SCALAR, public)
    except RuntimeError:
        return True
    return False


def _check_len(what: str, value: bytes, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise ValueError(f"{what} must be {length} bytes")


def _aead_encrypt(key: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _NONCE.pack(n), key)


def _aead_decrypt(key: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _NONCE.pack(n), key)
    except (TypeError, ValueError):  # a bad argument is our bug, not the remote's
        raise
    except Exception as exc:  # nacl.exceptions.CryptoError: the tag did not verify
        raise NoiseError("noise_decrypt_failed", f"nonce {n}") from exc


class HashFunction(msgspec.Struct, frozen=True):
    """A Noise hash function: HASH, HMAC-HASH and HKDF over a ``hashlib`` algorithm."""

    name: str
    hashlib_name: str
    hashlen: int
    blocklen: int

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.hashlib_name, data).digest()

    def hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hashlib_name)

    def hkdf(self, chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
        """HKDF of the spec (section 4.3): two or three HASHLEN outputs."""
        assert outputs in (2, 3)
        temp_key = self.hmac(chaining_key, ikm)
        out: list[bytes] = []
        previous = b""
        for i in range(1, outputs + 1):
            previous = self.hmac(temp_key, previous + bytes([i]))
            out.append(previous)
        return tuple(out)


HASHES: dict[str, HashFunction] = {
    h.name: h
    for h in (
        HashFunction("BLAKE2b", "blake2b", 64, 128),
        HashFunction("SHA256", "sha256", 32, 64),
        HashFunction("SHA512", "sha512", 64, 128),
    )
}


# -- CipherState and SymmetricState (spec sections 5.1, 5.2) -------------------------------


class CipherState:
    """A key (or none: then encryption is the identity) and the nonce of the next message."""

    __slots__ = ("_k", "_n")

    def __init__(self, key: bytes | None = None, n: int = 0) -> None:
        if key is not None:
            _check_len("cipher key", key, KEY_LEN)
        self._k = key
        self._n = 0
        self.set_nonce(n)

    @property
    def has_key(self) -> bool:
        return self._k is not None

    @property
    def key(self) -> bytes | None:
        """The raw key, for handing a transport key to the data path after ``split``."""
        return self._k

    @property
    def n(self) -> int:
        return self._n

    def set_nonce(self, n: int) -> None:
        if not 0 <= n <= MAX_NONCE:
            raise ValueError(f"nonce {n} out of range")
        self._n = n

    def copy(self) -> CipherState:
        return CipherState(self._k, self._n)

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt under nonce ``n`` and advance it; ``ValueError`` when too long or worn out."""
        if self._k is None:
            return plaintext
        if len(plaintext) > MAX_MESSAGE_LEN - TAG_LEN:
            raise ValueError(f"plaintext of {len(plaintext)} bytes exceeds a Noise message")
        if self._n == MAX_NONCE:
            raise ValueError("nonces exhausted: rekey or start a new handshake")
        ciphertext = _aead_encrypt(self._k, self._n, ad, plaintext)
        self._n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt under nonce ``n`` and advance it; on ``NoiseError`` ``n`` is unchanged."""
        if self._k is None:
            return ciphertext
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise NoiseError("noise_oversize", f"{len(ciphertext)} bytes")
        if len(ciphertext) < TAG_LEN:
            raise NoiseError("noise_truncated", f"{len(ciphertext)} bytes, need a tag")
        if self._n == MAX_NONCE:
            raise NoiseError("noise_nonce_exhausted")
        plaintext = _aead_decrypt(self._k, self._n, ad, bytes(ciphertext))
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """k = first 32 bytes of ENCRYPT(k, 2^64-1, b"", 32 zero bytes); ``n`` is kept."""
        if self._k is None:
            raise ValueError("rekey without a key")
        self._k = _aead_encrypt(self._k, MAX_NONCE, b"", _ZERO_KEY)[:KEY_LEN]


class SymmetricState:
    """The chaining key ``ck``, the handshake hash ``h`` and the handshake ``CipherState``."""

    __slots__ = ("_hash", "ck", "h", "cipher")

    def __init__(self, hash_fn: HashFunction, protocol_name: bytes) -> None:
        self._hash = hash_fn
        if len(protocol_name) <= hash_fn.hashlen:
            self.h = protocol_name.ljust(hash_fn.hashlen, b"\x00")
        else:
            self.h = hash_fn.hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def copy(self) -> SymmetricState:
        other = SymmetricState.__new__(SymmetricState)
        other._hash, other.ck, other.h = self._hash, self.ck, self.h
        other.cipher = self.cipher.copy()
        return other

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = self._hash.hkdf(self.ck, ikm, 2)
        self.cipher = CipherState(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = self._hash.hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = self._hash.hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cipher = CipherState(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = self._hash.hkdf(self.ck, b"", 2)
        return CipherState(k1[:KEY_LEN]), CipherState(k2[:KEY_LEN])


# -- handshake patterns (spec sections 7, 9, 18) ---------------------------------------------


class Token(Enum):
    E = "e"
    S = "s"
    EE = "ee"
    ES = "es"
    SE = "se"
    SS = "ss"
    PSK = "psk"


Message = tuple[Token, ...]


def _tokens(text: str) -> Message:
    return tuple(Token(t.strip()) for t in text.split(",") if t.strip())


class HandshakePattern(msgspec.Struct, frozen=True):
    """Pre-messages and messages; message ``i`` is sent by the initiator when ``i`` is even."""

    name: str
    initiator_pre: Message
    responder_pre: Message
    messages: tuple[Message, ...]

    @property
    def one_way(self) -> bool:
        return len(self.messages) == 1

    @property
    def has_psk(self) -> bool:
        return any(Token.PSK in m for m in self.messages)

    def sent_by(self, initiator: bool) -> list[Message]:
        """The messages one side sends."""
        first = 0 if initiator else 1
        return list(self.messages[first::2])

    def with_psk(self, position: int) -> HandshakePattern:
        """The ``psk<position>`` modifier: psk0 opens message 1, pskN closes message N."""
        if not 0 <= position <= len(self.messages):
            raise ValueError(f"psk{position}: the pattern has {len(self.messages)} messages")
        messages = list(self.messages)
        if position == 0:
            messages[0] = (Token.PSK, *messages[0])
        else:
            messages[position - 1] = (*messages[position - 1], Token.PSK)
        return msgspec.structs.replace(self, messages=tuple(messages))


def _pattern(name: str, pre_i: str, pre_r: str, *messages: str) -> HandshakePattern:
    return HandshakePattern(
        name, _tokens(pre_i), _tokens(pre_r), tuple(_tokens(m) for m in messages)
    )


# Each row: name, initiator pre-message, responder pre-message, then the messages in order.
PATTERNS: dict[str, HandshakePattern] = {
    p.name: p
    for p in (
        # one-way (7.4)
        _pattern("N", "", "s", "e, es"),
        _pattern("K", "s", "s", "e, es, ss"),
        _pattern("X", "", "s", "e, es, s, ss"),
        # fundamental interactive (7.5)
        _pattern("NN", "", "", "e", "e, ee"),
        _pattern("NK", "", "s", "e, es", "e, ee"),
        _pattern("NX", "", "", "e", "e, ee, s, es"),
        _pattern("KN", "s", "", "e", "e, ee, se"),
        _pattern("KK", "s", "s", "e, es, ss", "e, ee, se"),
        _pattern("KX", "s", "", "e", "e, ee, se, s, es"),
        _pattern("XN", "", "", "e", "e, ee", "s, se"),
        _pattern("XK", "", "s", "e, es", "e, ee", "s, se"),
        _pattern("XX", "", "", "e", "e, ee, s, es", "s, se"),
        _pattern("IN", "", "", "e, s", "e, ee, se"),
        _pattern("IK", "", "s", "e, es, s, ss", "e, ee, se"),
        _pattern("IX", "", "", "e, s", "e, ee, se, s, es"),
        # deferred (18)
        _pattern("NK1", "", "s", "e", "e, ee, es"),
        _pattern("NX1", "", "", "e", "e, ee, s", "es"),
        _pattern("X1N", "", "", "e", "e, ee", "s", "se"),
        _pattern("X1K", "", "s", "e, es", "e, ee", "s", "se"),
        _pattern("XK1", "", "s", "e", "e, ee, es", "s, se"),
        _pattern("X1K1", "", "s", "e", "e, ee, es", "s", "se"),
        _pattern("X1X", "", "", "e", "e, ee, s, es", "s", "se"),
        _pattern("XX1", "", "", "e", "e, ee, s", "es, s, se"),
        _pattern("X1X1", "", "", "e", "e, ee, s", "es, s", "se"),
        _pattern("K1N", "s", "", "e", "e, ee", "se"),
        _pattern("K1K", "s", "s", "e, es", "e, ee", "se"),
        _pattern("KK1", "s", "s", "e", "e, ee, se, es"),
        _pattern("K1K1", "s", "s", "e", "e, ee, es", "se"),
        _pattern("K1X", "s", "", "e", "e, ee, s, es", "se"),
        _pattern("KX1", "s", "", "e", "e, ee, se, s", "es"),
        _pattern("K1X1", "s", "", "e", "e, ee, s", "se, es"),
        _pattern("I1N", "", "", "e, s", "e, ee", "se"),
        _pattern("I1K", "", "s", "e, es, s", "e, ee", "se"),
        _pattern("IK1", "", "s", "e, s", "e, ee, se, es"),
        _pattern("I1K1", "", "s", "e, s", "e, ee, es", "se"),
        _pattern("I1X", "", "", "e, s", "e, ee, s, es", "se"),
        _pattern("IX1", "", "", "e, s", "e, ee, se, s", "es"),
        _pattern("I1X1", "", "", "e, s", "e, ee, s", "se, es"),
    )
}


class NoiseProtocol(msgspec.Struct, frozen=True):
    """A parsed protocol name: the (modified) pattern and the three functions."""

    name: str
    pattern: HandshakePattern
    dh: str
    cipher: str
    hash: HashFunction


def _split_pattern_name(text: str) -> tuple[str, list[str]]:
    """``"XXpsk0+psk3"`` -> ``("XX", ["psk0", "psk3"])``: modifiers start at a lower-case letter."""
    cut = next((i for i, c in enumerate(text) if c.islower()), len(text))
    base, rest = text[:cut], text[cut:]
    return base, (rest.split("+") if rest else [])


def _psk_position(modifier: str) -> int:
    digits = modifier.removeprefix("psk")
    if modifier == digits or not digits.isdigit() or (digits != "0" and digits[0] == "0"):
        raise ValueError(f"unsupported pattern modifier {modifier!r}")
    return int(digits)


def protocol_name_parts(name: str) -> NoiseProtocol:
    """Parse ``Noise_<pattern>_25519_ChaChaPoly_<hash>``; ``ValueError`` if unsupported."""
    parts = name.split("_")
    if len(parts) != 5 or parts[0] != "Noise":
        raise ValueError(f"not a Noise protocol name: {name!r}")
    _, pattern_name, dh, cipher, hash_name = parts
    base_name, modifiers = _split_pattern_name(pattern_name)
    pattern = PATTERNS.get(base_name)
    if pattern is None:
        raise ValueError(f"unknown handshake pattern {base_name!r} in {name!r}")
    positions = [_psk_position(m) for m in modifiers]
    if len(set(positions)) != len(positions):
        raise ValueError(f"repeated modifier in {name!r}")
    for position in positions:
        pattern = pattern.with_psk(position)
    pattern = msgspec.structs.replace(pattern, name=pattern_name)
    if dh != "25519":
        raise ValueError(f"unsupported DH function {dh!r} (only 25519)")
    if cipher != "ChaChaPoly":
        raise ValueError(f"unsupported cipher {cipher!r} (only ChaChaPoly)")
    if hash_name not in HASHES:
        raise ValueError(f"unsupported hash {hash_name!r} (one of {', '.join(HASHES)})")
    return NoiseProtocol(name, pattern, dh, cipher, HASHES[hash_name])


# -- HandshakeState (spec section 5.3) -------------------------------------------------------


class _KeyPair(HidingRepr, frozen=True):
    hidden: ClassVar[frozenset[str]] = frozenset({"private"})

    private: bytes
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> _KeyPair:
        return cls(private, public_key(private))


class _Progress(msgspec.Struct):
    """What a message changes; ``read_message`` works on a copy and commits it on success."""

    sym: SymmetricState
    e: _KeyPair | None
    re: bytes | None
    rs: bytes | None
    next_psk: int = 0

    def copy(self) -> _Progress:
        return msgspec.structs.replace(self, sym=self.sym.copy())


class HandshakeState:
    """One side of a Noise handshake; ``s``/``e`` are private keys, ``rs``/``re`` public keys."""

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
        rng: Callable[[int], bytes] | None = None,
    ) -> None:
        self.protocol = protocol_name_parts(protocol_name)
        self.initiator = initiator
        pattern = self.protocol.pattern
        self._s = _KeyPair.from_private(s) if s is not None else None
        self._fixed_e = _KeyPair.from_private(e) if e is not None else None
        self._psks = tuple(psks)
        self._rng = rng
        self._check_keys(rs, re)
        self._progress = _Progress(
            SymmetricState(self.protocol.hash, protocol_name.encode("ascii")), None, re, rs
        )
        self._index = 0
        self._split_done = False
        self._progress.sym.mix_hash(prologue)
        self._mix_pre_messages(pattern)

    # -- set-up

    def _check_keys(self, rs: bytes | None, re: bytes | None) -> None:
        pattern = self.protocol.pattern
        ours = pattern.initiator_pre if self.initiator else pattern.responder_pre
        theirs = pattern.responder_pre if self.initiator else pattern.initiator_pre
        sent = [t for m in pattern.sent_by(self.initiator) for t in m]
        if self._s is None and (Token.S in ours or Token.S in sent):
            raise ValueError(f"{pattern.name} needs the local static key s")
        if self._fixed_e is None and Token.E in ours:
            raise ValueError(f"{pattern.name} needs the local ephemeral key e (pre-message)")
        if self._fixed_e is None and self._rng is None and Token.E in sent:
            raise ValueError(f"{pattern.name} needs an ephemeral key: pass e or rng")
        for token, key, label in ((Token.S, rs, "rs"), (Token.E, re, "re")):
            if (token in theirs) != (key is not None):
                need = "needs" if token in theirs else "does not pre-share"
                raise ValueError(f"{pattern.name} {need} the remote key {label}")
            if key is not None:
                _check_len(label, key, DH_LEN)
                if _is_low_order(key):
                    raise ValueError(f"{label} is a low-order point")
        psk_count = sum(m.count(Token.PSK) for m in pattern.messages)
        if len(self._psks) != psk_count:
            raise ValueError(f"{pattern.name} needs {psk_count} PSKs, got {len(self._psks)}")
        for psk in self._psks:
            _check_len("psk", psk, KEY_LEN)

    def _mix_pre_messages(self, pattern: HandshakePattern) -> None:
        """MixHash the pre-message keys: the initiator's first, then the responder's."""
        progress = self._progress
        for initiator_side, tokens in (
            (True, pattern.initiator_pre),
            (False, pattern.responder_pre),
        ):
            local = initiator_side == self.initiator
            for token in tokens:
                if token is Token.E:
                    if local:
                        progress.e = self._fixed_e
                    key = progress.e.public if local and progress.e else progress.re
                else:
                    key = self._s.public if local and self._s else progress.rs
                assert key is not None
                progress.sym.mix_hash(key)
                if token is Token.E and pattern.has_psk:
                    progress.sym.mix_key(key)

    # -- public state

    @property
    def complete(self) -> bool:
        return self._index >= len(self.protocol.pattern.messages)

    @property
    def message_index(self) -> int:
        """How many handshake messages have been written or read."""
        return self._index

    @property
    def our_turn(self) -> bool:
        """Whether the next handshake message is ours to write (False once complete)."""
        return not self.complete and (self._index % 2 == 0) == self.initiator

    @property
    def handshake_hash(self) -> bytes:
        return self._progress.sym.h

    @property
    def remote_static(self) -> bytes | None:
        return self._progress.rs

    @property
    def remote_ephemeral(self) -> bytes | None:
        return self._progress.re

    # -- messages

    def write_message(self, payload: bytes) -> bytes:
        """The next handshake message carrying ``payload``; ``ValueError`` if not our turn."""
        if not self.our_turn:
            raise ValueError("write_message out of turn" + (" (complete)" if self.complete else ""))
        if len(payload) > MAX_MESSAGE_LEN:
            raise ValueError(f"payload of {len(payload)} bytes exceeds a Noise message")
        work = self._progress.copy()
        out = bytearray()
        for token in self.protocol.pattern.messages[self._index]:
            out += self._write_token(work, token)
        out += work.sym.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_LEN:
            raise ValueError(f"message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
        self._progress = work
        self._index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """The payload of the remote's next handshake message; on ``NoiseError`` nothing moves."""
        if self.complete or self.our_turn:
            raise NoiseError("noise_unexpected_message", f"handshake message {self._index}")
        if len(message) > MAX_MESSAGE_LEN:
            raise NoiseError("noise_oversize", f"{len(message)} bytes")
        work = self._progress.copy()
        view = memoryview(message)
        for token in self.protocol.pattern.messages[self._index]:
            view = self._read_token(work, token, view)
        payload = work.sym.decrypt_and_hash(bytes(view))
        self._progress = work
        self._index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator->responder, responder->initiator) transport ciphers; once, when complete."""
        if not self.complete:
            raise ValueError(f"split before the handshake is complete ({self._index} messages)")
        if self._split_done:
            raise ValueError("split twice would reuse the transport keys")
        self._split_done = True
        return self._progress.sym.split()

    # -- tokens

    def _write_token(self, work: _Progress, token: Token) -> bytes:
        if token is Token.E:
            work.e = self._fixed_e or self._generate_ephemeral()
            self._mix_ephemeral(work, work.e.public)
            return work.e.public
        if token is Token.S:
            assert self._s is not None
            return work.sym.encrypt_and_hash(self._s.public)
        self._mix_secret(work, token)
        return b""

    def _read_token(self, work: _Progress, token: Token, view: memoryview) -> memoryview:
        if token is Token.E:
            work.re = _take(view, DH_LEN, "e")
            self._mix_ephemeral(work, work.re)
            return view[DH_LEN:]
        if token is Token.S:
            length = DH_LEN + (TAG_LEN if work.sym.cipher.has_key else 0)
            work.rs = work.sym.decrypt_and_hash(_take(view, length, "s"))
            return view[length:]
        self._mix_secret(work, token)
        return view

    def _mix_ephemeral(self, work: _Progress, public: bytes) -> None:
        work.sym.mix_hash(public)
        if self.protocol.pattern.has_psk:
            work.sym.mix_key(public)

    def _mix_secret(self, work: _Progress, token: Token) -> None:
        """The DH tokens and ``psk``: MixKey(DH(...)) or MixKeyAndHash(psk)."""
        if token is Token.PSK:
            work.sym.mix_key_and_hash(self._psks[work.next_psk])
            work.next_psk += 1
            return
        ours, theirs = self._dh_keys(work, token)
        work.sym.mix_key(_dh(ours, theirs))

    def _dh_keys(self, work: _Progress, token: Token) -> tuple[bytes, bytes]:
        """(our private, their public) for ee/es/se/ss; the first letter is the initiator's."""
        pair: str = token.value
        local_key, remote_key = (pair[0], pair[1]) if self.initiator else (pair[1], pair[0])
        local = work.e if local_key == "e" else self._s
        remote = work.re if remote_key == "e" else work.rs
        assert local is not None and remote is not None, f"{token} before its keys"
        return local.private, remote

    def _generate_ephemeral(self) -> _KeyPair:
        if self._rng is None:
            raise ValueError("no rng to generate an ephemeral key")
        private = self._rng(DH_LEN)
        _check_len("rng output", private, DH_LEN)
        return _KeyPair.from_private(private)


def _take(view: memoryview, length: int, what: str) -> bytes:
    if len(view) < length:
        raise NoiseError("noise_truncated", f"{what}: {len(view)} bytes, need {length}")
    return bytes(view[:length])
