"""The structured overlay: a sans-I/O core after Brunet/Symphony. Pure.

Modules:

- ``wire``: the messages and their versioned binary codec; ``AddressCodec``.
- ``events``: ``ConnectionAdded``, ``ConnectionRemoved``, ``NeighboursChanged``, ``Delivered``,
  ``RouteFailed``, ``Joined``; ``ConnectionKind``, ``ConnectionInfo``.
- ``node``: ``OverlayNode`` and ``OverlaySettings`` (its docstring has the theory of
  operation).

The API that other cores (the DHT) build on, all re-exported here::

    node = OverlayNode(node_id, rng=random.Random(seed), settings=OverlaySettings(),
                       bootstrap=[("192.0.2.1", 4000)])
    # inputs
    node.receive(datagram, source, now)
    node.handle_timer(now)
    message_id = node.send_to_key(key, payload, now)      # to the node closest to key
    message_id = node.send_to_node(node_id, payload, now)  # to exactly that node
    node.leave(now)
    # outputs
    node.datagrams_to_send() -> list[tuple[bytes, Address]]
    node.next_deadline() -> float | None
    node.events() -> list[OverlayEvent]
    node.statistics() -> dict[str, int]
    # queries
    node.connections() -> list[ConnectionInfo]
    node.neighbours() -> (successors, predecessors)  # near_per_side each, nearest first
    node.successor() / node.predecessor() -> int | None
    node.nearest(key, k) -> list[int]       # this node and its connections, nearest key first
    node.is_responsible(key) -> bool        # closest to key among itself and neighbours
    node.next_hop(key) -> int | None        # None: this node is the closest it knows
    node.estimated_size() -> int
    node.state -> NodeState; node.address -> Address | None

Ids and keys are ints in [0, 2**160) (``pipeline.nodeid.id_from_bytes`` of a 20-byte BLAKE2b-160
node id). Events: ``ConnectionAdded``, ``ConnectionRemoved``, ``NeighboursChanged`` (the DHT's cue
to hand records over), ``Delivered`` (a message for which this node is the destination),
``RouteFailed``, ``Joined``. The overlay does not retransmit end to end (a hop only
re-routes a message it sent over a connection that then proved silent: see ``node``): a DHT
request that gets no answer is retried by the DHT.
"""

from pipeline.control.overlay.events import (
    ConnectionAdded,
    ConnectionInfo,
    ConnectionKind,
    ConnectionRemoved,
    Delivered,
    Joined,
    NeighboursChanged,
    OverlayEvent,
    RouteFailed,
)
from pipeline.control.overlay.node import NodeState, OverlayNode, OverlaySettings
from pipeline.control.overlay.wire import Address, AddressCodec, HostPortCodec

__all__ = [
    "Address",
    "AddressCodec",
    "Delivered",
    "HostPortCodec",
    "Joined",
    "ConnectionAdded",
    "ConnectionInfo",
    "ConnectionKind",
    "ConnectionRemoved",
    "NeighboursChanged",
    "NodeState",
    "OverlayEvent",
    "OverlayNode",
    "OverlaySettings",
    "RouteFailed",
]
