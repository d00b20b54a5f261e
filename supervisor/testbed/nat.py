"""The NAT laboratory: gateways of chosen kinds between an "internet" and LANs, in namespaces.

Built on a :class:`~supervisor.testbed.netns.Testbed` (so every namespace and process goes
when it closes, also on failure or a signal)::

    with Testbed("avnat") as tb, NatLab(tb, tmp) as lab:
        home = lab.gateway("eim")                 # a Site: gateway namespace + LAN
        a = home.host("a")                        # a LAN host: a Namespace
        pub = lab.internet_host("pub")            # a host on the internet segment
        lab.address(a), lab.address(pub)          # "198.19.1.10", "198.18.90.100"
        lab.stun_servers                          # [("198.18.90.3", 3478), ("198.18.90.5", 3478)]
        sock = netns_socket(a)                    # a UDP socket living in namespace a
        home.conntrack(), home.counters()         # what the gateway's netfilter holds

Layout (all underlay addresses from 198.18.0.0/15):

- the internet: bridge ``inet`` in namespace ``inet``, 198.18.90.0/24; STUN servers on it
  (``stund`` at .3 and .4, the two addresses it needs; ``coturn`` at .5), internet hosts
  from .100, gateways' WAN ends from .11;
- site n (n = 1, 2, ...): gateway namespace ``gw<n>`` with ``wan`` (198.18.90.(10+n)) and
  a bridge ``lan`` (198.19.n.1/24); its hosts ``gw<n>-<label>`` have ``eth0`` on that bridge
  (198.19.n.10, .11, ...) and a default route through the gateway. Two hosts of one site
  share a LAN.

Gateway kinds (:class:`NatKind`; the rules are :func:`gateway_ruleset`, one nft table
``inet filter`` with the names miniupnpd 2.3.1 expects):

- ``none``: a plain router: no NAT, no filter; every internet node gets a route to its LAN;
- ``eim``: a home router: ``masquerade`` (Linux keeps the source port when it is free, and
  one LAN endpoint keeps its mapping for every destination: endpoint-independent mapping),
  forward only LAN-initiated flows, and WAN input dropped unless it belongs to a known flow;
- ``eim_open``: the same, but the gateway accepts unsolicited WAN input: a packet from a
  peer that punches early becomes an ``[UNREPLIED]`` conntrack entry on the gateway's own
  address, and the LAN host's later flow to that peer clashes with it and is given another
  port (the usual failure of simultaneous open through Linux);
- ``random``: ``masquerade fully-random``: a new random port per destination (symmetric);
- ``upnp``: ``eim`` plus miniupnpd (nftables flavour) on the LAN serving NAT-PMP and PCP
  (UDP 5351) and UPnP IGD; its WAN address lies in a reserved range, so it checks it with
  STUN against the lab's stund (``ext_perform_stun``), for which the gateway's input also
  accepts UDP from stund's addresses and ports.

Processes (STUN servers, miniupnpd) are the testbed's, started with ``Namespace.popen``
and stopped by pid; their files live in the lab's work directory. Programs come from the
Debian packages in :data:`NAT_LAB_PACKAGES`.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pipeline.errors import RemoteProtocolError
from pipeline.wire import stun
from supervisor.testbed.netns import Namespace, NetnsError, Testbed

__all__ = [
    "INTERNET",
    "NAT_LAB_PACKAGES",
    "ConntrackEntry",
    "NatKind",
    "NatLab",
    "Site",
    "StunServer",
    "gateway_ruleset",
    "missing_programs",
    "netns_socket",
    "parse_conntrack",
    "stun_binding",
]

#: The Debian packages the lab needs (bookworm versions it was built with) and the program
#: each provides. ``.ci/run`` installs them; ``missing_programs`` says which are absent.
NAT_LAB_PACKAGES: dict[str, tuple[str, str]] = {
    "nftables": ("1.0.6-2+deb12u2", "nft"),
    "conntrack": ("1:1.4.7-1+b2", "conntrack"),
    "coturn": ("4.6.1-1", "turnserver"),
    "stun-server": ("0.97~dfsg-2.1+b1", "stund"),
    "miniupnpd-nftables": ("2.3.1-1", "miniupnpd"),
    "natpmpc": ("20150609-7.1+b2", "natpmpc"),
}

INTERNET = ipaddress.IPv4Network("198.18.90.0/24")
STUND_ADDRESSES = ("198.18.90.3", "198.18.90.4")
COTURN_ADDRESS = "198.18.90.5"
FIRST_GATEWAY = 11  # gateway n's WAN end is 198.18.90.(10 + n)
FIRST_HOST = 100  # internet hosts from 198.18.90.100
FIRST_LAN_HOST = 10  # LAN hosts from 198.19.n.10
WAN, LAN, HOST_IF = "wan", "lan", "eth0"
_READY_TIMEOUT = 15.0
_BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")  # present if br_netfilter is
# miniupnpd logs this once its STUN check enabled forwarding and its NAT-PMP/PCP socket is up
_MINIUPNPD_READY = "Listening for NAT-PMP/PCP traffic on port 5351"


def _program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def missing_programs() -> list[str]:
    """The Debian packages of :data:`NAT_LAB_PACKAGES` whose program is not installed."""
    return [pkg for pkg, (_, prog) in NAT_LAB_PACKAGES.items() if _program(prog) is None]


class NatKind(enum.StrEnum):
    NONE = "none"
    EIM = "eim"
    EIM_OPEN = "eim_open"
    RANDOM = "random"
    UPNP = "upnp"


# ----------------------------------------------------------------------------------------------
# the gateway's rules


def gateway_ruleset(kind: NatKind, *, stun_hosts: Sequence[str] = ()) -> str:
    """The nft ruleset of a gateway of ``kind`` (WAN ``wan``, LAN ``lan``).

    Named counters count what the gateway filtered: ``in_dropped`` (unsolicited WAN packets
    to the gateway itself, dropped), ``in_unsolicited`` (the same, accepted: ``eim_open``),
    ``fwd_dropped`` (unsolicited WAN packets to the LAN, dropped). ``stun_hosts``: the
    stund addresses the ``upnp`` gateway's input accepts (miniupnpd's STUN check needs the
    answers from the other address and port, which no flow of its own covers).
    """
    kind = NatKind(kind)
    upnp = kind is NatKind.UPNP
    lines = [
        "table inet filter {",
        "  counter in_dropped { }",
        "  counter in_unsolicited { }",
        "  counter fwd_dropped { }",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
    ]
    if kind is not NatKind.NONE:
        lines += ["    ct state established,related accept", f'    iifname != "{WAN}" accept']
        if upnp and stun_hosts:
            hosts = ", ".join(stun_hosts)
            lines.append(
                f'    iifname "{WAN}" ip saddr {{ {hosts} }} udp sport {{ 3478, 3479 }} accept'
            )
        if kind is NatKind.EIM_OPEN:
            lines.append(f'    iifname "{WAN}" counter name in_unsolicited accept')
        else:
            lines.append(f'    iifname "{WAN}" counter name in_dropped drop')
    lines += ["  }", "  chain forward {"]
    if kind is NatKind.NONE:
        lines += ["    type filter hook forward priority 0; policy accept;", "  }"]
    else:
        lines += [
            "    type filter hook forward priority 0; policy drop;",
            "    ct state established,related accept",
            *(["    jump miniupnpd"] if upnp else []),
            f'    iifname "{LAN}" oifname "{WAN}" accept',
            "    counter name fwd_dropped drop",
            "  }",
            "  chain miniupnpd { }",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            *(["    jump prerouting_miniupnpd"] if upnp else []),
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            *(["    jump postrouting_miniupnpd"] if upnp else []),
            f'    oifname "{WAN}" masquerade' + (" fully-random" if kind is NatKind.RANDOM else ""),
            "  }",
            "  chain prerouting_miniupnpd { }",
            "  chain postrouting_miniupnpd { }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# conntrack


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """One line of ``conntrack -L``: the original and the reply direction's tuples
    (source, source port, destination, destination port) and the flags in brackets."""

    protocol: str
    original: tuple[str, int, str, int]
    reply: tuple[str, int, str, int]
    flags: frozenset[str]

    @property
    def unreplied(self) -> bool:
        return "UNREPLIED" in self.flags


_FLAG = re.compile(r"\[([A-Z_]+)\]")


def parse_conntrack(text: str) -> list[ConntrackEntry]:
    """Parse ``conntrack -L`` output (UDP and TCP lines; others are skipped)."""
    entries = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("udp", "tcp"):
            continue
        pairs = [w.split("=", 1) for w in words if "=" in w]
        tuples: list[tuple[str, int, str, int]] = []
        current: dict[str, str] = {}
        for key, value in pairs:
            if key in current:
                break
            if key in ("src", "dst", "sport", "dport"):
                current[key] = value
                if len(current) == 4:
                    tuples.append(
                        (
                            current["src"],
                            int(current["sport"]),
                            current["dst"],
                            int(current["dport"]),
                        )
                    )
                    current = {}
        if len(tuples) < 2:
            continue
        entries.append(
            ConntrackEntry(words[0], tuples[0], tuples[1], frozenset(_FLAG.findall(line)))
        )
    return entries


# ----------------------------------------------------------------------------------------------
# sockets inside a namespace

_CLONE_NEWNET = 0x40000000
_libc: ctypes.CDLL | None = None


def netns_socket(
    ns: Namespace, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM
) -> socket.socket:
    """A socket that lives in namespace ``ns``, for this process to use.

    It is made by a short-lived thread that first joins ``ns`` (``setns``): a socket keeps
    the namespace it was made in, and no other thread of this process changes namespace.
    """
    global _libc
    if ns.testbed.closed:
        raise NetnsError(f"namespace {ns.name} belongs to a closed testbed")
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def inside() -> None:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns.name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=inside, name=f"netns-{ns.label}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def stun_binding(
    sock: socket.socket, server: tuple[str, int], timeout: float = 1.0
) -> tuple[str, int] | None:
    """One Binding request from ``sock`` to ``server``; the reflexive address, or None if no
    answer came within ``timeout`` (for readiness checks; the product uses ``StunProbe``)."""
    transaction = secrets.token_bytes(stun.TRANSACTION_ID_LEN)
    sock.sendto(stun.binding_request(transaction), server)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(2048)
        except TimeoutError:
            return None
        try:
            message = stun.parse(data)
        except RemoteProtocolError:
            continue
        if message.transaction_id == transaction and message.reflexive is not None:
            return message.reflexive
    return None


# ----------------------------------------------------------------------------------------------
# the lab


@dataclass
class StunServer:
    """A STUN server on the internet segment: ``program`` is "stund" or "turnserver"."""

    program: str
    ns: Namespace
    address: tuple[str, int]
    process: subprocess.Popen[bytes]


class Site:
    """A gateway of one kind and the LAN behind it. Made by :meth:`NatLab.gateway`."""

    def __init__(self, lab: NatLab, index: int, kind: NatKind, ns: Namespace) -> None:
        self.lab = lab
        self.index = index
        self.kind = kind
        self.ns = ns
        self.wan_address = str(INTERNET[FIRST_GATEWAY - 1 + index])
        self.lan_network = ipaddress.IPv4Network(f"198.19.{index}.0/24")
        self.lan_address = str(self.lan_network[1])
        self.hosts: dict[str, Namespace] = {}
        self.miniupnpd: subprocess.Popen[bytes] | None = None
        self.workdir = lab.workdir / ns.label

    def __repr__(self) -> str:
        return f"Site({self.index}, {self.kind.value}, wan {self.wan_address})"

    def host(self, label: str) -> Namespace:
        """A host on this LAN (made on first use): ``eth0`` at 198.19.n.(10+k), routed through
        the gateway."""
        if label in self.hosts:
            return self.hosts[label]
        address = str(self.lan_network[FIRST_LAN_HOST + len(self.hosts)])
        tb = self.lab.testbed
        ns = tb.namespace(f"{self.ns.label}-{label}")
        tb.attach(ns, self.ns, LAN, f"{address}/24", ifname=HOST_IF)
        ns.ip("route", "add", "default", "via", self.lan_address)
        self.hosts[label] = ns
        self.lab.addresses[ns.name] = address
        return ns

    def conntrack(self) -> list[ConntrackEntry]:
        """The gateway's connection tracking table (``conntrack -L``)."""
        res = self.ns.run(["conntrack", "-L"], timeout=10)
        return parse_conntrack(res.stdout)

    def flush_conntrack(self) -> None:
        self.ns.run(["conntrack", "-F"], timeout=10)

    def counters(self) -> dict[str, int]:
        """Packets counted by the gateway's named counters (see :func:`gateway_ruleset`)."""
        res = self.ns.run(["nft", "-j", "list", "counters", "table", "inet", "filter"], timeout=10)
        out: dict[str, int] = {}
        for item in json.loads(res.stdout).get("nftables", []):
            counter = item.get("counter")
            if counter is not None:
                out[str(counter["name"])] = int(counter["packets"])
        return out

    def ruleset(self) -> str:
        return self.ns.run(["nft", "list", "ruleset"], timeout=10).stdout

    def miniupnpd_log(self) -> str:
        try:
            return (self.workdir / "miniupnpd.log").read_text(errors="replace")
        except OSError:
            return ""


class NatLab:
    """The internet segment, its STUN servers and the sites; see the module docstring.

    ``workdir``: where the servers' files go (a fresh temporary directory, removed by
    :meth:`close`, if None). ``stun_servers``: which STUN servers to start ("stund", "coturn");
    a ``upnp`` gateway needs stund.
    """

    def __init__(
        self,
        testbed: Testbed,
        workdir: Path | None = None,
        *,
        stun_servers: Sequence[str] = ("stund", "coturn"),
    ) -> None:
        self.testbed = testbed
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="avn-natlab-")) if workdir is None else workdir
        self.addresses: dict[str, str] = {}  # namespace name -> its address in the lab
        self.sites: list[Site] = []
        self.servers: list[StunServer] = []
        self._internet_nodes: list[Namespace] = []  # every namespace with a WAN-side address
        self._routed: list[Site] = []  # kind none: its LAN is routed from the internet
        self._hosts = 0
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.inet = testbed.namespace("inet")
            testbed.bridge(self.inet, "inet")
            for which in stun_servers:
                self._start_stun(which)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NatLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the lab's processes (the testbed removes the namespaces) and its own work
        directory. Idempotent."""
        procs = [s.process for s in self.servers]
        procs += [s.miniupnpd for s in self.sites if s.miniupnpd is not None]
        for proc in procs:
            if any(p is proc for p in self.testbed.processes):
                self.testbed.stop(proc)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the internet --------------------------------------------------------------------------

    @property
    def stun_servers(self) -> list[tuple[str, int]]:
        """Each STUN server's primary address and port."""
        return [s.address for s in self.servers]

    def address(self, ns: Namespace) -> str:
        """The address of a host, STUN server or gateway (its WAN end) in the lab."""
        return self.addresses[ns.name]

    def _attach_internet(self, ns: Namespace, address: str, ifname: str) -> None:
        self.testbed.attach(ns, self.inet, "inet", f"{address}/24", ifname=ifname)
        self.addresses.setdefault(ns.name, address)
        for site in self._routed:
            if site.ns is not ns:
                ns.ip("route", "add", str(site.lan_network), "via", site.wan_address)
        self._internet_nodes.append(ns)

    def internet_host(self, label: str) -> Namespace:
        """A host on the internet segment (198.18.90.100, .101, ...)."""
        address = str(INTERNET[FIRST_HOST + self._hosts])
        self._hosts += 1
        ns = self.testbed.namespace(label)
        self._attach_internet(ns, address, HOST_IF)
        return ns

    def _start_stun(self, which: str) -> None:
        if which == "stund":
            ns = self.testbed.namespace("stund")
            self._attach_internet(ns, STUND_ADDRESSES[0], HOST_IF)
            ns.ip("addr", "add", f"{STUND_ADDRESSES[1]}/24", "dev", HOST_IF)
            argv = ["stund", "-h", STUND_ADDRESSES[0], "-a", STUND_ADDRESSES[1]]
            address = (STUND_ADDRESSES[0], stun.PORT)
        elif which == "coturn":
            ns = self.testbed.namespace("coturn")
            self._attach_internet(ns, COTURN_ADDRESS, HOST_IF)
            conf = self.workdir / "turnserver.conf"
            conf.write_text("# the lab's coturn: everything is on the command line\n")
            argv = [
                "turnserver", "--stun-only", "-L", COTURN_ADDRESS, "-p", str(stun.PORT),
                "--no-cli", "--no-tls", "--no-dtls", "-c", str(conf),
                "--pidfile", str(self.workdir / "turnserver.pid"),
                "--db", str(self.workdir / "turndb"),
                "--log-file", "stdout", "--simple-log",
            ]  # fmt: skip
            address = (COTURN_ADDRESS, stun.PORT)
        else:
            raise ValueError(f"unknown STUN server {which!r}: stund or coturn")
        log = open(self.workdir / f"{which}.log", "wb")  # the child keeps its own copy
        with log:
            proc = ns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        server = StunServer(argv[0], ns, address, proc)
        self.servers.append(server)
        self._wait_stun(server)

    def _wait_stun(self, server: StunServer) -> None:
        sock = netns_socket(server.ns)
        try:
            deadline = time.monotonic() + _READY_TIMEOUT
            while time.monotonic() < deadline:
                if server.process.poll() is not None:
                    raise NetnsError(f"{server.program} exited: {server.process.returncode}")
                if stun_binding(sock, server.address, timeout=0.2) is not None:
                    return
            raise NetnsError(f"{server.program} at {server.address} does not answer")
        finally:
            sock.close()

    # -- sites ---------------------------------------------------------------------------------

    def gateway(self, kind: NatKind | str) -> Site:
        """A new site: a gateway of ``kind`` between the internet and a new LAN."""
        kind = NatKind(kind)
        stund = [s.ns for s in self.servers if s.program == "stund"]
        if kind is NatKind.UPNP and not stund:
            raise ValueError("a upnp gateway checks its WAN address with the lab's stund")
        index = len(self.sites) + 1
        ns = self.testbed.namespace(f"gw{index}")
        site = Site(self, index, kind, ns)
        site.workdir.mkdir(parents=True, exist_ok=True)
        self._attach_internet(ns, site.wan_address, WAN)
        self.testbed.bridge(ns, LAN)
        ns.ip("addr", "add", f"{site.lan_address}/24", "dev", LAN)
        ns.sysctl("net.ipv4.ip_forward", "1")
        if _BRIDGE_NF.exists():  # br_netfilter is loaded: LAN-to-LAN frames stay unfiltered
            ns.sysctl("net.bridge.bridge-nf-call-iptables", "0")
        stun_hosts = STUND_ADDRESSES if stund else ()
        rules = site.workdir / "ruleset.nft"
        rules.write_text(gateway_ruleset(kind, stun_hosts=stun_hosts))
        ns.run(["nft", "-f", str(rules)], timeout=10)
        self.sites.append(site)
        if kind is NatKind.NONE:
            self._routed.append(site)
            for other in self._internet_nodes:
                if other is not ns:
                    other.ip("route", "add", str(site.lan_network), "via", site.wan_address)
        if kind is NatKind.UPNP:
            self._start_miniupnpd(site)
        return site

    def _start_miniupnpd(self, site: Site) -> None:
        conf = site.workdir / "miniupnpd.conf"
        conf.write_text(
            "\n".join(
                [
                    f"ext_ifname={WAN}",
                    f"listening_ip={LAN}",
                    "http_port=5000",
                    "enable_natpmp=yes",  # NAT-PMP and PCP, UDP 5351
                    "enable_upnp=yes",
                    # 198.18.0.0/15 is reserved: forwarding stays off unless STUN vouches
                    "ext_perform_stun=yes",
                    f"ext_stun_host={STUND_ADDRESSES[0]}",
                    f"ext_stun_port={stun.PORT}",
                    "secure_mode=yes",
                    "system_uptime=no",
                    f"lease_file={site.workdir / 'upnp.leases'}",
                    f"uuid={_uuid()}",
                    f"allow 1024-65535 {site.lan_network} 1024-65535",
                    "deny 0-65535 0.0.0.0/0 0-65535",
                    "",
                ]
            )
        )
        argv = ["miniupnpd", "-f", str(conf), "-d", "-P", str(site.workdir / "miniupnpd.pid")]
        log = open(site.workdir / "miniupnpd.log", "wb")  # the child keeps its own copy
        with log:
            site.miniupnpd = site.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + _READY_TIMEOUT
        while _MINIUPNPD_READY not in site.miniupnpd_log():
            if site.miniupnpd.poll() is not None or time.monotonic() > deadline:
                raise NetnsError(f"miniupnpd did not get ready:\n{site.miniupnpd_log()}")
            time.sleep(0.05)


def _uuid() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-4{raw[13:16]}-a{raw[17:20]}-{raw[20:]}"
