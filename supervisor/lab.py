"""Real autovn nodes in network namespaces: for integration tests, benchmarks and the demo.

``two_nodes(testbed, tmp)`` builds two namespaces joined by a veth pair (underlay
198.18.0.1/.2), writes a config for each (virtual 100.64.0.1/.2) and starts
``supervisor start`` in each. ``overlay_nodes`` puts nodes on one bridged segment,
``routed_nodes`` on several segments joined by a router namespace, with no static virtual
address: ``Node.dhcp`` then runs a real DHCP client (ISC ``dhclient``, see ``DhcpClient``)
on the node's TAP. Every wait is bounded; every process belongs to the testbed, which ends
it by pid.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.crypto.cert import Certificate, issue, make_ca, to_pem
from pipeline.crypto.identity import Identity
from pipeline.crypto.keyfiles import load_or_create_identity
from supervisor.netns import Namespace, NetnsError, Testbed

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


@dataclass
class Node:
    """A node of the lab. ``address`` is its virtual address: "" for a node configured
    without one until :meth:`dhcp` has got it a lease."""

    name: str
    ns: Namespace
    config: Path
    address: str
    underlay: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    dhcp_client: DhcpClient | None = None

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
) -> Path:
    """Write a node's config (``root/<name>.toml``); ``ca`` None means
    ``insecure_plaintext`` (benchmarks of the pipeline). ``peers`` is TOML for static peers.
    ``virtual`` None leaves ``network.address`` out: the node answers DHCP on its TAP.
    ``domain`` sets ``network.domain`` (the DNS domain of its names)."""
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


def _member(
    ns: Namespace,
    tmp: Path,
    authority: Authority,
    name: str,
    underlay: str,
    virtual: str | None,
    *,
    first: bool,
    stages: dict[str, int],
    domain: str | None = None,
) -> Node:
    """A node certified by ``authority`` that knows only 198.18.0.1 (the first node's
    underlay address; the first knows none: it founds the overlay)."""
    root = tmp / name
    cert = authority.certify(root / "state", name)
    config = node_config(
        root,
        name,
        underlay=underlay,
        virtual=virtual,
        ca=authority.path,
        bootstrap=() if first else ("198.18.0.1",),
        stages=stages,
        domain=domain,
    )
    node = Node(name, ns, config, virtual or "", underlay, root)
    node.extra["authority"] = authority
    node.extra["node_id"] = cert.node_id.hex()
    return node


def start_all(nodes: Sequence[Node]) -> None:
    """Start every node, then wait until each one's workers all run."""
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_running()


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
        nodes.append(
            _member(ns, tmp, authority, name, underlay, virtual, first=i == 0, stages=stages)
        )
    if start:
        start_all(nodes)
    return nodes


def routed_nodes(
    testbed: Testbed,
    tmp: Path,
    sizes: Sequence[int] = (3, 2),
    *,
    start: bool = True,
    domain: str = DOMAIN,
    **stages: int,
) -> list[Node]:
    """Nodes on ``len(sizes)`` segments joined by a router, configured without a virtual
    address (each gets one with :meth:`Node.dhcp`), in DNS domain ``domain``.

    Segment k is a bridge ``brk`` in namespace ``segk`` with underlay 198.18.k.0/24; the
    router (namespace ``rt``, forwarding on inside it only) is 198.18.k.254 on each, and
    every node routes the other segments through it. Nodes are n1, n2, ... in segment
    order, ``sizes[k]`` of them on segment k at 198.18.k.1, .2, ... (``extra["segment"]``
    says which); all are certified by one authority and know only the first node's address.
    """
    if not 1 <= len(sizes) <= 16 or not all(1 <= n <= 200 for n in sizes):
        raise ValueError(f"sizes {tuple(sizes)}: 1 to 16 segments of 1 to 200 nodes")
    authority = Authority.create(tmp / "authority")
    router = testbed.namespace("rt")
    router.sysctl("net.ipv4.ip_forward", "1")
    nodes: list[Node] = []
    for k, size in enumerate(sizes):
        hub = testbed.namespace(f"seg{k}")
        bridge = testbed.bridge(hub, f"br{k}")
        testbed.attach(router, hub, bridge, f"198.18.{k}.254/24", ifname=f"seg{k}")
        for i in range(size):
            name = f"n{len(nodes) + 1}"
            ns = testbed.namespace(name)
            underlay = f"198.18.{k}.{i + 1}"
            testbed.attach(ns, hub, bridge, f"{underlay}/24", ifname="eth0")
            for other in range(len(sizes)):
                if other != k:
                    ns.ip("route", "add", f"198.18.{other}.0/24", "via", f"198.18.{k}.254")
            node = _member(
                ns, tmp, authority, name, underlay, None,
                first=not nodes, stages=stages, domain=domain,
            )  # fmt: skip
            node.extra["segment"] = k
            nodes.append(node)
    if start:
        start_all(nodes)
    return nodes


@dataclass
class Machine:
    """A machine behind a router-mode node: a namespace on the segment, with a DHCP client."""

    name: str
    ns: Namespace
    dhcp: DhcpClient
    address: str = ""


def router_segment(
    testbed: Testbed,
    tmp: Path,
    machines: int = 3,
    *,
    dhcp_port: int = 1067,
    allowed: tuple[int, ...] | None = None,
    allow_static: bool = False,
    start: bool = True,
) -> tuple[Node, Node, list[Machine]]:
    """A router-mode node ``gw`` whose TAP is a port of the bridge ``br0`` of its namespace,
    ``machines`` machine namespaces (m1, ...) on veths into that bridge, each with a DHCP
    client pointed at ``dhcp_port``, and a remote node ``far`` in interface mode (DHCP on its
    own TAP) across the underlay (198.18.0.1 far, 198.18.0.2 gw). ``allowed``: the machines
    (1-based) in the router's ``allowed_macs`` (None: no list)."""
    authority = Authority.create(tmp / "authority")
    far_ns, gw_ns = testbed.namespace("far"), testbed.namespace("gw")
    testbed.link(far_ns, gw_ns, "198.18.0.1/24", "198.18.0.2/24")
    bridge = testbed.bridge(gw_ns, "br0")
    segment = []
    for i in range(machines):
        ns = testbed.namespace(f"m{i + 1}")
        testbed.attach(ns, gw_ns, bridge, None, ifname="eth0")
        mac = f"02:00:5e:10:00:{i + 1:02x}"
        ns.ip("link", "set", "dev", "eth0", "address", mac)
        client = DhcpClient(ns, "eth0", tmp / f"m{i + 1}", f"m{i + 1}", server_port=dhcp_port)
        segment.append(Machine(f"m{i + 1}", ns, client))
    lines = ['mode = "router"', f'bridge = "{bridge}"', f"dhcp_port = {dhcp_port}"]
    if allow_static:
        lines.append("allow_static = true")
    if allowed is not None:
        macs = ", ".join(f'"02:00:5e:10:00:{i:02x}"' for i in allowed)
        lines.append(f"allowed_macs = [{macs}]")
    far = _member(far_ns, tmp, authority, "far", "198.18.0.1", None, first=True, stages={},
                  domain=DOMAIN)  # fmt: skip
    root = tmp / "gw"
    cert = authority.certify(root / "state", "gw")
    config = node_config(root, "gw", underlay="198.18.0.2", virtual=None, ca=authority.path,
                         bootstrap=("198.18.0.1",), domain=DOMAIN,
                         network_lines=tuple(lines))  # fmt: skip
    gw = Node("gw", gw_ns, config, "", "198.18.0.2", root)
    gw.extra["node_id"] = cert.node_id.hex()
    if start:
        start_all([far, gw])
    return gw, far, segment


# ----------------------------------------------------------------------------------------------
# a real DHCP client on a node's TAP

DHCLIENT_SCRIPT = "/sbin/dhclient-script"
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$")
#: Names in a namespace with a DHCP client resolve through its own resolv.conf only: no
#: NSS module of the machine's (systemd-resolved, mDNS, ...) sees them or asks outside.
NSSWITCH = "hosts: files dns\n"


class DhcpError(RuntimeError):
    """The DHCP client could not start, or got no lease in time (the message has its log)."""


@dataclass(frozen=True)
class DhcpLease:
    """One lease of a dhclient lease file. Times are seconds (the options the server sent);
    ``renew``, ``rebind`` and ``expire`` are dhclient's own words ("4 2026/11/26 15:00:00",
    UTC). ``options`` has every option as written, unquoted."""

    interface: str
    address: str
    subnet_mask: str | None
    routers: tuple[str, ...]
    dns_servers: tuple[str, ...]
    domain: str | None
    mtu: int | None
    lease_time: int | None
    renewal_time: int | None
    rebinding_time: int | None
    host_name: str | None
    server: str | None
    renew: str | None
    rebind: str | None
    expire: str | None
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def prefixlen(self) -> int | None:
        if self.subnet_mask is None:
            return None
        return ipaddress.IPv4Network(f"0.0.0.0/{self.subnet_mask}").prefixlen

    @property
    def cidr(self) -> str:
        """The address with its prefix length, "100.64.0.7/24" (the address alone if the
        lease has no subnet mask)."""
        plen = self.prefixlen
        return self.address if plen is None else f"{self.address}/{plen}"


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
        value = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)
        value = re.sub(r"\\(.)", r"\1", value)
    return value


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def parse_leases(text: str) -> list[DhcpLease]:
    """The ``lease { ... }`` blocks of a dhclient lease file, oldest first (the last is
    the current one); blocks without a ``fixed-address`` are skipped."""
    leases = []
    for block in re.findall(r"^lease \{\n(.*?)^\}", text, re.M | re.S):
        fields: dict[str, str] = {}
        options: dict[str, str] = {}
        for raw in block.splitlines():
            line = raw.strip().removesuffix(";")
            if line.startswith("option "):
                name, _, value = line[len("option ") :].partition(" ")
                options[name] = _unquote(value)
            elif line:
                key, _, value = line.partition(" ")
                fields[key] = _unquote(value)
        if "fixed-address" not in fields:
            continue

        def listed(name: str, opts: dict[str, str] = options) -> tuple[str, ...]:
            return tuple(a.strip() for a in opts.get(name, "").split(",") if a.strip())

        leases.append(
            DhcpLease(
                interface=fields.get("interface", ""),
                address=fields["fixed-address"],
                subnet_mask=options.get("subnet-mask"),
                routers=listed("routers"),
                dns_servers=listed("domain-name-servers"),
                domain=options.get("domain-name"),
                mtu=_int(options.get("interface-mtu")),
                lease_time=_int(options.get("dhcp-lease-time")),
                renewal_time=_int(options.get("dhcp-renewal-time")),
                rebinding_time=_int(options.get("dhcp-rebinding-time")),
                host_name=options.get("host-name"),
                server=options.get("dhcp-server-identifier"),
                renew=fields.get("renew"),
                rebind=fields.get("rebind"),
                expire=fields.get("expire"),
                options=options,
            )
        )
    return leases


# The -sf script runs Debian's dhclient-script, with three guards. (1) It never sets a host
# name: the one the server echoes (option 12) is dropped before the script sees it (and
# dhclient runs in a UTS namespace of its own besides, see _LAUNCH). (2) The script's
# make_resolv_conf writes a temporary file beside `readlink -f /etc/resolv.conf`, then copies
# it over that file: a `readlink` shim first in PATH answers with a symlink in the client's
# own directory that points at the namespace's resolv.conf, so the temporary file is ours
# and the copy lands in the namespace's file, never in /etc. (3) Should /etc/resolv.conf
# here not be the namespace's own file (the bind mount of `ip netns exec`), the DNS options
# are dropped: nothing writes resolv.conf at all.
_SCRIPT = """#!/bin/sh
# dhclient-script for {hostname} on {device} in network namespace {ns}, by supervisor.lab
unset new_host_name old_host_name
own={own}
seen=$(stat -L -c %d:%i /etc/resolv.conf 2>/dev/null)
if [ -z "$seen" ] || [ "$seen" != "$(stat -L -c %d:%i "$own" 2>/dev/null)" ]; then
    echo "autovn lab: /etc/resolv.conf here is not $own: not writing it" >&2
    unset new_domain_name new_domain_search new_domain_name_servers
    unset new_dhcp6_domain_search new_dhcp6_name_servers
fi
PATH={shims}:$PATH
export PATH
exec /bin/sh {script} "$@"
"""

# `readlink -f /etc/resolv.conf` -> the client's symlink to the namespace's resolv.conf.
_READLINK = """#!/bin/sh
if [ "$*" = "-f /etc/resolv.conf" ]; then
    echo {link}
    exit 0
fi
exec {readlink} "$@"
"""

# Started through `ip netns exec` (the namespace's /etc files bound), then `unshare`: a UTS
# namespace (a host name set here stays here) and a private mount namespace, where the
# machine's /etc/dhcp (hooks that talk to systemd-resolved, resolvconf, timesyncd, ...) is
# replaced by an empty directory.
_LAUNCH = (
    'hostname "$1" && if [ -d /etc/dhcp ]; then mount --bind "$2" /etc/dhcp; fi '
    '&& shift 2 && exec "$@"'
)


def _apparmor_confines(binary: str) -> bool:
    """True if AppArmor enforces a profile for ``binary`` (Debian/Ubuntu ship one for
    dhclient that allows only its usual file paths, not ours)."""
    try:
        with open("/sys/kernel/security/apparmor/profiles") as f:
            profiles = f.read()
    except OSError:
        return False
    return any(
        "dhclient" in line and "(enforce)" in line and os.path.basename(binary) in line
        for line in profiles.splitlines()
    )


class DhcpClient:
    """ISC ``dhclient`` on ``device`` in ``ns``, sending host name ``hostname``.

    Its own config (``-cf``), lease (``-lf``) and pid (``-pf``) files and its script
    (``-sf``) live in ``root``; it runs in the foreground as a process of the namespace's
    testbed, so the testbed ends it (by pid) on teardown. It writes the namespace's own
    resolv.conf (:meth:`Namespace.resolv_conf`, made empty if there is none) and sets the
    namespace's nsswitch.conf to ``hosts: files dns``. Nothing it does can set the
    machine's host name, write the machine's resolv.conf or run the machine's dhclient
    hooks (see ``_SCRIPT`` and ``_LAUNCH``).
    """

    def __init__(
        self, ns: Namespace, device: str, root: Path, hostname: str, *, server_port: int = 67
    ) -> None:
        if not 1 <= server_port <= 65534:
            raise ValueError(f"bad server port {server_port}")
        if not _HOSTNAME_RE.match(hostname):
            raise ValueError(f"bad host name {hostname!r}: one DNS label")
        if not _DEVICE_RE.match(device):
            raise ValueError(f"bad device name {device!r}")
        self.ns = ns
        self.device = device
        self.root = root
        self.hostname = hostname
        self.server_port = server_port  # the client's own port is this + 1 (dhclient -p)
        self.config_file = root / f"dhclient-{device}.conf"
        self.lease_file = root / f"dhclient-{device}.leases"
        self.pid_file = root / f"dhclient-{device}.pid"
        self.script = root / "dhclient-script"
        #: the symlink to the namespace's resolv.conf that dhclient-script writes through
        self.resolv_link = root / "resolv.conf"
        self._shims = root / "bin"
        self.log_file = root / f"dhclient-{device}.log"
        self._no_hooks = root / "no-hooks"
        #: what the -sf script runs once it has taken out what must not be applied
        self.dhclient_script = DHCLIENT_SCRIPT
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0  # wall clock of the last start (lease files keep older leases)

    def __repr__(self) -> str:
        return f"DhcpClient({self.hostname!r} on {self.device} in {self.ns.name})"

    # -- files and command lines ---------------------------------------------------------------

    def _dhclient(self) -> str:
        found = shutil.which("dhclient") or shutil.which("dhclient", path="/usr/sbin:/sbin")
        if found is None:
            raise DhcpError("dhclient not found (Debian package isc-dhcp-client)")
        return found

    def _argv(self, *options: str) -> list[str]:
        unshare = shutil.which("unshare") or "unshare"
        return [
            unshare, "--uts", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", _LAUNCH, "sh", self.hostname, str(self._no_hooks),
            self._dhclient(), "-4", "-p", str(self.server_port + 1), *options,
            "-cf", str(self.config_file), "-lf", str(self.lease_file),
            "-pf", str(self.pid_file), "-sf", str(self.script), self.device,
        ]  # fmt: skip

    def write_files(self) -> None:
        """Write the config file and the -sf script (``start`` and ``release`` do it)."""
        if not os.path.isfile(self.dhclient_script):
            raise DhcpError(f"{self.dhclient_script} not found (package isc-dhcp-client)")
        if _apparmor_confines(self._dhclient()):
            raise DhcpError(
                "AppArmor enforces its dhclient profile here, which allows only dhclient's "
                "usual files: set it to complain mode (aa-complain) to run the lab's client"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._no_hooks.mkdir(exist_ok=True)
        self.config_file.write_text(
            f"# dhclient for {self.hostname} on {self.device} in {self.ns.name} (supervisor.lab)\n"
            f'send host-name "{self.hostname}";\n'
            "request subnet-mask, broadcast-address, routers, domain-name,\n"
            "    domain-name-servers, domain-search, host-name, interface-mtu;\n"
            "timeout 60;\nretry 1;\nreboot 2;\ninitial-interval 1;\nbackoff-cutoff 2;\n"
        )
        own = os.path.join(self.ns.etc_dir, "resolv.conf")
        if self.resolv_link.is_symlink() or self.resolv_link.exists():
            self.resolv_link.unlink()
        self.resolv_link.symlink_to(own)
        self._shims.mkdir(exist_ok=True)
        readlink = shutil.which("readlink", path="/usr/bin:/bin") or "/usr/bin/readlink"
        shim = self._shims / "readlink"
        shim.write_text(
            _READLINK.format(link=shlex.quote(str(self.resolv_link)), readlink=readlink)
        )
        self.script.write_text(
            _SCRIPT.format(
                hostname=self.hostname,
                device=self.device,
                ns=self.ns.name,
                own=shlex.quote(own),
                shims=shlex.quote(str(self._shims)),
                script=shlex.quote(self.dhclient_script),
            )
        )
        for path in (shim, self.script):
            path.chmod(0o755)

    def _own_resolv_conf(self) -> None:
        """Make sure the namespace has its own resolv.conf and that it is what a process
        there sees as /etc/resolv.conf (NetnsError otherwise)."""
        own = os.path.join(self.ns.etc_dir, "resolv.conf")
        if not os.path.isfile(own):
            self.ns.resolv_conf("")
        if os.path.isfile("/etc/nsswitch.conf"):
            self.ns.etc_file("nsswitch.conf", NSSWITCH)
        st = os.stat(own)
        seen = self.ns.run(["stat", "-L", "-c", "%d:%i", "/etc/resolv.conf"], check=False)
        if seen.stdout.strip() != f"{st.st_dev}:{st.st_ino}":
            raise NetnsError(
                f"/etc/resolv.conf in {self.ns.name} is not its own {own} "
                f"({seen.stdout.strip() or seen.stderr.strip()}): not starting dhclient"
            )

    # -- running -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> DhcpLease | None:
        """Start dhclient; with ``wait``, until the device has the lease's address
        (:meth:`wait_bound`). The TAP must exist (the node running)."""
        if self.running:
            raise DhcpError(f"{self!r} is running already")
        self.write_files()
        self._own_resolv_conf()
        self._started = time.time()
        with open(self.log_file, "ab") as out:  # the child keeps its own copy
            self.proc = self.ns.popen(self._argv("-d"), stdout=out, stderr=out)
        return self.wait_bound(timeout) if wait else None

    def address(self) -> str | None:
        """The device's IPv4 address ("100.64.0.7/24"), or None."""
        addrs = [a for a in self.ns.addresses(self.device) if ":" not in a]
        return addrs[0] if addrs else None

    def lease(self) -> DhcpLease | None:
        """The current lease (the last in the lease file), or None."""
        try:
            leases = parse_leases(self.lease_file.read_text())
        except FileNotFoundError:
            return None
        return leases[-1] if leases else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _written_since_start(self) -> bool:
        try:
            return self.lease_file.stat().st_mtime >= self._started - 0.05  # coarse mtime
        except FileNotFoundError:
            return False

    def _pid_written(self) -> bool:
        """dhclient writes its pid file just after its first lease is bound; ``release``
        (dhclient -r) needs it."""
        try:
            return self.proc is not None and self.pid_file.read_text().strip() == str(self.proc.pid)
        except FileNotFoundError:
            return False

    def wait_bound(self, timeout: float = 30.0) -> DhcpLease:
        """Wait (at most ``timeout``) until the device has the address of a lease written
        since the client started, and the client its pid file; DhcpError with the client's
        log if it does not, or if the client exits."""
        deadline = time.monotonic() + timeout
        while True:
            lease, addr = self.lease(), self.address()
            if (
                lease is not None
                and addr is not None
                and addr.split("/")[0] == lease.address
                and self._written_since_start()
                and self._pid_written()
            ):
                return lease
            if not self.running:
                raise DhcpError(f"{self!r} is not running:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DhcpError(f"{self!r}: no lease after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def release(self, timeout: float = 15.0) -> None:
        """Give the lease back: ``dhclient -r`` with the same files, which stops the running
        client (by the pid file), sends a DHCPRELEASE and removes the address."""
        self.write_files()
        self.ns.run(self._argv("-r"), timeout=timeout)
        self.stop()

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the client by pid (SIGTERM, then SIGKILL), keeping the lease; its exit
        code, or None if it was not started."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        return self.ns.testbed.stop(proc, timeout)
