"""tinc, OpenVPN, wireguard-go and nebula from Debian's packages, as baselines for
``bench/pipeline_bench.py`` and ``bench/peers``.

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
- ``wireguard-go``: Debian's ``wireguard-go`` (0.0.20220316: before the TUN and UDP offloads)
  over a TUN (L3), Noise IK + ChaCha20-Poly1305, keys made here with ``cryptography``'s
  X25519 and set through its UAPI socket (``/var/run/wireguard/<device>.sock``, the protocol
  ``wg`` speaks: no ``wireguard-tools`` needed), UDP port 51820. It needs only the kernel's
  ``/dev/net/tun``; ``WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1`` lets it run on a kernel
  that has WireGuard built in. The device name carries the namespace's suffix, so that the
  UAPI sockets (one directory for the whole machine) of two runs never meet.
- ``nebula``: Debian's ``nebula`` (1.6.1) over a TUN, a CA and two host certificates made with
  ``nebula-cert`` in the temporary directory, static hosts (no lighthouse, no punching),
  default cipher (AES-256-GCM), a firewall that allows everything, UDP port 4242; nebula
  addresses its own device from its certificate.

The TAP and TUN devices all have MTU 1400, and the daemons start as ``start`` says: the
time to connect is measured from there to the first ping answered.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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
    env: dict[str, str] | None = None  # the daemon's environment (None: ours)
    # once its device exists, before it is addressed: e.g. wireguard-go's keys and peer
    configure: Callable[[PeerDaemon], None] | None = None
    self_addressed: bool = False  # the daemon addresses its device itself (nebula)

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
        """Start both daemons, configure (``PeerDaemon.configure``) and then address their
        devices once they exist, and wait until the virtual addresses answer pings both
        ways."""
        for d in daemons:
            with open(d.log_file, "ab") as out:  # the child keeps its own copy
                d.proc = d.ns.popen(d.argv, stdout=out, stderr=subprocess.STDOUT, env=d.env)
        for d in daemons:

            def device_up(d: PeerDaemon = d) -> bool:
                if d.proc is not None and d.proc.poll() is not None:
                    raise RuntimeError(f"{d.name}: {self.binary} exited: {d.tail()}")
                return d.ns.ip("link", "show", "dev", d.device, check=False).returncode == 0

            wait_for(f"{self.key} {d.name} {d.device}", device_up, timeout=timeout, every=0.02)
            if d.configure is not None:
                d.configure(d)
        for d in daemons:  # both configured before either sends (a lost first handshake
            if d.self_addressed:  # would cost wireguard-go its 5 s retry)
                continue
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


# ----------------------------------------------------------------------------------------------
# wireguard-go


WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "error"}
WG_RUN = Path("/var/run/wireguard")


def _wg_uapi(device: str, lines: list[str], timeout: float = 5.0) -> None:
    """Set a wireguard-go device's configuration through its UAPI socket (the ``set=1``
    operation of the cross-platform userspace interface); RuntimeError unless errno=0."""
    path = WG_RUN / f"{device}.sock"
    wait_for(f"{path}", path.exists, timeout=timeout, every=0.01)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n").encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    if b"errno=0" not in reply:
        raise RuntimeError(f"wireguard-go {device}: UAPI set: {reply.decode(errors='replace')!r}")


def _wireguard_prepare(
    setup: PeerSetup, ns_a: Namespace, ns_b: Namespace, root: Path, *, plain: bool
) -> list[PeerDaemon]:
    keys = [X25519PrivateKey.generate() for _ in NAMES]
    private = [k.private_bytes_raw().hex() for k in keys]
    public = [k.public_key().public_bytes_raw().hex() for k in keys]
    daemons = []
    for me, (name, ns) in enumerate(zip(NAMES, (ns_a, ns_b), strict=True)):
        conf = root / name
        conf.mkdir(parents=True)
        device = f"wg{ns.name[-9:].replace('-', '')}"[:15]  # unique: one socket directory
        peer = 1 - me
        lines = [
            f"private_key={private[me]}",
            f"listen_port={setup.port}",
            "replace_peers=true",
            f"public_key={public[peer]}",
            f"endpoint={UNDERLAY[peer]}:{setup.port}",
            "replace_allowed_ips=true",
            f"allowed_ip={setup.virtual[peer]}/32",
        ]

        def configure(d: PeerDaemon, lines: list[str] = lines) -> None:
            _wg_uapi(d.device, lines)

        argv = ["wireguard-go", "-f", device]
        daemons.append(
            PeerDaemon(
                name, ns, setup.virtual[me], device, setup.port, conf, argv,
                env=dict(os.environ, **WG_ENV), configure=configure,
            )
        )  # fmt: skip
    return daemons


# ----------------------------------------------------------------------------------------------
# nebula


def _nebula_prepare(
    setup: PeerSetup, ns_a: Namespace, ns_b: Namespace, root: Path, *, plain: bool
) -> list[PeerDaemon]:
    root.mkdir(parents=True, exist_ok=True)
    ca_crt, ca_key = root / "ca.crt", root / "ca.key"
    _run_tool(ns_a, ["nebula-cert", "ca", "-name", "bench", "-out-crt", str(ca_crt),
                     "-out-key", str(ca_key)])  # fmt: skip
    daemons = []
    for me, (name, ns) in enumerate(zip(NAMES, (ns_a, ns_b), strict=True)):
        conf = root / name
        conf.mkdir()
        crt, key = conf / "host.crt", conf / "host.key"
        _run_tool(ns_a, [
            "nebula-cert", "sign", "-ca-crt", str(ca_crt), "-ca-key", str(ca_key),
            "-name", name, "-ip", f"{setup.virtual[me]}/24", "-out-crt", str(crt),
            "-out-key", str(key),
        ])  # fmt: skip
        peer = 1 - me
        allow_all = [{"port": "any", "proto": "any", "host": "any"}]
        config = {  # JSON is YAML
            "pki": {"ca": str(ca_crt), "cert": str(crt), "key": str(key)},
            "static_host_map": {setup.virtual[peer]: [f"{UNDERLAY[peer]}:{setup.port}"]},
            "lighthouse": {"am_lighthouse": False, "hosts": []},
            "listen": {"host": UNDERLAY[me], "port": setup.port},
            "punchy": {"punch": False},
            "tun": {"dev": setup.device, "mtu": MTU},
            "logging": {"level": "warning"},
            "firewall": {"outbound": allow_all, "inbound": allow_all},
        }
        (conf / "config.yml").write_text(json.dumps(config, indent=1))
        argv = ["nebula", "-config", str(conf / "config.yml")]
        daemons.append(
            PeerDaemon(
                name, ns, setup.virtual[me], setup.device, setup.port, conf, argv,
                self_addressed=True,
            )
        )  # fmt: skip
    return daemons


def _run_tool(ns: Namespace, argv: list[str]) -> None:
    res = ns.run(argv, check=False, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])}: rc {res.returncode}: {res.stderr[-300:]}")


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
    "wireguard-go": PeerSetup(
        "wireguard-go",
        "wireguard-go",
        "wireguard-go",
        "wireguard-go",
        "100.64.3",
        "",  # per namespace: see _wireguard_prepare
        51820,
        lambda s, a, b, r: _wireguard_prepare(s, a, b, r, plain=False),
        "wireguard-go 0.0.20220316 over TUN, Noise IK + ChaCha20-Poly1305 (UAPI-configured), "
        "100.64.3.1/.2, UDP 51820",
    ),
    "nebula": PeerSetup(
        "nebula",
        "nebula",
        "nebula",
        "nebula",
        "100.64.4",
        "neb0",
        4242,
        lambda s, a, b, r: _nebula_prepare(s, a, b, r, plain=False),
        "nebula 1.6.1 over TUN, static hosts, AES-256-GCM, 100.64.4.1/.2, UDP 4242",
    ),
}
