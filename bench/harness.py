"""What the benchmarks that run real nodes share: the measuring, not the setups.

``pipeline_bench.py``, ``router_bench.py``, ``peers`` and ``peers/debian.py`` build their
networks with the test bed (``supervisor.testbed``) and measure them with this module:

- **progress and results**: a ``Script`` names a bench; it prints progress lines on stderr
  (``[bench] what happens``: stdout holds only the table or the JSON), writes the result to
  ``bench/results/<kind>-<timestamp>.json`` and runs ``main`` (root check, a temporary
  directory, Ctrl-C);
- **CPU accounting from /proc**: ``ProcTimes`` of a pid, of the process trees under some
  pids (``tree_times``), and the CPU of everything on the machine that is not the bench
  (``others_snapshot``, ``others_cores``), which says whether a figure was disturbed;
- **traffic**: pings (``ping_times``, ``percentile``), iperf3 (``start_iperf_server``,
  ``run_iperf``, ``TcpRun``), the time from a start to the first echo reply
  (``first_reply``), random loss on the underlay (``random_loss``) and the load average;
- **the nodes' own counters**: restarts, drops and overlay bytes from ``status --json``
  (``settled_health``, ``overlay_check``);
- **output**: ``machine``, ``fmt``, ``ratio``, ``tail``, and ``bounded_int`` for options.

Kernel work done in softirq (veth, bridge, TAP, TCP/IP, tc) is charged to no process: no
figure here counts it.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from supervisor.testbed import Namespace, Node, wait_for

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread
IPERF_PORT = 5201

Log = Callable[[str], None]
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# progress, results, main


@dataclass(frozen=True)
class Script:
    """One benchmark script: ``name`` in its error messages, ``tag`` on its progress lines
    (and in its temporary directory's name), ``kind`` in its results file's name."""

    name: str
    tag: str
    kind: str

    def log(self, msg: str) -> None:
        """Progress goes to stderr, so stdout holds only the tables (or the JSON)."""
        print(f"[{self.tag}] {msg}", file=sys.stderr, flush=True)

    def new_result(self, args: argparse.Namespace, *options: str) -> dict[str, Any]:
        """The head of a result: when (also the results file's name), on what machine, and
        the values of ``options``."""
        return {
            "timestamp": datetime.now().strftime("%Y%m%d-%H%M%S"),
            "machine": machine(),
            "args": {name: getattr(args, name) for name in options},
        }

    def write_json(self, result: dict[str, Any]) -> Path:
        """``result`` to ``bench/results/<kind>-<timestamp>.json``; ``result["file"]`` says
        where (relative to the repository)."""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.kind}-{result['timestamp']}.json"
        result["file"] = str(path.relative_to(REPO))
        path.write_text(json.dumps(result, indent=2) + "\n")
        return path

    def main(
        self,
        args: argparse.Namespace,
        run: Callable[[argparse.Namespace, Path], tuple[dict[str, Any], T]],
        render: Callable[[dict[str, Any], T], str],
        *,
        as_json: bool,
    ) -> int:
        """Run ``run(args, tmp)`` as root in a temporary directory, write its result and
        print it (as JSON with ``as_json``, else ``render``ed). 130 after Ctrl-C: the
        testbed has removed everything by then."""
        if os.geteuid() != 0:
            print(f"{self.name}: needs root (network namespaces)", file=sys.stderr)
            return 2
        try:
            with tempfile.TemporaryDirectory(prefix=f"autovn-{self.tag}-") as tmp:
                result, data = run(args, Path(tmp))
        except KeyboardInterrupt:
            self.log("interrupted; testbed removed")
            return 130
        self.write_json(result)
        print(json.dumps(result, indent=2) if as_json else render(result, data))
        return 0


def bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an int in ``lo..hi``."""

    def check(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} not in {lo}..{hi}")
        return value

    return check


def traffic_options(
    p: argparse.ArgumentParser,
    *,
    seconds: int,
    repeats: str,
    pings: int,
    fewest_pings: int,
    pings_per: str,
    ping_interval: float = 0.01,
) -> None:
    """``--seconds`` (iperf3 -t), ``--repeats`` (3 by default; ``repeats`` says of what),
    ``--pings`` (``pings_per`` says per what) and ``--ping-interval``, as the benches take
    them."""
    p.add_argument(
        "--seconds", type=bounded_int(1, 120), default=seconds, help=f"iperf3 -t ({seconds})"
    )
    p.add_argument("--repeats", type=bounded_int(1, 20), default=3, help=f"{repeats} (3)")
    p.add_argument(
        "--pings",
        type=bounded_int(fewest_pings, 5000),
        default=pings,
        help=f"echo requests {pings_per} ({pings})",
    )
    p.add_argument(
        "--ping-interval",
        type=float,
        default=ping_interval,
        help=f"seconds between echo requests ({ping_interval:g})",
    )


def subset(text: str, known: Sequence[str], option: str = "--setups") -> list[str]:
    """A comma-separated subset of ``known`` (any order) -> the chosen ones in ``known``'s
    order; ``argparse.ArgumentTypeError`` for an unknown name or none."""
    chosen = {s.strip() for s in text.split(",") if s.strip()}
    unknown = chosen - set(known)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"bad {option} {text!r}: want a comma-separated subset of {','.join(known)}"
        )
    return [k for k in known if k in chosen]


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


def tail(path: Path, lines: int = 15, missing: str = "(none)") -> str:
    """The last ``lines`` lines of a log file, or ``missing`` if it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing


# ----------------------------------------------------------------------------------------------
# CPU accounting from /proc


@dataclass(frozen=True)
class ProcTimes:
    start: int  # starttime in ticks since boot: tells a reused pid apart
    own: int  # utime + stime
    children: int  # cutime + cstime (reaped children)


@dataclass(frozen=True)
class _Stat:
    ppid: int
    flags: int
    times: ProcTimes


def _stat(pid: int) -> _Stat | None:
    """The fields of /proc/PID/stat the accounting needs, or None if ``pid`` is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # rest[0] is field 3 (state)
    times = ProcTimes(
        start=int(rest[19]),
        own=int(rest[11]) + int(rest[12]),
        children=int(rest[13]) + int(rest[14]),
    )
    return _Stat(ppid=int(rest[1]), flags=int(rest[6]), times=times)


def proc_times(pid: int) -> ProcTimes | None:
    """utime+stime and cutime+cstime of ``pid`` in clock ticks, or None if it is gone."""
    found = _stat(pid)
    return found.times if found is not None else None


@dataclass(frozen=True)
class ProcStat:
    kthread: bool
    times: ProcTimes


def proc_stat(pid: int) -> ProcStat | None:
    """Whether ``pid`` is a kernel thread, and its times; None if it is gone."""
    found = _stat(pid)
    return None if found is None else ProcStat(bool(found.flags & PF_KTHREAD), found.times)


def _all_stats() -> dict[int, _Stat]:
    stats: dict[int, _Stat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (found := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = found
    return stats


def tree_times(roots: Sequence[int]) -> dict[int, ProcTimes]:
    """Times of every process in the trees under ``roots`` (the roots and all descendants)."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    out: dict[int, ProcTimes] = {}
    todo = [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out[pid] = stats[pid].times
            todo += children.get(pid, [])
    return out


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
        except OSError:
            continue
        found = _stat(pid)
        if found is None or found.flags & PF_KTHREAD:  # kernel threads: see others_cores
            continue
        (ours if inside else others)[pid] = found.times
    t = os.times()
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in cpu)
    return OthersSnapshot(
        others=others,
        ours=ours,
        bench=t.user + t.system + t.children_user + t.children_system,
        busy=user + nice + system + irq + softirq,
    )


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


def pss_kib(pid: int) -> int | None:
    """The proportional set size of ``pid`` in KiB (``/proc/PID/smaps_rollup``: its private
    pages plus its share of pages shared with others), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    found = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else None


def median_measured(values: Sequence[float | None]) -> float | None:
    """The median of the values measured (None: a round that measured nothing), or None."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 100]."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def warm_up(ns: Namespace, target: str) -> None:
    """Three slow pings, so that the measured ones find every cache and link warm."""
    ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", target], check=False, timeout=20)


def ping_times(ns: Namespace, target: str, count: int, interval: float = 0.01) -> list[float]:
    """The RTTs in ms of ``count`` echo requests ``interval`` seconds apart (lost ones have
    none); RuntimeError if none is answered."""
    res = ns.run(
        ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "1", target],
        check=False,
        timeout=count * (interval + 0.04) + 30,
    )
    times = [float(m) for m in re.findall(r"time=([\d.]+) ms", res.stdout)]
    if not times:
        raise RuntimeError(f"ping {target}: no replies (rc {res.returncode}): {res.stdout[-300:]}")
    return times


@dataclass
class TcpRun:
    direction: str  # "a->b" or "b->a"
    mbit_s: float  # receiver side
    bytes: int  # receiver side
    retransmits: int | None  # sender side, if iperf3 reports it
    cpu_s: float | None = None  # node CPU during the run (autovn only)
    others_cores: float | None = None  # CPU of processes outside the testbed, in cores


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


def _iperf_once(
    ns: Namespace, target: str, seconds: int, reverse: bool, streams: int = 1
) -> dict[str, Any]:
    argv = ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    argv += ["--connect-timeout", "5000", *(["-R"] if reverse else [])]
    argv += ["-P", str(streams)] if streams > 1 else []
    res = ns.run(argv, check=False, timeout=seconds + 40)
    try:
        report: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        report = {"error": f"no JSON (rc {res.returncode}): {res.stderr.strip()[-300:]}"}
    if res.returncode != 0 and "error" not in report:
        report["error"] = f"rc {res.returncode}"
    return report


def run_iperf(
    ns: Namespace, target: str, seconds: int, reverse: bool, log: Log, streams: int = 1
) -> TcpRun:
    """One iperf3 TCP run from ``ns`` with ``streams`` parallel streams (``-P``; the sums
    are reported), retried once after an error (e.g. "server is busy")."""
    report = _iperf_once(ns, target, seconds, reverse, streams)
    if "error" in report:
        log(f"iperf3 to {target} failed ({report['error']}); retrying once")
        time.sleep(2)
        report = _iperf_once(ns, target, seconds, reverse, streams)
        if "error" in report:
            raise RuntimeError(f"iperf3 to {target}: {report['error']}")
    end = report["end"]
    return TcpRun(
        direction="b->a" if reverse else "a->b",
        mbit_s=end["sum_received"]["bits_per_second"] / 1e6,
        bytes=int(end["sum_received"]["bytes"]),
        retransmits=end.get("sum_sent", {}).get("retransmits"),
    )


_FIRST_REPLY = r"""
import os, select, socket, struct, sys, time
target, timeout, interval = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
def echo(seq):
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"autovn-connect"
    total = sum(struct.unpack(f"!{len(head) // 2}H", head))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return head[:2] + struct.pack("!H", ~total & 0xFFFF) + head[4:]
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + timeout
seq = 0
while time.monotonic() < deadline:
    seq = (seq + 1) & 0xFFFF
    try:
        sock.sendto(echo(seq), (target, 0))
    except OSError:
        pass
    until = time.monotonic() + interval
    while (left := until - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, (source, _) = sock.recvfrom(4096)
        at = (data[0] & 15) * 4
        mine = struct.unpack_from("!H", data, at + 4)[0] == ident
        if source == target and data[at] == 0 and mine:
            print(f"reply {time.monotonic():.6f} {seq}", flush=True)
            sys.exit(0)
print("timeout", flush=True)
sys.exit(1)
"""


def first_reply(
    ns: Namespace,
    target: str,
    start: Callable[[], object],
    *,
    timeout: float = 30.0,
    interval: float = 0.005,
) -> float:
    """Seconds from calling ``start`` (which starts a VPN) to the first echo reply from
    ``target``, sent from ``ns`` every ``interval`` seconds from the moment ``start`` is called.

    A small pinger runs in ``ns`` (a raw ICMP socket; send errors, while there is no route
    yet, are ignored); it is ready before ``start`` is called, so its own start-up is not
    counted, and it times the reply with the machine's monotonic clock, which every
    namespace shares. RuntimeError if no reply comes within ``timeout``."""
    proc = ns.popen(
        [sys.executable, "-c", _FIRST_REPLY, target, str(timeout), str(interval)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"pinger in {ns.name} did not start")
        t0 = time.monotonic()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        start()
        line = proc.stdout.readline().decode().split()
        if not line or line[0] != "reply":
            raise RuntimeError(f"no echo reply from {target} within {timeout:g} s")
        return float(line[1]) - t0
    finally:
        ns.testbed.stop(proc)


@contextlib.contextmanager
def random_loss(nss: Sequence[Namespace], probability: float) -> Iterator[None]:
    """Drop each packet arriving on the namespaces' links (every interface but ``lo``) with
    ``probability``, independently: ``iptables -m statistic --mode random`` in the INPUT
    chain inside each namespace (this kernel has no netem). Rules removed on the way out.
    With 0 nothing is done."""
    if probability <= 0:
        yield
        return
    rules: list[tuple[Namespace, list[str]]] = []
    try:
        for ns in nss:
            for ifname in ns.links():
                if ifname == "lo":
                    continue
                rule = ["INPUT", "-i", ifname, "-m", "statistic", "--mode", "random",
                        "--probability", f"{probability:g}", "-j", "DROP"]  # fmt: skip
                ns.run(["iptables", "-w", "5", "-I", *rule], timeout=15)
                rules.append((ns, rule))
        yield
    finally:
        for ns, rule in rules:
            ns.run(["iptables", "-w", "5", "-D", *rule], check=False, timeout=15)


def loadavg() -> list[float]:
    """/proc/loadavg's three averages."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ----------------------------------------------------------------------------------------------
# the nodes' own counters


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


def settled_health(nodes: Sequence[Node], timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """:func:`node_health` of ``nodes`` once their counters have caught up with the traffic.

    Worker counters reach ``status`` with the workers' heartbeats (every
    ``heartbeat_interval_s``, 2 s in the test bed), so right after the last iperf3 run they
    may lack its final second. Read until the overlay bytes sent grow by less than 1 MB
    (keepalives only) between two reads more than a heartbeat apart.
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


def overlay_check(sent: int, received: int, what: str = "iperf3") -> str:
    """Whether the nodes' overlay_io sent at least the bytes the iperf3 receivers got (if
    not, the traffic went around the VPN)."""
    verdict = "ok" if sent >= received else "WARNING: less than iperf3 received, bypassed?"
    return (
        f"overlay bytes sent (both nodes) {sent / 1e9:.2f} GB, "
        f"{what} received {received / 1e9:.2f} GB: {verdict}"
    )
