"""The worker's re-armable deadline: when it fires, and what it records of how late."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pipeline import worker as worker_module
from pipeline.config import settings_from_mapping
from pipeline.topology import Stage
from pipeline.worker import Worker


class Timed(Worker):
    """A worker with no rings whose deadline re-arms itself ``period`` after each firing,
    ``count`` times, as control's does after every input."""

    stage = Stage.CONTROL

    def __init__(self, tmp: Path, period: float = 0.0, count: int = 0) -> None:
        settings = settings_from_mapping(
            {
                "node": {"name": "t", "state_dir": str(tmp), "runtime_dir": str(tmp)},
                "network": {"namespace": "lab", "subnet": "100.64.0.0/24", "address": "100.64.0.1"},
                "security": {"insecure_plaintext": True},
            }
        )
        super().__init__(settings, 0, {})
        self.period, self.count = period, count
        self.fired: list[float] = []

    def on_deadline(self, now: float) -> None:
        self.fired.append(now)
        if len(self.fired) < self.count:
            self.arm(now + self.period)
        else:
            self.running = False


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(worker_module, "configure_logging", lambda **kw: structlog.get_logger())
    yield


def test_lateness_is_measured_from_the_deadline_or_from_arming_if_it_was_due(
    tmp_path: Path, quiet: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a virtual clock: a deadline in the future counts from itself; one already due
    when armed (a core's -inf, "at once") counts from its arming, never as infinitely late."""
    w = Timed(tmp_path, count=99)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # what arm() reads
    assert w.deadline_statistics() == {"fired": 0}
    w.arm(105.0)
    assert w._run_timers(104.999) <= 105.0 and w.fired == []  # not yet; due at 105
    w._run_timers(105.004)
    assert w.fired == [105.004]
    clock[0] = 200.0
    w.arm(-math.inf)
    w._run_timers(200.002)
    clock[0] = 300.0
    w.arm(299.0)  # already past when armed: counts from the arming
    w._run_timers(300.001)
    stats = w.deadline_statistics()
    assert stats["fired"] == 3
    assert stats["late_ms_max"] == pytest.approx(4.0, abs=1e-3)
    assert stats["late_ms_p50"] == pytest.approx(2.0, abs=1e-3)
    w.arm(None)
    assert w._run_timers(400.0) == 401.0  # disarmed: only the 1 s backstop


def test_the_loop_sleeps_until_the_deadline_and_fires_it_on_time(
    tmp_path: Path, quiet: None
) -> None:
    """In real time: the loop's one poll ends at the deadline (no periodic tick), 50 times
    20 ms apart. The bound is loose (a shared, loaded machine); the median is what matters."""
    w = Timed(tmp_path, period=0.02, count=50)
    w.arm(time.monotonic() + 0.02)
    thread = threading.Thread(target=w._loop, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    assert len(w.fired) == 50
    assert time.monotonic() - started >= 50 * 0.02  # none fired early
    stats = w.deadline_statistics()
    assert stats["late_ms_p50"] < 5.0, stats
    w.epoll.close()


def test_a_message_whose_wake_up_a_send_absorbed_is_still_handled(
    tmp_path: Path, quiet: None
) -> None:
    """The loop asks ``EVENTS`` only of sockets used since it last asked. A message that
    arrived while the worker was busy sets the socket's FD; a ``send`` on that socket before
    the loop looks takes the signal in (the FD goes quiet, the message waits): the send marks
    the socket used, so the loop still finds the message instead of sleeping on it."""
    import zmq

    w = Timed(tmp_path)
    peer = w.zmq.socket(zmq.PAIR)
    mine = w.zmq.socket(zmq.PAIR)
    got: list[bytes] = []

    def drain() -> None:
        while mine.poll(0):
            got.append(mine.recv())

    try:
        peer.bind("inproc://absorbed")
        mine.connect("inproc://absorbed")
        w.watch(mine, drain)
        w.step(0.0)  # a new socket is asked once
        assert not mine.used and got == []
        w.step(0.0)
        assert not mine.used  # nothing used it: not asked again
        peer.send(b"hello")
        time.sleep(0.05)  # arrived: the FD says so
        mine.send(b"busy")  # ... and this takes the signal in
        fd = int(mine.getsockopt(zmq.FD))
        assert fd not in {f for f, _ in w.epoll.poll(0)}  # the FD is quiet now
        w.step(0.0)
        assert got == [b"hello"]
        assert peer.recv() == b"busy"
        peer.send(b"again")  # untouched, the FD fires and its handler runs
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            w.step(0.1)
        assert got == [b"hello", b"again"]
    finally:
        w.unwatch(int(mine.getsockopt(zmq.FD)))
        mine.close(0)
        peer.close(0)


def test_workers_get_their_own_context_even_after_a_plain_one(tmp_path: Path, quiet: None) -> None:
    """``zmq.Context.instance()`` made first (as a test process, or any library, may) is not
    what a worker gets: its sockets must be ``WorkerSocket``s, or the loop never asks them."""
    import zmq

    plain = zmq.Context.instance()
    w = Timed(tmp_path)
    sock = w.zmq.socket(zmq.PAIR)
    try:
        assert w.zmq is not plain and isinstance(sock, worker_module.WorkerSocket)
    finally:
        sock.close(0)
