"""Two real nodes on a veth pair, each in a namespace this test makes: real TAPs, real
processes, real ping and iperf3. The pair is shared by the tests of this module that leave
it running; the tests that end a node build their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.testbed import DEVICE, PORT, UNDERLAY, Node, Testbed, two_nodes, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Node]]:
    with Testbed("avt") as tb:
        yield two_nodes(tb, tmp_path_factory.mktemp("pair"))


def _stat(node: Node, stage: str, key: str) -> object:
    st = node.status()
    assert st is not None
    return next(w["stats"].get(key) for w in st["workers"] if w["stage"] == stage)


class TestTraffic:
    def test_ping_both_ways(self, pair: tuple[Node, Node]) -> None:
        a, b = pair
        assert a.ping(b.address, count=5)
        assert b.ping(a.address, count=5)

    def test_iperf3_tcp_completes_both_directions(self, pair: tuple[Node, Node]) -> None:
        a, b = pair
        server = b.ns.popen(
            ["iperf3", "-s", "-B", b.address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(
                "iperf3 server", lambda: b.ns.run(["ss", "-ltn"], check=False).stdout.count(":5201")
            )
            for reverse in ([], ["-R"]):
                res = a.ns.run(["iperf3", "-c", b.address, "-t", "2", "-J", *reverse], timeout=60)
                report = json.loads(res.stdout)
                received = report["end"]["sum_received"]["bytes"]
                assert received > 1_000_000, report["end"]
        finally:
            server.kill()

    def test_large_pings_cross_intact(self, pair: tuple[Node, Node]) -> None:
        """A packet filling the TAP MTU and fragmented ones arrive whole."""
        a, b = pair
        for size in (1372, 4000):
            res = a.ns.run(["ping", "-c", "2", "-W", "2", "-s", str(size), b.address], check=False)
            assert res.returncode == 0, res.stdout


class TestInspection:
    def test_status_shows_node_workers_rings_and_peers(self, pair: tuple[Node, Node]) -> None:
        a, b = pair
        assert a.ping(b.address, count=2)
        st = a.status()
        assert st is not None
        assert st["node"] == "alpha" and st["address"] == a.address
        stages = sorted(w["stage"] for w in st["workers"])
        assert stages == ["classifier", "control", "overlay_io", "tap_reader"]
        assert all(w["pid"] and w["state"] == "running" for w in st["workers"])
        rings = {r["name"]: r for r in st["rings"]}
        assert rings["classifier0>overlay_io0"]["frames_in"] > 0
        assert rings["overlay_io0>classifier0"]["frames_out"] > 0
        (peer,) = st["peers"]
        assert peer["name"] == "beta" and peer["state"] == "up" and peer["rtt_ms"] > 0
        text = a.cli("status", str(a.config)).stdout
        for word in ("tap_reader0>classifier0", "beta", "up", "restarts", "occupancy"):
            assert word in text

        # A status is fresh: every worker sent its counters for it (no heartbeat to wait for).
        assert a.ping(b.address, count=1)
        st = a.status()
        assert st is not None
        assert all(w["heartbeat_age_s"] <= 0.3 for w in st["workers"]), st["workers"]
        rows = [lk for lk in st["link_table"] if lk["name"] == "beta"]
        row = rows[0]
        assert row["bytes_sent"] > 3 * 84 and row["bytes_received"] > 3 * 84  # three pings' worth
        lines = [ln for ln in a.cli("status", str(a.config)).stdout.splitlines()
                 if ln.startswith("beta ") and "direct" in ln]  # fmt: skip
        assert lines and all(" B " in ln or "kB" in ln or "MB" in ln for ln in lines), lines

    def test_status_answers_without_a_hung_workers_report(self, pair: tuple[Node, Node]) -> None:
        """A worker that cannot report (stopped here) delays a status by the supervisor's
        wait (0.25 s), not the answer: the others' counters are fresh, its own its last."""
        a, _ = pair
        st = a.status()
        assert st is not None
        pid = next(w["pid"] for w in st["workers"] if w["stage"] == "classifier")
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)
            st = a.status()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert st is not None
        ages = {w["stage"]: w["heartbeat_age_s"] for w in st["workers"]}
        assert ages.pop("classifier") >= 1.0 and max(ages.values()) <= 0.3, st["workers"]

    def test_logs_filter_by_stage_and_event(self, pair: tuple[Node, Node]) -> None:
        a, _ = pair
        res = a.cli("logs", str(a.config), "--json", "--event", "peer_up", "--stage", "control")
        records = [json.loads(line) for line in res.stdout.splitlines()]
        assert records and all(r["event"] == "peer_up" and r["stage"] == "control" for r in records)
        assert records[0]["peer"] == "beta"
        every = a.log_records()
        for r in every:
            assert {"stage", "worker", "pid", "node", "event", "timestamp", "level"} <= r.keys()
        assert {"worker_started", "node_started", "worker_ready"} <= {r["event"] for r in every}
        pretty = a.cli(
            "logs", str(a.config), "--stage", "supervisor", "--event", "node_started"
        ).stdout
        assert "node_started" in pretty and "{" not in pretty.splitlines()[0]


class TestBadInput:
    def test_junk_datagrams_are_counted_drops(self, pair: tuple[Node, Node]) -> None:
        a, b = pair
        sender = (
            "import os, socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('{UNDERLAY[1]}', {PORT + 1}))\n"
            f"for i in range(400): s.sendto(os.urandom(i % 90), ('{UNDERLAY[0]}', {PORT}))\n"
        )
        b.ns.run([sys.executable, "-c", sender])

        def counted() -> int:
            drops = _stat(a, "overlay_io", "drops") or {}
            links = _stat(a, "control", "links") or {}
            assert isinstance(drops, dict) and isinstance(links, dict)
            return sum(drops.values()) + sum(links.get("refused", {}).values())

        wait_for("400 counted drops", lambda: counted() >= 400)
        self._still_alive(a, b)

    def test_junk_from_a_peers_endpoint_counted_by_reason(self, pair: tuple[Node, Node]) -> None:
        """Datagrams from the peer's own address and port that are not ours: parse drops."""
        a, b = pair
        # The peer's port is bound by its node; send with SO_REUSEPORT from the same port.
        sender = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"s.bind(('{UNDERLAY[1]}', {PORT}))\n"
            f"for d in (b'', b'x' * 15, b'\\x07' + b'\\x00' * 30, b'\\x01\\x09' + b'\\x00' * 30):\n"
            f"    s.sendto(d, ('{UNDERLAY[0]}', {PORT}))\n"
        )
        b.ns.run([sys.executable, "-c", sender])

        def reasons() -> dict[str, int] | None:
            drops = _stat(a, "overlay_io", "drops") or {}
            assert isinstance(drops, dict)
            return drops if {"short_datagram", "bad_version", "bad_type"} <= drops.keys() else None

        wait_for("drop reasons", reasons)
        self._still_alive(a, b)

    def test_junk_frames_into_the_tap_are_counted_drops(self, pair: tuple[Node, Node]) -> None:
        a, b = pair
        sender = (
            "import os, socket\n"
            "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
            f"s.bind(('{DEVICE}', 0))\n"
            "for i in range(300): s.send(os.urandom(14 + i % 200))\n"
        )
        a.ns.run([sys.executable, "-c", sender])

        def counted() -> int:
            cls = _stat(a, "classifier", "classifier") or {}
            assert isinstance(cls, dict)
            return sum(cls.get("drops", {}).values())

        wait_for("classifier drops", lambda: counted() >= 250)
        self._still_alive(a, b)

    @staticmethod
    def _still_alive(a: Node, b: Node) -> None:
        st = a.status()
        assert st is not None
        assert all(w["restarts"] == 0 for w in st["workers"]), st["workers"]
        assert a.ping(b.address, count=2)


@pytest.mark.parametrize("stage", ["tap_reader", "classifier", "overlay_io", "control"])
def test_killed_worker_is_restarted_and_ping_goes_on(pair: tuple[Node, Node], stage: str) -> None:
    a, b = pair
    out = a.root / f"ping-{stage}.txt"
    with open(out, "wb") as f:
        ping = a.ns.popen(["ping", "-i", "0.1", "-W", "1", b.address], stdout=f, stderr=f)
    try:
        wait_for("ping replies", lambda: out.read_text().count("bytes from") >= 3)
        pid = a.worker_pid(stage)
        os.kill(pid, signal.SIGKILL)
        before = out.read_text().count("bytes from")

        def restarted() -> bool:
            st = a.status()
            return bool(st) and any(
                w["stage"] == stage and w["pid"] != pid and w["state"] == "running"
                for w in st["workers"]  # type: ignore[index]
            )

        wait_for(f"{stage} restarted", restarted)
        wait_for(
            "ping replies after the restart",
            lambda: out.read_text().count("bytes from") >= before + 5,
            timeout=30,
        )
        assert ping.poll() is None, "ping exited"
    finally:
        ping.kill()
        ping.wait()
    events = [r for r in a.log_records() if r["event"] in ("worker_exited", "worker_restarted")]
    assert any(r.get("target") == f"{stage}:0" for r in events)


def _node_leftovers(node: Node, pids: list[int]) -> list[str]:
    left = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            left.append(f"pid {pid}")
        except ProcessLookupError:
            pass
    if node.ns.run(["ip", "link", "show", DEVICE], check=False).returncode == 0:
        left.append(f"TAP {DEVICE}")
    return left


def _shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


def _memfd_rings_held(pid: int) -> int:
    """How many distinct ring memfds a process holds (``/memfd:NAME (deleted)`` in its fds)."""
    targets = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    return sum(1 for t in targets if t.startswith("/memfd:") and ">" in t)


@pytest.mark.parametrize("how", ["sigterm", "kill9_supervisor"])
def test_node_ends_leave_nothing_behind(tmp_path: Path, how: str) -> None:
    with Testbed("avt") as tb:
        shm_before = _shm_names()
        a, b = two_nodes(tb, tmp_path)
        st = a.wait_running()
        pids = [w["pid"] for w in st["workers"]] + [st["supervisor_pid"]]
        assert (
            _memfd_rings_held(st["supervisor_pid"]) == 9
        )  # the rings live in memfds (8 + the handshake lane)
        assert a.proc is not None
        if how == "sigterm":
            a.proc.send_signal(signal.SIGTERM)
            assert a.proc.wait(timeout=20) == 0
        else:
            os.kill(st["supervisor_pid"], signal.SIGKILL)
            a.proc.wait(timeout=20)
        wait_for("workers, TAP gone", lambda: not _node_leftovers(a, pids), timeout=20)
        assert _shm_names() <= shm_before  # nothing new in /dev/shm
        # The node starts again from the same config and reaches its peer.
        a.start()
        a.wait_running()
        assert a.ping(b.address, count=3)


def test_supervisor_ping_shows_the_path_and_the_rtt(pair: tuple[Node, Node]) -> None:
    """``supervisor ping``: by name, by virtual address and by node id, each probe answered
    with the peer's name and the direct endpoint it took; an unknown peer is said so."""
    a, b = pair
    st = b.status()
    assert st is not None
    for peer in ("beta", b.address, st["node_id"]):
        res = a.cli("ping", str(a.config), peer, "-c", "3", "-i", "0.2")
        lines = res.stdout.splitlines()
        assert res.returncode == 0 and len(lines) == 3, res.stdout
        for line in lines:
            assert line.startswith("pong from beta ") and f"direct via {b.underlay}:" in line
            assert line.endswith(" ms") and float(line.split(" in ")[1].split()[0]) > 0
    res = a.cli("ping", str(a.config), "nobody", "-c", "1", check=False)
    assert res.returncode == 1 and "unknown peer" in res.stdout


def test_second_start_is_refused(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    res = a.cli("start", str(a.config), check=False, timeout=20)
    assert res.returncode == 1
    assert "already running" in res.stderr + res.stdout


@pytest.mark.parametrize("scale", [{"queues": 2, "classifier": 2, "overlay_io": 2}])
def test_scaled_node_carries_traffic(tmp_path: Path, scale: dict[str, int]) -> None:
    """Two workers per stage and a multi-queue TAP: ping and iperf3 still work."""
    with Testbed("avt") as tb:
        a, b = two_nodes(tb, tmp_path, **scale)
        st = a.status()
        assert st is not None
        assert len([w for w in st["workers"] if w["stage"] == "tap_reader"]) == 2
        assert len(st["rings"]) == 2 * 2 * 2 + 2 * 2 * 2 + 3 * 2 + 2 * 2  # 2TM + 2MK + 3K + 2M
        assert a.ping(b.address, count=5)
        server = b.ns.popen(
            ["iperf3", "-s", "-1", "-B", b.address],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            "iperf3 server", lambda: b.ns.run(["ss", "-ltn"], check=False).stdout.count(":5201")
        )
        res = a.ns.run(["iperf3", "-c", b.address, "-t", "2", "-P", "4", "-J"], timeout=60)
        assert json.loads(res.stdout)["end"]["sum_received"]["bytes"] > 1_000_000
        server.wait(timeout=10)


def test_spoofed_source_address_is_dropped_and_counted(pair: tuple[Node, Node]) -> None:
    """A member sends from an address that is not its own: the receiver drops it."""
    a, b = pair
    a.ns.run(["ip", "addr", "add", "100.64.0.99/32", "dev", DEVICE])
    try:
        res = a.ns.run(
            ["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", "100.64.0.99", b.address], check=False
        )
        assert res.returncode != 0  # nothing comes back: beta never accepted the request

        def spoofed() -> int:
            """The classifier hands a source it has no route for to control, which finds
            that the address is nobody's (or another node's) and drops the packet."""
            cls = _stat(b, "classifier", "classifier") or {}
            addressing = _stat(b, "control", "addressing") or {}
            assert isinstance(cls, dict) and isinstance(addressing, dict)
            counters = addressing.get("counters", {})
            return (
                int(cls.get("drops", {}).get("spoofed_source", 0))
                + int(counters.get("dropped_spoofed_source", 0))
                + int(counters.get("dropped_source_unresolved", 0))
            )

        wait_for("spoofed source drops at beta", lambda: spoofed() >= 3)
        assert a.ping(b.address, count=2)  # its own address still works
    finally:
        a.ns.run(["ip", "addr", "del", "100.64.0.99/32", "dev", DEVICE], check=False)


def test_sessions_rekey_without_losing_a_ping(tmp_path: Path) -> None:
    """With keys replaced every 5 s, a ping every 50 ms for 12 s loses nothing."""
    with Testbed("avt") as tb:
        a, b = two_nodes(tb, tmp_path, security_lines=("rekey_after_s = 5.0",))
        res = a.ns.run(["ping", "-c", "240", "-i", "0.05", "-W", "1", "-q", b.address], timeout=60)
        assert " 0% packet loss" in res.stdout, res.stdout
        st = a.status()
        assert st is not None
        (peer,) = st["peers"]
        assert peer["handshakes"] >= 2, peer
        sessions = [
            r for r in a.log_records() + b.log_records() if r["event"] == "session_established"
        ]
        assert len(sessions) >= 4  # both ends, at least twice
