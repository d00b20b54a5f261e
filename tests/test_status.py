"""``supervisor status`` for humans: a short table of peers above the details."""

from __future__ import annotations

from typing import Any

from supervisor.node import with_peer_bytes
from supervisor.status import PEER_HEADERS, format_status, human_bytes


def status() -> dict[str, Any]:
    return {
        "node": "alpha",
        "namespace": "lab",
        "address": "100.64.0.1",
        "subnet": "100.64.0.0/24",
        "mode": "interface",
        "device": "avn0",
        "listen": "198.18.0.1:4789",
        "supervisor_pid": 10,
        "uptime_s": 60.0,
        "node_id": "c1" * 20,
        "workers": [{"stage": "control", "worker": 0, "pid": 11, "state": "running",
                     "uptime_s": 59.0, "restarts": 0, "stats": {}}],
        "rings": [],
        "peers": [
            {"name": "beta", "state": "up", "node_id": "c8" * 20, "endpoint": "198.18.0.2:4789",
             "addresses": ["100.64.0.2"], "rtt_ms": 0.412, "pattern": "IK",
             "session_age_s": 7.0},
            {"name": "gamma", "state": "down", "node_id": None, "endpoint": "198.18.0.3:4789",
             "addresses": ["100.64.0.3"], "rtt_ms": None, "pattern": None,
             "session_age_s": None},
        ],
        "overlay": {"state": "joined", "estimated_size": 3, "registered": True, "routes": 1},
        "link_table": [
            {"slot": 1, "name": "beta", "node_id": "c8" * 20, "kind": "near",
             "endpoint": "198.18.0.2:4789", "up": True, "rtt_ms": 0.5, "age_s": 7.0,
             "routes": [], "bytes_sent": 1_234_567, "bytes_received": 812},
            {"slot": 5, "name": None, "node_id": "3fa2b1c0d4e5" + "00" * 14, "kind": "relayed",
             "endpoint": "via:" + "9a" * 20, "up": True, "rtt_ms": None, "age_s": 300.0,
             "routes": ["100.64.0.9"], "bytes_sent": 0, "bytes_received": 45_000},
        ],
        "machines": [],
    }  # fmt: skip


def test_peers_come_first_with_path_rtt_and_last_handshake() -> None:
    lines = format_status(status()).splitlines()
    top = lines[lines.index("peers") + 1 : lines.index("workers") - 1]
    assert top[0].split() == " ".join(PEER_HEADERS).split()
    rows = [" ".join(line.split()) for line in top[1:]]
    assert rows == [
        "beta 100.64.0.2 direct 198.18.0.2:4789 (near) 0.412 7 s ago 1.2 MB 812 B up",
        "3fa2b1c0d4e5 100.64.0.9 relayed via 9a9a9a9a9a9a (relayed) - 5 min ago 0 B 45.0 kB up",
        "gamma 100.64.0.3 direct 198.18.0.3:4789 (static) - never - - down",
    ]
    assert lines.index("peers") < lines.index("workers") < lines.index("links")
    assert "static peers" in lines  # the details stay


def test_a_node_without_peers_says_so() -> None:
    st = status() | {"peers": [], "link_table": []}
    lines = format_status(st).splitlines()
    assert lines[lines.index("peers") + 1] == "  none yet"
    assert "static peers" not in lines


def test_the_port_mapping_is_shown_under_the_overlay() -> None:
    mapping = {"enabled": True, "protocols": ["pcp", "nat-pmp", "upnp"], "protocol": "upnp",
               "external": "198.18.90.11:4789", "lifetime_s": 7200, "phase": "mapped"}  # fmt: skip
    lines = format_status(status() | {"port_mapping": mapping}).splitlines()
    overlay = next(i for i, line in enumerate(lines) if line.startswith("overlay "))
    assert lines[overlay + 1] == "port mapping  198.18.90.11:4789 (upnp, lease 7200 s)"
    permanent = mapping | {"lifetime_s": 0}
    assert "(upnp, permanent)" in format_status(status() | {"port_mapping": permanent})
    none = mapping | {"external": None, "phase": "failed"}
    assert "port mapping  none (failed; asks pcp, nat-pmp, upnp)" in format_status(
        status() | {"port_mapping": none}
    )
    assert "port mapping  off" in format_status(status() | {"port_mapping": {"enabled": False}})
    assert "port mapping" not in format_status(status())  # an older node says nothing


def test_bytes_per_peer_are_summed_over_workers_and_joined_by_slot() -> None:
    links = [{"slot": 1, "name": "beta"}, {"slot": 5, "name": None}, {"slot": 7, "name": "x"}]
    workers = [
        {"peer_bytes": {1: [100, 40], 5: [7, 0]}},
        {"peer_bytes": {"1": [11, 2]}},  # a key as JSON would carry it
        {},  # a worker that has not reported yet
    ]
    rows = with_peer_bytes(links, workers)
    assert [(r["bytes_sent"], r["bytes_received"]) for r in rows] == [(111, 42), (7, 0), (0, 0)]
    assert "bytes_sent" not in links[0]  # control's rows are not changed


def test_bytes_are_human_readable() -> None:
    assert [human_bytes(n) for n in (0, 999, 1000, 1_234_567, 5 * 10**9)] == [
        "0 B", "999 B", "1.0 kB", "1.2 MB", "5.0 GB"
    ]  # fmt: skip
    assert human_bytes(None) is None


def test_the_overlay_line_says_whose_addresses_are_held() -> None:
    """Static: registered or not; DHCP: the lease (routing registers no static address
    there, so "not registered" was wrong); router mode: how many machines are leased."""
    st = status()

    def overlay_line(**changes: Any) -> str:
        view = {**st, **changes}
        return next(x for x in format_status(view).splitlines() if x.startswith("overlay "))

    assert "address registered" in overlay_line(addressing="static")
    unregistered = {**st["overlay"], "registered": False}
    assert "address not registered" in overlay_line(addressing="static", overlay=unregistered)
    line = overlay_line(addressing="dhcp", overlay=unregistered)
    assert "address 100.64.0.1 leased by DHCP" in line and "not registered" not in line
    assert "no DHCP lease yet" in overlay_line(addressing="dhcp", address="-")
    machines = [
        {"address": f"100.64.0.{i}", "mac": "02:00:00:00:00:01", "hostname": "h", "lease_age_s": 1}
        for i in (20, 21)
    ]
    assert "2 machines leased" in overlay_line(mode="router", machines=machines)
