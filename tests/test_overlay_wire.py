"""The overlay codec: golden bytes, round trips, and fuzzing of the decoder and of a node."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.control.overlay import HostPortCodec, OverlayNode, OverlaySettings
from pipeline.control.overlay import wire as w
from pipeline.errors import RemoteProtocolError
from pipeline.nodeid import id_to_bytes

id_bytes = st.binary(min_size=20, max_size=20)
address_bytes = st.binary(max_size=w.MAX_ADDRESS)
u8 = st.integers(0, 255)
u32 = st.integers(0, 0xFFFF_FFFF)
kinds = st.integers(0, 2)
floats = st.floats(allow_nan=False)


def message_strategy(
    ids: st.SearchStrategy[bytes], addresses: st.SearchStrategy[bytes]
) -> st.SearchStrategy[w.Message]:
    entries = st.lists(st.tuples(ids, addresses, st.booleans()), max_size=w.MAX_ENTRIES).map(tuple)
    paths = st.lists(ids, max_size=w.MAX_PATH).map(tuple)
    message_ids = st.integers(0, (1 << 63) - 1)
    return st.one_of(
        st.builds(w.Hello, ids, kinds, u32, addresses, st.booleans()),
        st.builds(w.HelloAck, ids, kinds, u32, addresses, st.booleans()),
        st.builds(w.Close, ids, u8, entries),
        st.builds(w.Ping, ids, u32, floats),
        st.builds(w.Pong, ids, u32, floats),
        st.builds(w.Neighbours, ids, st.booleans(), entries),
        st.builds(w.ConnectRequest, ids, ids, u8, u8, kinds, u32, addresses, paths),
        st.builds(w.ConnectReply, ids, kinds, u32, entries, ids, addresses, paths),
        st.builds(w.Forward, ids, ids, addresses, ids, st.binary(max_size=200)),
        st.builds(w.Data, ids, ids, st.booleans(), u8, u8, message_ids, st.binary(max_size=200)),
        st.builds(w.RouteError, ids, ids, u8, u8, message_ids, ids, st.text(max_size=32)),
    )


messages = message_strategy(id_bytes, address_bytes)
SELF_ID, PEER_IDS = 0x80 << 152, (0x70 << 152, 0x90 << 152)
PEERS = [("198.18.0.2", 4000), ("198.18.0.3", 4000)]
# Ids and addresses a node knows (its own, its peers') as well as random ones.
node_messages = message_strategy(
    st.one_of(id_bytes, st.sampled_from([id_to_bytes(i) for i in (SELF_ID, *PEER_IDS)])),
    st.one_of(address_bytes, st.sampled_from([HostPortCodec().encode(p) for p in PEERS])),
)

A = id_to_bytes(0xAA << 152)


class TestCodec:
    def test_golden_ping(self) -> None:
        """Version byte, then the msgpack array [tag, sender, seq, sent]."""
        data = w.encode(w.Ping(A, 7, 1.5))
        assert data == (
            b"\x01"  # version
            + b"\x94"  # fixarray of 4
            + b"\x04"  # tag 4: Ping
            + b"\xc4\x14"  # bin8, 20 bytes
            + A
            + b"\x07"  # seq
            + b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00"  # float64 1.5
        )

    def test_golden_hello_ack(self) -> None:
        data = w.encode(w.HelloAck(A, 2, 0x01020304, b"\xc6\x12\x00\x01\x0f\xa0", True))
        assert data.hex() == (
            "01"  # version
            + "96"  # fixarray of 6
            + "02"  # tag 2: HelloAck
            + ("c414" + A.hex())  # sender: bin8 of 20 bytes
            + "02"  # kind: near
            + "ce01020304"  # token, uint32
            + ("c406" + "c61200010fa0")  # observed: bin8 of 6 bytes, 198.18.0.1:4000
            + "c3"  # on_circle: true
        )

    @given(messages)
    def test_round_trip(self, msg: w.Message) -> None:
        assert w.decode(w.encode(msg)) == msg

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            (b"", "empty"),
            (b"\x02\x94\x04", "bad_version"),
            (b"\x01", "malformed"),
            (b"\x01\x94\x04", "malformed"),  # truncated
            (b"\x01\x93\x63\x00\x00", "malformed"),  # unknown tag 99
            (b"\x01\xc1", "malformed"),  # never-used msgpack byte
        ],
    )
    def test_rejects(self, data: bytes, reason: str) -> None:
        with pytest.raises(RemoteProtocolError) as info:
            w.decode(data)
        assert info.value.reason == reason

    @pytest.mark.parametrize(
        "msg",
        [
            w.Ping(A[:19], 1, 0.0),  # short id
            w.Hello(A, 3, 1, b"", False),  # kind out of range
            w.Ping(A, 1 << 32, 0.0),  # seq beyond u32
            w.Close(A, 1, tuple((A, b"") for _ in range(w.MAX_ENTRIES + 1))),
            w.ConnectRequest(A, A, 256, 1, 0, 0, b""),  # hops beyond u8
            w.HelloAck(A, 0, 0, bytes(w.MAX_ADDRESS + 1), False),
        ],
    )
    def test_field_constraints_are_checked(self, msg: w.Message) -> None:
        with pytest.raises(RemoteProtocolError):
            w.decode(w.encode(msg))

    @settings(max_examples=2000)
    @given(st.binary(max_size=300))
    def test_fuzz_decode_raises_only_remote_protocol_error(self, data: bytes) -> None:
        try:
            msg = w.decode(data)
        except RemoteProtocolError:
            return
        assert isinstance(msg, w.Message)

    @settings(max_examples=1000)
    @given(messages, st.data())
    def test_fuzz_mutated_messages(self, msg: w.Message, data: st.DataObject) -> None:
        raw = bytearray(w.encode(msg))
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(raw)))
        try:
            w.decode(bytes(raw[:cut]))
        except RemoteProtocolError:
            pass


class TestHostPortCodec:
    @pytest.mark.parametrize(
        "address", [("198.18.0.1", 4000), ("2001:db8::1", 65535), ("0.0.0.0", 0)]
    )
    def test_round_trip(self, address: tuple[str, int]) -> None:
        codec = HostPortCodec()
        data = codec.encode(address)
        assert len(data) in (6, 18)
        assert codec.decode(data) == address

    @pytest.mark.parametrize(
        "address", [("198.18.0.1", 70000), ("host.example", 1), "198.18.0.1:1", ("198.18.0.4",)]
    )
    def test_rejects_what_it_cannot_carry(self, address: object) -> None:
        with pytest.raises(ValueError):
            HostPortCodec().encode(address)

    @pytest.mark.parametrize("data", [b"", bytes(5), bytes(7), bytes(17)])
    def test_rejects_bad_lengths(self, data: bytes) -> None:
        with pytest.raises(ValueError):
            HostPortCodec().decode(data)


def linked_node() -> OverlayNode:
    """A node with two near links, so fuzzed input reaches the link and routing code."""
    node = OverlayNode(SELF_ID, rng=random.Random(1), settings=OverlaySettings())
    node.handle_timer(0.0)
    for nid, peer in zip(PEER_IDS, PEERS, strict=True):
        node.receive(w.encode(w.Hello(id_to_bytes(nid), 2, 1, b"", True)), peer, 0.1)
    node.datagrams_to_send()
    node.events()
    return node


class TestNodeFuzz:
    @settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=300), st.sampled_from([("198.18.0.2", 4000), ("198.19.9.9", 1)]))
    def test_random_bytes_are_counted_drops(self, data: bytes, source: tuple[str, int]) -> None:
        node = linked_node()
        node.receive(data, source, 1.0)
        stats = node.statistics()
        handled = sum(v for k, v in stats.items() if k.startswith("received_"))
        dropped = sum(v for k, v in stats.items() if k.startswith("dropped_"))
        assert handled + dropped >= 1

    @settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(node_messages, min_size=1, max_size=5),
        st.sampled_from([("198.18.0.2", 4000), ("198.18.0.3", 4000), ("198.19.9.9", 1)]),
    )
    def test_valid_but_arbitrary_messages_never_raise(
        self, msgs: list[w.Message], source: tuple[str, int]
    ) -> None:
        """Well-formed messages with arbitrary contents (our own id, bad addresses, stale
        tokens, zero TTLs...) are handled or dropped, and the node keeps working."""
        node = linked_node()
        now = 1.0
        for msg in msgs:
            node.receive(w.encode(msg), source, now)
            node.handle_timer(now)
            now += 0.5
        node.datagrams_to_send()
        node.send_to_key(12345, b"still alive", now)
        assert node.next_deadline() is not None

    def test_after_leave_input_is_answered_or_dropped(self) -> None:
        node = linked_node()
        node.leave(2.0)
        node.datagrams_to_send()
        node.receive(b"junk", ("198.18.0.2", 4000), 3.0)
        node.receive(w.encode(w.Ping(A, 1, 0.0)), ("198.18.0.2", 4000), 3.0)
        ((reply, to),) = node.datagrams_to_send()
        assert isinstance(w.decode(reply), w.Close) and to == ("198.18.0.2", 4000)
        assert node.statistics()["dropped_after_leave"] == 1


def test_a_tunnel_is_its_relay_and_node_whatever_the_relay_saw() -> None:
    """``address_bytes`` (where the relay sees the node) does not tell two tunnels apart."""
    relay = ("198.18.0.2", 4000)
    seen_here = w.Tunnel(relay, 7, b"\xc6\x12\x00\x09\x0f\xa0")
    seen_there = w.Tunnel(relay, 7, b"\xc6\x12\x00\x0a\x0f\xa0")
    assert seen_here == seen_there and not seen_here != seen_there
    assert {seen_here: "link"}[seen_there] == "link"
    assert w.Tunnel(relay, 8) != seen_here and w.Tunnel(("198.18.0.3", 4000), 7) != seen_here
    assert seen_here != (relay, 7, seen_here.address_bytes)
    assert str(seen_here) == f"tunnel:{7:040x}@{relay}"
