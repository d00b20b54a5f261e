"""The run loop every stage worker shares: attach, say READY, work, heartbeat, stop.

A worker is forked by the supervisor's template (``supervisor/template.py``), or started as
``python -m pipeline.<stage> --worker N ...`` (the plain spawn). It reads the effective
settings the supervisor wrote (never TOML), attaches to its shm rings by the file
descriptors it was handed (``AUTOVN_RINGS``), connects to the supervisor over ZeroMQ and
says ``Ready``. Then it loops:

1. ``work()``: the stage drains its input rings and devices without blocking, in batches;
2. if nothing was done, and every input ring is still empty after the pre-sleep check
   (``Consumer.wait_ready``), it sleeps in one ``poll`` on the ring doorbells, its device,
   its ZeroMQ sockets and the signal pipe, until the next periodic timer or its deadline;
3. ZeroMQ messages, timers and the deadline are handled between batches (at least every
   10 ms when busy).

Besides periodic timers (``every``: heartbeats, stats) a worker has one re-armable
*deadline* (``arm``): the stage's core says when it next needs the clock
(``next_deadline()``), the driver arms it after every input, and ``on_deadline(now)`` runs
when it is due. A core's timers thus fire when they are due, not on the next tick of a poll.

The worker's rings come from the topology (``pipeline/topology.py``): ``inputs(stage)`` and
``outputs(stage)`` attach to the rings from and to every worker of another stage, ordered
by that worker's index.

The worker dies with its supervisor: ``PR_SET_PDEATHSIG`` sends it SIGTERM the moment the
supervisor exits, even by kill -9, and a heartbeat silence of the supervisor does the same
if that ever fails. A broken device or socket raises ``StageIOError``: one ``worker_failed``
event, exit code 1, and the supervisor restarts the worker.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

from pipeline import messages
from pipeline.config import Settings, settings_from_json
from pipeline.errors import StageIOError
from pipeline.log import configure_logging
from pipeline.shm_ring import Consumer, Producer, Ring, RingSpec
from pipeline.topology import Lane, Stage, WorkerId

_PR_SET_PDEATHSIG = 1
BUSY_CHECK_S = 0.01
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)  # an int: ``&`` on the IntFlag member costs 2 µs a wake-up
BLOCKED_NAP_S = 0.0002
"""How long a worker held back by a full next ring naps before it looks again (back-pressure:
the next stage frees room in its own time and rings no bell for it)."""


class WorkerSocket(zmq.Socket[bytes]):
    """A ZeroMQ socket that remembers being used since the loop last asked it for ``EVENTS``.

    Its FD signals only that its state may have changed, and any call on the socket can
    take in that signal: a ``send`` may absorb the wake-up of a message that has arrived,
    leaving the FD quiet and the message waiting. So the loop asks ``EVENTS`` (two system
    calls, 3 µs) of the sockets sent on, or whose FD fired, since it last asked, not of
    every socket at every wake-up (three a visit for a classifier or overlay_io worker)."""

    used = True  # a new socket is asked once

    def send(  # type: ignore[override]
        self,
        data: Any,
        flags: int = 0,
        copy: bool = True,
        track: bool = False,
        routing_id: int | None = None,
        group: str | None = None,
    ) -> zmq.MessageTracker | None:
        self.used = True
        tracker: zmq.MessageTracker | None = super().send(
            data, flags, copy, track, routing_id, group
        )
        return tracker


class WorkerContext(zmq.Context[WorkerSocket]):
    """The process's context for workers: its sockets are ``WorkerSocket``s. Its own
    ``instance()``: the class attributes it keeps it in are zmq.Context's otherwise, so
    ``instance()`` would hand out a plain context made before (a test process's)."""

    _socket_class = WorkerSocket
    _instance = None
    _instance_pid = None


def endpoint(runtime_dir: Path, name: str) -> str:
    return f"ipc://{runtime_dir / name}.ipc"


SUPERVISOR_SOCKET = "supervisor"
CLI_SOCKET = "cli"
CONTROL_PUB_SOCKET = "control-pub"
CONTROL_SOCKET = "control"


class Worker:
    """Base of every stage worker. Subclasses fill in the stage's own parts."""

    stage: Stage

    def __init__(self, settings: Settings, index: int, rings: dict[str, RingSpec]) -> None:
        self.settings = settings
        self.index = index
        self.id = WorkerId(self.stage, index)
        self.topology = settings.stages.topology()
        self.log: structlog.typing.FilteringBoundLogger = configure_logging(
            stage=self.stage,
            worker=index,
            node=settings.node.name,
            level=settings.log.level.value,
            file=settings.log_file,
        )
        self._ring_specs = rings
        self._rings: list[Ring] = []
        self.consumers: list[Consumer] = []
        self.zmq: zmq.Context[WorkerSocket] = WorkerContext.instance()
        self.epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._zmq_sockets: list[tuple[WorkerSocket, Callable[[], None]]] = []
        self._timers: list[tuple[float, float, Callable[[float], None]]] = []
        self._deadline: float | None = None
        self._armed_at = 0.0  # when the deadline was armed
        self._late: deque[float] = deque(maxlen=512)  # how late the last deadlines fired (s)
        self._deadlines_fired = 0
        self.running = True
        self.blocked = False  # set by work(): input waits because a next ring is full
        self.started = time.monotonic()
        self.last_supervisor_msg = self.started

    # -- helpers for subclasses ---------------------------------------------------------------

    def attach(self, name: str) -> Ring:
        spec = self._ring_specs.get(name)
        if spec is None:
            raise StageIOError(f"ring {name} was not handed to this worker")
        ring = Ring.attach(spec)
        self._rings.append(ring)
        return ring

    def producer(self, name: str) -> Producer:
        return Producer(self.attach(name))

    def consumer(self, name: str) -> Consumer:
        consumer = Consumer(self.attach(name))
        self.consumers.append(consumer)
        self.epoll.register(consumer.bell_fd, select.EPOLLIN)
        return consumer

    def inputs(self, source: Stage, lane: Lane = Lane.MAIN) -> list[Consumer]:
        """Consumers of the rings into this worker from each worker of ``source``."""
        edges = self.topology.inputs(self.id, source, lane)
        return [self.consumer(edge.name) for edge in edges]

    def outputs(self, target: Stage, lane: Lane = Lane.MAIN) -> list[Producer]:
        """Producers of the rings from this worker to each worker of ``target``."""
        edges = self.topology.outputs(self.id, target, lane)
        return [self.producer(edge.name) for edge in edges]

    def watch(self, fd_or_socket: int | WorkerSocket, handler: Callable[[], None]) -> None:
        """Call ``handler`` when ``fd_or_socket`` (a file descriptor or zmq socket) is readable.

        A zmq socket's own FD only signals that its state may have changed (edge-triggered):
        when it fires, or the socket was sent on, the loop checks ``zmq.EVENTS`` before
        sleeping, and calls the handler while messages wait (see ``WorkerSocket``)."""
        if isinstance(fd_or_socket, WorkerSocket):
            sock = fd_or_socket
            self._zmq_sockets.append((sock, handler))

            def fired() -> None:
                sock.used = True
                handler()

            fd, on_readable = int(sock.getsockopt(zmq.FD)), fired
        else:
            fd, on_readable = fd_or_socket, handler
        self.epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = on_readable

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed); nothing if it was not watched."""
        if self._handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def every(self, interval_s: float, fn: Callable[[float], None]) -> None:
        self._timers.append((time.monotonic() + interval_s, interval_s, fn))

    def arm(self, deadline: float | None) -> None:
        """Call ``on_deadline`` at ``deadline`` (monotonic seconds), replacing the one armed
        before; None disarms it. A deadline already past (a core's -inf: "at once") is due
        now."""
        self._deadline = deadline
        self._armed_at = time.monotonic()

    # -- the stage's parts ----------------------------------------------------------------------

    def setup(self) -> None:
        """Open devices and sockets, attach rings. Runs before READY."""

    def work(self) -> int:
        """Do what is ready without blocking; return how many items were handled. Set
        ``blocked`` when input was left waiting for room in a next ring: the loop then naps
        ``BLOCKED_NAP_S`` instead of sleeping on its files (which stay readable)."""
        return 0

    def on_deadline(self, now: float) -> None:
        """The deadline armed with ``arm`` is due (it is disarmed first: re-arm here)."""

    def stats(self) -> dict[str, Any]:
        """The worker's counters, sent with every heartbeat and logged periodically."""
        return {}

    def teardown(self) -> None:
        """Close devices and sockets."""

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """The worker's life in its own process: start, loop until told to stop, close."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.watch(wake_r, lambda: _drain_fd(wake_r))
        try:
            self.start()
        except StageIOError as exc:
            self.log.error("worker_failed", phase="setup", error=str(exc))
            return 1
        profile = _profiler()
        try:
            self._loop()
            self.work()  # what came in since the last pass (control's last records) goes on
        except StageIOError as exc:
            self.log.error("worker_failed", error=str(exc))
            return 1
        finally:
            if profile is not None:
                profile.disable()
                name = f"{self.stage}{self.index}-{os.getpid()}.prof"
                profile.dump_stats(Path(os.environ[PROFILE_ENV]) / name)
                self.log.info("profile_written", file=name)
            self.close()
        self.log.info("worker_stopped", **self.stats())
        return 0

    def start(self) -> None:
        """Connect to the supervisor, set the stage up, say READY. Raises StageIOError."""
        self.dealer = self.zmq.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.SNDHWM, 100)
        self.dealer.setsockopt(zmq.IDENTITY, str(self.id).encode())
        self.dealer.connect(endpoint(self.settings.node.runtime_dir, SUPERVISOR_SOCKET))
        self.watch(self.dealer, self._on_supervisor)
        self.setup()
        stages = self.settings.stages
        self.every(stages.heartbeat_interval_s, self._heartbeat)
        self.every(
            stages.stats_interval_s, lambda now: self.log.info("stats_reported", **self.stats())
        )
        ready = messages.Ready(self.stage, self.index, os.getpid())
        self.dealer.send(messages.encode(ready), zmq.NOBLOCK)
        self.log.info("worker_started")

    def step(self, timeout: float = 0.0) -> int:
        """One turn of the loop, for running several workers in one process (tests): do what
        is ready, handle ZeroMQ, timers and the deadline, then wait at most ``timeout``
        seconds for a file to become readable. Returns how many items ``work`` handled."""
        done = self.work()
        pending = self._service_zmq()
        now = time.monotonic()
        due = self._run_timers(now)
        wait = 0.0 if (done or pending) else min(timeout, max(0.0, due - now))
        for fd, _ in self.epoll.poll(wait):
            handler = self._handlers.get(fd)
            if handler is not None:
                handler()
        return done

    def close(self) -> None:
        """Close devices, sockets and rings (after ``start``)."""
        self.teardown()
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        if hasattr(self, "dealer"):
            self.dealer.close(0)

    def _loop(self) -> None:
        last_check = 0.0
        while self.running:
            done = self.work()
            now = time.monotonic()
            if done and now - last_check < BUSY_CHECK_S:
                continue
            last_check = now
            pending = self._service_zmq()
            timeout = 0.0
            if not (done or pending):
                if self.blocked:  # the inputs are readable, the next ring is not free yet
                    time.sleep(BLOCKED_NAP_S)
                elif not any(c.wait_ready() for c in self.consumers):
                    timeout = max(0.0, self._run_timers(now) - now)
            for fd, _ in self.epoll.poll(timeout):
                handler = self._handlers.get(fd)
                if handler is not None:
                    handler()
            self._run_timers(time.monotonic())

    def _service_zmq(self) -> bool:
        """Handle zmq sockets with messages waiting; True if any had some. Only the sockets
        used since the last look are asked (``WorkerSocket``)."""
        found = False
        for sock, handler in self._zmq_sockets:
            if sock.used:
                sock.used = False
                if int(sock.getsockopt(_EVENTS)) & _POLLIN:
                    handler()
                    sock.used = found = True
        return found

    def _run_timers(self, now: float) -> float:
        """Fire due timers and the deadline; return when the next is due (at most 1 s ahead:
        a backstop)."""
        deadline = self._deadline
        if deadline is not None and deadline <= now:
            self._deadline = None
            self._deadlines_fired += 1
            # late from the deadline, or from its arming if it was already due then: the
            # loop's delay, not how long ago a core's "at once" (-inf) deadline was
            self._late.append(now - max(deadline, self._armed_at))
            self.on_deadline(now)
        next_due = now + 1.0
        for i, (due, interval, fn) in enumerate(self._timers):
            if due <= now:
                fn(now)
                due = now + interval
                self._timers[i] = (due, interval, fn)
            next_due = min(next_due, due)
        if self._deadline is not None:
            next_due = min(next_due, self._deadline)
        return next_due

    def deadline_statistics(self) -> dict[str, float | int]:
        """How many deadlines fired, and how late (ms, over the last 512): a core's timer
        should fire when it is due, not on the next tick of a poll."""
        late = sorted(self._late)
        if not late:
            return {"fired": 0}
        return {
            "fired": self._deadlines_fired,
            "late_ms_p50": round(late[len(late) // 2] * 1000, 3),
            "late_ms_p99": round(late[min(len(late) - 1, len(late) * 99 // 100)] * 1000, 3),
            "late_ms_max": round(late[-1] * 1000, 3),
        }

    def _heartbeat(self, now: float) -> None:
        stats = self.stats()
        if self._deadlines_fired:
            stats["deadlines"] = self.deadline_statistics()
        beat = messages.Heartbeat(self.stage, self.index, os.getpid(), stats)
        try:
            self.dealer.send(messages.encode(beat), zmq.NOBLOCK)
        except zmq.Again:
            pass
        silent = now - self.last_supervisor_msg
        if silent > self.settings.stages.heartbeat_timeout_s * 2 or os.getppid() == 1:
            self.log.error("supervisor_lost", silent_s=round(silent, 1))
            self.running = False

    def _on_supervisor(self) -> None:
        while self.dealer.poll(0):
            data = self.dealer.recv()
            self.last_supervisor_msg = time.monotonic()
            try:
                msg = messages.decode(data)
            except ValueError:
                self.log.warning("message_dropped", reason="undecodable", source="supervisor")
                continue
            if isinstance(msg, messages.Stop):
                self.log.info("stop_received", reason=msg.reason)
                self.running = False
            elif isinstance(msg, messages.ReportRequest):
                self._heartbeat(self.last_supervisor_msg)  # a status wants fresh counters

    def _on_signal(self, signum: int, frame: object) -> None:
        self.running = False


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies; exit if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        sys.exit(0)


PROFILE_ENV = "AUTOVN_PROFILE_DIR"
"""A directory: every worker started with it in its environment runs its loop under
cProfile and writes ``<stage><index>-<pid>.prof`` there when it stops (a tool for finding
where the data path's CPU goes; ``python -m pstats FILE``). Costs speed while it is set."""


def _profiler() -> Any:
    """A running cProfile.Profile if ``AUTOVN_PROFILE_DIR`` is set, else None."""
    if not os.environ.get(PROFILE_ENV):
        return None
    import cProfile  # only when asked: no worker loads it otherwise

    profile = cProfile.Profile()
    profile.enable()
    return profile


def main(worker_class: type[Worker]) -> None:
    """The ``__main__`` of every stage package."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{worker_class.stage}")
    parser.add_argument("--runtime-dir", type=Path, required=True)
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args()
    sys.exit(run_worker(worker_class, args.runtime_dir, args.worker, args.parent_pid))


def run_worker(worker_class: type[Worker], runtime_dir: Path, index: int, parent_pid: int) -> int:
    """A worker's life, in a process of its own (spawned, or forked by the supervisor's
    template): die with the supervisor, read the settings it wrote, attach the rings named in
    ``AUTOVN_RINGS``, run; the exit code."""
    die_with_parent(parent_pid)
    settings = settings_from_json((runtime_dir / "settings.json").read_text())
    raw = json.loads(os.environ.get("AUTOVN_RINGS", "{}"))
    rings = {name: RingSpec(name, fds[0], fds[1]) for name, fds in raw.items()}
    return worker_class(settings, index, rings).run()
