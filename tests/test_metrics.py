"""Prometheus metrics: the families made from a status snapshot follow the conventions, and
the server (prometheus-client's, in a thread) serves them on loopback without touching the
supervisor's state."""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Endpoint
from supervisor.metrics import MetricsServer, families


def promtool_check(text: str, tmp_path: Path) -> None:
    """``promtool check metrics`` (Debian's prometheus package) on ``text``: skipped where it
    is missing, but a failure under CI, which installs it."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool not installed under CI (Debian package prometheus)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    path = tmp_path / "metrics.txt"
    path.write_text(text)
    with path.open() as f:
        res = subprocess.run(
            [promtool, "check", "metrics"], stdin=f, capture_output=True, text=True, check=False
        )
    assert res.returncode == 0, res.stdout + res.stderr


def snapshot(frames: int = 11) -> dict[str, Any]:
    """A status as ``NodeSupervisor.status`` makes it, cut down."""
    return {
        "node": "alpha",
        "namespace": "lab",
        "address": "100.64.0.1",
        "mode": "interface",
        "node_id": "c1b1",
        "uptime_s": 12.5,
        "encrypted": True,
        "workers": [
            {
                "stage": "tap_reader",
                "worker": 0,
                "state": "running",
                "restarts": 1,
                "heartbeat_age_s": 0.4,
                "stats": {"frames_read": frames, "bytes_read": 922, "frames_written": 4,
                          "bytes_written": 336, "write_drops": 0},
            },
            {
                "stage": "classifier",
                "worker": 0,
                "state": "running",
                "restarts": 0,
                "heartbeat_age_s": 0.4,
                "stats": {"classifier": {"from_inside": 11, "from_outside": 3,
                                         "actions": {"0": 3, "2": 7}, "drops": {"ipv6": 4}}},
            },
            {
                "stage": "overlay_io",
                "worker": 0,
                "state": "restarting",
                "restarts": 2,
                "heartbeat_age_s": 3.0,
                "stats": {"datagrams_sent": 36, "bytes_sent": 348, "datagrams_received": 34,
                          "bytes_received": 3097, "send_errors": 0, "sessions": {"send": 1},
                          "relay_sent": 0, "drops": {"bad_tag": 2}},
            },
            {
                "stage": "control",
                "worker": 0,
                "state": "running",
                "restarts": 0,
                "heartbeat_age_s": 0.1,
                "stats": {"addressing": {"dns": {"queries": 3, "answered_noerror": 2},
                                         "dhcp": {"received_discover": 1, "claims_won": 1,
                                                  "dropped_short": 1},
                                         "leases": [{"state": "bound"}]}},
            },
        ],
        "rings": [{"name": "tap_reader0>classifier0", "capacity": 4194304, "used_bytes": 64,
                   "frames_in": 11, "bytes_in": 922, "drops": 0, "drop_bytes": 0,
                   "frames_out": 10, "bytes_out": 858, "batches_in": 10, "batches_out": 10}],
        "peers": [{"name": "beta", "state": "up", "rtt_ms": 5.0, "last_heard_s": 0.8,
                   "pings_sent": 13, "pongs_received": 6, "session_age_s": 7.0,
                   "handshakes": 1}],
        "links": {"initiations_sent": 2, "refused": {"foreign_ca": 1}},
        "overlay": {"state": "joined", "estimated_size": 2, "registered": True, "routes": 0,
                    "counters": {"resolves": 1},
                    "overlay": {"sent_hello": 4, "bytes_sent": 1587, "connections_near": 1,
                                "connections_added_leaf": 1, "estimated_size": 2},
                    "dht": {"sent_create": 2, "request_timeouts": 2, "retries": 2}},
        "link_table": [{"slot": 1, "name": "beta", "node_id": "c875", "kind": "near",
                        "endpoint": "198.18.0.2:4789", "up": True, "rtt_ms": None,
                        "age_s": 7.0, "routes": [], "bytes_sent": 1500, "bytes_received": 980},
                       {"slot": 2, "name": None, "node_id": "aa" * 20, "kind": "relayed",
                        "endpoint": "via:bb", "up": False, "rtt_ms": 3.0, "age_s": None,
                        "routes": ["100.64.0.9"], "bytes_sent": 0, "bytes_received": 0}],
        "machines": [],
    }  # fmt: skip


def samples(st: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in families(st):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_names_follow_the_conventions() -> None:
    made = families(snapshot())
    assert len(made) > 40
    for family in made:
        assert family.name.startswith("autovn_"), family.name
        assert family.documentation, family.name
        for s in family.samples:
            if family.type == "counter":
                assert s.name.endswith("_total"), s.name
            assert not s.name.endswith(("_ms", "_milliseconds", "_kib"))


def test_values_come_from_the_snapshot() -> None:
    got = samples(snapshot())
    w = (("stage", "tap_reader"), ("worker", "0"))
    assert got[("autovn_frames_total", (("direction", "outbound"), *w))] == 11
    assert got[("autovn_bytes_total", (("direction", "inbound"), *w))] == 336
    assert got[("autovn_worker_restarts_total", w)] == 1
    assert got[("autovn_worker_up", (("stage", "overlay_io"), ("worker", "0")))] == 0
    assert got[("autovn_drops_total", (("reason", "bad_tag"), ("stage", "overlay_io"),
                                       ("worker", "0")))] == 2  # fmt: skip
    assert got[("autovn_drops_total", (("reason", "ipv6"), ("stage", "classifier"),
                                       ("worker", "0")))] == 4  # fmt: skip
    assert got[("autovn_classifier_actions_total", (("action", "to_peer"), ("worker", "0")))] == 3
    ring = (("ring", "tap_reader0>classifier0"),)
    assert got[("autovn_ring_used_bytes", ring)] == 64
    assert got[("autovn_ring_popped_records_total", ring)] == 10
    assert got[("autovn_peer_rtt_seconds", (("peer", "beta"),))] == 0.005
    assert got[("autovn_peer_handshakes_total", (("peer", "beta"),))] == 1
    assert got[("autovn_handshakes_refused_total", (("reason", "foreign_ca"),))] == 1
    assert got[("autovn_overlay_joined", ())] == 1
    assert got[("autovn_overlay_connections", (("kind", "near"),))] == 1
    assert got[("autovn_dht_messages_total", (("direction", "sent"), ("type", "create")))] == 2
    assert got[("autovn_dht_failures_total", (("reason", "request_timeouts"),))] == 2
    assert got[("autovn_dhcp_leases", (("state", "bound"),))] == 1
    assert got[("autovn_dhcp_failures_total", (("reason", "dropped_short"),))] == 1
    assert got[("autovn_dns_answers_total", (("rcode", "noerror"),))] == 2
    relayed = (("peer", "a" * 16), ("slot", "2"))
    assert got[("autovn_link_up", relayed)] == 0
    info = [k for k in got if k[0] == "autovn_link_info" and ("path", "relayed") in k[1]]
    assert len(info) == 1
    assert ("autovn_link_rtt_seconds", (("peer", "beta"), ("slot", "1"))) not in got  # unknown
    beta = (("peer", "beta"), ("slot", "1"))
    assert got[("autovn_link_sent_bytes_total", beta)] == 1500
    assert got[("autovn_link_received_bytes_total", beta)] == 980
    assert got[("autovn_link_sent_bytes_total", relayed)] == 0


def test_served_on_loopback_and_valid(tmp_path: Path) -> None:
    current: list[dict[str, Any] | None] = [None]
    server = MetricsServer(Endpoint(IPv4Address("127.0.0.1"), 0), lambda: current[0])
    try:
        url = f"http://{server.address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.read() == b""  # no snapshot yet: nothing to say
        current[0] = snapshot(frames=11)
        with urllib.request.urlopen(url, timeout=10) as r:
            first = r.read().decode()
        current[0] = snapshot(frames=15)  # the loop replaces the snapshot; the next scrape sees it
        with urllib.request.urlopen(url, timeout=10) as r:
            second = r.read().decode()
    finally:
        server.close()
    promtool_check(first, tmp_path)
    line = 'autovn_frames_total{direction="outbound",stage="tap_reader",worker="0"}'
    assert f"{line} 11.0" in first and f"{line} 15.0" in second
    names = {f.name for f in text_string_to_metric_families(first)}
    assert {"autovn_frames", "autovn_peer_rtt_seconds", "autovn_ring_used_bytes"} <= names
    assert {"autovn_link_sent_bytes", "autovn_link_received_bytes"} <= names
