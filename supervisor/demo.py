"""``supervisor demo``: a small autovn network on this one machine, shown working.

Builds two network namespaces joined by a veth pair (underlay 198.18.0.1/.2), starts a node
in each (virtual 100.64.0.1/.2), pings each node from the other, runs a short iperf3 each
way, prints a summary table and removes everything it made — also on Ctrl-C or failure
(the ``Testbed`` owns every namespace and process). Needs root, iproute2, ping and iperf3.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from supervisor.lab import Node, two_nodes, wait_for
from supervisor.netns import Testbed, require_root
from supervisor.status import table


def _say(msg: str, out: TextIO) -> None:
    print(f"[demo] {msg}", file=out, flush=True)


def _rtt_ms(node: Node, target: str, count: int) -> float | None:
    res = node.ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.05", "-W", "1", target],
        check=False,
        timeout=count + 10,
    )
    times = [float(t) for t in re.findall(r"time=([\d.]+)", res.stdout)]
    return statistics.median(times) if times else None


def _iperf_mbit(client: Node, server: Node, seconds: int) -> float | None:
    res = client.ns.run(
        ["iperf3", "-c", server.address, "-t", str(seconds), "-J"],
        check=False,
        timeout=seconds + 30,
    )
    try:
        return float(json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6
    except (ValueError, KeyError):
        return None


def run_demo(
    *, seconds: int = 3, pings: int = 20, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    problem = require_root()
    missing = [t for t in ("ping", "iperf3") if shutil.which(t) is None]
    if problem or missing:
        print(
            f"demo needs root, iproute2, ping and iperf3: {problem or ', '.join(missing)}", file=err
        )
        return 2
    started = time.monotonic()
    with Testbed("avdemo") as tb, tempfile.TemporaryDirectory(prefix="autovn-demo-") as tmp:
        _say(f"building namespaces {tb.run_id}-a and {tb.run_id}-b joined by a veth pair", err)
        a, b = two_nodes(tb, Path(tmp), start=False)
        for node in (a, b):
            _say(f"starting node {node.name} ({node.address}) in {node.ns.name}", err)
            node.start()
        for node in (a, b):
            node.wait_running()
            node.wait_peers_up()
        _say(f"both nodes up, peers linked after {time.monotonic() - started:.1f} s", err)
        servers = [
            n.ns.popen(
                ["iperf3", "-s", "-B", n.address],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n in (a, b)
        ]
        for n in (a, b):
            wait_for("iperf3 server", lambda: ":5201" in n.ns.run(["ss", "-ltn"]).stdout)  # noqa: B023
        rows = []
        for src, dst in ((a, b), (b, a)):
            _say(
                f"{src.name} pings {dst.name} ({pings}x) and sends to it with iperf3 "
                f"for {seconds} s",
                err,
            )
            rtt = _rtt_ms(src, dst.address, pings)
            mbit = _iperf_mbit(src, dst, seconds)
            st = src.status() or {}
            peer: dict[str, Any] = next(iter(st.get("peers", [])), {})
            rows.append(
                [
                    src.name,
                    src.address,
                    dst.name,
                    dst.address,
                    "-" if rtt is None else f"{rtt:.3f}",
                    "-" if mbit is None else f"{mbit:.0f}",
                    "direct" if peer.get("state") == "up" else "down",
                ]
            )
        for s in servers:
            tb.stop(s)
        _say("stopping the nodes and removing the namespaces", err)
        for node in (a, b):
            node.cli("stop", str(node.config), check=False)
    headers = ["from", "address", "to", "address", "rtt_ms p50", "tcp Mbit/s", "path"]
    print("\n".join(table(headers, rows)), file=out)
    ok = all(r[4] != "-" and r[5] != "-" for r in rows)
    print(
        f"\n{'all nodes reached each other' if ok else 'SOME PATHS FAILED'}; "
        f"everything removed ({time.monotonic() - started:.1f} s)",
        file=out,
    )
    return 0 if ok else 1
