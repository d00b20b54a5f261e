"""Bounded work per member and records with authority, live (issue 13, items 1 and 5).

- A certified member (the product's LinkManager with its own key and certificate, driven by
  ``tests.junk_member`` in its namespace) sends a real node 5,000
  ``ConnectRequest``s naming made-up addresses of 198.19.128.0/17: the node's control
  spends as much CPU per message on the last thousand as on the first, not one datagram
  leaves the node's namespace toward those addresses (an iptables rule with a counter in
  its OUTPUT chain, checked to count first), and a real node that joins afterwards links.
- A member of another virtual network sharing the overlay cannot take an address or a
  name of ours: its DHT records are refused (and counted), and our node registers the
  address and is reached at it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.testbed import Node, Testbed, overlay_nodes, wait_for
from tests.junk_member import JUNK_NETWORK, ask, launch

pytestmark = pytest.mark.netns

BATCH = 1000
BATCHES = 5
RATE = 700.0  # junk messages a second: below what the control ring takes, above nothing


def cpu_s(pid: int) -> float:
    """CPU seconds a process has run (the scheduler's count, in ns: no 10 ms ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def output_counter(node: Node) -> int:
    """Packets the node's namespace tried to send to the made-up addresses."""
    out = node.ns.run(["iptables", "-L", "OUTPUT", "-v", "-x", "-n"]).stdout
    rows = [line.split() for line in out.splitlines() if JUNK_NETWORK in line]
    assert len(rows) == 1, out
    return int(rows[0][0])


def routing(node: Node) -> dict[str, Any]:
    st = node.status()
    assert st is not None and st.get("overlay"), st
    overlay: dict[str, Any] = st["overlay"]
    return overlay


def test_junk_connect_requests_cost_a_flat_amount_and_aim_nothing(tmp_path: Path) -> None:
    with Testbed("mbj") as tb:
        n1, n2, n3 = overlay_nodes(tb, tmp_path, 3, start=False)
        # n1 may send to the made-up addresses (a route), and counts whatever it would
        n1.ns.ip("route", "add", JUNK_NETWORK, "via", "198.18.0.254")
        n1.ns.run(["iptables", "-I", "OUTPUT", "-d", JUNK_NETWORK, "-j", "DROP"])
        probe = "import socket; socket.socket(2, 2).sendto(b'x', ('198.19.130.7', 4789))"
        n1.ns.run([sys.executable, "-c", probe], check=False)  # EPERM: dropped
        assert output_counter(n1) == 1  # the counter counts
        n1.ns.run(["iptables", "-Z", "OUTPUT"])
        assert output_counter(n1) == 0
        n1.start()
        n1.wait_running()
        control = n1.worker_pid("control")
        proc = launch(n1, n2, tmp_path / "junk_member.err", n1.source_tree)
        try:
            costs = []
            for _ in range(BATCHES):
                before = cpu_s(control)
                assert ask(proc, f"junk {BATCH} {RATE}") == f"sent {BATCH}"
                time.sleep(0.3)  # the last ones through the rings
                costs.append((cpu_s(control) - before) / BATCH * 1000)
            stats = json.loads(ask(proc, "stats"))
        finally:
            ask(proc, "quit")
            tb.stop(proc)
        ms = ", ".join(f"{c:.3f}" for c in costs)
        print(f"control CPU per junk message, by thousand: {ms} ms; member got {stats}")
        ov = routing(n1)
        answered = ov["overlay"].get("connects_answered", 0)
        assert answered >= 0.9 * BATCH * BATCHES, ov["overlay"]  # the node did take them
        assert ov["overlay"].get("connect_replies_unroutable", 0) >= 0.4 * BATCH * BATCHES
        # flat: the last thousand cost no more than the first (2x: a busy machine)
        assert costs[-1] <= 2 * costs[0] + 0.02, costs
        assert output_counter(n1) == 0  # not one datagram toward a made-up address
        st = n1.status()
        assert st is not None
        assert not [r for r in st["link_table"] if r["endpoint"].startswith("198.19.")]
        assert len(st["link_table"]) <= 2
        # a real node still links
        n3.start()
        n3.wait_running()
        wait_for(
            "n3 to link with n1",
            lambda: any(
                r["up"] and r["node_id"] == n3.extra["node_id"]
                for r in (n1.status() or {}).get("link_table", [])
            ),
            timeout=30,
        )
        wait_for(  # once n3 has registered its address: n1 resolves it and pings
            "n1 pinging n3", lambda: n1.ping(n3.address, count=1, wait=1), timeout=20
        )
        assert output_counter(n1) == 0


def foreign(node: Node, mine: str, theirs: str) -> None:
    """Certify ``node`` for virtual network ``mine`` only, sharing the overlay with
    ``theirs``."""
    node.extra["authority"].certify(node.root / "state", node.name, networks=(mine,))
    text = node.config.read_text().replace('namespace = "test"', f'namespace = "{mine}"')
    node.config.write_text(text.replace("[overlay]", f'[overlay]\nnetworks = ["{theirs}"]'))


def test_a_foreign_networks_member_cannot_block_our_address(tmp_path: Path) -> None:
    with Testbed("mbf") as tb:
        n1, n2, n3 = overlay_nodes(tb, tmp_path, 3, start=False)
        foreign(n1, "test", "other")
        foreign(n2, "test", "other")
        foreign(n3, "other", "test")
        for n in (n1, n3):
            n.start()
        for n in (n1, n3):
            n.wait_running()

        def joined(n: Node) -> bool:
            return ((n.status() or {}).get("overlay") or {}).get("state") == "joined"

        wait_for("both joined", lambda: all(joined(n) for n in (n1, n3)))
        # n3 (of "other") signs records for n2's address and name in "test"
        node_id = n3.extra["node_id"]
        for key, value in ((f"ip:test:{n2.address}", node_id), ("name:test:n2", node_id)):
            res = n3.cli("dht", "put", str(n3.config), key, value, "--hex", check=False)
            assert res.returncode == 2 and "refused" in res.stdout, (res.stdout, res.stderr)

        def refused() -> bool:  # where the records were refused (status lags a heartbeat)
            counts = [routing(n)["dht"].get("refused_record_wrong_network", 0) for n in (n1, n3)]
            return sum(counts) >= 2

        wait_for("the refusals counted", refused, timeout=10)
        res = n1.cli("dht", "get", str(n1.config), f"ip:test:{n2.address}", check=False)
        assert res.returncode == 2, res.stdout  # nothing is held for it
        # the address is ours to take: n2 registers it and is reached there
        n2.start()
        n2.wait_running()
        wait_for(
            "n2 registered",
            lambda: ((n2.status() or {}).get("overlay") or {}).get("registered"),
            timeout=30,
        )
        assert n1.ping(n2.address, count=2)
        # and n3's own network's keys it may hold
        res = n3.cli("dht", "put", str(n3.config), "ip:other:100.64.0.99", node_id, "--hex")
        assert res.returncode == 0, res.stdout
