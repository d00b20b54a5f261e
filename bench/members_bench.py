"""What one member's junk costs a node: control's CPU per overlay message after 0, 1,000
and 5,000 junk ``ConnectRequest``s (issue 13: it grew from 2.8 ms to 123 ms after 4,000).

Each round starts one real node (``n1`` of the test bed's ``overlay_nodes``) and, in a
second namespace, a certified member driven by ``tests.junk_member``: the
product's LinkManager with the member's own key and certificate, linked to the node, that
sends ``ConnectRequest``s with made-up requester ids and addresses (198.19.128.0/17) at
``--rate`` a second. At 0, 1,000 and 5,000 junk requests sent it measures a probe batch
(``--probe`` more of the same messages): the CPU time control's process ran meanwhile
(``/proc/PID/schedstat``, ns), divided by the batch's size; and, for scale, the CPU control
ran in an idle window as long as a batch. With ``--baseline REV`` the rounds alternate
between that revision's node and this checkout's (the member is always this checkout's),
so that a shared machine's noise hits both alike. It prints the medians over ``--rounds``
rounds, the ratio to the figure at 0, the load average before and after, and writes
``bench/results/members-<timestamp>.json``.

Run as root from the repository root::

    python3 bench/members_bench.py [--rounds 3] [--probe 1000] [--rate 700]
                                   [--baseline REV] [--json-only]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.pipeline_bench import baseline_tree  # noqa: E402
from supervisor import testbed  # noqa: E402
from tests import junk_member  # noqa: E402
from tests.junk_member import ask  # noqa: E402

BENCH = harness.Script("members_bench", "members", "members")
log = BENCH.log
LEVELS = (0, 1000, 5000)


def run_s(pid: int) -> float | None:
    """CPU seconds a process has run (the scheduler's ns count); None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def per_message_ms(before: float | None, after: float | None, count: int) -> float | None:
    if before is None or after is None:
        return None  # control was restarted meanwhile (its watchdog, or a crash)
    return (after - before) / count * 1000


@contextlib.contextmanager
def member_of(n1: testbed.Node, n2: testbed.Node, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = junk_member.launch(n1, n2, tmp / "junk_member.err", harness.REPO)
    try:
        yield proc
    finally:
        with contextlib.suppress(Exception):
            ask(proc, "quit")
        n2.ns.testbed.stop(proc)


def one_round(args: argparse.Namespace, tmp: Path, tree: Path | None) -> dict[str, Any]:
    """{"idle_ms": CPU control ran in an idle window as long as a batch, per message of a
    batch; "<level>": CPU per message of the probe batch after <level> junk requests}."""
    with testbed.Testbed("mbb") as tb:
        n1, n2 = testbed.overlay_nodes(tb, tmp, 2, start=False)
        if tree is not None:
            n1.source_tree = tree
        n1.start()
        n1.wait_running()
        control = n1.worker_pid("control")
        out: dict[str, Any] = {}
        window = args.probe / args.rate + 0.3
        before = run_s(control)
        time.sleep(window)
        out["idle_ms"] = per_message_ms(before, run_s(control), args.probe)
        with member_of(n1, n2, tmp) as proc:
            sent = 0
            for level in LEVELS:
                if level > sent:
                    ask(proc, f"junk {level - sent} {args.rate}")
                    sent = level
                before = run_s(control)
                ask(proc, f"junk {args.probe} {args.rate}")
                time.sleep(0.3)  # the last ones through the rings
                out[str(level)] = per_message_ms(before, run_s(control), args.probe)
                sent += args.probe
        st = n1.status() or {}
        overlay = (st.get("overlay") or {}).get("overlay") or {}
        out["answered"] = overlay.get("connects_answered", 0)  # since control last started
        out["sent"] = sent
        out["control_restarts"] = sum(
            int(w.get("restarts", 0)) for w in st.get("workers", []) if w["stage"] == "control"
        )
        out["links"] = len(st.get("link_table", []))
        out["node"] = "baseline" if tree is not None else "this"
        n1.cli("stop", str(n1.config), check=False)
        return out


def run(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], None]:
    result = BENCH.new_result(args, "rounds", "probe", "rate", "baseline")
    result["load_before"] = harness.loadavg()
    rounds: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        trees: list[Path | None] = [None]
        if args.baseline:
            base = stack.enter_context(baseline_tree(args.baseline, tmp / "baseline"))
            result["baseline_commit"] = base.commit
            trees = [base.root, None]
        for r in range(args.rounds):
            for tree in trees:
                log(f"round {r + 1}: {'baseline' if tree else 'this checkout'}")
                rounds.append(one_round(args, tmp / f"r{r}-{'b' if tree else 't'}", tree))
    result["load_after"] = harness.loadavg()
    result["rounds"] = rounds
    medians: dict[str, dict[str, float | None]] = {}
    for node in ("this", "baseline"):
        mine = [x for x in rounds if x["node"] == node]
        if mine:
            keys = ["idle_ms", *(str(level) for level in LEVELS), "links", "control_restarts"]
            keys += ["answered", "sent"]
            medians[node] = {k: _median([x[k] for x in mine]) for k in keys}
    result["medians"] = medians
    return result, None


_median = harness.median_measured  # (a round whose control restarted measured nothing)


def render(result: dict[str, Any], _: None) -> str:
    lines = [
        f"control CPU per junk ConnectRequest, ms (median of {result['args']['rounds']} rounds,"
        f" probe batches of {result['args']['probe']} at {result['args']['rate']}/s)",
        f"{'node':10} {'idle':>7} "
        + " ".join(f"{f'@{lv}':>9}" for lv in LEVELS)
        + f" {'@5000/@0':>9} {'links':>6} {'restarts':>8} {'answered':>13}",
    ]
    for node, m in result["medians"].items():
        cells = " ".join(f"{harness.fmt(m[str(lv)], 3):>9}" for lv in LEVELS)
        lines.append(
            f"{node:10} {harness.fmt(m['idle_ms'], 3):>7} {cells}"
            f" {harness.ratio(m['5000'], m['0']):>9} {harness.fmt(m['links'], 0):>6}"
            f" {harness.fmt(m['control_restarts'], 0):>8}"
            f" {harness.fmt(m['answered'], 0):>6}/{harness.fmt(m['sent'], 0):<6}"
        )
    lines.append(
        "ms: control's CPU per junk message sent, in a batch after that many; links: held at"
        " the end; restarts: of control; answered: ConnectRequests control answered (since"
        " its last start) / sent"
    )
    lines.append(f"load average before {result['load_before']}, after {result['load_after']}")
    lines.append(f"results: {result['file']}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=harness.bounded_int(1, 20), default=3)
    p.add_argument("--probe", type=harness.bounded_int(100, 10_000), default=1000)
    p.add_argument("--rate", type=float, default=700.0, help="junk messages a second")
    p.add_argument("--baseline", default=None, help="also measure this revision's node")
    p.add_argument("--json-only", action="store_true")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    return BENCH.main(args, run, render, as_json=args.json_only)


if __name__ == "__main__":
    sys.exit(main())
