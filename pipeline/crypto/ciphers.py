"""The names of the data path's AEADs, as the config and the handshake spell them.

A light module (no ``cryptography`` import): ``pipeline/config.py`` reads the names at every
start. ``pipeline/crypto/datapath.py`` binds each name to its AEAD; the handshake
(``pipeline/control/links.py``, ``pipeline/crypto/handshake.py``) agrees on one per session.
"""

from __future__ import annotations

import enum


class DataCipher(enum.StrEnum):
    """The AEAD that seals a session's DATA, OVERLAY and RELAY datagrams. Both take the
    same 32-byte key, the same 12-byte nonce and give the same 16-byte tag, so the wire
    layout does not depend on the choice."""

    AES_256_GCM = "aes-256-gcm"
    CHACHA20_POLY1305 = "chacha20-poly1305"


LEGACY_CIPHER = DataCipher.CHACHA20_POLY1305
"""A peer that names no cipher in its handshake (a node older than the negotiation) seals
with this: the only data cipher there was."""

DEFAULT_CIPHERS = (DataCipher.AES_256_GCM, DataCipher.CHACHA20_POLY1305)
"""``[security] ciphers`` left out: both, AES-256-GCM first (AES-NI makes it the faster)."""
