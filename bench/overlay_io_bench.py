"""Cost per packet of overlay_io's send and receive loops, in one process, old code against new.

Usage (from the repo root)::

    python bench/overlay_io_bench.py [--packets 100000] [--repeats 5] [--sizes 64,1400]
                                     [--modes enc,plain,tso] [--gso-size 1348] [--segments 45]
                                     [--before REV] [--after DIR]
                                     [--cipher NAME] [--before-cipher NAME]

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
(``security.insecure_plaintext``, the route snapshot). ``tso`` is ``enc`` with super-frames and
the port's UDP offloads on, timed per TCP *segment* (``--sizes`` does not apply):

- **send**: TCP super-frames (``FLAG_VNET`` records with a ``GSO_TCPV4`` virtio-net header, as
  the classifier pushes them: ``--segments`` segments of ``--gso-size`` payload bytes each,
  TCP timestamps on) cut, sealed and handed to the port in one ``send_segments`` a frame;
- **recv**: GRO reads, each ``--segments`` sealed DATA datagrams (``FLAG_PARTIAL``) of one
  session with consecutive counters, as the peer's GSO batch arrives, opened and coalesced
  into one super-frame record a read (checked: the frame the peer cut, byte for byte).

The default 45 segments of 1348 bytes is what one ``sendmsg`` and one GRO read hold (45
sealed datagrams of 1432 bytes: 64 440 bytes). ``--before`` (default: ``main``) is exported
with ``git archive`` into a temporary directory; ``--after`` is the working tree. Each repeat
runs both trees one after the other, in alternating order, each in a fresh interpreter. Time
is the worker thread's CPU time (``time.thread_time_ns``), so that other processes of a shared
machine are not counted, only their effect on caches.
``--cipher`` is the data cipher of the session ``enc`` and ``tso`` install in the after tree
(``aes-256-gcm`` or ``chacha20-poly1305``, the default), ``--before-cipher`` the before
tree's (a tree from before the negotiation knows only ``chacha20-poly1305``); with
``--before HEAD`` the two columns compare the ciphers on one tree.
The table shows ns per packet (per segment for ``tso``), the median of ``--repeats`` runs
(``min`` beside it: the least disturbed run), and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
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
FRAMES = 16  # super-frames (or GRO reads) a round in the tso mode
TCP_HL = 32  # a TCP header with the timestamp option


# -- the child: one tree, one mode, one size ---------------------------------------------------


class BenchPort:
    """``UdpPort``'s interface: sends are counted, datagrams to receive come from a list."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.buffer = bytearray(65536 + 64)
        self.view = memoryview(self.buffer)
        self.send_errors = 0
        self.sent = 0
        self.inbox: list[bytes] = []
        self.segment = 0  # tso: the inbox holds GRO reads of datagrams this many bytes apart
        self.next = 0
        self.segments = 0  # datagrams handed to send_segments
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
    # what a tree with a handshake socket asks: this port has none
    handshake_fd = None
    handshake_overflows = 0

    @property
    def handshake_view(self) -> memoryview:
        return self.view

    def recv_handshake(self) -> None:
        return None

    def recv_batch(self) -> tuple[int, tuple[str, int], int] | None:
        got = self.recv()
        if got is None:
            return None
        return got[0], got[1], self.segment or got[0]

    def send_segments(self, parts: Any, size: int, address: tuple[str, int]) -> int:
        self.sent += 1
        self.segments += len(parts) // 2
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


def _ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_sum(l4_length: int) -> int:
    total: int = sum(struct.unpack("!4H", bytes([100, 64, 0, 2, 100, 64, 0, 1]))) + 6 + l4_length
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_packet(seq: int, ident: int, flags: int, payload: bytes) -> bytes:
    """An IPv4 TCP packet with the timestamp option, its checksum field holding the
    pseudo-header sum only (a segment cut from a super-frame, or the super-frame itself)."""
    total = 20 + TCP_HL + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, 64, 6, 0,
        bytes([100, 64, 0, 2]), bytes([100, 64, 0, 1]),
    )  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 0x01020304, (TCP_HL // 4) << 4, flags,
                      501, _pseudo_sum(total - 20), 0)  # fmt: skip
    return ip + tcp + b"\x01\x01\x08\x0a" + bytes(range(8)) + payload


def tso_case(gso_size: int, segments: int) -> tuple[bytes, list[bytes]]:
    """The ring record of a super-frame (virtio-net header, IP packet), and the segments
    the kernel's GSO (or ``tso.split``) cuts from it, checksums partial."""
    payload = bytes(range(256)) * (gso_size * segments // 256 + 1)
    payload = payload[: gso_size * segments]
    # NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset (little-endian)
    header = struct.pack("<BBHHHH", 1, 1, 20 + TCP_HL, gso_size, 20, 16)
    frame = tcp_packet(1000, 7, 0x18, payload)
    cut = [
        tcp_packet(
            1000 + i * gso_size,
            7 + i,
            0x18 if i == segments - 1 else 0x10,
            payload[i * gso_size : (i + 1) * gso_size],
        )
        for i in range(segments)
    ]
    return header + frame, cut


def child(
    mode: str, size: int, packets: int, gso_size: int, segments: int, cipher: str
) -> dict[str, float]:
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
    from pipeline.shm_ring import Consumer, Producer, Ring
    from pipeline.topology import RingEdge, Stage, WorkerId
    from pipeline.wire.overlay import DatagramType, build_header

    try:
        from pipeline.topology import Lane  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # a tree from before the handshake lane
        Lane = None  # type: ignore[assignment,misc,unused-ignore]  # noqa: N806

    print(f"pipeline from {Path(pipeline.__file__).parent.parent}", file=sys.stderr)
    # the session's cipher, where the tree has the negotiation (else chacha20-poly1305 only)
    with_cipher: dict[str, Any] = {}
    if "cipher" in messages.KeyEntry.__struct_fields__:
        from pipeline.crypto.ciphers import DataCipher

        with_cipher["cipher"] = DataCipher(cipher)
    elif cipher != "chacha20-poly1305":
        raise SystemExit(f"{cipher}: this tree seals with chacha20-poly1305 only")
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
    if mode == "tso":
        BenchPort.gso = BenchPort.gro = True
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
            **with_cipher,
        )
        feed.on_message(messages.SessionKeys(1, (entry,), b"\x02" * 20))
    to_io = Producer(Ring.attach(specs["in"]))
    from_io = Consumer(Ring.attach(specs["out"]))
    sealer = SendSession(KEY_IN, index=RECV_INDEX, created=0.0, **with_cipher)
    if mode == "tso":
        return tso_loops(worker, port, to_io, from_io, sealer, packets, gso_size, segments)
    packet = bytes(range(256)) * (size // 256) + bytes(size % 256)

    # send: the classifier's packets sealed and sent
    send_ns = timed_sends(worker, port, to_io, packet, 0, packets, CHUNK) / packets
    assert port.sent == packets, (port.sent, packets)

    # recv: datagrams opened and pushed to the classifier
    header = build_header(DatagramType.DATA)
    elapsed = 0
    done = got = 0
    while done < packets:
        k = min(CHUNK, packets - done)
        if mode == "plain":
            port.inbox = [header + packet] * k
        else:
            port.inbox = [b"".join(sealer.seal(DatagramType.DATA, packet)) for _ in range(k)]
        elapsed += timed_reads(worker, port)
        done += k
        records = from_io.pop_batch(1 << 20)
        got += len(records)
        from_io.release()
    recv_ns = elapsed / packets
    stats = worker.stats()
    assert got == packets and stats["drops"] == {}, (got, stats)
    worker.teardown()
    return {"send": send_ns, "recv": recv_ns}


def timed_sends(
    worker: Any, port: BenchPort, to_io: Any, record: bytes, flags: int, count: int, chunk: int
) -> int:
    """Thread CPU ns of ``work()`` sending ``count`` records (pushed ``chunk`` at a time,
    untimed) until the port has had as many sends."""
    from pipeline.records import RecordKind

    work = worker.work
    clock = time.thread_time_ns  # CPU time: a shared machine's other work is not counted
    elapsed = done = 0
    while done < count:
        k = min(chunk, count - done)
        for _ in range(k):
            to_io.push(record, RecordKind.IP_PACKET, 1, flags)
        to_io.flush()
        target = done + k
        t0 = clock()
        while port.sent < target:
            work()
        elapsed += clock() - t0
        done = target
    return elapsed


def timed_reads(worker: Any, port: BenchPort) -> int:
    """Thread CPU ns of ``work()`` until every datagram (or GRO read) in the port's inbox has
    been read."""
    port.next = 0
    work = worker.work
    clock = time.thread_time_ns  # CPU time: a shared machine's other work is not counted
    t0 = clock()
    while port.next < len(port.inbox):
        work()
    return clock() - t0


def tso_loops(
    worker: Any,
    port: BenchPort,
    to_io: Any,
    from_io: Any,
    sealer: Any,
    packets: int,
    gso_size: int,
    segments: int,
) -> dict[str, float]:
    """The tso mode's two loops: ns per segment (``sealer``: the peer's sending session)."""
    from pipeline.records import FLAG_VNET
    from pipeline.wire.overlay import FLAG_PARTIAL, DatagramType

    record, cut = tso_case(gso_size, segments)
    frames = max(1, packets // segments)

    # send: super-frames cut, sealed, one send_segments each
    elapsed = timed_sends(worker, port, to_io, record, FLAG_VNET, frames, FRAMES)
    assert port.segments == frames * segments, (port.segments, frames, segments)
    send_ns = elapsed / (frames * segments)

    # recv: GRO reads of sealed segments, opened, coalesced, pushed to the classifier
    port.segment = 16 + 20 + TCP_HL + gso_size + 16
    elapsed = done = 0
    while done < frames:
        k = min(FRAMES, frames - done)
        port.inbox = [
            b"".join(b"".join(sealer.seal(DatagramType.DATA, seg, FLAG_PARTIAL)) for seg in cut)
            for _ in range(k)
        ]
        elapsed += timed_reads(worker, port)
        done += k
        records = from_io.pop_batch(1 << 20)
        assert len(records) == k, (len(records), k)  # one super-frame a read
        assert bytes(records[0].data) == record, "not the super-frame the peer cut"
        from_io.release()
    recv_ns = elapsed / (frames * segments)
    stats = worker.stats()
    assert stats["drops"] == {}, stats
    worker.teardown()
    return {"send": send_ns, "recv": recv_ns}


# -- the parent --------------------------------------------------------------------------------


def run_child(
    tree: Path, mode: str, size: int, cipher: str, args: argparse.Namespace
) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--cipher", cipher]
    argv += ["--modes", mode, "--sizes", str(size), "--packets", str(args.packets)]
    argv += ["--gso-size", str(args.gso_size), "--segments", str(args.segments)]
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


def sizes_of(mode: str, sizes: list[int], args: argparse.Namespace) -> list[int]:
    """The packet sizes a mode runs: tso's is its segments' IP packet, once."""
    return [20 + TCP_HL + args.gso_size] if mode == "tso" else sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packets", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="64,1400")
    parser.add_argument("--modes", default="enc,plain,tso")
    parser.add_argument("--gso-size", type=int, default=1348, help="tso: payload a segment")
    parser.add_argument("--segments", type=int, default=45, help="tso: segments a frame")
    parser.add_argument("--before", default="main")
    parser.add_argument("--after", type=Path, default=ROOT)
    ciphers = ["chacha20-poly1305", "aes-256-gcm"]
    parser.add_argument("--cipher", choices=ciphers, default=ciphers[0], help="the after tree's")
    parser.add_argument("--before-cipher", choices=ciphers, default=ciphers[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    if args.child:
        got = child(modes[0], sizes[0], args.packets, args.gso_size, args.segments, args.cipher)
        print(json.dumps(got))
        return 0

    results: dict[tuple[str, str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="overlay-io-before-") as tmp:
        before = Path(tmp)
        export(args.before, before)
        trees = {"before": before, "after": args.after.resolve()}
        cipher_of = {"before": args.before_cipher, "after": args.cipher}
        for r in range(args.repeats):
            for mode in modes:
                for size in sizes_of(mode, sizes, args):
                    order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                    for name in order:
                        got = run_child(trees[name], mode, size, cipher_of[name], args)
                        for direction, ns in got.items():
                            results.setdefault((name, mode, size, direction), []).append(ns)
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    print(
        f"overlay_io worker loops, ns per packet (tso: per segment of {args.gso_size} bytes, "
        f"{args.segments} a super-frame; size: the segment's IP packet): median of "
        f"{args.repeats} runs of {args.packets} packets (min in brackets); thread CPU time; "
        f"before = {args.before} ({args.before_cipher}), after = {args.after} ({args.cipher})"
    )
    print(f"{'mode':<6}{'size':>6}  {'loop':<5}{'before':>18}{'after':>18}{'after/before':>14}")
    for mode in modes:
        for size in sizes_of(mode, sizes, args):
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
