"""The worker template's protocol (``supervisor/template.py``): requests parsed or refused
with a reason, and a real template (a fresh interpreter) driven over its socket by a small
supervisor stand-in in a child process: ready, refusals, a forked worker that is the
stand-in's own child, answers in the order of the requests, the template's exit on EOF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.template import WORKER_CLASSES, parse_request

REPO = Path(__file__).resolve().parent.parent


def _request(**fields: object) -> bytes:
    base: dict[str, object] = {"stage": "classifier", "worker": 1, "runtime_dir": "/run/x"}
    base["rings"] = ["a>b", "b>a"]
    base.update(fields)
    return json.dumps(base).encode()


def test_a_request_names_the_stage_worker_and_rings_by_their_fds() -> None:
    stage, index, runtime, rings = parse_request(_request(), [10, 11, 12, 13])
    assert (stage, index, runtime) == ("classifier", 1, Path("/run/x"))
    assert rings == {"a>b": (10, 11), "b>a": (12, 13)}


@pytest.mark.parametrize(
    ("data", "fds", "reason"),
    [
        (b"{not json", [], "undecodable"),
        (b"[1, 2]", [], "JSON object"),
        (_request(stage="shell"), [1, 2, 3, 4], "unknown stage"),
        (_request(worker=-1), [1, 2, 3, 4], "bad worker index"),
        (_request(worker=True), [1, 2, 3, 4], "bad worker index"),
        (_request(runtime_dir=""), [1, 2, 3, 4], "no runtime_dir"),
        (_request(rings="a>b"), [1, 2], "list of names"),
        (_request(), [1, 2, 3], "need 4 fds, got 3"),
    ],
)
def test_a_bad_request_is_refused_with_the_reason(data: bytes, fds: list[int], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_request(data, fds)


def test_every_stage_has_a_worker_class() -> None:
    from pipeline.topology import START_ORDER

    assert set(WORKER_CLASSES) == {str(s) for s in START_ORDER}


# The stand-in supervisor: a subreaper that starts a template, asks it for things and prints
# what happened as JSON. The worker it asks for finds no settings.json in the runtime dir, so
# it exits 1 right after it said which fds it holds: enough to see whose child it is.
_DRIVER = r"""
import json, os, socket, sys, time
from pathlib import Path
from supervisor.template import TemplateClient, TemplateError, exec_template

runtime = Path(sys.argv[1])
out = {}
client, proc = exec_template()
out["ready"] = client.wait_ready(60)
r1, w1 = os.pipe()
r2, w2 = os.pipe()
# two requests before either answer: the answers come in order
client.ask("no_such_stage", 0, runtime, {})
client.ask("tap_reader", 0, runtime, {"x>y": (r1, w1), "y>x": (r2, w2)})
try:
    client.answer()
except TemplateError as exc:
    out["refused"] = str(exc)
pid = client.answer()
_, status = os.waitpid(pid, 0)  # our child: we are the subreaper
out["worker_exit"] = os.waitstatus_to_exitcode(status)
client.sock.close()  # EOF: the template leaves
out["template_exit"] = proc.wait(timeout=30)
print(json.dumps(out))
"""


def _drive(driver: str, runtime: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", textwrap.dedent(driver), str(runtime)]
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def test_a_real_template_forks_a_worker_that_is_the_supervisors_child(tmp_path: Path) -> None:
    res = _drive(_DRIVER, tmp_path)
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["ready"] is True
    assert "unknown stage 'no_such_stage'" in out["refused"]
    # the worker ran in our child (else waitpid would have failed) and failed on the missing
    # settings, as a spawned worker would: exit 1 with the reason on stderr
    assert out["worker_exit"] == 1
    assert "settings.json" in res.stderr
    assert out["template_exit"] == 0


def test_a_worker_without_a_subreaper_supervisor_leaves_at_once(tmp_path: Path) -> None:
    """A template whose forked worker is not re-parented to the supervisor (the supervisor
    is not a subreaper, or has died) must not run the worker: it exits 0 without reading
    anything (no settings.json error)."""
    driver = _DRIVER.replace(
        "client, proc = exec_template()",
        "import supervisor.template as t\nt.become_subreaper = lambda: None\n"
        "client, proc = exec_template()",
    ).replace("_, status = os.waitpid(pid, 0)", "status = 0; time.sleep(1)")
    res = _drive(driver, tmp_path)
    assert "settings.json" not in res.stderr


_DROP = r"""
import os
from supervisor.template import drop_variables
drop_variables(("NOTIFY_SOCKET", "WATCHDOG_USEC"))
environ = open("/proc/self/environ", "rb").read().split(b"\0")
print(os.environ.get("NOTIFY_SOCKET"), os.environ.get("KEPT"),
      any(v.startswith(b"NOTIFY_SOCKET=") for v in environ), b"KEPT=yes" in environ)
"""


def test_dropped_variables_leave_the_environment_and_the_original_block() -> None:
    """What the template does so that its workers, forked, do not show systemd's variables
    even in /proc/PID/environ (the block a forked process keeps from its ancestor's exec)."""
    env = dict(os.environ, NOTIFY_SOCKET="/run/x", WATCHDOG_USEC="5", KEPT="yes")
    res = subprocess.run(
        [sys.executable, "-c", _DROP], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.stdout.split() == ["None", "yes", "False", "True"], res.stderr


def test_occupying_free_blocks_leaves_only_fresh_pools_with_room() -> None:
    """Before a fork, the free blocks of the allocator's partly used pools are filled (so
    that neither side's new objects land on the pages they share): afterwards a size class
    has at most one pool's worth of free blocks (a pool the filling itself opened)."""
    from supervisor.template import free_blocks, occupy_free_blocks

    before = free_blocks()
    assert before and all(size % 16 == 0 and 16 <= size <= 512 for size in before)
    assert occupy_free_blocks() >= sum(before.values())
    after = free_blocks()
    assert all(free <= 16384 // size for size, free in after.items()), after  # 16 KiB pools
    assert sum(size * n for size, n in after.items()) < sum(size * n for size, n in before.items())
