"""UPnP IGD port mapping, live: a node behind the NAT lab's miniupnpd with NAT-PMP and PCP
turned off maps its overlay port through UPnP IGD (after PCP and NAT-PMP go unanswered),
advertises the mapped endpoint, and a peer behind a symmetric NAT (a new random port per
destination: punching alone never crosses it, ``test_nat_live``'s random-one-side case)
reaches it straight there; when the node stops, the mapping is gone from the gateway.

The lab and the overlay around the pair are ``test_nat_live``'s (``supervisor.testbed.nat_pair``):
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

from supervisor.testbed import NatPair, Node, Testbed, link_row, nat_pair, stop_all, wait_for
from supervisor.testbed.nat import Site

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]


@pytest.fixture
def upnp_pair(nat_testbed: Testbed, tmp_path: Path) -> Iterator[NatPair]:
    """A behind a UPnP-only gateway, B behind a symmetric NAT, both asking for mappings."""
    pair = nat_pair(
        nat_testbed, tmp_path, "upnp", "random", port_mapping=True, a_gateway={"natpmp": False}
    )
    try:
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
    upnp_pair: NatPair,
) -> None:
    pair = upnp_pair
    a, b = pair.a, pair.b
    site, site_b = pair.lab.sites
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
        row = link_row(b, a)
        return row if row and row["path"] == "direct" else None

    row = wait_for("b's link to a direct", direct, 90, every=0.5)
    print(row)
    assert row["endpoint"] == external
    assert b.ping(a.address, count=5)
    inbound = [
        e
        for e in site.conntrack()
        if e.protocol == "udp"
        and e.original[0] == site_b.wan_address
        and e.original[2:] == (site.wan_address, 4789)
        and e.reply[:2] == (pair.lab.address(a.ns), 4789)
    ]
    assert inbound, "no flow from B came in through the mapping (DNAT to A's LAN address)"

    # B's own gateway has no IGD: a counted failure, no crash
    def b_failed() -> dict[str, Any] | None:  # PCP, NAT-PMP, then SSDP: a few seconds
        picture = netcheck(b)
        return (
            picture["port_mapping"]
            if picture and picture["port_mapping"]["phase"] == "failed"
            else None
        )

    mapping_b = wait_for("B's port mapping to fail", b_failed, 30, every=0.5)
    assert mapping_b["external"] is None
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
