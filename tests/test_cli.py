"""The ``supervisor`` command's rough edges from issue 14, each pinned as a user meets it:
``--version``, defaults in ``--help``, one message per bad ``demo`` argument, ``status
--json`` of a stopped node, ``logs`` errors in the command's own words."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import messages
from pipeline.config import settings_from_mapping
from supervisor.cli import _start_args, build_parser, ping_lines

ROOT = Path(__file__).resolve().parent.parent


def supervisor(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=timeout,
    )


def config(tmp_path: Path) -> Path:
    """A valid config of a node that is not running, with its CA file present."""
    (tmp_path / "ca.crt").write_text("-\n")
    path = tmp_path / "node.toml"
    path.write_text(
        f"""
[node]
name = "alpha"
state_dir = "{tmp_path}/state"
runtime_dir = "{tmp_path}/run"

[network]
namespace = "lab"
subnet = "100.64.0.0/24"
address = "100.64.0.1"

[security]
ca_certificate = "{tmp_path}/ca.crt"
"""
    )
    return path


def test_version() -> None:
    res = supervisor("--version")
    assert res.returncode == 0
    assert re.fullmatch(r"supervisor \(autovn\) \d+\.\d+\.\d+.*\n", res.stdout), res.stdout


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


@pytest.mark.parametrize("file", ["node.toml", "/etc/autovn/router.toml", "a b.toml"])
def test_start_is_parsed_as_the_parser_would(file: str) -> None:
    """``start FILE`` skips building the parser (10 ms of a node's start): same namespace."""
    fast = _start_args(["start", file])
    assert fast is not None
    full = build_parser().parse_args(["start", file])
    assert (fast.command, fast.file, fast.fn) == (full.command, full.file, full.fn)


@pytest.mark.parametrize(
    "argv",
    [["start"], ["start", "--help"], ["start", "-x"], ["start", "a", "b"], ["stop", "a"], []],
)
def test_every_other_command_line_goes_to_the_parser(argv: list[str]) -> None:
    assert _start_args(argv) is None


def test_start_without_a_file_says_so() -> None:
    res = supervisor("start")
    assert res.returncode == 2
    assert "the following arguments are required: file" in res.stderr


def test_help_shows_every_default() -> None:
    """Every option whose default is a value (not None/False) says it in ``--help``."""
    missing = []
    for parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, False, argparse.SUPPRESS):
                continue
            if isinstance(action, argparse._VersionAction | argparse._HelpAction):
                continue
            shown = f"default: {default}" in text or f"default: {default} " in text
            if not shown and not (action.help and "(default" in action.help):
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--nodes", "50"], "argument --nodes: must be between 2 and 20, got 50"),
        (["--nodes", "1"], "argument --nodes: must be between 2 and 20, got 1"),
        (["--pings", "0"], "argument --pings: must be between 1 and 10000, got 0"),
        (["--seconds", "-1"], "argument --seconds: must be between 0 and 3600, got -1"),
        (["--seconds", "x"], "argument --seconds: must be a whole number between 0 and 3600"),
    ],
)
def test_each_bad_demo_argument_has_its_message(argv: list[str], said: str) -> None:
    res = supervisor("demo", *argv)
    assert res.returncode == 2
    assert said in res.stderr, res.stderr


def test_run_demo_names_each_bad_argument() -> None:
    from io import StringIO

    from supervisor.testbed.demo import run_demo

    err = StringIO()
    assert run_demo(nodes=1, pings=0, seconds=3, err=err) == 2
    assert err.getvalue().splitlines() == [
        "demo: --nodes must be between 2 and 20, got 1",
        "demo: --pings must be at least 1, got 0",
    ]


def test_status_json_of_a_stopped_node_is_json(tmp_path: Path) -> None:
    path = config(tmp_path)
    res = supervisor("status", str(path), "--json")
    assert res.returncode == 3
    assert json.loads(res.stdout) == {"node": "alpha", "running": False, "state": "not running"}
    res = supervisor("status", str(path))
    assert res.returncode == 3 and res.stdout == ""
    assert res.stderr == "node alpha is not running\n"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        ([], "error: cannot read "),
        (["--since", "yesterday-ish"], "error: --since: invalid time 'yesterday-ish'"),
    ],
)
def test_logs_errors_are_in_the_command_s_words(tmp_path: Path, argv: list[str], said: str) -> None:
    res = supervisor("logs", str(config(tmp_path)), *argv)
    assert res.returncode in (1, 2)
    assert res.stderr.startswith(said), res.stderr
    assert "logview" not in res.stderr


def test_check_config_on_a_valid_file(tmp_path: Path) -> None:
    res = supervisor("check-config", str(config(tmp_path)))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["node"]["name"] == "alpha"
    assert settings_from_mapping(json.loads(res.stdout)).node.name == "alpha"


def test_ping_lines_show_each_path_and_a_line_when_it_changes() -> None:
    relayed = messages.PingReply("b", 0, True, "", 2.5, "relayed", "ab" * 20, "b " + "cd" * 20)
    direct = messages.PingReply("b", 1, True, "", 1.25, "direct", "198.18.90.12:4789", "b x")
    lines, last = ping_lines("b", relayed, None)
    assert lines == [f"pong from b {'cd' * 20} relayed via node {'ab' * 8} in 2.500 ms"]
    lines, last = ping_lines("b", direct, last)
    assert lines == [
        f"path changed: relayed via node {'ab' * 8} -> direct via 198.18.90.12:4789",
        "pong from b x direct via 198.18.90.12:4789 in 1.250 ms",
    ]
    lines, last = ping_lines("b", direct, last)
    assert lines == ["pong from b x direct via 198.18.90.12:4789 in 1.250 ms"]
    refused = messages.PingReply("b", 3, False, "no_link")
    assert ping_lines("b", refused, last) == (["b: no link"], last)
