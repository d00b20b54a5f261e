"""Ring arithmetic on the circle of 2^160: distances, arcs, the shared order of closeness."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import nodeid
from pipeline.nodeid import (
    HALF,
    SIZE,
    between,
    circle_distance,
    clockwise,
    closer,
    closest,
    distance,
    id_from_bytes,
    id_to_bytes,
)

ids = st.integers(min_value=0, max_value=SIZE - 1)
# Points near 0 and near the half-way mark, where wrapping bugs live.
edgy = st.one_of(
    ids,
    st.integers(0, 3),
    st.integers(SIZE - 4, SIZE - 1),
    st.integers(HALF - 3, HALF + 3),
)


class TestDistance:
    def test_examples(self) -> None:
        assert distance(0, 1) == 1
        assert distance(1, 0) == -1
        assert distance(SIZE - 1, 0) == 1  # clockwise across zero
        assert distance(0, SIZE - 1) == -1
        assert distance(0, HALF) == HALF  # the antipode is +2^159, never -2^159
        assert distance(HALF, 0) == HALF
        assert clockwise(5, 3) == SIZE - 2
        assert circle_distance(SIZE - 1, 1) == 2

    @given(edgy, edgy)
    def test_bounded_and_lands_on_b(self, a: int, b: int) -> None:
        d = distance(a, b)
        assert -HALF < d <= HALF
        assert (a + d) % SIZE == b
        assert circle_distance(a, b) == abs(d) == circle_distance(b, a)

    @given(edgy, edgy)
    def test_antisymmetric_except_at_the_antipode(self, a: int, b: int) -> None:
        if circle_distance(a, b) == HALF:
            assert distance(a, b) == distance(b, a) == HALF
        else:
            assert distance(a, b) == -distance(b, a)

    @given(edgy, edgy)
    def test_clockwise_both_ways_make_the_circle(self, a: int, b: int) -> None:
        assert 0 <= clockwise(a, b) < SIZE
        assert (clockwise(a, b) + clockwise(b, a)) % SIZE == 0

    @given(edgy, edgy, edgy)
    def test_triangle_inequality(self, a: int, b: int, c: int) -> None:
        assert circle_distance(a, c) <= circle_distance(a, b) + circle_distance(b, c)


class TestBetween:
    def test_examples(self) -> None:
        assert between(10, 11, 20)
        assert not between(10, 10, 20) and not between(10, 20, 20)
        assert between(SIZE - 5, 2, 5)  # the arc wraps through zero
        assert not between(5, 2, SIZE - 5)
        assert between(7, 8, 7) and not between(7, 7, 7)  # a == b: all but a

    @given(edgy, edgy, edgy)
    def test_is_the_clockwise_arc(self, a: int, x: int, b: int) -> None:
        if a != b:
            assert between(a, x, b) == (0 < clockwise(a, x) < clockwise(a, b))

    @given(edgy, edgy, edgy)
    def test_two_arcs_split_the_circle(self, a: int, x: int, b: int) -> None:
        if len({a, x, b}) == 3:
            assert between(a, x, b) != between(b, x, a)


class TestCloser:
    @given(edgy, edgy, edgy)
    def test_is_a_strict_total_order(self, key: int, a: int, b: int) -> None:
        if a == b:
            assert not closer(key, a, b)
        else:
            assert closer(key, a, b) != closer(key, b, a)

    def test_tie_goes_to_the_smaller_id(self) -> None:
        assert closer(100, 90, 110) and not closer(100, 110, 90)

    @given(edgy, st.lists(edgy, min_size=1, max_size=20, unique=True))
    def test_closest_matches_brute_force(self, key: int, nodes: list[int]) -> None:
        best = closest(key, nodes)
        assert all(n == best or closer(key, best, n) for n in nodes)


class TestBytes:
    @given(ids)
    def test_round_trip(self, node_id: int) -> None:
        data = id_to_bytes(node_id)
        assert len(data) == 20 and id_from_bytes(data) == node_id

    def test_big_endian(self) -> None:
        assert id_to_bytes(1) == bytes(19) + b"\x01"
        assert nodeid.short(0xDEADBEEF << 128) == "deadbeef"

    @pytest.mark.parametrize("bad", [-1, SIZE])
    def test_out_of_range(self, bad: int) -> None:
        with pytest.raises(ValueError):
            id_to_bytes(bad)

    @pytest.mark.parametrize("length", [0, 19, 21])
    def test_wrong_length(self, length: int) -> None:
        with pytest.raises(ValueError):
            id_from_bytes(bytes(length))
