"""A handshake flood, for the flood test and benchmark: forged first handshake messages (half
with the network's valid mac1, half with a wrong one) at a paced rate, from several source
addresses of one namespace, to one UDP port.

``python -m supervisor.testbed.flood CA_CERT HOST PORT RATE SECONDS SOURCE...`` runs inside
the attacker's namespace (``Namespace.popen``): the datagrams are built once, then sent
round-robin over one socket per source address in a tight ``sendto`` loop, paced to RATE a
second. It prints one JSON line: ``sent``, ``blocked`` (send buffer full: not sent),
``seconds`` and the ``rate`` it really reached. ``add_sources`` gives the namespace those
addresses (in the test underlay, 198.18.0.0/15).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from supervisor.testbed.netns import Namespace

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


def flood(
    out: list[bytes], host: str, port: int, rate: float, seconds: float, sources: list[str]
) -> dict[str, float]:
    socks = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        socks.append(sock)
    pairs = [(socks[k % len(socks)].sendto, d) for k, d in enumerate(out)]
    target = (host, port)
    sent = blocked = 0
    start = time.monotonic()
    end = start + seconds
    n = len(pairs)
    i = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate)
        if sent + blocked >= due:  # ahead of the pace
            time.sleep(0.0005)
            continue
        for _ in range(min(256, due - sent - blocked)):
            send, datagram = pairs[i]
            i = i + 1 if i + 1 < n else 0
            try:
                send(datagram, target)
                sent += 1
            except (BlockingIOError, ConnectionRefusedError):
                blocked += 1
    elapsed = time.monotonic() - start
    for sock in socks:
        sock.close()
    return {"sent": sent, "blocked": blocked, "seconds": elapsed, "rate": sent / elapsed}


def main(argv: list[str]) -> int:
    from pipeline.crypto.keyfiles import read_certificate

    ca_path, host, port, rate, seconds, *sources = argv
    ca = read_certificate(Path(ca_path))
    report = flood(datagrams(ca.public_key), host, int(port), float(rate), float(seconds), sources)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
