"""tinc and OpenVPN from Debian's packages, as baselines for ``bench/pipeline_bench.py``.

Each peer setup runs one daemon in each of the two namespaces ``supervisor.testbed.two_nodes``
built (underlay 198.18.0.1/.2 on a veth pair), over a TAP device with MTU 1400 (autovn's
``mtu`` in the test bed), with its own virtual addresses from 100.64.0.0/10 and its own UDP port,
configured in a temporary directory. The daemons run in the foreground, started with the
testbed's ``Namespace.popen`` (``ip netns exec`` execs the daemon, so the tracked pid is the
daemon's own), and are ended by that pid (``Testbed.stop``); the testbed ends them too on
failure and on Ctrl-C. Nothing runs in, or touches, the root namespace.

- ``tinc`` / ``tinc-plain``: ``tincd`` 1.0 (Debian ``tinc``), ``Mode = switch`` over a TAP,
  RSA keys from ``tincd -K``, port 655. ``tinc`` keeps the defaults (Blowfish-CBC,
  HMAC-SHA1 truncated to 4 bytes); ``tinc-plain`` sets ``Cipher = none`` and ``Digest = none``
  in both host files (the metadata connection is still authenticated with RSA).
- ``openvpn``: OpenVPN 2.6 (Debian ``openvpn``) peer to peer over a TAP with a static key
  (``--secret``: 2.6.14 only warns that it is deprecated, and does not know
  ``--allow-deprecated-insecure-static-crypto``, which 2.7 requires), AES-256-CBC with
  HMAC-SHA256, UDP port 1194, DCO off (static keys cannot use it). No TLS: the simplest mode
  2.6 still allows.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import tail
from supervisor.testbed import UNDERLAY, Namespace, Testbed, wait_for

MTU = 1400  # same as the autovn nodes' device (supervisor/testbed/nodes.py)
NAMES = ("alpha", "beta")


@dataclass
class PeerDaemon:
    """One VPN daemon in one namespace; quacks like a ``Node`` where the bench needs it
    (``name``, ``ns``, ``address``) and gives its pid for the CPU accounting."""

    name: str
    ns: Namespace
    address: str
    device: str
    port: int
    root: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return self.root / "daemon.out"

    def pids(self) -> tuple[int, list[int]]:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: daemon not running ({self.tail()})")
        return self.proc.pid, []

    def tail(self, lines: int = 15) -> str:
        return tail(self.log_file, lines, missing="(no output)")


@dataclass(frozen=True)
class PeerSetup:
    key: str  # --setups name
    title: str  # column title
    package: str  # Debian package
    binary: str
    subnet: str  # first three octets of the virtual /24
    device: str
    port: int
    prepare: Callable[[PeerSetup, Namespace, Namespace, Path], list[PeerDaemon]]
    describe: str

    @property
    def virtual(self) -> tuple[str, str]:
        return (f"{self.subnet}.1", f"{self.subnet}.2")

    def missing(self) -> str | None:
        """Why this setup cannot run here, or None."""
        if shutil.which(self.binary) is None:
            return f"{self.binary} not found (apt-get install -y {self.package})"
        if not Path("/dev/net/tun").exists():
            return "/dev/net/tun missing"
        return None

    def start(self, tb: Testbed, daemons: list[PeerDaemon], timeout: float = 30.0) -> None:
        """Start both daemons, address their TAP devices once they exist, and wait until the
        virtual addresses answer pings both ways."""
        for d in daemons:
            with open(d.log_file, "ab") as out:  # the child keeps its own copy
                d.proc = d.ns.popen(d.argv, stdout=out, stderr=subprocess.STDOUT)
        for d in daemons:

            def device_up(d: PeerDaemon = d) -> bool:
                if d.proc is not None and d.proc.poll() is not None:
                    raise RuntimeError(f"{d.name}: {self.binary} exited: {d.tail()}")
                return d.ns.ip("link", "show", "dev", d.device, check=False).returncode == 0

            wait_for(f"{self.key} {d.name} {d.device}", device_up, timeout=timeout)
            d.ns.ip("link", "set", "dev", d.device, "mtu", str(MTU))
            if d.address not in " ".join(d.ns.addresses(d.device)):
                d.ns.ip("addr", "add", f"{d.address}/24", "dev", d.device)
            d.ns.ip("link", "set", "dev", d.device, "up")
        for me, d in enumerate(daemons):
            other = daemons[1 - me].address

            def answers(d: PeerDaemon = d, other: str = other) -> bool:
                if d.proc is not None and d.proc.poll() is not None:
                    raise RuntimeError(f"{d.name}: {self.binary} exited: {d.tail()}")
                argv = ["ping", "-n", "-c", "1", "-W", "1", other]
                return d.ns.run(argv, check=False, timeout=5).returncode == 0

            wait_for(f"{self.key} {d.name} -> {other}", answers, timeout=timeout, every=0.3)

    def stop(self, tb: Testbed, daemons: list[PeerDaemon]) -> None:
        """End the daemons by pid (SIGTERM, then SIGKILL) and wait until their TAP devices and
        UDP ports are gone, so the next setup starts in clean namespaces."""
        for d in daemons:
            if d.proc is not None:
                tb.stop(d.proc, timeout=5)
        for d in daemons:

            def gone(d: PeerDaemon = d) -> bool:
                dev = d.ns.ip("link", "show", "dev", d.device, check=False).returncode == 0
                port = d.ns.run(["ss", "-Htuln", f"sport = :{d.port}"], check=False).stdout
                return not dev and not port.strip()

            wait_for(f"{self.key} {d.name} {d.device} and port {d.port} gone", gone, timeout=20)


# ----------------------------------------------------------------------------------------------
# tinc 1.0


def _tinc_prepare(
    setup: PeerSetup, ns_a: Namespace, ns_b: Namespace, root: Path, *, plain: bool
) -> list[PeerDaemon]:
    hosts_text: dict[str, str] = {}
    dirs: list[Path] = []
    for me, (name, ns) in enumerate(zip(NAMES, (ns_a, ns_b), strict=True)):
        conf = root / name
        (conf / "hosts").mkdir(parents=True)
        (conf / "tinc.conf").write_text(
            f"Name = {name}\n"
            "Mode = switch\n"
            "DeviceType = tap\n"
            "Device = /dev/net/tun\n"
            f"Interface = {setup.device}\n"
            "AddressFamily = ipv4\n"
            f"BindToAddress = {UNDERLAY[me]}\n"
            f"ConnectTo = {NAMES[1 - me]}\n"
            "PingInterval = 10\n"
        )
        host = conf / "hosts" / name
        lines = [f"Address = {UNDERLAY[me]}", f"Port = {setup.port}"]
        if plain:
            lines += ["Cipher = none", "Digest = none"]
        host.write_text("\n".join(lines) + "\n")
        # tincd -K appends the public key to hosts/NAME and writes rsa_key.priv (no prompt
        # when stdin is not a terminal). No network involved; run inside the namespace anyway.
        res = ns.run(["tincd", "-c", str(conf), "-K", "2048"], check=False, timeout=60)
        if res.returncode != 0 or not (conf / "rsa_key.priv").exists():
            raise RuntimeError(f"tincd -K for {name}: rc {res.returncode}: {res.stderr[-300:]}")
        hosts_text[name] = host.read_text()
        dirs.append(conf)
    daemons = []
    for me, (name, ns) in enumerate(zip(NAMES, (ns_a, ns_b), strict=True)):
        conf = dirs[me]
        peer = NAMES[1 - me]
        (conf / "hosts" / peer).write_text(hosts_text[peer])
        argv = [
            "tincd", "-D", "-c", str(conf), "--pidfile", str(conf / "tincd.pid"),
            "--logfile", str(conf / "tincd.log"), "-d", "1",
        ]  # fmt: skip
        daemons.append(
            PeerDaemon(name, ns, setup.virtual[me], setup.device, setup.port, conf, argv)
        )
    return daemons


# ----------------------------------------------------------------------------------------------
# OpenVPN 2.6


def _openvpn_prepare(
    setup: PeerSetup, ns_a: Namespace, ns_b: Namespace, root: Path, *, plain: bool
) -> list[PeerDaemon]:
    root.mkdir(parents=True, exist_ok=True)
    key = root / "static.key"
    res = ns_a.run(["openvpn", "--genkey", "secret", str(key)], check=False, timeout=30)
    if res.returncode != 0 or not key.exists():
        raise RuntimeError(f"openvpn --genkey: rc {res.returncode}: {res.stderr[-300:]}")
    crypto = ["--cipher", "none", "--auth", "none"] if plain else [
        "--cipher", "AES-256-CBC", "--auth", "SHA256"
    ]  # fmt: skip
    daemons = []
    for me, (name, ns) in enumerate(zip(NAMES, (ns_a, ns_b), strict=True)):
        conf = root / name
        conf.mkdir()
        argv = [
            "openvpn", "--dev", setup.device, "--dev-type", "tap", "--proto", "udp",
            "--local", UNDERLAY[me], "--lport", str(setup.port),
            "--remote", UNDERLAY[1 - me], "--rport", str(setup.port),
            "--secret", str(key), str(me),
            *crypto, "--disable-dco", "--tun-mtu", str(MTU),
            "--ping", "1", "--ping-restart", "10", "--verb", "3", "--mute-replay-warnings",
        ]  # fmt: skip
        daemons.append(
            PeerDaemon(name, ns, setup.virtual[me], setup.device, setup.port, conf, argv)
        )
    return daemons


PEERS: dict[str, PeerSetup] = {
    "tinc": PeerSetup(
        "tinc",
        "tinc",
        "tinc",
        "tincd",
        "100.64.1",
        "tinc0",
        655,
        lambda s, a, b, r: _tinc_prepare(s, a, b, r, plain=False),
        "tincd 1.0 switch mode over TAP, default cipher (Blowfish-CBC + HMAC-SHA1/4 bytes), "
        "100.64.1.1/.2, UDP 655",
    ),
    "tinc-plain": PeerSetup(
        "tinc-plain",
        "tinc-plain",
        "tinc",
        "tincd",
        "100.64.1",
        "tinc0",
        655,
        lambda s, a, b, r: _tinc_prepare(s, a, b, r, plain=True),
        "tincd 1.0 switch mode over TAP, Cipher = none, Digest = none, 100.64.1.1/.2, UDP 655",
    ),
    "openvpn": PeerSetup(
        "openvpn",
        "openvpn",
        "openvpn",
        "openvpn",
        "100.64.2",
        "ovpn0",
        1194,
        lambda s, a, b, r: _openvpn_prepare(s, a, b, r, plain=False),
        "OpenVPN 2.6 p2p over TAP, static key, AES-256-CBC + HMAC-SHA256, no DCO, "
        "100.64.2.1/.2, UDP 1194",
    ),
}
