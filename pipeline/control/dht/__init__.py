"""The DHT: signed, leased, replicated records on the structured overlay. Sans-I/O. Pure.

Modules:

- ``wire``: ``DhtRecord`` (signed by its owner; ``sign_record``, ``check_record``,
  ``key_position``) and the versioned message codec carried as overlay payloads.
- ``events``: ``CreateResult``, ``GetResult``, ``DeleteResult``, ``LeaseLost``.
- ``node``: ``Dht`` and ``DhtSettings`` (its docstring has the theory of operation and the
  consistency rule for create).

The API::

    dht = Dht(overlay_node, identity, rng=random.Random(seed), settings=DhtSettings())
    # inputs
    dht.handle_overlay_event(event, now)   # every event of the overlay node
    dht.handle_timer(now)                  # at next_deadline()
    rid = dht.create(b"ip:lab:100.64.0.7", identity.node_id, lease_s=3600.0, now=now)
    rid = dht.get(key, now)
    rid = dht.delete(key, now)
    # outputs: the overlay node's datagrams (the DHT sends through it), and
    dht.events() -> list[DhtEvent]        # results carry the request id
    dht.next_deadline() -> float | None
    dht.statistics() -> dict[str, int]
    dht.records(now) -> dict[bytes, DhtRecord]  # held here (tests, tools)
"""

from pipeline.control.dht.events import (
    CreateResult,
    DeleteResult,
    DhtEvent,
    GetResult,
    LeaseLost,
)
from pipeline.control.dht.node import Dht, DhtSettings, OverlayApi
from pipeline.control.dht.wire import DhtRecord, check_record, key_position, sign_record

__all__ = [
    "CreateResult",
    "DeleteResult",
    "Dht",
    "DhtEvent",
    "DhtSettings",
    "GetResult",
    "LeaseLost",
    "OverlayApi",
    "DhtRecord",
    "check_record",
    "key_position",
    "sign_record",
]
