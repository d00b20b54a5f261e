"""Relaying through the overlay: the relay payload, the greedy next hop, end-to-end sealing
through a relay, and a relay's forward/deliver decisions. (Workers relaying over memory
ports: ``tests/test_overlay_io.py``.)"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.crypto.datapath import MIN_DATAGRAM, RecvSession, SendSession
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import NODE_ID_LEN, circle_distance
from pipeline.overlay_io.relay import (
    CACHE_MAX,
    DEST_LEN,
    PREFIX_LEN,
    RELAY_TTL,
    RelayAction,
    RelayTable,
    on_relay,
    pack_relay,
    parse_relay,
)
from pipeline.records import RecordKind
from pipeline.wire.overlay import HEADER_LEN, DatagramType, build_header, parse_header

SIZE = 1 << 160
PSIZE = 1 << 56  # relay payloads carry 56-bit id prefixes


def nid(value: int) -> bytes:
    """A node id whose 56-bit prefix (what relay payloads carry) is ``value``."""
    return ((value << 104) % SIZE).to_bytes(NODE_ID_LEN, "big")


def sealed_inner(dtype: DatagramType = DatagramType.DATA, body: bytes = b"x" * 40) -> bytes:
    return build_header(dtype, session=7, counter=3) + body


KEY_AR, KEY_RA, KEY_RB, KEY_BR, KEY_AB, KEY_BA = (bytes([i]) * 32 for i in range(1, 7))


# -- the relay payload -----------------------------------------------------------------------------


def test_payload_bytes_are_exact() -> None:
    inner = sealed_inner()
    payload = pack_relay(nid(0xABC), 16, inner)
    assert payload == nid(0xABC)[:7] + b"\x10" + inner
    dest, ttl, view = parse_relay(payload)
    assert (dest, ttl, bytes(view)) == (nid(0xABC)[:7], 16, inner)
    assert PREFIX_LEN == 8 and DEST_LEN == 7 and RELAY_TTL == 16
    assert int(DatagramType.RELAY) == 5
    assert int(RecordKind.RELAY) == 5


@given(
    st.binary(min_size=20, max_size=20),
    st.integers(0, 255),
    st.sampled_from([DatagramType.DATA, DatagramType.OVERLAY]),
    st.binary(min_size=16, max_size=200),
)
def test_payload_round_trip(dest: bytes, ttl: int, dtype: DatagramType, body: bytes) -> None:
    inner = sealed_inner(dtype, body)
    got_dest, got_ttl, view = parse_relay(pack_relay(dest, ttl, inner))
    assert (got_dest, got_ttl, bytes(view)) == (dest[:7], ttl, inner)
    # a memoryview payload (as a ring record is) parses the same
    assert parse_relay(memoryview(pack_relay(dest, ttl, inner)))[0] == dest[:7]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "relay_short"),
        (nid(1)[:7] + b"\x10", "relay_short"),
        (nid(1)[:7] + b"\x10" + sealed_inner(body=b"x" * 15), "relay_short"),
        (nid(1)[:7] + b"\x10" + b"\x02\x01" + bytes(30), "relay_bad_inner"),
        (nid(1)[:7] + b"\x10" + sealed_inner(DatagramType.RELAY), "relay_bad_inner"),
        (nid(1)[:7] + b"\x10" + sealed_inner(DatagramType.HANDSHAKE), "relay_bad_inner"),
        (nid(1)[:7] + b"\x10" + sealed_inner(DatagramType.COOKIE), "relay_bad_inner"),
        (nid(1)[:7] + b"\x10" + b"\x01\x09" + bytes(30), "relay_bad_inner"),
    ],
)
def test_bad_payloads_name_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_relay(payload)
    assert info.value.reason == reason


def test_smallest_payload_parses() -> None:
    payload = nid(1)[:7] + b"\x00" + sealed_inner(body=bytes(MIN_DATAGRAM - HEADER_LEN))
    assert parse_relay(payload)[1] == 0


_GOOD_PREFIX = st.sampled_from([b"", b"\x01\x01", b"\x01\x02", b"\x01\x05"]).map(
    lambda head: nid(5)[:7] + b"\x03" + head
)


@given(st.one_of(st.binary(max_size=120), st.tuples(_GOOD_PREFIX, st.binary(max_size=60))))
def test_junk_raises_only_remote_protocol_error(raw: bytes | tuple[bytes, bytes]) -> None:
    """Any junk, or junk after a dest, a ttl and a good inner header's start."""
    with contextlib.suppress(RemoteProtocolError):
        parse_relay(raw if isinstance(raw, bytes) else raw[0] + raw[1])


def test_pack_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="20 bytes"):
        pack_relay(b"short", 1, sealed_inner())
    assert pack_relay(nid(1)[:7], 1, b"x") == pack_relay(nid(1), 1, b"x")
    with pytest.raises(ValueError, match="u8"):
        pack_relay(nid(1), 256, sealed_inner())
    with pytest.raises(ValueError, match="u8"):
        pack_relay(nid(1), -1, sealed_inner())


# -- the greedy next hop ---------------------------------------------------------------------------


def test_next_hop_is_the_closest_direct_link() -> None:
    table = RelayTable(nid(1000), [(1, nid(100)), (2, nid(500)), (3, nid(2000))])
    assert table.next_hop(nid(450)) == 2
    assert table.next_hop(nid(120)) == 1
    assert table.next_hop(nid(1900)) == 3
    assert table.next_hop(nid(500)) == 2  # the destination itself is a direct link
    assert len(table) == 3 and table.slots == [1, 2, 3]


def test_next_hop_wraps_around_the_circle() -> None:
    # dest's prefix just below 2^56: the id just above 0 is 11 away, the one at 2^55 far
    table = RelayTable(nid(1 << 40), [(1, nid(1 << 55)), (2, nid(5))])
    assert table.next_hop(nid(PSIZE - 6)) == 2
    # and the other way: dest just above 0, the link just below 2^56
    table = RelayTable(nid(1 << 40), [(1, nid(PSIZE - 3)), (2, nid(1 << 50))])
    assert table.next_hop(nid(4)) == 1
    assert circle_distance(SIZE - 3, 4) == 7 == circle_distance(4, SIZE - 3)


def test_only_the_prefix_counts() -> None:
    """Ids that differ below their 56-bit prefix are one place for relaying: the full id and
    its prefix get the same answer, and a payload for our prefix is ours."""
    own = nid(1000)
    table = RelayTable(own, [(1, nid(100)), (2, nid(2000))])
    dest = (int.from_bytes(nid(120), "big") + 12345).to_bytes(20, "big")
    assert table.next_hop(dest) == table.next_hop(dest[:7]) == 1
    step = on_relay(table, pack_relay(own[:7] + bytes(13), 3, sealed_inner()))
    assert step.action is RelayAction.DELIVER


def test_no_hop_closer_than_us_is_none() -> None:
    table = RelayTable(nid(1000), [(1, nid(100)), (2, nid(5000))])
    assert table.next_hop(nid(1010)) is None
    assert table.next_hop(nid(1000)) is None  # ourselves
    # a link exactly as close as we are is not closer
    assert RelayTable(nid(1000), [(1, nid(1020))]).next_hop(nid(1010)) is None
    assert RelayTable(nid(1000), []).next_hop(nid(1)) is None


def test_ties_go_to_the_smaller_slot() -> None:
    # 90 and 110 are both 10 from 100, on either side; whatever the order given
    for hops in ([(7, nid(110)), (3, nid(90))], [(3, nid(90)), (7, nid(110))]):
        assert RelayTable(nid(5000), hops).next_hop(nid(100)) == 3
    for hops in ([(7, nid(90)), (3, nid(110))], [(3, nid(110)), (7, nid(90))]):
        assert RelayTable(nid(5000), hops).next_hop(nid(100)) == 3


def test_bad_ids_mean_no_hop() -> None:
    assert RelayTable(b"", [(1, nid(1))]).next_hop(nid(2)) is None
    table = RelayTable(nid(1000), [(1, b"short"), (2, nid(10))])
    assert table.slots == [2]
    assert table.next_hop(b"short") is None


def test_answers_are_cached_and_the_cache_is_bounded() -> None:
    table = RelayTable(nid(1 << 55), [(1, nid(0))])
    assert table.next_hop(nid(3)) == 1
    table._hops.clear()  # a stale table would still answer from its cache
    assert table.next_hop(nid(3)) == 1
    for i in range(CACHE_MAX + 10):
        table.next_hop(nid(i + 10))
    assert len(table._cache) <= CACHE_MAX
    assert table.next_hop(nid(3)) is None  # forgotten, recomputed with no hops


@given(
    st.integers(0, PSIZE - 1),
    st.lists(st.tuples(st.integers(0, 65535), st.integers(0, PSIZE - 1)), max_size=8),
    st.integers(0, PSIZE - 1),
)
def test_next_hop_is_the_brute_force_choice(own: int, links: list[Any], dest: int) -> None:
    hops = list({slot: node for slot, node in links}.items())
    table = RelayTable(nid(own), [(slot, nid(node)) for slot, node in hops])

    def pdist(a: int, b: int) -> int:  # the circle distance of 56-bit prefixes
        return min((b - a) % PSIZE, (a - b) % PSIZE)

    candidates = [
        (pdist(node, dest), slot) for slot, node in hops if pdist(node, dest) < pdist(own, dest)
    ]
    assert table.next_hop(nid(dest)) == (min(candidates)[1] if candidates else None)


# -- the decisions of a relay ----------------------------------------------------------------------


def test_on_relay_delivers_forwards_and_drops() -> None:
    table = RelayTable(nid(1000), [(4, nid(100))])
    inner = sealed_inner()
    step = on_relay(table, pack_relay(nid(1000), 0, inner))
    assert step.action is RelayAction.DELIVER and bytes(step.data) == inner
    step = on_relay(table, pack_relay(nid(90), 5, inner))
    assert (step.action, step.hop, step.data) == (
        RelayAction.FORWARD,
        4,
        pack_relay(nid(90), 4, inner),
    )
    step = on_relay(table, pack_relay(nid(90), 0, inner))
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_ttl")
    step = on_relay(table, pack_relay(nid(1100), 5, inner))
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_no_route")
    step = on_relay(table, pack_relay(nid(1000), 5, sealed_inner(DatagramType.RELAY)))
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_bad_inner")
    step = on_relay(table, b"junk")
    assert (step.action, step.reason) == (RelayAction.DROP, "relay_short")


def test_a_payload_never_outlives_its_ttl() -> None:
    """Even relays that disagreed about the circle could not pass it on more than 16 times."""
    table = RelayTable(nid(1000), [(1, nid(10))])
    payload = pack_relay(nid(0), RELAY_TTL, sealed_inner())
    hops = 0
    while (step := on_relay(table, payload)).action is RelayAction.FORWARD:
        payload = bytes(step.data)
        hops += 1
    assert hops == RELAY_TTL and step.reason == "relay_ttl"


# -- end to end through a relay, with real sessions ------------------------------------------------


def test_inner_datagram_is_sealed_end_to_end_through_a_relay() -> None:
    """A -> R -> B: R opens only the hop layer and cannot open the inner datagram."""
    a_to_r = SendSession(KEY_AR, index=11, created=0.0)  # A's hop session to R
    r_from_a = RecvSession(KEY_AR, index=11, created=0.0)
    r_to_b = SendSession(KEY_RB, index=22, created=0.0)  # R's hop session to B
    b_from_r = RecvSession(KEY_RB, index=22, created=0.0)
    a_to_b = SendSession(KEY_AB, index=33, created=0.0)  # A and B, end to end
    b_from_a = RecvSession(KEY_AB, index=33, created=0.0)
    id_b, id_r = nid(0x10 << 48), nid(0x20 << 48)

    packet = b"an IPv4 packet for B" * 10
    inner = b"".join(a_to_b.seal(DatagramType.DATA, packet))
    outer = b"".join(a_to_r.seal(DatagramType.RELAY, pack_relay(id_b, RELAY_TTL, inner)))
    assert parse_header(outer).type is DatagramType.RELAY
    assert packet not in outer and packet not in inner

    # the relay: open the hop layer, look at dest/ttl/inner header, pass it on
    at_r = r_from_a.open(memoryview(outer))
    step = on_relay(RelayTable(id_r, [(1, nid(0xAA << 48)), (2, id_b)]), at_r)
    assert step.action is RelayAction.FORWARD and step.hop == 2
    _dest, _ttl, seen = parse_relay(at_r)
    assert parse_header(seen).session == 33  # the relay sees the inner header only
    for key in (KEY_AR, KEY_RA, KEY_RB, KEY_BR):  # every key the relay holds
        with pytest.raises(RemoteProtocolError) as info:
            RecvSession(key, index=33, created=0.0).open(seen)
        assert info.value.reason == "bad_tag"
    hop2 = b"".join(r_to_b.seal(DatagramType.RELAY, step.data))

    # the destination: open the hop layer, then the inner datagram with the e2e session
    at_b = b_from_r.open(memoryview(hop2))
    step = on_relay(RelayTable(id_b, [(5, id_r)]), at_b)
    assert step.action is RelayAction.DELIVER
    assert parse_header(step.data).type is DatagramType.DATA
    assert b_from_a.open(step.data) == packet
    _, ttl, _ = parse_relay(at_b)
    assert ttl == RELAY_TTL - 1
    with pytest.raises(RemoteProtocolError) as info:  # and it cannot be replayed
        b_from_a.open(step.data)
    assert info.value.reason == "replayed"
