"""Idle cost and timer precision of a node: the CPU of an idle pair of nodes, and how late
control's deadline fires, for this checkout's code and (``--baseline REV``) another
revision's.

Each round starts the two nodes of the test bed's ``node_pair`` in the namespaces of
``veth_pair`` (encrypted: certified by a fresh authority, naming each other's key; ``--plain``
for plaintext), waits until their link is up and then ``--settle`` seconds, and measures
``--seconds`` of no traffic but the nodes' own (keepalives, liveness pings, DHT upkeep):

- **CPU** of each node's supervisor and each worker (utime+stime from ``/proc/PID/stat``), as
  percent of one core, per node and per stage;
- **deadline lateness**: what the control worker recorded of its deadline callbacks
  (``Worker.deadline_statistics``, ``deadlines`` in its stats in ``supervisor status --json``:
  how many fired, and p50, p99 and max lateness over the last 512, in ms), read at the end of
  the window. A revision whose control polls instead (before the re-armable deadline) has no
  such figure: "-".

The nodes are then stopped and the next round begins. With ``--baseline`` the rounds
alternate (baseline, current, baseline, ...; ``--rounds`` each), so that the noise of a shared
machine hits both alike; the baseline's tree is a temporary ``git worktree``
(``pipeline_bench.baseline_tree``). The load average before and after is printed with the
table, and everything goes to ``bench/results/idle-<timestamp>.json``.

Run as root from the repository root::

    python3 bench/idle_bench.py [--baseline REV] [--rounds 3] [--seconds 60] [--settle 10]
                                [--plain] [--json-only]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.pipeline_bench import baseline_tree, terminated  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("idle_bench", "idle", "idle")
log = BENCH.log
CURRENT = "current"


@dataclass
class Round:
    tree: str  # CURRENT or the baseline's short commit
    cpu_percent: dict[str, float]  # node -> % of one core (supervisor and workers)
    stage_percent: dict[str, dict[str, float]]  # node -> stage (or "supervisor") -> %
    deadlines: dict[str, dict[str, float]]  # node -> control's deadline statistics
    restarts: int  # workers whose pid changed in the window (their CPU is left out)


@dataclass
class Result:
    rounds: list[Round] = field(default_factory=list)


def stage_pids(node: testbed.Node) -> dict[int, str]:
    """pid -> its stage ("supervisor" for the supervisor), from ``status --json``."""
    st = testbed.wait_for(f"{node.name} status", node.status, timeout=15)
    pids = {int(st["supervisor_pid"]): "supervisor"}
    pids |= {int(w["pid"]): str(w["stage"]) for w in st["workers"] if w.get("pid")}
    return pids


def control_deadlines(node: testbed.Node) -> dict[str, float]:
    st = testbed.wait_for(f"{node.name} status", node.status, timeout=15)
    for w in st["workers"]:
        if w["stage"] == "control":
            return dict((w.get("stats") or {}).get("deadlines") or {})
    return {}


def measure_round(nodes: list[testbed.Node], tree: str, args: argparse.Namespace) -> Round:
    testbed.start_all(nodes, peers_up=True)
    try:
        time.sleep(args.settle)
        pids = {n.name: stage_pids(n) for n in nodes}
        before = {
            name: {pid: harness.proc_times(pid) for pid in node_pids}
            for name, node_pids in pids.items()
        }
        t0 = time.monotonic()
        time.sleep(args.seconds)
        wall = time.monotonic() - t0
        cpu: dict[str, float] = {}
        stages: dict[str, dict[str, float]] = {}
        restarts = 0
        for name, node_pids in pids.items():
            by_stage: dict[str, float] = {}
            for pid, stage in node_pids.items():
                old, new = before[name][pid], harness.proc_times(pid)
                if old is None or new is None or new.start != old.start:
                    restarts += 1
                    continue
                seconds = (new.own - old.own) / harness.CLK_TCK
                by_stage[stage] = by_stage.get(stage, 0.0) + 100.0 * seconds / wall
            stages[name] = by_stage
            cpu[name] = sum(by_stage.values())
        late = {n.name: control_deadlines(n) for n in nodes}
    finally:
        testbed.stop_all(nodes)
    return Round(tree, cpu, stages, late, restarts)


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], Result]:
    result = BENCH.new_result(args, "baseline", "rounds", "seconds", "settle", "plain")
    result["loadavg_before"] = os.getloadavg()
    signal.signal(signal.SIGTERM, terminated)
    data = Result()
    with contextlib.ExitStack() as stack:
        tb = stack.enter_context(testbed.Testbed("avi"))
        ns_a, ns_b = testbed.veth_pair(tb)

        def pair(key: str, tree: Path) -> list[testbed.Node]:
            a, b = testbed.node_pair(ns_a, ns_b, tmp / key, secure=not args.plain, source_tree=tree)
            return [a, b]

        trees: list[tuple[str, list[testbed.Node]]] = []
        if args.baseline is not None:
            base = stack.enter_context(baseline_tree(args.baseline, tmp / "baseline"))
            log(f"baseline {base.rev} = {base.short} ({base.subject})")
            result["baseline_commit"] = base.commit
            trees.append((base.short, pair("base", base.root)))
        trees.append((CURRENT, pair("current", harness.REPO)))
        for i in range(args.rounds):
            for tree, nodes in trees:
                log(f"{tree}: round {i + 1}/{args.rounds}: {args.seconds} s idle")
                done = measure_round(nodes, tree, args)
                log(f"{tree}: cpu {done.cpu_percent} deadlines {done.deadlines}")
                data.rounds.append(done)
    result["loadavg_after"] = os.getloadavg()
    result["rounds"] = [asdict(r) for r in data.rounds]
    return result, data


def render(result: dict[str, Any], data: Result) -> str:
    lines = [
        f"load average (1, 5, 15 min) before {result['loadavg_before']}, "
        f"after {result['loadavg_after']}; {result['machine']['nproc']} cores",
        "",
        "tree       node   cpu%   control%  fired  late p50 ms  p99 ms  max ms",
    ]
    for r in data.rounds:
        for name, cpu in r.cpu_percent.items():
            d = r.deadlines.get(name, {})
            figures = [
                harness.fmt(d.get(k), 3) for k in ("late_ms_p50", "late_ms_p99", "late_ms_max")
            ]
            control = r.stage_percent[name].get("control", 0.0)
            lines.append(
                f"{r.tree:<10} {name:<6} {cpu:5.2f}  {control:7.2f}"
                f"  {harness.fmt(d.get('fired'), 0):>5}  {figures[0]:>11}"
                f"  {figures[1]:>6}  {figures[2]:>6}"
            )
    lines.append("")
    lines.append("median over rounds and nodes:")
    for tree in dict.fromkeys(r.tree for r in data.rounds):
        mine = [r for r in data.rounds if r.tree == tree]
        cpu = statistics.median(c for r in mine for c in r.cpu_percent.values())
        ctl = statistics.median(
            r.stage_percent[n].get("control", 0.0) for r in mine for n in r.cpu_percent
        )
        p50 = [d["late_ms_p50"] for r in mine for d in r.deadlines.values() if "late_ms_p50" in d]
        p99 = [d["late_ms_p99"] for r in mine for d in r.deadlines.values() if "late_ms_p99" in d]
        late = "no deadline figures"
        if p50:
            late = f"deadline lateness p50 {statistics.median(p50):.3f} ms"
            late += f", p99 {statistics.median(p99):.3f} ms"
        restarts = sum(r.restarts for r in mine)
        lines.append(
            f"  {tree}: node idle CPU {cpu:.2f} % of a core (control {ctl:.2f} %); {late}"
            f"; restarts {restarts}"
        )
    lines.append(f"results: {result.get('file', '-')}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--baseline", metavar="REV", default=None, help="also measure this revision")
    p.add_argument("--rounds", type=harness.bounded_int(1, 20), default=3, help="rounds per tree")
    p.add_argument("--seconds", type=harness.bounded_int(5, 600), default=60, help="idle window")
    p.add_argument("--settle", type=harness.bounded_int(0, 120), default=10, help="after link up")
    p.add_argument("--plain", action="store_true", help="plaintext nodes instead of encrypted")
    p.add_argument("--json-only", action="store_true", help="print the JSON result")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
