"""A member's traffic under a handshake flood: what a flood of forged handshake initiations
(half with the network's valid mac1, half forged) at a node's port leaves of a member's
iperf3 throughput and 10 ms ping, against no flood and the same flood at a closed port of
that node (the machine's own cost of the flood: the floor).

The test bed's two encrypted nodes (``two_nodes``); alpha's namespace gets 16 more underlay
addresses, and the flooder (``supervisor/testbed/flood.py``) sends from them to beta at
``--rate`` a second while alpha runs iperf3 to beta and pings it every 10 ms. ``--rounds``
rounds of the three cases, interleaved so that the noise of a shared machine hits all alike;
printed: the medians, each case's ratio to the baseline, the flooded port's to the closed
port's, the rate the flooder really reached, beta's overlay_io counters (where the flood
went), the CPU seconds beta's overlay_io used per run, and the load average before and
after. Results go to ``bench/results/flood-*.json``.

Run as root from the repository root::

    python3 bench/flood_bench.py [--rate 50000] [--seconds 5] [--rounds 3] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from supervisor.testbed import DEVICE, PORT, UNDERLAY, Node, Testbed, two_nodes  # noqa: E402
from supervisor.testbed.flood import add_sources  # noqa: E402

BENCH = harness.Script("flood_bench", "flood", "flood")
log = BENCH.log
CASES = ("baseline", "closed_port", "node_port")
CLOSED_PORT = PORT + 7
TICKS = os.sysconf("SC_CLK_TCK")


def _ping_loss(out: str) -> float | None:
    m = re.search(r"([\d.]+)% packet loss", out)
    return float(m.group(1)) if m else None


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for stage, pid in pids.items():
        times = harness.proc_times(pid)
        out[stage] = times.own / TICKS if times is not None else 0.0
    return out


def _one(
    tb: Testbed, a: Node, b: Node, port: int | None, args: argparse.Namespace, sources: list[str]
) -> dict[str, Any]:
    """One iperf3 run and ping, under a flood at ``port`` (None: no flood); and the CPU
    seconds of beta's workers meanwhile."""
    pids = {w["stage"]: w["pid"] for w in (b.status() or {}).get("workers", [])}
    cpu0 = _cpu_s(pids)
    flood = None
    if port is not None:
        argv = [sys.executable, "-m", "supervisor.testbed.flood", str(a.extra["authority"].path)]
        argv += [UNDERLAY[1], str(port), str(args.rate), str(args.seconds + 1.5), *sources]
        flood = a.ns.popen(argv, stdout=subprocess.PIPE)
    count = int(args.seconds * 100)
    ping = a.ns.popen(
        ["ping", "-q", "-i", "0.01", "-W", "1", "-c", str(count), b.address],
        stdout=subprocess.PIPE,
    )
    try:
        run = harness.run_iperf(a.ns, b.address, args.seconds, False, log)
        ping_out = ping.communicate(timeout=args.seconds + 20)[0].decode()
        report = json.loads(flood.communicate(timeout=30)[0]) if flood else {}
    finally:
        for proc in (ping, flood):
            if proc is not None:
                tb.stop(proc)
    cpu1 = _cpu_s(pids)
    cpu = {stage: round(cpu1[stage] - cpu0[stage], 3) for stage in pids}
    return {"mbit_s": run.mbit_s, "ping_loss": _ping_loss(ping_out), "flood": report, "cpu_s": cpu}


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], None]:
    result = BENCH.new_result(args, "rate", "seconds", "rounds")
    result["loadavg_before"] = harness.loadavg()
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    with Testbed("avfb") as tb:
        a, b = two_nodes(tb, tmp)
        (ifname,) = [n for n in a.ns.links() if n not in ("lo", DEVICE)]
        sources = add_sources(a.ns, ifname, 16)
        server = harness.start_iperf_server(b.ns)
        try:
            for r in range(args.rounds):
                for case, port in zip(CASES, (None, CLOSED_PORT, PORT), strict=True):
                    log(f"round {r + 1}/{args.rounds}: {case}")
                    runs[case].append(_one(tb, a, b, port, args, sources))
        finally:
            tb.stop(server)
        for w in (b.status() or {}).get("workers", []):
            if w["stage"] == "overlay_io":
                stats = w["stats"]
                result["beta_overlay_io"] = {
                    k: stats.get(k) for k in ("drops", "screen", "handshake_socket")
                }
    result["runs"] = runs
    result["loadavg_after"] = harness.loadavg()
    result["medians"] = {
        case: {
            "mbit_s": statistics.median(r["mbit_s"] for r in runs[case]),
            "ping_loss": statistics.median(r["ping_loss"] or 0.0 for r in runs[case]),
            "flood_rate": statistics.median(r["flood"].get("rate", 0.0) for r in runs[case]),
            "beta_overlay_io_cpu_s": statistics.median(
                r["cpu_s"].get("overlay_io", 0.0) for r in runs[case]
            ),
        }
        for case in CASES
    }
    return result, None


def render(result: dict[str, Any], _: None) -> str:
    med = result["medians"]
    base = med["baseline"]["mbit_s"]
    lines = [
        f"handshake flood at {result['args']['rate']}/s, medians of {result['args']['rounds']}"
        f" runs of {result['args']['seconds']} s (iperf3 alpha -> beta, ping every 10 ms)",
        f"{'case':<12}{'Mbit/s':>9}{'of base':>9}{'ping loss':>11}{'flood/s':>10}"
        f"{'beta overlay_io CPU s':>23}",
    ]
    for case in CASES:
        m = med[case]
        lines.append(
            f"{case:<12}{m['mbit_s']:>9.1f}{harness.ratio(m['mbit_s'], base):>9}"
            f"{m['ping_loss']:>10.1f}%{m['flood_rate']:>10.0f}{m['beta_overlay_io_cpu_s']:>23.2f}"
        )
    lines.append(
        "node port / closed port: "
        + harness.ratio(med["node_port"]["mbit_s"], med["closed_port"]["mbit_s"])
    )
    lines.append(f"beta's overlay_io: {json.dumps(result.get('beta_overlay_io'))}")
    lines.append(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}")
    lines.append(f"results: {result['file']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=harness.bounded_int(1000, 200000), default=50000)
    parser.add_argument("--seconds", type=harness.bounded_int(2, 60), default=5)
    parser.add_argument("--rounds", type=harness.bounded_int(1, 10), default=3)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
