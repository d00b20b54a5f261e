"""A handshake flood, for the flood test and benchmark: forged first handshake messages (half
with the network's valid mac1, half with a wrong one) at a paced rate, from several source
addresses of one namespace, to one UDP port or to several in turn.

``python -m supervisor.testbed.flood [--per-call=N] [--phase-s=S] CA_CERT HOST PORTS RATE
SECONDS SOURCE...`` runs inside the attacker's namespace (``Namespace.popen``): the
datagrams are built once, then sent round-robin over one socket per source address, paced to
RATE a second: a ``sendto`` each (``--per-call=1``, the default) or ``sendmmsg`` of up to N
(the flooder's own CPU is then mostly the kernel's work for the flood). PORTS is one port,
or with ``--phase-s`` a comma-separated list flooded in turn for S seconds each (0: a pause;
``phased_order``). It prints one JSON line: ``sent``, ``blocked`` (send buffer full: not
sent), the ``seconds`` it flooded, the ``rate`` it really reached then, ``phases`` (each
phase's monotonic start and port) and ``sent_by_port``. ``add_sources`` gives the namespace
those addresses (in the test underlay, 198.18.0.0/15). For phased runs, ``RxSampler``
samples the bytes a node wrote to its TAP device, ``phase_rates`` turns them into each
phase's Mbit/s and ``cycle_ratios`` into each cycle's ratios.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from supervisor.testbed.netns import Namespace

Address = tuple[str, int]
DISTINCT = 1024  # datagrams built up front, sent in turn


def add_sources(ns: Namespace, ifname: str, count: int, first: str = "198.18.0.100") -> list[str]:
    """``count`` more addresses on ``ns``'s ``ifname`` (a /24 of the test underlay), from
    ``first`` on; returned for the flood's SOURCE arguments."""
    a, b, c, d = (int(x) for x in first.split("."))
    if not (a == 198 and b in (18, 19) and d + count <= 255):
        raise ValueError(f"{first} + {count}: not in the test underlay 198.18.0.0/15")
    addresses = [f"{a}.{b}.{c}.{d + i}" for i in range(count)]
    for address in addresses:
        ns.ip("addr", "add", f"{address}/24", "dev", ifname)
    return addresses


def datagrams(ca_public_key: bytes, count: int = DISTINCT) -> list[bytes]:
    """First messages with junk Noise: even ones with the network's mac1, odd ones forged."""
    from pipeline.crypto import handshake as hs

    good, bad = hs.mac1_key(ca_public_key), os.urandom(32)
    return [
        hs.build_handshake(
            good if i % 2 == 0 else bad,
            receiver_index=0,
            pattern=hs.Pattern.IK,
            step=0,
            sender_index=i + 1,
            noise=os.urandom(200),
        )
        for i in range(count)
    ]


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_Iovec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", _Msghdr), ("len", ctypes.c_uint))


class _Sender:
    """The datagrams, sent round-robin from one socket per source to ``aim``'s port: a
    ``sendto`` a datagram (``per_call`` 1), or each socket's share as a ``struct mmsghdr``
    array sent ``per_call`` at a time with one ``sendmmsg``: the flooder's own CPU is then
    mostly the kernel's (what the flood costs the machine), not the interpreter's."""

    def __init__(
        self, out: list[bytes], socks: list[socket.socket], host: str, per_call: int
    ) -> None:
        self.per_call = per_call
        self._pairs = [(socks[k % len(socks)].sendto, d) for k, d in enumerate(out)]
        self._i = 0
        self._target = (host, 0)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
        family = struct.pack("=H", socket.AF_INET)
        self._name = ctypes.create_string_buffer(
            family + bytes(2) + socket.inet_aton(host) + bytes(8), 16
        )
        share = max(1, len(out) // len(socks))
        self._keep: list[Any] = []
        self._arrays: list[tuple[int, Any, int]] = []  # (fd, mmsghdr array, length)
        for k, sock in enumerate(socks):
            mine = out[k * share : (k + 1) * share] or out[:share]
            msgs = (_Mmsghdr * len(mine))()
            for j, datagram in enumerate(mine):
                buf = ctypes.create_string_buffer(datagram, len(datagram))
                iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(datagram))
                self._keep += [buf, iov]
                hdr = msgs[j].hdr
                hdr.name = ctypes.cast(self._name, ctypes.c_void_p)
                hdr.namelen = 16
                hdr.iov = ctypes.pointer(iov)
                hdr.iovlen = 1
            self._arrays.append((sock.fileno(), msgs, len(mine)))
        self._turn = 0
        self._at = [0] * len(socks)

    def aim(self, port: int) -> None:
        self._target = (self._target[0], port)
        ctypes.memmove(ctypes.addressof(self._name) + 2, struct.pack("!H", port), 2)

    def send(self, count: int) -> tuple[int, int]:
        """Up to ``count`` datagrams: (how many the kernel took, how many were tried)."""
        if self.per_call == 1:
            return self._send_each(min(count, 256))
        k = self._turn  # the next socket in turn, from where it stopped in its array
        self._turn = k + 1 if k + 1 < len(self._arrays) else 0
        fd, msgs, n = self._arrays[k]
        at = self._at[k]
        count = min(count, self.per_call, n - at)
        first = ctypes.byref(msgs, at * ctypes.sizeof(_Mmsghdr))
        sent = int(self._libc.sendmmsg(fd, first, count, 0))
        self._at[k] = (at + count) % n
        return max(0, sent), count

    def _send_each(self, count: int) -> tuple[int, int]:
        pairs, target, n = self._pairs, self._target, len(self._pairs)
        sent = 0
        i = self._i
        for _ in range(count):
            send, datagram = pairs[i]
            i = i + 1 if i + 1 < n else 0
            try:
                send(datagram, target)
                sent += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
        self._i = i
        return sent, count


def flood(
    out: list[bytes],
    host: str,
    ports: list[int],
    rate: float,
    seconds: float,
    sources: list[str],
    per_call: int = 1,
    phase_s: float = 0.0,
) -> dict[str, Any]:
    """``out`` at ``host``'s ``ports[0]`` for ``seconds``; with several ports, at each in turn
    for ``phase_s`` (port 0: a pause). ``per_call``: see ``_Sender``."""
    socks = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        socks.append(sock)
    sender = _Sender(out, socks, host, per_call)
    phases: list[list[float]] = []  # [monotonic start, port]
    sent = blocked = 0
    flooding = 0.0  # seconds with a port to flood
    start = time.monotonic()
    end = start + seconds
    by_port: dict[int, int] = {}
    phase = -1
    while True:
        now = time.monotonic()
        if now >= end:
            break
        at = int((now - start) / phase_s) if phase_s else 0
        if at != phase:  # a new phase: its own pace
            phase = at
            port = ports[at % len(ports)]
            phase_start = start + at * phase_s if phase_s else start
            phase_end = min(end, phase_start + phase_s) if phase_s else end
            phases.append([phase_start, port])
            if port:
                sender.aim(port)
                flooding += phase_end - phase_start
            base = sent + blocked
        if not port:
            time.sleep(max(0.0, phase_end - now))
            continue
        due = base + int((now - phase_start) * rate)
        if sent + blocked >= due:  # ahead of the pace
            time.sleep(0.0005)
            continue
        while sent + blocked < due:
            took, tried = sender.send(due - sent - blocked)
            sent += took
            blocked += tried - took
            by_port[port] = by_port.get(port, 0) + took
    for sock in socks:
        sock.close()
    return {
        "sent": sent,
        "blocked": blocked,
        "seconds": flooding,
        "rate": sent / flooding if flooding else 0.0,
        "phases": phases,
        "sent_by_port": by_port,
    }


# -- phased floods: the member's throughput in each phase --------------------------------------

# a Latin square of three cycles: no flood, the flood at a closed port, at the node's port,
# each first, second and third once (``phased_order``)
PHASES_SQUARE = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


def phased_order(closed_port: int, node_port: int) -> list[int]:
    """The flooder's ports for a phased run: 0 (a pause), ``closed_port`` and ``node_port``
    in the three orders of ``PHASES_SQUARE``."""
    ports = (0, closed_port, node_port)
    return [ports[k] for cycle in PHASES_SQUARE for k in cycle]


class RxSampler:
    """Bytes received at interface ``device`` of ``pid``'s network namespace (a TAP device:
    what its node wrote to it), sampled every ``every_s`` in a thread: (monotonic, bytes)."""

    def __init__(self, pid: int, device: str, every_s: float = 0.02) -> None:
        self.path = Path(f"/proc/{pid}/net/dev")
        self.device = device + ":"
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        for line in self.path.read_text().splitlines():
            name, _, rest = line.strip().partition(":")
            if name + ":" == self.device:
                return int(rest.split()[0])
        raise LookupError(f"no {self.device} in {self.path}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._read()))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RxSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def phase_rates(
    samples: list[tuple[float, int]],
    phases: list[list[float]],
    phase_s: float,
    window: tuple[float, float],
    settle_s: float,
) -> list[tuple[int, int, float]]:
    """Mbit/s received in each phase (its first ``settle_s`` left out: the stream adjusting
    to the change) that lies within ``window`` (monotonic: the stream's steady part):
    (phase index, port, Mbit/s), from the samples nearest inside the phase."""
    out = []
    for start, port in phases:
        index = round((start - phases[0][0]) / phase_s)  # a phase starved of CPU may be missed
        lo, hi = max(start + settle_s, window[0]), min(start + phase_s, window[1])
        if hi - lo < 0.5 * (phase_s - settle_s):
            continue
        inside = [(t, n) for t, n in samples if lo <= t <= hi]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
            continue
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        out.append((index, int(port), (n1 - n0) * 8 / (t1 - t0) / 1e6))
    return out


def cycle_ratios(
    rates: list[tuple[int, int, float]], closed_port: int, node_port: int
) -> list[dict[str, float]]:
    """Per cycle of three phases (no flood, closed port, node's port) measured whole: their
    Mbit/s and the node's port's to the other two."""
    by_cycle: dict[int, dict[int, float]] = {}
    for index, port, mbit in rates:
        by_cycle.setdefault(index // 3, {})[port] = mbit
    out = []
    for cycle in sorted(by_cycle):
        got = by_cycle[cycle]
        if len(got) == 3 and got[0] > 0 and got[closed_port] > 0:
            base, closed, node = got[0], got[closed_port], got[node_port]
            out.append(
                {
                    "baseline": base,
                    "closed_port": closed,
                    "node_port": node,
                    "node_of_base": node / base,
                    "node_of_closed": node / closed,
                }
            )
    return out


def main(argv: list[str]) -> int:
    from pipeline.crypto.keyfiles import read_certificate

    options = {"--per-call": "1", "--phase-s": "0"}
    while argv and argv[0].split("=", 1)[0] in options:
        key, value = argv.pop(0).split("=", 1)
        options[key] = value
    ca_path, host, ports, rate, seconds, *sources = argv
    ca = read_certificate(Path(ca_path))
    report = flood(
        datagrams(ca.public_key),
        host,
        [int(p) for p in ports.split(",")],
        float(rate),
        float(seconds),
        sources,
        int(options["--per-call"]),
        float(options["--phase-s"]),
    )
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
