"""End-to-end benchmark: autovn, plaintext and encrypted, against the bare veth and Debian VPNs.

What it measures, in one run, for up to six setups built on the same pair of network
namespaces (``supervisor.testbed.two_nodes``: a veth pair with underlay 198.18.0.1/.2), one after
the other in this order:

1. **raw veth** - before any node is started: traffic between the underlay addresses
   198.18.0.1 <-> 198.18.0.2 straight over the veth pair.
2. **plaintext** - one node in each namespace with ``security.insecure_plaintext = true`` (no
   handshake, no encryption): the same traffic between the virtual addresses
   100.64.0.1 <-> 100.64.0.2, i.e. TAP -> tap_reader -> classifier -> overlay_io -> UDP ->
   overlay_io -> classifier -> tap_reader -> TAP. The nodes are then stopped
   (``supervisor stop``) and the bench waits until their processes, TAP and UDP port are gone.
3. **encrypted** - new nodes with new configs and state in the same namespaces, both certified
   by a fresh network authority (``supervisor.testbed.Authority``) and naming each other's key
   (Noise IK handshake), every frame sealed with ChaCha20-Poly1305: the same traffic again.
   The nodes are stopped like the plaintext ones if Debian peers follow.
4. **tinc** - Debian's ``tincd`` 1.0, one per namespace, switch mode over a TAP (MTU 1400, as
   autovn's), default cipher (Blowfish-CBC, HMAC-SHA1 truncated to 4 bytes), RSA keys from
   ``tincd -K``, virtual 100.64.1.1/.2, UDP/TCP port 655 on the underlay.
5. **tinc-plain** - the same with ``Cipher = none`` and ``Digest = none``.
6. **openvpn** - Debian's OpenVPN 2.6, peer to peer over a TAP (MTU 1400) with a static key
   (``--secret``, no TLS), AES-256-CBC + HMAC-SHA256, DCO off, virtual 100.64.2.1/.2, UDP 1194.

The Debian peers (``bench/peers/debian.py``) run in the foreground, started with the testbed's
``Namespace.popen`` (tracked, ended by pid), configured in the temporary directory; after each,
the bench waits until its TAP device and port are gone. Each setup gets a fresh ``iperf3 -s``
(one whose last test went over a tunnel just taken down can stay "busy"). If a peer's binary
is missing, its column is left out with a note above the table (``apt-get install -y tinc
openvpn``); if a peer fails while measured, its column is dropped with the error as the note,
and the run goes on.

``--setups`` picks a subset (default all: ``raw,plain,enc,tinc,tinc-plain,openvpn``); the
order stays the one above.

For each setup:

- **TCP throughput**: ``iperf3 -J`` single stream, a->b and b->a (``-R``), ``--seconds`` long,
  ``--repeats`` times per direction; the median of the receiver-side rate is reported.
- **Ping RTT**: ``ping -i 0.01`` with ``--pings`` echo requests (after a short warm-up); p50
  and p99 of the per-reply times (nearest rank).
- **CPU-seconds per GB** (VPN setups): utime+stime, from /proc/PID/stat, of every process of
  both ends (autovn: the supervisor and each worker pid listed by ``supervisor status --json``;
  a Debian peer: its daemon's pid) consumed during the iperf3 runs, divided by the bytes the
  iperf3 receivers counted (GB = 1e9 bytes). The supervisor's (daemon's) cutime+cstime delta
  is added too, so a worker that died and was reaped during a run still counts. Kernel work
  (veth, TAP, the stacks) is charged to no VPN process in softirq: not counted, for any
  setup. The raw veth's kernel work cannot be attributed: "-".
- **Idle CPU** (VPN setups): CPU of alpha's processes over 10 s with no traffic (only
  keepalives / pings: autovn every 1 s, tinc ``PingInterval = 10``, OpenVPN ``--ping 1``), as
  percent of one core. Measured after the link is up, before any traffic.

- **Other processes' CPU**: during each iperf3 run, the CPU (in cores) of every user-space
  process outside the testbed's namespaces except the bench itself (:func:`others_cores`).
  Setups are measured one after another, so on a shared machine this says whether a setup was
  slowed down by someone else's work; it is printed above the table.

The output has three blocks: the values, one column per setup; the ratios of every setup
against the raw veth (X/raw; "-" for the CPU rows, where raw has no value); and autovn against
the Debian peers: enc/plain, enc/tinc, plain/tinc-plain, enc/openvpn (above 1 is more for
autovn: faster for Mbit/s, slower for ms and CPU). Then one line per column says what it ran.
Afterwards it prints, for each autovn
setup, each worker's restarts (should be 0), the ring and worker drop counters (drops explain
TCP retransmits) and a check that the overlay carried the iperf3 bytes; for the encrypted
setup also the handshake counters of each node's control stage (``links`` in ``status
--json``) and the pattern, handshakes and sessions of its peer. Results also go to
``bench/results/pipeline-<timestamp>.json``.

Run as root from the repository root::

    python3 bench/pipeline_bench.py [--setups raw,plain,enc,tinc,tinc-plain,openvpn]
                                    [--seconds 5] [--repeats 3]
                                    [--pings 200] [--scale queues=2,classifier=2,overlay_io=2]
                                    [--json-only]

Everything (namespaces, nodes, peer daemons, iperf3 server) lives in a ``Testbed`` and is
removed on exit, on failure and on Ctrl-C. Nothing touches the root namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.peers.debian import PEERS, PeerDaemon  # noqa: E402
from supervisor.testbed import (  # noqa: E402
    DEVICE,
    PORT,
    UNDERLAY,
    VIRTUAL,
    Authority,
    Namespace,
    Node,
    Testbed,
    two_nodes,
    wait_for,
    write_config,
)

RESULTS_DIR = REPO / "bench" / "results"
IDLE_SECONDS = 10.0
SCALE_KEYS = ("queues", "classifier", "overlay_io")
IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")
AUTOVN = {"raw": "raw veth", "plain": "plaintext", "enc": "encrypted"}
SETUPS = AUTOVN | {k: p.title for k, p in PEERS.items()}  # in measuring order
# (numerator, denominator): every setup against the raw veth, then autovn against the peers
TO_RAW = tuple((k, "raw") for k in SETUPS if k != "raw")
VERSUS = (("enc", "plain"), ("enc", "tinc"), ("plain", "tinc-plain"), ("enc", "openvpn"))
RATIOS = TO_RAW + VERSUS
AUTOVN_RAN = {
    "raw": "no VPN: the veth between the underlay addresses 198.18.0.1 <-> 198.18.0.2",
    "plain": "autovn, security.insecure_plaintext = true, 100.64.0.1/.2 (TAP mtu 1400), "
    f"UDP {PORT}",
    "enc": f"autovn, Noise IK + ChaCha20-Poly1305, 100.64.0.1/.2 (TAP mtu 1400), UDP {PORT}",
}
NAMES = ("alpha", "beta")


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout holds only the table (or the JSON)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class TcpRun:
    direction: str  # "a->b" or "b->a"
    mbit_s: float  # receiver side
    bytes: int  # receiver side
    retransmits: int | None  # sender side, if iperf3 reports it
    cpu_s: float | None = None  # node CPU during the run (autovn only)
    others_cores: float | None = None  # CPU of processes outside the testbed, in cores


@dataclass
class PingResult:
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float


@dataclass
class SetupResult:
    key: str  # "raw", "plain", "enc", "tinc", "tinc-plain" or "openvpn"
    name: str  # column title
    source: str
    target: str
    ran: str = ""  # what the column ran
    ping: PingResult | None = None
    tcp: list[TcpRun] = field(default_factory=list)
    # VPN setups only (idle CPU and CPU per GB also for the Debian peers):
    idle_cpu_percent: dict[str, float] = field(default_factory=dict)  # node name -> % of a core
    health: dict[str, dict[str, Any]] = field(default_factory=dict)  # node name -> node_health
    overlay_check: str | None = None
    links: dict[str, dict[str, Any]] = field(default_factory=dict)  # encrypted: handshakes

    def median_mbit(self, direction: str) -> float:
        return statistics.median(r.mbit_s for r in self.tcp if r.direction == direction)

    def median_retransmits(self, direction: str) -> float | None:
        values = [r.retransmits for r in self.tcp if r.direction == direction]
        if any(v is None for v in values):
            return None
        return statistics.median(v for v in values if v is not None)

    def others_cores(self) -> float | None:
        values = [r.others_cores for r in self.tcp if r.others_cores is not None]
        return statistics.fmean(values) if values else None

    def cpu_s_per_gb(self) -> float | None:
        if not self.tcp or any(r.cpu_s is None for r in self.tcp):
            return None
        cpu = sum(r.cpu_s or 0.0 for r in self.tcp)
        gb = sum(r.bytes for r in self.tcp) / 1e9
        return cpu / gb if gb > 0 else None


# ----------------------------------------------------------------------------------------------
# CPU accounting from /proc


@dataclass(frozen=True)
class ProcTimes:
    start: int  # starttime in ticks since boot: tells a reused pid apart
    own: int  # utime + stime
    children: int  # cutime + cstime (reaped children)


def proc_times(pid: int) -> ProcTimes | None:
    """utime+stime and cutime+cstime of ``pid`` in clock ticks, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # rest[0] is field 3 (state)
    return ProcTimes(
        start=int(rest[19]),
        own=int(rest[11]) + int(rest[12]),
        children=int(rest[13]) + int(rest[14]),
    )


Vpn = Node | PeerDaemon  # what the CPU accounting reads: autovn nodes or Debian peer daemons


def node_pids(node: Vpn) -> tuple[int, list[int]]:
    """The supervisor pid and every worker pid of ``node``, from ``status --json``; for a
    Debian peer, its daemon's pid (counted like a supervisor: own and reaped children's CPU)."""
    if isinstance(node, PeerDaemon):
        return node.pids()
    st = wait_for(f"{node.name} status", node.status, timeout=15)
    workers = [int(w["pid"]) for w in st["workers"] if w.get("pid")]
    return int(st["supervisor_pid"]), workers


@dataclass
class CpuSnapshot:
    times: dict[int, ProcTimes]
    supervisors: list[int]


def cpu_snapshot(nodes: Sequence[Vpn]) -> CpuSnapshot:
    times: dict[int, ProcTimes] = {}
    supervisors: list[int] = []
    for node in nodes:
        sup, workers = node_pids(node)
        supervisors.append(sup)
        for pid in (sup, *workers):
            t = proc_times(pid)
            if t is not None:
                times[pid] = t
    return CpuSnapshot(times, supervisors)


def cpu_seconds_since(before: CpuSnapshot, nodes: Sequence[Vpn]) -> float:
    """CPU seconds ``nodes`` used since ``before`` was taken.

    Processes of ``before`` count what they used since (same pid and start time); the
    supervisors' children time is added, so a worker reaped meanwhile still counts; a worker
    started meanwhile (a restart) counts all it used. /proc is read before ``status`` is asked
    for new pids, so the status query itself is not counted.
    """
    ticks = 0
    for pid, old in before.times.items():
        new = proc_times(pid)
        if new is None or new.start != old.start:
            continue
        ticks += new.own - old.own
        if pid in before.supervisors:
            ticks += new.children - old.children
    for node in nodes:
        for pid in node_pids(node)[1]:
            was = before.times.get(pid)
            now = proc_times(pid)
            if now is not None and (was is None or now.start != was.start):
                ticks += now.own
    return ticks / CLK_TCK


def idle_cpu_percent(nodes: Sequence[Vpn], seconds: float) -> dict[str, float]:
    """Percent of one core used by each node's processes over ``seconds`` of no traffic."""
    snaps = {n.name: cpu_snapshot([n]) for n in nodes}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {n.name: 100.0 * cpu_seconds_since(snaps[n.name], [n]) / wall for n in nodes}


PF_KTHREAD = 0x00200000


def netns_inode(ns: Namespace) -> int:
    return os.stat(f"/run/netns/{ns.name}").st_ino


@dataclass(frozen=True)
class OthersSnapshot:
    others: dict[int, ProcTimes]  # user-space processes outside the testbed, but this one
    ours: dict[int, ProcTimes]  # processes inside the testbed's namespaces
    bench: float  # CPU seconds of this process and its reaped children
    busy: int  # ticks all CPUs spent in user, nice, system, irq and softirq (/proc/stat)


def others_snapshot(testbed_netns: frozenset[int]) -> OthersSnapshot:
    """What :func:`others_cores` compares: the other work on a possibly shared machine."""
    me = os.getpid()
    others: dict[int, ProcTimes] = {}
    ours: dict[int, ProcTimes] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            inside = os.stat(f"/proc/{pid}/ns/net").st_ino in testbed_netns
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2 :].split()  # rest[0] is field 3 (state)
        if int(rest[6]) & PF_KTHREAD:  # field 9 (flags); kernel threads: see others_cores
            continue
        times = ProcTimes(
            start=int(rest[19]),
            own=int(rest[11]) + int(rest[12]),
            children=int(rest[13]) + int(rest[14]),
        )
        (ours if inside else others)[pid] = times
    t = os.times()
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in cpu)
    return OthersSnapshot(
        others=others,
        ours=ours,
        bench=t.user + t.system + t.children_user + t.children_system,
        busy=user + nice + system + irq + softirq,
    )


def ticks_between(before: dict[int, ProcTimes], after: dict[int, ProcTimes]) -> int:
    """CPU ticks of the processes of ``after`` since ``before``: what survivors used (own and
    reaped children's), plus all of what processes started meanwhile used."""
    ticks = 0
    for pid, new in after.items():
        old = before.get(pid)
        if old is None or old.start != new.start:
            ticks += new.own + new.children
        else:
            ticks += new.own - old.own + new.children - old.children
    return ticks


def others_cores(before: OthersSnapshot, after: OthersSnapshot, wall: float) -> float:
    """Mean CPU, in cores, of the work that is not the bench's between two snapshots.

    Two estimates, each too high in its own way; the smaller is reported. By process: the
    user-space processes outside the testbed's namespaces, except the bench; a child reaped
    meanwhile counts its whole life, even the part before ``before``. By machine: all the busy
    CPU time of /proc/stat minus the testbed's processes and the bench (with its reaped
    children: iperf3 client, ping); this also counts kernel work done for the bench's traffic
    but charged to no process of it (ksoftirqd, irq time).
    """
    by_process = ticks_between(before.others, after.others) / CLK_TCK
    ours = ticks_between(before.ours, after.ours) / CLK_TCK + after.bench - before.bench
    by_machine = (after.busy - before.busy) / CLK_TCK - ours
    return max(0.0, min(by_process, by_machine)) / wall


# ----------------------------------------------------------------------------------------------
# traffic


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 100]."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def run_ping(ns: Namespace, target: str, count: int) -> PingResult:
    ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", target], check=False, timeout=20)  # warm-up
    res = ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", target],
        check=False,
        timeout=count * 0.05 + 30,
    )
    times = [float(m) for m in re.findall(r"time=([\d.]+) ms", res.stdout)]
    if not times:
        raise RuntimeError(f"ping {target}: no replies (rc {res.returncode}): {res.stdout[-300:]}")
    return PingResult(
        sent=count,
        received=len(times),
        p50_ms=percentile(times, 50),
        p99_ms=percentile(times, 99),
        mean_ms=statistics.fmean(times),
        max_ms=max(times),
    )


def start_iperf_server(ns: Namespace) -> subprocess.Popen[bytes]:
    """``iperf3 -s`` in ``ns`` (all addresses), tracked by the testbed; waits until it listens."""
    server = ns.popen(
        ["iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        out = ns.run(["ss", "-Htln", f"sport = :{IPERF_PORT}"], check=False).stdout
        return bool(out.strip())

    wait_for("iperf3 server", listening, timeout=10)
    return server


def iperf_once(ns: Namespace, target: str, seconds: int, reverse: bool) -> dict[str, Any]:
    argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    argv += ["--connect-timeout", "5000", *(["-R"] if reverse else [])]
    res = ns.run(argv, check=False, timeout=seconds + 40)
    try:
        report: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        report = {"error": f"no JSON (rc {res.returncode}): {res.stderr.strip()[-300:]}"}
    if res.returncode != 0 and "error" not in report:
        report["error"] = f"rc {res.returncode}"
    return report


def run_iperf(ns: Namespace, target: str, seconds: int, reverse: bool) -> TcpRun:
    """One iperf3 TCP run (retried once after an error, e.g. "server is busy")."""
    report = iperf_once(ns, target, seconds, reverse)
    if "error" in report:
        log(f"iperf3 to {target} failed ({report['error']}); retrying once")
        time.sleep(2)
        report = iperf_once(ns, target, seconds, reverse)
        if "error" in report:
            raise RuntimeError(f"iperf3 to {target}: {report['error']}")
    end = report["end"]
    return TcpRun(
        direction="b->a" if reverse else "a->b",
        mbit_s=end["sum_received"]["bits_per_second"] / 1e6,
        bytes=int(end["sum_received"]["bytes"]),
        retransmits=end.get("sum_sent", {}).get("retransmits"),
    )


def measure(
    setup: SetupResult,
    a: Vpn,
    args: argparse.Namespace,
    cpu_nodes: Sequence[Vpn] | None,
    testbed_netns: frozenset[int],
) -> None:
    """Ping, then ``repeats`` x (a->b, b->a) iperf3 runs from a's namespace to ``setup.target``.

    With ``cpu_nodes``, the CPU those nodes' processes use during each iperf3 run is recorded;
    for every run, the CPU of the work outside ``testbed_netns`` (:func:`others_cores`).
    """
    log(f"{setup.name}: {args.pings} pings {setup.source} -> {setup.target}")
    setup.ping = run_ping(a.ns, setup.target, args.pings)
    for i in range(args.repeats):
        for reverse in (False, True):
            before = cpu_snapshot(cpu_nodes) if cpu_nodes else None
            others = others_snapshot(testbed_netns)
            t0 = time.monotonic()
            run = run_iperf(a.ns, setup.target, args.seconds, reverse)
            wall = time.monotonic() - t0
            run.others_cores = others_cores(others, others_snapshot(testbed_netns), wall)
            if before is not None and cpu_nodes:
                run.cpu_s = cpu_seconds_since(before, cpu_nodes)
            setup.tcp.append(run)
            log(
                f"{setup.name}: run {i + 1}/{args.repeats} {run.direction}: "
                f"{run.mbit_s:.0f} Mbit/s, retransmits {run.retransmits}, "
                f"other processes {run.others_cores:.2f} cores"
            )


# ----------------------------------------------------------------------------------------------
# nodes


def certified_pair(
    ns_a: Namespace, ns_b: Namespace, root: Path, stages: dict[str, int]
) -> list[Node]:
    """Two nodes for the namespaces ``two_nodes`` built, as ``two_nodes(secure=True)`` makes
    them: certified by a fresh authority, each naming the other's public key (Noise IK). New
    configs, state and runtime directories under ``root``; not started."""
    authority = Authority.create(root / "authority")
    keys = [authority.certify(root / name / "state", name).public_key.hex() for name in NAMES]
    nodes = []
    for me, (name, ns) in enumerate(zip(NAMES, (ns_a, ns_b), strict=True)):
        peer = 1 - me
        config = write_config(
            root / name,
            name,
            me,
            peer,
            NAMES[peer],
            ca=authority.path,
            peer_key=keys[peer],
            stages=stages,
        )
        node = Node(name, ns, config, VIRTUAL[me], UNDERLAY[me], root / name)
        node.extra["authority"] = authority
        nodes.append(node)
    return nodes


def start_nodes(nodes: list[Node]) -> None:
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_running()
        n.wait_peers_up()


def check_security(nodes: list[Node], encrypted: bool) -> None:
    """The nodes really run the setup they are measured as (the supervisor's and every
    overlay_io worker's ``encrypted`` flag)."""
    for n in nodes:
        st = wait_for(f"{n.name} status", n.status, timeout=15)
        flags = [bool(st.get("encrypted"))]
        flags += [
            bool((w.get("stats") or {}).get("encrypted"))
            for w in st["workers"]
            if w["stage"] == "overlay_io"
        ]
        if any(f != encrypted for f in flags):
            raise RuntimeError(f"{n.name}: encrypted flags {flags}, expected {encrypted}")


def stop_nodes(nodes: list[Node]) -> None:
    """``supervisor stop`` each node and wait until it is gone (:func:`wait_gone`), so the
    next nodes start in clean namespaces."""
    procs: dict[str, list[tuple[int, int]]] = {}
    for n in nodes:
        sup, workers = node_pids(n)
        procs[n.name] = [(pid, t.start) for pid in (sup, *workers) if (t := proc_times(pid))]
    for n in nodes:
        res = n.cli("stop", str(n.config), check=False, timeout=40)
        if res.returncode != 0:
            raise RuntimeError(f"supervisor stop {n.name}: rc {res.returncode}: {res.stderr}")
    for n in nodes:
        wait_gone(n, procs[n.name])


def wait_gone(node: Node, procs: list[tuple[int, int]]) -> None:
    """Wait until ``node``'s supervisor has exited, its processes (pid, start time) are gone,
    and its TAP device and UDP port no longer exist in its namespace."""
    ns = node.ns

    def exited() -> bool:
        return node.proc is None or node.proc.poll() is not None

    def processes_gone() -> bool:
        return all((t := proc_times(pid)) is None or t.start != start for pid, start in procs)

    def device_gone() -> bool:
        return ns.run(["ip", "link", "show", "dev", DEVICE], check=False).returncode != 0

    def port_free() -> bool:
        return not ns.run(["ss", "-Huln", f"sport = :{PORT}"], check=False).stdout.strip()

    wait_for(f"{node.name} supervisor exit", exited, timeout=20)
    wait_for(f"{node.name} processes gone", processes_gone, timeout=20)
    wait_for(f"{node.name} {DEVICE} gone", device_gone, timeout=20)
    wait_for(f"{node.name} UDP port {PORT} free", port_free, timeout=20)


def node_health(node: Node) -> dict[str, Any]:
    """Workers' restarts, ring drops, non-zero worker drop counters and overlay bytes sent."""
    st = wait_for(f"{node.name} status", node.status, timeout=15)
    workers = {f"{w['stage']}:{w['worker']}": int(w["restarts"]) for w in st["workers"]}
    rings = {r["name"]: int(r["drops"]) for r in st["rings"]}
    worker_drops: dict[str, int] = {}
    for w in st["workers"]:
        stats = w.get("stats") or {}
        found = dict(stats.get("drops") or {})
        found.update((stats.get("classifier") or {}).get("drops") or {})
        for key in ("write_drops", "send_errors"):
            if stats.get(key):
                found[key] = stats[key]
        for reason, count in found.items():
            if count:
                worker_drops[f"{w['stage']}:{w['worker']} {reason}"] = int(count)
    sent = sum(int((w.get("stats") or {}).get("bytes_sent") or 0) for w in st["workers"])
    return {
        "restarts": workers,
        "ring_drops": rings,
        "worker_drops": worker_drops,
        "overlay_bytes_sent": sent,
    }


def settled_health(nodes: list[Node], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """:func:`node_health` of ``nodes`` once their counters have caught up with the traffic.

    Worker counters reach ``status`` with the workers' heartbeats (every
    ``heartbeat_interval_s``, 1 s in the test bed), so right after the last iperf3 run they may lack
    its final second. Read until the overlay bytes sent grow by less than 1 MB (keepalives only)
    between two reads more than a heartbeat apart.
    """
    deadline = time.monotonic() + timeout
    health = {n.name: node_health(n) for n in nodes}
    while True:
        time.sleep(1.5)
        again = {n.name: node_health(n) for n in nodes}
        grown = sum(again[k]["overlay_bytes_sent"] - health[k]["overlay_bytes_sent"] for k in again)
        health = again
        if grown < 1_000_000 or time.monotonic() > deadline:
            return health


def handshakes(node: Node) -> dict[str, Any]:
    """The control stage's link counters (``links``) and, per peer, pattern, handshakes and
    sessions, from ``status --json``."""
    st = wait_for(f"{node.name} status", node.status, timeout=15)
    peers = {
        p["name"]: {k: p.get(k) for k in ("state", "pattern", "handshakes", "sessions")}
        for p in st.get("peers") or []
    }
    return {"links": st.get("links"), "peers": peers}


def check_overlay_carried(avn: SetupResult) -> str:
    """The nodes' overlay_io must have sent at least what the iperf3 receivers got."""
    sent = sum(h["overlay_bytes_sent"] for h in avn.health.values())
    received = sum(r.bytes for r in avn.tcp)
    verdict = "ok" if sent >= received else "WARNING: less than iperf3 received, bypassed?"
    return (
        f"overlay bytes sent (both nodes) {sent / 1e9:.2f} GB, "
        f"iperf3 received {received / 1e9:.2f} GB: {verdict}"
    )


def measure_autovn(
    setup: SetupResult, nodes: list[Node], args: argparse.Namespace, testbed_netns: frozenset[int]
) -> None:
    """Start ``nodes``, measure idle CPU, then traffic, then read their counters."""
    encrypted = setup.key == "enc"
    log(f"{setup.name}: starting nodes (stages {scale_text(args.scale)})")
    start_nodes(nodes)
    check_security(nodes, encrypted)
    log(f"{setup.name}: idle CPU over {IDLE_SECONDS:.0f} s")
    setup.idle_cpu_percent = idle_cpu_percent(nodes, IDLE_SECONDS)
    measure(setup, nodes[0], args, nodes, testbed_netns)
    setup.health = settled_health(nodes)
    setup.overlay_check = check_overlay_carried(setup)
    if encrypted:
        setup.links = {n.name: handshakes(n) for n in nodes}


def measure_peer(
    setup: SetupResult,
    tb: Testbed,
    ns_a: Namespace,
    ns_b: Namespace,
    root: Path,
    args: argparse.Namespace,
    testbed_netns: frozenset[int],
) -> None:
    """A Debian peer (``bench.peers.debian``): configure, start one daemon per namespace, idle
    CPU, traffic, stop by pid and wait until its device and port are gone. The daemons are
    stopped on failure too (and by the testbed on Ctrl-C)."""
    peer = PEERS[setup.key]
    daemons = peer.prepare(peer, ns_a, ns_b, root)
    try:
        log(f"{setup.name}: starting {peer.binary} in both namespaces")
        peer.start(tb, daemons)
        log(f"{setup.name}: idle CPU over {IDLE_SECONDS:.0f} s")
        setup.idle_cpu_percent = idle_cpu_percent(list(daemons), IDLE_SECONDS)
        measure(setup, daemons[0], args, list(daemons), testbed_netns)
        for d in daemons:
            d.pids()  # still running after the traffic, or RuntimeError with its output
    except Exception:
        for d in daemons:
            log(f"{setup.name} {d.name} {peer.binary} output (tail):\n{d.tail()}")
        with contextlib.suppress(Exception):  # the error that matters is the one above
            peer.stop(tb, daemons)
        raise
    # (not on Ctrl-C: the testbed's signal handler has already ended everything by then)
    log(f"{setup.name}: stopping {peer.binary}")
    peer.stop(tb, daemons)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


# ----------------------------------------------------------------------------------------------
# output


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg()[0],
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "-"
    value = num / den
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 0.1 else f"{value:.4f}"


@dataclass
class Row:
    name: str
    values: dict[str, float | None]  # setup key -> value
    digits: int
    ratios: bool  # whether this row shows ratios (where both values exist)


def table_rows(setups: dict[str, SetupResult], repeats: int) -> list[Row]:
    def each(get: Any) -> dict[str, float | None]:
        return {k: get(s) for k, s in setups.items()}

    rows = [
        Row(f"tcp {d} Mbit/s (median {repeats})", each(lambda s, d=d: s.median_mbit(d)), 0, True)
        for d in ("a->b", "b->a")
    ]
    rows += [
        Row("ping p50 ms", each(lambda s: s.ping.p50_ms), 3, True),
        Row("ping p99 ms", each(lambda s: s.ping.p99_ms), 3, True),
        Row("cpu-s per GB (both ends)", each(lambda s: s.cpu_s_per_gb()), 2, True),
        Row(
            "idle cpu % of a core (alpha)",
            each(lambda s: s.idle_cpu_percent.get(NAMES[0])),
            2,
            True,
        ),
    ]
    rows += [
        Row(f"tcp {d} retransmits (median)", each(lambda s, d=d: s.median_retransmits(d)), 0, False)
        for d in ("a->b", "b->a")
    ]
    rows.append(
        Row("ping replies lost", each(lambda s: float(s.ping.sent - s.ping.received)), 0, False)
    )
    return rows


def render(result: dict[str, Any], setups: dict[str, SetupResult]) -> str:
    m = result["machine"]
    a = result["args"]
    lines = [
        f"autovn pipeline benchmark  {result['timestamp']}",
        f"machine: nproc {m['nproc']}, kernel {m['kernel']}, python {m['python']}, "
        f"load avg (1 min) at start {m['loadavg']:.2f}",
        f"CPU of other processes on the machine during the iperf3 runs, mean cores (of "
        f"{m['nproc']}): "
        + ", ".join(f"{s.name} {fmt(s.others_cores(), 2)}" for s in setups.values()),
        f"iperf3 TCP 1 stream, {a['seconds']} s x {a['repeats']} per direction; "
        f"{a['pings']} pings at 10 ms; stages {scale_text(result['stages'])}",
        f"measured in this order, same namespaces: {', '.join(s.name for s in setups.values())}"
        f" ({result['elapsed_s']:.0f} s)",
        "",
    ]
    for key, why in result.get("skipped", {}).items():
        lines.append(f"NOTE: {SETUPS[key]} not measured, column left out: {why}")
    if result.get("skipped"):
        lines.append("")
    rows = table_rows(setups, a["repeats"])
    Cols = list[tuple[str, str | None]]  # (setup, None) for values, (num, den) for ratios
    blocks: list[tuple[str, Cols]] = [("values", [(k, None) for k in setups])]
    to_raw: Cols = [(n, d) for n, d in TO_RAW if n in setups and d in setups]
    versus: Cols = [(n, d) for n, d in VERSUS if n in setups and d in setups]
    if to_raw:
        blocks.append(("ratios against raw veth", to_raw))
    if versus:
        blocks.append(("autovn against the Debian peers", versus))
    for title, cols in blocks:
        labels = [setups[n].name if d is None else f"{n}/{d}" for n, d in cols]
        widths = [max(11, len(label) + 2) for label in labels]
        head = "".join(f"{label:>{w}}" for label, w in zip(labels, widths, strict=True))
        lines.append(f"{title:<34}" + head)
        for row in rows:
            if title != "values" and not row.ratios:
                continue
            line = f"{row.name:<34}"
            for (n, d), w in zip(cols, widths, strict=True):
                if d is None:
                    shown = fmt(row.values[n], row.digits)
                else:
                    shown = ratio(row.values[n], row.values[d])
                line += f"{shown:>{w}}"
            lines.append(line)
        lines.append("")
    lines.append("what each column ran (same namespaces, iperf3 and ping from alpha's namespace):")
    for s in setups.values():
        lines.append(f"  {s.name:<11} {s.source} -> {s.target}: {s.ran}")
    for s in setups.values():
        if s.key not in ("plain", "enc"):
            continue
        lines.append("")
        for node, health in s.health.items():
            who = f"{s.name} {node}"
            restarts = ", ".join(f"{k}={v}" for k, v in health["restarts"].items())
            rings = health["ring_drops"]
            drops = ", ".join(f"{k}={v}" for k, v in rings.items() if v)
            lines.append(f"{who} restarts: {restarts}")
            lines.append(f"{who} ring drops: {drops or f'0 in all {len(rings)}'}")
            other = ", ".join(f"{k}={v}" for k, v in health["worker_drops"].items()) or "none"
            lines.append(f"{who} worker drops: {other}")
        for node, hs in s.links.items():
            links = dict(hs["links"] or {})
            refused = links.pop("refused", None) or {}
            counters = ", ".join(f"{k}={v}" for k, v in links.items()) or "none"
            refused_text = ", ".join(f"{k}={v}" for k, v in refused.items()) or "none"
            lines.append(f"{s.name} {node} handshakes: {counters}; refused: {refused_text}")
            for peer, p in hs["peers"].items():
                lines.append(
                    f"{s.name} {node} peer {peer}: {p['state']}, pattern {p['pattern']}, "
                    f"handshakes {p['handshakes']}, sessions {p['sessions']}"
                )
        lines.append(f"{s.name}: {s.overlay_check}")
    lines.append("")
    lines.append(f"results: {result['file']}")
    return "\n".join(lines)


def write_json(result: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"pipeline-{result['timestamp']}.json"
    result["file"] = str(path.relative_to(REPO))
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# main


def parse_setups(text: str) -> list[str]:
    """``raw,plain,enc,tinc,tinc-plain,openvpn`` (any subset, any order) -> the chosen keys in
    measuring order."""
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    unknown = chosen - SETUPS.keys()
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"bad --setups {text!r}: want a comma-separated subset of {','.join(SETUPS)}"
        )
    return [k for k in SETUPS if k in chosen]


def parse_scale(text: str) -> dict[str, int]:
    """``queues=2,classifier=2,overlay_io=2`` -> stage knobs for ``two_nodes``."""
    knobs: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in SCALE_KEYS or not value.isdigit() or not 1 <= int(value) <= 16:
            raise argparse.ArgumentTypeError(
                f"bad --scale item {item!r}: want KEY=N with KEY in {SCALE_KEYS}, N in 1..16"
            )
        knobs[key] = int(value)
    return knobs


def scale_text(knobs: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in knobs.items()) or "default"


def bounded_int(lo: int, hi: int) -> Any:
    def check(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} not in {lo}..{hi}")
        return value

    return check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--setups",
        type=parse_setups,
        default=list(SETUPS),
        help=f"which setups to measure, measured in this order ({','.join(SETUPS)})",
    )
    p.add_argument("--seconds", type=bounded_int(1, 120), default=5, help="iperf3 -t (5)")
    p.add_argument(
        "--repeats",
        type=bounded_int(1, 20),
        default=3,
        help="iperf3 runs per direction and setup (3)",
    )
    p.add_argument(
        "--pings",
        type=bounded_int(200, 5000),
        default=200,
        help="echo requests per setup, 10 ms apart (200)",
    )
    p.add_argument(
        "--scale",
        type=parse_scale,
        default={},
        help="stage knobs for all nodes, e.g. queues=2,classifier=2,overlay_io=2",
    )
    p.add_argument(
        "--json-only", action="store_true", help="print the JSON result instead of the table"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, SetupResult]]:
    result: dict[str, Any] = {
        "timestamp": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "machine": machine(),
        "args": {
            "setups": args.setups,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "pings": args.pings,
        },
        "stages": args.scale,
    }
    setups: dict[str, SetupResult] = {}
    skipped: dict[str, str] = {}  # Debian peer setups not measured -> why
    for key in args.setups:
        if key in PEERS:
            peer = PEERS[key]
            if (why := peer.missing()) is not None:
                skipped[key] = why
                log(f"{peer.title}: skipped: {why}")
                continue
            setups[key] = SetupResult(key, peer.title, *peer.virtual, ran=peer.describe)
            continue
        ends = UNDERLAY if key == "raw" else VIRTUAL
        setups[key] = SetupResult(key, SETUPS[key], ends[0], ends[1], ran=AUTOVN_RAN[key])
    started: list[Node] = []
    t0 = time.monotonic()
    with Testbed("avb") as tb:
        # The namespaces and the veth, once; the nodes two_nodes makes are the plaintext ones.
        a, b = two_nodes(tb, tmp / "plain", start=False, secure=False, **args.scale)
        pairs = {"plain": [a, b]}
        testbed_netns = frozenset(netns_inode(ns) for ns in (a.ns, b.ns))
        if "enc" in setups:
            pairs["enc"] = certified_pair(a.ns, b.ns, tmp / "enc", args.scale)
        try:
            server = start_iperf_server(b.ns)
            if "raw" in setups:
                measure(setups["raw"], a, args, None, testbed_netns)
            vpns = [k for k in setups if k != "raw"]
            for i, key in enumerate(vpns):
                if i > 0 or "raw" in setups:
                    # A fresh server per setup: one whose last test's connections went over a
                    # tunnel that was just taken down can stay "busy" for minutes.
                    tb.stop(server)
                    server = start_iperf_server(b.ns)
                if key in PEERS:
                    try:
                        measure_peer(setups[key], tb, a.ns, b.ns, tmp / key, args, testbed_netns)
                    except Exception as exc:  # a baseline that fails must not cost the run
                        skipped[key] = f"failed: {exc}"
                        log(f"{setups[key].name}: failed, column dropped: {exc!r}")
                        del setups[key]
                    continue
                nodes = pairs[key]
                started += nodes
                measure_autovn(setups[key], nodes, args, testbed_netns)
                if i + 1 < len(vpns):
                    log(f"{setups[key].name}: stopping nodes")
                    stop_nodes(nodes)
        except Exception:
            for n in started:
                log(
                    f"{n.root.parent.name} {n.name} supervisor output (tail):\n"
                    f"{tail(n.root / 'supervisor.out')}"
                )
            raise
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["skipped"] = skipped
    result["setups"] = {k: asdict(s) for k, s in setups.items()}
    result["summary"] = {
        k: {
            "name": s.name,
            "tcp_a_to_b_mbit_s": s.median_mbit("a->b"),
            "tcp_b_to_a_mbit_s": s.median_mbit("b->a"),
            "ping_p50_ms": s.ping.p50_ms if s.ping else None,
            "ping_p99_ms": s.ping.p99_ms if s.ping else None,
            "cpu_s_per_gb": s.cpu_s_per_gb(),
            "idle_cpu_percent_alpha": s.idle_cpu_percent.get(NAMES[0]),
            "ran": s.ran,
            "others_cores_during_iperf3": s.others_cores(),
        }
        for k, s in setups.items()
    }
    return result, setups


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("pipeline_bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="autovn-bench-") as tmp:
            result, setups = run(args, Path(tmp))
    except KeyboardInterrupt:
        log("interrupted; testbed removed")
        return 130
    write_json(result)
    print(json.dumps(result, indent=2) if args.json_only else render(result, setups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
