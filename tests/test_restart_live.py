"""A killed data-path worker costs well under a second of traffic, and a TCP stream through
the node survives it: two real nodes in namespaces this test makes, an iperf3 stream and a
ping every 10 ms from alpha to beta, and each of alpha's data-path workers killed with SIGKILL
three times in turn. The supervisor restarts a dead worker at once, forked from its template
(a crash loop — death within 2 s of a start — waits a back-off instead)."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.testbed import Testbed, two_nodes, wait_for

pytestmark = pytest.mark.netns

STAGES = ("tap_reader", "classifier", "overlay_io")
KILLS = 3
MAX_GAP_S = 0.5  # the median of a stage's three largest ping gaps


def _reply_times(text: str) -> list[float]:
    """The wall-clock times of ``ping -D``'s echo replies."""
    return [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] .*time=", text, re.M)]


def _largest_gap(replies: list[float], start: float, end: float) -> float:
    """The longest silence between replies (and the window's edges) within [start, end]."""
    inside = [start, *(t for t in replies if start < t < end), end]
    return max(b - a for a, b in zip(inside, inside[1:], strict=False))


@pytest.mark.timeout(240)
def test_a_killed_worker_costs_under_half_a_second_and_tcp_survives(tmp_path: Path) -> None:
    with Testbed("avrs") as tb:
        a, b = two_nodes(tb, tmp_path)
        assert a.ping(b.address, count=3)
        b.ns.popen(["iperf3", "-s", "-1"])
        wait_for("iperf3 server", lambda: b.ns.run(["ss", "-tln"]).stdout.count(":5201"), 10)
        ping_out = tmp_path / "ping.txt"
        with open(ping_out, "wb") as f:
            ping = a.ns.popen(["ping", "-n", "-D", "-i", "0.01", "-W", "1", b.address], stdout=f)
        client = a.ns.popen(["iperf3", "-c", b.address, "-t", "30", "-J"], stdout=subprocess.PIPE)
        kills: list[tuple[str, float]] = []
        try:
            time.sleep(2.0)  # the stream under way
            for _ in range(KILLS):
                for stage in STAGES:
                    old = a.worker_pid(stage)
                    kills.append((stage, time.time()))
                    os.kill(old, signal.SIGKILL)
                    wait_for(f"{stage} back", lambda: a.worker_pid(stage) != old, 30)  # noqa: B023
                    time.sleep(1.0)
            out, _ = client.communicate(timeout=60)
        finally:
            ping.send_signal(signal.SIGINT)
            ping.wait(timeout=10)
            if client.poll() is None:
                client.kill()
        replies = _reply_times(ping_out.read_text())
        result = json.loads(out)
        assert client.returncode == 0 and "error" not in result, result.get("error")
        received = result["end"]["sum_received"]["bytes"]
        assert received > 10_000_000, f"the stream carried only {received} bytes"
        gaps: dict[str, list[float]] = {s: [] for s in STAGES}
        for stage, at in kills:
            gaps[stage].append(round(_largest_gap(replies, at - 0.1, at + 1.0), 3))
        print("largest ping gap per kill (s):", gaps)
        for stage, values in gaps.items():
            assert statistics.median(values) <= MAX_GAP_S, (stage, values)
        exits = [r for r in a.log_records() if r["event"] == "worker_exited"]
        assert len(exits) == len(kills)
        assert all(r["restart_in_s"] == 0.0 for r in exits), exits  # none a crash loop
