"""The encrypted data path: per-direction AEAD sessions and the replay window.

Pure: bytes, counters and a caller-supplied ``now`` in, bytes out; no clock, no randomness,
no I/O. Not thread-safe: a session belongs to one worker.

Datagram layout (``docs/wire.md``)::

    overlay header (16 bytes, big-endian: version, type, flags, session index, counter)
    AEAD ciphertext of the payload, then its 16-byte tag

- AEAD: the session's ``DataCipher`` (``pipeline/crypto/ciphers.py``), AES-256-GCM or
  ChaCha20-Poly1305, agreed on in the handshake that made the keys (the initiator offers,
  the responder picks; a node that names none means ChaCha20-Poly1305). Both take the same
  key, nonce, AD and give the same tag length: only the bytes of ciphertext and tag differ;
- key: 32 bytes, one per direction (``SendSession`` on one node, ``RecvSession`` on the other);
- nonce: 4 zero bytes + the header's counter as u64 little-endian (WireGuard's layout);
- associated data: the whole 16-byte header, so version, type, flags, index and counter are
  all authenticated (a changed byte fails as ``bad_tag``, or earlier as ``wrong_session``);
- the counter starts at 0 and goes up by one per datagram; it never repeats under one key.
  Counters at or past ``REJECT_AFTER_MESSAGES`` are never sent nor accepted. A counter
  nonce never repeats, so GCM's limit for random nonces (2^32) does not apply, and a key's
  volume (rekeyed after 120 s or ``rekey_after_bytes``, 64 GiB by default) stays far inside
  AES-GCM's bounds on data per key.

Receiving: overlay_io runs ``parse_header`` (version, type, short datagram) and picks the
session by the header's index, then calls ``RecvSession.open``: index check, replay check
(before decrypting: cheap and unauthenticated), AEAD open with the header as AD, and only
then the window update. Every failure is a ``RemoteProtocolError`` (a counted drop):
``short_datagram``, ``wrong_session``, ``replayed``, ``bad_tag``. Once ``open`` returns,
the type and flags that ``parse_header`` read are authenticated too.

Sending: ``SendSession.seal`` returns ``[header, ciphertext]``, the two buffers of one
datagram, as overlay_io's ``UDPPort.send`` hands them to ``socket.sendmsg``: joining them
would copy the whole packet for nothing.

Batches (a super-frame's segments, a GRO read): ``SendSession.seal_each`` seals a sequence
of payloads in one loop, and ``RecvSession.open_run`` opens a run of one session's
datagrams in one loop, with ``open``'s checks in ``open``'s order; a run of counters each
newer than the last goes into the replay window in one ``ReplayWindow.advance``. Neither
calls back per datagram: on this path a Python call costs a tenth of the AEAD.

Binding: ``cryptography``'s ``AESGCM`` and ``ChaCha20Poly1305`` ``encrypt``/``decrypt``, bound
once per session (the per-packet path makes no call more for either). With the CPU's AES-NI,
AES-256-GCM costs 0.57 of ChaCha20-Poly1305 at 1 348 bytes (2 334 vs 4 113 ns a seal, open
alike), 0.87 at 64 B, 0.3 at 64 KiB (``bench/aead_bench.py``'s ``crypt_aes`` rows and ratio
table; 2026-12-07, the 2-core VM at load 1.7, median of 5); overlay_io's TSO loops per
1 348-byte segment: send 6 767 -> 4 991 ns, receive 9 591 -> 7 575 ns
(``bench/overlay_io_bench.py --modes tso --cipher aes-256-gcm``). The figures below are of an
earlier day, when the same seal cost 1 356 ns: compare only rows of one run. ``bench/aead_bench.py``
(``python bench/aead_bench.py``: Python 3.11.7, PyNaCl 1.6.2, cryptography 48.0.0; a shared
2-core machine, median of 5 runs, ns per packet incl. the Python call), 16 bytes of AD::

    binding                                          1400 B seal  1400 B open  65535 B seal/open
    PyNaCl crypto_aead_chacha20poly1305_ietf_*           4 048        4 116     1.39 / 1.38 GB/s
    cryptography ChaCha20Poly1305.encrypt/decrypt        1 356        1 362     3.54 / 3.56 GB/s
    cryptography encrypt_into/decrypt_into (prealloc)    1 338        1 326     3.64 / 3.66 GB/s

PyNaCl is 3x slower at 1400 B and at 64 B (2.9 us vs 0.77 us): its wrapper checks types,
``ffi.new``-allocates the output and copies it out, takes ``bytes`` only (a ``memoryview``
payload would need a copy first), and its bundled libsodium runs ChaCha20 at less than half
OpenSSL's speed. ``*_into`` (present in 48.0.0) is 20-40 ns faster, but only into a
buffer that already exists; a whole packet sealed into a fresh ``bytearray`` (zero-fill and
``memoryview`` slices) cost 1 810 ns at 1400 B against 1 479 ns for ``[header, encrypt()]``,
and reusing one output buffer would alias the previous packet, so the plain calls win.
Nonce: ``struct.pack`` into a new 12-byte ``bytes`` beat ``pack_into`` a reused
``bytearray``, alone (53 vs 68 ns) and with the AEAD call that reads it (839 vs 871 ns at
64 B), so the nonce is packed fresh per packet from a precompiled ``struct``. This module's
own ``seal`` costs 1 634 ns at 1400 B (the bare binding 1 356 ns), ``open`` about 1 950 ns
(2 072 ns measured with a 124 ns window reset per call).

``cryptography`` is not yet in ``pyproject.toml``'s dependencies: it has to be added there
(only ``encrypt``/``decrypt`` are used; tested with 48.0.0).

Replay window: RFC 6479's ring of bitmap blocks, with 8-bit blocks held in a ``bytearray`` so
every per-packet value is a small cached int (no allocation): a counter is accepted when it
is newer than every one seen, or at most ``width - 1`` behind the newest and not seen yet.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pipeline.crypto.ciphers import DataCipher
from pipeline.errors import RemoteProtocolError
from pipeline.wire.overlay import HEADER, HEADER_LEN, VERSION

KEY_LEN = 32
TAG_LEN = 16
NONCE_LEN = 12

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_SECONDS = 120.0
REJECT_AFTER_SECONDS = 180.0
WINDOW_SIZE = 2048

MIN_DATAGRAM = HEADER_LEN + TAG_LEN  # an empty payload (a keepalive) still has its tag

ReadableBuffer = bytes | bytearray | memoryview
Parts = list[ReadableBuffer]  # the buffers of datagrams, two a datagram (header, body)
Payloads = Iterable[ReadableBuffer]

_NONCE = struct.Struct("<4xQ")  # 4 zero bytes, then the counter little-endian
_NONCE_PACK = _NONCE.pack
_HEADER_PACK = HEADER.pack
_PREFIX_PACK = struct.Struct("!8sQ").pack  # a header from its first 8 bytes and the counter
_HEADER_UNPACK_FROM = HEADER.unpack_from
_BIT = bytes(1 << i for i in range(8))
_MAX_INDEX = (1 << 32) - 1
_AEADS: dict[DataCipher, type[AESGCM] | type[ChaCha20Poly1305]] = {
    DataCipher.AES_256_GCM: AESGCM,  # a 32-byte key: AES-256
    DataCipher.CHACHA20_POLY1305: ChaCha20Poly1305,
}


class KeyExhausted(Exception):
    """The send key has used every counter it may; a new session is needed (long overdue:
    ``needs_rekey`` said so after ``REKEY_AFTER_MESSAGES``)."""


class ReplayWindow:
    """Sliding anti-replay window over u64 counters (RFC 6479, as WireGuard uses it).

    ``check`` before the AEAD, ``update`` only after the tag verified: a forged datagram
    must never move the window.
    """

    __slots__ = ("_bits", "_blocks", "_limit", "_top", "_width", "_zeros")

    def __init__(self, width: int = WINDOW_SIZE, *, limit: int = REJECT_AFTER_MESSAGES) -> None:
        if width <= 0 or width % 8:
            raise ValueError(f"window width must be a positive multiple of 8, not {width}")
        self._width = width
        self._limit = limit
        # width/8 blocks cover a window that starts on a block boundary; one more block
        # covers one that does not, and is the block that gets cleared as the top advances.
        self._blocks = width // 8 + 1
        self._zeros = bytes(self._blocks)
        self._bits = bytearray(self._blocks)
        self._top = 0

    @property
    def width(self) -> int:
        return self._width

    @property
    def top(self) -> int:
        """The newest counter accepted so far (0 before any)."""
        return self._top

    def reset(self) -> None:
        """Forget every counter."""
        self._bits[:] = self._zeros
        self._top = 0

    def check(self, counter: int) -> bool:
        """Would ``counter`` be accepted: below the limit, not too old, not seen?"""
        top = self._top
        if counter > top:
            return counter < self._limit
        if counter < 0 or top - counter >= self._width:
            return False
        return not self._bits[(counter >> 3) % self._blocks] & _BIT[counter & 7]

    @property
    def limit(self) -> int:
        """Counters at or past it are never accepted."""
        return self._limit

    def advance(self, first: int, last: int) -> None:
        """``update`` of every counter from ``first`` to ``last``, in order, each newer than
        the top (``check`` said yes to each as it came): a run of a GRO read, in one call."""
        assert self._top < first <= last < self._limit, (self._top, first, last)
        self.update(last)  # the top, and the blocks it moves over cleared, as each would
        bits = self._bits
        blocks = self._blocks
        # the others that are still in a block of the window's (a later one clears the rest)
        counter = max(first, ((last >> 3) - blocks + 1) << 3)
        while counter < last:
            block = counter >> 3
            upto = min(last - 1, counter | 7)
            bits[block % blocks] |= ((2 << (upto - counter)) - 1) << (counter & 7)
            counter = upto + 1

    def update(self, counter: int) -> None:
        """Mark ``counter`` seen (after ``check`` said yes and the AEAD verified)."""
        bits = self._bits
        top = self._top
        if counter > top:
            if counter >= self._limit:
                return
            blocks = self._blocks
            old_block = top >> 3
            new_block = counter >> 3
            gap = new_block - old_block
            if gap == 1:
                bits[new_block % blocks] = 0
            elif gap >= blocks:
                bits[:] = self._zeros
            elif gap:
                start = (old_block + 1) % blocks
                end = new_block % blocks + 1
                if start < end:
                    bits[start:end] = bytes(end - start)
                else:
                    bits[start:] = bytes(blocks - start)
                    bits[:end] = bytes(end)
            self._top = counter
        elif counter < 0 or top - counter >= self._width:
            return
        bits[(counter >> 3) % self._blocks] |= _BIT[counter & 7]


def _aead(cipher: DataCipher, key: bytes, index: int) -> AESGCM | ChaCha20Poly1305:
    """The AEAD object of ``cipher`` under ``key``, after checking the key and the index."""
    if len(key) != KEY_LEN:
        raise ValueError(f"key must be {KEY_LEN} bytes, not {len(key)}")
    if not 0 <= index <= _MAX_INDEX:
        raise ValueError(f"session index must be a u32, not {index}")
    return _AEADS[DataCipher(cipher)](key)


class SendSession:
    """One direction's sending key: seals datagrams for the peer's ``RecvSession``."""

    __slots__ = (
        "_counter",
        "_counter_start",
        "_encrypt",
        "_rekey_after_bytes",
        "_rekey_after_messages",
        "_reject_after_messages",
        "bytes",
        "cipher",
        "created",
        "index",
    )

    def __init__(
        self,
        key: bytes,
        *,
        index: int,
        created: float,
        cipher: DataCipher = DataCipher.CHACHA20_POLY1305,
        counter_start: int = 0,
        rekey_after_messages: int = REKEY_AFTER_MESSAGES,
        rekey_after_bytes: int | None = None,
        reject_after_messages: int = REJECT_AFTER_MESSAGES,
    ) -> None:
        """``index``: the *receiver's* session index (it goes in every header).
        ``counter_start``: the first counter; a worker that takes over a key another
        incarnation already used starts past that one's counters (control hands out
        ``generation << 40``), so no nonce repeats.
        ``rekey_after_bytes``: payload volume after which ``needs_rekey`` (None: no limit).
        ``reject_after_messages`` may only lower ``REJECT_AFTER_MESSAGES`` (tests).
        ``cipher``: the AEAD the handshake agreed on (the peer's ``RecvSession`` has the same)."""
        aead = _aead(cipher, key, index)
        if not 0 < reject_after_messages <= REJECT_AFTER_MESSAGES:
            raise ValueError(f"reject_after_messages out of range: {reject_after_messages}")
        if not 0 <= counter_start <= reject_after_messages:
            raise ValueError(f"counter_start out of range: {counter_start}")
        self._encrypt = aead.encrypt  # bound once: seal() is the hot path
        self.cipher = DataCipher(cipher)
        self._counter = counter_start
        self._counter_start = counter_start
        self._rekey_after_messages = rekey_after_messages
        self._rekey_after_bytes = rekey_after_bytes
        self._reject_after_messages = reject_after_messages
        self.index = index
        self.created = created
        self.bytes = 0  # payload bytes sealed

    @property
    def messages(self) -> int:
        """Datagrams this object sealed."""
        return self._counter - self._counter_start

    @property
    def counter(self) -> int:
        """The counter the next datagram gets (``needs_rekey`` and the limits look at it:
        they bound the use of the nonce space, whichever incarnation used it)."""
        return self._counter

    def seal(self, dtype: int, payload: ReadableBuffer, flags: int = 0) -> list[bytes]:
        """``[header, ciphertext + tag]`` for the next counter: the two buffers of one datagram
        (``socket.sendmsg`` takes them as they are). ``flags`` go in the header (DATA:
        ``FLAG_PARTIAL``), positional as overlay_io passes them per segment."""
        counter = self._counter
        if counter >= self._reject_after_messages:
            raise KeyExhausted(f"counter {counter} reached the limit")
        self._counter = counter + 1  # consumed even if encrypt fails: never reuse a nonce
        self.bytes += len(payload)
        header = _HEADER_PACK(VERSION, dtype, flags, self.index, counter)
        return [header, self._encrypt(_NONCE_PACK(counter), payload, header)]

    def seal_each(self, parts: Parts, dtype: int, payloads: Payloads, flags: int = 0) -> int:
        """``seal`` of each payload in turn, the two buffers of each datagram appended to
        ``parts``: a GSO batch's list; returns the bytes of these datagrams. Each payload is
        sealed before the next is taken, so ``payloads`` may yield views that the next one
        overwrites (``tso.segments``)."""
        start = counter = self._counter
        reject = self._reject_after_messages
        encrypt = self._encrypt
        nonce = _NONCE_PACK
        pack = _PREFIX_PACK
        prefix = _HEADER_PACK(VERSION, dtype, flags, self.index, 0)[:8]
        append = parts.append
        nbytes = 0
        try:
            for payload in payloads:
                if counter >= reject:
                    raise KeyExhausted(f"counter {counter} reached the limit")
                header = pack(prefix, counter)
                iv = nonce(counter)
                counter += 1  # consumed even if encrypt fails: never reuse a nonce
                append(header)
                append(encrypt(iv, payload, header))
                nbytes += len(payload)
        finally:
            self._counter = counter
            self.bytes += nbytes
        return nbytes + (counter - start) * (HEADER_LEN + TAG_LEN)

    def needs_rekey(self, now: float) -> bool:
        """Time to start a handshake: REKEY_AFTER_SECONDS old, or enough messages/bytes."""
        limit_bytes = self._rekey_after_bytes
        return (
            now - self.created >= REKEY_AFTER_SECONDS
            or self._counter >= self._rekey_after_messages
            or (limit_bytes is not None and self.bytes >= limit_bytes)
        )

    def expired(self, now: float) -> bool:
        """Too old to send with at all (REJECT_AFTER_SECONDS)."""
        return now - self.created >= REJECT_AFTER_SECONDS


class RecvSession:
    """One direction's receiving key: opens datagrams sealed by the peer's ``SendSession``."""

    __slots__ = ("_check", "_decrypt", "_update", "_window", "cipher", "created", "index")

    def __init__(
        self,
        key: bytes,
        *,
        index: int,
        created: float,
        cipher: DataCipher = DataCipher.CHACHA20_POLY1305,
        window_size: int = WINDOW_SIZE,
    ) -> None:
        """``index``: our own session index, which the peer writes in its headers.
        ``cipher``: the AEAD the handshake agreed on."""
        self._decrypt = _aead(cipher, key, index).decrypt
        self.cipher = DataCipher(cipher)
        self.index = index
        self.created = created
        self._window = ReplayWindow(window_size)
        self._check = self._window.check  # bound once: open() is the hot path
        self._update = self._window.update

    @property
    def window(self) -> ReplayWindow:
        return self._window

    def open(self, datagram: ReadableBuffer) -> bytes:
        """The payload of an authentic, fresh datagram; RemoteProtocolError otherwise.

        Pass a ``memoryview`` (as overlay_io has, over its receive buffer) to slice the
        ciphertext without a copy; ``bytes`` work too (sliced by copying)."""
        if len(datagram) < MIN_DATAGRAM:
            raise RemoteProtocolError("short_datagram", f"{len(datagram)} bytes")
        _version, _kind, _flags, index, counter = _HEADER_UNPACK_FROM(datagram)
        if index != self.index:
            raise RemoteProtocolError("wrong_session", f"index {index}")
        if not self._check(counter):
            raise RemoteProtocolError("replayed", f"counter {counter}")
        try:
            payload = self._decrypt(
                _NONCE_PACK(counter), datagram[HEADER_LEN:], datagram[:HEADER_LEN]
            )
        except InvalidTag:
            raise RemoteProtocolError("bad_tag", f"counter {counter}") from None
        self._update(counter)
        return payload

    def open_run(
        self,
        batch: memoryview,
        at: int,
        segment: int,
        dtype: int,
        opened: list[tuple[bytes, int]],
        drops: dict[str, int],
    ) -> tuple[int, int]:
        """Open the datagrams of this session and of type ``dtype`` in ``batch`` from ``at``,
        ``segment`` bytes apart (a GRO read), until one is of another session or type; each
        payload is appended to ``opened`` with its header's flags; a failure is counted in
        ``drops`` by reason and skipped. Returns where it stopped and the bytes of the
        datagrams it opened. The checks and the order are ``open``'s, in one loop: the hot
        path of a receiver of super-frames.

        The window: a counter newer than every one accepted so far (the window's top, or one
        opened in this run) is what ``check`` would accept below the limit; the run of such
        counters, once their tags verified, goes into the window in one ``advance`` (before
        any other counter is checked, and at the end), so it ends as ``update`` one by one
        would leave it."""
        unpack = _HEADER_UNPACK_FROM
        nonce = _NONCE_PACK
        decrypt = self._decrypt
        window = self._window
        check = self._check
        update = self._update
        limit = window.limit
        top = window.top  # the newest counter accepted: in the window, or in the run
        first = last = -1  # the run of newer counters opened but not yet in the window
        append = opened.append
        index = self.index
        end = len(batch)
        nbytes = 0
        try:
            while at + HEADER_LEN <= end:
                stop = at + segment
                if stop > end:
                    stop = end
                version, kind, flags, idx, counter = unpack(batch, at)
                if idx != index or kind != dtype or version != VERSION:
                    break
                if stop - at < MIN_DATAGRAM:
                    drops["short_datagram"] = drops.get("short_datagram", 0) + 1
                    at = stop
                    continue
                newer = counter > top
                if not newer and first >= 0:
                    window.advance(first, last)
                    first = -1
                if not (counter < limit if newer else check(counter)):
                    drops["replayed"] = drops.get("replayed", 0) + 1
                    at = stop
                    continue
                head = at + HEADER_LEN
                try:
                    payload = decrypt(nonce(counter), batch[head:stop], batch[at:head])
                except InvalidTag:
                    drops["bad_tag"] = drops.get("bad_tag", 0) + 1
                    at = stop
                    continue
                if not newer:
                    update(counter)
                elif first >= 0 and counter == last + 1:
                    last = top = counter
                else:
                    if first >= 0:
                        window.advance(first, last)
                    first = last = top = counter
                append((payload, flags))
                nbytes += stop - at
                at = stop
        finally:
            if first >= 0:
                window.advance(first, last)
        return at, nbytes

    def expired(self, now: float) -> bool:
        """Too old to accept datagrams with (REJECT_AFTER_SECONDS)."""
        return now - self.created >= REJECT_AFTER_SECONDS
