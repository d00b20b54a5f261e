"""The batch paths of the encrypted data path, each against its one-by-one twin: a GRO read's
run opened with ``RecvSession.open_run`` gives what ``open`` gives datagram by datagram (the
same payloads, drops and replay window), ``ReplayWindow.advance`` leaves the window as
``update`` one counter at a time, and ``SendSession.seal_each`` makes the datagrams ``seal``
makes, byte for byte."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.crypto.ciphers import DataCipher
from pipeline.crypto.datapath import (
    MIN_DATAGRAM,
    REJECT_AFTER_MESSAGES,
    TAG_LEN,
    KeyExhausted,
    RecvSession,
    ReplayWindow,
    SendSession,
)
from pipeline.errors import RemoteProtocolError
from pipeline.wire.overlay import FLAG_PARTIAL, HEADER, HEADER_LEN, VERSION, DatagramType

KEY = bytes(range(32))
INDEX = 0x0102_0304
DATA = int(DatagramType.DATA)
CIPHERS = list(DataCipher)


# --- the replay window: a run in one advance ---------------------------------------------------


def state(window: ReplayWindow) -> tuple[int, bytes]:
    """All a window holds: its top and its bitmap."""
    return window.top, bytes(window._bits)


@settings(deadline=None)
@given(
    st.sampled_from([8, 16, 64, 72, 2048]),
    st.lists(st.integers(0, 5000), max_size=30),
    st.integers(1, 5000),
    st.integers(1, 5000),
)
def test_advance_is_update_one_by_one(width: int, before: list[int], gap: int, run: int) -> None:
    """Whatever the window held, a run of counters past its top (next to it or far beyond,
    shorter or longer than the window) ends as the same top and bitmap."""
    one, many = ReplayWindow(width), ReplayWindow(width)
    for counter in before:  # the same history in both (update takes any counter)
        one.update(counter)
        many.update(counter)
    first = one.top + gap
    last = first + run - 1
    for counter in range(first, last + 1):
        assert one.check(counter)
        one.update(counter)
    many.advance(first, last)
    assert state(many) == state(one)
    probe = range(max(0, last - 2 * width - 9), last + 9)
    assert [many.check(c) for c in probe] == [one.check(c) for c in probe]


def test_advance_near_the_limit() -> None:
    one, many = ReplayWindow(64, limit=1000), ReplayWindow(64, limit=1000)
    for window in (one, many):
        window.update(900)
    for counter in range(950, 1000):
        one.update(counter)
    many.advance(950, 999)
    assert state(many) == state(one) and not many.check(1000)


# --- open_run: a GRO read, against open one by one ---------------------------------------------


def sealed(send: SendSession, counter: int, payload: bytes, flags: int) -> bytes:
    """A DATA datagram of ``send``'s key with the given counter (any order, repeats too)."""
    header = HEADER.pack(VERSION, DATA, flags, INDEX, counter)
    return header + send._encrypt(counter.to_bytes(8, "little").rjust(12, b"\0"), payload, header)


def gro_read(seed: int, segment: int, cipher: DataCipher) -> tuple[list[bytes], int]:
    """Datagrams of one session, ``segment`` bytes each (the last may be shorter) as one GRO
    read holds them: runs of consecutive counters, gaps, repeats, old and too old counters,
    forged tags, flags that vary, a short last one; then maybe one of another session, where
    the run stops. Returns them and the window width to open them with."""
    rng = random.Random(seed)
    width = rng.choice([64, 2048])
    send = SendSession(KEY, index=INDEX, created=0.0, cipher=cipher)
    size = segment - HEADER_LEN - TAG_LEN
    counter = rng.choice([0, 1, 5000, REJECT_AFTER_MESSAGES - 40])
    seen: list[int] = []
    out: list[bytes] = []
    for _ in range(rng.randint(1, 60)):
        pick = rng.random()
        if pick < 0.6:
            counter += 1
        elif pick < 0.7:
            counter += rng.randint(2, 3 * width)
        if pick >= 0.7 and seen and rng.random() < 0.5:
            c = rng.choice(seen)  # a repeat
        elif pick >= 0.85:
            c = max(0, counter - rng.randint(1, 2 * width))  # older: in the window or not
        else:
            c = counter
        c = min(c, REJECT_AFTER_MESSAGES + 3)  # past the limit: never accepted
        payload = rng.randbytes(size)
        datagram = sealed(send, c, payload, rng.choice([FLAG_PARTIAL, FLAG_PARTIAL, 0]))
        if rng.random() < 0.08:  # forged: a flipped byte of the ciphertext
            at = rng.randrange(HEADER_LEN, len(datagram))
            datagram = datagram[:at] + bytes([datagram[at] ^ 1]) + datagram[at + 1 :]
        seen.append(c)
        out.append(datagram)
    if rng.random() < 0.3:
        out[-1] = out[-1][: rng.randint(HEADER_LEN, MIN_DATAGRAM - 1)]  # short
    elif rng.random() < 0.3:
        other = HEADER.pack(VERSION, DATA, 0, INDEX + 1, 7)  # another session: the run ends
        out.append(other + bytes(size + TAG_LEN))
    return out, width


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("seed", range(60))
def test_open_run_is_open_one_by_one(seed: int, cipher: DataCipher) -> None:
    segment = random.Random(seed).choice([MIN_DATAGRAM, 100, 1432])
    datagrams, width = gro_read(seed, segment, cipher)
    batch = memoryview(b"".join(datagrams))

    one = RecvSession(KEY, index=INDEX, created=0.0, cipher=cipher, window_size=width)
    expected: list[tuple[bytes, int]] = []
    expected_drops: dict[str, int] = {}
    expected_at = expected_bytes = 0
    for datagram in datagrams:
        if datagram[4:8] != INDEX.to_bytes(4, "big"):
            break
        expected_at += len(datagram)
        try:
            expected.append((one.open(datagram), datagram[3]))
            expected_bytes += len(datagram)
        except RemoteProtocolError as exc:
            expected_drops[exc.reason] = expected_drops.get(exc.reason, 0) + 1

    run = RecvSession(KEY, index=INDEX, created=0.0, cipher=cipher, window_size=width)
    opened: list[tuple[bytes, int]] = []
    drops: dict[str, int] = {}
    at, nbytes = run.open_run(batch, 0, segment, DATA, opened, drops)

    assert opened == expected
    assert drops == expected_drops
    assert (at, nbytes) == (expected_at, expected_bytes)
    assert state(run.window) == state(one.window)


def test_open_run_stops_at_another_type_and_opens_from_an_offset() -> None:
    send = SendSession(KEY, index=INDEX, created=0.0)
    data = [b"".join(send.seal(DATA, bytes([i]) * 10, FLAG_PARTIAL)) for i in range(3)]
    overlay = b"".join(send.seal(int(DatagramType.OVERLAY), bytes(10)))
    batch = memoryview(b"".join([*data, overlay]))
    recv = RecvSession(KEY, index=INDEX, created=0.0)
    opened: list[tuple[bytes, int]] = []
    at, nbytes = recv.open_run(batch, len(data[0]), len(data[0]), DATA, opened, {})
    assert opened == [(bytes([1]) * 10, FLAG_PARTIAL), (bytes([2]) * 10, FLAG_PARTIAL)]
    assert at == 3 * len(data[0]) and nbytes == 2 * len(data[0])
    assert recv.window.top == 2 and recv.window.check(0) and not recv.window.check(1)


# --- seal_each: a GSO batch, against seal one by one -------------------------------------------


@pytest.mark.parametrize("cipher", CIPHERS)
@pytest.mark.parametrize("flags", [0, FLAG_PARTIAL])
def test_seal_each_is_seal_one_by_one(flags: int, cipher: DataCipher) -> None:
    payloads = [bytes([i]) * n for i, n in enumerate([0, 1, 1348, 1348, 700])]
    one = SendSession(KEY, index=INDEX, created=0.0, cipher=cipher, counter_start=77)
    each = SendSession(KEY, index=INDEX, created=0.0, cipher=cipher, counter_start=77)
    expected: list[bytes] = []
    for payload in payloads:
        expected += one.seal(DATA, payload, flags)
    parts: list[bytes | bytearray | memoryview] = []
    nbytes = each.seal_each(parts, DATA, iter(payloads), flags)
    assert parts == expected
    recv = RecvSession(KEY, index=INDEX, created=0.0, cipher=cipher)
    assert [recv.open(parts[i] + parts[i + 1]) for i in range(0, len(parts), 2)] == payloads
    assert nbytes == sum(len(p) for p in parts)
    assert (each.counter, each.bytes, each.messages) == (one.counter, one.bytes, one.messages)


def test_seal_each_stops_at_the_limit_with_what_it_sealed() -> None:
    send = SendSession(KEY, index=INDEX, created=0.0, reject_after_messages=3)
    parts: list[bytes | bytearray | memoryview] = []
    with pytest.raises(KeyExhausted):
        send.seal_each(parts, DATA, [b"a", b"b", b"c", b"d"])
    assert len(parts) == 6 and send.counter == 3 and send.bytes == 3
    recv = RecvSession(KEY, index=INDEX, created=0.0)
    assert [recv.open(parts[i] + parts[i + 1]) for i in (0, 2, 4)] == [b"a", b"b", b"c"]
