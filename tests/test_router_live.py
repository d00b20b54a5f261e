"""Router mode, live: one node (gw) whose TAP is a port of its segment's bridge serves three
machines (namespaces on veths into the bridge) that install nothing but a DHCP client
pointed at the node's DHCP port; a remote node (far) in interface mode across the overlay.
Every machine gets an address, reaches the remote node by address and by name and is
reached by it; machines talk to each other on L2 without the node's pipeline; the node
lists its machines; a router restart keeps every machine's address."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from supervisor.testbed import (
    DOMAIN,
    Authority,
    DhcpClient,
    Machine,
    Node,
    Testbed,
    node_config,
    router_segment,
    wait_for,
)

pytestmark = pytest.mark.netns

SUBNET = IPv4Network("100.64.0.0/24")


def ping(machine: Machine, target: str, count: int = 2) -> bool:
    res = machine.ns.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", target], check=False, timeout=30
    )
    return res.returncode == 0


def classifier_stats(node: Node) -> dict[str, Any]:
    st = node.status()
    assert st is not None
    stats: dict[str, Any] = next(
        w["stats"]["classifier"] for w in st["workers"] if w["stage"] == "classifier"
    )
    return stats


def machines_listed(node: Node) -> list[dict[str, Any]]:
    st = node.status()
    assert st is not None
    control = next(w["stats"] for w in st["workers"] if w["stage"] == "control")
    listed: list[dict[str, Any]] = control.get("addressing", {}).get("machines", [])
    return listed


@pytest.fixture(scope="module")
def segment(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Node, Node, list[Machine]]]:
    with Testbed("rtr") as tb:
        gw, far, machines = router_segment(tb, tmp_path_factory.mktemp("rtr"), 3)
        far.dhcp()
        for m in machines:
            m.dhcp.start(wait=False)
        for m in machines:
            m.address = m.dhcp.wait_bound(60).address
        yield gw, far, machines


def test_every_machine_gets_an_address_in_the_subnet(
    segment: tuple[Node, Node, list[Machine]],
) -> None:
    gw, far, machines = segment
    addresses = [m.address for m in machines]
    assert len(set(addresses + [far.address])) == 4
    assert all(IPv4Address(a) in SUBNET for a in addresses)
    for m in machines:
        lease = m.dhcp.lease()
        assert lease is not None and lease.routers == ("100.64.0.254",)
        assert lease.domain == DOMAIN and lease.host_name == m.name
    listed = wait_for("the node to list its machines", lambda: len(machines_listed(gw)) == 3)
    assert listed
    rows = {row["address"]: row for row in machines_listed(gw)}
    assert set(rows) == set(addresses)
    assert {rows[m.address]["hostname"] for m in machines} == {"m1", "m2", "m3"}
    text = gw.cli("status", str(gw.config)).stdout
    assert "machines behind this router" in text and all(a in text for a in addresses)


def test_machines_and_the_remote_node_reach_each_other(
    segment: tuple[Node, Node, list[Machine]],
) -> None:
    _, far, machines = segment
    for m in machines:
        assert ping(m, far.address), m.name
        assert far.ping(m.address, count=2), m.name
    assert ping(machines[0], f"far.{DOMAIN}")  # the machine's resolver: the router's DNS
    assert far.ping(f"{machines[1].name}.{DOMAIN}", count=2)  # the machine's host name
    static = "C" + "".join(f"{int(o):03d}" for o in machines[2].address.split(".")[1:])
    assert far.ping(f"{static}.{DOMAIN}", count=1)


def test_machines_of_the_segment_talk_without_the_node(
    segment: tuple[Node, Node, list[Machine]],
) -> None:
    gw, _, machines = segment
    assert ping(machines[0], machines[1].address)  # learn MACs on the bridge first
    time.sleep(2.5)  # status counters come with the workers' heartbeats (every second)
    before = classifier_stats(gw)
    assert ping(machines[0], machines[1].address, count=20)
    time.sleep(2.5)
    after = classifier_stats(gw)
    # 20 requests and 20 replies crossed the segment; the node's pipeline saw none of them
    # (what it did see meanwhile is the segment's broadcast chatter: IPv6, ARP)
    seen = after["from_inside"] - before["from_inside"]
    local = after["drops"]["local_to_local"] - before["drops"]["local_to_local"]
    carried = after["actions"]["0"] - before["actions"]["0"]
    assert seen < 40 and local <= 2 and carried == 0, (before, after)


def test_a_router_restart_keeps_every_machines_address(
    segment: tuple[Node, Node, list[Machine]],
) -> None:
    gw, far, machines = segment
    assert gw.proc is not None
    gw.proc.terminate()
    gw.proc.wait(timeout=30)
    gw.start()
    gw.wait_running()
    wait_for("the machines back in the node's table", lambda: len(machines_listed(gw)) == 3, 30)
    for m in machines:
        lease = m.dhcp.lease()
        assert lease is not None and lease.address == m.address
        wait_for(f"{m.name} to reach far again", lambda m=m: ping(m, far.address, 1), 30)


def test_a_machine_not_allowed_gets_nothing(tmp_path: Path) -> None:
    """With ``allowed_macs`` the router answers only the listed machines: m3 is not."""
    with Testbed("rta") as tb:
        gw, far, machines = router_segment(tb, tmp_path, 3, allowed=(1, 2))
        for m in machines:
            m.dhcp.start(wait=False)
        for m in machines[:2]:
            m.address = m.dhcp.wait_bound(60).address
        time.sleep(3)  # m3 has been asking all along (every 1-2 s)
        assert machines[2].dhcp.lease() is None
        assert machines[2].dhcp.address() is None
        st = gw.status()
        assert st is not None
        control = next(w["stats"] for w in st["workers"] if w["stage"] == "control")
        dhcp = control["addressing"]["dhcp"]
        assert sum(v for k, v in dhcp.items() if "not_allowed" in k) >= 1, dhcp
        assert len(machines_listed(gw)) == 2


# The segment's own ("physical") DHCP server on the standard port, for its own clients:
# the project's DHCP core on a raw socket, in its own subnet of the physical network, every
# address granted at once (no DHT).
PHYSICAL_SERVER = textwrap.dedent(
    """
    import random, select, socket, sys, time
    from ipaddress import IPv4Address, IPv4Network
    from pipeline.control.dhcp.events import Claim
    from pipeline.control.dhcp.server import DhcpServer, DhcpSettings

    device, mac = sys.argv[1], bytes.fromhex(sys.argv[2])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((device, 0))
    settings = DhcpSettings(subnet=IPv4Network("198.19.0.0/24"),
                            server_address=IPv4Address("198.19.0.254"), namespace="phys",
                            node_id=b"\\2" * 20, domain="lan.test", max_clients=16)
    server = DhcpServer(settings, random.Random(3))
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([s], [], [], 0.5)
        now = time.monotonic()
        if ready:
            server.receive_frame(s.recv(65536), now)
        server.handle_timer(now)
        for request in server.dht_requests():
            if isinstance(request, Claim):
                server.address_won(request.token, request.address, now)
        for frame in server.reply_frames(mac):
            s.send(frame)
        for event in server.events():
            print(type(event).__name__, getattr(event, "address", ""), flush=True)
    """
)


def test_the_segments_own_dhcp_server_keeps_serving_its_clients(tmp_path: Path) -> None:
    """The router's DHCP is on port 1067; a physical server on 67 serves a machine with an
    ordinary client, untouched, while the router's machines get virtual addresses."""
    with Testbed("rtp") as tb:
        gw, far, machines = router_segment(tb, tmp_path, 1)
        phys = tb.namespace("phys")
        tb.attach(phys, gw.ns, "br0", "198.19.0.254/24", ifname="eth0")
        phys_mac = phys.run(["cat", "/sys/class/net/eth0/address"]).stdout.strip()
        log = tmp_path / "phys.log"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        with open(log, "wb") as out:
            phys.popen(
                [sys.executable, "-c", PHYSICAL_SERVER, "eth0", phys_mac.replace(":", "")],
                stdout=out,
                stderr=out,
                env=env,
            )
        wait_for("the physical server", lambda: "ready" in log.read_text(), 20)
        plain = tb.namespace("p1")
        tb.attach(plain, gw.ns, "br0", None, ifname="eth0")
        ordinary = DhcpClient(plain, "eth0", tmp_path / "p1", "p1")  # port 67, as shipped
        ordinary.start(wait=False)
        machines[0].dhcp.start(wait=False)
        lease = ordinary.wait_bound(60)
        assert lease.address.startswith("198.19.0.") and lease.routers == ("198.19.0.254",)
        virtual = machines[0].dhcp.wait_bound(60)
        assert IPv4Address(virtual.address) in SUBNET
        assert "LeaseGranted 198.19.0." in log.read_text()
        # the router leased only its own machine
        wait_for("the router's table", lambda: len(machines_listed(gw)) == 1, timeout=5)


def test_a_machine_with_an_address_of_its_own_is_registered_when_allowed(
    tmp_path: Path,
) -> None:
    """``allow_static``: m2 sets an address itself (no DHCP); the router claims it in the
    DHT when it first sees it, and from then on m2 reaches the remote node and is reached."""
    with Testbed("rts") as tb:
        gw, far, machines = router_segment(tb, tmp_path, 2, allow_static=True)
        far.dhcp()
        machines[0].address = machines[0].dhcp.start(wait=True).address  # type: ignore[union-attr]
        own = machines[1]
        taken = {far.address, machines[0].address}  # DHCP gives random addresses
        own.address = next(f"100.64.0.{i}" for i in range(200, 250) if f"100.64.0.{i}" not in taken)
        own.ns.ip("addr", "add", f"{own.address}/24", "dev", "eth0")
        wait_for("m2's own address to be registered", lambda: ping(own, far.address, 1), 30)
        assert far.ping(own.address, count=2)
        rows = {m["address"]: m for m in machines_listed(gw)}
        assert rows[own.address]["static"] is True
        assert rows[machines[0].address]["static"] is False
        got = gw.cli("dht", "get", str(gw.config), f"ip:test:{own.address}")
        assert gw.extra["node_id"] in got.stdout  # the record names the router
        wait_for(
            "per-machine counters",
            lambda: any(
                m["address"] == own.address and m["to_overlay"] > 0 and m["from_overlay"] > 0
                for m in (gw.status() or {}).get("machines", [])
            ),
            timeout=5,
        )


def test_the_node_makes_its_bridge_when_asked(tmp_path: Path) -> None:
    with Testbed("rtb") as tb:
        ns = tb.namespace("gw")
        ns.ip("link", "set", "lo", "up")
        authority = Authority.create(tmp_path / "authority")
        authority.certify(tmp_path / "gw" / "state", "gw")
        lines = ('mode = "router"', 'bridge = "brx"', "create_bridge = true")
        config = node_config(
            tmp_path / "gw", "gw", underlay="127.0.0.1", virtual=None, ca=authority.path,
            domain=DOMAIN, network_lines=lines,
        )  # fmt: skip
        node = Node("gw", ns, config, "", "127.0.0.1", tmp_path / "gw")
        node.start()
        node.wait_running()
        ports = ns.run(["bridge", "link"]).stdout
        assert "master brx" in ports and ns.run(["ip", "link", "show", "brx"]).returncode == 0
        assert any(r.get("bridge_made") is True for r in node.log_records())
