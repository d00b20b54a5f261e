"""Churn healing: kill -9 of some of the nodes of a live overlay, and how long the survivors
take to ping each other again.

Each round builds ``--nodes`` nodes on one bridged segment (``overlay_nodes``: each knows
only the first node's address), with one pair that cannot link directly (relayed through
the overlay), lets the overlay settle, pings every pair once, keeps the relayed pair
pinging every 10 ms, and kills (SIGKILL, every process at once) the first node, the pair's
relays and others up to ``--victims`` (``supervisor/testbed/churn.py`` has the details).
It prints, per round and as the median of the rounds:

- **all pairs**: seconds from the kill until every survivor pair pings (the end of the last
  outage of any pair, pinging every 0.2 s);
- **talking gap**: the relayed pair's largest gap between two echo replies around the kill;
- **relayed**: survivor pairs whose route was still relayed afterwards (the blocked pair
  must be);
- the overlay's size estimates before the kill (min, median, max over the nodes).

With ``--baseline REV`` the rounds alternate between REV's code (a temporary ``git
worktree``, as in ``pipeline_bench.py``) and this checkout's, ``--rounds`` each, so the load
of a shared machine hits both alike. The load average before and after is printed.

Run as root from the repository root::

    python3 bench/churn_bench.py [--baseline REV] [--rounds 3] [--nodes 10] [--victims 3]
                                 [--watch 14] [--json-only]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.pipeline_bench import baseline_tree  # noqa: E402
from supervisor.testbed import Testbed  # noqa: E402
from supervisor.testbed.churn import Heal, churn_round  # noqa: E402

BENCH = harness.Script("churn_bench", "churn", "churn")
log = BENCH.log
CURRENT = "current"


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], list[tuple[str, Heal]]]:
    result = BENCH.new_result(args, "baseline", "rounds", "nodes", "victims", "watch")
    result["loadavg_before"] = os.getloadavg()
    rounds: list[tuple[str, Heal]] = []
    with contextlib.ExitStack() as stack:
        trees: list[tuple[str, Path | None]] = [(CURRENT, None)]
        if args.baseline:
            base = stack.enter_context(baseline_tree(args.baseline, tmp / "baseline"))
            trees.insert(0, (base.commit[:10], base.root))
        for i in range(args.rounds):
            for name, tree in trees:
                log(f"round {i + 1}/{args.rounds}: {name}")
                with Testbed("chb") as tb:
                    heal = churn_round(
                        tb,
                        tmp / f"r{i}-{name}",
                        count=args.nodes,
                        victims=args.victims,
                        watch_s=args.watch,
                        log=log,
                        source_tree=tree,
                    )
                rounds.append((name, heal))
    result["loadavg_after"] = os.getloadavg()
    result["rounds"] = [{"tree": name} | dataclasses.asdict(h) for name, h in rounds]
    result["median"] = {
        name: {
            "all_pairs_s": statistics.median(h.all_pairs_s for n, h in rounds if n == name),
            "talking_gap_s": statistics.median(h.talking_gap_s for n, h in rounds if n == name),
        }
        for name in dict.fromkeys(n for n, _ in rounds)
    }
    return result, rounds


def render(result: dict[str, Any], rounds: list[tuple[str, Heal]]) -> str:
    lines = [
        f"churn: {result['args']['nodes']} nodes, kill -9 of {result['args']['victims']}; "
        f"load {fmt_load(result['loadavg_before'])} before, "
        f"{fmt_load(result['loadavg_after'])} after; {result['machine']['nproc']} cores",
        "",
        "tree        victims           all pairs s  talking gap s  relayed  sizes min/med/max",
    ]
    for name, r in rounds:
        relayed = [k for k, v in r.paths.items() if v != "direct"]
        sizes = r.estimated_sizes or [0]
        lines.append(
            f"{name:<10}  {','.join(r.victims):<16}  {r.all_pairs_s:11.2f}  "
            f"{r.talking_gap_s:13.3f}  {len(relayed):>7}  "
            f"{min(sizes)}/{statistics.median(sizes):g}/{max(sizes)}"
        )
    lines.append("")
    lines.append("median of the rounds (seconds from the kill):")
    for name, m in result["median"].items():
        lines.append(
            f"  {name}: every survivor pair pings after {m['all_pairs_s']:.2f} s; the "
            f"talking pair's largest gap {m['talking_gap_s']:.3f} s"
        )
    lines.append(f"results: {result.get('file', '-')}")
    return "\n".join(lines)


def fmt_load(load: list[float] | tuple[float, ...]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the rounds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--baseline", metavar="REV", default=None, help="also measure this revision")
    p.add_argument("--rounds", type=harness.bounded_int(1, 20), default=3, help="rounds per tree")
    p.add_argument("--nodes", type=harness.bounded_int(6, 30), default=10)
    p.add_argument("--victims", type=harness.bounded_int(1, 10), default=3)
    p.add_argument("--watch", type=float, default=14.0, help="seconds of pings after the kill")
    p.add_argument("--json-only", action="store_true", help="print the JSON result")
    args = p.parse_args(argv)
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
