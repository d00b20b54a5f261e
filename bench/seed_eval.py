"""The seed's evaluation reproduced: what the VPN costs the application beside it, interface
mode against router mode, over a rate-limited underlay.

The seed (IPOP's slides, after the SC'09 and VTDC'09 papers) ran netperf TCP_STREAM and
TCP_RR while SPECjbb ran on the same machines, with the servers' shared link limited by
``tc`` to 10, 50, 100 and 1000 Mbit/s; it plotted bandwidth (and transactions/s) against the
SPECjbb score, normalised both (measured / max) and summed them. Here, on one machine:

- **topology**: ``bench/router_bench.py``'s: two site namespaces joined by one veth
  (``wan0``, 198.18.0.1/.2) whose two ends get a tbf token bucket (``Testbed.rate_limit``)
  of each ``--limits`` rate in turn, and none (unlimited). *interface*: a node in interface
  mode in each site namespace, the application runs beside it. *router*: a node in router
  mode per site on a bridge, ``--machines`` machine namespaces behind it with only a DHCP
  client; the application runs on machine ``mb1``, the client on ``ma1``. Traffic goes from
  site A (the client) to site B (the server, where the application's CPU load runs).
- **bandwidth**: iperf3 TCP, one stream, A -> B, ``--seconds`` long (receiver's rate).
- **transactions/s**: netperf is not in Debian's archive, so a TCP_RR of our own
  (``bench/seed_tools.py``): one connection, TCP_NODELAY, 1-byte request, 1-byte response,
  back to back for ``--seconds``.
- **the application, standing in for SPECjbb**: a fixed-work CPU benchmark
  (``seed_tools.work_unit``, pure Python) whose score is units of work per second, run on the
  server side for the same ``--seconds`` as the traffic beside it.
- **pinning** (``--pin vm``, the default, when the machine has at least 2 CPUs), like the
  seed's VMs: CPU 1 is the server's machine: the load, the iperf3 and TCP_RR servers, and in
  interface mode the server's node (a VN interface inside the VM); CPU 0 holds everything
  else: the clients, site A's node and, in router mode, both routers (the router is a VM of
  its own; in the seed a 5th VM). ``sched_setaffinity`` on every thread of every process.
  ``--pin none`` pins nothing. Kernel work in softirq (veth, bridge, TAP, TCP/IP, tbf) runs
  where the kernel puts it: no pinning reaches it.
- ``--repeats`` rounds; in each, every mode in turn is built in a fresh testbed, measured
  once and removed (so a change in the machine's other load hits both modes alike): the
  VTDC paths, the load alone (VPN idle, no traffic), then per limit stream alone, stream +
  load, TCP_RR alone, TCP_RR + load, then the load alone again. Medians over the rounds.
- **normalisations** (the seed's): bandwidth: ``bw with load / max bw + score / max score``;
  latency: ``tps with load / max tps + score / max score``. ``max bw`` and ``max tps`` are the
  largest median at that limit (any mode, with or without load); ``max score`` the largest
  median score measured anywhere (the load alone, usually).
- **VTDC tables**: per mode, with no limit and no load: ping (p50) and iperf3 (both ways)
  host-to-host (the underlay addresses) against virtual-to-virtual, as router_bench
  measures them; for router mode "measured" (machine to machine through the routers),
  "expected" (interface mode's virtual-to-virtual of this run) and "physical" (the routers'
  host-to-host).

It writes every figure to ``bench/results/seed-<timestamp>.json`` and PNG plots in the
seed's layout (bandwidth vs score, normalised bandwidth, transactions vs score, normalised
latency; one curve per mode) to ``--plots DIR`` (default ``bench/results/seed-<timestamp>/``);
the plots need matplotlib: ``pip install -e '.[eval]'``. ``--plot FILE.json`` redraws the
plots of a results file (no root needed). Progress on stderr; the tables on stdout.

Run as root from the repository root::

    python3 bench/seed_eval.py [--limits 10,50,100,1000] [--seconds 5] [--repeats 3]
                               [--pings 100] [--modes interface,router] [--machines 2]
                               [--pin vm|none] [--plots DIR] [--quick] [--json]
    python3 bench/seed_eval.py --plot bench/results/seed-<timestamp>.json [--plots DIR]

Everything (namespaces, nodes, DHCP clients, servers, the load) lives in a ``Testbed``:
removed on exit, on failure and on Ctrl-C; nothing touches the root namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness, router_bench  # noqa: E402
from bench.seed_tools import RR_PORT  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("seed_eval", "seed-eval", "seed")
log = BENCH.log
TOOLS = Path(__file__).resolve().parent / "seed_tools.py"
MODES = router_bench.MODES
APP_CPU, OTHER_CPU = 1, 0
INSTALL_HINT = (
    "matplotlib is missing: the plots need it. Install the optional extra with "
    "`pip install -e '.[eval]'` (or `pip install 'matplotlib>=3.8,<4'`), then redraw with "
    "`python3 bench/seed_eval.py --plot FILE.json`"
)
RR_NOTE = (
    "transactions/s: a TCP_RR of our own (bench/seed_tools.py: one connection, TCP_NODELAY, "
    "1-byte request and response), not netperf, which Debian's archive lacks"
)
LOAD_NOTE = (
    "benchmark score: a fixed-work pure-Python CPU load (bench/seed_tools.py work_unit) in "
    "place of SPECjbb, in units of work per second"
)

# the measurements per mode and limit, as named in the JSON
KINDS = ("bw_alone", "bw_load", "score_stream", "tps_alone", "tps_load", "score_rr")


# ----------------------------------------------------------------------------------------------
# the seed's normalisations (pure)


def _largest(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _over(value: float | None, top: float | None) -> float | None:
    if value is None or top is None or top <= 0:
        return None
    return value / top


def normalise(
    medians: dict[str, dict[str, dict[str, float | None]]], idle_scores: dict[str, float | None]
) -> dict[str, dict[str, dict[str, dict[str, float | None]]]]:
    """The seed's normalisations of ``medians[mode][limit][kind]`` (``KINDS``).

    Per mode and limit: ``bandwidth`` = {``bw``: bw_load / max bw, ``score``: score_stream /
    max score, ``sum``}; ``latency`` = {``tps``: tps_load / max tps, ``score``: score_rr /
    max score, ``sum``}. max bw and max tps: the largest at that limit over every mode, with
    or without the load; max score: the largest anywhere, ``idle_scores`` (per mode, the load
    alone) included. A missing figure gives None, not a crash."""
    limits = {label for by_limit in medians.values() for label in by_limit}
    scores = [
        s
        for by_limit in medians.values()
        for m in by_limit.values()
        for s in (m.get("score_stream"), m.get("score_rr"))
    ]
    top_score = _largest([*scores, *idle_scores.values()])
    out: dict[str, dict[str, dict[str, dict[str, float | None]]]] = {}
    for label in limits:
        here = [by_limit[label] for by_limit in medians.values() if label in by_limit]
        top_bw = _largest([m.get(k) for m in here for k in ("bw_alone", "bw_load")])
        top_tps = _largest([m.get(k) for m in here for k in ("tps_alone", "tps_load")])
        for mode, by_limit in medians.items():
            if label not in by_limit:
                continue
            m = by_limit[label]
            bw, s1 = _over(m.get("bw_load"), top_bw), _over(m.get("score_stream"), top_score)
            tps, s2 = _over(m.get("tps_load"), top_tps), _over(m.get("score_rr"), top_score)
            out.setdefault(mode, {})[label] = {
                "bandwidth": {"bw": bw, "score": s1, "sum": _sum(bw, s1)},
                "latency": {"tps": tps, "score": s2, "sum": _sum(tps, s2)},
            }
    return out


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------
# pinning


def can_pin() -> bool:
    return {APP_CPU, OTHER_CPU} <= os.sched_getaffinity(0)


def pin_tree(roots: Sequence[int], cpu: int) -> int:
    """Pin every thread of every process under ``roots`` to ``cpu``; how many threads."""
    count = 0
    for pid in harness.tree_times(roots):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, {cpu})
                count += 1
            except OSError:  # the thread is gone
                pass
    return count


# ----------------------------------------------------------------------------------------------
# the application and the TCP_RR


class Load:
    """The fixed-work CPU load, running in ``ns`` (pinned to ``cpu`` if not None), driven
    through its stdin."""

    def __init__(self, ns: testbed.Namespace, cpu: int | None) -> None:
        argv = [sys.executable, str(TOOLS), "load", *([] if cpu is None else ["--cpu", str(cpu)])]
        self.proc = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the CPU load did not start")
        self.ns = ns

    def go(self, seconds: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {seconds:g}\n".encode())
        self.proc.stdin.flush()

    def score(self) -> float:
        assert self.proc.stdout is not None
        report = json.loads(self.proc.stdout.readline())
        if "ops_s" not in report:
            raise RuntimeError(f"CPU load: {report}")
        return float(report["ops_s"])

    def alone(self, seconds: float) -> float:
        self.go(seconds)
        return self.score()

    def stop(self) -> None:
        self.ns.testbed.stop(self.proc)


def rr_client(ns: testbed.Namespace, target: str, seconds: float) -> float:
    res = ns.run(
        [
            sys.executable,
            str(TOOLS),
            "rr-client",
            target,
            "--port",
            str(RR_PORT),
            "--seconds",
            f"{seconds:g}",
        ],
        check=False,
        timeout=seconds + 30,
    )
    try:
        return float(json.loads(res.stdout)["tps"])
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"TCP_RR to {target}: rc {res.returncode}: {res.stderr[-300:]}") from e


def start_rr_server(ns: testbed.Namespace) -> subprocess.Popen[bytes]:
    proc = ns.popen([sys.executable, str(TOOLS), "rr-server"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"listening":
        raise RuntimeError(f"TCP_RR server in {ns.name} did not start")
    return proc


# ----------------------------------------------------------------------------------------------
# measuring


@dataclass
class Cell:
    """One mode x limit: every run."""

    runs: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    # node trees' CPU from the stream beside the load to the TCP_RR beside the load
    vpn_cpu_s: list[float] = field(default_factory=list)
    iperf_bytes: int = 0  # what the iperf3 receivers counted, for the overlay check
    others_cores: list[float] = field(default_factory=list)

    def medians(self) -> dict[str, float | None]:
        return {k: median(v) for k, v in self.runs.items()}


@dataclass
class Running:
    """A mode with what the seed's evaluation adds to router_bench's: servers and the load."""

    mode: router_bench.Mode
    path: router_bench.Path_  # the virtual path: client at A, application at B
    load: Load
    pinned: dict[str, str]


def setup_mode(
    name: str, mode: router_bench.Mode, args: argparse.Namespace
) -> tuple[Running, list[subprocess.Popen[bytes]]]:
    path = mode.paths["virtual"]
    app = [harness.start_iperf_server(path.server), start_rr_server(path.server)]
    others = {p.server.name: p.server for p in mode.paths.values()}
    others.pop(path.server.name)  # router mode's host-to-host path ends at site B's router
    servers = [*app, *(harness.start_iperf_server(ns) for ns in others.values())]
    pinned: dict[str, str] = {}
    if args.pin == "vm":
        sups = router_bench.supervisor_pids(mode.nodes)
        # node 0 is site A's, node 1 site B's; in interface mode B's node is in the VM
        b_cpu = APP_CPU if name == "interface" else OTHER_CPU
        pin_tree([sups[0]], OTHER_CPU)
        pin_tree([sups[1]], b_cpu)
        pin_tree([s.pid for s in app], APP_CPU)
        pinned = {
            mode.nodes[0].name: f"cpu {OTHER_CPU}",
            mode.nodes[1].name: f"cpu {b_cpu}",
            "iperf3 -s, TCP_RR server, CPU load (the application)": f"cpu {APP_CPU}",
            "clients (iperf3 -c, TCP_RR client, ping) and the bench": f"cpu {OTHER_CPU}",
        }
    load = Load(path.server, APP_CPU if args.pin == "vm" else None)
    return Running(mode, path, load, pinned), servers


def measure_cell(
    cell: Cell, run: Running, args: argparse.Namespace, netns: frozenset[int], what: str
) -> None:
    p, secs = run.path, args.seconds
    sups = p.supervisors
    for i in range(args.repeats):
        before_others = harness.others_snapshot(netns)
        t0 = time.monotonic()
        alone = harness.run_iperf(p.client, p.target, secs, False, log)
        before = harness.tree_times(sups)
        run.load.go(secs)
        loaded = harness.run_iperf(p.client, p.target, secs, False, log)
        cell.runs["score_stream"].append(run.load.score())
        cell.runs["bw_alone"].append(alone.mbit_s)
        cell.runs["bw_load"].append(loaded.mbit_s)
        cell.iperf_bytes += alone.bytes + loaded.bytes
        cell.runs["tps_alone"].append(rr_client(p.client, p.target, secs))
        run.load.go(secs)
        tps = rr_client(p.client, p.target, secs)
        cell.runs["score_rr"].append(run.load.score())
        cell.runs["tps_load"].append(tps)
        after = harness.tree_times(sups)
        cell.vpn_cpu_s.append(harness.ticks_between(before, after) / harness.CLK_TCK)
        others = harness.others_cores(
            before_others, harness.others_snapshot(netns), time.monotonic() - t0
        )
        cell.others_cores.append(others)
        r = {k: v[-1] for k, v in cell.runs.items()}
        log(
            f"{what} {i + 1}/{args.repeats}: stream {r['bw_alone']:.1f} alone, "
            f"{r['bw_load']:.1f} Mbit/s with load (score {r['score_stream']:.0f}); "
            f"RR {r['tps_alone']:.0f} alone, {r['tps_load']:.0f} tps with load (score "
            f"{r['score_rr']:.0f}); others {others:.2f} cores"
        )


def idle_scores(run: Running, args: argparse.Namespace, what: str) -> list[float]:
    scores = [run.load.alone(args.seconds) for _ in range(args.repeats)]
    log(f"{what}: load alone (VPN idle) " + ", ".join(f"{s:.0f}" for s in scores) + " ops/s")
    return scores


def overlay_health(mode: router_bench.Mode, received: int) -> dict[str, Any]:
    """Each worker's restarts, and whether the overlay carried the virtual iperf3 bytes."""
    settled = harness.settled_health(mode.nodes)
    sent = sum(h["overlay_bytes_sent"] for h in settled.values())
    return {
        "restarts": {name: h["restarts"] for name, h in settled.items()},
        "overlay_check": harness.overlay_check(sent, received, "virtual iperf3"),
    }


# ----------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], None]:
    """``--repeats`` rounds; in each, every mode in turn is built in a fresh testbed, measured
    once (VTDC paths, the load alone, every limit, the load alone again) and removed, so that
    a change in the machine's other load hits both modes alike. Medians over the rounds."""
    limits: list[float | None] = [None, *args.limits]
    labels = [router_bench.limit_label(x) for x in limits]
    options = ("limits", "seconds", "repeats", "pings", "modes", "machines", "pin")
    result = BENCH.new_result(args, *options) | {
        "limits": labels,
        "notes": [RR_NOTE, LOAD_NOTE],
        "uptime_before": Path("/proc/loadavg").read_text().split()[:3],
        "modes": {name: {"overlay_checks": []} for name in args.modes},
    }
    if args.pin == "vm":
        os.sched_setaffinity(0, {OTHER_CPU})  # the bench and its clients: the other CPU
    cells = {name: {label: Cell() for label in labels} for name in args.modes}
    idle: dict[str, list[float]] = {name: [] for name in args.modes}
    paths = {
        name: {path: router_bench.Cell("", "") for path in router_bench.PATHS}
        for name in args.modes
    }
    once = argparse.Namespace(**{**vars(args), "repeats": 1})
    authority = testbed.Authority.create(tmp / "authority")
    t0 = time.monotonic()
    for r in range(args.repeats):
        for name in args.modes:
            what = f"round {r + 1}/{args.repeats} {name}"
            root = tmp / f"{name}-{r + 1}"
            try:
                info = one_round(
                    name,
                    root,
                    authority,
                    args,
                    once,
                    limits,
                    cells[name],
                    idle[name],
                    paths[name],
                    what,
                )
            except Exception:
                router_bench.log_tails(root)
                raise
            result["modes"][name].update(ran=info["ran"], pinned=info["pinned"])
            result["modes"][name]["overlay_checks"].append(info["overlay_check"])
            result["modes"][name].setdefault("restarts", []).append(info["restarts"])
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["uptime_after"] = Path("/proc/loadavg").read_text().split()[:3]
    vtdc_out = {name: {p: c.summary() for p, c in by.items()} for name, by in paths.items()}
    result.update(assemble(cells, idle, vtdc_out))
    return result, None


def one_round(
    name: str,
    root: Path,
    authority: testbed.Authority,
    args: argparse.Namespace,
    once: argparse.Namespace,
    limits: Sequence[float | None],
    cells: dict[str, Cell],
    idle: list[float],
    paths: dict[str, router_bench.Cell],
    what: str,
) -> dict[str, Any]:
    """One round of one mode in its own testbed (removed at the end, also on failure)."""
    with testbed.Testbed("ase") as tb:
        sites = [tb.namespace("sa"), tb.namespace("sb")]
        wan = router_bench.WAN
        tb.link(
            sites[0],
            sites[1],
            f"{router_bench.SITES[0]}/24",
            f"{router_bench.SITES[1]}/24",
            ifnames=(wan, wan),
        )
        if name == "interface":
            mode = router_bench.interface_mode(sites, authority, root)
        else:
            mode = router_bench.router_mode(tb, sites, authority, root, args.machines)
        netns = frozenset(harness.netns_inode(ns) for ns in tb.namespaces)
        running, servers = setup_mode(name, mode, args)
        mode.servers += [*servers, running.load.proc]
        pinned = ", ".join(f"{k} {v}" for k, v in running.pinned.items())
        log(f"{what}: pinned {pinned or 'nothing'}")
        received = 0
        for path, cell in paths.items():
            p = mode.paths[path]
            cell.source, cell.target = p.source, p.target
            done = len(cell.tcp)
            router_bench.measure_path(cell, p, once, netns, f"{what} VTDC {path}")
            if path == "virtual":
                received += sum(run.bytes for run in cell.tcp[done:])
        idle += idle_scores(running, once, f"{what} before")
        for limit in limits:
            label = router_bench.limit_label(limit)
            router_bench.set_limit(tb, sites, limit)
            before = cells[label].iperf_bytes
            measure_cell(cells[label], running, once, netns, f"{what} {label}")
            received += cells[label].iperf_bytes - before
        router_bench.set_limit(tb, sites, None)
        idle += idle_scores(running, once, f"{what} after")
        health = overlay_health(mode, received)
        log(f"{what}: {health['overlay_check']}; stopping")
        router_bench.stop_mode(tb, mode)
        return {"ran": mode.ran, "pinned": running.pinned, **health}


def assemble(
    cells: dict[str, dict[str, Cell]], idle: dict[str, list[float]], vtdc_out: dict[str, Any]
) -> dict[str, Any]:
    """The figures of the JSON: runs, medians, normalisations, VTDC tables."""
    medians = {m: {lab: c.medians() for lab, c in by.items()} for m, by in cells.items()}
    idle_medians = {m: median(v) for m, v in idle.items()}
    return {
        "runs": {
            m: {
                lab: {**c.runs, "vpn_cpu_s": c.vpn_cpu_s, "others_cores": c.others_cores}
                for lab, c in by.items()
            }
            for m, by in cells.items()
        },
        "medians": medians,
        "idle_score": {"runs": idle, "median": idle_medians},
        "normalised": normalise(medians, idle_medians),
        "vtdc": vtdc_table(vtdc_out),
    }


def vtdc_table(found: dict[str, Any]) -> dict[str, Any]:
    """The VTDC tables: per mode h2h and v2v ping p50 and Mbit/s; router meas/exp/phys."""
    out: dict[str, Any] = {"paths": found}
    if "router" in found:
        r = found["router"]
        i = found.get("interface", {}).get("virtual", {})
        out["router"] = {
            "ping_ms": {
                "meas": r["virtual"]["ping_p50_ms"],
                "exp": i.get("ping_p50_ms"),
                "phys": r["host"]["ping_p50_ms"],
            },
            "mbit_s": {
                "meas": r["virtual"]["tcp_a_to_b_mbit_s"],
                "exp": i.get("tcp_a_to_b_mbit_s"),
                "phys": r["host"]["tcp_a_to_b_mbit_s"],
            },
        }
    return out


# ----------------------------------------------------------------------------------------------
# output: tables and plots


def render(result: dict[str, Any], _: object = None) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        f"autovn seed evaluation  {result['timestamp']}  ({result.get('elapsed_s', 0):.0f} s)",
        f"machine: nproc {m['nproc']}, kernel {m['kernel']}, load avg before "
        f"{' '.join(result['uptime_before'])}, after {' '.join(result['uptime_after'])}",
        f"{a['seconds']} s per run x {a['repeats']} repeats, medians; pinning: {a['pin']}",
        *(f"NOTE: {n}" for n in result["notes"]),
        "",
        f"{'mode':<10}{'limit':<14}{'bw alone':>9}{'bw+load':>9}{'score':>7}{'norm':>6}"
        f"{'tps alone':>10}{'tps+load':>9}{'score':>7}{'norm':>6}{'vpn cpu-s':>10}{'others':>7}",
    ]
    idle = result["idle_score"]["median"]
    for mode, by in result["medians"].items():
        for label, med in by.items():
            nb = result["normalised"][mode][label]
            runs = result["runs"][mode][label]
            lines.append(
                f"{mode:<10}{label:<14}{harness.fmt(med['bw_alone']):>9}"
                f"{harness.fmt(med['bw_load']):>9}{harness.fmt(med['score_stream'], 0):>7}"
                f"{harness.fmt(nb['bandwidth']['sum'], 2):>6}{harness.fmt(med['tps_alone'], 0):>10}"
                f"{harness.fmt(med['tps_load'], 0):>9}{harness.fmt(med['score_rr'], 0):>7}"
                f"{harness.fmt(nb['latency']['sum'], 2):>6}"
                f"{harness.fmt(median(runs['vpn_cpu_s']), 2):>10}"
                f"{harness.fmt(median(runs['others_cores']), 2):>7}"
            )
        lines.append(f"{mode:<10}load alone (VPN idle): {harness.fmt(idle.get(mode), 0)} ops/s")
    lines += ["", "VTDC: no limit, no load (ping p50 ms; iperf3 Mbit/s a->b, b->a)"]
    for mode, paths in result["vtdc"]["paths"].items():
        for path, s in paths.items():
            lines.append(
                f"  {mode:<10}{router_bench.PATH_NAMES[path]:<20}"
                f"{harness.fmt(s['ping_p50_ms'], 3):>8}"
                f"{harness.fmt(s['tcp_a_to_b_mbit_s']):>8}{harness.fmt(s['tcp_b_to_a_mbit_s']):>8}"
            )
    if "router" in result["vtdc"]:
        r = result["vtdc"]["router"]
        for what, digits in (("ping_ms", 3), ("mbit_s", 1)):
            lines.append(
                f"  router {what}: "
                + ", ".join(f"{k} {harness.fmt(v, digits)}" for k, v in r[what].items())
            )
    for mode, info in result["modes"].items():
        lines.append(f"{mode}: {info['ran']}")
        lines += [f"{mode} round {i + 1}: {c}" for i, c in enumerate(info["overlay_checks"])]
    lines += ["", f"results: {result.get('file', '-')}"]
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """The four figures of the seed's layout as PNGs in ``out_dir``. ImportError if
    matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    med, norm = result["medians"], result["normalised"]
    # the seed's order: the limits rising, then none
    labels = sorted(result["limits"], key=lambda lab: lab == "unlimited")
    short = [lab.replace(" Mbit/s", "") for lab in labels]
    caption = (
        f"{result['timestamp']}, {result['args']['seconds']} s x {result['args']['repeats']}, "
        f"medians; load avg (1 min) {result['uptime_before'][0]} before, "
        f"{result['uptime_after'][0]} after"
    )
    written = []

    def scatter(name: str, x_kind: str, y_kind: str, xlabel: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=90)
        for mode, by in med.items():
            xs = [by[lab][x_kind] for lab in labels]
            ys = [by[lab][y_kind] for lab in labels]
            ax.plot(xs, ys, marker="o", label=mode)
            for x, y, s in zip(xs, ys, short, strict=True):
                if x is not None and y is not None:
                    ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("benchmark score (ops/s)")
        ax.set_title(title, fontsize=10)
        ax.legend()
        fig.text(0.01, 0.01, caption, fontsize=6)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        written.append(out_dir / name)
        fig.savefig(out_dir / name)
        plt.close(fig)

    def normalised(name: str, part: str, first: str, title: str) -> None:
        fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=90)
        xs = list(range(len(labels)))
        for mode, by in norm.items():
            line = ax.plot(xs, [by[lab][part]["sum"] for lab in labels], marker="o", label=mode)
            color = line[0].get_color()
            ax.plot(
                xs,
                [by[lab][part][first] for lab in labels],
                ls="--",
                color=color,
                alpha=0.6,
                label=f"{mode}: {first}/max",
            )
            ax.plot(
                xs,
                [by[lab][part]["score"] for lab in labels],
                ls=":",
                color=color,
                alpha=0.6,
                label=f"{mode}: score/max",
            )
        ax.set_xticks(xs, short)
        ax.set_xlabel("underlay limit (Mbit/s)")
        ax.set_ylabel("normalised sum (max 2)")
        ax.set_ylim(0, 2.05)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        fig.text(0.01, 0.01, caption, fontsize=6)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        written.append(out_dir / name)
        fig.savefig(out_dir / name)
        plt.close(fig)

    scatter(
        "bandwidth-vs-score.png",
        "bw_load",
        "score_stream",
        "TCP stream (Mbit/s, iperf3)",
        "Bandwidth vs CPU: iperf3 beside the CPU load",
    )
    normalised(
        "bandwidth-normalised.png",
        "bandwidth",
        "bw",
        "Bandwidth normalisation: bw/max bw + score/max score",
    )
    scatter(
        "transactions-vs-score.png",
        "tps_load",
        "score_rr",
        "TCP request/response (transactions/s, own TCP_RR)",
        "Latency vs CPU: TCP_RR beside the CPU load",
    )
    normalised(
        "latency-normalised.png",
        "latency",
        "tps",
        "Latency normalisation: tps/max tps + score/max score",
    )
    return written


def draw(result: dict[str, Any], out_dir: Path) -> bool:
    try:
        paths = plot(result, out_dir)
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return False
    log("plots: " + ", ".join(str(p) for p in paths))
    return True


# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--limits",
        type=router_bench.parse_limits,
        default=list(router_bench.DEFAULT_LIMITS),
        help="underlay limits in Mbit/s, after the unlimited run (10,50,100,1000)",
    )
    harness.traffic_options(
        p,
        seconds=5,
        pings=100,
        fewest_pings=10,
        repeats="rounds per mode and limit",
        pings_per="per VTDC run",
    )
    p.add_argument(
        "--modes", type=router_bench.parse_modes, default=list(MODES), help="interface,router"
    )
    p.add_argument(
        "--machines",
        type=harness.bounded_int(2, 8),
        default=2,
        help="machines per site, router mode (2)",
    )
    p.add_argument(
        "--pin",
        choices=("vm", "none"),
        default="vm",
        help="vm: CPU 1 is the server's machine, CPU 0 the rest (needs 2 CPUs); "
        "none: no pinning (vm)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short trial: --seconds 2 --repeats 1 --pings 20 --limits 10,100",
    )
    p.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="directory for the PNGs (bench/results/seed-<timestamp>/)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.json",
        help="only redraw the plots of a results file (no root needed)",
    )
    p.add_argument("--json", action="store_true", help="print the JSON result, not the tables")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.pings, args.limits = 2, 1, 20, [10.0, 100.0]
    if args.pin == "vm" and not can_pin():
        print("seed_eval: fewer than 2 usable CPUs: not pinning (--pin none)", file=sys.stderr)
        args.pin = "none"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        result = json.loads(args.plot.read_text())
        out = args.plots or args.plot.with_suffix("")
        return 0 if draw(result, out) else 3

    def render_and_draw(result: dict[str, Any], data: None) -> str:
        written = harness.REPO / result["file"]
        draw(result, args.plots or written.with_suffix(""))
        return render(result)

    return BENCH.main(args, run, render_and_draw, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
