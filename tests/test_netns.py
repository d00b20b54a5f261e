"""The namespace testbed (supervisor/testbed/netns.py): links, bridges, cleanup, signals, tc.

Needs root and iproute2: skipped without them, but a failure under CI (which runs as root).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from supervisor.testbed.netns import (
    CommandError,
    Namespace,
    NetnsError,
    QdiscUnavailable,
    Testbed,
    leftover_etc_netns,
    leftover_namespaces,
)
from tests.conftest import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

REPO = Path(__file__).resolve().parent.parent
PING = ["ping", "-n", "-q", "-c", "2", "-W", "1", "-i", "0.2"]


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _ping(ns: Namespace, addr: str) -> None:
    ns.run([*PING, addr], timeout=10)


# --- building ---------------------------------------------------------------------------------


def test_linked_pair_pings(testbed: Testbed) -> None:
    a, b = testbed.namespace("a"), testbed.namespace("b")
    assert a.name == f"{testbed.run_id}-a"
    if_a, if_b = testbed.link(a, b, "198.18.0.1/24", "198.18.0.2/24")
    assert "198.18.0.1/24" in a.addresses(if_a)
    assert "198.18.0.2/24" in b.addresses(if_b)
    assert testbed.peer(a, if_a) == (b, if_b)
    _ping(a, "198.18.0.2")
    _ping(b, "198.18.0.1")


def test_link_options_and_names(testbed: Testbed) -> None:
    a = testbed.namespace("a-very-long-label-for-a-host")
    b = testbed.namespace("b")
    if_a, if_b = testbed.link(a, b, "198.18.4.1/30", "198.18.4.2/30", mtu=1400)
    assert len(if_a) <= 15 and len(if_b) <= 15
    info = a.run(["ip", "-o", "link", "show", "dev", if_a]).stdout
    assert "mtu 1400" in info
    # IPv6 is off on the testbed's links by default: no link-local address
    assert all(":" not in addr for addr in a.addresses(if_a))
    e_a, e_b = testbed.link(a, b, None, None, ifnames=("eth0", "eth0"))
    assert (e_a, e_b) == ("eth0", "eth0")
    assert a.addresses("eth0") == []
    assert {"lo", if_a, "eth0"} == set(a.links())
    # nothing of ours in the root namespace
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert if_a not in root_links and if_b not in root_links


def test_underlay_rule_enforced(testbed: Testbed) -> None:
    a, b = testbed.namespace("a"), testbed.namespace("b")
    for bad in ("10.0.0.1/24", "192.168.1.1/24", "198.18.0.1/8", "198.18.0.1", "fd00::1/64"):
        with pytest.raises(ValueError):
            testbed.link(a, b, bad, None)
    with pytest.raises(ValueError):
        a.sysctl("kernel.hostname", "x")  # global, not namespaced


def test_bridge_three_hosts_ping(testbed: Testbed) -> None:
    sw = testbed.namespace("sw")
    br = testbed.bridge(sw, "br0")
    hosts = [testbed.namespace(label) for label in ("h1", "h2", "h3")]
    addrs = [f"198.18.1.{i}" for i in (1, 2, 3)]
    ifs = [testbed.attach(h, sw, br, f"{addr}/24") for h, addr in zip(hosts, addrs, strict=True)]
    for h, ifname in zip(hosts, ifs, strict=True):
        peer_ns, port = testbed.peer(h, ifname)
        assert peer_ns is sw
        assert f"master {br}" in sw.run(["ip", "-o", "link", "show", "dev", port]).stdout
    for i, h in enumerate(hosts):
        for j, addr in enumerate(addrs):
            if i != j:
                _ping(h, addr)


def test_run_check_and_timeout(testbed: Testbed) -> None:
    a = testbed.namespace("a")
    with pytest.raises(CommandError, match="nope"):
        a.run(["sh", "-c", "echo nope >&2; exit 3"])
    assert a.run(["sh", "-c", "exit 3"], check=False).returncode == 3
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        a.run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - t0 < 10
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "AVN_X": "42"}
    assert a.run(["sh", "-c", "echo $AVN_X"], env=env).stdout.strip() == "42"


# --- processes and cleanup --------------------------------------------------------------------


def test_stop_returns_exit_code(testbed: Testbed) -> None:
    a = testbed.namespace("a")
    proc = a.popen(["sleep", "1000"])
    assert testbed.stop(proc, timeout=5) == -signal.SIGTERM
    assert not _alive(proc.pid)
    # a process that ignores SIGTERM is killed after the timeout
    stubborn = a.popen(["sh", "-c", "trap '' TERM; sleep 1000 & wait"])
    time.sleep(0.2)
    t0 = time.monotonic()
    assert testbed.stop(stubborn, timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert testbed.processes == []


def test_close_removes_everything() -> None:
    require_netns()
    prev = signal.getsignal(signal.SIGTERM)
    tb = Testbed(prefix="avnt")
    try:
        a, b = tb.namespace("a"), tb.namespace("b")
        tb.link(a, b, "198.18.2.1/24", "198.18.2.2/24")
        proc = a.popen(["sleep", "1000"])
        # an untracked grandchild, orphaned inside the namespace
        stray = int(a.run(["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]).stdout)
        assert _alive(proc.pid) and _alive(stray)
        assert leftover_namespaces(tb.run_id) == sorted([a.name, b.name])
        if prev not in (signal.SIG_IGN, None):
            assert signal.getsignal(signal.SIGTERM) is not prev
    finally:
        tb.close()
    assert proc.returncode is not None
    assert not _alive(proc.pid)
    assert _wait_gone(stray)
    assert leftover_namespaces(tb.run_id) == []
    assert signal.getsignal(signal.SIGTERM) is prev
    tb.close()  # idempotent
    with pytest.raises(NetnsError):
        tb.namespace("c")
    with pytest.raises(NetnsError):
        a.run(["true"])


def test_close_on_exception_in_with_block() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="boom"), Testbed(prefix="avnt") as tb:
        tb.namespace("a")
        raise RuntimeError("boom")
    assert leftover_namespaces(tb.run_id) == []


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from supervisor.testbed import Testbed
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as an interactive python
    tb = Testbed(prefix="avnt")
    a, b = tb.namespace("a"), tb.namespace("b")
    tb.link(a, b, "198.18.3.1/24", "198.18.3.2/24")
    a.resolv_conf("nameserver 100.64.0.254\\n")
    p = a.popen(["sleep", "1000"])
    print(tb.run_id, p.pid, flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # no close(): atexit must clean up
    if sys.argv[1] == "fork":  # a forked child that exits normally must not clean up
        import os
        from supervisor.testbed import netns
        child = os.fork()
        if child == 0:
            sys.exit(0)  # runs atexit in the forked child
        os.waitpid(child, 0)
        assert netns.leftover_namespaces(tb.run_id) == [a.name, b.name], "fork child cleaned"
        assert netns.leftover_etc_netns(tb.run_id) == [a.name], "fork child cleaned /etc"
        tb.close()
        sys.exit(0)
    if sys.argv[1] == "deferred":  # a signal during creation/close waits until it is done
        import os
        from supervisor.testbed import netns
        with netns._signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
            print("still here", flush=True)
        print("not reached", flush=True)
    time.sleep(60)
    """
)


def _start_child(mode: str) -> tuple[subprocess.Popen[str], str, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert child.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)
    line = child.stdout.readline() if sel.select(timeout=30) else ""
    sel.close()
    if not line:
        child.kill()
        child.wait()
        pytest.fail("child did not build its testbed in time")
    run_id, pid = line.split()
    return child, run_id, int(pid)


@pytest.mark.parametrize(
    ("mode", "sig", "expect_rc"),
    [
        ("sleep", signal.SIGTERM, -signal.SIGTERM),
        ("sleep", signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt, re-raised as SIGINT
        ("exit", None, 0),
        ("fork", None, 0),
        ("deferred", None, -signal.SIGTERM),
    ],
    ids=["sigterm", "sigint", "atexit", "fork", "deferred"],
)
def test_child_process_cleans_up(mode: str, sig: signal.Signals | None, expect_rc: int) -> None:
    require_netns()
    child, run_id, sleep_pid = _start_child(mode)
    try:
        if sig is not None:
            assert len(leftover_namespaces(run_id)) == 2
            assert len(leftover_etc_netns(run_id)) == 1
            assert _alive(sleep_pid)
            child.send_signal(sig)
        rc = child.wait(timeout=30)
        assert child.stdout is not None
        rest = child.stdout.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert rc == expect_rc
    if mode == "deferred":
        assert rest == "still here\n"
    assert leftover_namespaces(run_id) == []
    assert leftover_etc_netns(run_id) == []
    assert _wait_gone(sleep_pid)


# --- a namespace's own /etc files -------------------------------------------------------------


def _fingerprint(path: str) -> tuple[int, int, int, bytes]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size, Path(path).read_bytes()


def test_resolv_conf_is_the_namespace_own(testbed: Testbed) -> None:
    machine = _fingerprint("/etc/resolv.conf")
    a, b = testbed.namespace("a"), testbed.namespace("b")
    text = "nameserver 100.64.0.254\nsearch vpn.test\n"
    path = a.resolv_conf(text)
    assert path == f"/etc/netns/{a.name}/resolv.conf" == os.path.join(a.etc_dir, "resolv.conf")
    assert a.run(["cat", "/etc/resolv.conf"]).stdout == text
    # b has none (yet): it sees the machine's
    assert b.run(["cat", "/etc/resolv.conf"]).stdout.encode() == machine[3]
    # written from inside, in place as dhclient-script does: the namespace's file changes
    a.run(["sh", "-c", "echo 'options ndots:1' >> /etc/resolv.conf"])
    assert Path(path).read_text() == text + "options ndots:1\n"
    # rewritten from outside: a process that is running already sees the new text
    proc = a.popen(
        ["sh", "-c", "cat /etc/resolv.conf; echo --; read x; cat /etc/resolv.conf"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    first = b"".join(iter(proc.stdout.readline, b"--\n"))
    assert first == (text + "options ndots:1\n").encode()
    a.resolv_conf("nameserver 100.64.0.253\n")
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    assert proc.stdout.read() == b"nameserver 100.64.0.253\n"
    proc.stdout.close()
    assert testbed.stop(proc) == 0
    b.resolv_conf()
    assert b.run(["cat", "/etc/resolv.conf"]).stdout == ""
    assert leftover_etc_netns(testbed.run_id) == sorted([a.name, b.name])
    assert _fingerprint("/etc/resolv.conf") == machine
    for bad in ("../passwd", "x/y", "", ".."):
        with pytest.raises(ValueError):
            a.etc_file(bad)
    with pytest.raises(NetnsError):
        a.etc_file("no-such-file-in-etc-avn")  # nothing in /etc to bind it over


def test_etc_files_go_with_the_testbed() -> None:
    require_netns()
    had_etc_netns = os.path.isdir("/etc/netns")
    machine = _fingerprint("/etc/resolv.conf")
    with pytest.raises(RuntimeError, match="boom"), Testbed(prefix="avnt") as tb:
        a = tb.namespace("a")
        a.resolv_conf("nameserver 100.64.0.254\n")
        assert os.path.isdir(a.etc_dir)
        if not had_etc_netns:  # marked as a testbed's, so that the last one out removes it
            assert os.path.isfile("/etc/netns/.autovn-testbed")
        raise RuntimeError("boom")
    assert leftover_etc_netns(tb.run_id) == []
    assert not os.path.exists(a.etc_dir)
    if not had_etc_netns:  # made for the testbed, and removed with it
        assert not os.path.exists("/etc/netns")
    assert _fingerprint("/etc/resolv.conf") == machine
    with pytest.raises(NetnsError):
        a.resolv_conf("nameserver 100.64.0.254\n")  # the testbed is closed


# --- traffic control --------------------------------------------------------------------------


def _rtts(ns: Namespace, addr: str) -> list[float]:
    out = ns.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", addr], timeout=15).stdout
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", out)]


def test_netem_delay_shows_in_rtt(testbed: Testbed) -> None:
    a, b = testbed.namespace("a"), testbed.namespace("b")
    if_a, _ = testbed.link(a, b, "198.18.5.1/24", "198.18.5.2/24")
    try:
        testbed.netem(a, if_a, "delay 20ms")
    except QdiscUnavailable as exc:
        pytest.skip(str(exc))
    rtts = _rtts(a, "198.18.5.2")
    assert len(rtts) == 3 and min(rtts) > 15, rtts
    testbed.clear_qdisc(a, if_a)
    assert min(_rtts(a, "198.18.5.2")) < 15


SERVER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.6.2", 5001)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20)
n, t0 = 0, None
while True:
    d = c.recv(65536)
    if not d:
        break
    t0 = t0 or time.monotonic()
    n += len(d)
print(n, time.monotonic() - t0, flush=True)
"""

CLIENT = """
import socket, time
for _ in range(100):
    try:
        c = socket.create_connection(("198.18.6.2", 5001), timeout=2)
        break
    except OSError:
        time.sleep(0.05)
c.settimeout(20)
c.sendall(b"x" * 1_000_000)
c.close()
"""


def _transfer_seconds(testbed: Testbed, a: Namespace, b: Namespace) -> float:
    server = b.popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE)
    a.run([sys.executable, "-c", CLIENT], timeout=30)
    out, _ = server.communicate(timeout=30)
    testbed.stop(server)
    n, secs = out.split()
    assert int(n) == 1_000_000
    return float(secs)


def test_rate_limit_slows_transfer(testbed: Testbed) -> None:
    a, b = testbed.namespace("a"), testbed.namespace("b")
    if_a, _ = testbed.link(a, b, "198.18.6.1/24", "198.18.6.2/24")
    fast = _transfer_seconds(testbed, a, b)
    testbed.rate_limit(a, if_a, 8)  # 1 MB/s
    assert "tbf" in a.run(["tc", "qdisc", "show", "dev", if_a]).stdout
    slow = _transfer_seconds(testbed, a, b)
    assert slow > 0.6, (fast, slow)  # 1 MB at 8 Mbit/s takes ~1 s
    assert fast < slow / 2, (fast, slow)
