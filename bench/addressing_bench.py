"""Self-configuring addresses, measured: time from `supervisor start` to a DHCP lease, the
delay of the first packet to a new destination (resolution through the DHT, then a link),
and DNS answer times (static names, host names through the DHT, foreign names refused).

Nodes in namespaces on two routed segments, as in the tests; a real ISC dhclient on each
TAP. Every figure is the median (and p90) of ``--repeats`` runs.

Usage: ``python3 bench/addressing_bench.py [--repeats 10] [--json FILE]`` (as root).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.testbed import Node, Testbed, routed_nodes  # noqa: E402

DOMAIN = "vpn.test"
GATEWAY = "100.64.0.254"


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return {
        "median": round(statistics.median(ordered), 3),
        "p90": round(p90, 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
        "n": len(ordered),
    }


def ping_rtts(node: Node, target: str, count: int) -> list[float | None]:
    """RTTs in ms by sequence number (None: lost), with one packet a 0.2 s."""
    res = node.ns.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "3", target], check=False, timeout=60
    )
    rtts: list[float | None] = [None] * count
    for seq, ms in re.findall(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms", res.stdout):
        if 1 <= int(seq) <= count:
            rtts[int(seq) - 1] = float(ms)
    return rtts


def dig_ms(node: Node, *args: str) -> tuple[float, str]:
    res = node.ns.run(["dig", "+tries=1", "+time=3", f"@{GATEWAY}", *args], check=False)
    found = re.search(r"Query time: (\d+) msec", res.stdout)
    status = re.search(r"status: (\w+)", res.stdout)
    return (float(found.group(1)) if found else float("nan")), (status.group(1) if status else "")


def restart(node: Node) -> float:
    """Stop the node and its DHCP client, make the client forget its lease, start the node
    and, as soon as its TAP exists, the client; seconds from the start to the lease."""
    assert node.dhcp_client is not None and node.proc is not None
    node.dhcp_client.stop()
    node.proc.terminate()
    node.proc.wait(timeout=30)
    for old in (node.root / "dhcp").glob("*lease*"):
        old.unlink()
    t0 = time.monotonic()
    node.start()
    while node.ns.run(["ip", "link", "show", "avn0"], check=False).returncode != 0:
        if time.monotonic() - t0 > 30:
            raise RuntimeError(f"{node.name}: no TAP 30 s after start")
        time.sleep(0.02)  # the client needs the device: the node's tap_reader makes it
    node.dhcp(timeout=60)
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="avn-adr-") as tmp, Testbed("adb") as tb:
        nodes = routed_nodes(tb, Path(tmp), (3, 2))
        for n in nodes:
            n.dhcp(wait=False)
        for n in nodes:
            n.wait_dhcp(timeout=60)
        print(f"{len(nodes)} nodes leased: " + ", ".join(f"{n.name} {n.address}" for n in nodes))
        mover = nodes[2]
        to_lease, first, steady = [], [], []
        for i in range(args.repeats):
            to_lease.append(restart(mover))
            # the first packets after a start go to destinations this node never resolved
            target = nodes[(i % 4) + (1 if (i % 4) >= 2 else 0)]
            if target is mover:
                target = nodes[0]
            rtts = ping_rtts(mover, target.address, 6)
            if rtts[0] is not None:
                first.append(rtts[0])
            steady += [r for r in rtts[2:] if r is not None]
            print(
                f"  start {i + 1}: lease after {to_lease[-1]:.2f} s; first ping to "
                f"{target.name} {rtts[0]} ms, then {rtts[2:]}",
                flush=True,
            )
        out["start_to_lease_s"] = summary(to_lease)
        out["first_packet_ms"] = summary(first) if first else None
        out["first_packet_lost"] = args.repeats - len(first)
        out["steady_rtt_ms"] = summary(steady)
        asker = nodes[0]
        static, host, cached, foreign = [], [], [], []
        for i in range(args.repeats):
            target = nodes[1 + i % (len(nodes) - 1)]
            octets = target.address.split(".")[1:]
            static.append(
                dig_ms(asker, "C" + "".join(f"{int(o):03d}" for o in octets) + ".vpn.test")[0]
            )
            foreign.append(dig_ms(asker, f"host{i}.example.com")[0])
        for i in range(args.repeats):  # each host name asked twice: from the DHT, then cached
            target = nodes[1 + i % (len(nodes) - 1)]
            ms, status = dig_ms(asker, f"{target.name}.{DOMAIN}")
            if i < len(nodes) - 1:
                host.append(ms)
            else:
                cached.append(ms)
        out["dns_static_ms"] = summary(static)
        out["dns_host_first_ms"] = summary(host)
        out["dns_host_cached_ms"] = summary(cached) if cached else None
        out["dns_foreign_refused_ms"] = summary(foreign)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
