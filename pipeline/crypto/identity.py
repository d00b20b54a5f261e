"""A node's long-term identity: one Ed25519 key pair, and what is derived from it.

- The **Ed25519** key signs (certificates today; the CA signs with its own identity).
- The **X25519** key for Noise handshakes is not a second secret: it is libsodium's
  birational conversion of the Ed25519 key (``crypto_sign_ed25519_sk_to_curve25519`` and
  ``crypto_sign_ed25519_pk_to_curve25519``), so a peer that knows a node's Ed25519 public key
  (from its certificate) knows its static Noise key too.
- The **node id** is the 160-bit BLAKE2b hash (``digest_size=20``) of the Ed25519 public key:
  the node's name in the overlay and the DHT. It is shown as 40 lowercase hex digits.

Pure: no file, clock or randomness here. The 32-byte seed comes from the caller
(``supervisor/keys.py`` reads or creates it in the node's state directory).
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, NewType

import msgspec
import nacl.bindings
import nacl.exceptions
import nacl.signing

from pipeline.nodeid import NODE_ID_LEN

NodeId = NewType("NodeId", bytes)

SEED_LEN = 32
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64


def node_id(public_key: bytes) -> NodeId:
    """The node id of an Ed25519 public key: BLAKE2b-160 of its 32 bytes."""
    if len(public_key) != PUBLIC_KEY_LEN:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes, got {len(public_key)}")
    return NodeId(hashlib.blake2b(public_key, digest_size=NODE_ID_LEN).digest())


def parse_node_id(text: str) -> NodeId:
    """A node id from its 40-hex-digit form (either case); ValueError otherwise."""
    text = text.strip()
    if len(text) != 2 * NODE_ID_LEN:
        raise ValueError(f"a node id is {2 * NODE_ID_LEN} hex digits, got {len(text)}")
    try:
        return NodeId(bytes.fromhex(text))
    except ValueError:
        raise ValueError(f"a node id is hex digits, got {text!r}") from None


def x25519_public_from_ed25519(public_key: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public key; ValueError if it is not a valid point."""
    if len(public_key) != PUBLIC_KEY_LEN:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes, got {len(public_key)}")
    try:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key)
    except nacl.exceptions.CryptoError:
        raise ValueError("not a usable Ed25519 public key (invalid or small-order point)") from None


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``.

    libsodium rejects non-canonical signatures and small-order keys, so a valid signature
    cannot be altered into another valid one."""
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(data, signature)
    except nacl.exceptions.CryptoError:
        return False
    return True


class HidingRepr(msgspec.Struct, frozen=True):
    """A frozen record whose fields named in ``hidden`` are left out of its ``repr`` (and of
    rich's pretty print, which asks ``__rich_repr__``), so a secret can never leak into a log
    line or a traceback."""

    hidden: ClassVar[frozenset[str]] = frozenset()

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.__rich_repr__())
        return f"{type(self).__name__}({shown})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [(n, getattr(self, n)) for n in self.__struct_fields__ if n not in self.hidden]


class Identity(HidingRepr, frozen=True):
    """A node's (or a CA's) key pair. Build it with ``Identity.from_seed``, which derives every
    other field from the seed.

    The secret fields are left out of ``repr`` so an identity can never leak into a log line.
    """

    hidden: ClassVar[frozenset[str]] = frozenset({"seed", "x25519_private"})

    seed: bytes
    public_key: bytes
    x25519_private: bytes
    x25519_public: bytes
    node_id: NodeId

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte Ed25519 seed (the only secret a node keeps)."""
        if len(seed) != SEED_LEN:
            raise ValueError(f"an Ed25519 seed is {SEED_LEN} bytes, got {len(seed)}")
        signer = nacl.signing.SigningKey(bytes(seed))
        public_key = bytes(signer.verify_key)
        return cls(
            seed=bytes(seed),
            public_key=public_key,
            x25519_private=nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(seed + public_key),
            x25519_public=nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key),
            node_id=node_id(public_key),
        )

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` (detached)."""
        return nacl.signing.SigningKey(self.seed).sign(data).signature

    @property
    def node_id_hex(self) -> str:
        return self.node_id.hex()
