"""The worker template: a pre-imported process that forks the node's workers on request.

Starting a worker as ``python -m pipeline.<stage>`` costs a fresh interpreter and its
imports (structlog, ZeroMQ, msgspec, the crypto libraries, the stage's own modules): a
second or more per worker on a busy 2-core machine, paid again at every restart. The
template pays it once. It is a process with no thread and no ZeroMQ context that imports
every stage's modules, freezes its objects out of the garbage collector (``gc.freeze``: a
forked child then leaves those pages shared instead of touching them on its first
collection) and waits on a unix socket (SOCK_SEQPACKET) for requests from the supervisor.

How it starts: ``supervisor start`` forks it first thing, before the settings are even
loaded (:func:`fork_template`: the CLI process then has imported structlog, ZeroMQ and the
settings code but made no thread and no context), so its imports run while the supervisor
sets itself up. A template that dies is started again by the supervisor as a fresh
interpreter (``python -m supervisor.template --socket-fd N --supervisor-pid P``), because by
then the supervisor has threads and a ZeroMQ context and must not fork.

Keeping pages shared (PSS of a node at rest): besides ``gc.freeze``, the forking process
empties the type attribute cache before each fork (see :func:`_double_fork`) and fills the
allocator's free blocks before the first (:func:`occupy_free_blocks`), so that a child's
first steps do not take a private copy of pages it never meant to change.

The protocol (one datagram each way per request; JSON):

- template -> supervisor, once, when its imports are done: ``{"ready": true, "pid": P}``;
- supervisor -> template: ``{"stage": "classifier", "worker": 0, "runtime_dir": "...",
  "rings": ["tap_reader0>classifier0", ...]}`` with the rings' fds attached by SCM_RIGHTS,
  two per ring (memfd, then eventfd) in the order of ``rings``;
- template -> supervisor: ``{"pid": P}`` (the new worker's pid), or ``{"error": "..."}``.

The fds travel with each request rather than being inherited when the template is made:
the template can then start before the rings exist, and a template started again later gets
them the same way (a worker only ever holds its own rings' fds).

Whose child a worker is: the template forks an intermediate process that forks the worker
and exits at once; the worker, orphaned, is re-parented to the nearest subreaper, which is
the supervisor (``PR_SET_CHILD_SUBREAPER``). The template replies only once it has reaped the
intermediate, so by then the worker is the supervisor's child: the supervisor opens its pidfd,
reaps it, reads its exit code and restarts it exactly as a worker it started itself, and the
template dying takes no worker with it. The worker waits until its parent is the supervisor,
then asks for ``PR_SET_PDEATHSIG`` (relative to the supervisor, as a spawned worker does).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from supervisor import sdnotify

#: stage -> (module, class) of its worker
WORKER_CLASSES = {
    "control": ("pipeline.control.stage", "ControlWorker"),
    "overlay_io": ("pipeline.overlay_io.stage", "OverlayIoWorker"),
    "classifier": ("pipeline.classifier.stage", "ClassifierWorker"),
    "tap_reader": ("pipeline.tap_reader.stage", "TapReaderWorker"),
}
MAX_MESSAGE = 65536
MAX_FDS = 512
REPARENT_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class TemplateError(Exception):
    """The template did not answer, answered nonsense, or could not fork."""


def _prctl(option: int, value: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def become_subreaper() -> None:
    """Orphaned descendants (a worker whose forking parent exited) become our children."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


# -- the supervisor's side ------------------------------------------------------------------------


class TemplateClient:
    """The supervisor's handle on a running template: its pid, pidfd and socket."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.pidfd = os.pidfd_open(pid)
        self.ready = False
        self.started = time.monotonic()

    def fileno(self) -> int:
        return self.sock.fileno()

    def wait_ready(self, timeout_s: float) -> bool:
        """Read the template's ready message if it comes within ``timeout_s``."""
        if not self.ready:
            reply = self._recv(timeout_s)
            if reply is None:
                return False
            if reply.get("ready") is not True:
                raise TemplateError(f"unexpected message from the template: {reply}")
            self.ready = True
        return True

    def spawn(
        self,
        stage: str,
        index: int,
        runtime_dir: Path,
        rings: dict[str, tuple[int, int]],
        timeout_s: float = 5.0,
    ) -> int:
        """Ask for a worker; its pid (already the supervisor's child). TemplateError if the
        template is not ready, does not answer within ``timeout_s`` or cannot fork."""
        if not self.wait_ready(timeout_s):
            raise TemplateError("the template is not ready")
        self.ask(stage, index, runtime_dir, rings)
        return self.answer(timeout_s)

    def ask(
        self, stage: str, index: int, runtime_dir: Path, rings: dict[str, tuple[int, int]]
    ) -> None:
        """Send a request (the template must be ready); :meth:`answer` reads its reply.
        Several requests may be sent before their answers are read, which come in order."""
        request = {"stage": stage, "worker": index, "runtime_dir": str(runtime_dir)}
        request["rings"] = list(rings)
        fds = [fd for pair in rings.values() for fd in pair]
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
        except OSError as exc:
            raise TemplateError(f"cannot reach the template: {exc}") from None

    def answer(self, timeout_s: float = 5.0) -> int:
        """The pid in the reply to the oldest unanswered request; TemplateError if none
        comes within ``timeout_s`` or the template could not fork."""
        reply = self._recv(timeout_s)
        if reply is None:
            raise TemplateError(f"no answer from the template in {timeout_s:g} s")
        if "error" in reply:
            raise TemplateError(str(reply["error"]))
        pid = reply.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            raise TemplateError(f"unexpected answer from the template: {reply}")
        return pid

    def _recv(self, timeout_s: float) -> dict[str, Any] | None:
        if not select.select([self.sock], [], [], timeout_s)[0]:
            return None
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except OSError as exc:
            raise TemplateError(f"cannot reach the template: {exc}") from None
        if not data:
            raise TemplateError("the template closed its socket")
        try:
            reply = json.loads(data)
        except ValueError:
            raise TemplateError("undecodable message from the template") from None
        if not isinstance(reply, dict):
            raise TemplateError(f"unexpected message from the template: {reply!r}")
        return reply

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.pidfd)


#: objects that fill the free blocks of the allocator's pools before a fork (see
#: :func:`occupy_free_blocks`); kept for the life of the process
_FILLERS: list[object] = []
_SIZE_CLASS = re.compile(r"^\s*\d+\s+(\d+)\s+\d+\s+\d+\s+(\d+)\s*$", re.M)


def free_blocks() -> dict[int, int]:
    """Block size -> free blocks in pymalloc's partly used pools, from
    ``sys._debugmallocstats()`` (which prints to the C stderr, borrowed here for a pipe).
    Only call this while the process has no other thread (one might write to stderr)."""
    r, w = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(w, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
    with os.fdopen(r, "rb") as stats:
        text = stats.read().decode(errors="replace")
    return {int(m[1]): int(m[2]) for m in _SIZE_CLASS.finditer(text) if int(m[2])}


def occupy_free_blocks(rounds: int = 2) -> int:
    """Fill the free blocks of the allocator's partly used pools with objects that live as
    long as the process; how many. A process forked after this and its parent then each put
    their new objects in fresh pools (pages of their own from the start) instead of in those
    free blocks, which sit on pages they share: each would take a copy of every such page.
    Costs the free blocks' bytes (a few hundred KiB), once. A round frees some blocks of its
    own (its temporaries), which the next round fills."""
    count = 0
    for _ in range(rounds):
        blocks = free_blocks()
        for size, free in blocks.items():
            for i in range(free):
                if size == 16:
                    _FILLERS.append(object())  # an object() is a 16-byte block
                elif size == 32:
                    _FILLERS.append(i + 0.5)  # a float is 24 bytes
                else:
                    _FILLERS.append(bytes(size - 33))  # a bytes object: 33 bytes + its length
        count += sum(blocks.values())
    return count


def fork_template() -> TemplateClient:
    """Fork the template from this process (no thread, no ZeroMQ context may exist here).
    The parent gets the client; the child never returns."""
    become_subreaper()
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor = os.getpid()
    # What both have now stays shared: the supervisor's collections no longer touch it,
    # neither writes the names held by the type cache as it replaces them (see _double_fork),
    # and neither puts its new objects on the pages they share.
    gc.freeze()
    sys._clear_type_cache()
    occupy_free_blocks()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the template's life, tested through its socket
        code = 1
        try:
            parent_end.close()
            code = serve(child_end, supervisor)
        except BaseException:  # noqa: BLE001 - a forked child must never unwind into its parent's code
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    child_end.close()
    return TemplateClient(pid, parent_end)


def exec_template() -> tuple[TemplateClient, Any]:
    """Start the template as a fresh interpreter (when this process may no longer fork).
    Returns the client and the ``subprocess.Popen`` (the supervisor reaps it by pidfd)."""
    import subprocess

    become_subreaper()
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    argv = [sys.executable, "-m", "supervisor.template", "--socket-fd", str(child_end.fileno())]
    argv += ["--supervisor-pid", str(os.getpid())]
    env = dict(os.environ)
    for name in sdnotify.VARIABLES:  # only the supervisor talks to systemd
        env.pop(name, None)
    proc = subprocess.Popen(argv, pass_fds=[child_end.fileno()], env=env, stdin=subprocess.DEVNULL)
    child_end.close()
    return TemplateClient(proc.pid, parent_end), proc


# -- the template's side --------------------------------------------------------------------------


def preload() -> dict[str, type]:
    """Import every stage's worker class (and with them everything the stages use)."""
    classes = {}
    for stage, (module, name) in WORKER_CLASSES.items():
        classes[stage] = getattr(importlib.import_module(module), name)
    return classes


def drop_variables(names: tuple[str, ...]) -> None:
    """Remove ``names`` from the environment, and blank them in the process's original
    environment block too (what ``/proc/PID/environ`` shows: a forked process keeps its
    parent's, whatever ``unsetenv`` did). The block is only read through /proc once the
    variables are unset, so overwriting it changes nothing else; if /proc/self/mem cannot be
    written, only the environment is cleaned."""
    for name in names:
        os.environ.pop(name, None)
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            block = mem.read(end - start)
            at = 0
            for entry in block.split(b"\0"):
                if any(entry.startswith(name.encode() + b"=") for name in names):
                    mem.seek(start + at)
                    mem.write(bytes(len(entry)))
                at += len(entry) + 1
    except (OSError, ValueError, IndexError):
        pass


def serve(sock: socket.socket, supervisor_pid: int) -> int:
    """The template's loop: answer spawn requests until the supervisor closes the socket or
    dies. Returns the exit code."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    drop_variables(sdnotify.VARIABLES)  # only the supervisor talks to systemd: not its workers
    gc.disable()
    classes = preload()
    sys._clear_type_cache()  # see _double_fork
    occupy_free_blocks()  # a worker's new objects go to pages of its own
    gc.freeze()  # children leave the pre-imported objects' pages shared
    gc.enable()  # later objects are collected as usual (the frozen ones are not looked at)
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        except InterruptedError:
            continue
        except OSError:
            return 0
        if not data:
            return 0  # the supervisor closed its end
        try:
            reply = _handle(data, fds, classes, sock, supervisor_pid)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        sock.send(json.dumps(reply).encode())


def parse_request(data: bytes, fds: list[int]) -> tuple[str, int, Path, dict[str, tuple[int, int]]]:
    """(stage, worker index, runtime dir, ring name -> (memfd, eventfd)) of a request, or
    ValueError saying what is wrong with it."""
    try:
        request = json.loads(data)
    except ValueError:
        raise ValueError("undecodable request") from None
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    stage, index = request.get("stage"), request.get("worker")
    runtime_dir, names = request.get("runtime_dir"), request.get("rings")
    if stage not in WORKER_CLASSES:
        raise ValueError(f"unknown stage {stage!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"bad worker index {index!r}")
    if not isinstance(runtime_dir, str) or not runtime_dir:
        raise ValueError("no runtime_dir")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("rings must be a list of names")
    if len(fds) != 2 * len(names):
        raise ValueError(f"{len(names)} ring(s) need {2 * len(names)} fds, got {len(fds)}")
    rings = {name: (fds[2 * i], fds[2 * i + 1]) for i, name in enumerate(names)}
    return stage, index, Path(runtime_dir), rings


def _handle(
    data: bytes,
    fds: list[int],
    classes: dict[str, type],
    sock: socket.socket,
    supervisor_pid: int,
) -> dict[str, Any]:
    try:
        stage, index, runtime_dir, rings = parse_request(data, fds)
    except ValueError as exc:
        return {"error": str(exc)}
    try:
        worker_class = classes[stage]
        pid = _double_fork(
            lambda: _become_worker(worker_class, index, runtime_dir, rings, sock, supervisor_pid)
        )
    except OSError as exc:
        return {"error": f"cannot fork: {exc}"}
    return {"pid": pid}


def _double_fork(child: Any) -> int:
    """Run ``child()`` in a grandchild whose parent exits at once; its pid once the
    intermediate has been reaped (the grandchild has been re-parented by then)."""
    r, w = os.pipe()
    # The type attribute cache holds a reference to each name it caches: a worker that evicts
    # the template's entries would write the refcount of each of those names (strings spread
    # over most of the template's pages), taking its own copy of every such page. Emptied
    # here, in the template, the entries a worker replaces are the cache's own None.
    sys._clear_type_cache()
    middle = os.fork()
    if middle == 0:  # pragma: no cover - runs in forked children
        code = 1
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                code = child()
            else:
                os.write(w, struct.pack("=i", pid))
                code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - never unwind into the template's loop
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while len(data) < 4:
            chunk = os.read(r, 4 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    if len(data) != 4:
        raise OSError("the intermediate process did not report its child")
    (pid,) = struct.unpack("=i", data)
    return int(pid)


def _become_worker(
    worker_class: Any,
    index: int,
    runtime_dir: Path,
    rings: dict[str, tuple[int, int]],
    sock: socket.socket,
    supervisor_pid: int,
) -> int:  # pragma: no cover - runs in the forked worker, tested live
    """In the new worker: wait to be the supervisor's child, drop the template's fds, run."""
    from pipeline.worker import run_worker

    sock.close()
    deadline = time.monotonic() + REPARENT_TIMEOUT_S
    while os.getppid() != supervisor_pid:
        if os.getppid() == 1 or time.monotonic() > deadline:
            return 0  # the supervisor is gone (or not our subreaper): nothing to work for
        time.sleep(0.0002)
    os.environ["AUTOVN_RINGS"] = json.dumps({k: list(v) for k, v in rings.items()})
    return run_worker(worker_class, runtime_dir, index, supervisor_pid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m supervisor.template")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--supervisor-pid", type=int, required=True)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket_fd)
    sys.exit(serve(sock, args.supervisor_pid))


if __name__ == "__main__":
    main()
