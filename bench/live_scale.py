"""As many live nodes as the machine holds: how long until all are on the overlay and
registered, whether a sample of pairs reach each other by name, what a node weighs, and what
the whole network costs at rest.

The layout: ``--segments`` bridged segments (198.18.k.0/24, in namespaces ``seg<k>``) joined
by a router namespace (``rt``, forwarding on inside it only); ``--nodes`` nodes dealt round
the segments (node i on segment i mod k), each in its own namespace, certified by one fresh
authority, with a static virtual address 100.64.0.(i+1)/24 and host name ``n<i+1>`` in
``vpn.test``, knowing only the first node's underlay address 198.18.0.1. All are started at
once (``supervisor start`` in each namespace, one after the other without waiting), then:

- **joined / registered**: per node, seconds from the moment the bench started it to its
  control worker's ``worker_started`` (the interpreter up and the stage set up), and to
  control's ``overlay_joined`` and ``address_registered`` log records (the node's own
  timestamps: no polling of ``status``, which would cost a process per node per look);
  median, p90 and max, and the time until the last node registered;
- **pairs by name**: ``--pairs`` random pairs (a, b): a asks the DNS of its own node
  (100.64.0.254 on its TAP) for ``n<b>.vpn.test`` with ``dig``, then pings the answer; the
  seconds until the first echo reply (the first packets wait while the node resolves the
  address through the DHT) and the RTT of 5 more;
- **memory**: PSS (``/proc/PID/smaps_rollup``) of each node's supervisor, worker template
  and workers, summed per node (median, max) and per process kind (median);
- **at rest**: after ``--settle`` seconds, the CPU of every node process over ``--rest``
  seconds, in percent of one core: all nodes together and per node;
- **one joiner** (``--joiners J``, default 0): then J more nodes (namespaces ``j<i>`` dealt
  round the segments, knowing only the first node like the others), one at a time: each is
  started, timed from ``supervisor start`` to each step of its join in its own log (control
  up, the bootstrap link up, the first overlay connection, the first near connection,
  ``overlay_placed``, ``overlay_joined``, the address record's create sent,
  ``address_registered``), then stopped (the overlay stays at ``--nodes``), and the next
  starts ``--joiner-gap`` seconds after it is gone; median, p90 and max per step. A
  stopping node says nothing to the overlay (control stops after overlay_io): with the
  default gap the next joiner's neighbours still name the last one, as after a crash; a
  gap of 30 s lets them forget it.

With ``--baseline REV`` every node runs REV's code (a temporary ``git worktree``, as in
``pipeline_bench.py``) instead of this checkout's; run it and the plain command one after
the other (several times: the machine's load moves) to compare.

Progress on stderr; the tables on stdout (``--json``: the result); the result in
``bench/results/scale-<timestamp>.json``. Needs root, ``dig`` and ``ping``.

    python3 bench/live_scale.py [--nodes 40] [--segments 4] [--pairs 10] [--settle 10]
                                [--rest 30] [--timeout 120] [--joiners 0] [--joiner-gap 3]
                                [--baseline REV] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.pipeline_bench import baseline_tree  # noqa: E402
from supervisor import testbed  # noqa: E402
from supervisor.testbed.layouts import member  # noqa: E402
from supervisor.testbed.nodes import DOMAIN, Authority, Node  # noqa: E402

BENCH = harness.Script("live_scale", "scale", "scale")
log = BENCH.log
GATEWAY = "100.64.0.254"  # each node's classifier answers DNS here, on its TAP's subnet
KINDS = ("supervisor", "template", "tap_reader", "classifier", "overlay_io", "control")


def build(
    tb: testbed.Testbed,
    tmp: Path,
    count: int,
    segments: int,
    joiners: int = 0,
    source_tree: Path | None = None,
) -> tuple[list[Node], list[Node]]:
    """The ``count`` nodes and the ``joiners`` (namespaces ``j<i>``, addresses from
    198.18.k.101 and 100.64.0.101 on), running ``source_tree``'s code (None: this
    checkout's)."""
    authority = Authority.create(tmp / "authority")
    router = tb.namespace("rt")
    router.sysctl("net.ipv4.ip_forward", "1")
    hubs = []
    for k in range(segments):
        hub = tb.namespace(f"seg{k}")
        bridge = tb.bridge(hub, f"br{k}")
        tb.attach(router, hub, bridge, f"198.18.{k}.254/24", ifname=f"seg{k}")
        hubs.append((hub, bridge))
    nodes, late = [], []
    for i in range(count + joiners):
        joiner = i >= count
        j = i - count
        k = (j if joiner else i) % segments
        host = 101 + j // segments if joiner else i // segments + 1
        name = f"j{j + 1}" if joiner else f"n{i + 1}"
        virtual = f"100.64.0.{101 + j}" if joiner else f"100.64.0.{i + 1}"
        underlay = f"198.18.{k}.{host}"
        ns = tb.namespace(name)
        hub, bridge = hubs[k]
        tb.attach(ns, hub, bridge, f"{underlay}/24", ifname="eth0")
        for other in range(segments):
            if other != k:
                ns.ip("route", "add", f"198.18.{other}.0/24", "via", f"198.18.{k}.254")
        node = member(
            ns, tmp, authority, name, underlay, virtual, first=i == 0, domain=DOMAIN,
            source_tree=source_tree,
        )  # fmt: skip
        (late if joiner else nodes).append(node)
    return nodes, late


EVENTS = ("control_started", "overlay_joined", "address_registered")


def _event_times(node: Node) -> dict[str, float]:
    """Wall-clock time of the first record of each event in the node's log; control's
    ``worker_started`` as ``control_started`` (its interpreter up, its stage set up)."""
    out: dict[str, float] = {}
    if not node.log_file.exists():
        return out
    for rec in node.log_records():
        event, stamp = rec.get("event"), rec.get("timestamp")
        if event == "worker_started" and rec.get("stage") == "control":
            event = "control_started"
        if isinstance(event, str) and isinstance(stamp, str) and event not in out:
            out[event] = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return out


def wait_registered(
    nodes: list[Node], started: dict[str, float], timeout: float
) -> dict[str, dict[str, float | None]]:
    """Per node: seconds from its start to ``overlay_joined`` and ``address_registered``
    (None if not within ``timeout`` of the first start)."""
    first = min(started.values())
    found: dict[str, dict[str, float]] = {n.name: {} for n in nodes}
    while True:
        for n in nodes:
            times = found[n.name]
            if "address_registered" in times:
                continue
            events = _event_times(n)
            for event in EVENTS:
                if event in events:
                    times[event] = events[event] - started[n.name]
        done = sum("address_registered" in t for t in found.values())
        if done == len(nodes) or time.time() - first > timeout:
            break
        log(f"{done}/{len(nodes)} registered after {time.time() - first:.1f} s")
        time.sleep(1.0)
    return {name: {e: t.get(e) for e in EVENTS} for name, t in found.items()}


JOIN_STEPS = (
    ("control_started", "control up"),
    ("bootstrap_link", "bootstrap link up"),
    ("first_connection", "first overlay connection"),
    ("first_near", "first near connection"),
    ("overlay_placed", "placed on the circle"),
    ("overlay_joined", "joined"),
    ("register_sent", "registration sent"),
    ("address_registered", "registered"),
)


def _join_steps(node: Node) -> dict[str, float]:
    """Wall-clock time of each step of a lone joiner's join (:data:`JOIN_STEPS`) in its
    log: the first ``link_formed`` (the bootstrap link), the first
    ``overlay_connection_added`` and the first of kind near, ``overlay_placed``, the first
    ``address_registering`` (the create sent)."""
    out = _event_times(node)
    firsts = {"link_formed": "bootstrap_link", "overlay_placed": "overlay_placed",
              "overlay_connection_added": "first_connection",
              "address_registering": "register_sent"}  # fmt: skip
    for rec in node.log_records():
        event, stamp = rec.get("event"), rec.get("timestamp")
        if not isinstance(event, str) or not isinstance(stamp, str):
            continue
        steps = [firsts.get(event)]
        if event == "overlay_connection_added" and rec.get("kind") == "near":
            steps.append("first_near")
        for step in steps:
            if step is not None and step not in out:
                out[step] = _stamp(stamp)
    return out


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def join_one_by_one(
    joiners: list[Node], gap: float, timeout: float, keep_logs: Path | None = None
) -> dict[str, Any]:
    """Start each joiner alone, time the steps of its join, stop it, wait ``gap`` s;
    ``keep_logs``: copy each joiner's log there (``<name>.log``)."""
    per_node: dict[str, dict[str, float | None]] = {}
    for n in joiners:
        started = time.time()
        n.start()
        while time.time() - started < timeout:
            if "address_registered" in _event_times(n):
                break
            time.sleep(0.2)
        steps = _join_steps(n)
        per_node[n.name] = {s: round(steps[s] - started, 3) if s in steps else None
                            for s, _ in JOIN_STEPS}  # fmt: skip
        log(f"joiner {n.name}: {per_node[n.name]}")
        processes = n.processes()
        n.cli("stop", str(n.config), check=False, timeout=40)
        n.wait_gone(processes)
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(n.log_file, keep_logs / f"{n.name}.log")
        time.sleep(gap)
    out: dict[str, Any] = {"per_node": per_node}
    for step, _ in JOIN_STEPS:
        seen = sorted(v for t in per_node.values() if (v := t[step]) is not None)
        out[step] = {"n": len(seen),
                     "median": statistics.median(seen) if seen else None,
                     "p90": harness.percentile(seen, 90) if seen else None,
                     "max": seen[-1] if seen else None}  # fmt: skip
    return out


def resolve(node: Node, name: str, timeout: float = 15.0) -> tuple[str | None, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        res = node.ns.run(
            ["dig", "+short", "+time=1", "+tries=1", f"@{GATEWAY}", name], check=False, timeout=10
        )
        words = [w for w in res.stdout.split() if re.fullmatch(r"[\d.]+", w)]
        if res.returncode == 0 and words:
            return words[0], time.monotonic() - started
        time.sleep(0.2)
    return None, time.monotonic() - started


def pair_check(a: Node, b: Node) -> dict[str, Any]:
    address, resolve_s = resolve(a, f"{b.name}.{DOMAIN}")
    row: dict[str, Any] = {"from": a.name, "to": b.name, "address": address}
    row["resolve_s"] = round(resolve_s, 3)
    if address is None:
        return row
    try:
        row["first_reply_s"] = round(
            harness.first_reply(a.ns, address, lambda: None, timeout=15.0), 3
        )
        row["rtt_ms"] = statistics.median(harness.ping_times(a.ns, address, 5, interval=0.05))
    except RuntimeError:  # no reply within the time, or none of the 5
        row.setdefault("first_reply_s", None)
        row["rtt_ms"] = None
    return row


def memory(nodes: list[Node]) -> dict[str, Any]:
    per_node: dict[str, float] = {}
    per_kind: dict[str, list[float]] = {k: [] for k in KINDS}
    for n in nodes:
        st = n.status()
        if st is None:
            continue
        total = 0.0
        rows = [("supervisor", int(st["supervisor_pid"]))]
        if st.get("template_pid"):
            rows.append(("template", int(st["template_pid"])))
        rows += [(w["stage"], int(w["pid"])) for w in st["workers"] if w.get("pid")]
        for kind, pid in rows:
            kib = harness.pss_kib(pid)
            if kib is None:
                continue
            total += kib / 1024
            per_kind.setdefault(kind, []).append(kib / 1024)
        per_node[n.name] = round(total, 1)
    values = sorted(per_node.values())
    return {
        "node_pss_mib": per_node,
        "node_pss_mib_median": statistics.median(values) if values else None,
        "node_pss_mib_max": values[-1] if values else None,
        "process_pss_mib_median": {
            k: round(statistics.median(v), 1) for k, v in per_kind.items() if v
        },
    }


def at_rest(nodes: list[Node], seconds: float) -> dict[str, Any]:
    roots = [n.pids()[0] for n in nodes]
    before = harness.tree_times(roots)
    started = time.monotonic()
    time.sleep(seconds)
    after = harness.tree_times(roots)
    wall = time.monotonic() - started
    ticks = harness.ticks_between(before, after)
    total = 100 * ticks / harness.CLK_TCK / wall
    return {"seconds": round(wall, 1), "all_nodes_percent": round(total, 2),
            "per_node_percent": round(total / len(nodes), 3)}  # fmt: skip


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], None]:
    result = BENCH.new_result(
        args, "nodes", "segments", "pairs", "settle", "rest", "timeout", "joiners", "joiner_gap",
        "baseline",
    )  # fmt: skip
    result["loadavg_before"] = harness.loadavg()
    with contextlib.ExitStack() as stack, testbed.Testbed("scale") as tb:
        tree = None
        if args.baseline:
            base = stack.enter_context(baseline_tree(args.baseline, tmp / "baseline"))
            result["tree"], tree = base.commit[:10], base.root
        log(f"building {args.nodes} (+{args.joiners}) namespaces on {args.segments} segments")
        nodes, joiners = build(tb, tmp, args.nodes, args.segments, args.joiners, tree)
        started: dict[str, float] = {}
        log(f"starting {len(nodes)} nodes at once")
        for n in nodes:
            started[n.name] = time.time()
            n.start()
        first = min(started.values())
        joins = wait_registered(nodes, started, args.timeout)
        registered = [t["address_registered"] for t in joins.values()]
        done = [t for t in registered if t is not None]
        last = max(
            (started[name] + t["address_registered"] - first)
            for name, t in joins.items()
            if t["address_registered"] is not None
        ) if done else None  # fmt: skip
        result["join"] = {
            "per_node": joins,
            "registered": len(done),
            "all_registered_s": last if len(done) == len(nodes) else None,
            "registered_s_median": statistics.median(done) if done else None,
            "registered_s_p90": harness.percentile(done, 90) if done else None,
            "registered_s_max": max(done) if done else None,
        }
        for event in ("control_started", "overlay_joined"):
            seen = [v for t in joins.values() if (v := t[event]) is not None]
            result["join"][f"{event}_s_median"] = statistics.median(seen) if seen else None
        log(f"{len(done)}/{len(nodes)} registered; last {last} s after the first start")
        rng = random.Random(args.seed)
        pairs = [tuple(rng.sample(nodes, 2)) for _ in range(args.pairs)]
        rows = []
        for a, b in pairs:
            rows.append(pair_check(a, b))
            log(f"pair {a.name} -> {b.name}: {rows[-1]}")
        result["pairs"] = rows
        log(f"settling {args.settle} s")
        time.sleep(args.settle)
        result["memory"] = memory(nodes)
        log(f"at rest for {args.rest} s")
        result["rest"] = at_rest(nodes, args.rest)
        if args.keep_logs is not None:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for n in nodes:
                shutil.copyfile(n.log_file, args.keep_logs / f"{n.name}.log")
        if joiners:
            result["joiners"] = join_one_by_one(
                joiners, args.joiner_gap, args.timeout, args.keep_logs
            )
    result["loadavg_after"] = harness.loadavg()
    return result, None


def render(result: dict[str, Any], _: None) -> str:
    a = result["args"]
    j, m, r = result["join"], result["memory"], result["rest"]
    f = harness.fmt
    lines = [
        f"autovn live scale  {result['timestamp']}",
        f"{a['nodes']} nodes on {a['segments']} segments joined by a router, each knowing only "
        f"the first; all started at once; load avg {result['loadavg_before']} before, "
        f"{result['loadavg_after']} after"
        + (f"; the code of {result['tree']}" if result.get("tree") else ""),
        "",
        f"registered                     {j['registered']}/{a['nodes']}",
        f"all registered after (s)       {f(j['all_registered_s'], 2)}",
        f"start -> registered median (s) {f(j['registered_s_median'], 2)}",
        f"start -> registered p90 (s)    {f(j['registered_s_p90'], 2)}",
        f"start -> registered max (s)    {f(j['registered_s_max'], 2)}",
        f"start -> control up median (s) {f(j['control_started_s_median'], 2)}",
        f"start -> joined median (s)     {f(j['overlay_joined_s_median'], 2)}",
        "",
        "pair                  resolve s  first reply s  rtt ms",
    ]
    for row in result["pairs"]:
        lines.append(
            f"{row['from'] + ' -> ' + row['to']:20s}  {f(row.get('resolve_s'), 2):>9}  "
            f"{f(row.get('first_reply_s'), 2):>13}  {f(row.get('rtt_ms'), 3):>6}"
        )
    ok = sum(1 for row in result["pairs"] if row.get("rtt_ms") is not None)
    lines += [
        f"pairs answering by name: {ok}/{len(result['pairs'])}",
        "",
        f"node PSS MiB median / max      {f(m['node_pss_mib_median'])} / "
        f"{f(m['node_pss_mib_max'])}",
        "process PSS MiB (median)       "
        + ", ".join(f"{k} {v}" for k, v in m["process_pss_mib_median"].items()),
        f"at rest, all nodes (% of a core over {r['seconds']} s)  {r['all_nodes_percent']}",
        f"at rest, per node (% of a core)                  {r['per_node_percent']}",
    ]
    if "joiners" in result:
        lines += [
            "",
            f"{a['joiners']} joiners one at a time into the {a['nodes']}: s from start",
            "step                        n  median     p90     max",
        ]
        for step, label in JOIN_STEPS:
            s = result["joiners"][step]
            lines.append(
                f"{label:26s} {s['n']:2d}  {f(s['median'], 3):>6}  {f(s['p90'], 3):>6}  "
                f"{f(s['max'], 3):>6}"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=harness.bounded_int(2, 250), default=40)
    p.add_argument("--segments", type=harness.bounded_int(1, 16), default=4)
    p.add_argument("--pairs", type=harness.bounded_int(0, 1000), default=10)
    p.add_argument("--settle", type=float, default=10.0, help="seconds before measuring memory")
    p.add_argument("--rest", type=float, default=30.0, help="seconds of CPU measured at rest")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all")
    joiners = harness.bounded_int(0, 100)
    p.add_argument("--joiners", type=joiners, default=0, help="then joined one at a time")
    p.add_argument("--joiner-gap", type=float, default=3.0, help="s from one gone to the next")
    p.add_argument("--baseline", metavar="REV", default=None, help="run this revision's code")
    p.add_argument("--keep-logs", type=Path, help="copy the nodes' logs to this directory")
    p.add_argument("--seed", type=int, default=1, help="for the choice of pairs")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    args = p.parse_args()
    return BENCH.main(args, run, render, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
