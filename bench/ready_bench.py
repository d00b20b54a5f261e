"""Start to READY=1: how soon a node started by systemd (``Type=notify``) says it is up.

On the test bed's encrypted pair (static IK peers, one worker per stage): beta is started
and running; alpha is started with ``$NOTIFY_SOCKET`` pointing at a datagram socket this
script holds, and the time from ``supervisor start`` to alpha's ``READY=1`` is what
``systemctl start`` would wait (the supervisor sends it once every worker runs and control
says the node has joined the overlay). With ``--baseline REV`` the code of another revision
is started the same way, alternately with the current code (a temporary ``git worktree``,
as in ``pipeline_bench.py``), and the ratio printed.

Run as root from the repository root::

    python3 bench/ready_bench.py [--rounds 5] [--baseline REV] [--json-only]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.pipeline_bench import baseline_tree, git  # noqa: E402
from supervisor import testbed  # noqa: E402

BENCH = harness.Script("ready_bench", "ready", "ready")
WAIT_S = 30.0


def until_ready(sock: socket.socket, started: float) -> float | None:
    """Seconds from ``started`` to the first datagram holding READY=1, or None."""
    for at, fields in testbed.notify_datagrams(sock, started + WAIT_S):
        if fields.get("READY") == "1":
            return at - started
    return None


def one_start(tmp: Path, tree: Path | None) -> float | None:
    with testbed.notify_socket() as (sock, path), testbed.Testbed("avr") as tb:
        ns_a, ns_b = testbed.veth_pair(tb)
        a, b = testbed.node_pair(ns_a, ns_b, tmp, secure=True, stages={}, source_tree=tree)
        try:
            b.start()
            b.wait_running()
            os.environ["NOTIFY_SOCKET"] = path
            try:
                started = time.monotonic()
                a.start()
            finally:
                del os.environ["NOTIFY_SOCKET"]
            return until_ready(sock, started)
        finally:
            testbed.stop_all((a, b))


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], None]:
    result = BENCH.new_result(args, "rounds", "baseline")
    result["load_before"] = harness.loadavg()
    times: dict[str, list[float | None]] = {"current": []}
    with contextlib.ExitStack() as stack:
        trees: list[tuple[str, Path | None]] = [("current", None)]
        if args.baseline is not None:
            base = stack.enter_context(baseline_tree(args.baseline, tmp / "baseline"))
            result["baseline"] = {"rev": base.rev, "commit": base.commit, "subject": base.subject}
            trees.insert(0, ("baseline", base.root))
            times["baseline"] = []
        for i in range(args.rounds):
            for label, tree in trees:
                work = tmp / f"{label}-{i}"
                work.mkdir()
                took = one_start(work, tree)
                BENCH.log(f"round {i + 1}/{args.rounds} {label}: READY=1 after {took} s")
                times[label].append(took)
    result["ready_s"] = times
    result["load_after"] = harness.loadavg()
    return result, None


def render(result: dict[str, Any], _: None) -> str:
    lines = [
        f"autovn start -> READY=1  {result['timestamp']}",
        f"load avg before {result['load_before']}, after {result['load_after']}",
    ]
    medians = {label: harness.median_measured(v) for label, v in result["ready_s"].items()}
    for label, values in result["ready_s"].items():
        name = label
        if label == "baseline":
            name = f"baseline {result['baseline']['commit'][:7]}"
        runs = ", ".join(harness.fmt(v, 3) for v in values)
        lines.append(f"  {name:18} median {harness.fmt(medians[label], 3):>7} s  [{runs}]")
    if "baseline" in medians:
        ratio = harness.ratio(medians["current"], medians["baseline"])
        lines.append(f"  current/baseline   {ratio}")
    lines.append(f"results: {result.get('file', '-')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=harness.bounded_int(1, 50), default=5)
    p.add_argument("--baseline", metavar="REV", help="also start this revision's code")
    p.add_argument("--json-only", action="store_true", help="print the JSON result")
    args = p.parse_args(argv)
    if args.baseline is not None:
        try:
            git("rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}")
        except RuntimeError:
            p.error(f"--baseline {args.baseline}: no such commit in {harness.REPO}")
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
