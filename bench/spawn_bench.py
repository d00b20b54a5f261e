"""How workers start: the worker template (``supervisor/template.py``) against the plain spawn
(``AUTOVN_SPAWN=plain``: a fresh interpreter per worker), in one run.

For each start method, on the test bed's ``node_pair`` (encrypted, static IK peers, one
worker per stage) in the namespaces of ``veth_pair``:

- **time to connect**: ``--starts`` cold starts of both nodes, each timed from the moment
  ``supervisor start`` is run to the first echo reply from the other node's virtual address
  (``harness.first_reply``: a ping every 5 ms from the moment of the start). The methods
  alternate start by start, so the machine's noise hits both alike. For each start, a
  breakdown from node alpha's log (seconds after the start, medians over the starts): its
  first log line (interpreter, CLI imports, settings), the template ready, the first and
  last worker spawned, each stage's ``worker_started``, ``node_started``, the first
  ``session_established`` and ``peer_up``;
- **restart gap**: under a 10 ms ping from alpha to beta, each stage's worker of alpha is
  killed with SIGKILL ``--kills`` times; the gap is the longest time between two echo
  replies around the kill (median over the kills, per stage);
- **the CPU a start costs**: at the end of each cold start (once both nodes' peers are up),
  the CPU seconds each process of alpha has used since it began (``/proc/PID/schedstat``:
  the scheduler's own count), by role, and the node's sum (medians over the starts). Two
  nodes starting together on a 2-core machine are CPU-bound: this is what the time to
  connect is made of;
- **memory at rest**: ``--settle`` seconds after the peers are up, the PSS of the
  supervisor, the template and each worker of alpha (``/proc/PID/smaps_rollup``), and the
  node's sum.

The load average before and after is printed with the tables; everything also goes to
``bench/results/spawn-<timestamp>.json``. Run as root from the repository root::

    python3 bench/spawn_bench.py [--starts 5] [--kills 3] [--settle 5] [--methods plain,template]
                                 [--json-only]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from supervisor import testbed  # noqa: E402
from supervisor.node import SPAWN_ENV  # noqa: E402

BENCH = harness.Script("spawn_bench", "spawn", "spawn")
log = BENCH.log
METHODS = ("plain", "template")
STAGES = ("tap_reader", "classifier", "overlay_io", "control")
PING_INTERVAL_S = 0.01
#: breakdown columns: (label, event, stage or None, which of several: "first" or "last")
MILESTONES = (
    ("first log line", None, "supervisor", "first"),
    ("template ready", "template_ready", "supervisor", "first"),
    ("first spawned", "worker_spawned", "supervisor", "first"),
    ("last spawned", "worker_spawned", "supervisor", "last"),
    *((f"{s} started", "worker_started", s, "first") for s in STAGES),
    ("node_started", "node_started", "supervisor", "first"),
    ("session", "session_established", "control", "first"),
    ("peer_up", "peer_up", "control", "first"),
)
#: the milestones also shown for node beta (the later node gates the first reply)
OF_BETA = ("first log line", "template ready", "node_started", "session")


@contextlib.contextmanager
def method(name: str) -> Iterator[None]:
    """``AUTOVN_SPAWN`` for the supervisors started inside (they inherit our environment)."""
    old = os.environ.get(SPAWN_ENV)
    os.environ[SPAWN_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SPAWN_ENV, None)
        else:
            os.environ[SPAWN_ENV] = old


def _when(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()


def breakdown(
    node: testbed.Node, since: float, only: tuple[str, ...] = ()
) -> dict[str, float | None]:
    """Seconds after ``since`` (wall clock) of each milestone (or those in ``only``) in the
    node's log."""
    records = [r for r in node.log_records() if _when(r) >= since]
    out: dict[str, float | None] = {}
    for label, event, stage, which in MILESTONES:
        if only and label not in only:
            continue
        hits = [
            _when(r) - since
            for r in records
            if (event is None or r.get("event") == event) and r.get("stage") == stage
        ]
        out[label] = (min(hits) if which == "first" else max(hits)) if hits else None
    return out


def cold_start(
    nodes: list[testbed.Node], how: str
) -> tuple[float, dict[str, float | None], dict[str, float | None]]:
    a, b = nodes
    since = time.time()
    with method(how):

        def start() -> None:
            for n in nodes:
                n.start()

        seconds = harness.first_reply(a.ns, b.address, start)
        for n in nodes:
            n.wait_running()
            n.wait_peers_up()
    cpu = start_cpu(a)
    steps = breakdown(a, since)
    steps |= {f"beta: {k}": v for k, v in breakdown(b, since, OF_BETA).items()}
    testbed.stop_all(nodes)
    return seconds, steps, cpu


def _processes(node: testbed.Node) -> dict[str, int]:
    """The pid of each of the node's processes, by role (supervisor, template, stage:index)."""
    st = node.status()
    assert st is not None
    pids: dict[str, int] = {"supervisor": int(st["supervisor_pid"])}
    if st.get("template_pid"):
        pids["template"] = int(st["template_pid"])
    for w in st["workers"]:
        pids[f"{w['stage']}:{w['worker']}"] = int(w["pid"])
    return pids


def _with_sum(out: dict[str, float | None], digits: int) -> dict[str, float | None]:
    out["node"] = round(sum(v for v in out.values() if v is not None), digits)
    return out


def _on_cpu_s(pid: int) -> float | None:
    """Seconds ``pid`` has run on a CPU since it began, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def start_cpu(node: testbed.Node) -> dict[str, float | None]:
    """CPU seconds each of the node's processes has used since it began, and their sum."""
    out: dict[str, float | None] = {}
    for role, pid in _processes(node).items():
        used = _on_cpu_s(pid)
        out[role] = round(used, 3) if used is not None else None
    return _with_sum(out, 3)


def memory(node: testbed.Node) -> dict[str, float | None]:
    """PSS in MiB of the node's processes, by role, and their sum (``node``)."""
    out: dict[str, float | None] = {}
    for role, pid in _processes(node).items():
        kib = harness.pss_kib(pid)
        out[role] = round(kib / 1024, 1) if kib is not None else None
    return _with_sum(out, 1)


def _reply_times(lines: list[str]) -> list[float]:
    times = []
    for line in lines:
        found = re.match(r"\[(\d+\.\d+)\].*time=", line)
        if found:
            times.append(float(found.group(1)))
    return times


def restart_gap(a: testbed.Node, target: str, stage: str) -> tuple[float, float]:
    """The longest silence between echo replies (s) around a SIGKILL of ``stage``'s worker,
    and the restart back-off the supervisor applied (``restart_in_s``: it doubles when a
    worker dies again within 30 s, as it does here)."""
    old = a.worker_pid(stage)
    ping = a.ns.popen(
        ["ping", "-n", "-D", "-i", f"{PING_INTERVAL_S:g}", "-W", "1", target],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        os.kill(old, signal.SIGKILL)
        testbed.wait_for(f"{stage} back", lambda: a.worker_pid(stage) != old, timeout=30)
        a.wait_peers_up()
        time.sleep(1.0)
    finally:
        ping.send_signal(signal.SIGINT)
        out, _ = ping.communicate(timeout=10)
    text = out.decode() if isinstance(out, bytes) else str(out)  # text=True: str already
    times = _reply_times(text.splitlines())
    if len(times) < 2:
        raise RuntimeError(f"ping {target}: too few replies around the kill of {stage}")
    exits = [r for r in a.log_records() if r["event"] == "worker_exited"]
    backoff = next((float(r["restart_in_s"]) for r in exits if r["target_pid"] == old), 0.0)
    return max(t1 - t0 for t0, t1 in zip(times, times[1:], strict=False)), backoff


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    result = BENCH.new_result(args, "starts", "kills", "settle", "methods")
    result["load_start"] = harness.loadavg()
    methods: tuple[str, ...] = tuple(args.methods)
    connect: dict[str, list[float]] = {m: [] for m in methods}
    steps: dict[str, list[dict[str, float | None]]] = {m: [] for m in methods}
    cpus: dict[str, list[dict[str, float | None]]] = {m: [] for m in methods}
    gaps: dict[str, dict[str, list[float]]] = {m: {s: [] for s in STAGES} for m in methods}
    backoffs: dict[str, dict[str, list[float]]] = {m: {s: [] for s in STAGES} for m in methods}
    mem: dict[str, dict[str, float | None]] = {}
    with testbed.Testbed("avsp") as tb:
        nss = testbed.veth_pair(tb)
        nodes = list(testbed.node_pair(nss[0], nss[1], tmp / "pair", secure=True))
        for i in range(args.starts):
            for how in methods if i % 2 == 0 else reversed(methods):
                seconds, s, cpu = cold_start(nodes, how)
                connect[how].append(seconds)
                steps[how].append(s)
                cpus[how].append(cpu)
                log(f"{how}: start {i + 1}/{args.starts}: first echo reply after {seconds:.3f} s")
        for how in methods:
            with method(how):
                testbed.start_all(nodes, peers_up=True)
                try:
                    time.sleep(args.settle)
                    mem[how] = memory(nodes[0])
                    log(f"{how}: node alpha PSS {mem[how]['node']} MiB")
                    for stage in STAGES:
                        for k in range(args.kills):
                            gap, backoff = restart_gap(nodes[0], nodes[1].address, stage)
                            gaps[how][stage].append(gap)
                            backoffs[how][stage].append(backoff)
                            log(
                                f"{how}: kill {k + 1}/{args.kills} of {stage}: gap {gap:.3f} s"
                                f" (back-off {backoff:g} s)"
                            )
                finally:
                    testbed.stop_all(nodes)
    result["load_end"] = harness.loadavg()
    result["connect_s"] = connect
    result["breakdown_s"] = steps
    result["start_cpu_s"] = cpus
    result["restart_gap_s"] = gaps
    result["restart_backoff_s"] = backoffs
    result["pss_mib"] = mem
    return result, result


_median = harness.median_measured


def render(result: dict[str, Any], _: Any) -> str:
    lines = [
        f"load average start {result['load_start']}, end {result['load_end']}",
        "",
        "time to connect (start -> first echo reply), s: median [min-max]",
    ]
    med = {}
    methods = tuple(result["connect_s"])
    for how in methods:
        cs = result["connect_s"][how]
        med[how] = statistics.median(cs)
        lines.append(f"  {how:9} {med[how]:.3f} [{min(cs):.3f}-{max(cs):.3f}] over {len(cs)}")
    if set(med) == set(METHODS):
        lines.append(f"  template / plain: {harness.ratio(med['template'], med['plain'])}")
    lines += ["", "breakdown (node alpha, and some of beta; s after the start; medians)"]
    lines.append(f"  {'milestone':22}" + "".join(f"{h:>10}" for h in methods))
    for label in [m[0] for m in MILESTONES] + [f"beta: {k}" for k in OF_BETA]:
        cells = [_median([s[label] for s in result["breakdown_s"][h]]) for h in methods]
        lines.append(f"  {label:22}" + "".join(f"{harness.fmt(c, 3):>10}" for c in cells))
    lines += ["", "ping gap when a worker is killed (10 ms ping; median over kills), s;"]
    lines.append("  and the same less the supervisor's restart back-off of each kill")
    lines.append(f"  {'stage':12}" + "".join(f"{h:>10}{h + '-b':>12}" for h in methods))
    for stage in STAGES:
        row = f"  {stage:12}"
        for h in methods:
            gap = result["restart_gap_s"][h][stage]
            less = [g - b for g, b in zip(gap, result["restart_backoff_s"][h][stage], strict=True)]
            row += f"{harness.fmt(_median(gap), 3):>10}{harness.fmt(_median(less), 3):>12}"
        lines.append(row)
    lines += ["", "CPU a start costs, s (node alpha, each process since it began; medians)"]
    cpu_roles = sorted(
        {r for h in methods for s in result["start_cpu_s"].get(h, []) for r in s}, key=_role_order
    )
    lines.append(f"  {'process':14}" + "".join(f"{h:>10}" for h in methods))
    for role in cpu_roles:
        cells = [_median([s.get(role) for s in result["start_cpu_s"].get(h, [])]) for h in methods]
        lines.append(f"  {role:14}" + "".join(f"{harness.fmt(c, 3):>10}" for c in cells))
    lines += ["", "PSS at rest, MiB (node alpha)"]
    roles = sorted({r for h in methods for r in result["pss_mib"].get(h, {})}, key=_role_order)
    lines.append(f"  {'process':14}" + "".join(f"{h:>10}" for h in methods))
    for role in roles:
        cells = [result["pss_mib"].get(h, {}).get(role) for h in methods]
        lines.append(f"  {role:14}" + "".join(f"{harness.fmt(c, 1):>10}" for c in cells))
    lines.append(f"results: {result.get('file', '-')}")
    return "\n".join(lines)


def _role_order(role: str) -> tuple[int, str]:
    order = ["supervisor", "template", *(f"{s}:" for s in reversed(STAGES)), "node"]
    for i, prefix in enumerate(order):
        if role.startswith(prefix):
            return i, role
    return len(order), role


def _methods(text: str) -> tuple[str, ...]:
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(METHODS)}, not {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--starts", type=harness.bounded_int(1, 50), default=5, help="per method")
    p.add_argument("--kills", type=harness.bounded_int(1, 20), default=3, help="per stage")
    p.add_argument("--settle", type=harness.bounded_int(0, 120), default=5, help="before PSS")
    p.add_argument(
        "--methods",
        type=_methods,
        default=METHODS,
        help="start methods, comma-separated (default: plain,template)",
    )
    p.add_argument("--json-only", action="store_true", help="print the JSON result")
    args = p.parse_args(argv)
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
