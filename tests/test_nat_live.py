"""NAT traversal, live: two nodes behind Linux NAT gateways of every kind, in namespaces.

The lab (``supervisor.testbed.nat``): an "internet" segment with STUN servers (stund and
coturn) and four public nodes, and sites behind gateways (``none``, ``eim`` = MASQUERADE,
``eim_open`` = MASQUERADE on a gateway that keeps the stale conntrack entry of an early
punch, ``random`` = MASQUERADE --random-fully, ``upnp`` = MASQUERADE with miniupnpd). Node
A sits behind one gateway, node B behind another (or the same: one LAN). Their keys are
chosen so that two public nodes lie between them on each side of the overlay's circle: A
and B are not overlay neighbours, so A reaches B first through the overlay (relayed), and
any direct path is the shortcut's doing.

For each case: the pair answers a ping at once, relayed; an iperf3 TCP stream started while
relayed runs through the switch to a direct path (when there is one) without a reset; and
the path ends direct where the NATs allow it, in the time the shortcut's rounds take.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.crypto.identity import Identity
from supervisor.testbed import Authority, Node, Testbed, member, start_all, stop_all, wait_for
from supervisor.testbed.nat import NatLab, missing_programs

pytestmark = pytest.mark.netns


@pytest.fixture
def nat_testbed(testbed: Testbed) -> Testbed:
    missing = missing_programs()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the NAT lab needs Debian packages: {missing}")
        pytest.skip(f"the NAT lab needs Debian packages: {missing}")
    return testbed


def circle_seeds(count: int) -> list[bytes]:
    """``count`` key seeds, ordered by their nodes' place on the circle."""
    seeds = [os.urandom(32) for _ in range(count)]
    return sorted(seeds, key=lambda s: Identity.from_seed(s).node_id)


@dataclass
class Pair:
    lab: NatLab
    a: Node
    b: Node
    publics: list[Node]
    nodes: list[Node]


@pytest.fixture
def build(nat_testbed: Testbed, tmp_path: Path) -> Iterator[Any]:
    made: list[Pair] = []

    def _build(
        a_kind: str, b_kind: str | None, *, port_mapping: bool = False, roaming: bool = False
    ) -> Pair:
        lab = NatLab(nat_testbed, tmp_path / "lab")
        authority = Authority.create(tmp_path / "ca")
        seeds = circle_seeds(6)  # A at 0, B at 3, public nodes at 1, 2, 4, 5
        stun = ", ".join(f'"{h}:{p}"' for h, p in lab.stun_servers)
        nat_lines = (f"stun_servers = [{stun}]", f"port_mapping = {str(port_mapping).lower()}")
        publics = []
        for i, seat in enumerate((1, 2, 4, 5)):
            ns = lab.internet_host(f"p{i}")
            address = lab.address(ns)
            node = member(
                ns, tmp_path, authority, f"p{i}", address, f"100.64.0.{10 + i}",
                first=i == 0, bootstrap=(lab.address(publics[0].ns),) if publics else (),
                nat_lines=nat_lines, seed=seeds[seat],
            )  # fmt: skip
            publics.append(node)
        seed_node = publics[0].underlay
        site_a = lab.gateway(a_kind)
        site_b = site_a if b_kind is None else lab.gateway(b_kind)
        ends = []
        for name, site, seat, virtual in (
            ("a", site_a, 0, "100.64.0.1"),
            ("b", site_b, 3, "100.64.0.2"),
        ):
            ns = site.host(name)
            address = "0.0.0.0" if roaming and name == "a" else lab.address(ns)
            node = member(
                ns, tmp_path, authority, name, address, virtual, first=False,
                bootstrap=(seed_node,), nat_lines=nat_lines, seed=seeds[seat],
            )  # fmt: skip
            ends.append(node)
        nodes = [*publics, *ends]
        pair = Pair(lab, ends[0], ends[1], publics, nodes)
        made.append(pair)
        start_all(nodes)
        for node in nodes:
            wait_for(f"{node.name} registered", lambda n=node: registered(n), 60, every=0.5)
        return pair

    try:
        yield _build
    finally:
        for pair in made:
            stop_all([n for n in pair.nodes if n.proc is not None and n.proc.poll() is None])
            pair.lab.close()


def registered(node: Node) -> bool:
    st = node.status()
    return bool(st and (st.get("overlay") or {}).get("registered"))


def row_to(node: Node, other: Node) -> dict[str, Any] | None:
    st = node.status()
    if not st:
        return None
    rows = [r for r in st["link_table"] if other.address in r["routes"]]
    return rows[0] if rows else None


@dataclass
class Outcome:
    first_ping_s: float
    direct_after_s: float | None  # since the first ping; None: stayed relayed
    kind: str | None  # the candidate kind that worked
    iperf_ok: bool
    received_mbit: float


def traverse(pair: Pair, seconds: int, *, want_direct: bool) -> Outcome:
    a, b = pair.a, pair.b
    start = time.monotonic()
    wait_for("a answers b, relayed at first", lambda: a.ping(b.address, count=1, wait=1), 30)
    first_ping = time.monotonic() - start
    # status shows what the workers' last heartbeat carried: the row may lag the ping
    wait_for("a's link to b in its status", lambda: row_to(a, b), 10, every=0.25)
    server = b.ns.popen(["iperf3", "-s", "-1", "-B", b.address], stdout=subprocess.DEVNULL)
    wait_for("iperf3 server", lambda: b.ns.run(["ss", "-ltn"]).stdout.count(":5201") > 0, 10)
    client = a.ns.popen(
        ["iperf3", "-c", b.address, "-t", str(seconds), "-J"], stdout=subprocess.PIPE
    )
    t_iperf = time.monotonic()
    direct_after = kind = None
    while time.monotonic() - t_iperf < seconds:
        row = row_to(a, b)
        if row and row["path"] == "direct" and direct_after is None:
            direct_after = time.monotonic() - start - first_ping
            kind = (row.get("shortcut") or {}).get("kind")
            if not want_direct:
                break
        time.sleep(0.5)
    out, _ = client.communicate(timeout=seconds + 30)
    server.wait(timeout=10)
    result = json.loads(out or b"{}")
    received = result.get("end", {}).get("sum_received", {})
    ok = client.returncode == 0 and "error" not in result and received.get("bytes", 0) > 0
    return Outcome(first_ping, direct_after, kind, ok, received.get("bits_per_second", 0) / 1e6)


CASES = [
    # (name, a's gateway, b's gateway (None: a's LAN), direct expected, iperf3 seconds)
    ("no-nat", "none", "none", True, 12),
    ("masquerade-one-side", "eim", "none", True, 12),
    ("masquerade-both", "eim", "eim", True, 12),
    ("stale-conntrack-first", "eim_open", "eim", True, 12),  # the open gateway's node starts
    ("stale-conntrack-second", "eim", "eim_open", True, 55),  # ...or answers: round 2
    ("same-lan", "eim", None, True, 12),
    ("random-one-side", "random", "eim", False, 12),
    ("random-both", "random", "random", False, 12),
]


@pytest.mark.parametrize(
    ("a_kind", "b_kind", "direct", "seconds"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_a_pair_behind_nats_connects_relayed_then_direct_where_it_can(
    build: Any, a_kind: str, b_kind: str | None, direct: bool, seconds: int
) -> None:
    pair = build(a_kind, b_kind)
    outcome = traverse(pair, seconds, want_direct=direct)
    print(f"{a_kind}/{b_kind}: {outcome}")
    assert outcome.first_ping_s < 15  # relayed at once, whatever the NATs
    assert outcome.iperf_ok  # the stream ran through (the switch, if any) without a reset
    if direct:
        assert outcome.direct_after_s is not None, "the path stayed relayed"
        if b_kind is None:
            assert outcome.kind == "local"  # one LAN: no hairpin through the gateway
    else:
        assert outcome.direct_after_s is None
        assert pair.a.ping(pair.b.address, count=3)  # still relayed, still working


def test_a_port_mapped_endpoint_is_advertised_used_and_given_back(build: Any) -> None:
    """Behind a miniupnpd gateway A maps its port (PCP or NAT-PMP), netcheck shows it, B
    (behind plain MASQUERADE) reaches A straight at it, and the mapping is gone after A
    stops."""
    pair = build("upnp", "eim", port_mapping=True)
    a, b = pair.a, pair.b

    def mapped() -> dict[str, Any] | None:
        res = a.cli("netcheck", str(a.config), "--json", check=False)
        if res.returncode != 0:
            return None
        picture: dict[str, Any] = json.loads(res.stdout)
        return picture if picture["port_mapping"]["external"] else None

    picture = wait_for("A's port mapped", mapped, 30, every=0.5)
    assert picture["port_mapping"]["protocol"] in ("pcp", "natpmp")
    external = picture["port_mapping"]["external"]
    outcome = traverse(pair, 12, want_direct=True)
    assert outcome.direct_after_s is not None and outcome.iperf_ok
    row = row_to(b, a)
    assert row is not None and row["path"] == "direct"
    site = pair.lab.sites[0]
    assert str(external).split(":")[1] in site.ruleset()
    stop_all([a])
    wait_for(
        "the mapping given back", lambda: str(external).split(":")[1] not in site.ruleset(), 15
    )


def test_a_node_whose_address_changes_resumes_its_flows(build: Any) -> None:
    """A's LAN address changes under a running ping and iperf3 stream (the node is bound to
    0.0.0.0): it notices (netlink), handshakes again from the new address, and both resume."""
    pair = build("eim", "none", roaming=True)
    a, b = pair.a, pair.b
    assert wait_for("a reaches b", lambda: a.ping(b.address, count=1, wait=1), 30)
    server = b.ns.popen(["iperf3", "-s", "-1", "-B", b.address], stdout=subprocess.DEVNULL)
    wait_for("iperf3 server", lambda: b.ns.run(["ss", "-ltn"]).stdout.count(":5201") > 0, 10)
    client = a.ns.popen(["iperf3", "-c", b.address, "-t", "20", "-J"], stdout=subprocess.PIPE)
    pinger = a.ns.popen(["ping", "-n", "-i", "0.1", "-c", "200", b.address], stdout=subprocess.PIPE)
    time.sleep(4)
    old = pair.lab.address(a.ns)
    prefix = old.rsplit(".", 1)[0]
    a.ns.ip("addr", "del", f"{old}/24", "dev", "eth0")  # (takes the default route with it)
    a.ns.ip("addr", "add", f"{prefix}.77/24", "dev", "eth0")
    a.ns.ip("route", "replace", "default", "via", f"{prefix}.1")
    out, _ = client.communicate(timeout=60)
    ping_out, _ = pinger.communicate(timeout=60)
    server.wait(timeout=10)
    result = json.loads(out or b"{}")
    assert client.returncode == 0 and "error" not in result
    seqs = [int(m) for m in re.findall(r"icmp_seq=(\d+)", ping_out.decode())]
    gaps = [b - a for a, b in zip(seqs, seqs[1:], strict=False)]
    longest = (max(gaps) - 1) * 0.1 if gaps else 20.0
    print(f"ping: {len(seqs)} of 200 answered, longest gap {longest:.1f} s")
    assert len(seqs) >= 150 and longest <= 3.0
    assert any(r.get("event") == "addresses_moved" for r in a.log_records())


def test_supervisor_ping_and_netcheck_show_the_path_change(build: Any) -> None:
    """Both behind MASQUERADE: ``supervisor ping`` shows the first probes relayed (via the
    node the overlay routes through) while the punch is under way, then a line for the
    change, then direct probes; ``supervisor netcheck`` shows where STUN sees the node (one
    port for both servers)."""
    pair = build("eim", "eim")
    a, b = pair.a, pair.b
    res = a.cli("ping", str(a.config), b.address, "-c", "20", "-i", "0.5", timeout=60, check=False)
    text = res.stdout
    print(text)
    assert res.returncode == 0
    assert "relayed via node" in text and "direct via 198.18.90." in text
    assert "path changed: relayed via node" in text
    check = a.cli("netcheck", str(a.config)).stdout
    print(check)
    assert "mapping varies      no" in check
    assert "reflexive (STUN)    198.18.90.11:" in check
