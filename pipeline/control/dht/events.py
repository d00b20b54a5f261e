"""What the DHT tells its user: the results of its requests, and lost leases. Pure."""

from __future__ import annotations

import msgspec

from pipeline.control.dht.wire import DhtRecord


class CreateResult(msgspec.Struct, frozen=True):
    """The answer to ``create``. ``reason``: ``ok``, ``exists`` (``holder`` is the node id of
    the owner of the live record, when known), ``stale``, ``no_quorum``, ``refused``,
    ``timeout``, ``route_failed``."""

    request_id: int
    key: bytes
    ok: bool
    reason: str
    holder: bytes | None = None


class GetResult(msgspec.Struct, frozen=True):
    """The answer to ``get``: the verified, unexpired records of the key (none: absent)."""

    request_id: int
    key: bytes
    ok: bool
    records: tuple[DhtRecord, ...]
    reason: str


class DeleteResult(msgspec.Struct, frozen=True):
    request_id: int
    key: bytes
    ok: bool
    reason: str


class LeaseLost(msgspec.Struct, frozen=True):
    """A renewal of a record this node owned found another owner's record (``holder``)."""

    key: bytes
    holder: bytes | None


DhtEvent = CreateResult | GetResult | DeleteResult | LeaseLost
