"""The peer liveness core: pings on time, pongs make peers up with an RTT, silence downs them."""

from __future__ import annotations

from pipeline.control.peers import PeerState, PeerTable
from pipeline.messages import Ping, Pong, decode_overlay, encode_overlay


def table() -> PeerTable:
    return PeerTable("alpha", [(1, "beta"), (2, "gamma")], interval_s=1.0, timeout_s=3.0)


class TestPeerTable:
    def test_pings_every_peer_on_schedule(self) -> None:
        t = table()
        first = t.handle_timer(10.0)
        assert [slot for slot, _ in first] == [1, 2]
        assert t.handle_timer(10.5) == []
        assert t.next_deadline() == 11.0
        assert len(t.handle_timer(11.0)) == 2

    def test_ping_is_answered_with_its_own_seq_and_time(self) -> None:
        t = table()
        reply = t.receive(1, Ping(seq=7, sent_ns=123, node="beta"), now=5.0)
        assert reply == Pong(seq=7, sent_ns=123, node="alpha")

    def test_pong_brings_peer_up_with_rtt(self) -> None:
        t = table()
        ((slot, ping), _) = t.handle_timer(10.0)
        t.receive(slot, Pong(ping.seq, ping.sent_ns, "beta"), now=10.002)
        (event,) = list(t.events())
        assert event.state is PeerState.UP and event.name == "beta"
        assert abs((t.peers[1].rtt_s or 0) - 0.002) < 1e-9

    def test_silent_peer_goes_down_after_timeout(self) -> None:
        t = table()
        t.handle_timer(0.0)
        t.receive(1, Pong(1, 0, "beta"), now=0.001)
        list(t.events())
        t.handle_timer(2.0)
        assert t.peers[1].state is PeerState.UP
        t.handle_timer(3.5)
        assert t.peers[1].state is PeerState.DOWN
        assert [e.state for e in t.events() if e.slot == 1] == [PeerState.DOWN]

    def test_never_heard_peer_is_down_after_timeout(self) -> None:
        t = table()
        for now in range(5):
            t.handle_timer(float(now))
        assert t.peers[2].state is PeerState.DOWN

    def test_message_from_unknown_slot_is_ignored(self) -> None:
        t = table()
        assert t.receive(99, Ping(1, 1, "x"), now=1.0) is None
        assert list(t.events()) == []

    def test_overlay_codec_round_trip(self) -> None:
        msg = Ping(seq=3, sent_ns=99, node="beta")
        assert decode_overlay(encode_overlay(msg)) == msg
