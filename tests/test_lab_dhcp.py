"""The test bed's real DHCP client (supervisor.testbed.DhcpClient, ISC dhclient) against a stand-in
server: the project's DHCP core on a TAP, every claim won at once. The client gets a lease
with every option, writes its namespace's resolv.conf, and leaves the machine's host name,
resolv.conf and /etc/dhcp alone; release, restart and teardown leave nothing behind."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from supervisor.testbed import DhcpClient, DhcpError, Namespace, Testbed, parse_leases, wait_for
from supervisor.testbed.dhclient import _LAUNCH

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent
GATEWAY = "100.64.0.254"

# argv: device subnet gateway domain lease_s. Prints "ready", then one line per lease event.
STANDIN = textwrap.dedent(
    """
    import random, select, sys, time
    from ipaddress import IPv4Address, IPv4Network
    from pipeline.control.dhcp.events import Claim
    from pipeline.control.dhcp.server import DhcpServer, DhcpSettings
    from pipeline.tap_reader.device import LinuxTap
    from pipeline.wire import arp, ethernet

    device, subnet, gateway, domain, lease_s = sys.argv[1:6]
    net, gw = IPv4Network(subnet), IPv4Address(gateway)
    tap = LinuxTap(device, multi_queue=False)
    tap.configure(mac=bytes.fromhex("02aa00000001"), mtu=1400, address=None, subnet=net)
    gw_mac = bytes.fromhex("02aa000000fe")
    settings = DhcpSettings(subnet=net, server_address=gw, namespace="test",
                            node_id=b"\\1" * 20, domain=domain, lease_s=int(lease_s))
    server = DhcpServer(settings, random.Random(7))
    print("ready", flush=True)
    while True:
        deadline = server.next_deadline()
        wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        select.select([tap], [], [], wait)
        now = time.monotonic()
        while (frame := tap.read()) is not None:
            if ethernet.parse(frame).ethertype == ethernet.ETHERTYPE_ARP:
                ask = arp.parse(frame[14:])
                if ask.op == arp.ArpOp.REQUEST and ask.target_ip == gw:
                    answer = arp.build(arp.build_reply(ask, gw_mac))
                    tap.write(ethernet.build(ask.sender_mac, gw_mac, 0x0806, answer))
                continue
            server.receive_frame(frame, now)
        server.handle_timer(now)
        for request in server.dht_requests():
            if isinstance(request, Claim):
                server.address_won(request.token, request.address, now)
        for reply in server.reply_frames(gw_mac):
            tap.write(reply)
        for event in server.events():
            print(type(event).__name__, getattr(event, "address", ""), flush=True)
    """
)


def _fingerprint(path: str) -> tuple[int, int, bytes]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, Path(path).read_bytes()


def _etc_dhcp() -> list[tuple[str, int]]:
    return sorted((p, os.stat(p).st_mtime_ns) for p in glob.glob("/etc/dhcp/**", recursive=True))


class Standin:
    def __init__(self, ns: Namespace, log: Path) -> None:
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-c", STANDIN, "avn0", "100.64.0.0/24", GATEWAY, "vpn.test"]
        with open(log, "wb") as out:
            self.proc = ns.popen([*argv, "120"], stdout=out, stderr=out, env=env)
        wait_for("the stand-in server", lambda: "ready" in log.read_text(), 20)

    def events(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.startswith("Lease")]


@pytest.fixture
def host(testbed: Testbed, tmp_path: Path) -> Iterator[tuple[Namespace, Standin]]:
    if shutil.which("dhclient") is None and not os.path.exists("/sbin/dhclient"):
        pytest.skip("dhclient not installed (isc-dhcp-client)")
    ns = testbed.namespace("h")
    yield ns, Standin(ns, tmp_path / "standin.log")


def test_lease_options_resolv_conf_and_the_machine_untouched(
    testbed: Testbed, host: tuple[Namespace, Standin], tmp_path: Path
) -> None:
    ns, standin = host
    hostname = socket.gethostname()
    resolv, etc_dhcp = _fingerprint("/etc/resolv.conf"), _etc_dhcp()
    client = DhcpClient(ns, "avn0", tmp_path / "dhcp", "n7")
    lease = client.start(timeout=20)
    assert lease is not None
    address = IPv4Address(lease.address)
    assert address in IPv4Network("100.64.0.0/24") and str(address) != GATEWAY
    assert client.address() == f"{address}/24" == lease.cidr
    assert lease.interface == "avn0" and lease.subnet_mask == "255.255.255.0"
    assert lease.routers == lease.dns_servers == (GATEWAY,) and lease.server == GATEWAY
    assert lease.domain == "vpn.test"
    assert (lease.mtu, lease.lease_time, lease.renewal_time, lease.rebinding_time) == (
        1400, 120, 60, 105,
    )  # fmt: skip
    assert lease.host_name == "n7"  # the server echoed it; nothing applied it
    assert lease.renew and lease.rebind and lease.expire
    assert standin.events() == [f"LeaseGranted {address}"]
    # the namespace's own resolv.conf, through Debian's dhclient-script
    text = ns.run(["cat", "/etc/resolv.conf"]).stdout
    assert f"nameserver {GATEWAY}" in text.splitlines() and "search vpn.test" in text.splitlines()
    assert Path(ns.etc_dir, "resolv.conf").read_text() == text
    assert ns.run(["cat", "/etc/nsswitch.conf"]).stdout == "hosts: files dns\n"
    assert ns.run(["ip", "route", "show", "default"]).stdout.startswith(f"default via {GATEWAY}")
    assert ns.run(["ip", "-o", "link", "show", "avn0"]).stdout.count("mtu 1400") == 1
    # the client is the process the testbed tracks, with its own files
    assert client.proc is not None and client.running
    assert int(client.pid_file.read_text()) == client.proc.pid
    # the machine: same host name, resolv.conf and /etc/dhcp; no temporary file left in /etc
    assert socket.gethostname() == hostname
    assert _fingerprint("/etc/resolv.conf") == resolv
    assert _etc_dhcp() == etc_dhcp
    assert glob.glob("/etc/resolv.conf.dhclient-new.*") == []
    assert glob.glob(f"{tmp_path}/dhcp/resolv.conf.dhclient-new.*") == []  # its own, removed

    # release: DHCPRELEASE reaches the server, the address goes, the client stops
    client.release()
    assert not client.running and client.address() is None
    wait_for("the release", lambda: f"LeaseReleased {address}" in standin.events(), 10)
    # a new start asks for the address of its lease file again, and gets it
    again = client.start(timeout=20)
    assert again is not None and again.address == str(address)
    assert client.stop() == -15 and not client.running
    assert client.address() == f"{address}/24"  # stopped, not released: the lease stays
    assert socket.gethostname() == hostname and _fingerprint("/etc/resolv.conf") == resolv


def test_no_lease_is_a_bounded_error(testbed: Testbed, tmp_path: Path) -> None:
    ns = testbed.namespace("h")
    # a TAP nobody answers on (no server): held open by a process of the testbed
    holder = ns.popen(
        [sys.executable, "-c", "import time; from pipeline.tap_reader.device import LinuxTap\n"
         "t = LinuxTap('avn0', multi_queue=False); print('ok', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == b"ok\n"
    client = DhcpClient(ns, "avn0", tmp_path / "dhcp", "n8")
    with pytest.raises(DhcpError, match="no lease after 2"):
        client.start(timeout=2)
    assert client.running  # still trying: the testbed ends it
    assert "DHCPDISCOVER on avn0" in client.log_tail()
    testbed.close()
    assert client.proc is not None and client.proc.returncode is not None


def _fake_script(tmp_path: Path) -> Path:
    fake = tmp_path / "fake-dhclient-script"
    fake.write_text(
        f"#!/bin/sh\nenv > {tmp_path}/seen.env\n"
        f"echo resolv_target=$(readlink -f /etc/resolv.conf) >> {tmp_path}/seen.env\nexit 3\n"
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("own", [True, False], ids=["own-resolv-conf", "machine-resolv-conf"])
def test_script_drops_host_name_and_foreign_resolv_conf(
    testbed: Testbed, tmp_path: Path, own: bool
) -> None:
    """What the -sf script passes on to dhclient-script: never a host name, and the DNS
    options only where /etc/resolv.conf is the namespace's own file."""
    ns = testbed.namespace("h")
    if own:
        ns.resolv_conf()
    client = DhcpClient(ns, "avn0", tmp_path / "dhcp", "n9")
    client.dhclient_script = str(_fake_script(tmp_path))
    client.write_files()
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "reason": "BOUND",
        "interface": "avn0",
        "new_ip_address": "100.64.0.9",
        "new_host_name": "evil",
        "old_host_name": "evil-before",
        "new_domain_name": "vpn.test",
        "new_domain_name_servers": GATEWAY,
    }
    res = ns.run([str(client.script)], env=env, check=False)
    assert res.returncode == 3  # the real script's exit code
    seen = dict(
        line.split("=", 1)
        for line in (tmp_path / "seen.env").read_text().splitlines()
        if "=" in line
    )
    assert seen["reason"] == "BOUND" and seen["new_ip_address"] == "100.64.0.9"
    assert "new_host_name" not in seen and "old_host_name" not in seen
    # where make_resolv_conf writes: through our symlink to the namespace's own file
    assert seen["resolv_target"] == str(client.resolv_link)
    assert os.readlink(client.resolv_link) == os.path.join(ns.etc_dir, "resolv.conf")
    if own:
        assert seen["new_domain_name_servers"] == GATEWAY
    else:
        assert "new_domain_name_servers" not in seen and "new_domain_name" not in seen
        assert "not writing it" in res.stderr


def test_launcher_keeps_host_name_and_hooks_inside(testbed: Testbed, tmp_path: Path) -> None:
    """dhclient starts in a UTS namespace of its own (a host name set there stays there)
    and a private mount namespace where /etc/dhcp (the machine's hooks) is an empty folder."""
    ns = testbed.namespace("h")
    hostname, etc_dhcp = socket.gethostname(), _etc_dhcp()
    empty = tmp_path / "no-hooks"
    empty.mkdir()
    inner = "hostname evil; hostname; ls -A /etc/dhcp; echo end"
    argv = ["unshare", "--uts", "--mount", "--propagation", "private", "--"]
    res = ns.run([*argv, "/bin/sh", "-c", _LAUNCH, "sh", "n9", str(empty), "sh", "-c", inner])
    assert res.stdout == "evil\nend\n"
    assert socket.gethostname() == hostname and _etc_dhcp() == etc_dhcp
    assert ns.run(["hostname"]).stdout.strip() == hostname


def test_parse_leases() -> None:
    text = textwrap.dedent(
        """\
        default-duid "\\000\\001\\000\\001";
        lease {
          interface "avn0";
          fixed-address 100.64.0.7;
          option subnet-mask 255.255.0.0;
          option routers 100.64.255.254;
          option domain-name-servers 100.64.255.254,100.64.255.253;
          option host-name "n\\0631";
          option domain-name "vpn.test";
          option dhcp-lease-time 600;
          renew 4 2026/11/26 15:00:00;
        }
        lease {
          interface "avn0";
        }
        """
    )
    (lease,) = parse_leases(text)
    assert lease.address == "100.64.0.7" and lease.cidr == "100.64.0.7/16"
    assert lease.dns_servers == ("100.64.255.254", "100.64.255.253")
    assert lease.host_name == "n31"  # octal escapes, as dhclient writes them
    assert lease.lease_time == 600 and lease.mtu is None and lease.renew == "4 2026/11/26 15:00:00"
    assert parse_leases("") == []
    for bad in ("bad_name", "-x", "a" * 64):
        with pytest.raises(ValueError, match="host name"):
            DhcpClient(None, "avn0", Path("/x"), bad)  # type: ignore[arg-type]
