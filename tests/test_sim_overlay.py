"""The overlay at scale in the simulator, with the same OverlayNode code as live.

Invariants, checked after the overlay has settled: every live node's successor and
predecessor are the true ones; greedy walks through the routing tables reach every node
(and the closest node to any key); real messages arrive; maintenance traffic per node per
second stays small. 50 nodes with churn run on every commit; 1,000 nodes with churn are
marked slow but bounded (steps and wall time) and run in CI too.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from pipeline.control.overlay import OverlaySettings
from pipeline.sim import Network, OverlaySim, poisson_churn
from pipeline.sim.churn import ChurnAction


def grown(size: int, *, seed: int, rate: float, **kwargs: object) -> OverlaySim:
    sim = OverlaySim(seed=seed, **kwargs)  # type: ignore[arg-type]
    sim.add_node()
    sim.run_for(1.0)
    sim.grow(size - 1, rate=rate)
    return sim


def assert_invariants(sim: OverlaySim, *, pairs: int, probes: int) -> None:
    assert sim.circle_errors() == []
    assert [n.address for n in sim.not_joined()] == []
    walks = sim.routing_check(pairs)
    assert walks.success == 1.0, walks.failures
    keys = sim.routing_check(pairs, keys=True)
    assert keys.success == 1.0, keys.failures
    probe = sim.probe(probes)
    assert probe.success == 1.0, probe.failures


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_50_nodes_with_churn(seed: int) -> None:
    sim = grown(50, seed=seed, rate=5.0)
    script = poisson_churn(random.Random(seed), start=sim.now, stop=sim.now + 120.0, rate=0.5)
    sim.schedule_churn(script)
    sim.run_for(120.0, max_steps=500_000)
    assert sum(v for k, v in sim.events_seen.items() if k.startswith("churn_")) >= 30
    sim.run_for(60.0, max_steps=200_000)  # settle: failure detection is 25 s
    assert_invariants(sim, pairs=500, probes=200)
    traffic = sim.traffic(60.0)
    assert traffic.datagrams_per_node_s < 3.0, traffic


def test_50_nodes_with_loss_and_churn() -> None:
    net = Network(random.Random(4), loss=0.05)
    sim = grown(50, seed=4, rate=5.0, network=net)
    script = poisson_churn(random.Random(4), start=sim.now, stop=sim.now + 90.0, rate=0.5)
    sim.schedule_churn(script)
    sim.run_for(90.0 + 60.0, max_steps=500_000)
    assert sim.circle_errors() == []
    assert sim.routing_check(500).success == 1.0
    probe = sim.probe(200)
    assert probe.success > 0.75  # ~5 hops at 5% loss each; the overlay does not retransmit


def test_only_crashes_many_at_once() -> None:
    """A fifth of the nodes crash within two seconds; the rest close the circle again."""
    sim = grown(60, seed=5, rate=5.0)
    sim.run_for(30.0)
    script = poisson_churn(
        random.Random(5), start=sim.now, stop=sim.now + 2.0, rate=6.0, mix={ChurnAction.CRASH: 1}
    )
    sim.schedule_churn(script)
    sim.run_for(2.0)
    assert len(sim.live()) <= 52
    sim.run_for(60.0)
    assert_invariants(sim, pairs=300, probes=100)


def test_partition_then_heal() -> None:
    sim = grown(60, seed=6, rate=5.0, settings=OverlaySettings(bootstrap_probe_s=30.0))
    sim.run_for(30.0)
    live = sim.live()
    random.Random(6).shuffle(live)
    left, right = live[:30], live[30:]
    sim.sim.network.partition([[n.address for n in left]])
    sim.run_for(90.0)
    # Each side has closed its own circle.
    assert sim.circle_errors(among=left) == [] and sim.circle_errors(among=right) == []
    sim.sim.network.heal()
    sim.run_for(120.0)
    assert_invariants(sim, pairs=300, probes=100)


def test_simultaneous_start_with_a_shared_bootstrap_list() -> None:
    """The usual live set-up: no founder, every node's bootstrap list names the same five
    nodes (itself among them for those five), all start within a second. The first ones
    found circles of their own; the bootstrap probes merge them into one."""
    sim = OverlaySim(seed=12)
    starts = random.Random(12)
    for _ in range(40):
        sim.add_node(bootstrap=[1, 2, 3, 4, 5])
        sim.run_for(starts.uniform(0.0, 0.05))
    sim.run_for(120.0)
    assert_invariants(sim, pairs=300, probes=100)


def test_same_seed_same_run() -> None:
    def run() -> tuple[int, int, list[int]]:
        sim = grown(30, seed=9, rate=5.0)
        sim.schedule_churn(
            poisson_churn(random.Random(9), start=sim.now, stop=sim.now + 30, rate=1)
        )
        sim.run_for(40.0)
        return sim.sim.steps, sim.sim.bytes_sent, sim.live_ids()

    assert run() == run()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_1000_nodes_with_churn() -> None:
    """1,000 nodes join (20 a second), settle, suffer a minute of churn (joins, crashes,
    leaves, restarts: 1 a second), settle again; then every invariant holds."""
    size = 1000
    sim = grown(size, seed=11, rate=20.0)
    sim.run_for(30.0, max_steps=1_000_000)
    joins = sorted(n.joined - n.started for n in sim.live() if n.joined is not None)
    # p99 within 2 s; the slowest within one retry: a ConnectReply goes back only along the
    # request's path (never to an address a member names), so a reply whose path broke is
    # dropped and the joiner asks again (one node of 1,000 here: 5.1 s, mean 0.62 s)
    assert len(joins) == size and joins[int(0.99 * size) - 1] < 2.0 and joins[-1] < 10.0
    script = poisson_churn(random.Random(11), start=sim.now, stop=sim.now + 60.0, rate=1.0)
    sim.schedule_churn(script)
    sim.run_for(60.0, max_steps=1_500_000)
    sim.run_for(60.0, max_steps=1_500_000)
    assert sim.circle_errors() == []
    assert [n.address for n in sim.not_joined()] == []
    walks = sim.routing_check(2000)
    assert walks.success == 1.0, walks.failures
    keys = sim.routing_check(1000, keys=True)
    assert keys.success == 1.0, keys.failures
    probe = sim.probe(300)
    assert probe.success == 1.0, probe.failures
    n = len(sim.live())
    assert statistics.fmean(walks.hops) <= 0.5 * math.log2(n) + 2
    assert sorted(walks.hops)[int(0.99 * len(walks.hops))] <= 2 * math.log2(n)
    traffic = sim.traffic(30.0)
    assert traffic.datagrams_per_node_s < 3.0, traffic
    assert sim.sim.steps < 5_000_000


# Seeds 5, 7 and 8 failed here (a lost probe) until relays kept the connections their tunnels
# run over and said at once when they lost one (RouteError "tunnel_broken"): a relay that had
# trimmed its connection to a tunnel's far end dropped the near end's Forwards until that end's
# pings through it went unanswered.
@pytest.mark.parametrize("seed", [5, 6, 7, 8, 9])
def test_nodes_behind_nats_keep_the_circle_through_tunnels(seed: int) -> None:
    """Half of 40 nodes sit behind NATs that no other NATed node gets through (hard NATs on
    both sides): circle neighbours that cannot reach each other connect through a node that
    reaches both (a tunnel), so the circle, greedy routing and real messages stay right."""
    sim = OverlaySim(seed=seed)
    public = [sim.add_node(bootstrap=[]).address]
    sim.run_for(1.0)
    for _ in range(9):
        public.append(sim.add_node(bootstrap=public[:3]).address)
        sim.run_for(0.2)
    nated = []
    for i in range(30):
        node = sim.add_node(bootstrap=sim.rng.sample(public, 3))
        if i % 3:
            sim.sim.network.behind_nat([node.address])
            nated.append(node.address)
        sim.run_for(0.2)
    sim.run_for(120.0, max_steps=2_000_000)
    assert sim.sim.network.filtered > 0  # the NATs did stop something
    tunnels = sum(n.node.statistics().get("tunnels_tried", 0) for n in sim.live())
    relayed = sum(n.node.statistics().get("forwarded_tunnel", 0) for n in sim.live())
    assert tunnels > 0 and relayed > 0
    assert_invariants(sim, pairs=500, probes=300)


def size_estimates(size: int, seed: int) -> list[int]:
    sim = grown(size, seed=seed, rate=20.0)
    sim.run_for(60.0, max_steps=2_000_000)
    assert sim.circle_errors() == []
    return sorted(n.node.estimated_size() for n in sim.live())


@pytest.mark.parametrize(
    "size", [10, 100, pytest.param(1000, marks=[pytest.mark.slow, pytest.mark.timeout(300)])]
)
def test_size_estimate(size: int) -> None:
    """Each node's estimate of N, from the nodes it knows near itself: N itself for most
    nodes of 10 (they know every node), and around N with a median within 20 % and nine
    nodes in ten within a factor of two beyond (it read 33 on a 10-node network before)."""
    estimates = size_estimates(size, seed=21)
    if size <= 10:  # a node that knows every node counts them; one that misses one guesses
        assert statistics.median(estimates) == size
        assert 0.8 * size <= min(estimates) and max(estimates) <= 1.5 * size, estimates
        return
    median = statistics.median(estimates)
    assert 0.8 * size <= median <= 1.2 * size, (median, estimates)
    within = [e for e in estimates if size / 2 <= e <= 2 * size]
    assert len(within) >= 0.9 * len(estimates), estimates
