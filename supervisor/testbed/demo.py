"""``supervisor demo``: a small autovn network on this one machine, shown working.

Builds two underlay segments — bridges in namespaces, 198.18.0.0/24 and 198.18.1.0/24 —
joined by a router namespace, and five nodes on them (n1-n3 on the first, n4-n5 on the
second) that know only the first node's underlay address and have no virtual address in
their configs. A real DHCP client (ISC dhclient) on each node's TAP gets the node's
address, which the node won in the DHT, and writes the namespace's own resolv.conf (the
node's DNS at the virtual gateway, domain vpn.test). Then the first node pings every node
by its DNS names (the host name the node registered for its DHCP client, and the static
name ``C`` + the address's last three octets), runs a short iperf3 to the last node (on
the other segment), prints a table (node, address, names, RTT, throughput, direct or
relayed) and removes everything it made — also on failure and on SIGINT (Ctrl-C), SIGTERM
or SIGHUP: the ``Testbed`` owns every namespace, process and /etc/netns file and removes them
first, then the demo removes its temporary directory (every node's private key is there),
checks that nothing is left and says so in one line. Progress goes to stderr, the table to
stdout; the test bed's own notes stay off the terminal unless something is left behind.
Needs root, iproute2, ping, iperf3 and dhclient (isc-dhcp-client).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from supervisor.status import table
from supervisor.testbed.layouts import routed_nodes
from supervisor.testbed.netns import (
    Testbed,
    leftover_etc_netns,
    leftover_namespaces,
    require_root,
    set_log,
)
from supervisor.testbed.nodes import DOMAIN, Node, wait_for

TOOLS = ("ping", "iperf3", "dhclient", "getent", "unshare")
HEADERS = ["node", "address", "name", "static name", "rtt_ms p50", "tcp Mbit/s", "path"]


def static_name(address: str, domain: str = DOMAIN) -> str:
    """``C`` + the last three octets as three digits each: 100.64.0.7 -> C064000007.<domain>."""
    return "C" + "".join(f"{int(octet):03d}" for octet in address.split(".")[1:]) + f".{domain}"


@dataclass
class Row:
    node: Node
    name: str
    static: str
    rtt_ms: float | None = None
    mbit: float | None = None
    path: str = "-"
    problems: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        return [
            self.node.name,
            self.node.address,
            self.name,
            self.static,
            "-" if self.rtt_ms is None else f"{self.rtt_ms:.3f}",
            "-" if self.mbit is None else f"{self.mbit:.0f}",
            self.path,
        ]


class Progress:
    """Progress lines on ``err``: ``[demo  4.2 s] what happens``."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, msg: str) -> None:
        print(f"[demo {self.elapsed:4.1f} s] {msg}", file=self.err, flush=True)


def _resolve(node: Node, name: str, timeout: float = 10.0) -> str | None:
    """``name``'s IPv4 address as the node's namespace resolves it (through its
    resolv.conf), asked again for up to ``timeout`` (a name just registered may not have
    reached the DHT yet); None if it does not resolve."""
    deadline = time.monotonic() + timeout
    while True:
        res = node.ns.run(["getent", "ahostsv4", name], check=False, timeout=30)
        words = res.stdout.split()
        if res.returncode == 0 and words:
            return words[0]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def _rtt_ms(node: Node, target: str, count: int, interval: float = 0.05) -> float | None:
    res = node.ns.run(
        ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", target],
        check=False,
        timeout=count * (interval + 1) + 15,
    )
    times = [float(t) for t in re.findall(r"time=([\d.]+)", res.stdout)]
    return statistics.median(times) if times else None


def _first_answer(node: Node, target: str, timeout: float = 10.0) -> float | None:
    """Seconds until ``target`` first answers a ping (one at a time, each waiting up to a
    second: the first packets to an address wait while the node resolves it through the
    DHT), or None if it does not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        res = node.ns.run(["ping", "-n", "-c", "1", "-W", "1", target], check=False, timeout=15)
        if res.returncode == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def _iperf_mbit(client: Node, server: Node, target: str, seconds: int) -> float | None:
    proc = server.ns.popen(["iperf3", "-s", "-1", "-B", server.address], stderr=subprocess.DEVNULL)
    try:
        wait_for("iperf3 server", lambda: ":5201" in server.ns.run(["ss", "-ltn"]).stdout, 10)
        res = client.ns.run(
            ["iperf3", "-c", target, "-t", str(seconds), "-J"],
            check=False,
            timeout=seconds + 30,
        )
    finally:
        server.ns.testbed.stop(proc)
    try:
        return float(json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6
    except (ValueError, KeyError, TypeError):
        return None


def _path(status: dict[str, Any] | None, address: str) -> str:
    """ "direct" or "relayed" (a link through the overlay), from the link table's row whose
    routes include ``address``; "?" if there is none."""
    for link in (status or {}).get("link_table", []):
        if address in link.get("routes", []):
            relayed = link.get("kind") == "relayed" or str(link.get("endpoint", "")).startswith(
                "via:"
            )
            return "relayed" if relayed else "direct"
    return "?"


def _sizes(nodes: int) -> tuple[int, int]:
    return nodes - nodes // 2, nodes // 2


def _run(
    tb: Testbed, tmp: Path, *, seconds: int, pings: int, nodes: int, say: Progress
) -> list[Row]:
    sizes = _sizes(nodes)
    say(
        f"building segments 198.18.0.0/24 ({sizes[0]} nodes) and 198.18.1.0/24 ({sizes[1]}) "
        f"in namespaces {tb.run_id}-seg0/-seg1, joined by router {tb.run_id}-rt"
    )
    members = routed_nodes(tb, tmp, sizes, start=False)
    for n in members:
        n.start()
    say(
        f"starting autovn in {members[0].ns.name} ... {members[-1].ns.name}: no virtual "
        "address configured, only the first node's underlay address 198.18.0.1"
    )
    for n in members:
        n.wait_running()
    say("all nodes running; a DHCP client (dhclient) on each node's TAP asks for an address")
    for n in members:
        n.dhcp(wait=False)
    for n in members:
        lease = n.wait_dhcp(timeout=40)
        say(
            f"{n.name}: {lease.cidr}, gateway {','.join(lease.routers)}, "
            f"dns {','.join(lease.dns_servers)}, domain {lease.domain}, mtu {lease.mtu}, "
            f"lease {lease.lease_time} s"
        )
    first, last = members[0], members[-1]
    rows = [Row(n, f"{n.name}.{DOMAIN}", static_name(n.address)) for n in members]
    holders: dict[str, list[str]] = {}
    for n in members:
        holders.setdefault(n.address, []).append(n.name)
    for row in rows:
        n = row.node
        others = [h for h in holders[n.address] if h != n.name]
        if others:
            row.problems.append(f"{n.address} was given to {', '.join(others)} too")
        for name in (row.name, row.static):
            got = _resolve(first, name)
            if got != n.address:
                row.problems.append(f"{name} resolved to {got}, not {n.address}")
        reached = None if row.problems else _first_answer(first, row.static)
        if reached is None and not row.problems:
            row.problems.append(f"no answer to ping {row.static} within 10 s")
        if not row.problems:
            row.rtt_ms = _rtt_ms(first, n.name, pings)  # the short name: resolv.conf's search
            if row.rtt_ms is None:
                row.problems.append(f"no answer to ping {n.name}")
        if row.problems:
            outcome = "; ".join(row.problems)
        else:
            outcome = f"first answer after {reached:.1f} s, rtt {row.rtt_ms:.3f} ms"
        say(f"{first.name} resolves {row.name} and {row.static} to {n.address}: {outcome}")
    if seconds > 0 and last is not first:
        say(f"iperf3 from {first.name} to {last.name} (the other segment) for {seconds} s")
        rows[-1].mbit = _iperf_mbit(first, last, last.name, seconds)
        if rows[-1].mbit is None:
            rows[-1].problems.append("iperf3 failed")
    st = first.status()
    for row in rows:
        row.path = "self" if row.node is first else _path(st, row.node.address)
    say("stopping the nodes and DHCP clients, removing namespaces and files")
    return rows


def run_demo(
    *,
    seconds: int = 3,
    pings: int = 20,
    nodes: int = 5,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    bad = [
        f"--{name} must be {want}, got {value}"
        for name, value, ok, want in (
            ("nodes", nodes, 2 <= nodes <= 20, "between 2 and 20"),
            ("pings", pings, pings >= 1, "at least 1"),
            ("seconds", seconds, seconds >= 0, "at least 0"),
        )
        if not ok
    ]
    if bad:
        print("\n".join(f"demo: {b}" for b in bad), file=err)
        return 2
    problem = require_root()
    missing = [t for t in TOOLS if shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if problem or missing:
        print(
            "demo needs root, iproute2, ping, iperf3 and dhclient (isc-dhcp-client): "
            f"{problem or ', '.join(missing)}",
            file=err,
        )
        return 2
    say = Progress(err)
    notes: list[str] = []
    previous_log = set_log(notes.append)  # the test bed's own lines stay off the terminal
    run_id = ""
    tmp: Path | None = None
    try:
        with _interruptible():
            try:
                with _signals_blocked():  # made and remembered, or not made
                    tmp = Path(tempfile.mkdtemp(prefix="autovn-demo-"))
                say(f"keys, configs and logs in {tmp} (removed at the end)")
                with Testbed("avdemo") as tb:
                    run_id = tb.run_id
                    try:
                        rows = _run(tb, tmp, seconds=seconds, pings=pings, nodes=nodes, say=say)
                    except Exception:
                        _tails(tmp, say)
                        raise
            finally:
                with _signals_blocked():
                    if tmp is not None:
                        shutil.rmtree(tmp, ignore_errors=True)
    except Interrupted as exc:
        say(f"interrupted ({signal.Signals(exc.signum).name}): {_removed(run_id, tmp, notes)}")
        return 128 + exc.signum
    except Exception as exc:
        say(f"FAILED: {exc}")
        say(_removed(run_id, tmp, notes))
        return 1
    finally:
        set_log(previous_log)
    left = _removed(run_id, tmp, notes)
    print("\n".join(table(HEADERS, [r.cells() for r in rows])), file=out)
    problems = [f"{r.node.name}: {p}" for r in rows for p in r.problems]
    for p in problems:
        print(p, file=out)
    verdict = f"all {len(rows)} nodes reached by name" if not problems else "SOME NODES FAILED"
    print(f"\n{verdict}; {left} ({say.elapsed:.1f} s)", file=out)
    return 0 if not problems and left == REMOVED else 1


REMOVED = "everything removed"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP ended the demo (after the test bed's own cleanup). A
    BaseException, as KeyboardInterrupt is: no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn the first SIGINT, SIGTERM or SIGHUP into ``Interrupted``, later ones into nothing,
    so that the demo's own cleanup (its temporary directory, with every node's private key)
    runs however it is stopped. The test bed installs its handlers over these while it is
    open: it removes its namespaces first, then hands the signal on to them. A signal that
    this process inherited as ignored (SIGHUP under nohup) stays ignored."""
    raised = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Interrupted(signum)

    previous = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        with _signals_blocked():
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while a cleanup step runs, so that none is cut
    in half; held signals are delivered afterwards."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _removed(run_id: str, tmp: Path | None, notes: list[str]) -> str:
    """ "everything removed", checked: no namespace or /etc/netns entry of the run and no
    temporary directory left; else what is left, with the test bed's notes."""
    left: list[str] = []
    if run_id:
        left += leftover_namespaces(run_id) + leftover_etc_netns(run_id)
    if tmp is not None and tmp.exists():
        left.append(str(tmp))
    if not left:
        return REMOVED
    return f"NOT everything removed: {', '.join(left)}" + "".join(f"; {n}" for n in notes)


def _tails(tmp: Path, say: Progress, lines: int = 5) -> None:
    """The last lines of each node's output, before the directory goes (for a failure)."""
    for path in sorted(tmp.glob("*/supervisor.out")):
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        for line in tail:
            say(f"{path.parent.name}: {line}")
