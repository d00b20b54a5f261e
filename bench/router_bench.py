"""Interface mode against router mode: two sites joined by one rate-limited underlay link.

Two site namespaces ``sa`` and ``sb`` are joined by one veth pair (``wan0``, underlay
198.18.0.1/.2). The underlay is measured unlimited first (the baseline), then with a token
bucket (``Testbed.rate_limit``, tbf, on both ends of the veth) of each ``--limits`` rate in
turn (default 10, 50, 100 and 1000 Mbit/s). Two modes, one after the other, in the same site
namespaces:

1. **interface**: each site namespace is a host running a node in interface mode (``ha`` in
   sa founds the overlay, ``hb`` in sb bootstraps from 198.18.0.1), configured with no
   address: a real DHCP client (ISC dhclient, ``Node.dhcp``) on each node's TAP gets it one.
   *host-to-host* is 198.18.0.1 -> 198.18.0.2; *virtual-to-virtual* is TAP address ->
   TAP address. Then the DHCP clients and the nodes are stopped (``supervisor stop``) and
   the bench waits until their processes, TAPs and UDP ports are gone.
2. **router**: each site namespace becomes a router: a bridge ``br0``, a node in router mode
   (``mode = "router"``, ``bridge = "br0"``, ``dhcp_port = 1067``; ``ra`` founds, ``rb``
   bootstraps) and ``--machines`` machine namespaces per site on veths into the bridge
   (``ma1``, ``ma2``, ... and ``mb1``, ...), which install nothing but a DHCP client
   pointed at port 1067. *host-to-host* is 198.18.0.1 -> 198.18.0.2 between the two
   routers; *virtual-to-virtual* is ``ma1`` -> ``mb1`` (their DHCP addresses).

All nodes are certified by one network authority (Noise handshakes, the default data cipher
AES-256-GCM), TAP MTU 1400, one worker per stage. For each mode, limit and path,
``--repeats`` times:

- **TCP throughput**: ``iperf3 -J`` single stream, a->b and b->a (``-R``), ``--seconds``
  long, from the site-A end; the receiver-side rate.
- **Ping RTT**: ``--pings`` echo requests 10 ms apart (after a short warm-up); p50 and p90
  (nearest rank).
- **Node CPU-seconds per GB** (virtual paths only; host-to-host traffic does not pass the
  nodes): utime+stime from /proc/PID/stat of every process in both nodes' process trees (the
  supervisor, whose pid ``status --json`` gives, and all its descendants: the workers),
  read before and after each iperf3 run (reaped children's time included), divided by the
  bytes the iperf3 receiver counted (GB = 1e9 bytes). Kernel work (veth, bridge, TAP, TCP/IP,
  tbf) is done in softirq and charged to no node process: not counted.

Every figure printed is the median over the repeats (throughput: over the runs of that
direction; CPU: over the per-run values of both directions). Per limit, a table: mode, path,
Mbit/s a->b and b->a, ping p50 and p90, node CPU-s/GB; a row ``virtual/host`` per mode
(above 1: more for the virtual path, i.e. faster for Mbit/s, slower for ms) and a row
``router/interface`` comparing the two modes' virtual paths. The header of each table gives
the mean CPU (in cores) of the machine's other processes during that limit's iperf3 runs
(as ``bench/pipeline_bench.py``): well above 0 means the figures were disturbed. After the
tables, per mode: each worker's restarts and a check that the nodes' overlay carried the
virtual iperf3 bytes.

Run as root from the repository root::

    python3 bench/router_bench.py [--limits 10,50,100,1000] [--seconds 3] [--repeats 3]
                                  [--pings 100] [--modes interface,router] [--machines 2]
                                  [--json]

``--json`` prints the result as JSON instead of the tables; it is always written to
``bench/results/router-<timestamp>.json`` too. Progress goes to stderr. Everything
(namespaces, nodes, DHCP clients, iperf3 servers) lives in a ``Testbed``: removed on exit,
on failure and on Ctrl-C; nothing touches the root namespace.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("router_bench", "router-bench", "router")
log = BENCH.log
SITES = ("198.18.0.1", "198.18.0.2")  # the underlay link between site A and site B
WAN = "wan0"  # the veth's name at both ends
BRIDGE = "br0"
DHCP_PORT = 1067
MODES = ("interface", "router")
PATHS = ("host", "virtual")
PATH_NAMES = {"host": "host-to-host", "virtual": "virtual-to-virtual"}
DEFAULT_LIMITS = (10.0, 50.0, 100.0, 1000.0)


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class PingRun:
    sent: int
    received: int
    p50_ms: float
    p90_ms: float


@dataclass
class Cell:
    """One mode x limit x path: every run, and where it ran."""

    source: str
    target: str
    tcp: list[harness.TcpRun] = field(default_factory=list)
    pings: list[PingRun] = field(default_factory=list)

    def mbit(self, direction: str) -> float | None:
        values = [r.mbit_s for r in self.tcp if r.direction == direction]
        return statistics.median(values) if values else None

    def ping(self, which: str) -> float | None:
        values = [getattr(p, which) for p in self.pings]
        return statistics.median(values) if values else None

    def cpu_s_per_gb(self) -> float | None:
        values = [r.cpu_s / (r.bytes / 1e9) for r in self.tcp if r.cpu_s is not None and r.bytes]
        return statistics.median(values) if values else None

    def others(self) -> float | None:
        values = [r.others_cores for r in self.tcp if r.others_cores is not None]
        return statistics.fmean(values) if values else None

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "tcp_a_to_b_mbit_s": self.mbit("a->b"),
            "tcp_b_to_a_mbit_s": self.mbit("b->a"),
            "ping_p50_ms": self.ping("p50_ms"),
            "ping_p90_ms": self.ping("p90_ms"),
            "node_cpu_s_per_gb": self.cpu_s_per_gb(),
            "others_cores_during_iperf3": self.others(),
        }


def limit_label(limit: float | None) -> str:
    return "unlimited" if limit is None else f"{limit:g} Mbit/s"


# ----------------------------------------------------------------------------------------------
# CPU of a node's process tree


def supervisor_pids(nodes: Sequence[testbed.Node]) -> list[int]:
    """The supervisor pid of each node (``status --json``), checked to be the root of a tree
    that holds every worker pid the status lists."""
    pids = []
    for n in nodes:
        sup, workers = n.pids()
        missing = set(workers) - harness.tree_times([sup]).keys()
        if missing:
            raise RuntimeError(f"{n.name}: workers {sorted(missing)} not under supervisor {sup}")
        pids.append(sup)
    return pids


# ----------------------------------------------------------------------------------------------
# traffic


def ping_run(ns: testbed.Namespace, target: str, count: int) -> PingRun:
    times = harness.ping_times(ns, target, count)
    return PingRun(count, len(times), harness.percentile(times, 50), harness.percentile(times, 90))


@dataclass
class Path_:
    """Where one path's traffic runs: the client's namespace and address, the target's
    address and namespace (where the iperf3 server runs), and the node supervisors whose
    trees are charged (none for host-to-host)."""

    client: testbed.Namespace
    source: str
    target: str
    server: testbed.Namespace
    supervisors: list[int]


def measure_path(
    cell: Cell, path: Path_, args: argparse.Namespace, testbed_netns: frozenset[int], what: str
) -> None:
    client, target = path.client, path.target
    harness.warm_up(client, target)
    for i in range(args.repeats):
        cell.pings.append(ping_run(client, target, args.pings))
        for reverse in (False, True):
            before = harness.tree_times(path.supervisors) if path.supervisors else None
            others = harness.others_snapshot(testbed_netns)
            t0 = time.monotonic()
            run = harness.run_iperf(client, target, args.seconds, reverse, log)
            wall = time.monotonic() - t0
            if before is not None:
                run.cpu_s = (
                    harness.ticks_between(before, harness.tree_times(path.supervisors))
                    / harness.CLK_TCK
                )
            run.others_cores = harness.others_cores(
                others, harness.others_snapshot(testbed_netns), wall
            )
            cell.tcp.append(run)
            cpu = "" if run.cpu_s is None else f", nodes {run.cpu_s:.2f} cpu-s"
            log(
                f"{what} {i + 1}/{args.repeats} {run.direction}: {run.mbit_s:.1f} Mbit/s, "
                f"retransmits {run.retransmits}{cpu}, others {run.others_cores:.2f} cores; "
                f"ping p50 {cell.pings[-1].p50_ms:.3f} ms"
            )


def set_limit(tb: testbed.Testbed, sites: Sequence[testbed.Namespace], limit: float | None) -> None:
    for ns in sites:
        if limit is None:
            tb.clear_qdisc(ns, WAN)
        else:
            tb.rate_limit(ns, WAN, limit)


# ----------------------------------------------------------------------------------------------
# the two modes


def reach(client: testbed.Namespace, target: str, what: str) -> None:
    def ok() -> bool:
        res = client.run(["ping", "-c", "1", "-W", "1", target], check=False, timeout=10)
        return res.returncode == 0

    testbed.wait_for(what, ok, timeout=60, every=0.5)


@dataclass
class Mode:
    """A running mode: its nodes, its DHCP clients, its paths and its iperf3 servers."""

    nodes: list[testbed.Node]
    paths: dict[str, Path_]
    ran: str
    clients: list[testbed.DhcpClient] = field(default_factory=list)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)


def interface_mode(
    sites: Sequence[testbed.Namespace], authority: testbed.Authority, root: Path
) -> Mode:
    a, b = sites
    nodes = [
        testbed.member(a, root, authority, "ha", SITES[0], None, first=True, domain=testbed.DOMAIN),
        testbed.member(
            b, root, authority, "hb", SITES[1], None, first=False, domain=testbed.DOMAIN
        ),
    ]
    log("interface mode: starting ha, hb")
    testbed.start_all(nodes)
    for n in nodes:
        n.dhcp(wait=False)
    for n in nodes:
        n.wait_dhcp(60)
    ha, hb = nodes
    log(f"interface mode: ha {ha.address}, hb {hb.address} (DHCP on the TAPs)")
    reach(a, hb.address, "ha to reach hb over the overlay")
    sups = supervisor_pids(nodes)
    paths = {
        "host": Path_(a, SITES[0], SITES[1], b, []),
        "virtual": Path_(a, ha.address, hb.address, b, sups),
    }
    clients = [n.dhcp_client for n in nodes if n.dhcp_client is not None]
    ran = (
        f"a node in interface mode in each site namespace (ha {SITES[0]}, hb {SITES[1]}), "
        f"DHCP on its TAP: host {SITES[0]} -> {SITES[1]}, virtual {ha.address} -> {hb.address}"
    )
    return Mode(nodes, paths, ran, clients)


def router_mode(
    tb: testbed.Testbed,
    sites: Sequence[testbed.Namespace],
    authority: testbed.Authority,
    root: Path,
    machines: int,
) -> Mode:
    lines = ('mode = "router"', f'bridge = "{BRIDGE}"', f"dhcp_port = {DHCP_PORT}")
    segment: list[list[testbed.Machine]] = []
    nodes = []
    for k, (site, ns) in enumerate(zip("ab", sites, strict=True)):
        bridge = tb.bridge(ns, BRIDGE)
        here = []
        for i in range(machines):
            name = f"m{site}{i + 1}"
            m_ns = tb.namespace(name)
            tb.attach(m_ns, ns, bridge, None, ifname="eth0")
            client = testbed.DhcpClient(m_ns, "eth0", root / name, name, server_port=DHCP_PORT)
            here.append(testbed.Machine(name, m_ns, client))
        segment.append(here)
        nodes.append(
            testbed.member(
                ns,
                root,
                authority,
                f"r{site}",
                SITES[k],
                None,
                first=k == 0,
                domain=testbed.DOMAIN,
                network_lines=lines,
            )
        )
    log(f"router mode: starting ra, rb; {machines} machines per site")
    testbed.start_all(nodes)
    every = [m for here in segment for m in here]
    for m in every:
        m.dhcp.start(wait=False)
    for m in every:
        m.address = m.dhcp.wait_bound(60).address
    log("router mode: " + ", ".join(f"{m.name} {m.address}" for m in every))
    src, dst = segment[0][0], segment[1][0]
    reach(src.ns, dst.address, f"{src.name} to reach {dst.name} over the overlay")
    sups = supervisor_pids(nodes)
    paths = {
        "host": Path_(sites[0], SITES[0], SITES[1], sites[1], []),
        "virtual": Path_(src.ns, src.address, dst.address, dst.ns, sups),
    }
    ran = (
        f"a node in router mode in each site namespace (ra {SITES[0]}, rb {SITES[1]}), "
        f"bridge {BRIDGE}, {machines} machine namespaces per site with DHCP (port "
        f"{DHCP_PORT}): host {SITES[0]} -> {SITES[1]}, virtual {src.name} {src.address} -> "
        f"{dst.name} {dst.address}"
    )
    return Mode(nodes, paths, ran, [m.dhcp for m in every])


def stop_mode(tb: testbed.Testbed, mode: Mode) -> None:
    """Stop the DHCP clients and iperf3 servers (by pid) and the nodes (``supervisor stop``,
    then wait until their processes, TAPs and ports are gone)."""
    for c in mode.clients:
        c.stop()
    for s in mode.servers:
        tb.stop(s)
    testbed.stop_all(mode.nodes)


def health(mode: Mode, results: dict[str, dict[str, Cell]]) -> dict[str, Any]:
    """Each worker's restarts, and whether the overlay carried the virtual iperf3 bytes."""
    settled = harness.settled_health(mode.nodes)
    sent = sum(h["overlay_bytes_sent"] for h in settled.values())
    received = sum(r.bytes for cells in results.values() for r in cells["virtual"].tcp)
    return {
        "restarts": {name: h["restarts"] for name, h in settled.items()},
        "overlay_check": harness.overlay_check(sent, received, "virtual iperf3"),
    }


# ----------------------------------------------------------------------------------------------
# output


def fmt_mbit(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


COLUMNS = (  # title, width
    ("mode", 17),
    ("path", 20),
    ("a->b Mbit/s", 12),
    ("b->a Mbit/s", 12),
    ("ping p50 ms", 12),
    ("ping p90 ms", 12),
    ("node cpu-s/GB", 14),
)


def row(cells: Sequence[str]) -> str:
    out = ""
    for i, (text, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True)):
        out += f"{text:<{width}}" if i < 2 else f"{text:>{width}}"
    return out.rstrip()


def table(limit: str, by_mode: dict[str, dict[str, Cell]]) -> list[str]:
    others = [c.others() for cells in by_mode.values() for c in cells.values()]
    known = [o for o in others if o is not None]
    shown = f"{statistics.fmean(known):.2f}" if known else "-"
    head = f"underlay {limit}" + ("" if limit == "unlimited" else " (tbf on both ends of wan0)")
    lines = [f"{head}; other processes during iperf3: {shown} cores", row([t for t, _ in COLUMNS])]

    def values(c: Cell) -> list[float | None]:
        return [c.mbit("a->b"), c.mbit("b->a"), c.ping("p50_ms"), c.ping("p90_ms")]

    for mode, cells in by_mode.items():
        for path in PATHS:
            c = cells[path]
            shown_values = [fmt_mbit(v) for v in values(c)[:2]]
            shown_values += [harness.fmt(v, 3) for v in values(c)[2:]] + [
                harness.fmt(c.cpu_s_per_gb(), 2)
            ]
            lines.append(row([mode, PATH_NAMES[path], *shown_values]))
        v, h = values(cells["virtual"]), values(cells["host"])
        lines.append(
            row(
                [
                    mode,
                    "virtual/host",
                    *(harness.ratio(x, y) for x, y in zip(v, h, strict=True)),
                    "-",
                ]
            )
        )
    if all(m in by_mode for m in MODES):
        r, i = by_mode["router"]["virtual"], by_mode["interface"]["virtual"]
        compared = [harness.ratio(x, y) for x, y in zip(values(r), values(i), strict=True)]
        compared.append(harness.ratio(r.cpu_s_per_gb(), i.cpu_s_per_gb()))
        lines.append(row(["router/interface", PATH_NAMES["virtual"], *compared]))
    return lines


def render(result: dict[str, Any], cells: dict[str, dict[str, dict[str, Cell]]]) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        f"autovn router bench  {result['timestamp']}  ({result['elapsed_s']:.0f} s)",
        f"machine: nproc {m['nproc']}, kernel {m['kernel']}, python {m['python']}, "
        f"load avg (1 min) at start {m['loadavg']:.2f}",
        f"iperf3 TCP 1 stream, {a['seconds']} s per direction x {a['repeats']}; "
        f"{a['repeats']} x {a['pings']} pings at 10 ms; medians",
        "nodes: encrypted (Noise + AES-256-GCM), TAP mtu 1400, 1 worker per stage; "
        "node cpu-s/GB: both nodes' process trees,",
        "  virtual paths only (host-to-host traffic does not pass the nodes), softirq work "
        "not counted",
        "",
    ]
    for limit in result["limits"]:
        by_mode = {mode: cells[mode][limit] for mode in a["modes"]}
        lines += table(limit, by_mode) + [""]
    lines.append("what each mode ran (iperf3 client and ping at site A):")
    for mode in a["modes"]:
        info = result["modes"][mode]
        lines.append(f"  {mode}: {info['ran']}")
        for node, restarts in info["restarts"].items():
            lines.append(
                f"  {mode} {node} restarts: " + ", ".join(f"{k}={v}" for k, v in restarts.items())
            )
        lines.append(f"  {mode}: {info['overlay_check']}")
    lines += ["", f"results: {result['file']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main


def parse_limits(text: str) -> list[float]:
    limits: list[float] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            value = float(item)
        except ValueError:
            value = 0.0
        if not 0.1 <= value <= 100_000:
            raise argparse.ArgumentTypeError(f"bad limit {item!r}: Mbit/s in 0.1..100000")
        limits.append(value)
    return limits


def parse_modes(text: str) -> list[str]:
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    if not chosen or chosen - set(MODES):
        raise argparse.ArgumentTypeError(f"bad --modes {text!r}: a subset of {','.join(MODES)}")
    return [m for m in MODES if m in chosen]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--limits",
        type=parse_limits,
        default=list(DEFAULT_LIMITS),
        help="underlay rate limits in Mbit/s, measured after the unlimited baseline "
        "(10,50,100,1000; '' for the baseline alone)",
    )
    harness.traffic_options(p, seconds=3, pings=100, fewest_pings=10,
                            repeats="runs per measurement", pings_per="per run")  # fmt: skip
    p.add_argument("--modes", type=parse_modes, default=list(MODES), help="interface,router (both)")
    p.add_argument(
        "--machines",
        type=harness.bounded_int(2, 8),
        default=2,
        help="machines per site, router mode (2)",
    )
    p.add_argument("--json", action="store_true", help="print the JSON result, not the tables")
    return p.parse_args(argv)


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    limits: list[float | None] = [None, *args.limits]
    labels = [limit_label(x) for x in limits]
    options = ("limits", "seconds", "repeats", "pings", "modes", "machines")
    result = BENCH.new_result(args, *options) | {"limits": labels, "modes": {}}
    cells: dict[str, dict[str, dict[str, Cell]]] = {}
    t0 = time.monotonic()
    with testbed.Testbed("avr") as tb:
        sites = [tb.namespace("sa"), tb.namespace("sb")]
        tb.link(sites[0], sites[1], f"{SITES[0]}/24", f"{SITES[1]}/24", ifnames=(WAN, WAN))
        authority = testbed.Authority.create(tmp / "authority")
        builders: dict[str, Callable[[], Mode]] = {
            "interface": lambda: interface_mode(sites, authority, tmp / "interface"),
            "router": lambda: router_mode(tb, sites, authority, tmp / "router", args.machines),
        }
        for n, name in enumerate(args.modes):
            set_limit(tb, sites, None)
            try:
                mode = builders[name]()
                testbed_netns = frozenset(harness.netns_inode(ns) for ns in tb.namespaces)
                for server_ns in dict.fromkeys(p.server for p in mode.paths.values()):
                    mode.servers.append(harness.start_iperf_server(server_ns))
                cells[name] = {}
                for limit, label in zip(limits, labels, strict=True):
                    set_limit(tb, sites, limit)
                    cells[name][label] = {}
                    for path in PATHS:
                        p = mode.paths[path]
                        cell = Cell(p.source, p.target)
                        cells[name][label][path] = cell
                        measure_path(cell, p, args, testbed_netns, f"{name} {label} {path}")
                set_limit(tb, sites, None)
                result["modes"][name] = {"ran": mode.ran, **health(mode, cells[name])}
                if n + 1 < len(args.modes):
                    log(f"{name} mode: stopping nodes")
                    stop_mode(tb, mode)
            except Exception:
                log_tails(tmp / name)
                raise
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["results"] = {
        mode: {
            label: {path: {**c.summary(), "runs": asdict(c)} for path, c in by_path.items()}
            for label, by_path in by_label.items()
        }
        for mode, by_label in cells.items()
    }
    return result, cells


def log_tails(root: Path, lines: int = 15) -> None:
    """The end of every node's supervisor output and every DHCP client's log under ``root``
    (after a failure)."""
    for path in sorted([*root.glob("*/supervisor.out"), *root.glob("**/dhclient-*.log")]):
        log(f"{path.relative_to(root)} (tail):\n{harness.tail(path, lines)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return BENCH.main(args, run, render, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
