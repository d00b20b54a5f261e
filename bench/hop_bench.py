"""What one ring hop to a sleeping worker costs: the floor under autovn's ping RTT.

A packet crosses six workers each way between two nodes (tap_reader, classifier, overlay_io;
overlay_io, classifier, tap_reader) and, in a ping at 10 ms, finds each of them asleep on its
doorbell. This bench bounces one small record between two processes over two
``pipeline.shm_ring`` rings, each side sleeping in ``epoll`` on its ring's doorbell after
the pre-sleep check (``Consumer.wait_ready``), exactly as a stage does, and reports the
one-way hop (half the round trip): with ``--gap`` seconds of sleep between bounces (both
sides asleep when a record comes: what a ping meets) and back to back (``--gap 0``: the
other side may still be awake). Beside it, the CPU the echoing process uses per bounce
(``/proc/PID/schedstat``: its time on a CPU, in ns): what one visit to a sleeping worker
costs with next to no work in it (woken, one record popped and pushed, the doorbell rung,
asleep again).

Usage (from the repo root)::

    python3 bench/hop_bench.py [--bounces 2000] [--gaps 0.01,0]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.shm_ring import Consumer, Producer, Ring, RingSpec, close_spec, create_ring  # noqa: E402

STOP_KIND = 254


def _wait(cons: Consumer, ep: select.epoll) -> None:
    """Sleep on the doorbell until a record is there (a stage's pre-sleep check first)."""
    while not cons.wait_ready():
        ep.poll(1.0)
        if cons.pending():
            return


def echo(out_spec: RingSpec, in_spec: RingSpec) -> None:
    """The child: send every record back, until the stop record."""
    cons, prod = Consumer(Ring.attach(in_spec)), Producer(Ring.attach(out_spec))
    ep = select.epoll()
    ep.register(cons.bell_fd, select.EPOLLIN)
    while True:
        recs = cons.pop_batch(1)
        if not recs:
            _wait(cons, ep)
            continue
        kind, data = recs[0].kind, bytes(recs[0].data)
        del recs
        cons.release()
        if kind == STOP_KIND:
            return
        prod.push(data)
        prod.flush()


def _on_cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU (the scheduler's own count, not ticks)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def bounce(bounces: int, gap: float) -> tuple[list[float], float]:
    """One-way hop times (s) of ``bounces`` round trips, ``gap`` s apart, and the echoing
    process's CPU seconds per bounce."""
    there, back = create_ring("hop-there", 1 << 18), create_ring("hop-back", 1 << 18)
    prod, cons = Producer(Ring.attach(there)), Consumer(Ring.attach(back))
    argv = [sys.executable, __file__, "--child", json.dumps(back), json.dumps(there)]
    fds = (there.mem_fd, there.bell_fd, back.mem_fd, back.bell_fd)
    proc = subprocess.Popen(argv, pass_fds=fds)
    ep = select.epoll()
    ep.register(cons.bell_fd, select.EPOLLIN)
    hops: list[float] = []
    payload = bytes(100)
    cpu0 = 0
    try:
        for i in range(bounces + 50):  # the first 50 warm up
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            prod.push(payload)
            prod.flush()
            while not (recs := cons.pop_batch(1)):
                _wait(cons, ep)
                if proc.poll() is not None:
                    raise RuntimeError(f"echo child exited with {proc.returncode}")
            t1 = time.perf_counter()
            del recs
            cons.release()
            if i >= 50:
                hops.append((t1 - t0) / 2)
            elif i == 49:
                cpu0 = _on_cpu_ns(proc.pid)
        cpu = (_on_cpu_ns(proc.pid) - cpu0) / 1e9 / bounces
        prod.push(b"", STOP_KIND)
        prod.flush()
        proc.wait(timeout=10)
        return hops, cpu
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for spec in (there, back):
            close_spec(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bounces", type=int, default=2000)
    ap.add_argument("--gaps", default="0.01,0", help="seconds between bounces, comma-separated")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        echo(RingSpec(*json.loads(opts.child[0])), RingSpec(*json.loads(opts.child[1])))
        return
    load = os.getloadavg()[0]
    print(f"one ring hop between two processes, 100-byte record, {opts.bounces} bounces each")
    print(
        f"{'gap s':>7} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8}  x12 hops (p50, ms)"
        "  echo CPU per visit us"
    )
    for gap in (float(g) for g in opts.gaps.split(",")):
        hops, cpu = bounce(opts.bounces, gap)
        hops.sort()
        q = statistics.quantiles(hops, n=100)
        p50, p90, p99 = (x * 1e6 for x in (statistics.median(hops), q[89], q[98]))
        print(
            f"{gap:>7g} {p50:>8.1f} {p90:>8.1f} {p99:>8.1f}  {12 * p50 / 1000:>18.3f}"
            f"  {cpu * 1e6:>21.1f}"
        )
    print(f"load average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after; 2 cores")


if __name__ == "__main__":
    main()
