"""A member's traffic under a handshake flood: what a flood of forged handshake initiations
(half with the network's valid mac1, half forged) at a node's port leaves of a member's
iperf3 throughput and 10 ms ping, against no flood and the same flood at a closed port of
that node (the machine's own cost of the flood: the floor).

The test bed's two encrypted nodes (``two_nodes``); alpha's namespace gets 16 more underlay
addresses, and the flooder (``supervisor/testbed/flood.py``; ``--per-call`` datagrams a
system call: 1 is ``sendto``, more ``sendmmsg``) sends from them to beta at ``--rate`` a
second while alpha runs iperf3 to beta. Two designs:

- ``--phase-s S`` (phased, the default and the one to read on a shared machine):
  ``--rounds`` iperf3 runs of ``--seconds``, the flood changing every S seconds between
  none, the closed port and the node's port (a Latin square of the three orders); beta's TAP
  bytes, sampled every 20 ms, give each phase's Mbit/s (its first 0.3 s left out) and each
  cycle of three its ratios, neighbours in time under the same load from elsewhere. Printed:
  medians of the phases, the median and quartiles of the per-cycle ratios.
- without (separate runs): ``--rounds`` rounds of three iperf3 runs of ``--seconds`` (no
  flood, closed port, node's port) with a 10 ms ping; medians of each case.

Both print where the CPU went during each run (``where``: each process of both nodes, the
flooder, iperf3, ping, the ksoftirqd threads, all other processes of the machine as
"others", /proc/stat by kind, the kernel's backlog drops), beta's overlay_io counters and
the load average before and after. On this 2-core machine the nodes' pipeline is CPU-bound:
its throughput follows the CPU share it gets, so other tenants' load moves every figure.
Results go to ``bench/results/flood-*.json``.

Run as root from the repository root::

    python3 bench/flood_bench.py [--rate 50000] [--seconds 30] [--rounds 3] [--per-call 64]
        [--phase-s 1.0] [--json-only]

(``--phase-s 0 --seconds 5``: the separate runs.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from supervisor.testbed import DEVICE, PORT, UNDERLAY, Node, Testbed, two_nodes  # noqa: E402
from supervisor.testbed.flood import (  # noqa: E402
    RxSampler,
    add_sources,
    cycle_ratios,
    phase_rates,
    phased_order,
)

BENCH = harness.Script("flood_bench", "flood", "flood")
log = BENCH.log
CASES = ("baseline", "closed_port", "node_port")
CLOSED_PORT = PORT + 7
TICKS = os.sysconf("SC_CLK_TCK")
SETTLE_S = 0.3  # of each phase, left out: the stream adjusting to the change


def _ping_loss(out: str) -> float | None:
    m = re.search(r"([\d.]+)% packet loss", out)
    return float(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class Where:
    """Where the machine's CPU went, at one moment: each process's times under a label (see
    ``where``), the machine's ticks by kind (/proc/stat) and its per-CPU backlog counters."""

    procs: dict[int, tuple[str, harness.ProcTimes]]
    reaped: float  # CPU seconds of this process's reaped children (the iperf3 client)
    machine: dict[str, int]
    softnet: list[list[int]]  # per CPU: processed, dropped, time_squeeze


def where(labels: dict[int, str], netns: dict[int, str]) -> Where:
    """Every process: a pid in ``labels`` under its label, prefixed with the side of its
    network namespace (``netns``: inode -> side, e.g. "alpha"); others of those namespaces
    under their command name; the ksoftirqd threads each under its name; everything else
    on the machine as "others"."""
    procs: dict[int, tuple[str, harness.ProcTimes]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            stat = harness.proc_stat(pid)
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino if stat and not stat.kthread else 0
        except OSError:
            continue
        if stat is None:
            continue
        if stat.kthread:
            label = comm if comm.startswith("ksoftirqd") else "kernel threads"
        elif inode in netns:
            label = f"{netns[inode]}:{labels.get(pid, comm)}"
        else:
            label = labels.get(pid, "others")
        procs[pid] = (label, stat.times)
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields)
    machine = {
        "user": user + nice,
        "system": system,
        "softirq": softirq + irq,
        "idle": idle + iowait,
        "steal": steal,
    }
    softnet = [
        [int(v, 16) for v in line.split()[:3]]
        for line in Path("/proc/net/softnet_stat").read_text().splitlines()
    ]
    t = os.times()
    return Where(procs, t.children_user + t.children_system, machine, softnet)


def cpu_between(before: Where, after: Where) -> dict[str, Any]:
    """Seconds of CPU by label (a process's own, not its reaped children's: a process of
    another tenant that reaps a long-lived child would count its whole life), by kind for
    the machine, and what no process was charged for ("unaccounted": softirq, processes that
    came and went); backlog drops and squeezes."""
    by_label: dict[str, float] = {}
    for pid, (label, new) in after.procs.items():
        old = before.procs.get(pid)
        ticks = new.own - (old[1].own if old and old[1].start == new.start else 0)
        if ticks:
            by_label[label] = by_label.get(label, 0.0) + ticks / TICKS
    by_label["alpha:iperf3 client"] = after.reaped - before.reaped
    machine = {k: (after.machine[k] - before.machine[k]) / TICKS for k in after.machine}
    busy = sum(v for k, v in machine.items() if k not in ("idle", "steal"))
    machine["unaccounted"] = busy - sum(by_label.values())
    backlog = [
        [b - a for a, b in zip(old, new, strict=True)]
        for old, new in zip(before.softnet, after.softnet, strict=True)
    ]
    return {
        "cpu_s": {k: round(v, 2) for k, v in sorted(by_label.items(), key=lambda kv: -kv[1])},
        "machine_s": {k: round(v, 2) for k, v in machine.items()},
        "backlog_drops": sum(cpu[1] for cpu in backlog),
        "squeezed": sum(cpu[2] for cpu in backlog),
    }


def _udp_tcp(pid: int) -> dict[str, int]:
    """The Udp and Tcp counters of /proc/net/snmp in ``pid``'s network namespace."""
    lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        proto = names.split(":")[0]
        if proto in ("Udp", "Tcp"):
            for k, v in zip(names.split()[1:], values.split()[1:], strict=True):
                out[f"{proto}{k}"] = int(v)
    return out


SNMP = ("UdpInDatagrams", "UdpNoPorts", "UdpRcvbufErrors", "UdpInErrors", "TcpRetransSegs")


def _one(
    tb: Testbed, a: Node, b: Node, port: int | None, args: argparse.Namespace, sources: list[str]
) -> dict[str, Any]:
    """One iperf3 run and ping, under a flood at ``port`` (None: no flood); where the CPU
    went meanwhile (``where``), and the kernel's UDP counters on each side."""
    labels, netns = {}, {}
    for node, side in ((a, "alpha"), (b, "beta")):
        netns[harness.netns_inode(node.ns)] = side
        labels.update({w["pid"]: w["stage"] for w in (node.status() or {}).get("workers", [])})
        if node.proc is not None:
            labels[node.proc.pid] = "supervisor"
    assert b.proc is not None
    b_pid = b.proc.pid  # in beta's namespace: its /proc/PID/net is beta's
    flood = None
    if port is not None:
        argv = [sys.executable, "-m", "supervisor.testbed.flood", f"--per-call={args.per_call}"]
        argv += [str(a.extra["authority"].path)]
        argv += [UNDERLAY[1], str(port), str(args.rate), str(args.seconds + 1.5), *sources]
        flood = a.ns.popen(argv, stdout=subprocess.PIPE)
        labels[flood.pid] = "flood"
    count = int(args.seconds * 100)
    ping = a.ns.popen(
        ["ping", "-q", "-i", "0.01", "-W", "1", "-c", str(count), b.address],
        stdout=subprocess.PIPE,
    )
    labels[ping.pid] = "ping"
    snmp0 = _udp_tcp(b_pid)
    before = where(labels, netns)
    try:
        run = harness.run_iperf(a.ns, b.address, args.seconds, False, log)
        after = where(labels, netns)  # the flood goes on 1.5 s longer: not counted
        snmp1 = _udp_tcp(b_pid)
        ping_out = ping.communicate(timeout=args.seconds + 20)[0].decode()
        report = json.loads(flood.communicate(timeout=30)[0]) if flood else {}
    finally:
        for proc in (ping, flood):
            if proc is not None:
                tb.stop(proc)
    return {
        "mbit_s": run.mbit_s,
        "retransmits": run.retransmits,
        "ping_loss": _ping_loss(ping_out),
        "flood": report,
        **cpu_between(before, after),
        "beta_snmp": {k: snmp1.get(k, 0) - snmp0.get(k, 0) for k in SNMP},
    }


def _phased(
    tb: Testbed, a: Node, b: Node, args: argparse.Namespace, sources: list[str]
) -> dict[str, Any]:
    """One iperf3 run of ``--seconds`` while the flooder changes every ``--phase-s``: no
    flood, the closed port, the node's port (``phased_order``); beta's TAP bytes sampled
    meanwhile give each phase's Mbit/s, and each cycle of three its ratios."""
    assert b.proc is not None
    argv = [sys.executable, "-m", "supervisor.testbed.flood", f"--per-call={args.per_call}"]
    argv += [f"--phase-s={args.phase_s}", str(a.extra["authority"].path), UNDERLAY[1]]
    argv += [",".join(map(str, phased_order(CLOSED_PORT, PORT))), str(args.rate)]
    argv += [str(args.seconds + 3), *sources]
    labels = {}
    netns = {harness.netns_inode(n.ns): side for n, side in ((a, "alpha"), (b, "beta"))}
    for node in (a, b):
        labels.update({w["pid"]: w["stage"] for w in (node.status() or {}).get("workers", [])})
    with RxSampler(b.proc.pid, DEVICE) as rx:
        flood = a.ns.popen(argv, stdout=subprocess.PIPE)
        labels[flood.pid] = "flood"
        try:
            before = where(labels, netns)
            t0 = time.monotonic()
            run = harness.run_iperf(a.ns, b.address, args.seconds, False, log)
            t1 = time.monotonic()
            after = where(labels, netns)
            report = json.loads(flood.communicate(timeout=args.seconds + 30)[0])
        finally:
            tb.stop(flood)
    window = (t0 + 1.0, t1 - 0.2)  # the stream's start (slow start) and end left out
    rates = phase_rates(rx.samples, report["phases"], args.phase_s, window, SETTLE_S)
    return {
        "mbit_s": run.mbit_s,
        "retransmits": run.retransmits,
        "flood_rate": report["rate"],
        "phases": rates,
        "cycles": cycle_ratios(rates, CLOSED_PORT, PORT),
        **cpu_between(before, after),
    }


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], None]:
    result = BENCH.new_result(args, "rate", "seconds", "rounds", "per_call", "phase_s")
    result["loadavg_before"] = harness.loadavg()
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    with Testbed("avfb") as tb:
        a, b = two_nodes(tb, tmp)
        (ifname,) = [n for n in a.ns.links() if n not in ("lo", DEVICE)]
        sources = add_sources(a.ns, ifname, 16)
        server = harness.start_iperf_server(b.ns)
        try:
            if args.phase_s:
                result["phased"] = [_phased(tb, a, b, args, sources) for _ in range(args.rounds)]
            for r in range(0 if args.phase_s else args.rounds):
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
    result["loadavg_after"] = harness.loadavg()
    if args.phase_s:
        return result, None
    result["runs"] = runs
    result["medians"] = {
        case: {
            "mbit_s": statistics.median(r["mbit_s"] for r in runs[case]),
            "ping_loss": statistics.median(r["ping_loss"] or 0.0 for r in runs[case]),
            "flood_rate": statistics.median(r["flood"].get("rate", 0.0) for r in runs[case]),
            "beta_overlay_io_cpu_s": statistics.median(
                r["cpu_s"].get("beta:overlay_io", 0.0) for r in runs[case]
            ),
        }
        for case in CASES
    }
    return result, None


def _render_phased(result: dict[str, Any]) -> str:
    args = result["args"]
    lines = [
        f"handshake flood at {args['rate']}/s, phased: {args['rounds']} iperf3 runs of"
        f" {args['seconds']} s (alpha -> beta), the flood changing every {args['phase_s']} s"
        " (none, closed port, node's port; Latin square); Mbit/s at beta's TAP per phase"
    ]
    cycles = [c for run in result["phased"] for c in run["cycles"]]
    if not cycles:
        return "\n".join([*lines, "no whole cycle measured"])
    for key in CASES:
        values = [c[key] for c in cycles]
        lines.append(f"{key:<12}{statistics.median(values):>9.1f} Mbit/s (median of {len(values)})")
    for key, what in (("node_of_base", "baseline"), ("node_of_closed", "closed port")):
        values = sorted(c[key] for c in cycles)
        lines.append(
            f"node port / {what} per cycle: median {statistics.median(values):.2f}, "
            f"quartiles {harness.percentile(values, 25):.2f}-{harness.percentile(values, 75):.2f}"
        )
    for i, run in enumerate(result["phased"]):
        top = sorted(run["cpu_s"].items(), key=lambda kv: -kv[1])[:10]
        lines.append(
            f"run {i + 1}: {run['mbit_s']:.0f} Mbit/s, flood {run['flood_rate']:.0f}/s, "
            f"{len(run['cycles'])} cycles; CPU s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in top)
            + f"; machine {json.dumps(run['machine_s'])}"
        )
    lines.append(f"beta's overlay_io: {json.dumps(result.get('beta_overlay_io'))}")
    lines.append(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}")
    lines.append(f"results: {result['file']}")
    return "\n".join(lines)


def render(result: dict[str, Any], _: None) -> str:
    if "phased" in result:
        return _render_phased(result)
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
    lines += _render_where(result["runs"])
    lines.append(f"load average before {result['loadavg_before']}, after {result['loadavg_after']}")
    lines.append(f"results: {result['file']}")
    return "\n".join(lines)


def _render_where(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Per case, medians over its runs: CPU seconds by process and by kind, backlog drops,
    retransmits, beta's UDP counters."""
    lines = ["where the CPU went (s, medians of the runs):"]
    for case in CASES:
        rs = runs[case]
        labels = {label for r in rs for label in r["cpu_s"]}
        cpu = {k: statistics.median(r["cpu_s"].get(k, 0.0) for r in rs) for k in labels}
        top = sorted(cpu.items(), key=lambda kv: -kv[1])[:12]
        machine = {k: statistics.median(r["machine_s"][k] for r in rs) for k in rs[0]["machine_s"]}
        lines.append(f"  {case}: " + ", ".join(f"{k} {v:.2f}" for k, v in top if v >= 0.05))
        lines.append(
            f"  {'':<{len(case)}}  machine {json.dumps(machine)}; backlog drops "
            f"{[r['backlog_drops'] for r in rs]}, squeezed {[r['squeezed'] for r in rs]}, "
            f"retransmits {[r['retransmits'] for r in rs]}, Mbit/s "
            f"{[round(r['mbit_s']) for r in rs]}"
        )
        snmp = {k: statistics.median(r["beta_snmp"][k] for r in rs) for k in SNMP}
        lines.append(f"  {'':<{len(case)}}  beta {json.dumps(snmp)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=harness.bounded_int(1000, 200000), default=50000)
    parser.add_argument(
        "--seconds", type=harness.bounded_int(2, 120), default=30, help="of one iperf3 run"
    )
    parser.add_argument("--rounds", type=harness.bounded_int(1, 10), default=3)
    parser.add_argument(
        "--per-call",
        type=harness.bounded_int(1, 1024),
        default=64,
        help="datagrams the flooder sends a system call (1: sendto; more: sendmmsg)",
    )
    parser.add_argument(
        "--phase-s",
        type=float,
        default=1.0,
        help="phased: the flood changes every PHASE_S seconds of an iperf3 run (0: separate"
        " runs of each case)",
    )
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
