"""Cost per packet of overlay_io's send and receive loops, in one process, old code against new.

Usage (from the repo root)::

    python bench/overlay_io_bench.py [--packets 100000] [--repeats 5] [--sizes 64,1400]
                                     [--modes enc,plain] [--before REV] [--after DIR]

An ``OverlayIoWorker`` runs in a child process with real shm rings and an in-memory port of
this script's own (the same for both trees: sends are counted, not copied; a datagram to
receive is copied into the port's buffer, as ``recvfrom_into`` does), and no ZeroMQ. Two
loops are timed, each over ``--packets`` packets of each size:

- **send**: IP packets pushed into the classifier -> overlay_io ring (untimed, 1024 at a
  time), then ``work()`` called until every one has been sealed and handed to the port
  (timed): ``_seal_and_send``;
- **recv**: datagrams sealed for the worker (untimed, 1024 at a time) waiting in the port,
  then ``work()`` called until every one has been opened and pushed to the classifier ring
  (timed): the receive and open loop. The classifier ring is drained between rounds.

``enc`` installs one confirmed session (``SessionKeys``), ``plain`` a plaintext peer
(``security.insecure_plaintext``, the route snapshot). ``--before`` (default: the branch's
base, ``deed5bd``) is exported with ``git archive`` into a temporary directory; ``--after``
is the working tree. Each repeat runs both trees one after the other, in alternating order,
each in a fresh interpreter. Time is the worker thread's CPU time (``time.thread_time_ns``),
so that other processes of a shared machine are not counted, only their effect on caches.
The table shows ns per packet, the median of ``--repeats`` runs (``min`` beside it: the
least disturbed run), and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 1024
PEER = ("198.18.0.2", 4789)
KEY_IN, KEY_OUT = bytes(range(32)), bytes(range(1, 33))
RECV_INDEX, SEND_INDEX = 0x1234, 0x5678


# -- the child: one tree, one mode, one size ---------------------------------------------------


class BenchPort:
    """``UdpPort``'s interface: sends are counted, datagrams to receive come from a list."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.buffer = bytearray(65536 + 64)
        self.view = memoryview(self.buffer)
        self.send_errors = 0
        self.sent = 0
        self.inbox: list[bytes] = []
        self.next = 0
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def recv(self) -> tuple[int, tuple[str, int]] | None:
        if self.next >= len(self.inbox):
            return None
        datagram = self.inbox[self.next]
        self.next += 1
        size = len(datagram)
        self.view[:size] = datagram
        return size, PEER

    def send(self, parts: Any, address: tuple[str, int]) -> bool:
        self.sent += 1
        return True

    # what a tree with UDP offloads asks too (they stay off here: one datagram a call)
    gso = gro = False

    def recv_batch(self) -> tuple[int, tuple[str, int], int] | None:
        got = self.recv()
        return None if got is None else (got[0], got[1], got[0])

    def send_segments(self, parts: Any, size: int, address: tuple[str, int]) -> int:
        self.sent += len(parts) // 2
        return len(parts) // 2

    def close(self) -> None:
        os.close(self.fd)


class BenchFeed:
    """``RouteFeed``'s interface without ZeroMQ."""

    def __init__(self, worker: object, on_snapshot: Any, on_message: Any = None) -> None:
        self.on_snapshot = on_snapshot
        self.on_message = on_message
        self.told = 0

    def tell(self, msg: object) -> None:
        self.told += 1


def child(mode: str, size: int, packets: int) -> dict[str, float]:
    import logging

    import structlog

    import pipeline
    import pipeline.worker
    from pipeline import messages, shm_ring
    from pipeline.config import settings_from_mapping
    from pipeline.crypto.cert import make_ca, to_pem
    from pipeline.crypto.datapath import SendSession
    from pipeline.crypto.identity import Identity
    from pipeline.overlay_io import stage
    from pipeline.records import RecordKind
    from pipeline.shm_ring import Consumer, Producer, Ring
    from pipeline.topology import RingEdge, Stage, WorkerId
    from pipeline.wire.overlay import DatagramType, build_header

    try:
        from pipeline.topology import Lane  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # a tree from before the handshake lane
        Lane = None  # type: ignore[assignment,misc,unused-ignore]  # noqa: N806

    print(f"pipeline from {Path(pipeline.__file__).parent.parent}", file=sys.stderr)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    # as the old tree takes no port argument, both trees get theirs by patching the module
    vars(pipeline.worker)["configure_logging"] = lambda **kw: structlog.get_logger()
    vars(stage)["UdpPort"] = BenchPort
    vars(stage)["RouteFeed"] = BenchFeed

    tmp = Path(tempfile.mkdtemp(prefix="overlay-io-bench-"))
    ca = make_ca(
        Identity.from_seed(bytes(32)), name="ca", not_before=0, not_after=1 << 40, serial=1
    )
    (tmp / "ca").write_text(to_pem(ca))  # overlay_io screens handshakes with its key
    security: dict[str, Any] = (
        {"insecure_plaintext": True} if mode == "plain" else {"ca_certificate": str(tmp / "ca")}
    )
    settings = settings_from_mapping(
        {
            "node": {"name": "alpha", "state_dir": str(tmp), "runtime_dir": str(tmp)},
            "network": {"namespace": "lab", "subnet": "100.64.0.0/24", "address": "100.64.0.1"},
            "security": security,
            "overlay": {"listen_address": "198.18.0.1"},
        }
    )
    io, cls, ctl = (
        WorkerId(Stage.OVERLAY_IO, 0),
        WorkerId(Stage.CLASSIFIER, 0),
        WorkerId(Stage.CONTROL, 0),
    )
    edges = {
        "in": RingEdge(cls, io, 0),
        "out": RingEdge(io, cls, 0),
        "ctl_in": RingEdge(ctl, io, 0),
        "ctl_out": RingEdge(io, ctl, 0),
    }
    if Lane is not None:  # the tree has a handshake lane (else it is not there to make)
        edges["hs_out"] = RingEdge(io, ctl, 0, Lane.HANDSHAKE)
    specs = {k: shm_ring.create_ring(e.name, 1 << 22) for k, e in edges.items()}
    worker = stage.OverlayIoWorker(settings, 0, {s.name: s for s in specs.values()})
    worker.setup()
    port = worker.port
    feed = worker.routes
    assert isinstance(port, BenchPort) and isinstance(feed, BenchFeed)
    if mode == "plain":
        peer = messages.PeerRoute(1, "beta", ("100.64.0.2",), f"{PEER[0]}:{PEER[1]}", True)
        feed.on_snapshot(messages.RouteSnapshot(1, 1, (peer,)))
    else:
        entry = messages.KeyEntry(
            slot=1,
            recv_index=RECV_INDEX,
            recv_key=KEY_IN,
            send_index=SEND_INDEX,
            send_key=KEY_OUT,
            counter_start=0,
            created=time.monotonic(),
            confirmed=True,
            endpoint=f"{PEER[0]}:{PEER[1]}",
            node_id=b"\x01" * 20,
        )
        feed.on_message(messages.SessionKeys(1, (entry,), b"\x02" * 20))
    to_io = Producer(Ring.attach(specs["in"]))
    from_io = Consumer(Ring.attach(specs["out"]))
    packet = bytes(range(256)) * (size // 256) + bytes(size % 256)
    work = worker.work
    clock = time.thread_time_ns  # CPU time: a shared machine's other work is not counted

    # send: the classifier's packets sealed and sent
    elapsed = 0
    done = 0
    while done < packets:
        k = min(CHUNK, packets - done)
        for _ in range(k):
            to_io.push(packet, RecordKind.IP_PACKET, 1)
        to_io.flush()
        target = done + k
        t0 = clock()
        while port.sent < target:
            work()
        elapsed += clock() - t0
        done = target
    send_ns = elapsed / packets
    assert port.sent == packets, (port.sent, packets)

    # recv: datagrams opened and pushed to the classifier
    sealer = SendSession(KEY_IN, index=RECV_INDEX, created=0.0)
    header = build_header(DatagramType.DATA)
    elapsed = 0
    done = got = 0
    while done < packets:
        k = min(CHUNK, packets - done)
        if mode == "plain":
            port.inbox = [header + packet] * k
        else:
            port.inbox = [b"".join(sealer.seal(DatagramType.DATA, packet)) for _ in range(k)]
        port.next = 0
        t0 = clock()
        while port.next < k:
            work()
        elapsed += clock() - t0
        done += k
        records = from_io.pop_batch(1 << 20)
        got += len(records)
        from_io.release()
    recv_ns = elapsed / packets
    stats = worker.stats()
    assert got == packets and stats["drops"] == {}, (got, stats)
    worker.teardown()
    return {"send": send_ns, "recv": recv_ns}


# -- the parent --------------------------------------------------------------------------------


def run_child(tree: Path, mode: str, size: int, packets: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, str(Path(__file__).resolve()), "--child"]
    argv += ["--modes", mode, "--sizes", str(size), "--packets", str(packets)]
    out = subprocess.run(
        argv, env=env, cwd=tree, check=True, capture_output=True, text=True, timeout=600
    )
    origin = out.stderr.strip().splitlines()[-1]
    assert origin == f"pipeline from {tree}", (origin, tree)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def export(rev: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "pipeline"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="64,1400")
    parser.add_argument("--modes", default="enc,plain")
    parser.add_argument("--before", default="deed5bd")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    if args.child:
        print(json.dumps(child(modes[0], sizes[0], args.packets)))
        return 0

    results: dict[tuple[str, str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="overlay-io-before-") as tmp:
        before = Path(tmp)
        export(args.before, before)
        trees = {"before": before, "after": args.after.resolve()}
        for r in range(args.repeats):
            for mode in modes:
                for size in sizes:
                    order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                    for name in order:
                        got = run_child(trees[name], mode, size, args.packets)
                        for direction, ns in got.items():
                            results.setdefault((name, mode, size, direction), []).append(ns)
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    print(
        f"overlay_io worker loops, ns per packet: median of {args.repeats} runs of "
        f"{args.packets} packets (min in brackets); before = {args.before}, after = "
        f"{args.after}"
    )
    print(f"{'mode':<6}{'size':>6}  {'loop':<5}{'before':>18}{'after':>18}{'after/before':>14}")
    for mode in modes:
        for size in sizes:
            for direction in ("send", "recv"):
                b = results[("before", mode, size, direction)]
                a = results[("after", mode, size, direction)]
                mb, ma = statistics.median(b), statistics.median(a)
                print(
                    f"{mode:<6}{size:>6}  {direction:<5}"
                    f"{mb:>10.0f} ({min(b):>5.0f}){ma:>10.0f} ({min(a):>5.0f}){ma / mb:>14.3f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
