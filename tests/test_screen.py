"""The handshake screen, sans-I/O: mac1, the per-source bucket, cookies under load, the
answers' bucket, resync hints for unknown sessions. Time is driven by hand."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from pipeline.crypto import handshake as hs
from pipeline.crypto.cert import make_ca
from pipeline.crypto.identity import Identity
from pipeline.crypto.screen import COOKIE_SECRET_S, HandshakeScreen, ScreenSettings, TokenBucket
from pipeline.wire.overlay import HEADER_LEN, DatagramType, build_header, parse_header

CA = make_ca(Identity.from_seed(bytes(32)), name="ca", not_before=0, not_after=1 << 40, serial=1)
MAC1 = hs.mac1_key(CA.public_key)
SEAL = hs.cookie_key(CA.public_key)
T0 = 100.0


def rng_from(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def screen(**settings: float) -> HandshakeScreen:
    return HandshakeScreen(CA.public_key, rng_from(1), T0, ScreenSettings(**settings))  # type: ignore[arg-type]


def initiation(sender: int = 1, *, key: bytes = MAC1, cookie: bytes | None = None) -> bytes:
    return hs.build_handshake(
        key,
        receiver_index=0,
        pattern=hs.Pattern.IK,
        step=0,
        sender_index=sender,
        noise=bytes(96),
        cookie=cookie,
    )


def source(i: int) -> tuple[str, int]:
    return (f"198.18.{i // 250}.{i % 250 + 1}", 4789)


class TestMac1:
    def test_a_valid_mac1_passes_and_a_forged_one_is_dropped(self) -> None:
        s = screen()
        assert s.screen(initiation(), source(0), T0)
        assert not s.screen(initiation(key=bytes(32)), source(1), T0)
        assert s.drops == {"bad_mac1": 1}

    def test_a_flipped_byte_anywhere_before_mac2_is_dropped(self) -> None:
        s = screen(per_source_burst=1000)
        good = initiation()
        for i in range(HEADER_LEN + 2, len(good) - hs.MAC_LEN):
            bad = bytearray(good)
            bad[i] ^= 0x01
            assert not s.screen(bytes(bad), source(0), T0)
        assert s.drops["bad_mac1"] == len(good) - hs.MAC_LEN - HEADER_LEN - 2

    @pytest.mark.parametrize(
        ("datagram", "reason"),
        [
            (b"", "short_handshake"),
            (b"\x01\x03", "short_handshake"),
            (build_header(DatagramType.HANDSHAKE) + bytes(60), "short_handshake"),
            (b"\x02" + initiation()[1:], "short_handshake"),  # version
            (
                initiation()[:HEADER_LEN] + b"\x03\x00" + initiation()[HEADER_LEN + 2 :],
                "bad_pattern",
            ),
            (
                initiation()[:HEADER_LEN] + b"\x01\x02" + initiation()[HEADER_LEN + 2 :],
                "bad_pattern",
            ),
            (build_header(DatagramType.COOKIE) + bytes(10), "bad_cookie"),
        ],
        ids=["empty", "two_bytes", "short", "version", "pattern", "ik_step_2", "cookie_length"],
    )
    def test_junk_is_a_counted_drop(self, datagram: bytes, reason: str) -> None:
        s = screen()
        assert not s.screen(datagram, source(0), T0)
        assert s.drops == {reason: 1}


class TestBuckets:
    def test_a_source_gets_its_burst_then_its_rate(self) -> None:
        s = screen(per_source_rate=5, per_source_burst=10)
        passed = [s.screen(initiation(i), ("198.18.0.9", 1000 + i), T0) for i in range(30)]
        assert passed.count(True) == 10  # ports do not help: counted by address
        assert s.drops == {"handshake_rate_limited": 20}
        assert s.screen(initiation(), source(7), T0)  # another address has its own
        assert s.screen(initiation(), ("198.18.0.9", 1), T0 + 0.2)  # one token back
        assert not s.screen(initiation(), ("198.18.0.9", 1), T0 + 0.2)

    def test_sources_are_remembered_in_bounded_memory(self) -> None:
        s = screen(max_sources=64, per_source_burst=1)
        for i in range(1000):
            s.screen(initiation(), source(i), T0 + i)  # a token a second: under load never
        assert len(s._sources) == 64

    def test_answers_and_cookies_share_one_bucket(self) -> None:
        s = screen(replies_per_s=4, per_source_burst=1000)
        answer = hs.build_handshake(
            MAC1, receiver_index=5, pattern=hs.Pattern.XX, step=1, sender_index=9, noise=bytes(80)
        )
        cookie = build_header(DatagramType.COOKIE, session=3) + bytes(hs.COOKIE_DATAGRAM_LEN - 16)
        verdicts = [s.screen(d, source(0), T0) for d in [answer, cookie] * 3]
        assert verdicts == [True] * 4 + [False] * 2
        assert s.drops == {"reply_rate_limited": 2}

    def test_token_bucket_refills_at_its_rate_up_to_its_burst(self) -> None:
        b = TokenBucket(2.0, 3.0, 0.0)
        assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
        assert b.take(0.5) and not b.take(0.5)
        assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]


class TestUnderLoad:
    def flooded(self) -> HandshakeScreen:
        """Past ``load_threshold`` first messages in this second, from many sources."""
        s = screen(load_threshold=10)
        assert all(s.screen(initiation(i), source(i), T0) for i in range(10))
        assert s.under_load
        return s

    def test_without_a_cookie_a_first_message_gets_one_and_is_dropped(self) -> None:
        s = self.flooded()
        first = initiation(77)
        assert not s.screen(first, source(50), T0)
        ((reply, to),) = s.datagrams_to_send()
        assert to == source(50) and s.drops == {"cookie_demanded": 1}
        assert parse_header(reply).session == 77  # the initiation's sender index
        # only the holder of the initiation's mac1 opens it
        cookie = hs.open_cookie_reply(SEAL, reply, first[-2 * hs.MAC_LEN : -hs.MAC_LEN])
        assert s.screen(initiation(78, cookie=cookie), source(50), T0)
        assert s.counters["passed_with_cookie"] == 1
        # the same cookie from another address is no proof
        assert not s.screen(initiation(79, cookie=cookie), source(51), T0)
        assert s.drops["cookie_demanded"] == 2

    def test_a_cookie_outlives_one_secret_change_not_two(self) -> None:
        s = self.flooded()
        s.screen(initiation(77), source(50), T0)
        ((reply, _),) = s.datagrams_to_send()
        cookie = hs.open_cookie_reply(SEAL, reply, initiation(77)[-32:-16])
        later = T0 + COOKIE_SECRET_S
        s._load.tokens, s._load.stamp = 0.0, later  # still under load
        assert s.screen(initiation(78, cookie=cookie), source(50), later)
        assert s.counters["passed_with_cookie"] == 1
        latest = later + COOKIE_SECRET_S
        s._load.tokens, s._load.stamp = 0.0, latest
        assert not s.screen(initiation(79, cookie=cookie), source(50), latest)
        assert s.drops["cookie_demanded"] == 2

    def test_the_load_passes_and_first_messages_flow_again(self) -> None:
        s = self.flooded()
        assert not s.screen(initiation(), source(60), T0)
        assert s.screen(initiation(), source(61), T0 + 0.2)  # 10 a second: 2 tokens back

    def test_cookie_replies_are_limited_in_all(self) -> None:
        s = screen(load_threshold=1, cookie_replies_per_s=5)
        verdicts = [s.screen(initiation(i), source(i), T0) for i in range(20)]
        assert verdicts.count(True) == 1
        assert len(s.datagrams_to_send()) == 5
        assert s.drops == {"cookie_demanded": 19, "cookie_reply_limited": 14}


class TestUnknownSessions:
    def test_a_source_gets_one_hint_per_interval_echoing_the_index(self) -> None:
        s = screen(hint_every_s=2.0)
        s.unknown_session(1234, source(0), T0)
        s.unknown_session(1234, source(0), T0 + 1.9)
        s.unknown_session(99, source(1), T0 + 1.9)
        s.unknown_session(1234, source(0), T0 + 2.0)
        sent = s.datagrams_to_send()
        assert [(parse_header(d).session, to) for d, to in sent] == [
            (1234, source(0)),
            (99, source(1)),
            (1234, source(0)),
        ]
        hint = sent[0][0]
        assert len(hint) == HEADER_LEN and hint[1] == DatagramType.COOKIE
        assert s.drops == {"hint_repeated": 1}

    def test_a_spoofed_flood_gets_few_hints_in_bounded_memory(self) -> None:
        s = screen(hints_per_s=20, max_sources=100)
        for i in range(5000):
            s.unknown_session(i, source(i), T0 + i / 5000)  # one second of forged sources
        assert len(s.datagrams_to_send()) <= 40  # the burst and one second's rate
        assert s.drops["hint_rate_limited"] >= 4960
        assert len(s._hinted) <= 100


class TestReadBudget:
    def test_the_driver_reads_at_most_its_budget_and_gets_back_what_it_left(self) -> None:
        s = screen(reads_per_s=1000)  # bursts of 100
        assert s.read_budget(T0, 64) == 64
        assert s.read_budget(T0, 64) == 36
        assert s.read_budget(T0, 64) == 0
        assert s.next_read(T0) == pytest.approx(T0 + 0.1)  # a full burst again
        assert s.read_budget(T0 + 0.01, 64) == 10  # 1000 a second
        s.unread(4)  # the socket had only 6
        assert s.read_budget(T0 + 0.01, 64) == 4
        assert s.read_budget(T0 + 60, 1000) == 100  # never more than a burst
