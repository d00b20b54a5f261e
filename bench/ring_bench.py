"""Throughput of pipeline.shm_ring: a producer child process, a consumer parent process.

Usage (from the repo root)::

    python bench/ring_bench.py [--capacity BYTES] [--runs 3] [--batch 64] [--sizes 64,1500]

For each record size the child pushes N records in batches (flush every ``--batch``; when
the ring is full it flushes and yields until there is room, so nothing is lost) and the
parent pops batches of ``--batch`` and releases each, sleeping on the doorbell when the ring
is empty, exactly like a pipeline stage. The consumer reads records in place and touches
nothing (``--touch``: it copies each one out), so this measures the ring, not the work.
Time runs from the first record the parent sees to the end marker; the table shows the
median of ``--runs`` runs ("full": pushes refused because the ring was full, then retried;
"sleeps": consumer waits on the doorbell).
A second table shows the per-record cost of each side alone (one process, no contention).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.shm_ring import (  # noqa: E402
    Consumer,
    Producer,
    Ring,
    RingSpec,
    close_spec,
    create_ring,
)

END_KIND = 254
RECORDS = {64: 1_000_000, 1500: 600_000, 9000: 200_000, 65536: 30_000}


class Run(NamedTuple):
    size: int
    records: int
    seconds: float
    full_waits: int
    sleeps: int

    @property
    def rate(self) -> float:
        return self.records / self.seconds


def child(spec: RingSpec, size: int, n: int, batch: int) -> None:
    """Producer side: push ``n`` records of ``size`` bytes, flush every ``batch``."""
    prod = Producer(Ring.attach(spec))
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    push, flush, yield_ = prod.push, prod.flush, os.sched_yield
    for _ in range(n // batch):
        for _ in range(batch):
            while not push(data):  # full: publish what we have, let the consumer run
                flush()
                yield_()
        flush()
    flush()
    while not push(b"", END_KIND):
        yield_()
    flush()


def consume(
    cons: Consumer, batch: int, proc: subprocess.Popen[bytes], touch: bool
) -> tuple[int, float, int]:
    """Pop until the end marker; returns (records, seconds since the first record, sleeps).

    ``touch``: copy every record out (pulls its bytes across cores, as real work would).
    """
    poller = select.poll()
    poller.register(cons.bell_fd, select.POLLIN)
    pop, release = cons.pop_batch, cons.release
    count = sleeps = 0
    t0 = 0.0
    while True:
        recs = pop(batch)
        if recs:
            if not count:
                t0 = time.perf_counter()
            count += len(recs)
            if touch:
                for rec in recs:
                    bytes(rec.data)
                del rec
            if recs[-1].kind == END_KIND:
                elapsed = time.perf_counter() - t0
                del recs
                release()
                return count - 1, elapsed, sleeps
            del recs
            release()
        elif not cons.wait_ready():
            sleeps += 1
            if not poller.poll(100) and proc.poll() is not None:
                raise RuntimeError(f"producer exited with {proc.returncode}")


def run_once(size: int, n: int, batch: int, capacity: int, touch: bool) -> Run:
    spec = create_ring(f"bench{size}", capacity)
    ring = Ring.attach(spec)
    args = [sys.executable, __file__, "--child", json.dumps(spec), str(size), str(n), str(batch)]
    proc = subprocess.Popen(args, pass_fds=(spec.mem_fd, spec.bell_fd))
    try:
        count, seconds, sleeps = consume(Consumer(ring), batch, proc, touch)
        assert proc.wait(timeout=60) == 0, "producer failed"
        assert count == n // batch * batch, (count, n)
        return Run(size, count, seconds, ring.stats().drops, sleeps)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        ring.close()
        close_spec(spec)


def one_process_costs(size: int, batch: int, capacity: int) -> tuple[float, float]:
    """Microseconds per record of push+flush and of pop+release, same process, no contention."""
    spec = create_ring("solo", capacity)
    ring = Ring.attach(spec)
    prod, cons = Producer(ring), Consumer(ring)
    data = bytes(size)
    per_batch = min(batch, capacity // (size + 16) - 1)
    rounds = max(200, 200_000 // per_batch // max(1, size // 1500))
    t_push = t_pop = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            prod.push(data)
        prod.flush()
        t1 = time.perf_counter()
        recs = cons.pop_batch(per_batch)
        cons.release()
        t2 = time.perf_counter()
        assert len(recs) == per_batch
        del recs
        t_push += t1 - t0
        t_pop += t2 - t1
    ring.close()
    close_spec(spec)
    total = rounds * per_batch
    return t_push / total * 1e6, t_pop / total * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--capacity", type=int, default=1 << 23, help="ring data bytes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sizes", default=",".join(map(str, RECORDS)))
    ap.add_argument("--touch", action="store_true", help="consumer copies each record out")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply record counts")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        spec_json, size, n, batch = opts.child
        child(RingSpec(*json.loads(spec_json)), int(size), int(n), int(batch))
        return
    sizes = [int(s) for s in opts.sizes.split(",")]
    what = "copies each record out" if opts.touch else "pops in place, touches nothing"
    print(f"ring {opts.capacity} B, batch {opts.batch}, median of {opts.runs} runs,")
    print(f"producer child -> consumer parent; the consumer {what}")
    print(f"{'size':>6} {'records/s':>12} {'MB/s':>9} {'runs (records/s)':>36} {'full':>7}", end="")
    print(f" {'sleeps':>6}")
    for size in sizes:
        n = int(RECORDS.get(size, 200_000) * opts.scale)
        runs = sorted(
            (run_once(size, n, opts.batch, opts.capacity, opts.touch) for _ in range(opts.runs)),
            key=lambda r: r.rate,
        )
        med = runs[len(runs) // 2]
        each = " ".join(f"{r.rate:,.0f}" for r in runs)
        print(
            f"{size:>6} {med.rate:>12,.0f} {med.rate * size / 1e6:>9,.0f} {each:>36}"
            f" {med.full_waits:>7} {med.sleeps:>6}"
        )
    print("\none process, no contention (us per record, amortised over the batch)")
    print(f"{'size':>6} {'push+flush':>11} {'pop+release':>12}")
    for size in sizes:
        push_us, pop_us = one_process_costs(size, opts.batch, opts.capacity)
        print(f"{size:>6} {push_us:>11.3f} {pop_us:>12.3f}")


if __name__ == "__main__":
    main()
