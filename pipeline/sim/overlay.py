"""Overlay nodes in the simulator: building them, churn, and the invariants. Pure.

``OverlaySim`` puts ``OverlayNode`` cores (the same code as live) at integer addresses of a
``Simulator`` and knows which are alive. Checks:

- ``circle_errors()``: every live node's successor and predecessor (its nearest connections
  clockwise and counter-clockwise) are the true ones among the live nodes.
- ``routing_check(pairs)``: greedy walks through the nodes' routing tables, as the
  messages would go, from sampled sources to sampled node ids (and to random keys): each
  ends at the right node, within the hop limit, without a hop to a dead node.
- ``probe(pairs)``: real ``send_to_node`` messages through the simulated network; counts
  deliveries and hops.
- ``traffic()``: datagrams sent per live node per second (and by message type) over a
  window, for the maintenance cost.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import random
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

import msgspec

from pipeline import nodeid
from pipeline.control.overlay.events import Delivered, Joined, RouteFailed
from pipeline.control.overlay.node import NodeState, OverlayNode, OverlaySettings
from pipeline.control.overlay.wire import Address
from pipeline.sim.churn import ChurnAction, ChurnEvent
from pipeline.sim.loop import Simulator
from pipeline.sim.network import Network


class IntAddressCodec:
    """Simulated addresses are ints in [0, 2**32): 4 bytes on the wire."""

    def encode(self, address: Address) -> bytes:
        if not isinstance(address, int) or not 0 <= address < 1 << 32:
            raise ValueError(f"not a simulated address: {address!r}")
        return address.to_bytes(4, "big")

    def decode(self, data: bytes) -> Address:
        if len(data) != 4:
            raise ValueError(f"a simulated address is 4 bytes, got {len(data)}")
        return int.from_bytes(data, "big")


@dataclasses.dataclass(slots=True)
class SimNode:
    address: int
    node_id: int
    node: OverlayNode
    alive: bool = True
    started: float = 0.0
    joined: float | None = None  # when its Joined event came
    incarnation: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class RoutingReport:
    pairs: int
    ok: int
    hops: tuple[int, ...]  # of the successful walks
    failures: tuple[str, ...]  # a few, for the assertion message

    @property
    def success(self) -> float:
        return self.ok / self.pairs if self.pairs else 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Traffic:
    seconds: float
    nodes: int
    datagrams_per_node_s: float
    bytes_per_node_s: float
    by_type_per_node_s: dict[str, float]


class OverlaySim:
    """A population of overlay nodes on a simulated network."""

    def __init__(
        self,
        *,
        seed: int,
        settings: OverlaySettings | None = None,
        network: Network | None = None,
        bootstrap_count: int = 3,
    ) -> None:
        self.rng = random.Random(seed)
        net = network or Network(self.rng)
        self.sim = Simulator(network=net, on_event=self._on_event)
        self.rng = net.rng
        base = settings or OverlaySettings()
        self.settings = msgspec.structs.replace(base, address_codec=IntAddressCodec())
        self.bootstrap_count = bootstrap_count
        self.nodes: dict[int, SimNode] = {}
        self._by_id: dict[int, SimNode] = {}
        self._next_address = 1
        self._live_ids: list[int] | None = None
        self.probes: dict[bytes, Delivered] = {}
        self.failures: list[RouteFailed] = []
        self.events_seen: Counter[str] = Counter()

    # -- population --------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.sim.now

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def add_node(
        self, *, node_id: int | None = None, bootstrap: Sequence[int] | None = None
    ) -> SimNode:
        """A new node, now, joining through ``bootstrap`` addresses (by default a few random
        live nodes; none for the first)."""
        if node_id is None:
            node_id = self.rng.getrandbits(nodeid.BITS)
            while node_id in self._by_id:
                node_id = self.rng.getrandbits(nodeid.BITS)
        if bootstrap is None:
            live = [n.address for n in self.nodes.values() if n.alive]
            bootstrap = self.rng.sample(live, min(self.bootstrap_count, len(live)))
        address = self._next_address
        self._next_address += 1
        entry = SimNode(address, node_id, self._make(node_id, bootstrap), started=self.now)
        self.nodes[address] = entry
        self._by_id[node_id] = entry
        self._live_ids = None
        self.sim.add_host(address, entry.node)
        return entry

    def _make(self, node_id: int, bootstrap: Sequence[int]) -> OverlayNode:
        rng = random.Random(self.rng.getrandbits(64))
        return OverlayNode(node_id, rng=rng, settings=self.settings, bootstrap=list(bootstrap))

    def crash(self, address: int) -> None:
        entry = self.nodes[address]
        if entry.alive:
            self.sim.remove_host(address)
            entry.alive = False
            self._live_ids = None

    def leave(self, address: int) -> None:
        entry = self.nodes[address]
        if entry.alive:
            entry.node.leave(self.now)
            self.sim.flush(address)
            self.sim.remove_host(address)
            entry.alive = False
            self._live_ids = None

    def restart(self, address: int) -> None:
        """The crashed or departed node at ``address`` comes back with its id."""
        entry = self.nodes[address]
        if entry.alive:
            return
        live = [n.address for n in self.nodes.values() if n.alive]
        bootstrap = self.rng.sample(live, min(self.bootstrap_count, len(live)))
        entry.node = self._make(entry.node_id, bootstrap)
        entry.alive, entry.started, entry.joined = True, self.now, None
        entry.incarnation += 1
        self._live_ids = None
        self.sim.add_host(address, entry.node)

    def grow(self, count: int, *, rate: float) -> None:
        """Add ``count`` nodes, ``rate`` a second, running the simulation meanwhile."""
        gap = 1.0 / rate
        for _ in range(count):
            self.add_node()
            self.run_for(gap)

    def schedule_churn(
        self, script: Iterable[ChurnEvent], *, protect: Iterable[int] = (), min_live: int = 3
    ) -> None:
        """Apply a churn script as virtual time reaches each event. ``protect``: addresses
        never crashed or made to leave; ``min_live``: never go below this many live nodes."""
        protected = set(protect)
        for event in script:
            self.sim.call_at(event.at, functools.partial(self._apply, event, protected, min_live))

    def _apply(self, event: ChurnEvent, protected: set[int], min_live: int) -> None:
        self.events_seen[f"churn_{event.action.value}"] += 1
        if event.action is ChurnAction.JOIN:
            self.add_node()
            return
        if event.action is ChurnAction.RESTART:
            dead = [n.address for n in self.nodes.values() if not n.alive]
            if dead:
                self.restart(self.rng.choice(dead))
            return
        victims = [n.address for n in self.nodes.values() if n.alive and n.address not in protected]
        if not victims or len(self.live()) <= min_live:
            return
        victim = self.rng.choice(victims)
        if event.action is ChurnAction.CRASH:
            self.crash(victim)
        else:
            self.leave(victim)

    def run_for(self, seconds: float, *, max_steps: int | None = None) -> None:
        self.sim.run_for(seconds, max_steps=max_steps)

    def run_until(self, when: float, *, max_steps: int | None = None) -> None:
        self.sim.run_until(when, max_steps=max_steps)

    def _on_event(self, address: Hashable, event: object) -> None:
        entry = self.nodes.get(address) if isinstance(address, int) else None
        if isinstance(event, Delivered):
            if event.payload.startswith(b"probe:"):
                self.probes[event.payload] = event
        elif isinstance(event, Joined):
            if entry is not None and entry.joined is None:
                entry.joined = self.now
        elif isinstance(event, RouteFailed):
            self.failures.append(event)
        self.events_seen[type(event).__name__] += 1

    # -- invariants --------------------------------------------------------------------------

    def live_ids(self) -> list[int]:
        if self._live_ids is None:
            self._live_ids = sorted(n.node_id for n in self.nodes.values() if n.alive)
        return self._live_ids

    def true_closest(self, key: int) -> int:
        ids = self.live_ids()
        i = bisect.bisect_left(ids, key)
        return nodeid.closest(key, [ids[i % len(ids)], ids[i - 1]])

    def circle_errors(
        self, limit: int = 10, *, among: Iterable[SimNode] | None = None
    ) -> list[str]:
        """Nodes whose successor or predecessor is wrong (up to ``limit`` lines). ``among``:
        check the circle these live nodes should form by themselves (one side of a
        partition); by default all live nodes."""
        if among is None:
            ids = self.live_ids()
        else:
            ids = sorted(n.node_id for n in among if n.alive)
        n = len(ids)
        errors: list[str] = []
        for i, nid in enumerate(ids):
            node = self._by_id[nid].node
            want_succ = ids[(i + 1) % n] if n > 1 else None
            want_pred = ids[i - 1] if n > 1 else None
            succ, pred = node.successor(), node.predecessor()
            if succ != want_succ or pred != want_pred:
                errors.append(
                    f"{nodeid.short(nid)} ({node.state.value}): successor {_short(succ)}"
                    f" (want {_short(want_succ)}), predecessor {_short(pred)}"
                    f" (want {_short(want_pred)})"
                )
        return errors[:limit] + ([f"... {len(errors)} in all"] if len(errors) > limit else [])

    def not_joined(self) -> list[SimNode]:
        return [n for n in self.live() if n.node.state is not NodeState.JOINED]

    def routing_check(self, pairs: int, *, keys: bool = False) -> RoutingReport:
        """Greedy walks through the routing tables from random live nodes to random live
        node ids (or, with ``keys``, to random keys: the walk must end at the closest)."""
        live = self.live()
        max_hops = self.settings.max_hops
        ok = 0
        hops: list[int] = []
        failures: list[str] = []
        for _ in range(pairs):
            src = self.rng.choice(live)
            if keys:
                key = self.rng.getrandbits(nodeid.BITS)
                want = self.true_closest(key)
            else:
                key = want = self.rng.choice(live).node_id
            cur, count, problem = src, 0, ""
            while True:
                nxt = cur.node.next_hop(key)
                if nxt is None:
                    break
                entry = self._by_id.get(nxt)
                if entry is None or not entry.alive:
                    problem = f"hop {count} to dead node {nodeid.short(nxt)}"
                    break
                cur, count = entry, count + 1
                if count > max_hops:
                    problem = "hop limit"
                    break
            if not problem and cur.node_id != want:
                problem = f"ended at {nodeid.short(cur.node_id)}, want {nodeid.short(want)}"
            if problem:
                if len(failures) < 5:
                    failures.append(
                        f"{nodeid.short(src.node_id)} -> {nodeid.short(key)}: {problem}"
                    )
            else:
                ok += 1
                hops.append(count)
        return RoutingReport(pairs, ok, tuple(hops), tuple(failures))

    def probe(self, pairs: int, *, wait: float = 10.0) -> RoutingReport:
        """Real ``send_to_node`` messages between random live pairs, through the network."""
        live = self.live()
        sent: list[tuple[bytes, SimNode, SimNode]] = []
        for i in range(pairs):
            src, dst = self.rng.choice(live), self.rng.choice(live)
            payload = b"probe:%d:%d" % (self.sim.steps, i)
            src.node.send_to_node(dst.node_id, payload, self.now)
            self.sim.flush(src.address)
            sent.append((payload, src, dst))
        self.run_for(wait)
        ok = 0
        hops: list[int] = []
        failures: list[str] = []
        for payload, src, dst in sent:
            got = self.probes.pop(payload, None)
            if got is not None and got.src_id == src.node_id:
                ok += 1
                hops.append(got.hops)
            elif len(failures) < 5:
                failures.append(f"{nodeid.short(src.node_id)} -> {nodeid.short(dst.node_id)} lost")
        return RoutingReport(pairs, ok, tuple(hops), tuple(failures))

    def traffic(self, seconds: float) -> Traffic:
        """Run for ``seconds`` and measure what the live nodes send meanwhile."""
        before = self._counts()
        start = self.now
        self.run_for(seconds)
        after = self._counts()
        live = self.live()
        nodes = max(1, len(live))
        span = max(self.now - start, 1e-9)
        by_type = {
            k[len("sent_") :]: (after[k] - before.get(k, 0)) / nodes / span
            for k in after
            if k.startswith("sent_")
        }
        return Traffic(
            span,
            len(live),
            (after["datagrams"] - before["datagrams"]) / nodes / span,
            (after["bytes"] - before["bytes"]) / nodes / span,
            {k: v for k, v in sorted(by_type.items()) if v},
        )

    def _counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for entry in self.live():
            host = self.sim.hosts[entry.address]
            total["datagrams"] += host.datagrams_sent
            total["bytes"] += host.bytes_sent
            for key, value in entry.node.statistics().items():
                if key.startswith("sent_"):
                    total[key] += value
        return total


def _short(node_id: int | None) -> str:
    return "-" if node_id is None else nodeid.short(node_id)
