"""The discrete-event loop and the network model, with toy cores."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from pipeline.sim import ConstantLatency, LogNormalLatency, Network, Simulator, UniformLatency
from pipeline.sim.churn import ChurnAction, poisson_churn


class Ticker:
    """Every ``period`` seconds sends b"tick" to ``peer``; echoes b"tick" as b"tock"."""

    def __init__(self, peer: Hashable | None, period: float | None) -> None:
        self.peer = peer
        self.period = period
        self.deadline = 0.0 if period is not None else None
        self.out: list[tuple[bytes, Hashable]] = []
        self.received: list[tuple[float, bytes, Hashable]] = []
        self.fired: list[float] = []

    def receive(self, message: bytes, source: Hashable, now: float) -> None:
        self.received.append((now, message, source))
        if message == b"tick":
            self.out.append((b"tock", source))

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        if self.peer is not None:
            self.out.append((b"tick", self.peer))
        assert self.period is not None
        self.deadline = now + self.period

    def datagrams_to_send(self) -> list[tuple[bytes, Hashable]]:
        out, self.out = self.out, []
        return out

    def next_deadline(self) -> float | None:
        return self.deadline

    def events(self) -> list[object]:
        return []


def pair(network: Network) -> tuple[Simulator, Ticker, Ticker]:
    sim = Simulator(network=network)
    a, b = Ticker("b", 1.0), Ticker(None, None)
    sim.add_host("a", a)
    sim.add_host("b", b)
    return sim, a, b


class TestLoop:
    def test_timers_and_latency(self) -> None:
        net = Network(random.Random(1), latency=ConstantLatency(0.02), jitter=0.0)
        sim, a, b = pair(net)
        sim.run_until(2.5)
        assert a.fired == [0.0, 1.0, 2.0]
        assert [t for t, _, _ in b.received] == pytest.approx([0.02, 1.02, 2.02])
        assert [(m, s) for _, m, s in a.received] == [(b"tock", "b")] * 3
        assert a.received[0][0] == pytest.approx(0.04)
        assert sim.now == 2.5 and sim.datagrams_sent == 6

    def test_superseded_timer_is_skipped(self) -> None:
        sim, a, _ = pair(Network(random.Random(1)))
        sim.run_until(0.5)
        a.deadline = 0.7  # moved earlier: a new entry; the one for 1.0 is stale
        sim.flush("a")
        sim.run_until(3.0)
        assert a.fired == [0.0, 0.7, 1.7, 2.7]

    def test_loss(self) -> None:
        net = Network(random.Random(1), loss=1.0)
        sim, a, b = pair(net)
        sim.run_until(5.0)
        assert b.received == [] and net.lost == 6  # ticks at 0, 1, ..., 5

    def test_partition_and_heal(self) -> None:
        net = Network(random.Random(1), latency=ConstantLatency(0.01), jitter=0.0)
        sim, a, b = pair(net)
        net.partition([["a"]])  # "b" is in the group of everything else
        sim.run_until(2.5)
        assert b.received == [] and net.cut == 3
        net.heal()
        sim.run_until(4.5)
        assert len(b.received) == 2

    def test_crashed_host_gets_nothing(self) -> None:
        sim, a, _ = pair(Network(random.Random(1)))
        sim.remove_host("b")
        sim.run_until(2.5)
        assert sim.datagrams_undeliverable == 3

    def test_scripted_calls_and_step_limit(self) -> None:
        sim, a, _ = pair(Network(random.Random(1)))
        seen: list[float] = []
        sim.call_at(1.5, lambda: seen.append(sim.now))
        sim.run_until(2.0)
        assert seen == [1.5]
        with pytest.raises(RuntimeError, match="steps"):
            sim.run_until(100.0, max_steps=10)

    def test_a_core_that_never_advances_is_caught(self) -> None:
        sim = Simulator()
        stuck = Ticker(None, 0.0)
        sim.add_host("x", stuck)
        with pytest.raises(RuntimeError, match="keeps asking"):
            sim.run_until(1.0)

    def test_address_taken(self) -> None:
        sim, _, _ = pair(Network(random.Random(1)))
        with pytest.raises(ValueError):
            sim.add_host("a", Ticker(None, None))

    def test_same_seed_same_run(self) -> None:
        def trace(seed: int) -> list[tuple[float, bytes, Hashable]]:
            net = Network(random.Random(seed), latency=LogNormalLatency(), jitter=0.5)
            sim, a, b = pair(net)
            sim.add_host("c", Ticker("b", 0.3))
            sim.run_until(10.0)
            return b.received

        assert trace(7) == trace(7)
        assert trace(7) != trace(8)


class TestNetwork:
    def test_pair_latency_is_symmetric_and_stable(self) -> None:
        net = Network(random.Random(3), latency=UniformLatency(0.01, 0.2), jitter=0.0)
        first = net.transit(1, 2)
        assert first is not None and 0.01 <= first <= 0.2
        assert net.transit(2, 1) == first == net.transit(1, 2)

    def test_lognormal_is_clipped(self) -> None:
        model = LogNormalLatency(median=0.04, sigma=3.0, low=0.01, high=0.3)
        rng = random.Random(5)
        values = [model.sample(rng) for _ in range(1000)]
        assert min(values) == 0.01 and max(values) == 0.3

    def test_jitter_reorders_only_within_its_bound(self) -> None:
        net = Network(random.Random(3), latency=ConstantLatency(0.1), jitter=0.2)
        values = [net.transit("a", "b") for _ in range(100)]
        assert all(v is not None and 0.1 <= v <= 0.12 for v in values)


class TestChurn:
    def test_poisson_script(self) -> None:
        script = poisson_churn(random.Random(1), start=10.0, stop=110.0, rate=0.5)
        assert 30 < len(script) < 70
        assert all(10.0 < e.at < 110.0 for e in script)
        assert script == sorted(script)
        assert {e.action for e in script} == set(ChurnAction)

    def test_mix_and_zero_rate(self) -> None:
        only = poisson_churn(
            random.Random(1), start=0, stop=100, rate=1.0, mix={ChurnAction.CRASH: 1.0}
        )
        assert {e.action for e in only} == {ChurnAction.CRASH}
        assert poisson_churn(random.Random(1), start=0, stop=100, rate=0.0) == []
