"""The running supervisor: creates the rings, spawns and watches the workers, answers status.

Theory of operation:

- Rings are anonymous memfds (plus an eventfd doorbell each) that the supervisor creates and
  hands to each worker by file descriptor. They have no name in /dev/shm, so nothing is left
  behind whatever dies, however it dies; a restarted worker gets the same fds and re-attaches.
- Workers are forked by the *template* (``supervisor/template.py``): a process with no thread
  and no ZeroMQ context that ``supervisor start`` forks first thing, which imports every
  stage's modules once and then forks a worker per request, handed its rings' fds over a unix
  socket (SCM_RIGHTS). A forked worker is re-parented to the supervisor (a subreaper), so the
  supervisor reaps, watches (pidfd) and restarts it like any child, and a restart costs a
  fork, not an interpreter. A template that dies is started again (a fresh interpreter, after
  a back-off); meanwhile, and with ``AUTOVN_SPAWN=plain``, workers are started the plain way:
  ``python -m pipeline.<stage>`` (fork+exec of a fresh interpreter), never a bare fork of the
  supervisor. All workers are requested at once, in stage order control, overlay_io,
  classifier, tap_reader (the rings and sockets that join them are there first); the node is
  up when every worker said ``Ready``.
- Each worker sends a ``Heartbeat`` with its counters every ``heartbeat_interval_s``; one that
  goes silent for ``heartbeat_timeout_s`` is killed. A ``status`` asked for over the CLI
  socket is fresh: the supervisor asks every running worker for a heartbeat now
  (``ReportRequest``) and answers once all have sent one, or after ``STATUS_WAIT_S`` with
  what it has (a hung worker's last counters). A worker that exits is restarted at once
  (forked from the template: milliseconds); one that dies again within 2 s of its start is
  crash-looping and waits a back-off that doubles from 0.1 s up to ``restart_backoff_max_s``.
- Shutdown (SIGINT/SIGTERM or ``supervisor stop``) goes from the inside out: tap_reader first,
  so no new frames enter, then classifier, overlay_io, control; each gets ``Stop``, then
  SIGKILL after a grace period.
- A lock on ``supervisor.lock`` in the runtime directory marks the node as running; the
  kernel drops it when the supervisor dies, even by kill -9. What a killed supervisor left
  (``supervisor.pid``, the ZeroMQ ``*.ipc`` sockets) is removed at the next start, with a
  ``stale_files_removed`` line in the log. Workers die with the supervisor
  (``PR_SET_PDEATHSIG``), which also closes the TAP.
- With ``[metrics] listen`` the loop publishes ``status()`` as a snapshot twice a second for
  the metrics server's thread (``supervisor/metrics.py``). Under systemd (``$NOTIFY_SOCKET``)
  it tells systemd READY=1 once the node has joined the overlay (asking control for its
  state every 0.1 s until then), WATCHDOG=1 every half watchdog period, STATUS= as it
  changes and STOPPING=1 (``supervisor/sdnotify.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import structlog
import zmq

from pipeline import messages
from pipeline.config import Endpoint, Settings
from pipeline.log import configure_logging
from pipeline.shm_ring import Ring, RingSpec, create_ring, read_stats
from pipeline.topology import START_ORDER, Stage
from pipeline.worker import CLI_SOCKET, SUPERVISOR_SOCKET, endpoint
from supervisor import sdnotify
from supervisor.template import TemplateClient, TemplateError, exec_template, fork_template

READY_TIMEOUT_S = 20.0
STOP_GRACE_S = 3.0
GOOD_RUN_S = 30.0
CRASH_LOOP_S = 2.0  # a worker that dies sooner after its start is crash-looping: back off
IDLE_POLL_S = 1.0  # housekeeping (hung workers) at least this often
SNAPSHOT_S = 0.5  # how fresh the status the metrics server reads is
STATUS_WAIT_S = 0.25  # a CLI status waits this long at most for the workers' fresh counters
READY_ASK_S = 0.1  # under systemd, until READY=1: how often control is asked for its state
_REPORT_REQUEST = messages.encode(messages.ReportRequest())
TEMPLATE_READY_S = 10.0  # how long the first start waits for the template's imports
TEMPLATE_BACKOFF_S = 0.5  # the first delay before a dead template is started again
#: ``AUTOVN_SPAWN=plain``: start every worker as a fresh interpreter (no template)
SPAWN_ENV = "AUTOVN_SPAWN"


def spawn_mode() -> str:
    """ "template" (the default) or "plain", from ``$AUTOVN_SPAWN``."""
    return "plain" if os.environ.get(SPAWN_ENV, "").strip().lower() == "plain" else "template"


class Process(Protocol):
    """What the supervisor needs of a worker process: ``subprocess.Popen`` or :class:`Forked`."""

    pid: int
    returncode: int | Any

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


def _exit_code(result: os.waitid_result) -> int:
    """Like ``Popen.returncode``: the exit status, or minus the signal that killed it."""
    return int(result.si_status) if result.si_code == os.CLD_EXITED else -int(result.si_status)


class Forked:
    """A worker the template forked: our child (we are its subreaper), reaped by pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and self._pidfd is not None:
            try:
                result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                result = None
                self.returncode = -signal.SIGKILL  # reaped elsewhere: we cannot know
            if result is not None:
                self.returncode = _exit_code(result)
            if self.returncode is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            assert self._pidfd is not None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            select.select([self._pidfd], [], [], left)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)


class NodeError(Exception):
    """The node cannot start (already running, a stage never came up)."""


@dataclasses.dataclass
class WorkerSlot:
    stage: Stage
    index: int
    rings: list[str]
    proc: Process | None = None
    pidfd: int | None = None
    forked: bool = False  # by the template (else a fresh interpreter)
    started: float = 0.0
    ready: bool = False
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None
    last_heartbeat: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.stage}:{self.index}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def worker_plan(s: Settings) -> list[WorkerSlot]:
    """A slot for every worker of the node, in start order, with the names of its rings."""
    topology = s.stages.topology()
    return [
        WorkerSlot(w.stage, w.index, [r.name for r in topology.rings_of(w)])
        for w in topology.workers()
    ]


def make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class NodeSupervisor:
    def __init__(self, settings: Settings, template: TemplateClient | None = None) -> None:
        """``template``: one forked already (``supervisor start`` forks it first thing); else
        ``run`` forks one before it makes any thread, unless ``AUTOVN_SPAWN=plain``."""
        self.settings = settings
        self.spawn = spawn_mode()
        self.template = template if self.spawn == "template" else None
        if template is not None and self.template is None:
            template.close()
        self._template_proc: Any = None  # the Popen of a template started again
        self._template_backoff_s = 0.0
        self._template_at: float | None = None  # when to start a dead template again
        self.templates_started = 0
        self.runtime = settings.node.runtime_dir
        self.started = time.monotonic()
        self.stopping = False
        self.specs: dict[str, RingSpec] = {}
        self.rings: dict[str, Ring] = {}
        self.workers = worker_plan(settings)
        self.log: structlog.typing.FilteringBoundLogger
        #: the latest ``status()``, for the metrics server's thread: replaced, never changed
        self.snapshot: dict[str, Any] | None = None
        self._snapshot_at = 0.0
        #: CLI status requests waiting for fresh counters: their ROUTER identities, the
        #: workers that still owe a heartbeat, and when to answer with what there is
        self._status_waiting: list[bytes] = []
        self._status_owed: set[str] = set()
        self._status_due: float | None = None
        self.metrics: Any = None  # a supervisor.metrics.MetricsServer while serving
        self.notifier = sdnotify.Notifier.from_environment()
        self._ready_sent = False
        self._ready_ask_at = 0.0  # when to ask control again whether the node has joined
        self._watchdog_at = 0.0
        self._status_text = ""

    # -- start -----------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        make_private_dir(self.runtime)
        make_private_dir(s.node.state_dir)
        self._lock()
        if self.spawn == "template" and self.template is None:
            self.template = fork_template()  # before any thread or ZeroMQ context
        self.log = configure_logging(
            stage="supervisor",
            worker=0,
            node=s.node.name,
            level=s.log.level.value,
            file=s.log_file,
            console=True,
        )
        self._remove_stale_files()
        (self.runtime / "settings.json").write_text(s.to_json())
        (self.runtime / "supervisor.pid").write_text(f"{os.getpid()}\n")
        self._signals()
        self.ctx = zmq.Context()
        self.router = self._bind(zmq.ROUTER, SUPERVISOR_SOCKET)
        self.cli = self._bind(zmq.ROUTER, CLI_SOCKET)
        try:
            if s.metrics_endpoint is not None:
                self._serve_metrics(s.metrics_endpoint)
            self._create_rings()
            self.log.info(
                "node_starting",
                address=str(s.network.address) if s.network.address else "dhcp",
                workers=len(self.workers),
            )
            self._start_workers()
            self.log.info("node_started", startup_s=round(time.monotonic() - self.started, 3))
            self._loop()
            return 0
        except NodeError as exc:
            self.log.error("node_failed", error=str(exc))
            return 1
        finally:
            self._shutdown()

    def _serve_metrics(self, where: Endpoint) -> None:
        from supervisor.metrics import MetricsServer  # prometheus-client only when asked for

        try:
            self.metrics = MetricsServer(where, lambda: self.snapshot)
        except OSError as exc:
            raise NodeError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        self.log.info("metrics_started", address=self.metrics.address)

    def _lock(self) -> None:
        self.lock_fd = os.open(self.runtime / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeError(f"a node is already running with runtime_dir {self.runtime}") from None

    def _remove_stale_files(self) -> None:
        """What a supervisor killed by kill -9 (or a power cut) left behind: its pid file
        and the ZeroMQ sockets of the supervisor and control. We hold the lock, so nobody
        uses them."""
        stale = [self.runtime / "supervisor.pid", *sorted(self.runtime.glob("*.ipc"))]
        removed = []
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
        if removed:
            self.log.warning(
                "stale_files_removed",
                files=removed,
                reason="a supervisor that did not stop cleanly left them",
            )

    def _signals(self) -> None:
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _bind(self, kind: int, name: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity
        sock.bind(endpoint(self.runtime, name))
        return sock

    def _create_rings(self) -> None:
        for edge in self.settings.stages.topology().rings():
            spec = create_ring(edge.name, edge.size)
            self.specs[edge.name] = spec
            self.rings[edge.name] = Ring.attach(spec)

    def _start_workers(self) -> None:
        """Spawn every worker at once, in start order, then wait for all their READYs: the
        interpreters start in parallel. Nothing is lost meanwhile: a worker's rings and
        ZeroMQ connections are there before it is, records wait in the rings."""
        slots = self.workers
        if self._template_ready(TEMPLATE_READY_S):
            self._fork_all(slots)
        for w in slots:
            if w.proc is None:  # no template, or it failed
                self._spawn(w)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(w.ready for w in slots):
            if self.stopping:
                raise NodeError("stopped while starting")
            if time.monotonic() > deadline:
                late = [w.name for w in slots if not w.ready]
                raise NodeError(f"workers never said ready: {', '.join(late)}")
            self._poll(0.2)
            self._housekeeping(time.monotonic())

    def _handed(self, w: WorkerSlot) -> dict[str, tuple[int, int]]:
        return {name: (self.specs[name].mem_fd, self.specs[name].bell_fd) for name in w.rings}

    def _fork_all(self, slots: list[WorkerSlot]) -> None:
        """Ask the template for every worker at once, then read the answers: it forks them
        back to back. On failure the rest are left to ``_spawn``."""
        assert self.template is not None
        try:
            for w in slots:
                self.template.ask(str(w.stage), w.index, self.runtime, self._handed(w))
            for w in slots:
                self._started(w, Forked(self.template.answer()), forked=True)
        except (TemplateError, OSError) as exc:
            self.log.error("template_failed", error=str(exc))
            self._drop_template()

    def _spawn(self, w: WorkerSlot) -> None:
        """Start the worker of ``w``: forked by the template if it is ready, else spawned."""
        handed = self._handed(w)
        if self.template is not None and self._template_ready(0.0):
            try:
                pid = self.template.spawn(str(w.stage), w.index, self.runtime, handed)
                self._started(w, Forked(pid), forked=True)
                return
            except (TemplateError, OSError) as exc:
                self.log.error("template_failed", error=str(exc), target=w.name)
                self._drop_template()
        self._started(w, self._spawn_plain(w, handed), forked=False)

    def _started(self, w: WorkerSlot, proc: Process, *, forked: bool) -> None:
        w.proc = proc
        w.forked = forked
        w.pidfd = os.pidfd_open(proc.pid)
        w.started = time.monotonic()
        w.last_heartbeat = w.started
        w.ready = False
        w.restart_at = None
        self.log.info(
            "worker_spawned",
            target=w.name,
            target_pid=w.proc.pid,
            restarts=w.restarts,
            method="template" if w.forked else "spawn",
        )

    def _spawn_plain(self, w: WorkerSlot, handed: dict[str, tuple[int, int]]) -> Process:
        """``python -m pipeline.<stage>``: a fresh interpreter, its rings' fds inherited."""
        fds = [fd for pair in handed.values() for fd in pair]
        env = dict(os.environ, AUTOVN_RINGS=json.dumps({k: list(v) for k, v in handed.items()}))
        for name in sdnotify.VARIABLES:  # only the supervisor talks to systemd
            env.pop(name, None)
        argv = [sys.executable, "-m", f"pipeline.{w.stage}", "--runtime-dir", str(self.runtime)]
        argv += ["--worker", str(w.index), "--parent-pid", str(os.getpid())]
        return subprocess.Popen(argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)

    # -- the template ----------------------------------------------------------------------------

    def _template_ready(self, timeout_s: float) -> bool:
        """Whether the template can fork now (its imports done), waiting up to ``timeout_s``;
        a template that failed is dropped (and started again later)."""
        t = self.template
        if t is None:
            return False
        if t.ready:
            return True
        try:
            if not t.wait_ready(timeout_s):
                if timeout_s > 0:
                    self.log.warning("template_late", waited_s=timeout_s)
                return False
        except TemplateError as exc:
            self.log.error("template_failed", error=str(exc))
            self._drop_template()
            return False
        self.log.info(
            "template_ready",
            target_pid=t.pid,
            ready_s=round(time.monotonic() - t.started, 3),
            started=self.templates_started,
        )
        return True

    def _drop_template(self) -> None:
        """Kill and reap the template (if it still runs) and plan its next start."""
        t = self.template
        if t is None:
            return
        self.template = None
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(t.pidfd, signal.SIGKILL)
        code = None
        with contextlib.suppress(ChildProcessError, OSError):
            result = os.waitid(os.P_PIDFD, t.pidfd, os.WEXITED)
            code = _exit_code(result) if result is not None else None
        if self._template_proc is not None:
            self._template_proc.returncode = code  # reaped here, not by subprocess
            self._template_proc = None
        t.close()
        self._kill_strays()
        if self.stopping:
            return
        cap = self.settings.stages.restart_backoff_max_s
        ran = time.monotonic() - t.started
        b = self._template_backoff_s
        b = TEMPLATE_BACKOFF_S if ran > GOOD_RUN_S or b == 0 else min(cap, b * 2)
        self._template_backoff_s = b
        self._template_at = time.monotonic() + b
        self.log.warning(
            "template_exited", target_pid=t.pid, code=code, ran_s=round(ran, 3), restart_in_s=b
        )

    def _restart_template(self) -> None:
        """Start the template again, as a fresh interpreter (we have threads now: no fork).
        Workers are spawned the plain way until it is ready."""
        self._template_at = None
        try:
            self.template, self._template_proc = exec_template()
        except OSError as exc:
            self.log.error("template_failed", error=str(exc))
            self._template_at = time.monotonic() + max(self._template_backoff_s, 1.0)
            return
        self.templates_started += 1
        self.log.info("template_restarted", target_pid=self.template.pid)

    def _kill_strays(self) -> None:
        """After a template failure: a worker it forked but whose pid we never read is our
        child that no slot knows. Kill every such child (the reaper collects them)."""
        known = {w.pid for w in self.workers if w.pid is not None}
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in known:
                continue
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(text[text.rfind(")") + 2 :].split()[1]) == me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)
                self.log.warning("stray_killed", target_pid=int(entry))

    def _reap_orphans(self) -> None:
        """As a subreaper we inherit whatever a dead worker left (e.g. an ``ip`` command it
        ran): reap those. Our workers and the template are reaped where they are watched."""
        mine = {w.pid for w in self.workers if w.pid is not None}
        if self.template is not None:
            mine.add(self.template.pid)
        while True:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if found is None or found.si_pid in mine:
                return  # one of ours: its pidfd says so on the next poll
            with contextlib.suppress(ChildProcessError):
                os.waitpid(found.si_pid, 0)
            self.log.info("orphan_reaped", target_pid=found.si_pid)

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            if self._template_at is not None:
                due.append(self._template_at)
            if self.notifier is not None and self.notifier.watchdog_s:
                due.append(self._watchdog_at)
            if self._status_due is not None:
                due.append(self._status_due)
            if self.notifier is not None and not self._ready_sent:
                due.append(self._ready_ask_at)
            self._poll(max(0.0, min([now + IDLE_POLL_S, *due]) - now))
            self._housekeeping(time.monotonic())

    def _poll(self, timeout_s: float) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.cli, zmq.POLLIN)
        poller.register(self.wake_r, zmq.POLLIN)
        for w in self.workers:
            if w.pidfd is not None:
                poller.register(w.pidfd, zmq.POLLIN)
        template = self.template
        if template is not None:
            poller.register(template.pidfd, zmq.POLLIN)
            if not template.ready:  # its ready message, after a restart
                poller.register(template.fileno(), zmq.POLLIN)
        ready = dict(poller.poll(int(timeout_s * 1000)))
        if template is not None and template.pidfd in ready:
            self._drop_template()
        elif template is not None and template.fileno() in ready:
            self._template_ready(0.0)
        if self.wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 1024)
        if self.router in ready:
            self._on_worker_messages()
        if self.cli in ready:
            self._on_cli()
        for w in self.workers:
            if w.pidfd is not None and w.pidfd in ready:
                self._on_exit(w)

    def _on_worker_messages(self) -> None:
        while self.router.poll(0):
            ident, data = self.router.recv_multipart()[:2]
            w = self._by_identity(ident)
            try:
                msg = messages.decode(data)
            except ValueError:
                self.log.warning(
                    "message_dropped", reason="undecodable", source=ident.decode(errors="replace")
                )
                continue
            if w is None or (w.pid is not None and getattr(msg, "pid", w.pid) != w.pid):
                continue  # a message from a worker we already replaced
            w.last_heartbeat = time.monotonic()
            if isinstance(msg, messages.Ready):
                w.ready = True
                self.log.info(
                    "worker_ready",
                    target=w.name,
                    target_pid=msg.pid,
                    ready_s=round(time.monotonic() - w.started, 3),
                )
            elif isinstance(msg, messages.Heartbeat):
                w.stats = msg.stats
                self.router.send_multipart([ident, messages.encode(messages.HeartbeatAck())])
                self._status_owed.discard(w.name)
        if self._status_waiting and not self._status_owed:
            self._answer_status()

    def _by_identity(self, ident: bytes) -> WorkerSlot | None:
        stage, _, index = ident.decode(errors="replace").partition(":")
        for w in self.workers:
            if w.stage == stage and str(w.index) == index:
                return w
        return None

    def _on_exit(self, w: WorkerSlot) -> None:
        assert w.proc is not None and w.pidfd is not None
        code = w.proc.wait()
        os.close(w.pidfd)
        w.pidfd = None
        ran = time.monotonic() - w.started
        if self.stopping:
            return
        cap = self.settings.stages.restart_backoff_max_s
        if ran > CRASH_LOOP_S or w.restarts == 0:
            w.backoff_s = 0.0  # a worker that ran (or died the first time) comes back at once
        else:  # a crash loop (it died within CRASH_LOOP_S of starting): 0.1 s, doubling
            w.backoff_s = min(cap, max(0.1, w.backoff_s * 2))
        w.restart_at = time.monotonic() + w.backoff_s
        w.ready = False
        self.log.warning(
            "worker_exited",
            target=w.name,
            target_pid=w.proc.pid,
            code=code,
            ran_s=round(ran, 3),
            restart_in_s=w.backoff_s,
        )

    def _housekeeping(self, now: float) -> None:
        timeout = self.settings.stages.heartbeat_timeout_s
        if self._status_due is not None and now >= self._status_due:
            self._answer_status()
        if self._template_at is not None and now >= self._template_at and not self.stopping:
            self._restart_template()
        if self.spawn == "template":
            self._reap_orphans()
        for w in self.workers:
            if w.restart_at is not None and now >= w.restart_at:
                w.restarts += 1
                self._spawn(w)
                self.log.info("worker_restarted", target=w.name, restarts=w.restarts)
            elif w.pidfd is not None and now - w.last_heartbeat > (
                timeout if w.ready else READY_TIMEOUT_S
            ):
                self.log.error(
                    "worker_hung",
                    target=w.name,
                    target_pid=w.pid,
                    silent_s=round(now - w.last_heartbeat, 1),
                )
                assert w.proc is not None
                w.proc.kill()
                w.last_heartbeat = now
        if self.metrics is not None and now >= self._snapshot_at:
            self.snapshot = self.status()  # one assignment: the server's thread reads it
            self._snapshot_at = now + SNAPSHOT_S
        if self.notifier is not None:
            self._notify(now)

    # -- systemd -----------------------------------------------------------------------------------

    def _notify(self, now: float) -> None:
        """WATCHDOG=1 when due; READY=1 once joined; STATUS= when it changes."""
        assert self.notifier is not None
        period = self.notifier.watchdog_s
        if period and now >= self._watchdog_at:
            self._tell(WATCHDOG=1)
            self._watchdog_at = now + period / 2
        if self.stopping:
            return
        text = self._status_line()
        if not self._ready_sent and self._joined():
            self._ready_sent = True
            self._status_text = text
            self._tell(READY=1, STATUS=text)
        elif not self._ready_sent and now >= self._ready_ask_at:
            # control's state comes with its heartbeat, every 2 s: ask for it now and then
            # instead, so READY=1 (what `systemctl start` waits for) follows the join closely
            self._ready_ask_at = now + READY_ASK_S
            control = next((w for w in self.workers if w.stage is Stage.CONTROL), None)
            if control is not None:
                self._ask_report(control)
        elif self._ready_sent and text != self._status_text:
            self._status_text = text
            self._tell(STATUS=text)

    def _tell(self, **fields: str | int) -> None:
        assert self.notifier is not None
        failed_before = self.notifier.error is not None
        if not self.notifier.send(**fields) and not failed_before:
            self.log.warning("notify_failed", error=str(self.notifier.error))

    def _control_stats(self) -> dict[str, Any]:
        control = next((w for w in self.workers if w.stage is Stage.CONTROL), None)
        return control.stats if control is not None else {}

    def _joined(self) -> bool:
        """Every worker runs and control says the node has its place on the overlay (a node
        without an overlay: control has reported at all)."""
        stats = self._control_stats()
        if not stats or not all(w.ready for w in self.workers):
            return False
        overlay = stats.get("overlay")
        return overlay is None or overlay.get("state") == "joined"

    def _status_line(self) -> str:
        """What ``systemctl status`` shows: the address, links up, the overlay."""
        stats = self._control_stats()
        address = stats.get("address") or "no address yet"
        links = [lk for lk in stats.get("link_table") or [] if lk.get("up")]
        peers = [p for p in stats.get("peers") or [] if p.get("state") == "up"]
        text = f"address {address}, {len(links)} link(s) up"
        if stats.get("peers"):
            text += f", {len(peers)} of {len(stats['peers'])} static peer(s) up"
        overlay = stats.get("overlay")
        if overlay is not None:
            text += (
                f", overlay {overlay.get('state')} (about {overlay.get('estimated_size')} nodes)"
            )
        return text

    # -- status ------------------------------------------------------------------------------------

    def _on_cli(self) -> None:
        while self.cli.poll(0):
            frames = self.cli.recv_multipart()
            try:
                msg = messages.decode(frames[-1])
            except ValueError:
                continue
            if isinstance(msg, messages.StatusRequest):
                self._status_waiting.append(frames[0])
                if self._status_due is None:
                    self._ask_reports()

    def _ask_report(self, w: WorkerSlot) -> bool:
        """Ask worker ``w`` for a heartbeat now, if it runs; True if the request went."""
        if not (w.ready and w.pidfd is not None):
            return False
        try:
            self.router.send_multipart([w.name.encode(), _REPORT_REQUEST], zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _ask_reports(self) -> None:
        """Ask every running worker for a heartbeat now, for a fresh status."""
        self._status_owed = {w.name for w in self.workers if self._ask_report(w)}
        if not self._status_owed:
            self._answer_status()
        else:
            self._status_due = time.monotonic() + STATUS_WAIT_S

    def _answer_status(self) -> None:
        reply = messages.encode(messages.StatusReply(self.status()))
        for ident in self._status_waiting:
            with contextlib.suppress(zmq.ZMQError):
                self.cli.send_multipart([ident, b"", reply], zmq.NOBLOCK)
        self._status_waiting.clear()
        self._status_owed.clear()
        self._status_due = None

    def status(self) -> dict[str, Any]:
        s = self.settings
        now = time.monotonic()
        workers = []
        for w in self.workers:
            state = "running" if w.ready else ("restarting" if w.restart_at else "starting")
            workers.append(
                {
                    "stage": w.stage,
                    "worker": w.index,
                    "pid": w.pid,
                    "state": state,
                    "uptime_s": round(now - w.started, 1) if w.pidfd is not None else None,
                    "restarts": w.restarts,
                    "heartbeat_age_s": round(now - w.last_heartbeat, 1),
                    "stats": w.stats,
                }
            )
        control = next((w for w in self.workers if w.stage is Stage.CONTROL), None)
        return {
            "node": s.node.name,
            "namespace": s.network.namespace,
            "address": str(control.stats.get("address") or "-") if control else "-",
            "subnet": str(s.network.subnet),
            "mode": s.network.mode.value,
            "addressing": "static" if s.network.address is not None else "dhcp",
            "device": s.network.device,
            "listen": f"{s.overlay.listen_address}:{s.overlay.listen_port}",
            "supervisor_pid": os.getpid(),
            "spawn": self.spawn,
            "template_pid": self.template.pid if self.template is not None else None,
            "uptime_s": round(now - self.started, 1),
            "workers": workers,
            "rings": [read_stats(r)._asdict() for r in self.rings.values()],
            "node_id": control.stats.get("node_id") if control else None,
            "encrypted": not s.security.insecure_plaintext,
            "links": control.stats.get("links", {}) if control else {},
            "peers": (control.stats.get("peers", []) if control else []),
            "overlay": control.stats.get("overlay") if control else None,
            "port_mapping": control.stats.get("port_mapping") if control else None,
            "link_table": self._link_table(control),
            "machines": self._machines(control),
        }

    def _link_table(self, control: Any) -> list[dict[str, Any]]:
        if control is None:
            return []
        overlay_io = [w.stats for w in self.workers if w.stage is Stage.OVERLAY_IO]
        return with_peer_bytes(control.stats.get("link_table") or [], overlay_io)

    def _machines(self, control: Any) -> list[dict[str, Any]]:
        """Router mode: the machines control leased, with the classifiers' counters."""
        if control is None:
            return []
        machines: list[dict[str, Any]] = (control.stats.get("addressing") or {}).get("machines", [])
        counts: dict[str, list[int]] = {}
        for w in self.workers:
            if w.stage is Stage.CLASSIFIER:
                for address, pair in (
                    (w.stats.get("classifier") or {}).get("machines") or {}
                ).items():
                    total = counts.setdefault(address, [0, 0])
                    total[0] += pair[0]
                    total[1] += pair[1]
        return [
            {**m, "to_overlay": counts.get(m["address"], [0, 0])[0],
             "from_overlay": counts.get(m["address"], [0, 0])[1]}
            for m in machines
        ]  # fmt: skip

    # -- shutdown -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self.stopping = True
        if self.notifier is not None:
            self._tell(STOPPING=1, STATUS="stopping")
        self._drop_template()  # it holds nothing: no more forks
        # control first: it leaves the overlay (a Close to each connection) and hands the
        # Closes to overlay_io, which sends them before its own turn; then from the TAP
        # inwards, so that no frame enters a pipeline whose next stage is gone
        self._stop_stage(Stage.CONTROL)
        for stage in reversed(START_ORDER):
            if stage is not Stage.CONTROL:
                self._stop_stage(stage)
        for ring in self.rings.values():
            ring.close()
        for spec in self.specs.values():
            for fd in (spec.mem_fd, spec.bell_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        for name in (SUPERVISOR_SOCKET, CLI_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                (self.runtime / f"{name}.ipc").unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.runtime / "supervisor.pid").unlink()
        self.router.close(0)
        self.cli.close(0)
        self.ctx.term()
        if self.metrics is not None:
            self.metrics.close()
        if self.notifier is not None:
            self.notifier.close()
        self.log.info("node_stopped")

    def _stop_stage(self, stage: Stage) -> None:
        slots = [w for w in self.workers if w.stage == stage and w.proc and w.proc.poll() is None]
        for w in slots:
            ident = w.name.encode()
            with contextlib.suppress(zmq.ZMQError):
                self.router.send_multipart([ident, messages.encode(messages.Stop())], zmq.NOBLOCK)
        deadline = time.monotonic() + STOP_GRACE_S
        for w in slots:
            assert w.proc is not None
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker_killed", target=w.name, target_pid=w.proc.pid)
                w.proc.kill()
                w.proc.wait()
            if w.pidfd is not None:
                os.close(w.pidfd)
                w.pidfd = None
            self.log.info("worker_stopped", target=w.name, code=w.proc.returncode)


def with_peer_bytes(
    link_table: list[dict[str, Any]], overlay_io: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Control's links, each with ``bytes_sent`` and ``bytes_received``: the overlay_io
    workers' ``peer_bytes`` (slot -> [sent, received]; a relayed peer's are its end-to-end
    datagrams) summed over the workers and joined by slot. New dicts: control's stats are
    never changed."""
    totals: dict[int, list[int]] = {}
    for stats in overlay_io:
        for slot, (sent, received) in (stats.get("peer_bytes") or {}).items():
            total = totals.setdefault(int(slot), [0, 0])
            total[0] += sent
            total[1] += received
    rows = []
    for lk in link_table:
        sent, received = totals.get(lk.get("slot", -1), (0, 0))
        rows.append({**lk, "bytes_sent": sent, "bytes_received": received})
    return rows
