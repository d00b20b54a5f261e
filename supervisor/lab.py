"""Real autovn nodes in network namespaces: for integration tests, benchmarks and the demo.

``two_nodes(testbed, tmp)`` builds two namespaces joined by a veth pair (underlay
198.18.0.1/.2), writes a config for each (virtual 100.64.0.1/.2) and starts
``supervisor start`` in each. Every wait is bounded; every process belongs to the testbed,
which ends it by pid.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.netns import Namespace, Testbed

UNDERLAY = ("198.18.0.1", "198.18.0.2")
VIRTUAL = ("100.64.0.1", "100.64.0.2")
PORT = 4789
DEVICE = "avn0"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@dataclass
class Node:
    name: str
    ns: Namespace
    config: Path
    address: str
    underlay: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return self.root / "run" / "node.log"

    def cli(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "supervisor", *args]
        return self.ns.run(argv, check=check, timeout=timeout)

    def start(self) -> None:
        out = open(self.root / "supervisor.out", "ab")  # noqa: SIM115 - closed with the process
        self.proc = self.ns.popen(
            [sys.executable, "-m", "supervisor", "start", str(self.config)], stdout=out, stderr=out
        )

    def status(self) -> dict[str, Any] | None:
        res = self.cli("status", str(self.config), "--json", check=False, timeout=10)
        if res.returncode != 0:
            return None
        parsed: dict[str, Any] = json.loads(res.stdout)
        return parsed

    def wait_running(self, timeout: float = 30.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            st = self.status()
            if st and all(w["state"] == "running" for w in st["workers"]):
                return st
            return None

        result: dict[str, Any] = wait_for(f"{self.name} running", ready, timeout)
        return result

    def wait_peers_up(self, timeout: float = 30.0) -> dict[str, Any]:
        def up() -> dict[str, Any] | None:
            st = self.status()
            if st and st["peers"] and all(p["state"] == "up" for p in st["peers"]):
                return st
            return None

        result: dict[str, Any] = wait_for(f"{self.name} peers up", up, timeout)
        return result

    def worker_pid(self, stage: str, index: int = 0) -> int:
        st = self.wait_running()
        for w in st["workers"]:
            if w["stage"] == stage and w["worker"] == index:
                return int(w["pid"])
        raise AssertionError(f"no worker {stage}:{index}")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_file.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return records

    def ping(self, target: str, count: int = 3, *, interval: float = 0.2, wait: float = 2) -> bool:
        res = self.ns.run(
            ["ping", "-c", str(count), "-i", str(interval), "-W", str(wait), target],
            check=False,
            timeout=count * (interval + wait) + 10,
        )
        return res.returncode == 0


def write_config(root: Path, name: str, me: int, peer: int, peer_name: str, **stages: int) -> Path:
    knobs = {"queues": 1, "classifier": 1, "overlay_io": 1} | stages
    text = f"""
[node]
name = "{name}"
state_dir = "{root}/state"
runtime_dir = "{root}/run"

[network]
namespace = "test"
subnet = "100.64.0.0/24"
address = "{VIRTUAL[me]}"
device = "{DEVICE}"
mtu = 1400

[overlay]
listen_address = "{UNDERLAY[me]}"
listen_port = {PORT}
keepalive_interval_s = 1.0
peer_timeout_s = 3.0

[[peers]]
name = "{peer_name}"
addresses = ["{VIRTUAL[peer]}"]
endpoint = "{UNDERLAY[peer]}:{PORT}"

[stages]
heartbeat_interval_s = 1.0
heartbeat_timeout_s = 5.0
restart_backoff_max_s = 2.0

[stages.tap_reader]
queues = {knobs["queues"]}

[stages.classifier]
workers = {knobs["classifier"]}

[stages.overlay_io]
workers = {knobs["overlay_io"]}

[log]
level = "debug"
"""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


def two_nodes(
    testbed: Testbed, tmp: Path, *, start: bool = True, **stages: int
) -> tuple[Node, Node]:
    ns_a = testbed.namespace("a")
    ns_b = testbed.namespace("b")
    testbed.link(ns_a, ns_b, f"{UNDERLAY[0]}/24", f"{UNDERLAY[1]}/24")
    nodes = []
    for me, (name, ns) in enumerate((("alpha", ns_a), ("beta", ns_b))):
        peer = 1 - me
        root = tmp / name
        config = write_config(root, name, me, peer, ("alpha", "beta")[peer], **stages)
        nodes.append(Node(name, ns, config, VIRTUAL[me], UNDERLAY[me], root))
    a, b = nodes
    if start:
        for n in (a, b):
            n.start()
        for n in (a, b):
            n.wait_running()
            n.wait_peers_up()
    return a, b
