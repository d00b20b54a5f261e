"""Real autovn nodes in network namespaces: ``Node``, their configs and their authority.

A ``Node`` is one ``supervisor start`` in a namespace of a ``Testbed``, with its config,
state and runtime directories under its own root; it answers for its status, its logs, its
waits (running, peers up, gone) and its DHCP client (:mod:`supervisor.testbed.dhclient`).
``node_config`` writes the config of a test network (the addresses below; ``mtu`` 1400,
fast keepalives and heartbeats), ``write_config`` that of one of two static peers, and
``Authority`` is a network authority made for the run. ``start_all`` and ``stop_all`` start
and stop several nodes at once. Where the nodes sit is :mod:`supervisor.testbed.layouts`.
Every wait is bounded; every process belongs to the testbed, which ends it by pid.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.crypto.cert import Certificate, issue, make_ca, to_pem
from pipeline.crypto.identity import Identity
from pipeline.crypto.keyfiles import load_or_create_identity
from supervisor.testbed.dhclient import DhcpClient, DhcpLease
from supervisor.testbed.netns import Namespace

UNDERLAY = ("198.18.0.1", "198.18.0.2")
VIRTUAL = ("100.64.0.1", "100.64.0.2")
SUBNET = "100.64.0.0/24"
PORT = 4789
DEVICE = "avn0"
DOMAIN = "vpn.test"


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


def _started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat), or None
    if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rfind(")") + 2 :].split()[19])  # after "pid (comm) ": field 3 on


_COMPILED: set[Path] = set()


def compile_tree(root: Path | None) -> None:
    """Compile the bytecode of the ``pipeline`` and ``supervisor`` packages under ``root``
    (None: the tree this process imported them from), once per process and tree.

    An installed node runs from compiled bytecode (pip compiles a copy at install,
    ``scripts/install`` an editable clone, Python itself on a first import), but with
    ``PYTHONDONTWRITEBYTECODE`` set nothing is ever written, and every interpreter of every
    node compiles every module anew (about 0.3 s of CPU a node). The test bed's nodes run as
    an installed one does; stale bytecode is never used (Python checks the source's mtime).
    """
    tree = (root or Path(__file__).resolve().parents[2]).resolve()
    if tree in _COMPILED:
        return
    _COMPILED.add(tree)
    for package in ("pipeline", "supervisor"):
        if (tree / package).is_dir():
            compileall.compile_dir(tree / package, quiet=1, workers=1)


@dataclass
class Node:
    """A node of the test bed. ``address`` is its virtual address: "" for a node configured
    without one until :meth:`dhcp` has got it a lease.

    ``source_tree``: the root of the source tree whose code the node runs (None: the code
    the working directory finds). The supervisor and every command of :meth:`cli` start as
    ``python -m supervisor`` with their working directory there, and ``-m`` puts the
    working directory first on ``sys.path``, before the finder of an editable install; the
    supervisor starts its workers as ``python -m pipeline.<stage>`` in the same directory.
    So a benchmark can run the nodes of two checkouts (one a ``git worktree`` of an older
    revision) one after the other and compare them.
    """

    name: str
    ns: Namespace
    config: Path
    address: str
    underlay: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    dhcp_client: DhcpClient | None = None
    source_tree: Path | None = None

    @property
    def log_file(self) -> Path:
        return self.root / "run" / "node.log"

    @property
    def output_file(self) -> Path:
        """Where the supervisor's stdout and stderr go (appended to at every start)."""
        return self.root / "supervisor.out"

    def cli(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "supervisor", *args]
        compile_tree(self.source_tree)
        return self.ns.run(argv, check=check, timeout=timeout, cwd=self.source_tree)

    def start(self) -> None:
        compile_tree(self.source_tree)
        with open(self.output_file, "ab") as out:  # the child keeps its own copy
            self.proc = self.ns.popen(
                [sys.executable, "-m", "supervisor", "start", str(self.config)],
                stdout=out,
                stderr=out,
                cwd=self.source_tree,
            )

    def status(self) -> dict[str, Any] | None:
        """``status --json``, or None if the node does not answer (or the CLI itself, on a
        machine loaded enough that its interpreter takes 10 s to start: the callers wait
        and ask again until their own deadline)."""
        try:
            res = self.cli("status", str(self.config), "--json", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return None
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

    def pids(self) -> tuple[int, list[int]]:
        """The supervisor's pid and every worker's, from ``status --json``."""
        st = wait_for(f"{self.name} status", self.status, timeout=15)
        workers = [int(w["pid"]) for w in st["workers"] if w.get("pid")]
        return int(st["supervisor_pid"]), workers

    def processes(self) -> list[tuple[int, int]]:
        """(pid, start time) of the supervisor and each worker: what :meth:`wait_gone`
        waits for (the start time tells a reused pid apart)."""
        sup, workers = self.pids()
        return [(pid, t) for pid in (sup, *workers) if (t := _started(pid)) is not None]

    def wait_gone(self, processes: Sequence[tuple[int, int]], timeout: float = 20.0) -> None:
        """Wait until the supervisor has exited, ``processes`` (from :meth:`processes`, taken
        before the stop) are gone, and the TAP device and the UDP port no longer exist in the
        namespace: the next node can start there."""
        ns = self.ns

        def exited() -> bool:
            return self.proc is None or self.proc.poll() is not None

        def processes_gone() -> bool:
            return all(_started(pid) != start for pid, start in processes)

        def device_gone() -> bool:
            return ns.run(["ip", "link", "show", "dev", DEVICE], check=False).returncode != 0

        def port_free() -> bool:
            return not ns.run(["ss", "-Huln", f"sport = :{PORT}"], check=False).stdout.strip()

        wait_for(f"{self.name} supervisor exit", exited, timeout=timeout)
        wait_for(f"{self.name} processes gone", processes_gone, timeout=timeout)
        wait_for(f"{self.name} {DEVICE} gone", device_gone, timeout=timeout)
        wait_for(f"{self.name} UDP port {PORT} free", port_free, timeout=timeout)

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

    def dhcp(
        self, hostname: str | None = None, *, wait: bool = True, timeout: float = 30.0
    ) -> DhcpLease | None:
        """Start a DHCP client (:class:`DhcpClient`, kept in ``dhcp_client``) on the node's
        TAP, sending ``hostname`` (default: the node's name; fixed when the client is first
        made); with ``wait``, until it holds a lease, whose address becomes ``address``.
        Without ``wait``, :meth:`wait_dhcp` finishes the job (to start several at once)."""
        if self.dhcp_client is None:
            self.dhcp_client = DhcpClient(
                self.ns, DEVICE, self.root / "dhcp", hostname or self.name
            )
        self.dhcp_client.start(wait=False)
        return self.wait_dhcp(timeout) if wait else None

    def wait_dhcp(self, timeout: float = 30.0) -> DhcpLease:
        """Wait until the DHCP client holds a lease; its address becomes ``address``."""
        if self.dhcp_client is None:
            raise RuntimeError(f"{self.name}: no DHCP client started")
        lease = self.dhcp_client.wait_bound(timeout)
        self.address = lease.address
        return lease


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
    virtual: str | None,
    ca: Path | None,
    peers: str = "",
    bootstrap: tuple[str, ...] = (),
    revocation_list: Path | None = None,
    stages: dict[str, int] | None = None,
    security_lines: tuple[str, ...] = (),
    domain: str | None = None,
    network_lines: tuple[str, ...] = (),
    nat_lines: tuple[str, ...] = (),
) -> Path:
    """Write a node's config (``root/<name>.toml``); ``ca`` None means
    ``insecure_plaintext`` (benchmarks of the pipeline). ``peers`` is TOML for static peers.
    ``virtual`` None leaves ``network.address`` out: the node answers DHCP on its TAP.
    ``domain`` sets ``network.domain`` (the DNS domain of its names); ``nat_lines`` go in
    its ``[nat]`` section."""
    knobs = {"queues": 1, "classifier": 1, "overlay_io": 1} | (stages or {})
    if ca is None:
        security = "insecure_plaintext = true"
    else:
        security = f'ca_certificate = "{ca}"'
        if revocation_list is not None:
            security += f'\nrevocation_list = "{revocation_list}"'
    security = "\n".join([security, *security_lines])
    seeds = ", ".join(f'"{b}:{PORT}"' for b in bootstrap)
    network = [f'address = "{virtual}"'] if virtual is not None else []
    network += [f'domain = "{domain}"'] if domain is not None else []
    network += list(network_lines)
    network_text = "\n".join(network)
    # no [nat] table unless asked: a revision from before NAT traversal (a bench's
    # --baseline) rejects the key
    nat_text = "\n".join(["[nat]", *nat_lines]) if nat_lines else ""
    text = f"""
[node]
name = "{name}"
state_dir = "{root}/state"
runtime_dir = "{root}/run"

[network]
namespace = "test"
subnet = "{SUBNET}"
{network_text}
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
heartbeat_interval_s = 2.0
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

{nat_text}
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


def start_all(nodes: Sequence[Node], *, peers_up: bool = False) -> None:
    """Start every node, then wait until each one's workers all run (and, with ``peers_up``,
    its static peers are up)."""
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_running()
        if peers_up:
            n.wait_peers_up()


def stop_all(nodes: Sequence[Node]) -> None:
    """``supervisor stop`` each node, then wait until each is gone (:meth:`Node.wait_gone`),
    so that the next nodes start in clean namespaces."""
    running = [n.processes() for n in nodes]
    for n in nodes:
        res = n.cli("stop", str(n.config), check=False, timeout=40)
        if res.returncode != 0:
            raise RuntimeError(f"supervisor stop {n.name}: rc {res.returncode}: {res.stderr}")
    for n, processes in zip(nodes, running, strict=True):
        n.wait_gone(processes)


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """systemd's end of the notify protocol, for ``$NOTIFY_SOCKET``: a unix datagram socket
    bound to a path (an abstract name would be per network namespace; a path is seen from a
    node's namespace as well), and the path."""
    directory = tempfile.mkdtemp(prefix="avnotify")
    path = f"{directory}/notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        Path(path).unlink(missing_ok=True)
        Path(directory).rmdir()


def notify_datagrams(sock: socket.socket, until: float) -> Iterator[tuple[float, dict[str, str]]]:
    """Each notify datagram until the monotonic time ``until``: when it came, its fields."""
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        yield time.monotonic(), fields
