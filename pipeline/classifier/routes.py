"""The classifier's immutable route table (virtual address -> peer slot)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address

__all__ = ["MAX_SLOT", "Routes"]

MAX_SLOT = 0xFFFF


class Routes:
    """Which peer slot owns each virtual IPv4 address, at one version of control's table.

    Immutable: build a new one with ``from_peers`` for every published table. Addresses are
    keyed by their 4 packed bytes, so the hot path needs no ``IPv4Address`` objects.
    """

    __slots__ = ("_slot_by_address", "version")

    version: int
    _slot_by_address: dict[bytes, int]

    def __init__(self, version: int, slot_by_address: dict[bytes, int]) -> None:
        """Prefer ``from_peers``; this trusts ``slot_by_address`` and does not copy it."""
        object.__setattr__(self, "version", version)
        object.__setattr__(self, "_slot_by_address", slot_by_address)

    @classmethod
    def from_peers(cls, version: int, peers: Iterable[tuple[int, Iterable[IPv4Address]]]) -> Routes:
        """Build from (peer slot, its virtual addresses) pairs; a slot may appear more than once.

        Raises ``ValueError`` for a slot outside 1..65535 or an address claimed by two slots,
        ``TypeError`` for an address that is not an ``IPv4Address``.
        """
        table: dict[bytes, int] = {}
        for slot, addresses in peers:
            if type(slot) is not int or not 1 <= slot <= MAX_SLOT:
                raise ValueError(f"peer slot {slot!r} outside 1..{MAX_SLOT}")
            for address in addresses:
                if not isinstance(address, IPv4Address):
                    raise TypeError(f"not an IPv4Address: {address!r}")
                key = address.packed
                owner = table.setdefault(key, slot)
                if owner != slot:
                    raise ValueError(f"{address} claimed by peer slots {owner} and {slot}")
        return cls(version, table)

    def lookup(self, dst4: bytes) -> int | None:
        """The peer slot for 4 packed address bytes, or None."""
        return self._slot_by_address.get(dst4)

    def owns(self, slot: int, src4: bytes) -> bool:
        """True if peer ``slot`` owns the address ``src4`` (anti-spoofing)."""
        return self._slot_by_address.get(src4) == slot

    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every (4 packed address bytes, peer slot)."""
        return iter(self._slot_by_address.items())

    def __len__(self) -> int:
        """The number of routed addresses."""
        return len(self._slot_by_address)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Routes is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Routes is immutable")

    def __repr__(self) -> str:
        return f"Routes(version={self.version}, addresses={len(self)})"
