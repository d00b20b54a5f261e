"""The overlay live: six real nodes on one bridged segment, each given only the first node's
address and no static peers, form the overlay over authenticated links, register their
addresses in the DHT, ping a node they have no direct link with (relayed through the
overlay, encrypted end to end), and repair after two nodes are killed with SIGKILL.

In a ring of six every node is within the near links' reach of every other, so the test
makes a pair that cannot link directly: two nodes opposite each other on the circle (so
neither is among the other's two nearest on a side), with their underlay traffic to each
other dropped by iptables in their own namespaces."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.testbed import Node, Testbed, overlay_nodes, overlay_settled, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
def six(tmp_path: Path) -> Iterator[tuple[list[Node], tuple[Node, Node]]]:
    with Testbed("ovl") as tb:
        nodes = overlay_nodes(tb, tmp_path, 6, start=False)
        circle = sorted(nodes, key=lambda n: n.extra["node_id"])
        a, b = next(
            (n, circle[(i + 3) % 6])
            for i, n in enumerate(circle)
            if nodes[0] not in (n, circle[(i + 3) % 6])
        )
        for me, other in ((a, b), (b, a)):
            me.ns.run(["iptables", "-A", "INPUT", "-s", other.underlay, "-j", "DROP"])
            me.ns.run(["iptables", "-A", "OUTPUT", "-d", other.underlay, "-j", "DROP"])
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_running()
        yield nodes, (a, b)


def settled(nodes: list[Node], blocked: tuple[Node, Node]) -> list[dict[str, Any]] | None:
    """Every node joined and registered, and linked with its two true neighbours on each
    side among the live nodes (but for the blocked pair)."""
    return overlay_settled(nodes, frozenset(n.extra["node_id"] for n in blocked))


def direct(st: dict[str, Any]) -> set[str]:
    return {
        lk["node_id"]
        for lk in st["link_table"]
        if lk["up"] and not lk["endpoint"].startswith("via:")
    }


def relay_counters(nodes: list[Node]) -> dict[str, int]:
    total: dict[str, int] = {}
    for n in nodes:
        st = n.status()
        assert st is not None
        for w in st["workers"]:
            if w["stage"] == "overlay_io":
                for key in ("relay_sent", "relay_forwarded", "relay_delivered"):
                    total[key] = total.get(key, 0) + int(w["stats"].get(key, 0))
    return total


def readable(reader: Node, key: str) -> bool:
    res = reader.cli("dht", "get", str(reader.config), key, check=False, timeout=30)
    if res.returncode != 0:
        print(reader.name, key, res.returncode, res.stdout, res.stderr)
    return res.returncode == 0 and "found" in res.stdout.splitlines()[0]


def test_six_nodes_form_the_overlay_relay_and_repair(
    six: tuple[list[Node], tuple[Node, Node]],
) -> None:
    nodes, (a, b) = six
    sts = wait_for("the overlay to settle", lambda: settled(nodes, (a, b)), 60, every=0.5)
    ids = {n.name: st["node_id"] for n, st in zip(nodes, sts, strict=True)}
    assert ids[b.name] not in direct(sts[nodes.index(a)])
    before = relay_counters(nodes)
    assert a.ping(b.address, count=5, interval=0.3)
    assert b.ping(a.address, count=3, interval=0.3)
    after = relay_counters(nodes)
    assert after["relay_forwarded"] > before["relay_forwarded"]  # some node in between
    st_a = a.status()
    assert st_a is not None
    (row,) = [lk for lk in st_a["link_table"] if b.address in lk["routes"]]
    # relayed (the pair cannot reach each other), and an overlay neighbour through a tunnel
    # if they are near each other on the circle
    assert "relayed" in row["kind"].split("+") and row["endpoint"] == f"via:{ids[b.name]}"
    text = a.cli("status", str(a.config)).stdout
    assert "relayed" in text and "near" in text

    # Every node's address record is readable from every node, before and after the kill.
    keys = [f"ip:test:{n.address}" for n in nodes]
    for key in keys:
        assert readable(a, key), key
    res = a.cli("dht", "get", str(a.config), keys[0])
    assert ids[nodes[0].name] in res.stdout  # the record names the node

    # kill -9 two nodes that are neither end of the relayed pair (the first node, which
    # everybody bootstrapped from, among them), with their whole process tree
    victims = [n for n in nodes if n is not a and n is not b][:2]
    assert nodes[0] in victims
    for v in victims:
        st = v.status()
        assert st is not None and v.proc is not None
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        v.proc.wait(timeout=20)
    survivors = [n for n in nodes if n not in victims]
    dead = {v.extra["node_id"] for v in victims}

    def repaired() -> bool:
        sts = settled(survivors, (a, b))  # the circle closed again over the survivors ...
        return sts is not None and not any(  # ... and every link to the dead is closed
            lk["node_id"] in dead and lk["up"] for st in sts for lk in st["link_table"]
        )

    wait_for("the overlay to repair", repaired, 120, every=1.0)
    for reader in survivors:
        for n in survivors:
            assert readable(reader, f"ip:test:{n.address}"), (reader.name, n.name)
    wait_for("relayed traffic to resume", lambda: a.ping(b.address, count=2, interval=0.3), 60)
    assert b.ping(a.address, count=3, interval=0.3)
