"""Workers forked by the template, live: two real nodes in namespaces this test makes. A worker
killed with SIGKILL comes back from the template while a ping goes on; a killed template is
started again and forks the next restart; a killed supervisor takes the template and the
workers with it and its leftover files are removed, with a log line, at the next start. The
plain spawn (``AUTOVN_SPAWN=plain``) still restarts workers the same way."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.testbed import Node, Testbed, two_nodes, wait_for

pytestmark = pytest.mark.netns


def _ppid(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rfind(")") + 2 :].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _spawned(node: Node, target: str, pid: int) -> dict[str, Any]:
    """The ``worker_spawned`` record of ``target``'s worker ``pid``."""
    for r in node.log_records():
        if r["event"] == "worker_spawned" and r["target"] == target and r["target_pid"] == pid:
            return r
    raise AssertionError(f"no worker_spawned for {target} pid {pid}")


class Pinger:
    """A 50 ms ping from ``a`` to ``b`` into a file; counts replies."""

    def __init__(self, a: Node, b: Node, name: str) -> None:
        self.out = a.root / f"ping-{name}.txt"
        with open(self.out, "wb") as f:
            self.proc = a.ns.popen(["ping", "-i", "0.05", "-W", "1", b.address], stdout=f)

    def replies(self) -> int:
        return self.out.read_text().count("bytes from")

    def resumes(self, more: int = 10) -> None:
        before = self.replies()
        wait_for("ping replies", lambda: self.replies() >= before + more, timeout=30)
        assert self.proc.poll() is None, "ping exited"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _kill_and_wait(node: Node, stage: str) -> int:
    """SIGKILL ``stage``'s worker; the new worker's pid once it runs."""
    old = node.worker_pid(stage)
    os.kill(old, signal.SIGKILL)
    wait_for(f"{stage} back", lambda: node.worker_pid(stage) != old, timeout=30)
    return node.worker_pid(stage)


@pytest.fixture
def pinged_pair(tmp_path: Path) -> Iterator[tuple[Node, Node, Pinger]]:
    with Testbed("avtl") as tb:
        a, b = two_nodes(tb, tmp_path)
        pinger = Pinger(a, b, "pair")
        try:
            pinger.resumes(3)
            yield a, b, pinger
        finally:
            pinger.stop()


def test_workers_come_from_the_template_and_back_from_it(
    pinged_pair: tuple[Node, Node, Pinger],
) -> None:
    a, b, pinger = pinged_pair
    st = a.wait_running()
    sup, template = st["supervisor_pid"], st["template_pid"]
    assert st["spawn"] == "template" and template is not None
    assert _ppid(template) == sup
    for w in st["workers"]:  # re-parented to the supervisor, forked by the template
        assert _ppid(w["pid"]) == sup, w
        assert _spawned(a, f"{w['stage']}:0", w["pid"])["method"] == "template"

    pid = _kill_and_wait(a, "overlay_io")
    assert _spawned(a, "overlay_io:0", pid)["method"] == "template"
    assert _ppid(pid) == sup
    pinger.resumes()

    # The template dies: started again (a fresh interpreter), and the next restart is its.
    os.kill(template, signal.SIGKILL)

    def new_template() -> int | None:
        st = a.status()
        t = st and st.get("template_pid")
        return t if t and t != template else None

    wait_for("template started again", new_template, timeout=30)
    wait_for(
        "new template ready",
        lambda: any(
            r["event"] == "template_ready" and r.get("started") == 1 for r in a.log_records()
        ),
        timeout=30,
    )
    events = [r["event"] for r in a.log_records()]
    assert "template_exited" in events and "template_restarted" in events
    pid = _kill_and_wait(a, "classifier")
    assert _spawned(a, "classifier:0", pid)["method"] == "template"
    pinger.resumes()
    assert all(_alive(w["pid"]) for w in a.wait_running()["workers"])

    # kill -9 of the supervisor: the template and the workers go with it; the next start
    # says what it cleaned up.
    st = a.wait_running()
    pids = [st["template_pid"], *(w["pid"] for w in st["workers"])]
    assert a.proc is not None
    os.kill(sup, signal.SIGKILL)
    a.proc.wait(timeout=20)
    wait_for("template and workers gone", lambda: not any(_alive(p) for p in pids), timeout=20)
    assert (a.root / "run" / "supervisor.pid").exists()
    a.start()
    a.wait_running()
    removed = [r for r in a.log_records() if r["event"] == "stale_files_removed"]
    assert removed and "supervisor.pid" in removed[-1]["files"], removed
    assert "supervisor.ipc" in removed[-1]["files"]
    pinger.resumes()


def test_plain_spawn_still_restarts_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOVN_SPAWN", "plain")
    with Testbed("avtp") as tb:
        a, b = two_nodes(tb, tmp_path)
        st = a.wait_running()
        assert st["spawn"] == "plain" and st["template_pid"] is None
        assert not any(_ppid(w["pid"]) != st["supervisor_pid"] for w in st["workers"])
        pinger = Pinger(a, b, "plain")
        try:
            pinger.resumes(3)
            pid = _kill_and_wait(a, "tap_reader")
            assert _spawned(a, "tap_reader:0", pid)["method"] == "spawn"
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"pipeline.tap_reader" in cmdline
            pinger.resumes()
        finally:
            pinger.stop()
