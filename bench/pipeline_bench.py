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
   (Noise IK handshake), every frame sealed with the negotiated data cipher (AES-256-GCM by
   default): the same traffic again.
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

**Before and after** (``--baseline REV``): the autovn setups (plain, enc) are measured for
the code of the git revision REV too, in the same run. The bench checks REV out into a
temporary ``git worktree`` (removed at exit) and starts that tree's nodes with their working
directory there (``Node.source_tree``: ``python -m`` imports the tree's own ``supervisor`` and
``pipeline`` first, and the supervisor starts its workers in the same directory); the current
nodes run this checkout's code. Both run in the same namespaces, never at once, alternating:
``--repeats`` rounds, each starting the baseline's nodes, measuring one repeat (idle CPU over
10 s / ``--repeats``, ``--pings`` / ``--repeats`` pings, one iperf3 run each way) and stopping
them, then the same for the current nodes; so noise on a shared machine hits both alike.
The baseline gets its own columns (``plaintext@<commit>``) and a block of current/baseline
ratios: throughput both ways, ping p50 and p99, CPU-s per GB and idle CPU. The configs are
written by this checkout, so REV must read them (any revision with today's keys).

Run as root from the repository root::

    python3 bench/pipeline_bench.py [--setups raw,plain,enc,tinc,tinc-plain,openvpn]
                                    [--seconds 5] [--repeats 3]
                                    [--pings 200] [--scale queues=2,classifier=2,overlay_io=2]
                                    [--baseline REV] [--json-only]

Everything (namespaces, nodes, peer daemons, iperf3 server) lives in a ``Testbed`` and is
removed on exit, on failure and on Ctrl-C. Nothing touches the root namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.peers.debian import PEERS, PeerDaemon  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("pipeline_bench", "bench", "pipeline")
log = BENCH.log
IDLE_SECONDS = 10.0
SCALE_KEYS = ("queues", "classifier", "overlay_io")
AUTOVN = {"raw": "raw veth", "plain": "plaintext", "enc": "encrypted"}
PIPELINE_PEERS = ("tinc", "tinc-plain", "openvpn")  # bench/peers runs all of PEERS
SETUPS = AUTOVN | {k: PEERS[k].title for k in PIPELINE_PEERS}  # in measuring order
# (numerator, denominator): every setup against the raw veth, then autovn against the peers
TO_RAW = tuple((k, "raw") for k in SETUPS if k != "raw")
VERSUS = (("enc", "plain"), ("enc", "tinc"), ("plain", "tinc-plain"), ("enc", "openvpn"))
RATIOS = TO_RAW + VERSUS
AUTOVN_RAN = {
    "raw": "no VPN: the veth between the underlay addresses 198.18.0.1 <-> 198.18.0.2",
    "plain": "autovn, security.insecure_plaintext = true, 100.64.0.1/.2 (TAP mtu 1400), "
    f"UDP {testbed.PORT}",
    "enc": "autovn, Noise IK + the default data cipher (AES-256-GCM), 100.64.0.1/.2 "
    f"(TAP mtu 1400), UDP {testbed.PORT}",
}
NAMES = ("alpha", "beta")
BASE = "@base"  # the key of a setup measured with the baseline's code: "plain@base"
COMPARED = (  # the summary's figures in the current/baseline block
    "tcp_a_to_b_mbit_s",
    "tcp_b_to_a_mbit_s",
    "ping_p50_ms",
    "ping_p99_ms",
    "cpu_s_per_gb",
    "idle_cpu_percent_alpha",
)


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class PingResult:
    sent: int
    received: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, sent: int, times: list[float]) -> PingResult:
        """From the RTTs (ms) of the replies to ``sent`` echo requests."""
        return cls(
            sent=sent,
            received=len(times),
            p50_ms=harness.percentile(times, 50),
            p99_ms=harness.percentile(times, 99),
            mean_ms=statistics.fmean(times),
            max_ms=max(times),
        )


@dataclass
class SetupResult:
    key: str  # "raw", "plain", "enc", "tinc", "tinc-plain", "openvpn"; "plain@base", ...
    name: str  # column title
    source: str
    target: str
    ran: str = ""  # what the column ran
    ping: PingResult | None = None
    tcp: list[harness.TcpRun] = field(default_factory=list)
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

    def cpu_s_per_gb(self, direction: str | None = None) -> float | None:
        """CPU-seconds per GB over the iperf3 runs (of ``direction`` alone, if given)."""
        runs = [r for r in self.tcp if direction in (None, r.direction)]
        if not runs or any(r.cpu_s is None for r in runs):
            return None
        cpu = sum(r.cpu_s or 0.0 for r in runs)
        gb = sum(r.bytes for r in runs) / 1e9
        return cpu / gb if gb > 0 else None


# ----------------------------------------------------------------------------------------------
# CPU accounting from /proc


# What the CPU accounting reads: autovn nodes or Debian peer daemons. ``pids()`` gives a node's
# supervisor pid and its workers' (``status --json``), a peer's daemon pid and none (counted
# like a supervisor: its own and its reaped children's CPU).
Vpn = testbed.Node | PeerDaemon


@dataclass
class CpuSnapshot:
    times: dict[int, harness.ProcTimes]
    supervisors: list[int]


def cpu_snapshot(nodes: Sequence[Vpn]) -> CpuSnapshot:
    times: dict[int, harness.ProcTimes] = {}
    supervisors: list[int] = []
    for node in nodes:
        sup, workers = node.pids()
        supervisors.append(sup)
        for pid in (sup, *workers):
            t = harness.proc_times(pid)
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
        new = harness.proc_times(pid)
        if new is None or new.start != old.start:
            continue
        ticks += new.own - old.own
        if pid in before.supervisors:
            ticks += new.children - old.children
    for node in nodes:
        for pid in node.pids()[1]:
            was = before.times.get(pid)
            now = harness.proc_times(pid)
            if now is not None and (was is None or now.start != was.start):
                ticks += now.own
    return ticks / harness.CLK_TCK


def idle_cpu_percent(nodes: Sequence[Vpn], seconds: float) -> dict[str, float]:
    """Percent of one core used by each node's processes over ``seconds`` of no traffic."""
    snaps = {n.name: cpu_snapshot([n]) for n in nodes}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {n.name: 100.0 * cpu_seconds_since(snaps[n.name], [n]) / wall for n in nodes}


# ----------------------------------------------------------------------------------------------
# traffic


def run_ping(ns: testbed.Namespace, target: str, count: int, interval: float = 0.01) -> PingResult:
    harness.warm_up(ns, target)
    return PingResult.of(count, harness.ping_times(ns, target, count, interval))


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
    setup.ping = run_ping(a.ns, setup.target, args.pings, args.ping_interval)
    for i in range(args.repeats):
        tcp_round(setup, a, args, cpu_nodes, testbed_netns, i)


def tcp_round(
    setup: SetupResult,
    a: Vpn,
    args: argparse.Namespace,
    cpu_nodes: Sequence[Vpn] | None,
    testbed_netns: frozenset[int],
    i: int,
) -> None:
    """Repeat ``i``: one iperf3 run a->b and one b->a, with the CPU as :func:`measure` says."""
    for reverse in (False, True):
        before = cpu_snapshot(cpu_nodes) if cpu_nodes else None
        others = harness.others_snapshot(testbed_netns)
        t0 = time.monotonic()
        run = harness.run_iperf(a.ns, setup.target, args.seconds, reverse, log)
        wall = time.monotonic() - t0
        run.others_cores = harness.others_cores(
            others, harness.others_snapshot(testbed_netns), wall
        )
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


def check_security(nodes: list[testbed.Node], encrypted: bool) -> None:
    """The nodes really run the setup they are measured as (the supervisor's and every
    overlay_io worker's ``encrypted`` flag)."""
    for n in nodes:
        st = testbed.wait_for(f"{n.name} status", n.status, timeout=15)
        flags = [bool(st.get("encrypted"))]
        flags += [
            bool((w.get("stats") or {}).get("encrypted"))
            for w in st["workers"]
            if w["stage"] == "overlay_io"
        ]
        if any(f != encrypted for f in flags):
            raise RuntimeError(f"{n.name}: encrypted flags {flags}, expected {encrypted}")


def handshakes(node: testbed.Node) -> dict[str, Any]:
    """The control stage's link counters (``links``) and, per peer, pattern, handshakes and
    sessions, from ``status --json``."""
    st = testbed.wait_for(f"{node.name} status", node.status, timeout=15)
    peers = {
        p["name"]: {k: p.get(k) for k in ("state", "pattern", "handshakes", "sessions")}
        for p in st.get("peers") or []
    }
    return {"links": st.get("links"), "peers": peers}


def check_overlay_carried(avn: SetupResult) -> str:
    """The nodes' overlay_io must have sent at least what the iperf3 receivers got."""
    sent = sum(h["overlay_bytes_sent"] for h in avn.health.values())
    return harness.overlay_check(sent, sum(r.bytes for r in avn.tcp))


def measure_autovn(
    setup: SetupResult,
    nodes: list[testbed.Node],
    args: argparse.Namespace,
    testbed_netns: frozenset[int],
) -> None:
    """Start ``nodes``, measure idle CPU, then traffic, then read their counters."""
    encrypted = setup.key == "enc"
    log(f"{setup.name}: starting nodes (stages {scale_text(args.scale)})")
    testbed.start_all(nodes, peers_up=True)
    check_security(nodes, encrypted)
    log(f"{setup.name}: idle CPU over {IDLE_SECONDS:.0f} s")
    setup.idle_cpu_percent = idle_cpu_percent(nodes, IDLE_SECONDS)
    measure(setup, nodes[0], args, nodes, testbed_netns)
    setup.health = harness.settled_health(nodes)
    setup.overlay_check = check_overlay_carried(setup)
    if encrypted:
        setup.links = {n.name: handshakes(n) for n in nodes}


def measure_peer(
    setup: SetupResult,
    tb: testbed.Testbed,
    ns_a: testbed.Namespace,
    ns_b: testbed.Namespace,
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


# ----------------------------------------------------------------------------------------------
# the baseline: the same setups with the code of another revision, measured alternately


@dataclass(frozen=True)
class Baseline:
    """A temporary ``git worktree`` of the revision ``--baseline`` names."""

    rev: str  # as given
    commit: str
    subject: str
    root: Path

    @property
    def short(self) -> str:
        return self.commit[:7]


def git(*args: str) -> str:
    res = subprocess.run(
        ["git", "-C", str(harness.REPO), *args], capture_output=True, text=True, timeout=120
    )
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res.stdout.strip()


@contextlib.contextmanager
def baseline_tree(rev: str, root: Path) -> Iterator[Baseline]:
    """``rev`` checked out (detached) into the new worktree ``root``; removed on the way out,
    also on failure and Ctrl-C. Checks that Python started there imports that tree's
    ``supervisor`` and ``pipeline``, as its nodes will (``-c``, like ``-m``, puts the working
    directory first on ``sys.path``, before the finder of an editable install)."""
    commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    subject = git("log", "-1", "--format=%s", commit)
    git("worktree", "add", "--detach", "--quiet", str(root), commit)
    try:
        code = "import pipeline, supervisor; print(pipeline.__file__, supervisor.__file__)"
        res = subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
        )
        found = [Path(f).resolve() for f in res.stdout.split()]
        inside = root.resolve()
        if res.returncode != 0 or not found or any(not f.is_relative_to(inside) for f in found):
            raise RuntimeError(f"python in {root} imports {found or res.stderr.strip()}")
        yield Baseline(rev, commit, subject, inside)
    finally:
        with contextlib.suppress(Exception):  # an error inside matters more
            git("worktree", "remove", "--force", str(root))


def terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


class IperfServer:
    """The ``iperf3 -s`` the setups measure against, started afresh before each: one whose
    last test went over a tunnel that was just taken down can stay "busy" for minutes."""

    def __init__(self, tb: testbed.Testbed, ns: testbed.Namespace) -> None:
        self.tb, self.ns = tb, ns
        self.proc = harness.start_iperf_server(ns)

    def fresh(self) -> None:
        self.tb.stop(self.proc)
        self.proc = harness.start_iperf_server(self.ns)


def check_tree(nodes: Sequence[testbed.Node]) -> None:
    """Each node's supervisor and workers run in its ``source_tree`` (their working
    directory), so they run that tree's code."""
    for n in nodes:
        assert n.source_tree is not None
        sup, workers = n.pids()
        for pid in (sup, *workers):
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            if cwd.resolve() != n.source_tree.resolve():
                raise RuntimeError(f"{n.name}: pid {pid} runs in {cwd}, not {n.source_tree}")


def add_counts(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``total`` plus ``more``, key by key, in nested dicts of counts."""
    out = dict(total)
    for key, value in more.items():
        if isinstance(value, dict):
            out[key] = add_counts(out.get(key, {}), value)
        else:
            out[key] = out.get(key, 0) + value
    return out


def measure_alternately(
    setups: tuple[SetupResult, SetupResult],
    pairs: tuple[list[testbed.Node], list[testbed.Node]],
    server: IperfServer,
    args: argparse.Namespace,
    testbed_netns: frozenset[int],
) -> None:
    """The baseline's setup and the current one (``setups``, ``pairs``: baseline first), in
    ``repeats`` rounds of one repeat each: start the nodes, idle CPU over ``IDLE_SECONDS /
    repeats``, ``pings / repeats`` pings, one iperf3 run each way, read the counters, stop.

    Across the rounds, each setup's pings are pooled for p50 and p99, its idle CPU is the
    mean of the rounds', its counters are summed, and its handshakes are the last round's.
    """
    count = -(-args.pings // args.repeats)
    idle_s = IDLE_SECONDS / args.repeats
    times: dict[str, list[float]] = {s.key: [] for s in setups}
    idle: dict[str, list[dict[str, float]]] = {s.key: [] for s in setups}
    rounds = [(i, s, n) for i in range(args.repeats) for s, n in zip(setups, pairs, strict=True)]
    for k, (i, setup, nodes) in enumerate(rounds):
        if k > 0:
            server.fresh()  # (the caller gave the first round a fresh one)
        encrypted = setup.key.removesuffix(BASE) == "enc"
        log(f"{setup.name}: round {i + 1}/{args.repeats}: starting nodes")
        testbed.start_all(nodes, peers_up=True)
        check_security(nodes, encrypted)
        check_tree(nodes)
        log(f"{setup.name}: idle CPU over {idle_s:.1f} s")
        idle[setup.key].append(idle_cpu_percent(nodes, idle_s))
        log(f"{setup.name}: {count} pings {setup.source} -> {setup.target}")
        harness.warm_up(nodes[0].ns, setup.target)
        times[setup.key] += harness.ping_times(nodes[0].ns, setup.target, count, args.ping_interval)
        tcp_round(setup, nodes[0], args, nodes, testbed_netns, i)
        setup.health = add_counts(setup.health, harness.settled_health(nodes))
        if encrypted:
            setup.links = {n.name: handshakes(n) for n in nodes}
        log(f"{setup.name}: stopping nodes")
        testbed.stop_all(nodes)
    for setup in setups:
        setup.ping = PingResult.of(count * args.repeats, times[setup.key])
        each = idle[setup.key]
        setup.idle_cpu_percent = {n: statistics.fmean(r[n] for r in each) for n in each[0]}
        setup.overlay_check = check_overlay_carried(setup)


# ----------------------------------------------------------------------------------------------
# output


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
        + ", ".join(f"{s.name} {harness.fmt(s.others_cores(), 2)}" for s in setups.values()),
        f"iperf3 TCP 1 stream, {a['seconds']} s x {a['repeats']} per direction; "
        f"{a['pings']} pings at 10 ms; stages {scale_text(result['stages'])}",
        f"measured in this order, same namespaces: {', '.join(s.name for s in setups.values())}"
        f" ({result['elapsed_s']:.0f} s)",
        "",
    ]
    if base := result.get("baseline"):
        lines[-1:] = [
            f"baseline {base['rev']} = {base['commit'][:7]} ({base['subject']}): measured "
            f"alternately with the current code, baseline first, one repeat per round "
            f"({a['repeats']} rounds, nodes started afresh in each)",
            "",
        ]
    for key, why in result.get("skipped", {}).items():
        lines.append(f"NOTE: {SETUPS[key]} not measured, column left out: {why}")
    if result.get("skipped"):
        lines.append("")
    rows = table_rows(setups, a["repeats"])
    Cols = list[tuple[str, str | None]]  # (setup, None) for values, (num, den) for ratios
    blocks: list[tuple[str, Cols, list[str]]] = [
        ("values", [(k, None) for k in setups], [s.name for s in setups.values()])
    ]
    to_raw: Cols = [(n, d) for n, d in TO_RAW if n in setups and d in setups]
    versus: Cols = [(n, d) for n, d in VERSUS if n in setups and d in setups]
    if to_raw:
        blocks.append(("ratios against raw veth", to_raw, [f"{n}/{d}" for n, d in to_raw]))
    if versus:
        blocks.append(("autovn against the Debian peers", versus, [f"{n}/{d}" for n, d in versus]))
    to_base: Cols = [(k, k + BASE) for k in AUTOVN if k + BASE in setups]
    if to_base:
        blocks.append(("current/baseline", to_base, [f"{n}/base" for n, _ in to_base]))
    for title, cols, labels in blocks:
        widths = [max(11, len(label) + 2) for label in labels]
        head = "".join(f"{label:>{w}}" for label, w in zip(labels, widths, strict=True))
        lines.append(f"{title:<34}" + head)
        for row in rows:
            if title != "values" and not row.ratios:
                continue
            line = f"{row.name:<34}"
            for (n, d), w in zip(cols, widths, strict=True):
                if d is None:
                    shown = harness.fmt(row.values[n], row.digits)
                else:
                    shown = harness.ratio(row.values[n], row.values[d])
                line += f"{shown:>{w}}"
            lines.append(line)
        lines.append("")
    lines.append("what each column ran (same namespaces, iperf3 and ping from alpha's namespace):")
    for s in setups.values():
        lines.append(f"  {s.name:<11} {s.source} -> {s.target}: {s.ran}")
    for s in setups.values():
        if s.key.removesuffix(BASE) not in ("plain", "enc"):
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


# ----------------------------------------------------------------------------------------------
# main


def parse_setups(text: str) -> list[str]:
    """``raw,plain,enc,tinc,tinc-plain,openvpn`` (any subset, any order) -> the chosen keys in
    measuring order."""
    return harness.subset(text, list(SETUPS))


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--setups",
        type=parse_setups,
        default=list(SETUPS),
        help=f"which setups to measure, measured in this order ({','.join(SETUPS)})",
    )
    harness.traffic_options(
        p,
        seconds=5,
        repeats="iperf3 runs per direction and setup",
        pings=200,
        fewest_pings=200,
        pings_per="per setup, 10 ms apart",
    )
    p.add_argument(
        "--scale",
        type=parse_scale,
        default={},
        help="stage knobs for all nodes, e.g. queues=2,classifier=2,overlay_io=2",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also measure plain and enc with the code of git revision REV (a temporary "
        "worktree), alternately with the current code, and print current/baseline ratios",
    )
    p.add_argument(
        "--json-only", action="store_true", help="print the JSON result instead of the table"
    )
    args = p.parse_args(argv)
    if args.baseline is not None:
        if not {"plain", "enc"} & set(args.setups):
            p.error("--baseline compares autovn's code: --setups must hold plain or enc")
        try:
            git("rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}")
        except RuntimeError:
            p.error(f"--baseline {args.baseline}: no such commit in {harness.REPO}")
    return args


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, SetupResult]]:
    if args.baseline is None:
        return run_setups(args, tmp, None)
    # SIGTERM then ends the run with an exception, as Ctrl-C does (once the testbed's handler
    # has removed the namespaces), so that the worktree goes too.
    signal.signal(signal.SIGTERM, terminated)
    with baseline_tree(args.baseline, tmp / "baseline") as base:
        log(f"baseline {base.rev} = {base.short} ({base.subject}) in {base.root}")
        return run_setups(args, tmp, base)


def run_setups(
    args: argparse.Namespace, tmp: Path, base: Baseline | None
) -> tuple[dict[str, Any], dict[str, SetupResult]]:
    """Measure the setups of ``args`` (and, with ``base``, the autovn ones with its code)."""
    result = BENCH.new_result(args, "setups", "seconds", "repeats", "pings")
    result["stages"] = args.scale
    if base is not None:
        result["args"]["baseline"] = base.rev
        result["baseline"] = {"rev": base.rev, "commit": base.commit, "subject": base.subject}
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
        ends = testbed.UNDERLAY if key == "raw" else testbed.VIRTUAL
        if base is not None and key != "raw":
            setups[key + BASE] = SetupResult(
                key + BASE,
                f"{SETUPS[key]}@{base.short}",
                *ends,
                ran=f"{AUTOVN_RAN[key]}; the code of {base.rev} ({base.short})",
            )
        setups[key] = SetupResult(key, SETUPS[key], ends[0], ends[1], ran=AUTOVN_RAN[key])
    started: list[testbed.Node] = []
    t0 = time.monotonic()
    with testbed.Testbed("avb") as tb:
        # The namespaces and the veth, once; every pair of nodes runs in them in turn.
        ns_a, ns_b = testbed.veth_pair(tb)
        testbed_netns = frozenset(harness.netns_inode(ns) for ns in (ns_a, ns_b))

        def pair(key: str, tree: Path) -> list[testbed.Node]:
            secure = key.removesuffix(BASE) == "enc"
            alpha, beta = testbed.node_pair(
                ns_a, ns_b, tmp / key, secure=secure, stages=args.scale, source_tree=tree
            )
            return [alpha, beta]

        # The plaintext pair always: alpha's namespace is where the raw veth is measured from.
        pairs = {"plain": pair("plain", harness.REPO)}
        if "enc" in setups:
            pairs["enc"] = pair("enc", harness.REPO)
        if base is not None:
            pairs |= {k + BASE: pair(k + BASE, base.root) for k in AUTOVN if k + BASE in setups}
        a = pairs["plain"][0]
        try:
            server = IperfServer(tb, ns_b)
            if "raw" in setups:
                measure(setups["raw"], a, args, None, testbed_netns)
            vpns = [k for k in setups if k != "raw" and not k.endswith(BASE)]
            for i, key in enumerate(vpns):
                if i > 0 or "raw" in setups:
                    server.fresh()
                if key + BASE in setups:
                    both = (setups[key + BASE], setups[key])
                    trees = (pairs[key + BASE], pairs[key])
                    started += trees[0] + trees[1]
                    measure_alternately(both, trees, server, args, testbed_netns)
                    continue
                if key in PEERS:
                    try:
                        measure_peer(setups[key], tb, ns_a, ns_b, tmp / key, args, testbed_netns)
                    except Exception as exc:  # a peer that fails must not cost the run
                        skipped[key] = f"failed: {exc}"
                        log(f"{setups[key].name}: failed, column dropped: {exc!r}")
                        del setups[key]
                    continue
                nodes = pairs[key]
                started += nodes
                measure_autovn(setups[key], nodes, args, testbed_netns)
                if i + 1 < len(vpns):
                    log(f"{setups[key].name}: stopping nodes")
                    testbed.stop_all(nodes)
        except Exception:
            for n in started:
                log(
                    f"{n.root.parent.name} {n.name} supervisor output (tail):\n"
                    f"{harness.tail(n.output_file)}"
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
    if base is not None:
        result["baseline"]["current_over_baseline"] = {
            k: over_baseline(result["summary"], k) for k in AUTOVN if k + BASE in setups
        }
    return result, setups


def over_baseline(summary: dict[str, dict[str, Any]], key: str) -> dict[str, float | None]:
    """current/baseline of each figure the ratio block shows, for setup ``key``."""
    now, then = summary[key], summary[key + BASE]
    return {m: now[m] / then[m] if now[m] is not None and then[m] else None for m in COMPARED}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
