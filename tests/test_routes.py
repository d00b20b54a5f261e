"""Tests for pipeline.classifier.routes: the route table and the worker sharding functions."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.classifier.routes import Routes
from pipeline.topology import worker_for_flow, worker_for_peer
from pipeline.wire import ipv4

A = IPv4Address


def packet(src: str, dst: str, protocol: int = 17) -> memoryview:
    return memoryview(ipv4.build(src=A(src), dst=A(dst), protocol=protocol))


def test_lookup_owns_len() -> None:
    routes = Routes.from_peers(
        7,
        [(3, [A("100.64.0.7"), A("100.64.1.20")]), (9, iter([A("100.64.2.2")])), (3, [])],
    )
    assert routes.version == 7
    assert len(routes) == 3
    assert routes.lookup(A("100.64.0.7").packed) == 3
    assert routes.lookup(A("100.64.1.20").packed) == 3
    assert routes.lookup(A("100.64.2.2").packed) == 9
    assert routes.lookup(A("100.64.2.3").packed) is None
    assert routes.owns(3, A("100.64.1.20").packed)
    assert not routes.owns(9, A("100.64.1.20").packed)
    assert not routes.owns(9, A("100.64.9.9").packed)
    assert dict(routes.items()) == {
        A("100.64.0.7").packed: 3,
        A("100.64.1.20").packed: 3,
        A("100.64.2.2").packed: 9,
    }
    assert "version=7" in repr(routes)


def test_empty_routes() -> None:
    routes = Routes.from_peers(0, [])
    assert len(routes) == 0
    assert routes.lookup(A("100.64.0.7").packed) is None


def test_same_slot_may_repeat_an_address() -> None:
    routes = Routes.from_peers(1, [(5, [A("100.64.0.9")]), (5, [A("100.64.0.9")])])
    assert len(routes) == 1


@pytest.mark.parametrize("slot", [0, -1, 65536, True])
def test_bad_slot_rejected(slot: int) -> None:
    with pytest.raises(ValueError):
        Routes.from_peers(1, [(slot, [A("100.64.0.9")])])


def test_address_claimed_twice_rejected() -> None:
    with pytest.raises(ValueError, match="100.64.0.9"):
        Routes.from_peers(1, [(1, [A("100.64.0.9")]), (2, [A("100.64.0.9")])])


def test_non_ipv4_address_rejected() -> None:
    with pytest.raises(TypeError):
        Routes.from_peers(1, [(1, ["100.64.0.9"])])  # type: ignore[list-item]


def test_routes_are_immutable() -> None:
    routes = Routes.from_peers(1, [(1, [A("100.64.0.9")])])
    with pytest.raises(AttributeError):
        routes.version = 2
    with pytest.raises(AttributeError):
        del routes.version


@given(st.integers(1, 65535), st.integers(1, 64))
def test_worker_for_peer_stable_and_in_range(slot: int, workers: int) -> None:
    worker = worker_for_peer(slot, workers)
    assert 0 <= worker < workers
    assert worker == worker_for_peer(slot, workers)


def test_worker_for_peer_spreads_consecutive_slots() -> None:
    assert Counter(worker_for_peer(slot, 4) for slot in range(1, 401)) == {
        0: 100,
        1: 100,
        2: 100,
        3: 100,
    }


def test_bad_worker_count_rejected() -> None:
    with pytest.raises(ValueError):
        worker_for_peer(1, 0)
    with pytest.raises(ValueError):
        worker_for_flow(packet("100.64.0.1", "100.64.0.2"), 0)


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.integers(1, 64),
    st.binary(max_size=40),
)
def test_worker_for_flow_in_range_and_ignores_everything_else(
    src: int, dst: int, protocol: int, workers: int, payload: bytes
) -> None:
    first = ipv4.build(src=A(src), dst=A(dst), protocol=protocol, identification=1)
    other = ipv4.build(
        src=A(src),
        dst=A(dst),
        protocol=protocol,
        identification=2,
        fragment_offset=185,
        payload=payload,
        ttl=3,
    )
    worker = worker_for_flow(memoryview(first), workers)
    assert 0 <= worker < workers
    assert worker_for_flow(memoryview(other), workers) == worker


def test_worker_for_flow_pinned_values() -> None:
    # Pinned: the hash must not depend on the process (no salted hash()).
    assert [worker_for_flow(packet("100.64.0.1", "100.64.0.2"), w) for w in (2, 3, 4, 7, 16)] == [
        0,
        1,
        1,
        2,
        5,
    ]
    assert [worker_for_flow(packet("100.64.0.2", "100.64.0.1"), w) for w in (2, 3, 4, 7, 16)] == [
        1,
        2,
        3,
        6,
        15,
    ]


def test_worker_for_flow_not_ipv4_is_zero() -> None:
    v6 = bytes([0x60]) + bytes(39)
    for data in (b"", b"\x45" * 19, v6, bytes(40)):
        assert worker_for_flow(memoryview(data), 8) == 0


def test_worker_for_flow_spreads_flows() -> None:
    counts = Counter(
        worker_for_flow(packet("100.64.0.1", f"100.64.{i // 256}.{i % 256}"), 4)
        for i in range(2000)
    )
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 350
