"""The simulated underlay: per-pair latency, per-datagram jitter and loss, partitions. Pure.

``Network.transit(src, dst)`` says how long a datagram from ``src`` to ``dst`` takes, or
None if it is lost. Each pair of addresses gets a base latency drawn once (on first use)
from a ``LatencyModel``; each datagram adds jitter (so datagrams can be reordered) and is
lost with probability ``loss``. ``partition(groups)`` cuts the addresses into groups that
cannot reach each other (every address not named forms one more group); ``heal()`` joins
them again. All randomness comes from the ``random.Random`` given.

``behind_nat(addresses)`` puts addresses behind NATs that filter what comes in: a datagram
to such an address arrives only from an address it has sent to before (its NAT then holds a
mapping for that peer), and never from another address behind a NAT (port-randomising,
"hard" NATs on both sides: no punching gets through). So NATed nodes reach every public
node, public nodes reach a NATed one only once it has spoken to them, and two NATed nodes
never reach each other: the case the overlay's tunnels are for.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Hashable, Iterable
from typing import Protocol


class LatencyModel(Protocol):
    def sample(self, rng: random.Random) -> float:
        """A one-way base latency in seconds."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class ConstantLatency:
    seconds: float = 0.02

    def sample(self, rng: random.Random) -> float:
        return self.seconds


@dataclasses.dataclass(frozen=True, slots=True)
class UniformLatency:
    low: float = 0.005
    high: float = 0.1

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@dataclasses.dataclass(frozen=True, slots=True)
class LogNormalLatency:
    """Wide-area-like: median ``median``, log-normal spread ``sigma``, clipped."""

    median: float = 0.04
    sigma: float = 0.6
    low: float = 0.001
    high: float = 0.5

    def sample(self, rng: random.Random) -> float:
        value = self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return min(self.high, max(self.low, value))


class Network:
    """Latency, loss and partitions between addresses."""

    def __init__(
        self,
        rng: random.Random,
        *,
        latency: LatencyModel | None = None,
        loss: float = 0.0,
        jitter: float = 0.1,
    ) -> None:
        self.rng = rng
        self.latency: LatencyModel = latency or LogNormalLatency()
        self.loss = loss
        self.jitter = jitter
        self._base: dict[tuple[Hashable, Hashable], float] = {}
        self._group: dict[Hashable, int] = {}
        self._nat: set[Hashable] = set()
        self._mapped: set[tuple[Hashable, Hashable]] = set()  # (inside, peer) it sent to
        self.lost = 0
        self.cut = 0
        self.filtered = 0

    def transit(self, src: Hashable, dst: Hashable) -> float | None:
        """Seconds from src to dst for one datagram, or None if it is lost."""
        if self._group and self._group.get(src, -1) != self._group.get(dst, -1):
            self.cut += 1
            return None
        if self._nat:
            if src in self._nat:
                self._mapped.add((src, dst))
            if dst in self._nat and (src in self._nat or (dst, src) not in self._mapped):
                self.filtered += 1
                return None
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            self.lost += 1
            return None
        base = self._base.get((src, dst))
        if base is None:
            base = self.latency.sample(rng) if src != dst else 1e-4
            self._base[(src, dst)] = self._base[(dst, src)] = base
        if self.jitter:
            return base * (1.0 + self.jitter * rng.random())
        return base

    def partition(self, groups: Iterable[Iterable[Hashable]]) -> None:
        """Cut the network into these groups (plus one group of everything else)."""
        self._group = {}
        for index, group in enumerate(groups):
            for address in group:
                self._group[address] = index

    def behind_nat(self, addresses: Iterable[Hashable]) -> None:
        """These addresses sit behind filtering, port-randomising NATs (see the module)."""
        self._nat.update(addresses)

    def heal(self) -> None:
        self._group = {}

    @property
    def partitioned(self) -> bool:
        return bool(self._group)
