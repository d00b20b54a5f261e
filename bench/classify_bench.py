"""The classifier core's cost per record: this tree's against an older revision's, in one run.

Usage (from the repo root)::

    python bench/classify_bench.py [--base deed5bd] [--frames 1000000] [--repeats 5]
    python bench/classify_bench.py --instructions --frames 100000     # needs valgrind

The older ``pipeline/classifier/classify.py`` is read with ``git show BASE:...`` into a
temporary package and imported beside this tree's classifiers (it imports the same
``pipeline.wire`` and ``pipeline.classifier.routes``). Both classify the same realistic mix,
per mode, as the stage drives them: batches of 64 records, the entry point fetched once per
batch, each verdict unpacked and dispatched on its action. The mix, per 1,020 records:

- interface mode: 440 routed IPv4 packets from the TAP and 440 from peers (60, 576 and
  1400 bytes; 50 peers), 40 ARP requests (answered), 20 DHCP, 20 DNS at the gateway, 20 to
  addresses without a route (RESOLVE), 10 from senders without one (VERIFY), 30 dropped
  (IPv6 neighbour discovery and multicast from the TAP, a spoofed source from a peer);
- router mode: the same from and to 20 machines of the segment, with the segment's own
  traffic (another network, between two machines) in place of the IPv6 and multicast.

Before timing, every distinct record is classified by both, and their verdicts must agree
(action, peer, bytes; a drop's reason from the counters). Each repeat times one pass of
``--frames`` records per classifier, old and new alternating first; the table gives the
median and min ns/record over the repeats and their ratio (new/old: above 1 is slower).
The Python loop that drives them is in both figures.

On a shared machine the clock is noisy; ``--instructions`` counts instead the instructions
executed per record (valgrind's cachegrind, ``PYTHONHASHSEED=0``): each side runs alone
with ``--frames`` records and with a tenth of them, and the difference is divided by the
difference in records, so start-up cancels out. Slower (about 50x), but the same on every run.
``--routed-only`` keeps only the routed IPv4 packets of the mix: the two hot paths alone.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from itertools import zip_longest
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.classifier.classify import Classifier, DropReason, FrameAction  # noqa: E402
from pipeline.classifier.interface import InterfaceClassifier  # noqa: E402
from pipeline.classifier.router import LocalHosts, RouterClassifier  # noqa: E402
from pipeline.classifier.routes import Routes  # noqa: E402
from pipeline.wire import arp, ethernet, ipv4, ipv6, udp  # noqa: E402

A = IPv4Address
SUBNET = IPv4Network("100.64.0.0/16")
ME = A("100.64.0.1")
GATEWAY = A("100.64.255.254")
TAP_MAC = bytes.fromhex("02aabbccdd01")
GW_MAC = bytes.fromhex("024156540001")
BATCH = 64
PEERS = [(slot, A(f"100.64.1.{slot}")) for slot in range(1, 51)]  # 50 links, one address each
MACHINES = [(A(f"100.64.0.{10 + i}"), bytes.fromhex(f"0200000000{10 + i:02x}")) for i in range(20)]
SIZES = (60, 576, 1400)

Record = tuple[int, memoryview]  # (peer slot, bytes) as a ring record holds them


def load_old(base: str) -> ModuleType:
    """``pipeline/classifier/classify.py`` at ``base``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{base}:pipeline/classifier/classify.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="classify_bench_") as tmp:
        package = Path(tmp) / "old_classifier"  # a package of its own: no name clashes
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "classify.py").write_text(source)
        spec = importlib.util.spec_from_file_location(
            "old_classifier.classify", package / "classify.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


# -- the mix ------------------------------------------------------------------------------------


def view(data: bytes) -> memoryview:
    return memoryview(bytearray(data))  # writable, as a ring record's data is


def packet(src: IPv4Address, dst: IPv4Address, size: int, dport: int = 5001) -> bytes:
    payload = udp.build(40000, dport, bytes(max(0, size - 28)))
    return ipv4.build(src=src, dst=dst, protocol=ipv4.Protocol.UDP, payload=payload)


def frame(
    src_mac: bytes, src: IPv4Address, dst: IPv4Address, size: int, dport: int = 5001
) -> bytes:
    return ethernet.build(GW_MAC, src_mac, ethernet.ETHERTYPE_IPV4, packet(src, dst, size, dport))


def arp_request(sender_mac: bytes, sender: IPv4Address, target: IPv4Address) -> bytes:
    request = arp.ArpPacket(arp.ArpOp.REQUEST, sender_mac, sender, bytes(6), target)
    return ethernet.build(
        ethernet.BROADCAST, sender_mac, ethernet.ETHERTYPE_ARP, arp.build(request)
    )


def neighbour_solicitation(src_mac: bytes) -> bytes:
    solicit = ipv6.build(
        src=IPv6Address("fe80::1"),
        dst=IPv6Address("ff02::1:ff00:2"),
        next_header=ipv6.NEXT_HEADER_ICMPV6,
        payload=bytes([135]) + bytes(23),
        hop_limit=255,
    )
    return ethernet.build(ethernet.BROADCAST, src_mac, ethernet.ETHERTYPE_IPV6, solicit)


def mix(router: bool, routed_only: bool = False) -> tuple[list[memoryview], list[Record]]:
    """1,020 records (880 if ``routed_only``): from the TAP, and from peers (slot, packet)."""
    inside: list[memoryview] = []
    outside: list[Record] = []
    hosts = MACHINES if router else [(ME, TAP_MAC)]
    for i in range(440):
        (slot, remote), (local, mac) = PEERS[i % len(PEERS)], hosts[i % len(hosts)]
        size = SIZES[i % len(SIZES)]
        inside.append(view(frame(mac, local, remote, size)))
        outside.append((slot, view(packet(remote, local, size))))
    if routed_only:
        return inside, outside
    for i in range(40):
        local, mac = hosts[i % len(hosts)]
        inside.append(view(arp_request(mac, local, PEERS[i % len(PEERS)][1])))
    for i in range(20):
        local, mac = hosts[i % len(hosts)]
        dhcp_port = 1067 if router else 67
        inside.append(view(frame(mac, A("0.0.0.0"), A("255.255.255.255"), 300, dhcp_port)))
        inside.append(view(frame(mac, local, GATEWAY, 60, 53)))
        inside.append(view(frame(mac, local, A(f"100.64.2.{i + 1}"), 100)))  # no route
    for i in range(10):
        local, mac = hosts[i % len(hosts)]
        outside.append((1, view(packet(A(f"100.64.3.{i + 1}"), local, 100))))  # no route: VERIFY
    for i in range(10):
        local, mac = hosts[i % len(hosts)]
        if router:  # the segment's own: another network, and between two machines
            other = MACHINES[(i + 1) % len(MACHINES)][0]
            inside.append(view(frame(bytes.fromhex("020000000099"), A("198.18.0.5"), other, 100)))
            inside.append(view(frame(mac, local, other, 100)))
        else:
            inside.append(view(neighbour_solicitation(mac)))
            inside.append(view(frame(mac, local, A("224.0.0.251"), 100)))
        outside.append((2, view(packet(PEERS[0][1], local, 100))))  # slot 1's address: spoofed
    return inside, outside


# -- the two generations --------------------------------------------------------------------------


def routes() -> Routes:
    return Routes.from_peers(1, [(slot, [address]) for slot, address in PEERS])


def make_new(router: bool) -> Classifier:
    core: Classifier
    if router:
        core = RouterClassifier(subnet=SUBNET, gateway_mac=GW_MAC, gateway=GATEWAY, dhcp_port=1067)
        core.apply_local(LocalHosts.from_leases(1, MACHINES))
    else:
        core = InterfaceClassifier(
            subnet=SUBNET, address=ME, tap_mac=TAP_MAC, gateway_mac=GW_MAC, gateway=GATEWAY
        )
    core.apply_routes(routes())
    return core


def make_old(old: ModuleType, router: bool) -> Any:
    core = old.Classifier(
        subnet=SUBNET,
        address=None if router else ME,
        tap_mac=TAP_MAC,
        gateway_mac=GW_MAC,
        gateway=GATEWAY,
        mode="router" if router else "interface",
        dhcp_port=1067 if router else 67,
    )
    if router:
        core.apply_local(old.LocalHosts.from_leases(1, MACHINES))
    core.apply_routes(routes())
    return core


def same_verdicts(
    old_core: Any, new_core: Classifier, records: list[tuple[int, memoryview]]
) -> None:
    """Every record gets the same verdict from both (peer -1: from the TAP)."""
    for peer, data in records:
        before = new_core.statistics().drops
        if peer < 0:
            was, now = old_core.from_inside(data), new_core.from_inside(data)
        else:
            was, now = old_core.from_outside(peer, data), new_core.from_outside(peer, data)
        after = new_core.statistics().drops
        assert int(was[0]) == int(now[0]) and was[1] == now[1], (was, now)
        if now[0] is FrameAction.DROP:
            counted = [r for r in DropReason if after[r] != before[r]]
            assert counted == [was[2]] and now[2] == b"", (was, counted)
        else:
            assert bytes(was[2]) == bytes(now[2])


# -- the driver: as the stage's _outbound and _inbound ---------------------------------------------


def one_pass(
    core: Any, actions: Any, inside: list[memoryview], outside: list[Record], n: int
) -> tuple[int, int]:
    """Classify at least ``n`` records (batches from the TAP and from peers, alternating):
    (ns taken, records)."""
    to_peer, to_tap, to_control = actions.TO_PEER, actions.TO_TAP, actions.TO_CONTROL
    resolve, verify = actions.RESOLVE, actions.VERIFY
    in_batches = [inside[i : i + BATCH] for i in range(0, len(inside), BATCH)]
    out_batches = [outside[i : i + BATCH] for i in range(0, len(outside), BATCH)]
    sent = [0] * 6
    done = 0
    start = time.perf_counter_ns()
    while done < n:
        for batch_in, batch_out in zip_longest(in_batches, out_batches, fillvalue=()):
            from_inside = core.from_inside
            for data in batch_in:
                action, peer, out = from_inside(data)
                if action is to_peer:
                    sent[0] += peer
                elif action is to_tap:
                    sent[1] += 1
                elif action is to_control:
                    sent[2] += 1
                elif action is resolve:
                    sent[3] += 1
            from_outside = core.from_outside
            for peer, data in batch_out:
                action, slot, out = from_outside(peer, data)
                if action is to_tap:
                    sent[4] += 1
                elif action is verify:
                    sent[5] += slot
            done += len(batch_in) + len(batch_out)
    return time.perf_counter_ns() - start, done


def count_instructions(base: str, modes: list[str], frames: int, routed: bool) -> None:
    """Instructions per record under valgrind (cachegrind, no cache simulation): one pass of
    ``frames`` records and one of a tenth of them, so that start-up cancels out."""
    what = "routed IPv4 only" if routed else "the mix"
    print(f"classify_bench: instructions per record (valgrind), {what}, old = {base}")
    print(f"{'mode':<10} {'old':>8} {'new':>8} {'new/old':>8}")
    for mode in modes:
        per_record = {}
        for side in ("old", "new"):
            (small, small_done), (large, large_done) = (
                _instructions(base, mode, side, n, routed) for n in (frames // 10, frames)
            )
            per_record[side] = (large - small) / (large_done - small_done)
        was, now = per_record["old"], per_record["new"]
        print(f"{mode:<10} {was:8.0f} {now:8.0f} {now / was:8.3f}")


def _instructions(base: str, mode: str, side: str, frames: int, routed: bool) -> tuple[int, int]:
    """(instructions executed, records classified) by one ``--only`` run under valgrind."""
    command = [
        *("valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"),
        *(sys.executable, __file__, "--only", side, "--modes", mode, "--base", base),
        *("--frames", str(frames)),
        *(("--routed-only",) if routed else ()),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    run = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    found = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
    assert found is not None, run.stderr
    return int(found.group(1).replace(",", "")), int(run.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base", default="deed5bd", help="the revision of the old classifier")
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="interface,router")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per record under valgrind instead of timing (see above)",
    )
    parser.add_argument(
        "--routed-only",
        action="store_true",
        help="only the routed IPv4 packets of the mix (the hot paths)",
    )
    parser.add_argument("--only", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:  # one pass of one side, under valgrind (see count_instructions)
        router = args.modes == "router"
        inside, outside = mix(router, args.routed_only)
        if args.only == "old":
            old = load_old(args.base)
            _, done = one_pass(make_old(old, router), old.Action, inside, outside, args.frames)
        else:
            _, done = one_pass(make_new(router), FrameAction, inside, outside, args.frames)
        print(done)
        return
    if args.instructions:
        count_instructions(args.base, args.modes.split(","), args.frames, args.routed_only)
        return
    old = load_old(args.base)
    what = "routed IPv4 only" if args.routed_only else "the mix"
    print(
        f"classify_bench: {args.frames} records x {args.repeats} repeats, {what}, old = {args.base}"
    )
    print(
        f"{'mode':<10} {'old ns':>8} {'new ns':>8} {'new/old':>8}   {'old min':>8} {'new min':>8}"
    )
    for mode in args.modes.split(","):
        router = mode == "router"
        inside, outside = mix(router, args.routed_only)
        old_core, new_core = make_old(old, router), make_new(router)
        same_verdicts(old_core, new_core, [(-1, d) for d in inside] + list(outside))
        results: dict[str, list[float]] = {}
        gc.disable()
        try:
            for r in range(args.repeats):
                order = [("old", old_core, old.Action), ("new", new_core, FrameAction)]
                for name, core, actions in order if r % 2 == 0 else order[::-1]:
                    ns, done = one_pass(core, actions, inside, outside, args.frames)
                    results.setdefault(name, []).append(ns / done)
        finally:
            gc.enable()
        was, now = statistics.median(results["old"]), statistics.median(results["new"])
        print(
            f"{mode:<10} {was:8.1f} {now:8.1f} {now / was:8.3f}   "
            f"{min(results['old']):8.1f} {min(results['new']):8.1f}"
        )


if __name__ == "__main__":
    main()
