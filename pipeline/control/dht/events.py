"""What the DHT tells its user: the results of its requests, and lost leases. Pure."""

from __future__ import annotations

import dataclasses

from pipeline.control.dht.wire import DhtRecord


@dataclasses.dataclass(frozen=True, slots=True)
class CreateResult:
    """The answer to ``create``. ``reason``: ``ok``, ``exists`` (``holder`` is the node id of
    the owner of the live record, when known), ``stale``, ``no_quorum``, ``refused``,
    ``timeout``, ``route_failed``."""

    request_id: int
    key: bytes
    ok: bool
    reason: str
    holder: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GetResult:
    """The answer to ``get``: the verified, unexpired records of the key (none: absent)."""

    request_id: int
    key: bytes
    ok: bool
    records: tuple[DhtRecord, ...]
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class DeleteResult:
    request_id: int
    key: bytes
    ok: bool
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseLost:
    """A renewal of a record this node owned found another owner's record (``holder``)."""

    key: bytes
    holder: bytes | None


DhtEvent = CreateResult | GetResult | DeleteResult | LeaseLost
