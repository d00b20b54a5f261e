"""``bench/peers``: autovn against the VPNs from Debian's packages, in one run, on one machine.

Two namespaces joined by a veth pair (``supervisor.testbed.veth_pair``: underlay
198.18.0.1/.2); in them, one after the other:

1. **raw veth** (before): the bare link between the underlay addresses;
2. **autovn**: two nodes, encrypted (Noise IK between static peers, the default data cipher
   AES-256-GCM), at the default stage settings (``--scale`` changes them), virtual 100.64.0.1/.2;
3. **tinc**, **openvpn**, **wireguard-go**, **nebula** (``bench/peers/debian.py``);
4. **raw veth** (after): the link again, to see whether the machine changed under the run.

For each VPN: ``--starts`` cold starts, each timed from the start of the two daemons (autovn:
the two ``supervisor start``) to the first echo reply across the tunnel (a pinger sends every
5 ms from the moment of the start: ``harness.first_reply``); after the first start, idle CPU
over 10 s (after 5 s of quiet), ``--pings`` pings ``--ping-interval`` apart (p50, p99),
iperf3 TCP single stream ``--repeats`` times each way with the CPU of every process of the
VPN at both ends (CPU-s per GB, per direction), then the goodput a->b under each ``--loss``
(random loss on every underlay interface of both namespaces, ``harness.random_loss``:
iptables ``statistic``), ``--repeats`` runs each. The raw veth gets the pings, the iperf3
runs and the losses.

It prints one row per system (medians) with /proc/loadavg at the start and end of each, then
autovn against the best peer of the run for each figure (the best: the highest throughput and
goodput, the lowest RTT, CPU, idle CPU and time to connect), then issue 12's targets, each
with what was measured and whether it is met. The JSON goes to
``bench/results/peers-<timestamp>.json``.

Run as root from the repository root::

    python3 bench/peers [--setups raw,autovn,tinc,openvpn,wireguard-go,nebula]
                        [--seconds 8] [--repeats 3] [--pings 200] [--ping-interval 0.005]
                        [--starts 3] [--loss 0.001,0.01] [--scale overlay_io=2] [--json-only]

A peer whose binary is missing is left out with a note (``apt-get install -y tinc openvpn
wireguard-go nebula``); one that fails is dropped with its error, and the run goes on.
Everything lives in a ``Testbed``: removed on exit, on failure and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from bench import harness  # noqa: E402
from bench import pipeline_bench as pb  # noqa: E402
from bench.peers.debian import PEERS, PeerDaemon  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("bench/peers", "peers", "peers")
log = BENCH.log
RAW = ("raw", "raw-after")
SYSTEMS = {"raw": "raw veth", "autovn": "autovn"} | {k: p.title for k, p in PEERS.items()}
DEFAULT = ("raw", "autovn", "tinc", "openvpn", "wireguard-go", "nebula")
DIRECTIONS = ("a->b", "b->a")
SETTLE_S = 5.0


@dataclass
class System:
    """What one column of the run measured (``setup``: as ``pipeline_bench`` measures it)."""

    setup: pb.SetupResult
    connect_s: list[float] = field(default_factory=list)  # start -> first echo reply
    loss: dict[str, list[harness.TcpRun]] = field(default_factory=dict)  # "0.01" -> a->b runs
    loadavg: dict[str, list[float]] = field(default_factory=dict)  # "start", "end"

    def goodput(self, probability: float) -> float | None:
        runs = self.loss.get(f"{probability:g}")
        return statistics.median(r.mbit_s for r in runs) if runs else None

    def connect(self) -> float | None:
        return statistics.median(self.connect_s) if self.connect_s else None


# ----------------------------------------------------------------------------------------------
# measuring


def loss_runs(
    system: System, a: pb.Vpn, nss: Sequence[testbed.Namespace], args: argparse.Namespace
) -> None:
    """Goodput a->b under each random loss, ``repeats`` iperf3 runs each."""
    s = system.setup
    for probability in args.loss:
        runs = system.loss.setdefault(f"{probability:g}", [])
        with harness.random_loss(nss, probability):
            for i in range(args.repeats):
                run = harness.run_iperf(a.ns, s.target, args.seconds, False, log)
                runs.append(run)
                log(
                    f"{s.name}: loss {probability:.1%} run {i + 1}/{args.repeats}: "
                    f"{run.mbit_s:.0f} Mbit/s, retransmits {run.retransmits}"
                )


def idle(s: pb.SetupResult, vpns: Sequence[pb.Vpn]) -> None:
    """Idle CPU over ``IDLE_SECONDS`` of no traffic, after ``SETTLE_S`` of quiet: what a VPN
    does right after it connected (autovn: joining the overlay, registering its address in
    the DHT) is not what it costs at rest."""
    time.sleep(SETTLE_S)
    log(f"{s.name}: idle CPU over {pb.IDLE_SECONDS:.0f} s")
    s.idle_cpu_percent = pb.idle_cpu_percent(list(vpns), pb.IDLE_SECONDS)


def timed_starts(
    system: System,
    ns: testbed.Namespace,
    start: Callable[[], object],
    ready: Callable[[], object],
    stop: Callable[[], object],
    measure: Callable[[], object],
    starts: int,
) -> None:
    """``starts`` cold starts, each timed to the first echo reply; ``measure`` after the first.
    ``start`` starts the VPN (and does what it needs to carry packets, nothing more: no
    polling that would take the CPU from it); ``ready`` then waits until it is all up;
    ``stop`` leaves the namespaces clean."""
    s = system.setup
    for i in range(starts):
        seconds = harness.first_reply(ns, s.target, start)
        system.connect_s.append(seconds)
        log(f"{s.name}: start {i + 1}/{starts}: first echo reply after {seconds:.3f} s")
        try:
            ready()
            if i == 0:
                measure()
        finally:
            log(f"{s.name}: stopping")
            stop()


def run_autovn(
    system: System,
    nodes: list[testbed.Node],
    nss: Sequence[testbed.Namespace],
    args: argparse.Namespace,
    netns: frozenset[int],
) -> None:
    s = system.setup

    def start() -> None:
        for n in nodes:
            n.start()

    def ready() -> None:
        for n in nodes:
            n.wait_running()
            n.wait_peers_up()

    def measure() -> None:
        pb.check_security(nodes, True)
        idle(s, nodes)
        pb.measure(s, nodes[0], args, nodes, netns)
        loss_runs(system, nodes[0], nss, args)
        s.health = harness.settled_health(nodes)
        s.overlay_check = pb.check_overlay_carried(s)

    stop = lambda: testbed.stop_all(nodes)  # noqa: E731
    timed_starts(system, nodes[0].ns, start, ready, stop, measure, args.starts)


def run_peer(
    system: System,
    tb: testbed.Testbed,
    nss: Sequence[testbed.Namespace],
    root: Path,
    args: argparse.Namespace,
    netns: frozenset[int],
) -> None:
    s = system.setup
    peer = PEERS[s.key]
    daemons: list[PeerDaemon] = peer.prepare(peer, nss[0], nss[1], root)

    def measure() -> None:
        idle(s, daemons)
        pb.measure(s, daemons[0], args, list(daemons), netns)
        loss_runs(system, daemons[0], nss, args)
        for d in daemons:
            d.pids()  # still running after the traffic, or RuntimeError with its output

    try:
        timed_starts(
            system,
            nss[0],
            lambda: peer.start(tb, daemons),
            lambda: None,  # start() waited for both ways already
            lambda: peer.stop(tb, daemons),
            measure,
            args.starts,
        )
    except Exception:
        for d in daemons:
            log(f"{s.name} {d.name} {peer.binary} output (tail):\n{d.tail()}")
        with contextlib.suppress(Exception):  # the error that matters is the one above
            peer.stop(tb, daemons)
        raise


def run_raw(
    system: System,
    a: pb.Vpn,
    nss: Sequence[testbed.Namespace],
    args: argparse.Namespace,
    netns: frozenset[int],
) -> None:
    pb.measure(system.setup, a, args, None, netns)
    loss_runs(system, a, nss, args)


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, System]]:
    result = BENCH.new_result(
        args, "setups", "seconds", "repeats", "pings", "ping_interval", "starts", "loss"
    )
    result["stages"] = args.scale
    systems: dict[str, System] = {}
    skipped: dict[str, str] = {}
    order = [*args.setups, *(["raw-after"] if "raw" in args.setups else [])]
    for key in order:
        if key in PEERS and (why := PEERS[key].missing()) is not None:
            skipped[key] = why
            log(f"{key}: skipped: {why}")
            continue
        if key in PEERS:
            ends: tuple[str, str] = PEERS[key].virtual
            ran = PEERS[key].describe
        elif key in RAW:
            ends = testbed.UNDERLAY
            ran = pb.AUTOVN_RAN["raw"] + (" (again, after the VPNs)" if key != "raw" else "")
        else:
            ends = testbed.VIRTUAL
            ran = pb.AUTOVN_RAN["enc"] + f"; stages {pb.scale_text(args.scale)}"
        name = "raw veth after" if key == "raw-after" else SYSTEMS[key]
        systems[key] = System(pb.SetupResult(key, name, *ends, ran=ran))
    t0 = time.monotonic()
    with testbed.Testbed("avp") as tb:
        nss = testbed.veth_pair(tb)
        netns = frozenset(harness.netns_inode(ns) for ns in nss)
        nodes = list(
            testbed.node_pair(nss[0], nss[1], tmp / "autovn", secure=True, stages=args.scale)
        )
        server = pb.IperfServer(tb, nss[1])
        for i, (key, system) in enumerate(list(systems.items())):
            if i:
                server.fresh()
            system.loadavg["start"] = harness.loadavg()
            log(f"{system.setup.name}: load average {system.loadavg['start']}")
            try:
                if key in RAW:
                    run_raw(system, nodes[0], nss, args, netns)
                elif key == "autovn":
                    run_autovn(system, nodes, nss, args, netns)
                else:
                    run_peer(system, tb, nss, tmp / key, args, netns)
            except Exception as exc:
                if key not in PEERS:
                    for n in nodes:
                        log(f"{n.name} supervisor output (tail):\n{harness.tail(n.output_file)}")
                    raise
                skipped[key] = f"failed: {exc}"
                log(f"{system.setup.name}: failed, left out: {exc!r}")
                del systems[key]
                continue
            system.loadavg["end"] = harness.loadavg()
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["skipped"] = skipped
    result["systems"] = {k: asdict(s) | {"summary": summary(s, args)} for k, s in systems.items()}
    result["best_peer"] = best_of(systems, args)
    result["targets"] = [t._asdict() for t in targets(systems, args)]
    return result, systems


# ----------------------------------------------------------------------------------------------
# figures, best peers, targets


def summary(system: System, args: argparse.Namespace) -> dict[str, float | None]:
    """The figures of one system, by name (the table's columns)."""
    s = system.setup
    out: dict[str, float | None] = {
        "tcp_a_to_b_mbit_s": s.median_mbit("a->b") if s.tcp else None,
        "tcp_b_to_a_mbit_s": s.median_mbit("b->a") if s.tcp else None,
        "ping_p50_ms": s.ping.p50_ms if s.ping else None,
        "ping_p99_ms": s.ping.p99_ms if s.ping else None,
        "cpu_s_per_gb_a_to_b": s.cpu_s_per_gb("a->b"),
        "cpu_s_per_gb_b_to_a": s.cpu_s_per_gb("b->a"),
        "idle_cpu_percent": s.idle_cpu_percent.get(pb.NAMES[0]),
        "connect_s": system.connect(),
    }
    for p in args.loss:
        out[f"goodput_loss_{p:g}_mbit_s"] = system.goodput(p)
    return out


HIGHER_IS_BETTER = ("tcp_a_to_b_mbit_s", "tcp_b_to_a_mbit_s", "goodput_loss_")


def better(metric: str) -> Callable[[Sequence[float]], float]:
    return max if metric.startswith(HIGHER_IS_BETTER) else min


def best_of(systems: dict[str, System], args: argparse.Namespace) -> dict[str, Any]:
    """Per figure, the best peer of the run and its value."""
    peers = {k: summary(s, args) for k, s in systems.items() if k in PEERS}
    best: dict[str, Any] = {}
    if not peers:
        return best
    for metric in next(iter(peers.values())):
        values = {k: m for k, v in peers.items() if (m := v[metric]) is not None}
        if values:
            value = better(metric)(list(values.values()))
            who = next(k for k, v in values.items() if v == value)
            best[metric] = {"peer": who, "value": value}
    return best


class Target:
    """One of issue 12's targets, as measured."""

    def __init__(self, what: str, measured: str, met: bool | None) -> None:
        self.what, self.measured, self.met = what, measured, met

    def _asdict(self) -> dict[str, Any]:
        return {"what": self.what, "measured": self.measured, "met": self.met}


def targets(systems: dict[str, System], args: argparse.Namespace) -> list[Target]:
    if "autovn" not in systems:
        return []
    me = summary(systems["autovn"], args)
    best = {k: v["value"] for k, v in best_of(systems, args).items()}
    raw = summary(systems["raw"], args) if "raw" in systems else {}
    out: list[Target] = []

    def check(what: str, value: float | None, bound: float | None, higher: bool) -> None:
        if value is None or bound is None:
            out.append(Target(what, "not measured", None))
            return
        met = value >= bound if higher else value <= bound
        out.append(Target(what, f"{value:.3g} vs {bound:.3g}", met))

    for d, metric in zip(DIRECTIONS, ("tcp_a_to_b_mbit_s", "tcp_b_to_a_mbit_s"), strict=True):
        b = best.get(metric)
        check(f"TCP {d} >= 4x best peer (Mbit/s)", me[metric], b and 4 * b, True)
        check(f"TCP {d} >= 2500 Mbit/s", me[metric], 2500.0, True)
        r = raw.get(metric)
        check(f"TCP {d} >= 25 % of raw veth (Mbit/s)", me[metric], r and 0.25 * r, True)
    for d, metric in zip(DIRECTIONS, ("cpu_s_per_gb_a_to_b", "cpu_s_per_gb_b_to_a"), strict=True):
        b = best.get(metric)
        check(f"CPU-s/GB {d} <= 1/3 of best peer", me[metric], b and b / 3, False)
    b50, b99 = best.get("ping_p50_ms"), best.get("ping_p99_ms")
    check("RTT p50 <= 1.5x best peer (ms)", me["ping_p50_ms"], b50 and 1.5 * b50, False)
    check("RTT p99 <= 2x best peer (ms)", me["ping_p99_ms"], b99 and 2 * b99, False)
    check("idle <= 0.5 % of a core", me["idle_cpu_percent"], 0.5, False)
    check("start -> first ping <= 0.5 s (median)", me["connect_s"], 0.5, False)
    if 0.01 in args.loss:
        metric = "goodput_loss_0.01_mbit_s"
        check("goodput at 1 % loss >= best peer (Mbit/s)", me[metric], best.get(metric), True)
    return out


# ----------------------------------------------------------------------------------------------
# output


def render(result: dict[str, Any], systems: dict[str, System]) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        f"bench/peers  {result['timestamp']}  ({result['elapsed_s']:.0f} s)",
        f"machine: nproc {m['nproc']}, kernel {m['kernel']}, python {m['python']}",
        f"iperf3 TCP 1 stream, {a['seconds']} s x {a['repeats']} each way (medians); "
        f"{a['pings']} pings {a['ping_interval'] * 1000:g} ms apart; {a['starts']} cold starts; "
        f"goodput a->b under random loss {', '.join(f'{p:.1%}' for p in a['loss'])} "
        f"(x {a['repeats']}); autovn stages {pb.scale_text(result['stages'])}",
        "",
    ]
    for key, why in result["skipped"].items():
        lines.append(f"NOTE: {SYSTEMS.get(key, key)} left out: {why}")
    losses = [f"{p:.1%} loss" for p in a["loss"]]
    head = ["system", "TCP a>b", "TCP b>a", "RTT p50/p99 ms", "CPU-s/GB a>b/b>a", "idle %",
            "connect s", *losses, "load 1m start/end", "others"]  # fmt: skip
    rows = [head]
    sums: dict[str, dict[str, float | None]] = {}
    for key, system in systems.items():
        sm = sums[key] = summary(system, argparse.Namespace(loss=a["loss"]))
        cs = system.connect_s
        connect = f"{harness.fmt(sm['connect_s'], 3)} [{min(cs):.2f}-{max(cs):.2f}]" if cs else "-"
        load = system.loadavg
        rows.append(
            [
                system.setup.name,
                harness.fmt(sm["tcp_a_to_b_mbit_s"], 0),
                harness.fmt(sm["tcp_b_to_a_mbit_s"], 0),
                f"{harness.fmt(sm['ping_p50_ms'], 3)} / {harness.fmt(sm['ping_p99_ms'], 3)}",
                f"{harness.fmt(sm['cpu_s_per_gb_a_to_b'], 1)} / "
                f"{harness.fmt(sm['cpu_s_per_gb_b_to_a'], 1)}",
                harness.fmt(sm["idle_cpu_percent"], 2),
                connect,
                *(harness.fmt(sm[f"goodput_loss_{p:g}_mbit_s"], 0) for p in a["loss"]),
                f"{load.get('start', [0])[0]:.1f}/{load.get('end', [0])[0]:.1f}",
                harness.fmt(system.setup.others_cores(), 2),
            ]
        )
    best = result["best_peer"]
    if "autovn" in sums and best:
        me = sums["autovn"]

        def r(metric: str) -> str:
            b = best.get(metric)
            return harness.ratio(me[metric], b["value"] if b else None)

        rows.append(
            [
                "autovn / best peer",
                r("tcp_a_to_b_mbit_s"),
                r("tcp_b_to_a_mbit_s"),
                f"{r('ping_p50_ms')} / {r('ping_p99_ms')}",
                f"{r('cpu_s_per_gb_a_to_b')} / {r('cpu_s_per_gb_b_to_a')}",
                r("idle_cpu_percent"),
                r("connect_s"),
                *(r(f"goodput_loss_{p:g}_mbit_s") for p in a["loss"]),
                "",
                "",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for n, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))))  # fmt: skip
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(others: mean CPU, in cores, of the machine's other processes during the iperf3 "
                 "runs; load: /proc/loadavg at the start and the end of each system)")  # fmt: skip
    if best:
        lines.append(
            "best peer per figure: "
            + ", ".join(f"{k} {v['peer']}" for k, v in best.items() if not k.endswith("_b_to_a"))
        )
    if result["targets"]:
        lines += ["", "issue 12's targets (autovn, encrypted, against the best peer of this run):"]
        for t in result["targets"]:
            verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
            lines.append(f"  {t['what']:<44} {t['measured']:<24} {verdict}")
    lines += ["", "what each row ran (iperf3 and ping from alpha's namespace):"]
    for system in systems.values():
        s = system.setup
        lines.append(f"  {s.name:<15} {s.source} -> {s.target}: {s.ran}")
    if "autovn" in systems:
        s = systems["autovn"].setup
        for node, health in s.health.items():
            rings = ", ".join(f"{k}={v}" for k, v in health["ring_drops"].items() if v)
            other = ", ".join(f"{k}={v}" for k, v in health["worker_drops"].items())
            lines.append(f"  autovn {node}: ring drops {rings or 0}; worker drops {other or 0}")
        lines.append(f"  autovn: {s.overlay_check}")
    lines += ["", f"results: {result['file']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main


def parse_loss(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if any(not 0 <= v < 0.5 for v in values):
        raise argparse.ArgumentTypeError(f"bad --loss {text!r}: probabilities in [0, 0.5)")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/peers", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument(
        "--setups",
        type=lambda text: harness.subset(text, list(SYSTEMS)),
        default=list(DEFAULT),
        help=f"which systems, measured in this order ({','.join(SYSTEMS)})",
    )
    harness.traffic_options(
        p,
        seconds=8,
        repeats="iperf3 runs per direction, and per loss",
        pings=200,
        fewest_pings=200,
        pings_per="per system",
        ping_interval=0.005,
    )
    p.add_argument("--starts", type=harness.bounded_int(1, 10), default=3,
                   help="cold starts timed to the first ping (3)")  # fmt: skip
    p.add_argument("--loss", type=parse_loss, default=[0.001, 0.01],
                   help="random loss probabilities on the underlay (0.001,0.01)")  # fmt: skip
    p.add_argument("--scale", type=pb.parse_scale, default={},
                   help="autovn stage knobs, e.g. queues=2,classifier=2,overlay_io=2")  # fmt: skip
    p.add_argument("--json-only", action="store_true", help="print the JSON result only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
