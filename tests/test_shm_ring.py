"""One-process tests of pipeline.shm_ring: arithmetic vs a reference model, doorbell, errors."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.errors import StageIOError
from pipeline.shm_ring import (
    HEADER_SIZE,
    MAX_CAPACITY,
    MAX_RECORD,
    MIN_CAPACITY,
    PAD_KIND,
    Consumer,
    Producer,
    Ring,
    RingError,
    RingRecord,
    RingSpec,
    RingStats,
    close_spec,
    create_ring,
    read_stats,
    slot_bytes,
)

CAPACITIES = [MIN_CAPACITY, MIN_CAPACITY * 2, MIN_CAPACITY * 4, MIN_CAPACITY * 16]


@pytest.fixture
def spec() -> Iterator[RingSpec]:
    s = create_ring("test>ring", MIN_CAPACITY)
    yield s
    close_spec(s)


@pytest.fixture
def ring(spec: RingSpec) -> Iterator[Ring]:
    r = Ring.attach(spec)
    yield r
    r.close()


def payload(seq: int, size: int) -> bytes:
    """Distinct, position-sensitive bytes for record ``seq``."""
    return (seq.to_bytes(4, "little") + bytes([seq % 251, size % 253])) * (size // 6 + 1)


def bell_count(bell_fd: int) -> int:
    """Read (and reset) the doorbell counter; 0 if it was not rung."""
    try:
        return os.eventfd_read(bell_fd)
    except BlockingIOError:
        return 0


def slot(n: int) -> int:
    return 8 + (n + 7) // 8 * 8


# --------------------------------------------------------------------------- reference model


@dataclass
class Model:
    """Ring behaviour written with a separate bookkeeping: used bytes and a write position."""

    capacity: int
    pos: int = 0  # write position in the data area
    used: int = 0  # bytes held by unreleased records (pads included)
    pending: deque[tuple[bytes, int, int, int, int]] = field(default_factory=deque)
    published: deque[tuple[bytes, int, int, int, int]] = field(default_factory=deque)
    popped: list[int] = field(default_factory=list)  # space held by popped, unreleased
    frames_in: int = 0
    bytes_in: int = 0
    drops: int = 0
    drop_bytes: int = 0
    batches_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    batches_out: int = 0
    out_unreleased: int = 0  # frames popped since the last release

    def push(self, data: bytes, kind: int, peer: int, flags: int) -> bool:
        need = slot(len(data))
        wraps = self.pos + need > self.capacity
        if wraps:
            need += self.capacity - self.pos
        if self.used + need > self.capacity:
            self.drops += 1
            self.drop_bytes += len(data)
            return False
        self.used += need
        self.pos = slot(len(data)) if wraps else (self.pos + need) % self.capacity
        self.pending.append((data, kind, peer, flags, need))
        self.frames_in += 1
        self.bytes_in += len(data)
        return True

    def flush(self, consumer_drained: bool) -> bool:
        """Returns whether the doorbell must ring."""
        if not self.pending:
            return False
        self.batches_in += 1
        self.published.extend(self.pending)
        self.pending.clear()
        return consumer_drained

    def pop(self, k: int) -> list[tuple[bytes, int, int, int, int]]:
        out = [self.published.popleft() for _ in range(min(k, len(self.published)))]
        self.popped.extend(rec[4] for rec in out)
        self.frames_out += len(out)
        self.bytes_out += sum(len(rec[0]) for rec in out)
        self.out_unreleased += len(out)
        return out

    def release(self) -> None:
        if self.popped:
            self.batches_out += 1
        self.used -= sum(self.popped)
        self.popped.clear()
        self.out_unreleased = 0


def check_stats(ring: Ring, m: Model) -> None:
    s = read_stats(ring)
    assert s.capacity == m.capacity
    assert (s.frames_in, s.bytes_in, s.drops, s.drop_bytes, s.batches_in) == (
        m.frames_in, m.bytes_in, m.drops, m.drop_bytes, m.batches_in,
    )  # fmt: skip
    assert (s.batches_out,) == (m.batches_out,)
    assert s.frames_out == m.frames_out - m.out_unreleased


sizes = st.one_of(
    st.integers(0, 64),
    st.integers(0, 1600),
    st.integers(9000, MAX_RECORD),
    st.integers(30000, MAX_RECORD),
    st.sampled_from([0, 1, 7, 8, 9, 1500, 9000, 65536, MAX_RECORD - 1, MAX_RECORD]),
)
push = st.tuples(
    st.just("push"), sizes, st.integers(0, PAD_KIND - 1),
    st.integers(0, 0xFFFF), st.integers(0, 0xFF),
)  # fmt: skip
burst = st.tuples(st.just("burst"), st.integers(1, 40), sizes)
ops = st.one_of(
    push,
    burst,
    push,
    st.tuples(st.just("flush")),
    st.tuples(st.just("pop"), st.integers(1, 80)),
    st.tuples(st.just("release")),
    st.tuples(st.just("wait")),
)


def run_ops(ring: Ring, capacity: int, program: list[tuple[Any, ...]]) -> None:
    """Apply ``program`` to the ring and the model side by side; check results and counters."""
    prod, cons = Producer(ring), Consumer(ring)
    m = Model(capacity, pos=ring._q[8] % capacity)
    seq = 0
    for op in program:
        if op[0] == "push" or op[0] == "burst":
            if op[0] == "push":
                count, (size, kind, peer, flags) = 1, op[1:]
            else:
                count, size = op[1:]
            for _ in range(count):
                if op[0] == "burst":
                    kind, peer, flags = seq % 255, seq & 0xFFFF, seq & 0xFF
                data = payload(seq, size)[:size]
                seq += 1
                pos = m.pos
                assert prod.push(data, kind, peer, flags) == m.push(data, kind, peer, flags)
                if m.pos < pos and m.pos:
                    event("wrapped with a pad")
        elif op[0] == "flush":
            drained = not m.published and not m.popped
            prod.flush()
            assert bell_count(ring.bell_fd) == int(m.flush(drained))
        elif op[0] == "pop":
            batch = cons.pop_batch(op[1])
            expected = m.pop(op[1])
            assert [(r.kind, r.peer, r.flags, bytes(r.data)) for r in batch] == [
                (kind, peer, flags, data) for data, kind, peer, flags, _ in expected
            ]
            del batch
        elif op[0] == "release":
            cons.release()
            m.release()
        else:  # wait: the pre-sleep protocol
            assert cons.wait_ready() == bool(m.published)
            m.release()
            assert bell_count(ring.bell_fd) == 0
        if m.drops:
            event("dropped")
        assert ring.stats().used_bytes == m.used - sum(rec[4] for rec in m.pending), (
            "used_bytes counts published, unreleased bytes"
        )
    prod.flush()
    m.flush(False)
    bell_count(ring.bell_fd)
    check_stats(ring, m)
    # drain: every accepted record comes out, occupancy returns to 0
    while batch := cons.pop_batch(64):
        expected = m.pop(64)
        assert [bytes(r.data) for r in batch] == [rec[0] for rec in expected]
        del batch
    cons.release()
    m.release()
    assert not m.published
    assert ring.stats().used_bytes == 0 and m.used == 0
    check_stats(ring, m)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.sampled_from(CAPACITIES),
    start=st.integers(0, 2**40),
    program=st.lists(ops, min_size=10, max_size=200),
)
def test_model(capacity: int, start: int, program: list[tuple[Any, ...]]) -> None:
    """Random pushes/flushes/pops/releases match the model, from an arbitrary start index."""
    spec = create_ring("model", capacity)
    ring = Ring.attach(spec)
    try:
        start *= 8
        ring._q[8] = ring._q[16] = start  # write and read index: as if after `start` bytes
        run_ops(ring, capacity, program)
    finally:
        ring.close()
        close_spec(spec)


# --------------------------------------------------------------------------- wrap-around


@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("size", [0, 100, 1500, 9000, 30000, MAX_RECORD])
def test_wrap_with_pad(capacity: int, size: int) -> None:
    """Fill-drain cycles across the end of the data area: data intact, pads skipped, used 0."""
    spec = create_ring("wrap", capacity)
    ring = Ring.attach(spec)
    records = min(3 * capacity // slot(size) + 5, 3000)
    ring._q[8] = ring._q[16] = 5 * capacity - records * slot(size) // 16 * 8  # cross the end
    prod, cons = Producer(ring), Consumer(ring)
    seq = got = drops = 0
    while got < records:
        while seq - got < 1000:  # fill (up to 1000 records)
            if not prod.push(payload(seq, size)[:size], kind=seq % 255, peer=seq & 0xFFFF):
                drops += 1
                break
            seq += 1
        prod.flush()
        batch = cons.pop_batch(1 << 20)
        assert batch, "a full ring must yield records"
        for rec in batch:
            assert rec.kind == got % 255 and rec.peer == got & 0xFFFF
            assert rec.data == payload(got, size)[:size]
            got += 1
        del batch, rec
        cons.release()
        assert ring.stats().used_bytes == 0
    assert got == seq
    assert ring._q[16] > 5 * capacity, "the run crossed the end of the data area"
    s = ring.stats()
    assert s.frames_in == s.frames_out == seq and s.bytes_in == s.bytes_out == seq * size
    assert s.drops == drops and s.drop_bytes == drops * size
    assert drops > 0 or capacity > 1000 * slot(size), "big records must have hit a full ring"
    assert s.batches_in == s.batches_out
    ring.close()
    close_spec(spec)


def test_empty_ring_accepts_max_record_at_any_position() -> None:
    """With MIN_CAPACITY >= 2 max slots, an empty ring takes MAX_RECORD wherever it stands."""
    spec = create_ring("anypos", MIN_CAPACITY)
    ring = Ring.attach(spec)
    for pos in range(0, MIN_CAPACITY, 8 * 997):
        ring._q[8] = ring._q[16] = MIN_CAPACITY * 3 + pos
        prod, cons = Producer(ring), Consumer(ring)
        assert prod.fits(MAX_RECORD)
        assert prod.push(bytes(MAX_RECORD))
        prod.flush()
        batch = cons.pop_batch(2)
        assert len(batch) == 1 and len(batch[0].data) == MAX_RECORD
        del batch
        cons.release()
    bell_count(ring.bell_fd)
    ring.close()
    close_spec(spec)


def test_pad_record_layout(ring: Ring) -> None:
    """A record that doesn't fit before the end goes to 0 behind a kind-255 pad header."""
    cap = ring.capacity
    ring._q[8] = ring._q[16] = cap - 24  # 24 bytes before the end
    prod, cons = Producer(ring), Consumer(ring)
    assert prod.push(b"x" * 17, kind=3)  # slot 32 > 24: pad 24 + 32
    prod.flush()
    assert ring.stats().used_bytes == 24 + 32
    pad = bytes(ring._mv[HEADER_SIZE + cap - 24 : HEADER_SIZE + cap - 16])
    assert pad[4] == PAD_KIND and int.from_bytes(pad[:4], "little") == 16
    assert bytes(ring._mv[HEADER_SIZE : HEADER_SIZE + 8])[:5] == b"\x11\0\0\0\x03"
    [rec] = cons.pop_batch(10)
    assert rec == RingRecord(3, 0, 0, memoryview(b"x" * 17)) and isinstance(rec.data, memoryview)
    del rec
    cons.release()
    assert ring.stats().used_bytes == 0


def test_full_is_drop_not_block(ring: Ring) -> None:
    prod = Producer(ring)
    n = 0
    while prod.push(bytes(1500)):
        n += 1
    assert n == ring.capacity // slot(1500)
    assert not prod.push(bytes(1500)) and not prod.fits(1500)
    assert prod.push(b""), "the 568 bytes left still take a small record"
    prod.flush()
    s = ring.stats()
    assert (s.drops, s.drop_bytes, s.frames_in) == (2, 3000, n + 1)


def test_exact_fill(ring: Ring) -> None:
    """Records that end exactly at the end of the data area and exactly fill the ring."""
    prod, cons = Producer(ring), Consumer(ring)
    size = ring.capacity // 4 - 8  # slot == capacity / 4
    assert all(prod.push(payload(i, size)[:size]) for i in range(4))
    assert not prod.push(b""), "completely full: not even an empty record"
    prod.flush()
    assert ring.stats().used_bytes == ring.capacity
    batch = cons.pop_batch(1)
    assert batch[0].data == payload(0, size)[:size]
    del batch
    cons.release()
    assert prod.push(payload(4, size)[:size]) and not prod.push(b"")
    prod.flush()
    assert [bytes(r.data) for r in cons.pop_batch(10)] == [
        payload(i, size)[:size] for i in range(1, 5)
    ]


# --------------------------------------------------------------------------- doorbell


def test_doorbell_rings_once_on_empty_to_nonempty(ring: Ring) -> None:
    prod, cons = Producer(ring), Consumer(ring)
    prod.flush()
    assert bell_count(ring.bell_fd) == 0, "nothing published: no ring"
    prod.push(b"a")
    prod.flush()
    assert bell_count(ring.bell_fd) == 1
    prod.push(b"b")
    prod.flush()
    assert bell_count(ring.bell_fd) == 0, "already non-empty: no ring"
    assert len(cons.pop_batch(10)) == 2
    prod.push(b"c")
    prod.flush()
    assert bell_count(ring.bell_fd) == 0, "popped but not released: consumer is awake"
    cons.release()
    prod.flush()
    assert bell_count(ring.bell_fd) == 0
    assert len(cons.pop_batch(10)) == 1
    cons.release()
    prod.push(b"d")
    prod.push(b"e")
    prod.flush()
    assert bell_count(ring.bell_fd) == 1, "drained again: ring again, once per flush"


def test_wait_ready(ring: Ring) -> None:
    prod, cons = Producer(ring), Consumer(ring)
    assert cons.wait_ready() is False
    prod.push(b"a")
    assert cons.wait_ready() is False, "pushed but not flushed is not ready"
    prod.flush()
    assert cons.wait_ready() is True
    assert bell_count(cons.bell_fd) == 0, "wait_ready cleared the bell"
    assert len(cons.pop_batch(5)) == 1
    assert cons.wait_ready() is False
    assert ring.stats().used_bytes == 0, "wait_ready released the read index"
    cons.clear_bell()  # nothing pending: no error
    prod.push(b"b")
    prod.flush()
    cons.clear_bell()
    assert cons.wait_ready() is True, "bell cleared but data present: must not sleep"


def test_bell_fd_polls(ring: Ring) -> None:
    import select

    prod, cons = Producer(ring), Consumer(ring)
    poller = select.poll()
    poller.register(cons.bell_fd, select.POLLIN)
    assert not cons.wait_ready() and poller.poll(0) == []
    prod.push(b"x")
    prod.flush()
    assert poller.poll(0) == [(cons.bell_fd, select.POLLIN)]


# --------------------------------------------------------------------------- zero-copy reserve


def test_reserve_commit(ring: Ring) -> None:
    prod, cons = Producer(ring), Consumer(ring)
    view = prod.reserve(MAX_RECORD)
    assert view is not None and len(view) == MAX_RECORD
    view[:5] = b"hello"
    del view
    prod.commit(5, kind=7, peer=300, flags=2)
    assert prod.push(b"after")
    prod.flush()
    batch = cons.pop_batch(10)
    assert [(r.kind, r.peer, r.flags, bytes(r.data)) for r in batch] == [
        (7, 300, 2, b"hello"),
        (0, 0, 0, b"after"),
    ]
    del batch
    with pytest.raises(ValueError):
        prod.commit(1)  # no reservation outstanding
    with pytest.raises(ValueError):
        prod.reserve(MAX_RECORD + 1)


def test_push_parts_is_a_push_of_the_concatenation(ring: Ring) -> None:
    prod, cons = Producer(ring), Consumer(ring)
    assert prod.push_parts([b"head", memoryview(b"-and-"), bytearray(b"tail")], 2, 9, 1)
    assert prod.push_parts([], 3)
    big = bytes(MAX_RECORD // 2)
    while prod.push_parts([big, big]):
        pass  # until full: a counted drop, as push's
    assert ring.stats().drops == 0  # published by flush only
    prod.flush()
    assert ring.stats().drops == 1 and ring.stats().drop_bytes == MAX_RECORD
    batch = cons.pop_batch(2)
    assert [(r.kind, r.peer, r.flags, bytes(r.data)) for r in batch] == [
        (2, 9, 1, b"head-and-tail"),
        (3, 0, 0, b""),
    ]
    del batch
    with pytest.raises(ValueError):
        prod.push_parts([big, big, b"x"])


def test_push_cut_is_a_push_of_the_parts_without_their_headers(ring: Ring) -> None:
    """Whole packets in, copied last to first: the record is the lead, then each packet but
    its first ``skip`` bytes; across the ring's end too (the record goes whole after it)."""
    prod, cons = Producer(ring), Consumer(ring)
    packets = [bytes([i]) * 4 + payload(i, n) for i, n in enumerate([30, 30, 30, 7])]
    lead = [b"vnet-hdr", memoryview(b"HEAD")]
    expected = b"vnet-hdrHEAD" + b"".join(p[4:] for p in packets)
    for i in range(3):
        if i == 2:  # from near the end of the ring: the record wraps to its start
            ring._q[8] = ring._q[16] = ring.capacity - 40
            prod, cons = Producer(ring), Consumer(ring)
        assert prod.push_cut(lead, packets, 4, 2, 9, 1)
        assert prod.push_cut([b"only"], [], 4, 3)
        prod.flush()
        batch = cons.pop_batch(2)
        assert [(r.kind, r.peer, r.flags, bytes(r.data)) for r in batch] == [
            (2, 9, 1, expected),
            (3, 0, 0, b"only"),
        ]
        del batch
        cons.release()
    big = bytes(MAX_RECORD // 2)
    while prod.push_cut([b"head"], [big], 4):
        pass  # until full: a counted drop, as push's
    prod.flush()
    assert ring.stats().drops == 1 and ring.stats().drop_bytes == MAX_RECORD // 2
    with pytest.raises(ValueError):
        prod.push_cut([big], [big, big, b"xxxxx"], 4)


def test_reserve_wraps_and_full(ring: Ring) -> None:
    cap = ring.capacity
    ring._q[8] = ring._q[16] = cap - 1000
    prod, cons = Producer(ring), Consumer(ring)
    view = prod.reserve(2000)  # does not fit the last 1000 bytes: goes to position 0
    assert view is not None
    view[:3] = b"abc"
    del view
    prod.commit(3)
    prod.flush()
    assert ring.stats().used_bytes == 1000 + 16
    [rec] = cons.pop_batch(5)
    assert bytes(rec.data) == b"abc"
    del rec
    while prod.push(bytes(9000)):
        pass
    drops = prod._drops
    assert prod.reserve(9000) is None and prod._drops == drops, "reserve None counts nothing"


# --------------------------------------------------------------------------- errors, lifecycle


@pytest.mark.parametrize("size", [MAX_RECORD + 1, 10**6])
def test_oversize_record_raises(ring: Ring, size: int) -> None:
    prod = Producer(ring)
    with pytest.raises(ValueError):
        prod.push(bytes(size))
    with pytest.raises(ValueError):
        prod.fits(size)
    prod.flush()
    assert ring.stats().drops == 0


@pytest.mark.parametrize(
    "kind,peer,flags", [(PAD_KIND, 0, 0), (256, 0, 0), (-1, 0, 0), (0, 0x10000, 0), (0, 0, 256)]
)
def test_bad_header_fields_raise(ring: Ring, kind: int, peer: int, flags: int) -> None:
    prod, cons = Producer(ring), Consumer(ring)
    with pytest.raises(ValueError):
        prod.push(b"abc", kind, peer, flags)
    assert prod.push(b"ok")
    prod.flush()
    assert [bytes(r.data) for r in cons.pop_batch(5)] == [b"ok"]


@pytest.mark.parametrize(
    "capacity", [0, 1000, MIN_CAPACITY // 2, MIN_CAPACITY + 8, 3 << 18, MAX_CAPACITY * 2]
)
def test_bad_capacity(capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        create_ring("bad", capacity)


def test_attach_bad_magic() -> None:
    fd = os.memfd_create("notaring", os.MFD_CLOEXEC)
    os.ftruncate(fd, HEADER_SIZE + MIN_CAPACITY)
    spec = RingSpec("notaring", fd, os.eventfd(0, os.EFD_NONBLOCK))
    with pytest.raises(RingError, match="bad magic"):
        Ring.attach(spec)
    assert issubclass(RingError, StageIOError)
    close_spec(spec)


def test_attach_wrong_version_and_size(spec: RingSpec) -> None:
    with mmap.mmap(spec.mem_fd, HEADER_SIZE) as mm:
        mm[8:16] = (99).to_bytes(8, "little")
    with pytest.raises(RingError, match="version"):
        Ring.attach(spec)
    small = os.memfd_create("small", os.MFD_CLOEXEC)
    with pytest.raises(RingError, match="too small"):
        Ring.attach(RingSpec("small", small, spec.bell_fd))
    os.close(small)
    with pytest.raises(RingError, match="unusable"):
        Ring.attach(RingSpec("gone", 999_999, spec.bell_fd))


def test_memfd_is_sealed_and_fds_not_inheritable(spec: RingSpec) -> None:
    assert not os.get_inheritable(spec.mem_fd) and not os.get_inheritable(spec.bell_fd)
    assert os.fstat(spec.mem_fd).st_size == HEADER_SIZE + MIN_CAPACITY
    with pytest.raises(PermissionError):
        os.ftruncate(spec.mem_fd, 4096)  # a buggy worker cannot SIGBUS the others
    seals = fcntl.fcntl(spec.mem_fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
    assert RingSpec(*json.loads(json.dumps(spec))) == spec


def test_stats_from_another_mapping_and_restart(spec: RingSpec) -> None:
    """The supervisor's own mapping sees published counters; a restarted end resumes."""
    worker, supervisor = Ring.attach(spec), Ring.attach(spec)
    prod, cons = Producer(worker), Consumer(worker)
    for i in range(10):
        prod.push(bytes(i))
    assert read_stats(supervisor).frames_in == 0, "not flushed yet"
    prod.flush()
    assert len(cons.pop_batch(4)) == 4
    cons.release()
    s = read_stats(supervisor)
    assert isinstance(s, RingStats)
    assert s == RingStats(
        "test>ring", MIN_CAPACITY, sum(map(slot, range(4, 10))), 10, 45, 0, 0, 4, 6, 1, 1
    )
    prod2, cons2 = Producer(supervisor), Consumer(supervisor)  # "restarted" workers
    prod2.push(b"z")
    prod2.flush()
    assert [bytes(r.data) for r in cons2.pop_batch(100)] == [bytes(i) for i in range(4, 10)] + [
        b"z"
    ]
    cons2.release()
    s = read_stats(worker)
    assert (s.frames_in, s.frames_out, s.batches_in, s.batches_out, s.used_bytes) == (
        11, 11, 2, 2, 0,
    )  # fmt: skip
    supervisor.close()
    worker.close()


def test_close_with_live_views(spec: RingSpec) -> None:
    """close() never raises (it runs in finally blocks); live views defer the unmap."""
    ring = Ring.attach(spec)
    prod, cons = Producer(ring), Consumer(ring)
    prod.push(b"abc")
    prod.flush()
    batch = cons.pop_batch(1)
    ring.close()
    assert not ring._mm.closed and bytes(batch[0].data) == b"abc"
    with pytest.raises((ValueError, TypeError)):
        prod.push(b"x")  # the ring's own views are released: use after close fails loudly
    with pytest.raises((ValueError, TypeError)):
        cons.pop_batch(1)
    del batch
    ring.close()
    assert ring._mm.closed


def test_corrupt_length_detected(ring: Ring) -> None:
    prod, cons = Producer(ring), Consumer(ring)
    prod.push(b"abcd")
    prod.flush()
    ring._mv[HEADER_SIZE : HEADER_SIZE + 4] = (5000).to_bytes(4, "little")
    with pytest.raises(RingError, match="corrupt"):
        cons.pop_batch(10)


# --------------------------------------------------------------------------- back-pressure


@given(
    sizes=st.lists(st.integers(0, MAX_RECORD), min_size=1, max_size=40),
    start=st.integers(0, MIN_CAPACITY // 8),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_batch_within_room_always_fits(sizes: list[int], start: int) -> None:
    """The back-pressure contract: records whose slots add up to at most ``room()`` are all
    accepted, wherever the indices stand (a wrap's pad included)."""
    spec = create_ring("room", MIN_CAPACITY)
    ring = Ring.attach(spec)
    try:
        ring._q[8] = ring._q[16] = start * 8
        prod, cons = Producer(ring), Consumer(ring)
        prod.push(b"x" * (sizes[0] % 5000))  # something already waiting
        prod.flush()
        room = prod.room()
        batch = []
        for n in sizes:
            if sum(slot_bytes(m) for m in batch) + slot_bytes(n) > room:
                break
            batch.append(n)
        for n in batch:
            assert prod.push(bytes(n)), f"{n} bytes refused within room {room}"
        assert ring.stats().drops == 0
        del cons
    finally:
        ring.close()
        close_spec(spec)


def test_pop_batch_stops_at_max_bytes(ring: Ring) -> None:
    """``max_bytes`` counts slots and stops before the record that would pass it; what is
    left waits (``pending``), in order; a budget below the first record pops nothing."""
    prod, cons = Producer(ring), Consumer(ring)
    for i, n in enumerate([100, 3000, 64, 9000]):
        assert prod.push(payload(i, n)[:n], kind=i)
    prod.flush()
    assert cons.pop_batch(10, max_bytes=slot_bytes(100) - 1) == []
    assert cons.pending()
    first = cons.pop_batch(10, max_bytes=slot_bytes(100) + slot_bytes(3000) + slot_bytes(64) - 1)
    assert [r.kind for r in first] == [0, 1]
    rest = cons.pop_batch(10, max_bytes=1 << 20)
    assert [r.kind for r in rest] == [2, 3]
    assert not cons.pending()
    assert cons.pop_batch(10, max_bytes=-5) == []
