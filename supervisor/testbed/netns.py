"""A throw-away network of Linux network namespaces for tests, benchmarks and demos.

``Testbed`` builds namespaces, veth links and bridges, starts processes inside them and tears
everything down again::

    with Testbed() as tb:
        a, b = tb.namespace("a"), tb.namespace("b")
        if_a, if_b = tb.link(a, b, "198.18.0.1/24", "198.18.0.2/24")
        a.run(["ping", "-c", "2", "-W", "1", "198.18.0.2"])

The project's network rules, enforced here rather than left to callers:

- Nothing is created in, and nothing is changed in, the root namespace. Every ``ip`` command
  that creates a device runs *inside* a testbed namespace (``ip -n NS link add ...``); a veth's
  second end is created directly in its target namespace (``peer name X netns NS2``), so no
  device ever exists in the root namespace, not even for an instant. ``sysctl`` is run inside
  the namespace and only ``net.*`` keys are accepted (the others are global to the host).
- Underlay addresses must lie in 198.18.0.0/15 (``ValueError`` otherwise).
- Names derive from ``run_id`` (``prefix`` + 8 random hex digits), unique to the run. Interface
  names are per namespace and never longer than 15 characters.
- A namespace may have its own files in ``/etc/netns/<name>/`` (:meth:`Namespace.etc_file`,
  :meth:`Namespace.resolv_conf`): ``ip netns exec`` bind-mounts each over ``/etc/<file>`` in
  the mount namespace of the command it runs, so a resolver there reads the namespace's
  ``resolv.conf`` and the root namespace's ``/etc/resolv.conf`` is never written. Only files
  that exist in ``/etc`` can be shadowed (a bind mount needs a target).
- ``close()`` (also run by ``__exit__``, by SIGTERM/SIGINT/SIGHUP handlers and at interpreter
  exit) stops every process this testbed started (SIGTERM to the process group, then SIGKILL),
  ends any other process still inside its namespaces (found with ``ip netns pids``, signalled
  through a pidfd after checking it really is in that namespace), deletes the namespaces and
  checks that they are gone, then removes their ``/etc/netns/<name>`` directories (and
  ``/etc/netns`` itself if a testbed made it and nothing else is in it). It never raises on
  failure; problems are written to stderr.

Signals: while at least one testbed is open, handlers for SIGTERM, SIGINT and SIGHUP are
installed (main thread only, and not for a signal the process ignores). On a signal they close
every open testbed, put the previous handlers back and deliver the signal again, so the process
then behaves exactly as it would have without a testbed (dies by SIGTERM, raises
KeyboardInterrupt, ...). A signal that arrives while a namespace is being created or a testbed is
being closed is held until that step is done, so neither can be torn in half. When the last
testbed closes, the previous handlers are restored. Nothing can clean up after SIGKILL.

A testbed is meant to be used from one thread. Pure standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType, TracebackType
from typing import IO, Any

__all__ = [
    "UNDERLAY",
    "CommandError",
    "Namespace",
    "NetnsError",
    "QdiscUnavailable",
    "Testbed",
    "leftover_etc_netns",
    "leftover_namespaces",
    "require_root",
    "set_log",
]

#: The only range underlay addresses may come from (RFC 2544 benchmarking range).
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/15")

#: Where ``ip netns exec`` finds a namespace's own /etc files (iproute2's NETNS_ETC_DIR).
ETC_NETNS = "/etc/netns"

_IFNAMSIZ = 15  # longest Linux interface name
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$")
_SYSCTL_KEY_RE = re.compile(r"^net[./][A-Za-z0-9_./-]+$")
_ETC_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_CMD_TIMEOUT = 15.0  # internal ip/tc/sysctl commands
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class NetnsError(RuntimeError):
    """A testbed operation failed (a command failed, or the testbed is already closed)."""


class CommandError(subprocess.CalledProcessError):
    """``CalledProcessError`` whose message also shows the command's stderr."""

    def __str__(self) -> str:
        text = super().__str__()
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        if err:
            text += f": {err.strip()}"
        return text


class QdiscUnavailable(NetnsError):
    """The running kernel lacks a queueing discipline (e.g. ``sch_netem`` not built/loaded)."""


# ----------------------------------------------------------------------------------------------
# small helpers


_log_sink: Callable[[str], None] | None = None  # None: stderr


def set_log(sink: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Send the testbed's own messages (cleanup notes and problems) to ``sink`` instead of
    stderr (None: stderr again); returns the previous sink. A program with a terminal of its
    own (``supervisor demo``) keeps them off the user's screen and reports the outcome."""
    global _log_sink
    previous, _log_sink = _log_sink, sink
    return previous


def _log(msg: str) -> None:
    with contextlib.suppress(Exception):
        if _log_sink is not None:
            _log_sink(msg)
            return
        sys.stderr.write(f"autovn.netns: {msg}\n")
        sys.stderr.flush()


def _tool(name: str) -> str:
    """Absolute path of a tool, so that a caller's ``env`` without PATH does not break us."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    return found or name


def _cmd(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = _CMD_TIMEOUT,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own session; on timeout kill its whole process group."""
    args = list(argv)
    pipe = subprocess.PIPE if capture else None
    with subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=pipe,
        stderr=pipe,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        # Own session: a Ctrl-C on the terminal does not hit our helper commands (a cleanup
        # `ip netns del` must not die half way), and a timeout can kill the whole group.
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group_of_unreaped(proc, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild outside the group holds a pipe
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            stream.close()
                proc.wait(timeout=5)
                out, err = "", ""
            raise subprocess.TimeoutExpired(args, timeout, output=out, stderr=err) from None
        except BaseException:
            _kill_group_of_unreaped(proc, signal.SIGKILL)
            raise
        rc = proc.returncode
    if check and rc != 0:
        raise CommandError(rc, args, out, err)
    return subprocess.CompletedProcess(args, rc, out, err)


def _kill_group_of_unreaped(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal ``proc``'s process group, but only while ``proc`` is not yet reaped.

    ``proc`` was started with ``start_new_session=True``, so its pgid is its pid. While it is
    unreaped (alive or a zombie) that pid cannot be reused, so the signal reaches only processes
    of that group, which we started.
    """
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen[Any]) -> bool:
    """True once ``proc`` has exited; does not reap it (keeps its pid and pgid pinned)."""
    if proc.returncode is not None:
        return True
    try:
        res = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped behind subprocess's back
        return True
    return res is not None


def _terminate(procs: Sequence[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM each process group, wait up to ``timeout``, SIGKILL what is left, reap."""
    alive = [p for p in procs if p.returncode is None]
    for p in alive:
        _kill_group_of_unreaped(p, signal.SIGTERM)
    deadline = time.monotonic() + max(timeout, 0.0)
    waiting = list(alive)
    while waiting:
        waiting = [p for p in waiting if not _exited(p)]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for p in alive:
        # Leader exited or not: members of its group that outlived it go now. The leader is
        # still unreaped here, so the pgid still names only our processes.
        _kill_group_of_unreaped(p, signal.SIGKILL)
    for p in alive:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _log(f"process {p.pid} did not exit after SIGKILL")


def _list_namespaces() -> list[str]:
    res = _cmd([_IP, "netns", "list"], check=False)
    if res.returncode != 0:
        raise NetnsError(f"ip netns list failed: {res.stderr.strip()}")
    names = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if parts:
            names.append(parts[0])
    return names


def _underlay(addr: str | None) -> str | None:
    """Validate an underlay address ("198.18.0.1/24"); it and its subnet lie in 198.18/15."""
    if addr is None:
        return None
    try:
        iface = ipaddress.ip_interface(addr)
    except ValueError as exc:
        raise ValueError(f"bad address {addr!r}: {exc}") from None
    if "/" not in addr:
        raise ValueError(f"address {addr!r} needs a prefix length, e.g. 198.18.0.1/24")
    if not isinstance(iface, ipaddress.IPv4Interface) or not iface.network.subnet_of(UNDERLAY):
        raise ValueError(f"underlay address {addr!r} (and its subnet) must lie in {UNDERLAY}")
    return str(iface)


def _check_ifname(name: str) -> str:
    if not _IFNAME_RE.match(name):
        raise ValueError(
            f"bad interface name {name!r}: 1-{_IFNAMSIZ} characters of [A-Za-z0-9_-], "
            "starting with a letter or digit"
        )
    return name


def _ifname(base: str, suffix: str) -> str:
    """``base`` cut so that ``base + suffix`` fits IFNAMSIZ."""
    return base[: _IFNAMSIZ - len(suffix)].rstrip("-_") + suffix


_IP = _tool("ip")
_TC = _tool("tc")
_SYSCTL = _tool("sysctl")
_IPV6 = os.path.isdir("/proc/sys/net/ipv6")


# ----------------------------------------------------------------------------------------------
# the module's registry of open testbeds, and its signal handling

_open: list[Testbed] = []
_defer_depth = 0  # > 0 while a namespace is being created or a testbed closed
_pending: list[int] = []  # signals that arrived meanwhile, delivered afterwards
_saved: dict[int, Any] = {}  # signal -> handler we replaced


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold our signal handler's work until the block is done, then deliver held signals."""
    global _defer_depth
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _pending:
            sigs = list(dict.fromkeys(_pending))
            _pending.clear()
            for sig in sigs:
                # Goes to our handler if testbeds are still open, else to the restored one.
                signal.raise_signal(sig)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)
    if _defer_depth > 0:
        return  # a creation or close is running; the signal is delivered when it is done
    with _signals_deferred():
        _close_all()
        _restore_handlers()  # (normally done by the last close; this guards against loops)
    # leaving the block delivered ``signum`` (and any held meanwhile) to the previous handlers


def _close_all() -> None:
    for tb in list(reversed(_open)):
        tb.close()
    _open.clear()


def _forget_in_forked_child() -> None:
    # A fork()ed child (multiprocessing, ...) must never tear down its parent's testbeds.
    global _defer_depth
    _open.clear()
    _pending.clear()
    _defer_depth = 0
    _restore_handlers()


os.register_at_fork(after_in_child=_forget_in_forked_child)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal works only there; atexit still covers a normal exit
    for sig in _HANDLED_SIGNALS:
        if sig in _saved:
            continue
        try:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN or prev is None:
                continue  # ignored signals do not end us; a C-level handler we cannot restore
            signal.signal(sig, _on_signal)
        except (ValueError, OSError) as exc:
            _log(f"cannot install a handler for {signal.Signals(sig).name}: {exc}")
            continue
        _saved[sig] = prev


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_saved.items()):
        try:
            if signal.getsignal(sig) is _on_signal:  # leave a handler someone set since alone
                signal.signal(sig, prev)
        except (ValueError, OSError) as exc:
            _log(f"cannot restore the handler for {signal.Signals(sig).name}: {exc}")
        del _saved[sig]


def _register(tb: Testbed) -> None:
    _open.append(tb)
    _install_handlers()


def _unregister(tb: Testbed) -> None:
    with contextlib.suppress(ValueError):
        _open.remove(tb)
    if not _open:
        _restore_handlers()


@atexit.register
def _close_at_exit() -> None:
    with _signals_deferred():
        _close_all()


# ----------------------------------------------------------------------------------------------
# public API


def leftover_namespaces(prefix: str) -> list[str]:
    """Names of existing namespaces that start with ``prefix`` (a prefix or a run id)."""
    if not prefix:
        raise ValueError("prefix must not be empty")
    return sorted(n for n in _list_namespaces() if n.startswith(prefix))


def leftover_etc_netns(prefix: str) -> list[str]:
    """Entries of ``/etc/netns`` that start with ``prefix`` (a prefix or a run id)."""
    if not prefix:
        raise ValueError("prefix must not be empty")
    try:
        return sorted(n for n in os.listdir(ETC_NETNS) if n.startswith(prefix))
    except FileNotFoundError:
        return []


#: In ETC_NETNS when a testbed made that directory: the last testbed to leave it empty
#: removes both (any process; one that finds ETC_NETNS without it leaves the folder alone).
_ETC_MARKER = ".autovn-testbed"


def _make_etc_dir(path: str) -> None:
    """``mkdir path`` (0755), making ``ETC_NETNS`` (and its marker) first if needed; retried,
    since another process may remove an empty ``ETC_NETNS`` between the two steps."""
    for attempt in range(3):
        try:
            os.mkdir(ETC_NETNS, 0o755)
            with open(os.path.join(ETC_NETNS, _ETC_MARKER), "w") as f:
                f.write("made by an autovn testbed; goes with the last of its namespaces\n")
        except FileExistsError:
            pass
        try:
            os.mkdir(path, 0o755)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def _remove_etc_dir(path: str) -> None:
    """Remove a namespace's /etc/netns directory (ours: its name is unique to the run),
    then ``ETC_NETNS`` if a testbed made it and nothing else is left in it."""
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        _log(f"cannot remove {path}")
    with contextlib.suppress(OSError):
        if os.listdir(ETC_NETNS) == [_ETC_MARKER]:
            os.unlink(os.path.join(ETC_NETNS, _ETC_MARKER))
            os.rmdir(ETC_NETNS)


_root_reason: str | None = None
_root_checked = False


def require_root() -> str | None:
    """Why namespaces cannot be built here, or None if they can (result cached).

    Checks euid 0, the ``ip``, ``tc`` and ``sysctl`` tools and that a namespace can really be
    added and deleted (a container may lack the capability).
    """
    global _root_reason, _root_checked
    if _root_checked:
        return _root_reason
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespaces need root"
    elif not os.path.isabs(_IP):
        reason = "iproute2 `ip` not found"
    elif not os.path.isabs(_TC):
        reason = "iproute2 `tc` not found"
    elif not os.path.isabs(_SYSCTL):
        reason = "procps `sysctl` not found"
    else:
        name = f"avnprobe{secrets.token_hex(4)}"
        try:
            with _signals_deferred():
                res = _cmd([_IP, "netns", "add", name], check=False)
                if res.returncode != 0:
                    reason = f"cannot add a network namespace: {res.stderr.strip()}"
                if name in _list_namespaces():
                    _cmd([_IP, "netns", "del", name], check=False)
        except (OSError, subprocess.SubprocessError, NetnsError) as exc:
            reason = f"cannot run ip: {exc}"
    _root_reason, _root_checked = reason, True
    return reason


class Namespace:
    """One network namespace of a :class:`Testbed`. Made by :meth:`Testbed.namespace`."""

    def __init__(self, testbed: Testbed, name: str, label: str) -> None:
        self._testbed = testbed
        self.name = name
        self.label = label

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @property
    def testbed(self) -> Testbed:
        """The testbed that owns this namespace (and every process started in it)."""
        return self._testbed

    def _alive(self) -> None:
        if self._testbed.closed:
            raise NetnsError(f"namespace {self.name} belongs to a closed testbed")

    @property
    def etc_dir(self) -> str:
        """``/etc/netns/<name>``: the files ``ip netns exec`` binds over ``/etc`` here."""
        return os.path.join(ETC_NETNS, self.name)

    def etc_file(self, filename: str, text: str = "") -> str:
        """Give this namespace its own ``/etc/<filename>``; returns the file's real path.

        Writes ``text`` to ``/etc/netns/<name>/<filename>`` (mode 0644), which every command
        started later through ``ip netns exec`` (:meth:`run`, :meth:`popen`) sees as
        ``/etc/<filename>``. Called again, it rewrites the file in place, so processes already
        running see the new text too. ``/etc/<filename>`` must exist in the root namespace
        (``NetnsError`` otherwise: a bind mount needs a target); it is never written. The
        directory goes with the namespace when the testbed closes.
        """
        self._alive()
        if not _ETC_NAME_RE.match(filename) or filename.startswith(".."):
            raise ValueError(f"bad /etc file name {filename!r}")
        if "\0" in text:
            raise ValueError("text must not contain NUL")
        if not os.path.isfile(os.path.join("/etc", filename)):
            raise NetnsError(f"/etc/{filename} is not a file here: nothing to bind it over")
        tb = self._testbed
        directory = self.etc_dir
        with _signals_deferred():  # the directory is either not made, or made and recorded
            if self.name not in tb._etc_dirs:
                tb._etc_dirs.append(self.name)
                if not os.path.isdir(directory):
                    _make_etc_dir(directory)
            path = os.path.join(directory, filename)
            # truncated in place, not replaced: bind mounts made already keep seeing it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return path

    def resolv_conf(self, text: str = "") -> str:
        """This namespace's own ``/etc/resolv.conf`` (see :meth:`etc_file`), e.g.
        ``"nameserver 100.64.0.254\\nsearch vpn.test\\n"``; empty by default (a DHCP client
        fills it in). Returns its real path."""
        return self.etc_file("resolv.conf", text)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        capture: bool = True,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this namespace (``ip netns exec NAME argv...``) and wait.

        Text mode. ``capture`` collects stdout/stderr; ``check`` raises :class:`CommandError`
        (a ``CalledProcessError``) on a non-zero exit; on ``timeout`` the command's process
        group is killed and ``subprocess.TimeoutExpired`` raised. ``env`` replaces the
        environment and ``cwd`` sets the working directory, as in ``subprocess`` (``ip netns
        exec`` keeps it).
        """
        self._alive()
        return _cmd(
            [_IP, "netns", "exec", self.name, *argv],
            check=check,
            timeout=timeout,
            capture=capture,
            env=env,
            cwd=cwd,
        )

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME args...`` (convenience for routes, addresses, ...)."""
        self._alive()
        return _cmd([_IP, "-n", self.name, *args], check=check)

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this namespace, in a new session, tracked by the testbed.

        The process is its own process-group leader, so :meth:`Testbed.stop` and
        :meth:`Testbed.close` can signal it and everything it spawned. stdout defaults to
        /dev/null, stderr to ours, stdin to /dev/null. Extra keywords go to ``Popen``.
        """
        self._alive()
        if "start_new_session" in kw or "process_group" in kw:
            raise TypeError("popen() always starts the process in a new session")
        kw.setdefault("stdin", subprocess.DEVNULL)
        args = [_IP, "netns", "exec", self.name, *argv]
        # A signal between fork and tracking must not lose the process: hold it until tracked.
        with _signals_deferred():
            proc: subprocess.Popen[bytes] = subprocess.Popen(
                args,
                stdout=stdout,
                stderr=stderr,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                **kw,
            )
            self._testbed._procs.append(proc)
        return proc

    def sysctl(self, key: str, value: str) -> None:
        """``sysctl -w key=value`` inside this namespace; only per-namespace ``net.*`` keys.

        Keys may use dots or slashes (``net/ipv6/conf/eth0.5/disable_ipv6`` for names with
        dots).
        """
        if not _SYSCTL_KEY_RE.match(key) or ".." in key or "//" in key:
            raise ValueError(f"sysctl key {key!r}: only net.* keys are namespaced")
        if not value or any(c in value for c in "\n\r\0="):
            raise ValueError(f"bad sysctl value {value!r}")
        self.run([_SYSCTL, "-q", "-w", f"{key}={value}"], timeout=_CMD_TIMEOUT)

    def addresses(self, ifname: str) -> list[str]:
        """Addresses of ``ifname`` in CIDR form ("198.18.0.1/24", "fe80::1/64", ...)."""
        self._alive()
        res = _cmd([_IP, "-n", self.name, "-j", "addr", "show", "dev", _check_ifname(ifname)])
        out: list[str] = []
        for link in json.loads(res.stdout or "[]"):
            for info in link.get("addr_info", []):
                if "local" in info and "prefixlen" in info:
                    out.append(f"{info['local']}/{info['prefixlen']}")
        return out

    def links(self) -> list[str]:
        """Names of the interfaces in this namespace."""
        self._alive()
        res = _cmd([_IP, "-n", self.name, "-j", "link", "show"])
        return [str(link["ifname"]) for link in json.loads(res.stdout or "[]")]


class Testbed:
    """Namespaces, links, bridges and processes of one run; see the module docstring."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, prefix: str = "avn", *, ipv6: bool = False) -> None:
        """``prefix``: 1-12 of [a-z0-9], starting with a letter.

        ``ipv6=False`` (the default) disables IPv6 on every link and bridge the testbed makes,
        so the underlay carries no router solicitations, DAD or MLD chatter. Interfaces made
        by the code under test (TAP devices, ...) are not touched.
        """
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"bad prefix {prefix!r}: 1-12 of [a-z0-9], starting with a letter")
        self.prefix = prefix
        self.run_id = prefix + secrets.token_hex(4)
        self.ipv6 = ipv6
        self.closed = False
        self._owner_pid = os.getpid()
        self._namespaces: list[Namespace] = []
        self._labels: set[str] = set()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._ifnames: dict[str, set[str]] = {}  # namespace name -> names taken there
        self._peers: dict[tuple[str, str], tuple[Namespace, str]] = {}
        self._bridges: set[tuple[str, str]] = set()  # (namespace name, bridge name)
        self._etc_dirs: list[str] = []  # namespace names with an /etc/netns directory
        self._counter = 0
        _register(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._namespaces)} namespaces"
        return f"Testbed({self.run_id!r}, {state})"

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def namespaces(self) -> list[Namespace]:
        return list(self._namespaces)

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Tracked processes not yet stopped (some may have exited by themselves)."""
        return list(self._procs)

    # -- building ------------------------------------------------------------------------------

    def _alive(self) -> None:
        if self.closed:
            raise NetnsError(f"testbed {self.run_id} is closed")

    def _own(self, ns: Namespace) -> Namespace:
        if ns._testbed is not self:
            raise ValueError(f"{ns!r} does not belong to testbed {self.run_id}")
        ns._alive()
        return ns

    def _take_ifname(self, ns: Namespace, name: str) -> str:
        taken = self._ifnames.setdefault(ns.name, {"lo"})
        if name in taken:
            raise ValueError(f"interface name {name!r} already used in {ns.name}")
        taken.add(name)
        return name

    def _next(self) -> int:
        self._counter += 1
        return self._counter

    def namespace(self, label: str) -> Namespace:
        """Add namespace ``<run_id>-<label>`` and bring its loopback up."""
        self._alive()
        if not _LABEL_RE.match(label):
            raise ValueError(f"bad label {label!r}: 1-32 of [A-Za-z0-9_-]")
        if label in self._labels:
            raise ValueError(f"label {label!r} already used in testbed {self.run_id}")
        name = f"{self.run_id}-{label}"
        with _signals_deferred():  # the namespace is either not made, or made and recorded
            if name in _list_namespaces():
                raise NetnsError(f"namespace {name} exists already (not ours)")
            ns = Namespace(self, name, label)
            try:
                _cmd([_IP, "netns", "add", name])
            except BaseException:
                # A timeout may still have made it; the name is unique to us, so it is ours.
                with contextlib.suppress(Exception):
                    if name in _list_namespaces():
                        self._namespaces.append(ns)
                        self._labels.add(label)
                raise
            self._namespaces.append(ns)
            self._labels.add(label)
        _cmd([_IP, "-n", name, "link", "set", "dev", "lo", "up"])
        return ns

    def _disable_ipv6(self, ns: Namespace, ifname: str) -> None:
        if not self.ipv6 and _IPV6:
            ns.sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")

    def _configure(self, ns: Namespace, ifname: str, addr: str | None) -> None:
        self._disable_ipv6(ns, ifname)
        if addr is not None:
            _cmd([_IP, "-n", ns.name, "addr", "add", addr, "dev", ifname])
        _cmd([_IP, "-n", ns.name, "link", "set", "dev", ifname, "up"])

    def _veth(self, a: Namespace, name_a: str, b: Namespace, name_b: str, mtu: int) -> None:
        # Issued from inside `a` (ip -n), the first end is born in `a` and the peer directly in
        # `b`: nothing passes through the root namespace.
        _cmd(
            [_IP, "-n", a.name, "link", "add", name_a, "mtu", str(mtu), "type", "veth",
             "peer", "name", name_b, "mtu", str(mtu), "netns", b.name]
        )  # fmt: skip
        self._peers[(a.name, name_a)] = (b, name_b)
        self._peers[(b.name, name_b)] = (a, name_a)

    def link(
        self,
        a: Namespace,
        b: Namespace,
        addr_a: str | None,
        addr_b: str | None,
        *,
        mtu: int = 1500,
        ifnames: tuple[str, str] | None = None,
    ) -> tuple[str, str]:
        """A veth pair between ``a`` and ``b``, addressed (198.18.0.0/15 only) and up.

        Returns the interface names in ``a`` and in ``b``. They default to the peer's label
        plus a counter ("b-1" in a, "a-1" in b); ``ifnames`` chooses them (e.g. ("eth0",
        "eth0")).
        """
        self._alive()
        self._own(a)
        self._own(b)
        addr_a, addr_b = _underlay(addr_a), _underlay(addr_b)
        if not 68 <= mtu <= 65535:
            raise ValueError(f"bad mtu {mtu}")
        k = self._next()
        if ifnames is None:
            sa, sb = (f"-{k}a", f"-{k}b") if a is b else (f"-{k}", f"-{k}")
            name_a, name_b = _ifname(b.label, sa), _ifname(a.label, sb)
        else:
            name_a, name_b = (_check_ifname(n) for n in ifnames)
        if a is b and name_a == name_b:
            raise ValueError("both ends of a link inside one namespace need different names")
        self._take_ifname(a, name_a)
        self._take_ifname(b, name_b)
        self._veth(a, name_a, b, name_b, mtu)
        self._configure(a, name_a, addr_a)
        self._configure(b, name_b, addr_b)
        return name_a, name_b

    def bridge(self, ns: Namespace, name: str) -> str:
        """A Linux bridge ``name`` inside ``ns`` (no STP, no multicast snooping), up."""
        self._alive()
        self._own(ns)
        self._take_ifname(ns, _check_ifname(name))
        _cmd(
            [_IP, "-n", ns.name, "link", "add", name, "type", "bridge",
             "stp_state", "0", "mcast_snooping", "0"]
        )  # fmt: skip
        self._bridges.add((ns.name, name))
        self._disable_ipv6(ns, name)
        _cmd([_IP, "-n", ns.name, "link", "set", "dev", name, "up"])
        return name

    def attach(
        self,
        a: Namespace,
        bridge_ns: Namespace,
        bridge: str,
        addr_a: str | None,
        *,
        mtu: int = 1500,
        ifname: str | None = None,
    ) -> str:
        """A veth from ``a`` into ``bridge_ns``, whose end there is a port of ``bridge``.

        Returns the interface name in ``a`` (default: bridge name plus a counter; ``ifname``
        chooses it). :meth:`peer` gives the bridge port's name.
        """
        self._alive()
        self._own(a)
        self._own(bridge_ns)
        addr_a = _underlay(addr_a)
        _check_ifname(bridge)
        if (bridge_ns.name, bridge) not in self._bridges:
            raise ValueError(f"no bridge {bridge!r} made by this testbed in {bridge_ns.name}")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"bad mtu {mtu}")
        k = self._next()
        if a is bridge_ns:
            name_a, port = _ifname(bridge, f"-{k}a"), _ifname(a.label, f"-{k}b")
        else:
            name_a, port = _ifname(bridge, f"-{k}"), _ifname(a.label, f"-{k}")
        if ifname is not None:
            name_a = _check_ifname(ifname)
            if a is bridge_ns and name_a == port:
                port = _ifname(a.label, f"-{k}p")
        self._take_ifname(a, name_a)
        self._take_ifname(bridge_ns, port)
        self._veth(a, name_a, bridge_ns, port, mtu)
        self._disable_ipv6(bridge_ns, port)
        _cmd([_IP, "-n", bridge_ns.name, "link", "set", "dev", port, "master", bridge, "up"])
        self._configure(a, name_a, addr_a)
        return name_a

    def peer(self, ns: Namespace, ifname: str) -> tuple[Namespace, str]:
        """The other end of a veth this testbed made: its namespace and interface name."""
        try:
            return self._peers[(ns.name, ifname)]
        except KeyError:
            raise ValueError(f"{ifname!r} in {ns.name} is not a veth of this testbed") from None

    # -- traffic control -----------------------------------------------------------------------

    def _tc(self, ns: Namespace, args: Sequence[str], kind: str) -> None:
        self._alive()
        self._own(ns)
        try:
            _cmd([_TC, "-n", ns.name, *args])
        except CommandError as exc:
            err = str(exc.stderr or "")
            if "qdisc kind is unknown" in err or "Unknown qdisc" in err:
                raise QdiscUnavailable(
                    f"the kernel has no {kind} qdisc (module sch_{kind} missing)"
                ) from exc
            raise

    def netem(self, ns: Namespace, ifname: str, spec: str | Sequence[str]) -> None:
        """``tc qdisc replace dev IF root netem SPEC`` in ``ns`` (e.g. "delay 20ms loss 1%").

        Affects traffic leaving ``ifname``. Raises :class:`QdiscUnavailable` if the kernel has
        no netem.
        """
        words = shlex.split(spec) if isinstance(spec, str) else list(spec)
        args = ["qdisc", "replace", "dev", _check_ifname(ifname), "root", "netem", *words]
        self._tc(ns, args, "netem")

    def rate_limit(
        self,
        ns: Namespace,
        ifname: str,
        mbit: float,
        *,
        burst_bytes: int | None = None,
        latency_ms: float = 50,
    ) -> None:
        """Limit traffic leaving ``ifname`` to ``mbit`` Mbit/s (token bucket filter, tbf).

        The bucket holds about 10 ms of traffic (at least 16 KiB) unless ``burst_bytes`` says
        otherwise; packets wait at most ``latency_ms`` before being dropped.
        """
        if not mbit > 0:
            raise ValueError(f"bad rate {mbit} Mbit/s")
        kbit = max(int(mbit * 1000), 1)
        burst = burst_bytes if burst_bytes is not None else max(kbit * 1000 // 8 // 100, 16384)
        args = [
            "qdisc", "replace", "dev", _check_ifname(ifname), "root", "tbf",
            "rate", f"{kbit}kbit", "burst", str(burst), "latency", f"{latency_ms:g}ms",
        ]  # fmt: skip
        self._tc(ns, args, "tbf")

    def clear_qdisc(self, ns: Namespace, ifname: str) -> None:
        """Remove a root qdisc set by :meth:`netem` or :meth:`rate_limit` (no-op if none)."""
        self._alive()
        self._own(ns)
        _cmd([_TC, "-n", ns.name, "qdisc", "del", "dev", _check_ifname(ifname), "root"],
             check=False)  # fmt: skip

    # -- processes -----------------------------------------------------------------------------

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5) -> int:
        """SIGTERM ``proc``'s process group, wait up to ``timeout``, then SIGKILL; reap.

        Only for processes started by this testbed's :meth:`Namespace.popen`. Returns the exit
        code (negative: killed by that signal).
        """
        if not any(p is proc for p in self._procs):
            raise ValueError(f"process {proc.pid} was not started by testbed {self.run_id}")
        _terminate([proc], timeout)
        self._procs = [p for p in self._procs if p is not proc]
        rc = proc.returncode
        return rc if rc is not None else -signal.SIGKILL

    # -- teardown ------------------------------------------------------------------------------

    def _sweep(self, ns: Namespace) -> None:
        """End processes still inside ``ns`` (untracked, orphaned children of ours).

        The namespace is unique to this run, so whatever runs in it was started by us. Each
        is signalled through a pidfd after checking that it is still in this namespace, so a
        reused pid can never be hit.
        """
        path = f"/run/netns/{ns.name}"
        try:
            ns_ino = os.stat(path).st_ino
        except OSError:
            return
        res = _cmd([_IP, "netns", "pids", ns.name], check=False)
        if res.returncode != 0:
            return
        me = os.getpid()
        fds: dict[int, int] = {}
        for word in res.stdout.split():
            if not word.isdigit() or int(word) == me:
                continue
            pid = int(word)
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino != ns_ino:
                    raise ProcessLookupError
            except OSError:
                os.close(fd)
                continue
            fds[pid] = fd
        if not fds:
            return
        _log(f"{ns.name}: ending {len(fds)} untracked process(es): {sorted(fds)}")
        try:
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 3.0)):
                for pid, fd in list(fds.items()):
                    try:
                        signal.pidfd_send_signal(fd, sig)
                    except ProcessLookupError:
                        os.close(fds.pop(pid))
                deadline = time.monotonic() + wait
                while fds and time.monotonic() < deadline:
                    poller = select.poll()
                    for fd in fds.values():
                        poller.register(fd, select.POLLIN)
                    ready = {fd for fd, _ in poller.poll(50)}
                    for pid, fd in list(fds.items()):
                        if fd in ready:
                            os.close(fds.pop(pid))
                if not fds:
                    return
            _log(f"{ns.name}: processes {sorted(fds)} survived SIGKILL")
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self) -> None:
        """Stop tracked processes, end stragglers, delete the namespaces, check they are gone.

        Idempotent; never raises on failure (problems go to stderr). Signals that arrive
        meanwhile are delivered when it is done.
        """
        if self.closed and not self._procs and not self._namespaces and not self._etc_dirs:
            return
        if os.getpid() != self._owner_pid:  # a forked child: the parent owns all of it
            self.closed = True
            _unregister(self)
            return
        with _signals_deferred():
            self.closed = True
            try:
                self._teardown()
            except Exception as exc:  # never raise; say what happened
                _log(f"testbed {self.run_id}: cleanup failed: {exc!r}")
            finally:
                _unregister(self)

    def _teardown(self) -> None:
        procs, self._procs = self._procs, []
        try:
            _terminate(procs, 5.0)
        except Exception as exc:
            _log(f"testbed {self.run_id}: stopping processes failed: {exc!r}")
        for ns in reversed(self._namespaces):
            try:
                self._sweep(ns)
            except Exception as exc:
                _log(f"{ns.name}: ending leftover processes failed: {exc!r}")
        remaining = list(self._namespaces)
        for attempt in range(4):
            try:
                present = set(_list_namespaces())
            except Exception as exc:
                _log(f"testbed {self.run_id}: {exc}")
                present = {ns.name for ns in remaining}
            remaining = [ns for ns in remaining if ns.name in present]
            if not remaining or attempt == 3:
                break
            if attempt:
                time.sleep(0.2 * attempt)
            for ns in reversed(remaining):
                try:
                    res = _cmd([_IP, "netns", "del", ns.name], check=False)
                    if res.returncode != 0:
                        _log(f"ip netns del {ns.name}: {res.stderr.strip()}")
                except Exception as exc:
                    _log(f"ip netns del {ns.name}: {exc!r}")
        if remaining:
            _log(f"testbed {self.run_id}: namespaces left behind: {[n.name for n in remaining]}")
        self._namespaces = remaining
        etc_dirs, self._etc_dirs = self._etc_dirs, []
        for name in etc_dirs:
            try:
                _remove_etc_dir(os.path.join(ETC_NETNS, name))
            except Exception as exc:
                _log(f"removing {ETC_NETNS}/{name} failed: {exc!r}")
        self._peers.clear()
        self._ifnames.clear()
        self._bridges.clear()
