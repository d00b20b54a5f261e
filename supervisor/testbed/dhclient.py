"""A real DHCP client for the test bed: ISC ``dhclient`` on a device in a namespace.

The nodes under test answer DHCP on their TAP (interface mode) or on a bridged segment
(router mode); the tests, the benchmarks and ``supervisor demo`` check them with the client
that real machines run, not with one of our own. ``DhcpClient`` runs it so that nothing it
does can reach outside its namespace: its own config, lease, pid and script files, its own
UTS and mount namespaces, the namespace's own resolv.conf (see ``_SCRIPT`` and
``_LAUNCH``). ``parse_leases`` reads its lease file into ``DhcpLease`` records.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.testbed.netns import Namespace, NetnsError

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
# dhclient-script for {hostname} on {device} in network namespace {ns}, by supervisor.testbed
unset new_host_name old_host_name
own={own}
seen=$(stat -L -c %d:%i /etc/resolv.conf 2>/dev/null)
if [ -z "$seen" ] || [ "$seen" != "$(stat -L -c %d:%i "$own" 2>/dev/null)" ]; then
    echo "autovn test bed: /etc/resolv.conf here is not $own: not writing it" >&2
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
                "usual files: set it to complain mode (aa-complain) to run the test bed's client"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._no_hooks.mkdir(exist_ok=True)
        self.config_file.write_text(
            f"# dhclient for {self.hostname} on {self.device} in {self.ns.name}"
            " (supervisor.testbed)\n"
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
