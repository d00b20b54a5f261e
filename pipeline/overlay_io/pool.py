"""Birthday probing's socket pools: the extra UDP sockets a node behind a NAT that maps per
destination probes a peer from, and which of them carries the link once one got through.
Pure: no clock and no socket of its own. The driver (``stage.py``) hands it a way to open
and to close a port, ``now``, and what arrived where; it keeps ports as opaque objects
(generic in their type: ``udp.Port`` in the driver, anything in a test).

Theory of operation (the shortcut side is ``pipeline/control/shortcuts.py``):

- **Opening.** Control asks for a probe to go from link ``slot``'s pool (a POOL record):
  the first ask opens the pool, ``size`` sockets bound to ephemeral ports, at most
  ``limit`` pool sockets in the worker at once (a second link's pool gets what is left; a
  socket that cannot be opened, e.g. out of descriptors, ends the opening: both counted,
  ``pool_sockets_short``). Each send refreshes the pool's life: ``ttl_s`` after the last
  one an unused pool is closed (``expire``), whatever control does.
- **Winning.** An authentic datagram (opened with a session of the link: never a handshake
  or anything unauthenticated) of the pool's own link arriving on one of its sockets pins
  that socket (``arrived``): from then on everything the node sends to that datagram's
  source goes from it (``pinned``: endpoint -> port), and every other socket of the pool is
  closed. Only the first counts; a datagram of another link on a pool socket is refused
  (the driver counts the drop: ``pool_other_link``). If the peer's source changes later
  (its NAT remapped it), the pin follows it.
- **Closing.** Control closes a link's pool (a round failed, the path was lost, the link is
  gone): the pin goes too, and the link's traffic goes from the node's port again.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

from pipeline.errors import StageIOError
from pipeline.overlay_io.sessions import Address

__all__ = ["POOL_LIMIT", "POOL_TTL_S", "SocketPools"]

POOL_LIMIT = 512  # pool sockets one overlay_io worker holds at most (two pools of 256)
POOL_TTL_S = 10.0  # an unused pool closes this long after its last probe went


P = TypeVar("P")


@dataclasses.dataclass(slots=True, eq=False)
class _Pool(Generic[P]):
    slot: int
    ports: list[P]
    expires: float
    winner: P | None = None
    peer: Address | None = None  # where the winner's first datagram came from


class SocketPools(Generic[P]):
    def __init__(
        self,
        opener: Callable[[], P],
        closer: Callable[[P], None],
        *,
        size: int,
        limit: int = POOL_LIMIT,
        ttl_s: float = POOL_TTL_S,
    ) -> None:
        """``opener``: a new port on an ephemeral port (StageIOError or OSError if it
        cannot); ``closer``: close one (the driver stops watching it first)."""
        self._opener = opener
        self._closer = closer
        self.size = size
        self.limit = limit
        self.ttl_s = ttl_s
        self.pools: dict[int, _Pool[P]] = {}
        self.pinned: dict[Address, P] = {}  # read per datagram by the driver: in place
        self._owner: dict[int, _Pool[P]] = {}  # id(port) -> its pool
        self.open_sockets = 0
        self.counters: Counter[str] = Counter()

    def ports_for(self, slot: int, now: float) -> list[P]:
        """The ports to send link ``slot``'s pool probe from: its winner if one got through,
        else every socket of its pool (opened now if it has none)."""
        pool = self.pools.get(slot)
        if pool is None:
            pool = self.pools[slot] = _Pool[P](slot, [], now + self.ttl_s)
            self._fill(pool)
            self.counters["pools_opened"] += 1
        if pool.winner is not None:
            return [pool.winner]
        pool.expires = now + self.ttl_s
        return pool.ports

    def _fill(self, pool: _Pool[P]) -> None:
        want = min(self.size, self.limit - self.open_sockets)
        for _ in range(want):
            try:
                port = self._opener()
            except (StageIOError, OSError):
                self.counters["pool_open_failed"] += 1
                break
            pool.ports.append(port)
            self._owner[id(port)] = pool
        self.open_sockets += len(pool.ports)
        self.counters["pool_sockets_opened"] += len(pool.ports)
        self.counters["pool_sockets_short"] += self.size - len(pool.ports)

    def arrived(self, port: P, slot: int, source: Address) -> bool:
        """An authentic datagram of link ``slot`` came from ``source`` to pool socket
        ``port``: may it be taken? The first of the pool's own link pins the socket."""
        pool = self._pool_of(port)
        if pool is None or pool.slot != slot:
            return False
        if pool.winner is None:
            pool.winner, pool.peer = port, source
            self.pinned[source] = port
            for other in pool.ports:
                if other is not port:
                    self._close_port(other)
            pool.ports = [port]
            self.counters["pools_won"] += 1
            return True
        if port is not pool.winner:
            return False
        if source != pool.peer:  # the peer's NAT remapped it: the pin follows
            if pool.peer is not None:
                self.pinned.pop(pool.peer, None)
            pool.peer = source
            self.pinned[source] = port
            self.counters["pool_peer_moved"] += 1
        return True

    def _pool_of(self, port: P) -> _Pool[P] | None:
        return self._owner.get(id(port))

    def close(self, slot: int) -> None:
        """Control is done with link ``slot``'s pool: every socket closes, the pin goes."""
        pool = self.pools.pop(slot, None)
        if pool is None:
            return
        if pool.peer is not None and self.pinned.get(pool.peer) is pool.winner:
            del self.pinned[pool.peer]
        for port in pool.ports:
            self._close_port(port)
        pool.ports = []
        self.counters["pools_closed"] += 1

    def expire(self, now: float) -> None:
        """Close the pools that got nothing through and were not used for ``ttl_s``."""
        for slot, pool in list(self.pools.items()):
            if pool.winner is None and now >= pool.expires:
                self.close(slot)
                self.counters["pools_expired"] += 1

    def close_all(self) -> None:
        for slot in list(self.pools):
            self.close(slot)

    def _close_port(self, port: P) -> None:
        if self._owner.pop(id(port), None) is not None:
            self.open_sockets -= 1
            self._closer(port)

    def statistics(self) -> dict[str, int]:
        return {
            "pools": len(self.pools),
            "sockets": self.open_sockets,
            "pinned": len(self.pinned),
            **self.counters,
        }
