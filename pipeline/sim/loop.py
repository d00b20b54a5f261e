"""A discrete-event loop in virtual time that runs sans-I/O cores. Pure.

Any object with the core shape (``receive``, ``handle_timer``, ``datagrams_to_send``,
``next_deadline``, ``events``) can be a *host* at an address. The loop keeps one priority
queue of (time, sequence, kind, ...) entries: a datagram arriving at an address, a host's
timer, or a scripted call. ``step`` pops the earliest entry, sets ``now``, feeds the host and
*flushes* it: its datagrams go through the ``Network`` (latency or loss) into the queue, its
events go to ``on_event(address, event)``, and its timer is re-armed at ``next_deadline()``.
A timer entry that a newer deadline replaced is skipped. The sequence number makes ties
deterministic; one ``random.Random`` (the network's) is the only randomness, so a seed
replays a run exactly.

Code that calls a host's commands directly (``send_to_key`` in a test) calls ``flush``
afterwards, like a live driver would.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

from pipeline.sim.network import Network


class Core(Protocol):
    """The sans-I/O shape the loop drives."""

    def receive(self, message: bytes, source: Any, now: float) -> None: ...

    def handle_timer(self, now: float) -> None: ...

    def datagrams_to_send(self) -> Sequence[tuple[bytes, Any]]: ...

    def next_deadline(self) -> float | None: ...

    def events(self) -> Sequence[object]: ...


EventHandler = Callable[[Hashable, object], None]

_DELIVER, _TIMER, _CALL = 0, 1, 2
_SAME_INSTANT_LIMIT = 10_000


@dataclasses.dataclass(slots=True)
class Host:
    address: Hashable
    core: Core
    timer_seq: int = -1  # the sequence number of the timer entry in force
    timer_at: float | None = None
    datagrams_sent: int = 0
    datagrams_received: int = 0
    bytes_sent: int = 0
    same_instant: int = 0
    last_fire: float = -1.0


class Simulator:
    """Virtual time, hosts at addresses, and the queue between them."""

    def __init__(
        self,
        *,
        seed: int = 0,
        network: Network | None = None,
        on_event: EventHandler | None = None,
    ) -> None:
        self.network = network or Network(random.Random(seed))
        self.rng = self.network.rng
        self.on_event = on_event
        self.now = 0.0
        self.hosts: dict[Hashable, Host] = {}
        self._queue: list[tuple[float, int, int, Any, Any, Any]] = []
        self._seq = 0
        self.steps = 0
        self.datagrams_sent = 0
        self.datagrams_delivered = 0
        self.datagrams_undeliverable = 0  # no host at the address any more
        self.bytes_sent = 0

    # -- hosts -------------------------------------------------------------------------------

    def add_host(self, address: Hashable, core: Core) -> Host:
        """Put a core at an address (replacing nothing: the address must be free)."""
        if address in self.hosts:
            raise ValueError(f"address {address!r} is taken")
        host = Host(address, core)
        self.hosts[address] = host
        self._rearm(host)
        return host

    def remove_host(self, address: Hashable) -> Core:
        """Take the host away without a word (a crash); datagrams to it are lost."""
        return self.hosts.pop(address).core

    def flush(self, address: Hashable) -> None:
        """Move a host's datagrams into the network, its events out, and re-arm its timer."""
        host = self.hosts.get(address)
        if host is not None:
            self._flush(host)

    # -- scripted calls ----------------------------------------------------------------------

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run fn at virtual time ``when`` (not before now)."""
        self._push(max(when, self.now), _CALL, fn, None, None)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_at(self.now + delay, fn)

    # -- running -----------------------------------------------------------------------------

    def run_until(self, until: float, *, max_steps: int | None = None) -> None:
        """Process every entry due up to ``until``, then set ``now = until``."""
        queue = self._queue
        hosts = self.hosts
        limit = self.steps + max_steps if max_steps is not None else None
        while queue and queue[0][0] <= until:
            if limit is not None and self.steps >= limit:
                raise RuntimeError(f"more than {max_steps} steps before t={until}")
            when, seq, kind, a, b, c = heapq.heappop(queue)
            self.now = when
            self.steps += 1
            if kind == _DELIVER:
                host = hosts.get(a)
                if host is None:
                    self.datagrams_undeliverable += 1
                    continue
                host.datagrams_received += 1
                self.datagrams_delivered += 1
                host.core.receive(b, c, when)
                self._flush(host)
            elif kind == _TIMER:
                host = hosts.get(a)
                if host is None or host.timer_seq != seq:
                    continue
                host.timer_at = None
                if host.last_fire == when:
                    host.same_instant += 1
                    if host.same_instant > _SAME_INSTANT_LIMIT:
                        raise RuntimeError(f"host {a!r} keeps asking for a timer at t={when}")
                else:
                    host.last_fire, host.same_instant = when, 0
                host.core.handle_timer(when)
                self._flush(host)
            else:
                a()
        self.now = max(self.now, until)

    def run_for(self, seconds: float, *, max_steps: int | None = None) -> None:
        self.run_until(self.now + seconds, max_steps=max_steps)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- internals ---------------------------------------------------------------------------

    def _push(self, when: float, kind: int, a: Any, b: Any, c: Any) -> int:
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, kind, a, b, c))
        return self._seq

    def _flush(self, host: Host) -> None:
        core = host.core
        src = host.address
        datagrams = core.datagrams_to_send()
        if datagrams:
            now = self.now
            transit = self.network.transit
            queue = self._queue
            for data, dst in datagrams:
                host.datagrams_sent += 1
                host.bytes_sent += len(data)
                self.datagrams_sent += 1
                self.bytes_sent += len(data)
                delay = transit(src, dst)
                if delay is not None:
                    self._seq += 1
                    heapq.heappush(queue, (now + delay, self._seq, _DELIVER, dst, data, src))
        events = core.events()
        if events and self.on_event is not None:
            for event in events:
                self.on_event(src, event)
        self._rearm(host)

    def _rearm(self, host: Host) -> None:
        deadline = host.core.next_deadline()
        if deadline is None:
            host.timer_at = None
            host.timer_seq = -1
            return
        deadline = max(deadline, self.now)
        if host.timer_at == deadline:
            return
        host.timer_at = deadline
        host.timer_seq = self._push(deadline, _TIMER, host.address, None, None)
