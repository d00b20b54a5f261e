"""Router mode, live: one node (gw) whose TAP is a port of its segment's bridge serves three
machines (namespaces on veths into the bridge) that install nothing but a DHCP client
pointed at the node's DHCP port; a remote node (far) in interface mode across the overlay.
Every machine gets an address, reaches the remote node by address and by name and is
reached by it; machines talk to each other on L2 without the node's pipeline; the node
lists its machines; a router restart keeps every machine's address."""

from __future__ import annotations

import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from supervisor.lab import DOMAIN, Machine, Node, router_segment, wait_for
from supervisor.netns import Testbed

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
