"""The small programs ``seed_eval.py`` runs inside its namespaces, and their pure parts.

- **TCP request/response in the shape of netperf's TCP_RR** (netperf is not in Debian's
  archive): ``rr-server`` answers every 1-byte request on a connection with a 1-byte
  response; ``rr-client`` opens one connection (TCP_NODELAY, like netperf) and does
  request/response transactions back to back for a number of seconds, then prints JSON
  ``{"transactions", "seconds", "tps"}``.
- **A fixed-work CPU load** standing in for SPECjbb: ``load`` does one unit of fixed work
  (:func:`work_unit`: build, sort and total a small order book in pure Python) over and over;
  its score is units per second. It runs as long as the bench wants: it prints ``ready``,
  and for each line ``go SECONDS`` on stdin it works that long and prints JSON
  ``{"ops", "seconds", "ops_s"}``; ``--cpu N`` pins it to CPU N (``sched_setaffinity``).

Run from the repository root: ``python3 bench/seed_tools.py rr-server --port 5202``,
``python3 bench/seed_tools.py rr-client 100.64.0.2 --port 5202 --seconds 5``,
``python3 bench/seed_tools.py load --cpu 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

RR_PORT = 5202
RR_SIZE = 1  # netperf TCP_RR's default request and response size


# ----------------------------------------------------------------------------------------------
# TCP request/response


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        data += chunk
    return data


def _answer(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                request = _recv_exact(conn, RR_SIZE)
                conn.sendall(request)
        except OSError:  # ConnectionError included: the client is done
            return


def serve_rr(listener: socket.socket, stop: threading.Event | None = None) -> None:
    """Answer every connection accepted on ``listener`` (one thread each) until ``stop`` is
    set (checked each second) or the listener is closed."""
    listener.settimeout(1.0)
    while stop is None or not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(None)
        threading.Thread(target=_answer, args=(conn,), daemon=True).start()


@dataclass(frozen=True)
class RrResult:
    transactions: int
    seconds: float

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"transactions": self.transactions, "seconds": self.seconds, "tps": self.tps}


def rr_transactions(host: str, port: int, seconds: float, timeout: float = 5.0) -> RrResult:
    """Request/response transactions over one TCP connection for ``seconds``."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = b"x" * RR_SIZE
        count = 0
        t0 = time.monotonic()
        deadline = t0 + seconds
        while (now := time.monotonic()) < deadline:
            conn.sendall(request)
            _recv_exact(conn, RR_SIZE)
            count += 1
        return RrResult(count, now - t0)


# ----------------------------------------------------------------------------------------------
# the CPU load


_ORDERS = [(i * 7919) % 1009 for i in range(400)]  # a fixed, shuffled-looking order book


def work_unit() -> int:
    """One unit of fixed work: price a small order book, sort it, total it. Always the same
    answer (the tests check it), so every unit is the same work."""
    priced = [(q * 31 + 17) % 997 for q in _ORDERS]
    ranked = sorted(zip(priced, _ORDERS, strict=True))
    total = 0
    for price, qty in ranked:
        total = (total + price * qty) % 1_000_003
    return total


def run_load(seconds: float) -> tuple[int, float]:
    """Units of work done in ``seconds`` (wall clock), and the seconds it really took."""
    t0 = time.monotonic()
    deadline = t0 + seconds
    ops = 0
    while True:
        work_unit()
        ops += 1
        if (now := time.monotonic()) >= deadline:
            return ops, now - t0


def load_report(ops: int, seconds: float) -> dict[str, float]:
    return {"ops": ops, "seconds": seconds, "ops_s": ops / seconds if seconds > 0 else 0.0}


def _load_main(cpu: int | None) -> int:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] != "go" or len(words) != 2:
            print(json.dumps({"error": f"bad command {line.strip()!r}"}), flush=True)
            continue
        print(json.dumps(load_report(*run_load(float(words[1])))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    server = sub.add_parser("rr-server", help="answer TCP request/response connections")
    server.add_argument("--port", type=int, default=RR_PORT)
    client = sub.add_parser("rr-client", help="TCP request/response transactions, JSON out")
    client.add_argument("host")
    client.add_argument("--port", type=int, default=RR_PORT)
    client.add_argument("--seconds", type=float, default=5.0)
    load = sub.add_parser("load", help="the fixed-work CPU load, driven by 'go SECONDS' lines")
    load.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = p.parse_args(argv)
    if args.command == "rr-server":
        with socket.create_server(("0.0.0.0", args.port), reuse_port=False) as listener:
            print("listening", flush=True)
            serve_rr(listener)
        return 0
    if args.command == "rr-client":
        print(json.dumps(rr_transactions(args.host, args.port, args.seconds).as_dict()))
        return 0
    return _load_main(args.cpu)


if __name__ == "__main__":
    sys.exit(main())
