"""The README's main command: ``supervisor demo`` builds two segments of nodes that get their
addresses from a real DHCP client, reaches every node by its DNS names, measures, prints a
table and removes everything — also on Ctrl-C, SIGTERM and SIGHUP."""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.testbed import leftover_etc_netns, leftover_namespaces
from supervisor.testbed.demo import HEADERS, static_name

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

DEMO = [sys.executable, "-m", "supervisor", "demo", "--seconds", "1", "--pings", "3"]
RUN_ID = re.compile(r"\b(avdemo[0-9a-f]{8})-")
TMP_DIR = re.compile(r"in (/\S*/autovn-demo-\S+) \(removed at the end\)")


def _machine() -> tuple[str, bytes, list[str]]:
    """What the demo must leave as it was: host name, resolv.conf, files in /etc."""
    return socket.gethostname(), Path("/etc/resolv.conf").read_bytes(), sorted(os.listdir("/etc"))


def _processes_mentioning(*words: str) -> list[str]:
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmdline = Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(w in cmdline for w in words):
            found.append(f"{path.split('/')[2]}: {cmdline}")
    return found


def _nothing_left(run_id: str, tmp: str) -> None:
    """Nothing of this run is left: its namespaces, /etc/netns entries, temporary directory
    and processes (named by the run, not by any demo: other runs may share the machine)."""
    assert leftover_namespaces(run_id) == []
    assert leftover_etc_netns(run_id) == []
    assert not Path(tmp).exists(), "the demo's keys are left behind"
    deadline = time.monotonic() + 5  # a process ends a moment after its namespace is gone
    while (left := _processes_mentioning(run_id, tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
    assert glob.glob("/etc/resolv.conf.dhclient-new.*") == []


def test_demo_prints_a_table_and_leaves_nothing() -> None:
    before = _machine()
    res = subprocess.run(DEMO, capture_output=True, text=True, timeout=150, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    match = RUN_ID.search(res.stderr)
    assert match, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == " ".join(HEADERS).split()
    rows = [line.split() for line in lines[1:6]]
    assert [r[0] for r in rows] == ["n1", "n2", "n3", "n4", "n5"]
    addresses = [ipaddress.IPv4Address(r[1]) for r in rows]
    assert len(set(addresses)) == 5, "every node has an address of its own"
    for row, address in zip(rows, addresses, strict=True):
        node, _, name, cname, rtt, mbit, path = row
        assert address in ipaddress.IPv4Network("100.64.0.0/24")
        assert address != ipaddress.IPv4Address("100.64.0.254")  # the virtual gateway's
        assert name == f"{node}.vpn.test"
        assert cname == static_name(str(address)) == f"C064000{int(address) & 0xFF:03d}.vpn.test"
        assert float(rtt) > 0
        assert path == "self" if node == "n1" else path in ("direct", "relayed")
        assert (float(mbit) > 0) if node == "n5" else mbit == "-"  # n1 -> n5: other segment
    assert "all 5 nodes reached by name; everything removed" in res.stdout
    # progress as it goes: the segments, every lease, every name
    progress = (
        "198.18.0.0/24 (3 nodes) and 198.18.1.0/24 (2)",
        "all nodes running",
        "n5: 100.64.0.",
        "domain vpn.test",
        "n1 resolves n5.vpn.test",
        "iperf3 from n1 to n5",
    )
    for text in progress:
        assert text in res.stderr, text
    assert all(x.startswith("[demo ") for x in res.stderr.splitlines()), res.stderr
    tmp = TMP_DIR.search(res.stderr)
    assert tmp, res.stderr
    _nothing_left(match.group(1), tmp.group(1))
    assert _machine() == before


@contextlib.contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Children of this process start with SIGINT at its default action.

    Why the Ctrl-C test once failed with ``assert 0 == 130`` in a full run and passed alone:
    a command started in the background of a non-interactive shell (``bash -c 'pytest &
    wait'``, as a CI script or a job runner may) inherits SIGINT *ignored*, pytest and its
    children too; Python then installs no KeyboardInterrupt handler and the test bed none of
    its own (it leaves ignored signals alone), so the demo never saw the SIGINT and finished
    its run. A Python handler here becomes SIG_DFL in the exec'd child."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("sig", "after"),
    [
        # Ctrl-C once everything the demo makes is there: nodes running, DHCP clients started
        (signal.SIGINT, "asks for an address"),
        # `timeout --preserve-status 8 supervisor demo`, a closed terminal: nodes starting
        (signal.SIGTERM, "starting autovn in"),
        (signal.SIGHUP, "starting autovn in"),
    ],
)
def test_a_signal_removes_everything(sig: signal.Signals, after: str) -> None:
    before = _machine()
    with _sigint_not_ignored():
        proc = subprocess.Popen(
            DEMO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    assert proc.stderr is not None
    seen = ""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while after not in seen and time.monotonic() < deadline:
            if sel.select(timeout=1):
                line = proc.stderr.readline()
                if not line:
                    break
                seen += line
        sel.close()
        assert after in seen, seen
        proc.send_signal(sig)
        rest = proc.stderr.read()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert rc == 128 + sig, seen + rest
    said = (seen + rest).splitlines()
    assert [x for x in said if "interrupted" in x] == [
        next(x for x in said if x.endswith(f"interrupted ({sig.name}): everything removed"))
    ]
    assert all(x.startswith("[demo ") for x in said), said  # no internal line
    match = RUN_ID.search(seen)
    assert match, seen
    tmp = TMP_DIR.search(seen)
    assert tmp, seen
    _nothing_left(match.group(1), tmp.group(1))
    assert _machine() == before
