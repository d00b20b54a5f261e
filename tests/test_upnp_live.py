"""UPnP IGD port mapping, live: a node behind the NAT lab's miniupnpd with NAT-PMP and PCP
turned off maps its overlay port through UPnP IGD (after PCP and NAT-PMP go unanswered),
advertises the mapped endpoint, and a peer behind a symmetric NAT (a new random port per
destination: punching alone never crosses it, ``test_nat_live``'s random-one-side case)
reaches it straight there; when the node stops, the mapping is gone from the gateway.

The lab and the overlay around the pair are ``test_nat_live``'s (``supervisor.testbed.nat``):
four public nodes, A and B on opposite sides of the circle, so that A and B link relayed
first and any direct path is the shortcut's doing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.testbed import Authority, Node, Testbed, member, start_all, stop_all, wait_for
from supervisor.testbed.nat import NatLab, Site
from tests.test_nat_live import circle_seeds, nat_testbed, registered, row_to

__all__ = ["nat_testbed"]  # the fixture, imported for this module's tests

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]


class UpnpPair:
    """A behind a UPnP-only gateway, B behind a symmetric NAT, four public nodes."""

    def __init__(self, testbed: Testbed, tmp: Path) -> None:
        self.lab = NatLab(testbed, tmp / "lab")
        self.nodes: list[Node] = []
        authority = Authority.create(tmp / "ca")
        seeds = circle_seeds(6)  # A at 0, B at 3, public nodes at 1, 2, 4, 5
        stun = ", ".join(f'"{h}:{p}"' for h, p in self.lab.stun_servers)
        publics: list[Node] = []
        for i, seat in enumerate((1, 2, 4, 5)):
            ns = self.lab.internet_host(f"p{i}")
            node = member(
                ns, tmp, authority, f"p{i}", self.lab.address(ns), f"100.64.0.{10 + i}",
                first=i == 0, bootstrap=(self.lab.address(publics[0].ns),) if publics else (),
                nat_lines=(f"stun_servers = [{stun}]", "port_mapping = false"), seed=seeds[seat],
            )  # fmt: skip
            publics.append(node)
        self.site_a = self.lab.gateway("upnp", natpmp=False)
        self.site_b = self.lab.gateway("random")
        ends = []
        for name, site, seat, virtual in (
            ("a", self.site_a, 0, "100.64.0.1"),
            ("b", self.site_b, 3, "100.64.0.2"),
        ):
            ns = site.host(name)
            node = member(
                ns, tmp, authority, name, self.lab.address(ns), virtual, first=False,
                bootstrap=(publics[0].underlay,), seed=seeds[seat],
                nat_lines=(f"stun_servers = [{stun}]", "port_mapping = true"),
            )  # fmt: skip
            ends.append(node)
        self.a, self.b = ends
        self.nodes = [*publics, *ends]

    def start(self) -> None:
        start_all(self.nodes)
        for node in self.nodes:
            wait_for(f"{node.name} registered", lambda n=node: registered(n), 60, every=0.5)

    def close(self) -> None:
        running = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        try:
            stop_all(running)
        finally:
            self.lab.close()


@pytest.fixture
def upnp_pair(nat_testbed: Testbed, tmp_path: Path) -> Iterator[UpnpPair]:
    pair = UpnpPair(nat_testbed, tmp_path)
    try:
        pair.start()
        yield pair
    finally:
        pair.close()


def netcheck(node: Node, *, json_out: bool = True) -> Any:
    args = ("--json",) if json_out else ()
    res = node.cli("netcheck", str(node.config), *args, check=False)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout) if json_out else res.stdout


def redirects(site: Site) -> list[tuple[int, str]]:
    """The gateway's port forwards (miniupnpd's nft rules): (external port, to LAN ip:port)."""
    found = re.findall(r"dport (\d+) dnat ip to ([\d.]+:\d+)", site.ruleset())
    return [(int(port), to) for port, to in found]


def test_a_node_maps_its_port_by_upnp_igd_and_a_symmetric_nat_peer_reaches_it(
    upnp_pair: UpnpPair,
) -> None:
    pair = upnp_pair
    a, b, site = pair.a, pair.b, pair.site_a
    lan_a = f"{pair.lab.address(a.ns)}:4789"

    def mapped() -> dict[str, Any] | None:
        picture = netcheck(a)
        return picture if picture and picture["port_mapping"]["external"] else None

    # PCP and NAT-PMP go unanswered (1.75 s each), then SSDP and SOAP: a few seconds
    picture = wait_for("A's port mapped", mapped, 30, every=0.5)
    mapping = picture["port_mapping"]
    print(json.dumps(mapping, indent=2))
    external = mapping["external"]
    assert mapping["protocol"] == "upnp"
    assert external == f"{site.wan_address}:4789"  # the node's own port, on the WAN address
    assert f"{external} mapped" in picture["candidates"]
    assert mapping["statistics"]["timeouts"] == 2  # PCP's and NAT-PMP's silence
    assert mapping["lifetime_s"] > 3600  # a lease (7200 s asked), renewed at half
    text = netcheck(a, json_out=False)
    print(text)
    assert f"port mapping        {external} (upnp, lease" in text
    assert (4789, lan_a) in redirects(site)  # miniupnpd's forward, made over SOAP
    assert "AddPortMapping" in site.miniupnpd_log()
    status = wait_for("A's status shows the mapping", lambda: a.status(), 10)
    assert (status.get("port_mapping") or {}).get("protocol") == "upnp"
    shown = a.cli("status", str(a.config)).stdout
    assert f"port mapping  {external} (upnp, lease" in shown

    # B, behind a NAT that maps per destination, reaches A straight at its mapping
    wait_for("a answers b, relayed at first", lambda: a.ping(b.address, count=1, wait=1), 30)

    def direct() -> dict[str, Any] | None:
        b.ping(a.address, count=2, interval=0.2, wait=1)
        row = row_to(b, a)
        return row if row and row["path"] == "direct" else None

    row = wait_for("b's link to a direct", direct, 90, every=0.5)
    print(row)
    assert row["endpoint"] == external
    assert b.ping(a.address, count=5)
    inbound = [
        e
        for e in site.conntrack()
        if e.protocol == "udp"
        and e.original[0] == pair.site_b.wan_address
        and e.original[2:] == (site.wan_address, 4789)
        and e.reply[:2] == (pair.lab.address(a.ns), 4789)
    ]
    assert inbound, "no flow from B came in through the mapping (DNAT to A's LAN address)"

    # B's own gateway has no IGD: a counted failure, no crash
    mapping_b = netcheck(b)["port_mapping"]
    assert mapping_b["external"] is None and mapping_b["phase"] == "failed"
    assert mapping_b["statistics"]["refused_no_igd"] >= 1
    failed = [r for r in b.log_records() if r.get("event") == "port_mapping_failed"]
    assert failed and failed[0]["reasons"] == {
        "pcp": "timeout", "nat-pmp": "timeout", "upnp": "no_igd"
    }  # fmt: skip

    # A stops: the mapping is deleted over SOAP before the control worker exits
    stop_all([a])
    assert not [r for r in redirects(site) if r[1] == lan_a]
    unmapped = [r for r in a.log_records() if r.get("event") == "port_unmapped"]
    assert [(r["protocol"], r["confirmed"]) for r in unmapped] == [("upnp", True)]
    assert "DeletePortMapping" in site.miniupnpd_log()
