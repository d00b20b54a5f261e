"""Churn on a live overlay: kill -9 of some nodes, and how long the survivors take to heal.

``churn_round`` (used by ``tests/test_churn_live.py`` and ``bench/churn_bench.py``) runs on
``overlay_nodes`` (one bridged segment, every node knowing only the first one's address):

1. a *talking pair* ``a``, ``b`` that cannot link directly (their underlay traffic to each
   other is dropped by iptables in their namespaces, as in ``tests/test_overlay_live.py``),
   so its packets are relayed through the overlay;
2. once the overlay has settled, every pair of nodes pings once (routes and links are
   made, as on a network in use) and ``a`` pings ``b`` every 10 ms;
3. the *victims* are killed with SIGKILL, every process of each at once: the first node
   (which every node bootstrapped from), the relay ``a``'s packets for ``b`` go to first
   and the one ``b``'s for ``a`` go to (overlay_io's choice: the direct link closest to the
   destination), and more to make up ``victims``;
4. from the kill on, every pair of survivors pings every ``PAIR_INTERVAL_S`` (one ping
   process a pair, in the first node's namespace of the pair) for ``watch_s``.

What it gives (``Heal``): for every survivor pair the time from the kill to the end of its
last outage (the time of its last lost echo request, plus one interval; 0 if it lost none),
their maximum (``all_pairs_s``: from then on every survivor pair pings), the talking pair's
largest gap between two echo replies around the kill (``talking_gap_s``), and each pair's
path afterwards (``direct`` or ``relayed``, from ``status``).

Times come from ``ping -D`` (the machine's realtime clock, which every namespace shares) and
``time.time()`` at the kill.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.testbed.layouts import overlay_nodes, overlay_settled
from supervisor.testbed.netns import Testbed
from supervisor.testbed.nodes import Node, wait_for

PAIR_INTERVAL_S = 0.2
TALK_INTERVAL_S = 0.01
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", re.M)


@dataclass
class Heal:
    """One churn round's figures (seconds from the kill)."""

    nodes: int
    victims: list[str]
    pairs: dict[str, float] = field(default_factory=dict)  # "n2-n5" -> end of its last outage
    all_pairs_s: float = 0.0  # when every survivor pair pings from then on
    talking_gap_s: float = 0.0  # the talking pair's largest gap between two replies
    talking_pair: str = ""
    paths: dict[str, str] = field(default_factory=dict)  # "n2-n5" -> direct / relayed / none
    settle_s: float = 0.0  # from the start to the overlay settled
    estimated_sizes: list[int] = field(default_factory=list)  # each node's, before the kill


def blocked_pair(nodes: list[Node]) -> tuple[Node, Node]:
    """Two nodes opposite on the circle, neither the first node."""
    n = len(nodes)
    circle = sorted(nodes, key=lambda x: x.extra["node_id"])
    return next(
        (x, circle[(i + n // 2) % n])
        for i, x in enumerate(circle)
        if nodes[0] not in (x, circle[(i + n // 2) % n])
    )


def block(a: Node, b: Node) -> None:
    for me, other in ((a, b), (b, a)):
        me.ns.run(["iptables", "-A", "INPUT", "-s", other.underlay, "-j", "DROP"])
        me.ns.run(["iptables", "-A", "OUTPUT", "-d", other.underlay, "-j", "DROP"])


def start_overlay(
    tb: Testbed, tmp: Path, count: int, source_tree: Path | None = None
) -> tuple[list[Node], tuple[Node, Node]]:
    """``count`` overlay nodes with a blocked (relayed) pair, started and running."""
    nodes = overlay_nodes(tb, tmp, count, start=False, source_tree=source_tree)
    pair = blocked_pair(nodes)
    block(*pair)
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_running()
    return nodes, pair


@dataclass
class _Pinger:
    proc: subprocess.Popen[bytes]
    output: Path


def _ping(src: Node, dst: Node, interval: float, seconds: float, out: Path) -> _Pinger:
    """``ping -D`` from ``src`` to ``dst`` every ``interval`` for ``seconds``, its output in
    ``out`` (kept for a look afterwards)."""
    argv = ["ping", "-n", "-D", "-i", f"{interval:g}", "-W", "1", "-w", f"{seconds:g}"]
    with open(out, "wb") as sink:
        return _Pinger(src.ns.popen([*argv, dst.address], stdout=sink), out)


def _replies(pinger: _Pinger, timeout: float) -> list[tuple[float, int]]:
    """(time, icmp_seq) of each echo reply, once the ping has ended."""
    pinger.proc.wait(timeout=timeout)
    text = pinger.output.read_text(errors="replace")
    return [(float(t), int(seq)) for t, seq in _REPLY.findall(text)]


def _kill(node: Node) -> None:
    """SIGKILL to the supervisor and every worker at once (a crashed machine)."""
    for pid, _ in node.processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if node.proc is not None:
        node.proc.wait(timeout=20)
        node.proc = None


def _path(st: dict[str, Any] | None, other: Node) -> str:
    if not st:
        return "none"
    rows = [r for r in st["link_table"] if other.address in r["routes"]]
    if not rows:
        return "none"
    return "relayed" if rows[0]["endpoint"].startswith("via:") else "direct"


def _relay_hop(src: Node, dst: Node) -> str | None:
    """The node (hex id) ``src`` relays its packets for ``dst`` through, as overlay_io picks
    it: of its direct links that are up, the one whose node id is closest to ``dst``'s on
    the circle, if closer than ``src`` itself."""
    st = wait_for(f"{src.name} status", src.status, 30)
    size = 1 << 160
    target = int(dst.extra["node_id"], 16)

    def distance(node_id: str) -> int:
        d = (int(node_id, 16) - target) % size
        return min(d, size - d)

    best, best_d = None, distance(src.extra["node_id"])
    for row in st["link_table"]:
        nid = row.get("node_id")
        if nid and row["up"] and not row["endpoint"].startswith("via:") and distance(nid) < best_d:
            best, best_d = nid, distance(nid)
    return best


def churn_round(
    tb: Testbed,
    tmp: Path,
    *,
    count: int = 10,
    victims: int = 3,
    watch_s: float = 14.0,
    settle_timeout_s: float = 60.0,
    log: Any = print,
    source_tree: Path | None = None,
) -> Heal:
    """One round (the module says what it does and gives); ``source_tree``: the code the
    nodes run (another checkout, for a baseline)."""
    start = time.monotonic()
    nodes, (a, b) = start_overlay(tb, tmp, count, source_tree)
    pair_ids = frozenset({a.extra["node_id"], b.extra["node_id"]})
    sts = wait_for(
        "the overlay to settle",
        lambda: overlay_settled(nodes, pair_ids),
        settle_timeout_s,
        every=0.5,
    )
    settle_s = time.monotonic() - start
    sizes = [int(st["overlay"]["estimated_size"]) for st in sts]
    log(f"settled in {settle_s:.1f} s; estimated sizes {sizes}")
    # a network in use: every pair has pinged once (routes and links made)
    pings_dir = tmp / "pings"
    pings_dir.mkdir(exist_ok=True)
    warm = [
        _ping(x, y, 0.2, 3, pings_dir / f"warm-{x.name}-{y.name}.txt")
        for x, y in itertools.combinations(nodes, 2)
    ]
    for pinger in warm:
        pinger.proc.wait(timeout=30)
    wait_for("the talking pair to ping", lambda: a.ping(b.address, 2, interval=0.2), 20)
    by_id = {n.extra["node_id"]: n for n in nodes}
    chosen = [nodes[0]]
    for hop in (_relay_hop(a, b), _relay_hop(b, a)):
        node = by_id.get(hop or "")
        if node is not None and node not in (a, b) and node not in chosen:
            chosen.append(node)
    for n in nodes[1:]:
        if len(chosen) >= victims:
            break
        if n not in (a, b) and n not in chosen:
            chosen.append(n)
    chosen = chosen[:victims]
    survivors = [n for n in nodes if n not in chosen]
    log(f"talking {a.name}-{b.name}; victims {[v.name for v in chosen]}")
    talk = _ping(a, b, TALK_INTERVAL_S, 3 + watch_s + 2, pings_dir / "talking.txt")
    time.sleep(3)
    processes = {v.name: v.processes() for v in chosen}
    killed_at = time.time()
    for v in chosen:
        for pid, _ in processes[v.name]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    pings = {
        f"{x.name}-{y.name}": _ping(
            x, y, PAIR_INTERVAL_S, watch_s, pings_dir / f"pair-{x.name}-{y.name}.txt"
        )
        for x, y in itertools.combinations(survivors, 2)
    }
    for v in chosen:
        if v.proc is not None:
            v.proc.wait(timeout=20)
            v.proc = None
    heal = Heal(count, [v.name for v in chosen], settle_s=settle_s, estimated_sizes=sizes)
    heal.talking_pair = f"{a.name}-{b.name}"
    sent = int((watch_s - 1.0) / PAIR_INTERVAL_S)  # the last second's may be cut short
    for key, pinger in pings.items():
        got = {seq for _, seq in _replies(pinger, watch_s + 20)}
        lost = [seq for seq in range(1, sent + 1) if seq not in got]
        heal.pairs[key] = round(max(lost) * PAIR_INTERVAL_S, 2) if lost else 0.0
    heal.all_pairs_s = max(heal.pairs.values(), default=0.0)
    replies = [t for t, _ in _replies(talk, watch_s + 30)]
    around = [killed_at - 2.0, *[t for t in replies if t >= killed_at - 2.0]]
    gaps = [y - x for x, y in itertools.pairwise(around)]
    heal.talking_gap_s = round(max(gaps, default=watch_s), 3)
    if not replies or replies[-1] < killed_at + 3:
        heal.talking_gap_s = round(max(heal.talking_gap_s, watch_s), 3)  # never came back
    statuses = {n.name: wait_for(f"{n.name} status", n.status, 30) for n in survivors}
    for x, y in itertools.combinations(survivors, 2):
        heal.paths[f"{x.name}-{y.name}"] = _path(statuses[x.name], y)
    log(
        f"all survivor pairs ping {heal.all_pairs_s:.2f} s after the kill; talking pair's "
        f"largest gap {heal.talking_gap_s:.3f} s"
    )
    return heal
