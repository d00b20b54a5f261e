"""Liveness of the static peers: keepalive pings, RTT, up and down. Sans-I/O.

``handle_timer(now)`` returns the pings that are due; ``receive(slot, message, now)`` takes a
decoded overlay message from a peer and returns the reply to send, if any. Times are seconds
(floats) on the caller's monotonic clock; ``sent_ns`` inside pings is the same clock in
nanoseconds, echoed back by the peer, so RTT needs no clock agreement. A peer is up from its
first pong and down after ``timeout_s`` of silence; ``events()`` yields the changes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence

import msgspec

from pipeline.messages import OverlayMessage, Ping, Pong


class PeerState(enum.StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class PeerLiveness(msgspec.Struct):
    slot: int
    name: str
    state: PeerState = PeerState.UNKNOWN
    rtt_s: float | None = None
    last_heard: float | None = None
    pings_sent: int = 0
    pongs_received: int = 0


class PeerChanged(msgspec.Struct, frozen=True):
    slot: int
    name: str
    state: PeerState
    rtt_s: float | None


class PeerTable:
    def __init__(
        self, node: str, peers: Sequence[tuple[int, str]], *, interval_s: float, timeout_s: float
    ) -> None:
        self.node = node
        self.peers = {slot: PeerLiveness(slot, name) for slot, name in peers}
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._next_ping = 0.0
        self._seq = 0
        self._events: list[PeerChanged] = []

    def next_deadline(self) -> float:
        return self._next_ping

    def handle_timer(self, now: float) -> list[tuple[int, Ping]]:
        """Pings due now, one per peer; also marks silent peers down."""
        for peer in self.peers.values():
            silent_since = peer.last_heard if peer.last_heard is not None else None
            if peer.state is PeerState.UP and silent_since is not None:
                if now - silent_since > self.timeout_s:
                    self._set(peer, PeerState.DOWN)
            elif (
                peer.state is PeerState.UNKNOWN
                and peer.pings_sent * self.interval_s > self.timeout_s
            ):
                self._set(peer, PeerState.DOWN)
        if now < self._next_ping:
            return []
        self._next_ping = now + self.interval_s
        self._seq += 1
        pings = []
        for peer in self.peers.values():
            peer.pings_sent += 1
            pings.append((peer.slot, Ping(self._seq, int(now * 1e9), self.node)))
        return pings

    def receive(self, slot: int, message: OverlayMessage, now: float) -> Pong | None:
        peer = self.peers.get(slot)
        if peer is None:
            return None
        peer.last_heard = now
        if isinstance(message, Ping):
            return Pong(message.seq, message.sent_ns, self.node)
        peer.pongs_received += 1
        rtt = now - message.sent_ns / 1e9
        if 0 <= rtt < 60:
            peer.rtt_s = rtt if peer.rtt_s is None else 0.8 * peer.rtt_s + 0.2 * rtt
        if peer.state is not PeerState.UP:
            self._set(peer, PeerState.UP)
        return None

    def _set(self, peer: PeerLiveness, state: PeerState) -> None:
        peer.state = state
        self._events.append(PeerChanged(peer.slot, peer.name, state, peer.rtt_s))

    def events(self) -> Iterator[PeerChanged]:
        while self._events:
            yield self._events.pop(0)
