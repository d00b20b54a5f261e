"""NAT traversal: time to the first packet, time to a direct path, throughput relayed and direct.

The network is the NAT lab's (``supervisor.testbed.nat_pair``, the same as
``tests/test_nat_live.py``): an "internet" segment with STUN servers and four public nodes,
node A behind a gateway of one kind and node B behind another (or on A's LAN), their keys
chosen so that A and B are not overlay neighbours: A reaches B first through the overlay
(relayed), and a direct path is the shortcut's doing. Gateway kinds: ``none`` (a router),
``eim`` (MASQUERADE), ``eim_open`` (MASQUERADE on a gateway that accepts unsolicited WAN
input: the peer's early probe leaves a stale conntrack entry), ``random`` (MASQUERADE
fully-random: a new port per destination).

Per case and repeat, a fresh pair with shortcuts on:

- **join**: seconds from starting the six nodes until every one is registered on the overlay;
- **first packet**: seconds from then until A's first echo request to B's virtual address is
  answered (pings of 1 s timeout, back to back);
- **direct after**: seconds from the first answer until A's link to B shows a direct path
  (``status --json``, polled every 0.25 s, up to ``--within``; "-": stayed relayed);
- **direct**: how many repeats went direct, and of them how many by birthday probing
  (``bN``: one side's NAT randomises ports, ``random-one-side``);
- **Mbit/s now**: one iperf3 TCP stream A->B of ``--seconds`` on the path the link settled on.

Then, per case and repeat, a pair with ``[nat] shortcuts = false`` gives **Mbit/s relayed**
(the same stream through the overlay's relay). Every figure is the median over the repeats;
the table ends with the machine's load average, which says how disturbed the figures were.

Run as root from the repository root::

    python3 bench/nat_bench.py [--cases masquerade-both,random-one-side] [--repeats 3]
                               [--seconds 5] [--within 60] [--no-relayed] [--json]

The result is written to ``bench/results/nat-<timestamp>.json`` too; progress goes to stderr.
Everything lives in a ``Testbed``: removed on exit, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("nat_bench", "nat-bench", "nat")
log = BENCH.log

# (name, a's gateway, b's gateway (None: a's LAN)); as tests/test_nat_live.py
CASES: dict[str, tuple[str, str | None]] = {
    "no-nat": ("none", "none"),
    "masquerade-one-side": ("eim", "none"),
    "masquerade-both": ("eim", "eim"),
    "stale-conntrack-first": ("eim_open", "eim"),
    "stale-conntrack-second": ("eim", "eim_open"),
    "same-lan": ("eim", None),
    "random-one-side": ("random", "eim"),
    "random-both": ("random", "random"),
}


@dataclass
class Run:
    join_s: float
    first_packet_s: float
    direct_after_s: float | None
    kind: str | None  # the candidate kind of the direct path
    mbit_now: float
    mbit_relayed: float | None = None
    birthday: bool = False  # the direct path was found in a round with birthday probing


def first_answer(pair: testbed.NatPair, timeout: float = 30.0) -> float:
    """Seconds until A's first echo request to B is answered."""
    start = time.monotonic()
    testbed.wait_for(
        "a answers b", lambda: pair.a.ping(pair.b.address, count=1, wait=1), timeout, every=0
    )
    return time.monotonic() - start


def wait_direct(pair: testbed.NatPair, within: float) -> tuple[float | None, str | None, bool]:
    """Seconds until A's link to B is direct (None: not within ``within``), the candidate
    kind of the path, and whether birthday probing found it."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        row = testbed.link_row(pair.a, pair.b)
        if row and row["path"] == "direct":
            shortcut = row.get("shortcut") or {}
            return time.monotonic() - start, shortcut.get("kind"), bool(shortcut.get("birthday"))
        time.sleep(0.25)
    return None, None, False


def stream(pair: testbed.NatPair, seconds: int) -> float:
    server = harness.start_iperf_server(pair.b.ns)
    try:
        return harness.run_iperf(pair.a.ns, pair.b.address, seconds, False, log).mbit_s
    finally:
        server.terminate()
        server.wait(timeout=10)


def one_run(tmp: Path, kinds: tuple[str, str | None], args: argparse.Namespace) -> Run:
    """A pair with shortcuts, then one without (each in a testbed of its own)."""
    with testbed.Testbed(prefix="avnb") as tb:
        pair = testbed.nat_pair(tb, tmp / "on", *kinds)
        try:
            join = time.monotonic() - pair.started_at
            first = first_answer(pair)
            direct_after, kind, birthday = wait_direct(pair, args.within)
            run = Run(join, first, direct_after, kind, stream(pair, args.seconds))
            run.birthday = birthday
        finally:
            pair.close()
    if args.no_relayed:
        return run
    with testbed.Testbed(prefix="avnb") as tb:
        pair = testbed.nat_pair(tb, tmp / "off", *kinds, shortcuts=False)
        try:
            first_answer(pair)
            run.mbit_relayed = stream(pair, args.seconds)
        finally:
            pair.close()
    return run


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def measure(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], None]:
    result = BENCH.new_result(args, "cases", "repeats", "seconds", "within")
    result["cases"] = {}
    for name in args.cases:
        runs: list[Run] = []
        for i in range(args.repeats):
            log(f"{name}: repeat {i + 1} of {args.repeats}")
            runs.append(one_run(tmp / f"{name}-{i}", CASES[name], args))
            log(f"{name}: {runs[-1]}")
        result["cases"][name] = {
            "gateways": CASES[name],
            "runs": [asdict(r) for r in runs],
            "median": {
                "join_s": median([r.join_s for r in runs]),
                "first_packet_s": median([r.first_packet_s for r in runs]),
                "direct_after_s": median([r.direct_after_s for r in runs]),
                "direct_runs": sum(r.direct_after_s is not None for r in runs),
                "birthday_runs": sum(r.birthday for r in runs),
                "mbit_now": median([r.mbit_now for r in runs]),
                "mbit_relayed": median([r.mbit_relayed for r in runs]),
            },
        }
    result["loadavg_after"] = harness.machine()["loadavg"]
    return result, None


def render(result: dict[str, Any], _: None) -> str:
    head = (
        f"{'case':24} {'gateways':16} {'join s':>7} {'first s':>8} {'direct':>9}"
        f" {'direct s':>9} {'Mbit/s now':>11} {'relayed':>8} {'now/rel':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, case in result["cases"].items():
        m = case["median"]
        a, b = case["gateways"]
        gateways = f"{a}/{b or 'lan'}"
        direct = f"{m['direct_runs']}/{len(case['runs'])}"
        if m.get("birthday_runs"):
            direct += f" b{m['birthday_runs']}"  # of them, found by birthday probing
        lines.append(
            f"{name:24} {gateways:16} {harness.fmt(m['join_s']):>7}"
            f" {harness.fmt(m['first_packet_s'], 2):>8} {direct:>9}"
            f" {harness.fmt(m['direct_after_s']):>9} {harness.fmt(m['mbit_now']):>11}"
            f" {harness.fmt(m['mbit_relayed']):>8}"
            f" {harness.ratio(m['mbit_now'], m['mbit_relayed']):>8}"
        )
    lines.append(
        "direct: runs that went direct of all (bN: N by birthday probing);"
        f" medians of {result['args']['repeats']} repeats; load average"
        f" {result['machine']['loadavg']:.2f} before, {result['loadavg_after']:.2f} after;"
        f" {result['file']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases",
        type=lambda text: [c for c in text.split(",") if c],
        default=list(CASES),
        help=f"comma-separated, of: {', '.join(CASES)} (all)",
    )
    p.add_argument("--repeats", type=harness.bounded_int(1, 20), default=3, help="per case (3)")
    p.add_argument("--seconds", type=harness.bounded_int(1, 60), default=5, help="iperf3 -t (5)")
    p.add_argument(
        "--within", type=harness.bounded_int(1, 300), default=60, help="wait for direct (60 s)"
    )
    p.add_argument(
        "--no-relayed",
        action="store_true",
        help="skip the pair without shortcuts (no 'relayed' column: faster, for the rates)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    return BENCH.main(args, measure, render, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
