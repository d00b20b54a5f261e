"""Node ids and arithmetic on the overlay's circle of 2^160 positions: the one place that
defines them. Pure.

A node id (and a DHT key's position) is an ``int`` in ``[0, 2**160)``; on the wire and in
certificates it is ``NODE_ID_LEN`` (20) bytes, big-endian (``pipeline.crypto.identity.node_id``
gives those bytes for a public key). The overlay core, the DHT, the simulator and overlay_io's
relaying all measure closeness with the functions here. Positions grow
*clockwise*; the successor of a node is the next node clockwise, its predecessor the next
one counter-clockwise.

- ``clockwise(a, b)``: how far b is from a going clockwise, in ``[0, 2**160)``.
- ``distance(a, b)``: the signed shortest way from a to b, in ``(-2**159, 2**159]``;
  positive means clockwise. ``|distance| <= 2**159``.
- ``circle_distance(a, b)``: ``|distance(a, b)|``, what greedy routing minimises.
- ``between(a, x, b)``: x lies strictly inside the clockwise arc from a to b. With
  ``a == b`` the arc is the whole circle but a itself.
- ``closer(key, a, b)``: the total order of closeness that every node uses, so that all
  agree on which node is closest to a key: the smaller circle distance, and on a tie (a and b
  on opposite sides at the same distance) the smaller id.
"""

from __future__ import annotations

BITS = 160
SIZE = 1 << BITS
HALF = SIZE >> 1
MASK = SIZE - 1
NODE_ID_LEN = BITS // 8  # bytes


def clockwise(a: int, b: int) -> int:
    """The clockwise distance from a to b, in [0, 2**160)."""
    return (b - a) & MASK


def distance(a: int, b: int) -> int:
    """The signed shortest distance from a to b, in (-2**159, 2**159]; > 0 is clockwise."""
    d = (b - a) & MASK
    return d - SIZE if d > HALF else d


def circle_distance(a: int, b: int) -> int:
    """The unsigned shortest distance between a and b, in [0, 2**159]."""
    d = (b - a) & MASK
    return SIZE - d if d > HALF else d


def between(a: int, x: int, b: int) -> bool:
    """x lies strictly inside the clockwise arc from a to b (the whole circle but a if a == b)."""
    if a == b:
        return x != a
    return 0 < ((x - a) & MASK) < ((b - a) & MASK)


def closer(key: int, a: int, b: int) -> bool:
    """a is strictly closer to key than b, in the total order all nodes share."""
    da, db = circle_distance(a, key), circle_distance(b, key)
    return da < db or (da == db and a < b)


def closest(key: int, ids: list[int]) -> int:
    """The id in ``ids`` (not empty) closest to key, by ``closer``."""
    return min(ids, key=lambda i: (circle_distance(i, key), i))


def id_to_bytes(node_id: int) -> bytes:
    """An id as 20 bytes, big-endian; ValueError outside [0, 2**160)."""
    if not 0 <= node_id < SIZE:
        raise ValueError(f"a position on the circle is in [0, 2**{BITS}), got {node_id}")
    return node_id.to_bytes(NODE_ID_LEN, "big")


def id_from_bytes(data: bytes) -> int:
    """An id from its 20 bytes, big-endian; ValueError for any other length."""
    if len(data) != NODE_ID_LEN:
        raise ValueError(f"a node id is {NODE_ID_LEN} bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def short(node_id: int) -> str:
    """The first 8 hex digits of an id, for logs and reprs."""
    return f"{node_id >> (BITS - 32):08x}"
