"""Real autovn nodes in network namespaces: for integration tests, benchmarks and the demo.

``two_nodes(testbed, tmp)`` builds two namespaces joined by a veth pair (underlay
198.18.0.1/.2), writes a config for each (virtual 100.64.0.1/.2) and starts
``supervisor start`` in each. Every wait is bounded; every process belongs to the testbed,
which ends it by pid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.crypto.cert import Certificate, issue, make_ca, to_pem
from pipeline.crypto.identity import Identity
from pipeline.crypto.keyfiles import load_or_create_identity
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
        with open(self.root / "supervisor.out", "ab") as out:  # the child keeps its own copy
            self.proc = self.ns.popen(
                [sys.executable, "-m", "supervisor", "start", str(self.config)],
                stdout=out,
                stderr=out,
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


@dataclass(frozen=True)
class Authority:
    """A network authority made for a test network: its key, certificate and file."""

    identity: Identity
    certificate: Certificate
    path: Path

    @classmethod
    def create(cls, directory: Path, name: str = "lab-authority") -> Authority:
        directory.mkdir(parents=True, exist_ok=True)
        ident = Identity.from_seed(os.urandom(32))
        now = int(time.time())
        cert = make_ca(
            ident,
            name=name,
            not_before=now - 300,
            not_after=now + 30 * 86400,
            serial=int.from_bytes(os.urandom(7), "big"),
        )
        path = directory / "ca.crt"
        path.write_text(to_pem(cert))
        return cls(ident, cert, path)

    def certify(
        self,
        state_dir: Path,
        name: str,
        *,
        networks: tuple[str, ...] = ("test",),
        not_after: int | None = None,
        out: Path | None = None,
    ) -> Certificate:
        """Create the node's key in ``state_dir`` if needed and write its certificate."""
        node = load_or_create_identity(state_dir)
        now = int(time.time())
        cert = issue(
            self.identity,
            self.certificate,
            public_key=node.public_key,
            name=name,
            networks=list(networks),
            not_before=now - 300,
            not_after=not_after if not_after is not None else now + 86400,
            serial=int.from_bytes(os.urandom(7), "big"),
        )
        (out or state_dir / "node.crt").write_text(to_pem(cert))
        return cert


def node_config(
    root: Path,
    name: str,
    *,
    underlay: str,
    virtual: str,
    ca: Path | None,
    peers: str = "",
    bootstrap: tuple[str, ...] = (),
    revocation_list: Path | None = None,
    stages: dict[str, int] | None = None,
    security_lines: tuple[str, ...] = (),
) -> Path:
    """Write a node's config (``root/<name>.toml``); ``ca`` None means
    ``insecure_plaintext`` (benchmarks of the pipeline). ``peers`` is TOML for static peers."""
    knobs = {"queues": 1, "classifier": 1, "overlay_io": 1} | (stages or {})
    if ca is None:
        security = "insecure_plaintext = true"
    else:
        security = f'ca_certificate = "{ca}"'
        if revocation_list is not None:
            security += f'\nrevocation_list = "{revocation_list}"'
    security = "\n".join([security, *security_lines])
    seeds = ", ".join(f'"{b}:{PORT}"' for b in bootstrap)
    text = f"""
[node]
name = "{name}"
state_dir = "{root}/state"
runtime_dir = "{root}/run"

[network]
namespace = "test"
subnet = "100.64.0.0/24"
address = "{virtual}"
device = "{DEVICE}"
mtu = 1400

[overlay]
listen_address = "{underlay}"
listen_port = {PORT}
keepalive_interval_s = 1.0
peer_timeout_s = 3.0
bootstrap = [{seeds}]

[security]
{security}
{peers}
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


def write_config(
    root: Path,
    name: str,
    me: int,
    peer: int,
    peer_name: str,
    *,
    ca: Path | None,
    peer_key: str | None = None,
    revocation_list: Path | None = None,
    stages: dict[str, int] | None = None,
    security_lines: tuple[str, ...] = (),
) -> Path:
    """A config for one of two nodes that name each other as static peers."""
    key_line = f'public_key = "{peer_key}"' if peer_key else ""
    peers = f"""
[[peers]]
name = "{peer_name}"
addresses = ["{VIRTUAL[peer]}"]
endpoint = "{UNDERLAY[peer]}:{PORT}"
{key_line}
"""
    return node_config(
        root,
        name,
        underlay=UNDERLAY[me],
        virtual=VIRTUAL[me],
        ca=ca,
        peers=peers,
        revocation_list=revocation_list,
        stages=stages,
        security_lines=security_lines,
    )


def two_nodes(
    testbed: Testbed,
    tmp: Path,
    *,
    start: bool = True,
    secure: bool = True,
    peer_keys: bool = True,
    security_lines: tuple[str, ...] = (),
    **stages: int,
) -> tuple[Node, Node]:
    """Two nodes on a veth pair, certified by a fresh authority (``secure``; with
    ``peer_keys`` each names the other's public key, so the handshake is Noise IK, else XX),
    or in plaintext for measuring the pipeline alone."""
    ns_a = testbed.namespace("a")
    ns_b = testbed.namespace("b")
    testbed.link(ns_a, ns_b, f"{UNDERLAY[0]}/24", f"{UNDERLAY[1]}/24")
    names = ("alpha", "beta")
    authority = Authority.create(tmp / "authority") if secure else None
    keys: list[str | None] = [None, None]
    if authority is not None:
        for me, name in enumerate(names):
            keys[me] = authority.certify(tmp / name / "state", name).public_key.hex()
    nodes = []
    for me, (name, ns) in enumerate(zip(names, (ns_a, ns_b), strict=True)):
        peer = 1 - me
        root = tmp / name
        config = write_config(
            root,
            name,
            me,
            peer,
            names[peer],
            ca=authority.path if authority else None,
            peer_key=keys[peer] if peer_keys else None,
            stages=stages,
            security_lines=security_lines,
        )
        node = Node(name, ns, config, VIRTUAL[me], UNDERLAY[me], root)
        node.extra["authority"] = authority
        nodes.append(node)
    a, b = nodes
    if start:
        for n in (a, b):
            n.start()
        for n in (a, b):
            n.wait_running()
            n.wait_peers_up()
    return a, b


def overlay_nodes(
    testbed: Testbed, tmp: Path, count: int, *, start: bool = True, **stages: int
) -> list[Node]:
    """``count`` nodes on one bridged segment (underlay 198.18.0.1.., virtual 100.64.0.1..),
    certified by one authority, with no static peers: each knows only the first node's
    address (the first knows none: it founds the overlay)."""
    hub = testbed.namespace("seg")
    bridge = testbed.bridge(hub, "br0")
    authority = Authority.create(tmp / "authority")
    nodes = []
    for i in range(count):
        name = f"n{i + 1}"
        ns = testbed.namespace(name)
        underlay, virtual = f"198.18.0.{i + 1}", f"100.64.0.{i + 1}"
        testbed.attach(ns, hub, bridge, f"{underlay}/24")
        root = tmp / name
        cert = authority.certify(root / "state", name)
        config = node_config(
            root,
            name,
            underlay=underlay,
            virtual=virtual,
            ca=authority.path,
            bootstrap=() if i == 0 else ("198.18.0.1",),
            stages=stages,
        )
        node = Node(name, ns, config, virtual, underlay, root)
        node.extra["authority"] = authority
        node.extra["node_id"] = cert.node_id.hex()
        nodes.append(node)
    if start:
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_running()
    return nodes
