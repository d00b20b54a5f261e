"""Two-process test of pipeline.shm_ring: a child produces, the parent sleeps on the doorbell.

The child is a fresh interpreter (``subprocess.Popen`` + ``pass_fds``, never fork) that gets
the ring's two fds, exactly as a pipeline worker would. Every record carries its sequence
number and a CRC of its body; the parent checks each arrives whole and in order, and that
every missing sequence number is accounted for by the ring's drop counters.
"""

from __future__ import annotations

import inspect
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.shm_ring import (
    MAX_RECORD,
    Consumer,
    Ring,
    RingRecord,
    RingSpec,
    close_spec,
    create_ring,
)

ROOT = Path(__file__).resolve().parent.parent
N = 200_000
END_KIND = 254
BACKSTOP_MS = 1000  # poll timeout: only a lost wake-up (or a stalled child) can hit it
DEADLINE_S = 25.0
SEQ_CRC = struct.Struct("<QI")


def record_size(seq: int) -> int:
    """Deterministic length of record ``seq``: mostly MTU-sized, some jumbo, a few ~64 KiB."""
    h = (seq * 2654435761) & 0xFFFFFFFF
    if h % 500 == 0:
        return 12 + h % (65600 - 12)
    if h % 10 == 0:
        return 12 + h % 9000
    return 12 + h % 1600


def make_record(seq: int, blob: bytes) -> bytes:
    """``seq u64 | crc32(body) u32 | body``, the body a seq-dependent slice of ``blob``."""
    start = seq % 4099
    body = blob[start : start + record_size(seq) - 12]
    return struct.pack("<QI", seq, zlib.crc32(body)) + body


CHILD_MAIN = """
def main() -> None:
    spec = RingSpec(*json.loads(sys.argv[1]))
    lossless, n = sys.argv[2] == "lossless", int(sys.argv[3])
    blob = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(70_000))
    prod = Producer(Ring.attach(spec))
    for seq in range(n):
        rec = make_record(seq, blob)
        if lossless and not prod.fits(len(rec)):
            prod.flush()
            while not prod.fits(len(rec)):
                time.sleep(0.0002)
        prod.push(rec, kind=seq % 200, peer=seq & 0xFFFF, flags=seq & 0xFF)
        if seq % 64 == 63:
            prod.flush()
        if seq % 4000 == 0:  # idle now and then: the consumer must sleep on the bell
            prod.flush()
            time.sleep(0.002)
    prod.flush()
    while not prod.fits(0):
        time.sleep(0.0002)
    prod.push(b"", kind=254)
    prod.flush()

main()
"""
CHILD_SRC = (
    "import json, struct, sys, time, zlib\n"
    "from pipeline.shm_ring import Producer, Ring, RingSpec\n"
    + inspect.getsource(record_size)
    + inspect.getsource(make_record)
    + CHILD_MAIN
)


def spawn_producer(spec: RingSpec, mode: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_SRC, json.dumps(spec), mode, str(N)],
        pass_fds=(spec.mem_fd, spec.bell_fd),
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )


@dataclass
class Tally:
    received: int = 0
    missing: int = 0
    missing_bytes: int = 0
    next_seq: int = 0
    sleeps: int = 0
    backstop_hits: int = 0
    done: bool = False


def tally_gap(t: Tally, seq: int) -> None:
    """Records t.next_seq .. seq-1 never arrived."""
    for gap in range(t.next_seq, seq):
        t.missing += 1
        t.missing_bytes += record_size(gap)


def check_batch(batch: list[RingRecord], t: Tally) -> None:
    """Verify a batch in place: order, length, header fields, checksum; tally any gap."""
    for rec in batch:
        kind, peer, flags, data = rec
        if kind == END_KIND:
            tally_gap(t, N)
            t.done = True
            return
        seq, crc = SEQ_CRC.unpack_from(data)
        assert seq >= t.next_seq, f"out of order: {seq} after {t.next_seq - 1}"
        tally_gap(t, seq)
        assert len(data) == record_size(seq), f"record {seq} has {len(data)} bytes"
        assert (kind, peer, flags) == (seq % 200, seq & 0xFFFF, seq & 0xFF)
        assert zlib.crc32(data[12:]) == crc, f"record {seq} corrupt"
        t.next_seq = seq + 1
        t.received += 1


def consume(cons: Consumer, proc: subprocess.Popen[bytes], stall_every: int) -> Tally:
    """The pipeline's consumer loop: pop/release while there is data, else sleep on the bell."""
    t = Tally()
    poller = select.poll()
    poller.register(cons.bell_fd, select.POLLIN)
    deadline = time.monotonic() + DEADLINE_S
    while not t.done:
        assert time.monotonic() < deadline, f"timed out after {t.received} records"
        batch = cons.pop_batch(64)
        if batch:
            check_batch(batch, t)
            del batch
            cons.release()
            if stall_every and t.received % stall_every < 64:
                time.sleep(0.02)  # a slow consumer: the producer must drop, not block
            continue
        if cons.wait_ready():
            continue
        t.sleeps += 1
        if not poller.poll(BACKSTOP_MS):
            if cons.wait_ready():
                t.backstop_hits += 1  # data published but no bell: a lost wake-up
            elif proc.poll() is not None:
                pytest.fail(f"producer exited ({proc.returncode}) without its end marker")
    cons.release()
    return t


def run_pair(capacity: int, mode: str, stall_every: int) -> tuple[Tally, Ring]:
    spec = create_ring(f"child>parent:{mode}", capacity)
    ring = Ring.attach(spec)
    proc = spawn_producer(spec, mode)
    try:
        tally = consume(Consumer(ring), proc, stall_every)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        close_spec(spec)
    return tally, ring


def check_accounting(t: Tally, ring: Ring) -> None:
    s = ring.stats()
    assert t.received + t.missing == N, "every record is either delivered or missing"
    assert (s.drops, s.drop_bytes) == (t.missing, t.missing_bytes), "missing == counted drops"
    assert s.frames_in == s.frames_out == t.received + 1  # + the end marker
    assert s.used_bytes == 0
    assert t.backstop_hits == 0, "a wake-up was lost (the poll backstop fired with data ready)"


@pytest.mark.timeout(60)
def test_lossless_with_backpressure() -> None:
    """Big ring, producer waits on fits(): all N records arrive, in order, no drops."""
    tally, ring = run_pair(1 << 22, "lossless", stall_every=0)
    try:
        check_accounting(tally, ring)
        assert tally.missing == 0 and tally.received == N
        assert tally.sleeps > 0, "the consumer should have slept on the doorbell"
    finally:
        ring.close()


@pytest.mark.timeout(60)
def test_lossy_small_ring_counts_drops() -> None:
    """Small ring and a consumer that stalls: drops happen and each one is counted exactly."""
    tally, ring = run_pair(1 << 18, "lossy", stall_every=20_000)
    try:
        check_accounting(tally, ring)
        assert tally.missing > 0, "the stalls should have overflowed the ring"
        assert tally.received > N // 10
    finally:
        ring.close()


def test_record_size_range() -> None:
    sizes = [record_size(s) for s in range(N)]
    assert min(sizes) >= 12 and max(sizes) <= MAX_RECORD and max(sizes) > 60_000
