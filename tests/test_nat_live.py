"""NAT traversal, live: two nodes behind Linux NAT gateways of every kind, in namespaces.

The lab (``supervisor.testbed.nat``, nodes placed by ``supervisor.testbed.nat_pair``): an
"internet" segment with STUN servers (stund and
coturn) and four public nodes, and sites behind gateways (``none``, ``eim`` = MASQUERADE,
``eim_open`` = MASQUERADE on a gateway that keeps the stale conntrack entry of an early
punch, ``random`` = MASQUERADE --random-fully, ``upnp`` = MASQUERADE with miniupnpd). Node
A sits behind one gateway, node B behind another (or the same: one LAN). Their keys are
chosen so that two public nodes lie between them on each side of the overlay's circle: A
and B are not overlay neighbours, so A reaches B first through the overlay (relayed), and
any direct path is the shortcut's doing.

For each case: the pair answers a ping at once, relayed; an iperf3 TCP stream started while
relayed runs through the switch to a direct path (when there is one) without a reset; and
the path ends direct where the NATs allow it, in the time the shortcut's rounds take. With
one port-randomising gateway (random-one-side) that is birthday probing's doing (A's
socket pool, B's spray: 98 % a round by the estimate, 5 of 5 in ``bench/nat_bench.py``,
1-4 s); with two (random-both) the pair stays relayed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.testbed import NatPair, Testbed, link_row, nat_pair, stop_all, wait_for
from supervisor.testbed.nodes import PORT

pytestmark = pytest.mark.netns


@pytest.fixture
def build(nat_testbed: Testbed, tmp_path: Path) -> Iterator[Any]:
    """``build(a_kind, b_kind, **options)``: a started ``nat_pair``, closed after the test."""
    made: list[NatPair] = []

    def _build(a_kind: str, b_kind: str | None, **options: bool) -> NatPair:
        pair = nat_pair(nat_testbed, tmp_path / f"pair{len(made)}", a_kind, b_kind, **options)
        made.append(pair)
        return pair

    try:
        yield _build
    finally:
        for pair in made:
            pair.close()


@dataclass
class Outcome:
    first_ping_s: float
    direct_after_s: float | None  # since the first ping; None: stayed relayed
    kind: str | None  # the candidate kind that worked
    iperf_ok: bool
    received_mbit: float
    birthday: bool = False  # the direct path was found in a round with birthday probing


IPERF_S = 12


def traverse(pair: NatPair, within: float, *, want_direct: bool) -> Outcome:
    """Ping until the first answer, then an iperf3 stream of ``IPERF_S`` seconds while
    watching a's link to b; with ``want_direct``, watch on (after the stream) until the
    path is direct or ``within`` seconds from the first answer have passed. The kind is the
    direct path's at the end (a reflexive path found first gives way to a local one)."""
    a, b = pair.a, pair.b
    start = time.monotonic()
    wait_for("a answers b, relayed at first", lambda: a.ping(b.address, count=1, wait=1), 30)
    first_ping = time.monotonic() - start
    # status shows what the workers' last heartbeat carried: the row may lag the ping
    wait_for("a's link to b in its status", lambda: link_row(a, b), 10, every=0.25)
    server = b.ns.popen(["iperf3", "-s", "-1", "-B", b.address], stdout=subprocess.DEVNULL)
    wait_for("iperf3 server", lambda: b.ns.run(["ss", "-ltn"]).stdout.count(":5201") > 0, 10)
    client = a.ns.popen(
        ["iperf3", "-c", b.address, "-t", str(IPERF_S), "-J"], stdout=subprocess.PIPE
    )
    direct_after = kind = None
    t_first = start + first_ping
    while client.poll() is None or (want_direct and time.monotonic() - t_first < within):
        if direct_after is None:
            row = link_row(a, b)
            if row and row["path"] == "direct":
                direct_after = time.monotonic() - t_first
                kind = (row.get("shortcut") or {}).get("kind")
        if direct_after is not None and client.poll() is not None:
            break
        time.sleep(0.5)
    out, _ = client.communicate(timeout=IPERF_S + 30)
    server.wait(timeout=10)
    birthday = False
    if direct_after is not None:  # the path it ended on: a found path yields to a local one
        row = link_row(a, b)  # that answers within a second (PREFER_LOCAL_S)
        shortcut = (row or {}).get("shortcut") or {}
        kind, birthday = shortcut.get("kind", kind), bool(shortcut.get("birthday"))
    result = json.loads(out or b"{}")
    received = result.get("end", {}).get("sum_received", {})
    ok = client.returncode == 0 and "error" not in result and received.get("bytes", 0) > 0
    mbit = received.get("bits_per_second", 0) / 1e6
    return Outcome(first_ping, direct_after, kind, ok, mbit, birthday)


def check_birthday_path(pair: NatPair) -> None:
    """A (behind the port-randomising gateway) found B by birthday probing: B's link to A
    points at a port A's gateway gave a socket of A's for B's endpoint, and that
    conntrack entry has seen B's answer come in (it is not ``[UNREPLIED]``). The socket is
    one of A's pool's as a rule; about once in 500 the spray meets the mapping of A's own
    port first (a path as good), so which one is printed, not asserted."""
    a_site, b_site = pair.lab.sites[0], pair.lab.sites[1]
    row = link_row(pair.b, pair.a)
    assert row is not None and row["path"] == "direct", row
    host, port = str(row["endpoint"]).rsplit(":", 1)
    assert host == a_site.wan_address
    a_lan = pair.lab.address(pair.a.ns)
    entries = [
        e
        for e in a_site.conntrack()
        if e.protocol == "udp"
        and e.original[0] == a_lan
        and e.original[2] == b_site.wan_address
        and e.reply[3] == int(port)
    ]
    print(f"A's gateway: {entries}")
    assert len(entries) == 1 and not entries[0].unreplied
    print("from a pool socket" if entries[0].original[1] != PORT else "from A's own port")


def check_chosen_relay(pair: NatPair) -> None:
    """Both gateways randomise: A and B chose one relay (``relay_chosen``, the member both
    reach with the least RTT sum), and A's relayed link to B goes through it (``via``)."""
    a, b = pair.a, pair.b

    def chosen(node: Any) -> str | None:
        found = [r["relay"] for r in node.log_records() if r.get("event") == "relay_chosen"]
        return found[-1] if found else None

    relay = wait_for("a relay chosen by both", lambda: chosen(a) and chosen(b), 10)
    print(f"relay chosen: {chosen(a)} (a), {chosen(b)} (b)")
    assert chosen(a) == relay
    row = link_row(a, b)
    assert row is not None and row["path"] == "relayed" and row["via"] == relay


# An ``eim_open`` gateway makes the outcome hang on who probes first: if its own node does,
# round 1 works; if the peer does, the peer's early probe leaves the stale entry, round 1
# fails and round 2 (after the shortcut's 35 s of quiet, the other side first) usually
# works. Which side probes first follows from the keys (the link's initiator), and the
# overlay's own Hellos may punch the pair through before any round: all three happen, and
# under heavy load round 2 has been seen to fail too. So those cases assert the relayed
# start and the stream, and report the rest (``bench/nat_bench.py`` counts it over repeats).
# Where direct must happen the wait is 60 s too: a round 1 lost to a loaded machine (seen
# once for masquerade-both) gets its round 2 at ~42 s; the time is printed, not asserted.
CASES = [
    # (name, a's gateway, b's gateway (None: a's LAN), direct: must / must not / None: may,
    #  seconds to wait for direct)
    ("no-nat", "none", "none", True, 60),
    ("masquerade-one-side", "eim", "none", True, 60),
    ("masquerade-both", "eim", "eim", True, 60),
    ("stale-conntrack-first", "eim_open", "eim", None, 60),
    ("stale-conntrack-second", "eim", "eim_open", None, 60),
    ("same-lan", "eim", None, True, 60),
    ("random-one-side", "random", "eim", True, 60),
    ("random-both", "random", "random", False, 12),
]


@pytest.mark.parametrize(
    ("a_kind", "b_kind", "direct", "within"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_a_pair_behind_nats_connects_relayed_then_direct_where_it_can(
    build: Any, a_kind: str, b_kind: str | None, direct: bool | None, within: int
) -> None:
    pair = build(a_kind, b_kind)
    outcome = traverse(pair, within, want_direct=direct is not False)
    print(f"{a_kind}/{b_kind}: {outcome}")
    assert outcome.first_ping_s < 15  # relayed at once, whatever the NATs
    assert outcome.iperf_ok  # the stream ran through (the switch, if any) without a reset
    if direct is None:
        assert pair.a.ping(pair.b.address, count=3)  # whichever path it ended on works
    elif direct:
        assert outcome.direct_after_s is not None, "the path stayed relayed"
        if b_kind is None:
            assert outcome.kind == "local"  # one LAN: no hairpin through the gateway
    else:
        assert outcome.direct_after_s is None
        assert pair.a.ping(pair.b.address, count=3)  # still relayed, still working
    if (a_kind, b_kind) == ("random", "eim"):
        assert outcome.birthday  # found by birthday probing
        check_birthday_path(pair)
    if (a_kind, b_kind) == ("random", "random"):
        check_chosen_relay(pair)


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
    row = link_row(b, a)
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


def test_supervisor_ping_and_netcheck_show_the_relay_and_the_mapping(build: Any) -> None:
    """A behind a port-randomising NAT, shortcuts off (birthday probing would make the pair
    direct within seconds): ``supervisor ping`` shows every probe relayed, via
    the node the overlay routes through, with its RTT; ``netcheck`` shows that A's mapping
    varies with the destination (the two STUN servers see two ports) and that B's (behind
    MASQUERADE) does not. (The line for a path change is tested in ``test_cli``: whether
    the first probe of a pair that can punch through goes relayed is a race.)"""
    pair = build("random", "eim", shortcuts=False)
    a, b = pair.a, pair.b
    res = a.cli("ping", str(a.config), b.address, "-c", "6", "-i", "0.5", timeout=60, check=False)
    print(res.stdout)
    assert res.returncode == 0
    pongs = [line for line in res.stdout.splitlines() if line.startswith("pong from b ")]
    assert len(pongs) >= 3
    assert all(re.search(r" relayed via node [0-9a-f]{16} in [\d.]+ ms$", p) for p in pongs)
    check_a = a.cli("netcheck", str(a.config)).stdout
    check_b = b.cli("netcheck", str(b.config)).stdout
    print(check_a, check_b, sep="\n")
    assert "mapping varies      yes" in check_a
    assert "mapping varies      no" in check_b
    assert "reflexive (STUN)    198.18.90.12:" in check_b
