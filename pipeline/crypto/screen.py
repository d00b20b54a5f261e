"""The handshake screen: which HANDSHAKE and COOKIE datagrams reach control, and what the
node answers without control. Sans-I/O.

Theory of operation: overlay_io runs one screen per worker, on every handshake-type
datagram that comes to the node's port, before any ring (``screen``). A flood of them must
cost the node about what a closed port costs, and never hold up overlay traffic.

- A token bucket per source address (``per_source_rate`` a second, bursts of
  ``per_source_burst``; the oldest of more than ``max_sources`` are forgotten). A source
  with no token left is dropped before anything else is looked at
  (``handshake_rate_limited``): a flood from one address costs a dict lookup a datagram.
  Every handshake datagram spends a token, junk too (else junk from one address would cost
  a BLAKE2b each, for ever); so junk forged with a member's address can hold up that
  member's handshakes while it lasts, as a member's valid junk could anyway.
- Layout and mac1: a datagram that does not parse, or whose mac1 (keyed by a hash of the
  network authority's public key, which every member holds) is wrong, is dropped
  (``short_handshake``, ``bad_pattern``, ``bad_mac1``). One BLAKE2b over the datagram.
- Reads: the driver reads at most ``reads_per_s`` handshake datagrams a second
  (``read_budget``, in bursts of a tenth of that: when it is spent the driver stops
  watching the socket until ``next_read``) from a socket of their own; beyond that a flood
  stays in the kernel, which drops it as a closed port would, and costs this process
  nothing.
- First messages (step 0) take a token from one more bucket, of ``load_threshold`` a
  second: while it has tokens they pass. When it is empty the node is *under load*: a first
  message passes only if its mac2 is keyed by the cookie this screen gives its source
  (WireGuard's cookie reply): the current or the previous secret, which changes every
  ``COOKIE_SECRET_S``. Without one it is dropped (``cookie_demanded``) and, at most
  ``cookie_replies_per_s`` a second in all (else ``cookie_reply_limited``), answered with a
  COOKIE datagram that only the holder of the initiation's mac1 can open. An initiator that
  can receive at its source address answers with mac2 and passes.
- Answers (steps 1 and 2) and COOKIE datagrams cannot be asked for a cookie (their sender
  is answering us): they share a bucket of ``replies_per_s`` (``reply_rate_limited``).
- Unknown sessions (``unknown_session``): a datagram on a session index this worker does
  not hold. Its source may be forged, so the node never starts a handshake toward it.
  Instead, at most once per ``hint_every_s`` a source and ``hints_per_s`` in all, it
  answers with a *resync hint*: a bare COOKIE header (16 bytes, smaller than anything that
  provokes it) whose session field echoes the index the datagram named. Only a peer that
  holds a send session with that index (32 random bits, the cookie-like proof) acts on it:
  it starts a handshake toward the endpoint it has always had for us, which passes this
  screen like any other.

Inputs: ``screen(datagram, source, now)`` (True: let it through),
``unknown_session(index, source, now)``, ``read_budget(now, want)``, ``unread(n)`` and
``next_read(now)``; ``now`` is monotonic seconds, randomness comes from ``rng``. Outputs:
``datagrams_to_send()`` (cookie replies and hints, with their destination), drops counted
into the ``drops`` counter given (the driver's), ``statistics()``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable

import msgspec

from pipeline.crypto import handshake as hs
from pipeline.wire.overlay import HEADER_LEN, VERSION, DatagramType, build_header

__all__ = [
    "COOKIE_SECRET_S",
    "HandshakeScreen",
    "ScreenSettings",
    "TokenBucket",
    "resync_hint",
]

Address = tuple[str, int]
COOKIE_SECRET_S = 120.0

_HANDSHAKE = int(DatagramType.HANDSHAKE)
_COOKIE = int(DatagramType.COOKIE)
_MAC = hs.MAC_LEN


class ScreenSettings(msgspec.Struct, frozen=True):
    load_threshold: int = 50  # first messages a second before cookies are demanded
    per_source_rate: float = 5.0  # handshake datagrams a second from one source address
    per_source_burst: float = 10.0
    replies_per_s: float = 200.0  # answers (steps 1, 2) and COOKIE datagrams, in all
    cookie_replies_per_s: float = 500.0
    hints_per_s: float = 20.0  # resync hints, in all
    hint_every_s: float = 2.0  # and at most one a source this often
    max_sources: int = 4096
    reads_per_s: float = 1000.0  # handshake datagrams the driver reads a second, at most


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` kept; ``take`` spends one if there is."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def resync_hint(index: int) -> bytes:
    """The 16-byte COOKIE datagram that tells the sender of a datagram on session ``index``
    that this node does not hold it."""
    return build_header(DatagramType.COOKIE, session=index)


class HandshakeScreen:
    def __init__(
        self,
        ca_public_key: bytes,
        rng: Callable[[int], bytes],
        now: float,
        settings: ScreenSettings = ScreenSettings(),
        drops: Counter[str] | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.drops: Counter[str] = Counter() if drops is None else drops
        self.counters: Counter[str] = Counter()
        self._mac1 = hashlib.blake2b(digest_size=_MAC, key=hs.mac1_key(ca_public_key))
        self._seal_key = hs.cookie_key(ca_public_key)
        self._secrets = [rng(32)]
        self._secret_changed = now
        self._sources: dict[str, TokenBucket] = {}
        self._load = TokenBucket(settings.load_threshold, settings.load_threshold, now)
        self._replies = TokenBucket(settings.replies_per_s, settings.replies_per_s, now)
        self._cookies = TokenBucket(
            settings.cookie_replies_per_s, settings.cookie_replies_per_s, now
        )
        self._hints = TokenBucket(settings.hints_per_s, settings.hints_per_s, now)
        self._reads = TokenBucket(settings.reads_per_s, settings.reads_per_s / 10, now)
        self._hinted: dict[Address, float] = {}
        self._out: list[tuple[bytes, Address]] = []

    # -- outputs ---------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def statistics(self) -> dict[str, int]:
        return dict(self.counters)

    @property
    def under_load(self) -> bool:
        return self._load.tokens < 1

    def read_budget(self, now: float, want: int) -> int:
        """How many of ``want`` handshake datagrams the driver may read now (it gives back
        what it did not use with ``unread``)."""
        reads = self._reads
        tokens = reads.tokens + (now - reads.stamp) * reads.rate
        tokens = tokens if tokens < reads.burst else reads.burst
        reads.stamp = now
        n = min(want, int(tokens))
        reads.tokens = tokens - n
        return n

    def unread(self, n: int) -> None:
        self._reads.tokens += n

    def next_read(self, now: float) -> float:
        """When the read budget is full again: a driver that spent it waits that long, and
        then reads a burst (not one datagram a wakeup)."""
        reads = self._reads
        return now + max(0.0, reads.burst - reads.tokens) / reads.rate

    # -- inputs ----------------------------------------------------------------------------------

    def screen(self, datagram: bytes | memoryview, source: Address, now: float) -> bool:
        """A HANDSHAKE or COOKIE datagram from ``source``: True if control should have it."""
        bucket = self._bucket(source[0], now)
        if bucket.tokens < 1:
            self.drops["handshake_rate_limited"] += 1
            return False
        bucket.tokens -= 1
        n = len(datagram)
        kind = datagram[1] if n > 1 else -1
        if kind == _COOKIE:
            if n != hs.COOKIE_DATAGRAM_LEN and n != HEADER_LEN or datagram[0] != VERSION:
                self.drops["bad_cookie"] += 1
                return False
            return self._reply_ok(now)
        if n < hs.MIN_HANDSHAKE_LEN or kind != _HANDSHAKE or datagram[0] != VERSION:
            self.drops["short_handshake"] += 1
            return False
        step = datagram[HEADER_LEN + 1]
        pattern = datagram[HEADER_LEN]
        if pattern not in (1, 2) or step >= (2 if pattern == 1 else 3):
            self.drops["bad_pattern"] += 1
            return False
        end = n - 2 * _MAC
        mac1 = self._mac1.copy()
        mac1.update(datagram[:end])
        if not hmac.compare_digest(mac1.digest(), datagram[end:-_MAC]):
            self.drops["bad_mac1"] += 1
            return False
        if step:
            return self._reply_ok(now)
        if self._load.take(now):
            self.counters["passed"] += 1
            return True
        return self._cookie_ok(datagram, source, now)

    def unknown_session(self, index: int, source: Address, now: float) -> None:
        """A datagram from ``source`` named session ``index``, which this worker does not
        hold: maybe a resync hint back (see the module docstring)."""
        hinted = self._hinted
        last = hinted.get(source)
        if last is not None and now - last < self.settings.hint_every_s:
            self.drops["hint_repeated"] += 1
            return
        if not self._hints.take(now):
            self.drops["hint_rate_limited"] += 1
            return
        if len(hinted) >= self.settings.max_sources:
            every = self.settings.hint_every_s
            self._hinted = hinted = {s: t for s, t in hinted.items() if now - t < every}
            if len(hinted) >= self.settings.max_sources:
                self.drops["hint_rate_limited"] += 1
                return
        hinted[source] = now
        self._out.append((resync_hint(index), source))
        self.counters["hints_sent"] += 1

    # -- the steps -------------------------------------------------------------------------------

    def _bucket(self, address: str, now: float) -> TokenBucket:
        """``address``'s bucket, refilled to ``now`` (a new one is full)."""
        sources = self._sources
        bucket = sources.get(address)
        if bucket is None:
            st = self.settings
            bucket = sources[address] = TokenBucket(st.per_source_rate, st.per_source_burst, now)
            if len(sources) > st.max_sources:
                del sources[next(iter(sources))]  # the oldest
            return bucket
        tokens = bucket.tokens + (now - bucket.stamp) * bucket.rate
        bucket.tokens = tokens if tokens < bucket.burst else bucket.burst
        bucket.stamp = now
        return bucket

    def blocked(self, address: str, now: float) -> bool:
        """Whether a handshake datagram from ``address`` would be dropped by its bucket now
        (the driver drops the rest of a GRO read from it at once)."""
        bucket = self._sources.get(address)
        return bucket is not None and self._bucket(address, now).tokens < 1

    def _reply_ok(self, now: float) -> bool:
        if self._replies.take(now):
            self.counters["passed"] += 1
            return True
        self.drops["reply_rate_limited"] += 1
        return False

    def _cookie_ok(self, datagram: bytes | memoryview, source: Address, now: float) -> bool:
        """Under load: a first message with a valid mac2 passes; one without gets a cookie."""
        elapsed = now - self._secret_changed
        if elapsed >= COOKIE_SECRET_S:  # changed when needed: the previous one, if recent
            fresh = self.rng(32)
            self._secrets = [fresh, self._secrets[0]] if elapsed < 2 * COOKIE_SECRET_S else [fresh]
            self._secret_changed = now
        body = bytes(datagram)
        for secret in self._secrets:
            if hs.check_mac2(hs.make_cookie(secret, source), body):
                self.counters["passed_with_cookie"] += 1
                return True
        self.drops["cookie_demanded"] += 1
        if not self._cookies.take(now):
            self.drops["cookie_reply_limited"] += 1
            return False
        sender = int.from_bytes(body[HEADER_LEN + 2 : HEADER_LEN + 6], "big")
        reply = hs.build_cookie_reply(
            self._seal_key,
            receiver_index=sender,
            cookie=hs.make_cookie(self._secrets[0], source),
            mac1=body[-2 * _MAC : -_MAC],
            nonce=self.rng(hs.COOKIE_NONCE_LEN),
        )
        self._out.append((reply, source))
        self.counters["cookies_sent"] += 1
        return False
