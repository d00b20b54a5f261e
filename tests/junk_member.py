"""A certified member that sends a node junk overlay messages: for tests and benchmarks of
bounded work per member (issue 13). Run it inside a namespace, from the repository root::

    python -m tests.junk_member '{"state_dir": ..., "certificate": ...,
        "ca": ..., "network": "test", "host": "198.18.0.2", "port": 4789,
        "node_host": "198.18.0.1", "node_port": 4789}'

It is the product's ``LinkManager`` with the member's key and certificate on a UDP socket:
it links to the node (Noise XX), prints ``linked <node id hex>``, then reads commands on
stdin, one a line, and answers each with one line:

- ``junk N RATE``: N ``ConnectRequest``s (``RATE`` a second) whose requester id is made
  up, whose destination is the node (so the node answers), each naming a made-up address
  of ``JUNK_NETWORK`` (198.19.128.0/17: nobody's), half of them with a path naming a
  node the node is not connected to; answers ``sent N``;
- ``stats``: answers a JSON line: datagrams received by type;
- ``quit``.

Sealed with the link's session as overlay_io would, so the node's control takes each as an
overlay message from a member.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.control.links import LinkManager
from pipeline.control.overlay import wire as ow
from pipeline.crypto.cert import RevocationList
from pipeline.crypto.datapath import SendSession
from pipeline.crypto.keyfiles import load_or_create_identity, read_certificate
from pipeline.wire.overlay import DatagramType
from supervisor.testbed import Node
from supervisor.testbed.nodes import PORT

JUNK_NETWORK = "198.19.128.0/17"
_CODEC = ow.HostPortCodec()


def junk_endpoint(i: int) -> tuple[str, int]:
    """The i-th made-up address of ``JUNK_NETWORK`` (i < 32,768)."""
    return (f"198.19.{128 + ((i >> 8) & 0x7F)}.{i & 0xFF}", 4789)


class Member:
    def __init__(self, a: dict[str, Any]) -> None:
        self.links = LinkManager(
            identity=load_or_create_identity(Path(a["state_dir"])),
            certificate=read_certificate(Path(a["certificate"])),
            ca=read_certificate(Path(a["ca"])),
            network=a["network"],
            peers=[],
            revoked=RevocationList.empty(),
            rng=os.urandom,
            accept_members=True,
        )
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((a["host"], int(a["port"])))
        self.node = (a["node_host"], int(a["node_port"]))
        self.received: Counter[str] = Counter()
        self.rng = random.Random(a.get("seed", 1))
        self.sent = 0

    def pump(self, wait: float) -> None:
        links = self.links
        links.handle_timer(time.monotonic(), time.time())
        for datagram, to in links.datagrams_to_send():
            if isinstance(to, tuple):
                self.sock.sendto(datagram, to)
        end = time.monotonic() + wait
        while True:
            left = end - time.monotonic()
            if not select.select([self.sock], [], [], max(left, 0))[0]:
                return
            data, source = self.sock.recvfrom(65536)
            kind = data[1] if len(data) > 1 else -1
            self.received[str(kind)] += 1
            if kind in (DatagramType.HANDSHAKE, DatagramType.COOKIE):
                links.receive(data, source, time.monotonic(), time.time())
                for datagram, to in links.datagrams_to_send():
                    if isinstance(to, tuple):
                        self.sock.sendto(datagram, to)
            if left <= 0:
                return

    def link(self, timeout: float = 30.0) -> bytes:
        self.links.connect(self.node, time.monotonic(), time.time())
        end = time.monotonic() + timeout
        while not self.links.sessions():
            if time.monotonic() > end:
                raise SystemExit("no link to the node")
            self.pump(0.05)
        session = self.links.sessions()[-1]
        self.sender = SendSession(
            session.send_key, index=session.send_index, created=0.0, cipher=session.cipher
        )
        cert = self.links.links[session.slot].certificate
        assert cert is not None
        self.node_id = cert.node_id
        return bytes(self.node_id)

    def junk(self, count: int, rate: float) -> None:
        start = time.monotonic()
        for k in range(count):
            i = self.sent
            self.sent += 1
            path = (self.rng.randbytes(20),) if i % 2 else ()
            request = ow.ConnectRequest(
                self.rng.randbytes(20),
                self.node_id,
                1,
                64,
                2,
                self.rng.getrandbits(32),
                _CODEC.encode(junk_endpoint(i)),
                path,
            )
            header, sealed = self.sender.seal(DatagramType.OVERLAY, ow.encode(request))
            self.sock.sendto(header + sealed, self.node)
            due = start + (k + 1) / rate
            if k % 50 == 49 or due - time.monotonic() > 0.01:
                self.pump(max(due - time.monotonic(), 0.0))


def launch(node: Node, member: Node, log: Path, cwd: Path | None) -> subprocess.Popen[bytes]:
    """This script in ``member``'s namespace, with its key and certificate (of the network
    ``test``), linked to ``node``: started by the test bed (so it is ended with it), its
    stderr in ``log``. RuntimeError if it does not link."""
    args = {
        "state_dir": str(member.root / "state"),
        "certificate": str(member.root / "state" / "node.crt"),
        "ca": str(node.extra["authority"].path),
        "network": "test",
        "host": member.underlay,
        "port": PORT,
        "node_host": node.underlay,
        "node_port": PORT,
    }
    with open(log, "wb") as err:
        proc = member.ns.popen(
            [sys.executable, "-m", "tests.junk_member", json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=cwd,
        )
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith(b"linked "):
        member.ns.testbed.stop(proc)
        raise RuntimeError(f"the junk member did not link: {log.read_text(errors='replace')}")
    return proc


def ask(proc: subprocess.Popen[bytes], line: str) -> str:
    """One command to a launched member, and its answer."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    return proc.stdout.readline().decode().strip()


def main() -> None:
    member = Member(json.loads(sys.argv[1]))
    print(f"linked {member.link().hex()}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "junk":
            member.junk(int(words[1]), float(words[2]))
            member.pump(0.2)
            print(f"sent {words[1]}", flush=True)
        elif words[0] == "stats":
            member.pump(0.2)
            print(json.dumps({"received": dict(member.received), "sent": member.sent}), flush=True)
        elif words[0] == "quit":
            return


if __name__ == "__main__":
    main()
