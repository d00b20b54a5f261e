"""The DHT on real overlay nodes in the simulator: ``DhtOverlayNode`` and ``DhtSim``. Pure.

``DhtOverlayNode`` is an ``OverlayNode`` with a ``Dht`` on top, driven as one core by the
``Simulator`` (as a live driver would stack them): every overlay event goes to the DHT
before the loop takes the node's datagrams, the DHT's timer is merged into the node's, and
the DHT's events go to a sink (the ``DhtSim``), not into the overlay's event list.
``DhtSim`` is an ``OverlaySim`` whose nodes are those, each with an Ed25519 identity whose
node id is its overlay id (nodes added by churn too); the results of its requests land in
``results`` by request id.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from pipeline import nodeid
from pipeline.control.dht.events import DhtEvent, LeaseLost
from pipeline.control.dht.node import Dht, DhtSettings
from pipeline.control.overlay.events import OverlayEvent
from pipeline.control.overlay.node import OverlayNode, OverlaySettings
from pipeline.control.overlay.wire import Address
from pipeline.crypto.identity import Identity
from pipeline.sim.network import Network
from pipeline.sim.overlay import OverlaySim, SimNode

Sink = Callable[[int, DhtEvent], None]


class DhtOverlayNode(OverlayNode):
    """An overlay node and its DHT, as one simulated core."""

    def __init__(
        self,
        node_id: int,
        *,
        rng: random.Random,
        settings: OverlaySettings,
        bootstrap: Sequence[Address],
        identity: Identity,
        dht_settings: DhtSettings,
        clock: Callable[[], float],
        sink: Sink,
    ) -> None:
        dht_rng = random.Random(rng.getrandbits(64))
        super().__init__(node_id, rng=rng, settings=settings, bootstrap=list(bootstrap))
        self.dht = Dht(self, identity, rng=dht_rng, settings=dht_settings)
        self._clock = clock
        self._sink = sink
        self._passed: list[OverlayEvent] = []

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        self._pump()
        self.dht.handle_timer(now)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        self._pump()
        return super().datagrams_to_send()

    def events(self) -> list[OverlayEvent]:
        self._pump()
        out, self._passed = self._passed, []
        return out

    def next_deadline(self) -> float | None:
        times = [t for t in (super().next_deadline(), self.dht.next_deadline()) if t is not None]
        return min(times) if times else None

    def _pump(self) -> None:
        now = self._clock()
        while True:
            events = super().events()
            if not events:
                break
            for event in events:
                self._passed.append(event)
                self.dht.handle_overlay_event(event, now)
        for dht_event in self.dht.events():
            self._sink(self.node_id, dht_event)


class DhtSim(OverlaySim):
    """Overlay nodes with DHTs on a simulated network."""

    def __init__(
        self,
        *,
        seed: int,
        settings: OverlaySettings | None = None,
        network: Network | None = None,
        bootstrap_count: int = 3,
        dht_settings: DhtSettings | None = None,
    ) -> None:
        self.identities: dict[int, Identity] = {}
        self.dht_settings = dht_settings or DhtSettings()
        self.results: dict[int, DhtEvent] = {}
        self.lost: list[tuple[int, LeaseLost]] = []
        super().__init__(
            seed=seed, settings=settings, network=network, bootstrap_count=bootstrap_count
        )

    def add_node(
        self, *, node_id: int | None = None, bootstrap: Sequence[int] | None = None
    ) -> SimNode:
        if node_id is None:
            identity = Identity.from_seed(self.rng.randbytes(32))
            node_id = nodeid.id_from_bytes(identity.node_id)
            self.identities[node_id] = identity
        return super().add_node(node_id=node_id, bootstrap=bootstrap)

    def _make(self, node_id: int, bootstrap: Sequence[int]) -> OverlayNode:
        identity = self.identities.get(node_id)
        if identity is None:  # an id given by the caller: an identity that does not match it
            identity = Identity.from_seed(self.rng.randbytes(32))
            self.identities[node_id] = identity
        return DhtOverlayNode(
            node_id,
            rng=random.Random(self.rng.getrandbits(64)),
            settings=self.settings,
            bootstrap=list(bootstrap),
            identity=identity,
            dht_settings=self.dht_settings,
            clock=lambda: self.sim.now,
            sink=self._on_dht_event,
        )

    def _on_dht_event(self, node_id: int, event: DhtEvent) -> None:
        self.events_seen[type(event).__name__] += 1
        if isinstance(event, LeaseLost):
            self.lost.append((node_id, event))
        else:
            self.results[event.request_id] = event

    # -- commands ----------------------------------------------------------------------------

    def dht(self, address: int) -> Dht:
        node = self.nodes[address].node
        assert isinstance(node, DhtOverlayNode)
        return node.dht

    def create(self, address: int, key: bytes, value: bytes, lease_s: float) -> int:
        rid = self.dht(address).create(key, value, lease_s, self.now)
        self.sim.flush(address)
        return rid

    def get(self, address: int, key: bytes) -> int:
        rid = self.dht(address).get(key, self.now)
        self.sim.flush(address)
        return rid

    def delete(self, address: int, key: bytes) -> int:
        rid = self.dht(address).delete(key, self.now)
        self.sim.flush(address)
        return rid

    def wait(self, request_ids: Sequence[int], *, timeout: float = 15.0) -> None:
        """Run until every request has its result (or ``timeout`` has passed)."""
        end = self.now + timeout
        while self.now < end and any(r not in self.results for r in request_ids):
            self.run_for(0.25)

    def holders(self, key: bytes) -> list[SimNode]:
        """The live nodes that hold a live record of key."""
        now = self.now
        return [n for n in self.live() if key in self.dht(n.address).records(now)]
