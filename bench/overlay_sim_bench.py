"""The structured overlay at scale, in the simulator: join time, hops, maintenance traffic.

For each size N (default 1,000 and 10,000) it grows an overlay of N simulated nodes (the
same ``OverlayNode`` code as live) on a wide-area-like network (per-pair one-way latency
log-normal, median 40 ms), each new node joining through 3 random live nodes, ``--rate``
nodes per virtual second. Then it lets the overlay settle and measures:

- join time: virtual seconds from a node's start to its ``Joined`` event (mean, p99);
- the ring: nodes whose successor or predecessor is wrong (should be 0);
- hops: greedy walks through the routing tables between random live nodes
  (``--pairs``), and real ``send_to_node`` messages through the simulated network
  (``--probes``): mean and p99, against log2 N and the target ½·log2 N + 2;
- maintenance traffic: datagrams and bytes each node sends per second over
  ``--window`` virtual seconds with no application traffic and no churn, by type;
- the cost of the simulation itself: wall seconds and events.

Then the DHT on top (``pipeline.sim.dht.DhtSim``), for each size in ``--dht-sizes`` and each
churn rate in ``--churn`` (fraction of the nodes replaced per minute: a crash and a new
join each, as a Poisson process): ``--records`` records (default one per node, lease
600 s) created by random owners (a create that fails is retried 20 s later, 3 rounds);
then churn starts; over ``--dht-traffic-s`` virtual seconds of churn without gets it
measures everything the nodes send (overlay and DHT maintenance, joins of the new nodes,
handovers, renewals) per live node per second; then, churn going on, ``--gets-per-s`` gets
from random live nodes of random records over ``--dht-gets-s`` seconds: the share that
returns exactly the record created (gets whose requester crashed before the answer are
left out and counted apart).

Usage: ``python3 bench/overlay_sim_bench.py [--sizes 1000,10000] [--dht-sizes 1000]
[--churn 0.01,0.1] [--seed 1] [--json FILE]`` (an empty ``--sizes`` or ``--dht-sizes``
skips that part). It prints progress lines while it runs, then the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.control.dht import CreateResult, GetResult  # noqa: E402
from pipeline.sim import ChurnAction, OverlaySim, poisson_churn  # noqa: E402
from pipeline.sim.dht import DhtSim  # noqa: E402

LEASE = 600.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    size: int, *, seed: int, rate: float, settle: float, pairs: int, probes: int, window: float
) -> dict[str, object]:
    wall0 = time.perf_counter()

    def say(what: str) -> None:
        print(
            f"  [N={size}] {time.perf_counter() - wall0:7.1f} s wall, t={sim.now:7.1f}: {what}",
            flush=True,
        )

    sim = OverlaySim(seed=seed)
    sim.add_node()
    sim.run_for(1.0)
    step = max(1, size // 10)
    for i in range(1, size):
        sim.add_node()
        sim.run_for(1.0 / rate)
        if (i + 1) % step == 0:
            say(f"{i + 1} nodes, {sim.sim.steps} events")
    grown = sim.now
    sim.run_for(settle)
    say(f"settled {settle:.0f} s")
    circle_errors = sim.circle_errors(limit=size)
    not_joined = len(sim.not_joined())
    joins = [n.joined - n.started for n in sim.live() if n.joined is not None]
    walks = sim.routing_check(pairs)
    keys = sim.routing_check(pairs, keys=True)
    say(f"circle errors {len(circle_errors)}, walks ok {walks.success:.4f}")
    probe = sim.probe(probes, wait=10.0)
    say(f"probes ok {probe.success:.4f}")
    traffic = sim.traffic(window)
    say(f"traffic {traffic.datagrams_per_node_s:.2f} datagrams/node/s")
    connections = [len(n.node.connections()) for n in sim.live()]
    estimates = [n.node.estimated_size() for n in sim.live()]
    hops = [float(h) for h in walks.hops]
    probe_hops = [float(h) for h in probe.hops]
    return {
        "nodes": size,
        "seed": seed,
        "join_rate": rate,
        "grow_s": grown,
        "join_mean_s": statistics.fmean(joins) if joins else math.nan,
        "join_p99_s": percentile(joins, 0.99),
        "not_joined": not_joined,
        "circle_errors": len(circle_errors),
        "walk_success": walks.success,
        "key_walk_success": keys.success,
        "hops_mean": statistics.fmean(hops) if hops else math.nan,
        "hops_p99": percentile(hops, 0.99),
        "hops_max": max(hops, default=math.nan),
        "probe_success": probe.success,
        "probe_hops_mean": statistics.fmean(probe_hops) if probe_hops else math.nan,
        "probe_hops_p99": percentile(probe_hops, 0.99),
        "log2_n": math.log2(size),
        "target_hops": 0.5 * math.log2(size) + 2,
        "connections_mean": statistics.fmean(connections),
        "connections_max": max(connections),
        "estimate_median": statistics.median(estimates),
        "maintenance_datagrams_per_node_s": traffic.datagrams_per_node_s,
        "maintenance_bytes_per_node_s": traffic.bytes_per_node_s,
        "maintenance_by_type": traffic.by_type_per_node_s,
        "events": sim.sim.steps,
        "wall_s": time.perf_counter() - wall0,
    }


def run_dht(
    size: int,
    churn: float,
    *,
    seed: int,
    rate: float,
    records: int,
    traffic_s: float,
    gets_s: float,
    gets_per_s: float,
) -> dict[str, object]:
    wall0 = time.perf_counter()

    def say(what: str) -> None:
        print(
            f"  [DHT N={size} churn {churn:.0%}/min] {time.perf_counter() - wall0:7.1f} s wall,"
            f" t={sim.now:7.1f}: {what}",
            flush=True,
        )

    sim = DhtSim(seed=seed)
    rng = random.Random(seed)
    sim.add_node()
    sim.run_for(1.0)
    sim.grow(size - 1, rate=rate)
    sim.run_for(30.0)
    say(f"grown, circle errors {len(sim.circle_errors(limit=size))}")
    keys = [b"ip:bench:%d" % i for i in range(records)]
    made: dict[bytes, bytes] = {}
    create_failed = 0
    for attempt in range(3):
        if attempt:
            sim.run_for(20.0)
        pending: dict[bytes, tuple[int, bytes]] = {}
        for key in keys:
            if key not in made:
                owner = rng.choice(sim.live())
                value = bytes(sim.dht(owner.address).identity.node_id)
                pending[key] = (sim.create(owner.address, key, value, LEASE), value)
        sim.wait([rid for rid, _ in pending.values()], timeout=20.0)
        for key, (rid, value) in pending.items():
            result = sim.results.get(rid)
            if isinstance(result, CreateResult) and result.ok:
                made[key] = value
            else:
                create_failed += 1
    say(f"{len(made)} of {records} records created ({create_failed} create attempts failed)")
    # Churn: churn * size nodes replaced a minute, each a crash and a join.
    per_s = churn * size / 60.0
    start = sim.now
    stop = start + traffic_s + gets_s + 20.0
    mix = {ChurnAction.CRASH: 1.0, ChurnAction.JOIN: 1.0}
    sim.schedule_churn(
        poisson_churn(rng, start=start, stop=stop, rate=2 * per_s, mix=mix), min_live=size // 2
    )
    live_sum, samples = 0, 0
    datagrams0, bytes0 = sim.sim.datagrams_sent, sim.sim.bytes_sent
    t0 = sim.now
    while sim.now < t0 + traffic_s:
        sim.run_for(5.0)
        live_sum += len(sim.live())
        samples += 1
    nodes = live_sum / max(samples, 1)
    span = sim.now - t0
    datagrams = (sim.sim.datagrams_sent - datagrams0) / nodes / span
    bytes_ = (sim.sim.bytes_sent - bytes0) / nodes / span
    say(f"maintenance under churn {datagrams:.2f} datagrams/node/s")
    key_list = list(made)
    asked: list[tuple[int, int, bytes]] = []
    gap = 1.0 / gets_per_s
    t1 = sim.now
    while sim.now < t1 + gets_s:
        requester = rng.choice(sim.live())
        key = rng.choice(key_list)
        asked.append((sim.get(requester.address, key), requester.address, made[key]))
        sim.run_for(gap)
    sim.wait([rid for rid, _, _ in asked], timeout=20.0)
    ok = lost_requester = 0
    failures: Counter[str] = Counter()
    for rid, address, want in asked:
        result = sim.results.get(rid)
        if result is None and not sim.nodes[address].alive:
            lost_requester += 1
        elif isinstance(result, GetResult) and [r.value for r in result.records] == [want]:
            ok += 1
        elif isinstance(result, GetResult):
            if result.records:
                failures["wrong_record"] += 1
            else:
                failures["not_found" if result.ok else result.reason or "failed"] += 1
        else:
            failures["no_answer"] += 1
    counted = len(asked) - lost_requester
    success = ok / counted if counted else math.nan
    say(f"gets ok {success:.4f} ({ok}/{counted}), failures {dict(failures)}")
    return {
        "nodes": size,
        "churn_per_min": churn,
        "seed": seed,
        "records": len(made),
        "create_failures": create_failed,
        "crashes": sim.events_seen["churn_crash"],
        "joins": sim.events_seen["churn_join"],
        "maintenance_datagrams_per_node_s": datagrams,
        "maintenance_bytes_per_node_s": bytes_,
        "gets": counted,
        "gets_ok": ok,
        "get_success": success,
        "gets_requester_crashed": lost_requester,
        "get_failures": dict(failures),
        "events": sim.sim.steps,
        "wall_s": time.perf_counter() - wall0,
    }


def dht_table(results: list[dict[str, object]]) -> str:
    rows = [
        ("nodes", "nodes", "{:.0f}"),
        ("churn (nodes replaced/min)", "churn_per_min", "{:.0%}"),
        ("records", "records", "{:.0f}"),
        ("create attempts failed", "create_failures", "{:.0f}"),
        ("crashes + joins", None, ""),
        ("maintenance datagrams/node/s", "maintenance_datagrams_per_node_s", "{:.2f}"),
        ("maintenance bytes/node/s", "maintenance_bytes_per_node_s", "{:.0f}"),
        ("gets (requester stayed up)", "gets", "{:.0f}"),
        ("get success", "get_success", "{:.4f}"),
        ("simulated events", "events", "{:.0f}"),
        ("wall seconds", "wall_s", "{:.1f}"),
    ]
    width = max(len(label) for label, _, _ in rows)
    heads = [f"N={r['nodes']} {r['churn_per_min']:.0%}" for r in results]
    lines = [
        f"| {'':<{width}} | " + " | ".join(f"{h:>12}" for h in heads) + " |",
        f"| {'-' * width} | " + " | ".join("-" * 12 for _ in results) + " |",
    ]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{str(r['crashes']) + ' + ' + str(r['joins']):>12}" for r in results]
        else:
            cells = []
            for r in results:
                value = r[key]
                assert isinstance(value, int | float)
                cells.append(f"{fmt.format(value):>12}")
        lines.append(f"| {label:<{width}} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("failed gets by cause:")
    for r, h in zip(results, heads, strict=True):
        lines.append(f"  {h}: {r['get_failures'] or 'none'}")
    return "\n".join(lines)


def table(results: list[dict[str, object]]) -> str:
    rows = [
        ("nodes", "nodes", "{:.0f}"),
        ("join time mean (virtual s)", "join_mean_s", "{:.2f}"),
        ("join time p99 (virtual s)", "join_p99_s", "{:.2f}"),
        ("nodes not joined", "not_joined", "{:.0f}"),
        ("circle errors (succ/pred wrong)", "circle_errors", "{:.0f}"),
        ("greedy walks ok (node ids)", "walk_success", "{:.4f}"),
        ("greedy walks ok (random keys)", "key_walk_success", "{:.4f}"),
        ("hops mean (walks)", "hops_mean", "{:.2f}"),
        ("hops p99 (walks)", "hops_p99", "{:.0f}"),
        ("hops max (walks)", "hops_max", "{:.0f}"),
        ("messages delivered (probes)", "probe_success", "{:.4f}"),
        ("hops mean (probes)", "probe_hops_mean", "{:.2f}"),
        ("hops p99 (probes)", "probe_hops_p99", "{:.0f}"),
        ("log2 N", "log2_n", "{:.2f}"),
        ("target ½·log2 N + 2", "target_hops", "{:.2f}"),
        ("overlay connections per node mean", "connections_mean", "{:.1f}"),
        ("overlay connections per node max", "connections_max", "{:.0f}"),
        ("estimated N (median)", "estimate_median", "{:.0f}"),
        ("maintenance datagrams/node/s", "maintenance_datagrams_per_node_s", "{:.2f}"),
        ("maintenance bytes/node/s", "maintenance_bytes_per_node_s", "{:.0f}"),
        ("simulated events", "events", "{:.0f}"),
        ("wall seconds", "wall_s", "{:.1f}"),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = [
        f"| {'':<{width}} | " + " | ".join(f"{'N=' + str(r['nodes']):>10}" for r in results) + " |",
        f"| {'-' * width} | " + " | ".join("-" * 10 for _ in results) + " |",
    ]
    for label, key, fmt in rows:
        cells = []
        for r in results:
            value = r[key]
            assert isinstance(value, int | float)
            cells.append(f"{fmt.format(value):>10}")
        lines.append(f"| {label:<{width}} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("maintenance datagrams/node/s by type:")
    for r in results:
        by_type = r["maintenance_by_type"]
        assert isinstance(by_type, dict)
        parts = ", ".join(f"{k} {v:.3f}" for k, v in by_type.items())
        lines.append(f"  N={r['nodes']}: {parts}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="joins per virtual second (default max(20, N/100))"
    )
    parser.add_argument("--settle", type=float, default=60.0)
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--dht-sizes", default="1000")
    parser.add_argument("--churn", default="0.01,0.1", help="fractions replaced per minute")
    parser.add_argument("--records", type=int, default=0, help="default: one per node")
    parser.add_argument("--dht-traffic-s", type=float, default=120.0)
    parser.add_argument("--dht-gets-s", type=float, default=180.0)
    parser.add_argument("--gets-per-s", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = []
    for size in (int(s) for s in args.sizes.split(",") if s):
        rate = args.rate or max(20.0, size / 100)
        print(f"N={size}: growing at {rate:.0f} joins/s, seed {args.seed}", flush=True)
        results.append(
            run(
                size,
                seed=args.seed,
                rate=rate,
                settle=args.settle,
                pairs=args.pairs,
                probes=args.probes,
                window=args.window,
            )
        )
    dht_results = []
    for size in (int(s) for s in args.dht_sizes.split(",") if s):
        rate = args.rate or max(20.0, size / 100)
        for churn in (float(c) for c in args.churn.split(",") if c):
            print(f"DHT N={size}: churn {churn:.0%}/min, seed {args.seed}", flush=True)
            dht_results.append(
                run_dht(
                    size,
                    churn,
                    seed=args.seed,
                    rate=rate,
                    records=args.records or size,
                    traffic_s=args.dht_traffic_s,
                    gets_s=args.dht_gets_s,
                    gets_per_s=args.gets_per_s,
                )
            )
    if results:
        print()
        print(table(results))
    if dht_results:
        print()
        print(dht_table(dht_results))
    if args.json is not None:
        args.json.write_text(json.dumps({"overlay": results, "dht": dht_results}, indent=2))


if __name__ == "__main__":
    main()
