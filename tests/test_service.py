"""A node run as a service: its Prometheus endpoint scraped for real and checked by promtool,
its counters moving under a ping; and the sd_notify datagrams systemd would read, from a
socket the test made (READY=1 after join, WATCHDOG=1 every half period, STOPPING=1)."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.testbed import (
    Node,
    Testbed,
    notify_datagrams,
    notify_socket,
    start_all,
    stop_all,
    two_nodes,
    wait_for,
)
from tests.test_metrics import promtool_check

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

METRICS = "127.0.0.1:9477"
SCRAPE = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n"
)


def scrape(node: Node) -> str:
    """GET /metrics from inside the node's namespace (its own loopback)."""
    res = node.ns.run([sys.executable, "-c", SCRAPE, f"http://{METRICS}/metrics"], timeout=30)
    return res.stdout


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_scraped_and_counting(testbed: Testbed, tmp_path: Path) -> None:
    a, b = two_nodes(testbed, tmp_path, start=False)
    with a.config.open("a") as f:
        f.write(f'\n[metrics]\nlisten = "{METRICS}"\n')
    start_all((a, b), peers_up=True)
    listening = a.ns.run(["ss", "-Hltn", "sport = :9477"]).stdout.split()
    assert METRICS in listening, listening  # on the namespace's loopback, nowhere else
    first_text = wait_for("a scrape with peers", lambda: (t := scrape(a)) and "peer=" in t and t)
    promtool_check(first_text, tmp_path)
    first = values(first_text)
    assert a.ping(b.address, count=5, interval=0.1)

    def outbound(v: dict[tuple[str, tuple[tuple[str, str], ...]], float], stage: str) -> float:
        key = (("direction", "outbound"), ("stage", stage), ("worker", "0"))
        return v.get(("autovn_frames_total", key), 0.0)

    inbound = ("autovn_bytes_total", (("direction", "inbound"), ("stage", "tap_reader"),
                                      ("worker", "0")))  # fmt: skip

    def moved() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        """Each worker's counters arrive with its own heartbeat: wait for all three, and
        for tap_reader's inbound bytes (absent from a scrape before its first report)."""
        now = values(scrape(a))
        stages = ("tap_reader", "classifier", "overlay_io")
        if now.get(inbound, 0.0) <= first.get(inbound, 0.0):
            return None
        return now if all(outbound(now, s) >= outbound(first, s) + 5 for s in stages) else None

    later = wait_for("frames to move in every stage", moved, timeout=15, every=0.5)
    assert later[inbound] > first.get(inbound, 0.0)
    peer = (("peer", "beta"),)
    assert later[("autovn_peer_up", peer)] == 1
    assert 0 < later[("autovn_peer_rtt_seconds", peer)] < 1
    assert later[("autovn_peer_handshakes_total", peer)] >= 1
    assert later[("autovn_overlay_joined", ())] == 1
    for name in ("autovn_link_sent_bytes_total", "autovn_link_received_bytes_total"):
        (n,) = [v for (m, labels), v in later.items() if m == name and ("peer", "beta") in labels]
        assert n > 5 * 84, name  # five pings' worth at least
    used = [k for k in later if k[0] == "autovn_ring_used_bytes"]
    assert len(used) == len(a.status()["rings"])  # type: ignore[index]
    stop_all((a, b))


@pytest.fixture(name="notify_socket")
def _notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with notify_socket() as pair:
        yield pair


def test_sd_notify_ready_watchdog_stopping(
    testbed: Testbed,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock, path = notify_socket
    a, b = two_nodes(testbed, tmp_path, start=False)
    b.start()  # beta first, without NOTIFY_SOCKET: alpha then joins the overlay through it
    b.wait_running()
    with monkeypatch.context() as env:
        env.setenv("NOTIFY_SOCKET", path)
        env.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: WATCHDOG=1 every 0.5 s
        a.start()
    messages: list[tuple[float, dict[str, str]]] = []
    ready_at = None
    for at, fields in notify_datagrams(sock, time.monotonic() + 30):
        messages.append((at, fields))
        if fields.get("READY") == "1":
            ready_at = at
            break
    assert ready_at is not None, messages
    st = a.status()
    assert st is not None and st["overlay"]["state"] == "joined"
    ready = messages[-1][1]
    assert (
        ready["STATUS"].startswith("address 100.64.0.1, ") and "overlay joined" in ready["STATUS"]
    )
    # watchdog pings before READY and after it, every half period
    for at, fields in notify_datagrams(sock, time.monotonic() + 2.6):
        messages.append((at, fields))
    pings = [at for at, fields in messages if fields.get("WATCHDOG") == "1"]
    after = [at for at in pings if at > ready_at]
    assert len(after) >= 4, messages
    gaps = [y - x for x, y in zip(after, after[1:], strict=False)]
    assert max(gaps) < 1.0, gaps  # within WatchdogSec, with room for a busy machine
    # the workers do not inherit the variables: only the supervisor talks to systemd
    for w in st["workers"]:
        environ = Path(f"/proc/{w['pid']}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"NOTIFY_SOCKET=") for v in environ), w["stage"]
    stop_all((a, b))
    rest = [fields for _, fields in notify_datagrams(sock, time.monotonic() + 1)]
    assert {"STOPPING": "1", "STATUS": "stopping"} in rest, rest
