"""The scaling table: autovn's throughput and CPU per GB against its scaling knobs.

For each ``--configs`` entry ``T/C/K`` (TAP queues, classifier workers, overlay_io workers),
two encrypted nodes (Noise IK, static peers; ``supervisor.testbed.node_pair``) start in the
same two namespaces, and iperf3 runs with ``-P 1`` and ``-P 4`` (``--streams``), each way,
``--repeats`` times; the medians are reported with the CPU-seconds per GB of every process of
both nodes (as ``pipeline_bench.py`` counts it) and the load average before each config, and
the busiest process of each cell (its median share of a core over the iperf3 run's wall time:
a process near 1.0 is the bottleneck; one well below it says the cores are shared out). The
configs are measured in rounds (every config once per round) so that a change of the
machine's load hits them all alike. The JSON goes to ``bench/results/scaling-<timestamp>.json``.

Run as root from the repository root::

    python3 bench/scaling_bench.py [--configs 1/1/1,1/2/1,1/1/2,2/2/2] [--streams 1,4]
                                   [--seconds 5] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench import pipeline_bench as pb  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("scaling_bench", "scaling", "scaling")
log = BENCH.log
DIRECTIONS = ("a->b", "b->a")


@dataclass
class Cell:
    """The runs of one config, stream count and direction."""

    mbit_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    # per run: the share of a core each process used ("alpha overlay_io0": 0.93), the
    # supervisors included: what says whether one process is the bottleneck
    shares: list[dict[str, float]] = field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(self.mbit_s) if self.mbit_s else None

    def cpu_per_gb(self) -> float | None:
        gb = sum(self.bytes) / 1e9
        return sum(self.cpu_s) / gb if gb > 0 else None

    def busiest(self) -> tuple[str, float] | None:
        """The process with the highest median share of a core over the runs, and that
        share."""
        names = {n for run_ in self.shares for n in run_}
        medians = {n: statistics.median(r.get(n, 0.0) for r in self.shares) for n in names}
        return max(medians.items(), key=lambda kv: kv[1]) if medians else None


def process_ticks(nodes: list[testbed.Node]) -> dict[str, tuple[int, harness.ProcTimes]]:
    """Each process of ``nodes`` (supervisor and workers) by "node stage+index": pid and CPU
    times."""
    out: dict[str, tuple[int, harness.ProcTimes]] = {}
    for node in nodes:
        st = node.status() or {}
        procs = [("supervisor", int(st.get("supervisor_pid") or 0))]
        procs += [
            (f"{w.get('stage')}{w.get('worker', '')}", int(w.get("pid") or 0))
            for w in st.get("workers", [])
        ]
        for name, pid in procs:
            t = harness.proc_times(pid) if pid else None
            if t is not None:
                out[f"{node.name} {name}"] = (pid, t)
    return out


def shares_since(
    before: dict[str, tuple[int, harness.ProcTimes]], seconds: float
) -> dict[str, float]:
    """The share of a core each process of ``before`` used since (same pid and start)."""
    out: dict[str, float] = {}
    for name, (pid, old) in before.items():
        new = harness.proc_times(pid)
        if new is not None and new.start == old.start and seconds > 0:
            out[name] = round((new.own - old.own) / harness.CLK_TCK / seconds, 3)
    return out


def parse_config(text: str) -> tuple[int, int, int]:
    t, c, k = (int(x) for x in text.split("/"))
    if not all(1 <= v <= 16 for v in (t, c, k)):
        raise ValueError(text)
    return t, c, k


def parse_configs(text: str) -> list[tuple[int, int, int]]:
    try:
        return [parse_config(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad --configs {text!r}: want T/C/K,...") from exc


def label(config: tuple[int, int, int]) -> str:
    return "/".join(str(v) for v in config)


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    result = BENCH.new_result(args, "seconds", "repeats", "streams")
    result["args"]["configs"] = [label(c) for c in args.configs]
    cells: dict[str, Cell] = {}
    load: dict[str, list[list[float]]] = {}
    t0 = time.monotonic()
    with testbed.Testbed("avs") as tb:
        nss = testbed.veth_pair(tb)
        server = pb.IperfServer(tb, nss[1])
        for r in range(args.repeats):
            for config in args.configs:
                name = label(config)
                stages = dict(zip(pb.SCALE_KEYS, config, strict=True))
                nodes = list(
                    testbed.node_pair(nss[0], nss[1], tmp / f"{name}-{r}".replace("/", "."),
                                      secure=True, stages=stages)
                )  # fmt: skip
                load.setdefault(name, []).append(harness.loadavg())
                log(f"{name} round {r + 1}/{args.repeats}: starting nodes (load {load[name][-1]})")
                testbed.start_all(nodes, peers_up=True)
                harness.warm_up(nss[0], testbed.VIRTUAL[1])
                try:
                    for streams in args.streams:
                        for reverse in (False, True):
                            before = pb.cpu_snapshot(nodes)
                            ticks, started = process_ticks(nodes), time.monotonic()
                            run_ = harness.run_iperf(
                                nss[0], testbed.VIRTUAL[1], args.seconds, reverse, log, streams
                            )
                            cell = cells.setdefault(f"{name} P{streams} {run_.direction}", Cell())
                            cell.mbit_s.append(run_.mbit_s)
                            cell.shares.append(shares_since(ticks, time.monotonic() - started))
                            cell.cpu_s.append(pb.cpu_seconds_since(before, nodes))
                            cell.bytes.append(run_.bytes)
                            log(f"{name} -P {streams} {run_.direction}: {run_.mbit_s:.0f} Mbit/s")
                finally:
                    testbed.stop_all(nodes)
                server.fresh()
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    result["cells"] = {k: asdict(c) | {"median_mbit_s": c.median(), "cpu_s_per_gb": c.cpu_per_gb(),
                                       "busiest": c.busiest()}
                       for k, c in cells.items()}  # fmt: skip
    result["load"] = load
    return result, {"cells": cells, "load": load}


def render(result: dict[str, Any], data: dict[str, Any]) -> str:
    a = result["args"]
    cells: dict[str, Cell] = data["cells"]
    lines = [
        f"autovn scaling  {result['timestamp']}  ({result['elapsed_s']:.0f} s), encrypted, "
        f"iperf3 {a['seconds']} s, medians of {a['repeats']} (rounds over the configs)",
        "config T/C/K = TAP queues / classifier workers / overlay_io workers; "
        "Mbit/s and CPU-s per GB (both nodes) each way",
        "",
    ]
    head = f"{'config':<8}{'load 1m':>9}"
    for streams in a["streams"]:
        for d in DIRECTIONS:
            head += f"{f'-P {streams} {d}':>22}"
    lines.append(head)
    for name in a["configs"]:
        loads = [x[0] for x in data["load"].get(name, [])]
        row = f"{name:<8}{statistics.fmean(loads) if loads else 0:>9.1f}"
        for streams in a["streams"]:
            for d in DIRECTIONS:
                c = cells.get(f"{name} P{streams} {d}")
                shown = (
                    f"{harness.fmt(c.median(), 0)} / {harness.fmt(c.cpu_per_gb(), 1)}" if c else "-"
                )
                row += f"{shown:>22}"
        lines.append(row)
    lines += [
        "",
        "the busiest process (median share of a core over the runs; the iperf3 wall time):",
    ]
    for name in a["configs"]:
        row = f"{name:<8}{'':>9}"
        for streams in a["streams"]:
            for d in DIRECTIONS:
                c = cells.get(f"{name} P{streams} {d}")
                top = c.busiest() if c else None
                row += f"{f'{top[0]} {top[1]:.2f}' if top else '-':>22}"
        lines.append(row)
    lines += ["", f"results: {result['file']}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    configs = "1/1/1,1/2/1,1/1/2,2/2/2"
    p.add_argument("--configs", type=parse_configs, default=parse_configs(configs),
                   help=f"T/C/K configs ({configs})")  # fmt: skip
    p.add_argument("--streams", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4],
                   help="iperf3 -P values (1,4)")  # fmt: skip
    p.add_argument("--seconds", type=harness.bounded_int(1, 120), default=5, help="iperf3 -t (5)")
    p.add_argument("--repeats", type=harness.bounded_int(1, 20), default=3, help="rounds (3)")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return BENCH.main(args, run, render, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
