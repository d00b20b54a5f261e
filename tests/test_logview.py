"""Tests for supervisor.logview: filtering, reading, following and formatting node logs."""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import logview
from supervisor.logview import (
    LogFilter,
    ReadStats,
    add_arguments,
    follow_records,
    format_json,
    format_pretty,
    parse_time,
    read_records,
    run,
)

BASE = datetime(2026, 11, 26, 13, 0, 0, tzinfo=UTC)


def rec(
    minute: int, level: str, stage: str, worker: int, event: str, **extra: Any
) -> dict[str, Any]:
    stamp = (BASE + timedelta(minutes=minute, microseconds=123456)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    return {
        "timestamp": stamp,
        "level": level,
        "event": event,
        "stage": stage,
        "worker": worker,
        "pid": 1000 + worker,
        "node": "alpha",
        **extra,
    }


RECORDS = [
    rec(0, "debug", "tap_reader", 0, "worker_started"),
    rec(1, "info", "control", 0, "peer_up", peer="beta", rtt_ms=0.41),
    rec(2, "warning", "overlay_io", 1, "frame_dropped", peer="gamma", reason="queue full"),
    rec(3, "info", "control", 1, "peer_down", peer="beta"),
    rec(4, "error", "classifier", 0, "queue_overflowed", depth=4096),
    rec(5, "critical", "supervisor", 0, "worker_crashed", exit_code=-11),
    rec(6, "info", "overlay_io", 2, "peer_up", peer="gamma"),
]
ALL = [r["event"] for r in RECORDS]


def line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


@pytest.fixture()
def log(tmp_path: Path) -> Path:
    """Mixed records, interleaved garbage, and a partial (still being written) last line."""
    path = tmp_path / "alpha.log"
    body = "".join(line(r) for r in RECORDS[:3])
    body += "this is not json\n"  # garbage
    body += "[1, 2, 3]\n"  # JSON, but not a record
    body += "\n"  # blank lines are ignored, not counted
    body += "".join(line(r) for r in RECORDS[3:])
    body += line(rec(7, "info", "control", 0, "peer_up"))[:40]  # partial last line
    path.write_text(body)
    return path


def events(path: Path, flt: LogFilter | None = None) -> list[str]:
    return [r["event"] for r in read_records(path, flt or LogFilter())]


# --------------------------------------------------------------------------- reading


def test_read_all_skips_and_counts_garbage_and_partial_line(log: Path) -> None:
    stats = ReadStats()
    got = list(read_records(log, LogFilter(), stats=stats))
    assert got == RECORDS
    assert (stats.records, stats.malformed, stats.partial, stats.skipped) == (7, 2, 1, 3)


def test_read_yields_complete_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_text(line(RECORDS[0]) + json.dumps(RECORDS[1]))
    stats = ReadStats()
    assert list(read_records(path, LogFilter(), stats=stats)) == RECORDS[:2]
    assert stats.skipped == 0


def test_read_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(read_records(tmp_path / "nope.log", LogFilter()))


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (LogFilter(), ALL),
        (LogFilter(stages=frozenset({"control"})), ["peer_up", "peer_down"]),
        (
            LogFilter(stages=frozenset({"overlay_io", "classifier"})),
            ["frame_dropped", "queue_overflowed", "peer_up"],
        ),
        (LogFilter(workers=frozenset({1})), ["frame_dropped", "peer_down"]),
        (LogFilter(workers=frozenset({1, 2})), ["frame_dropped", "peer_down", "peer_up"]),
        (LogFilter(events=frozenset({"peer_up"})), ["peer_up", "peer_up"]),
        (
            LogFilter(events=frozenset({"peer_up", "worker_crashed"})),
            ["peer_up", "worker_crashed", "peer_up"],
        ),
        (LogFilter(peers=frozenset({"beta"})), ["peer_up", "peer_down"]),
        (LogFilter(peers=frozenset({"gamma"})), ["frame_dropped", "peer_up"]),
        (LogFilter(min_level="error"), ["queue_overflowed", "worker_crashed"]),
        (LogFilter(since=BASE + timedelta(minutes=5)), ["worker_crashed", "peer_up"]),
        (LogFilter(until=BASE + timedelta(minutes=1)), ["worker_started"]),
    ],
    ids=lambda v: repr(v) if isinstance(v, LogFilter) else "",
)
def test_each_filter_alone(log: Path, flt: LogFilter, expected: list[str]) -> None:
    assert events(log, flt) == expected


def test_filters_combined(log: Path) -> None:
    flt = LogFilter(
        stages=frozenset({"control", "overlay_io"}),
        min_level="info",
        events=frozenset({"peer_*"}),
        peers=frozenset({"gamma", "beta"}),
        since=BASE + timedelta(minutes=2),
    )
    got = list(read_records(log, flt))
    assert [(r["event"], r["peer"]) for r in got] == [("peer_down", "beta"), ("peer_up", "gamma")]
    narrower = LogFilter(
        stages=flt.stages,
        workers=frozenset({2}),
        min_level=flt.min_level,
        events=flt.events,
        peers=flt.peers,
        since=flt.since,
    )
    assert events(log, narrower) == ["peer_up"]
    assert events(log, LogFilter(stages=frozenset({"control"}), min_level="warning")) == []


@pytest.mark.parametrize(
    ("min_level", "count"),
    [("debug", 7), ("info", 6), ("warning", 3), ("error", 2), ("critical", 1)],
)
def test_level_threshold(log: Path, min_level: str, count: int) -> None:
    got = list(read_records(log, LogFilter(min_level=min_level)))
    assert len(got) == count
    order = list(logview.LEVELS)
    assert all(order.index(r["level"]) >= order.index(min_level) for r in got)


def test_level_aliases_case_and_unknown() -> None:
    warn = LogFilter(min_level="warning")
    assert warn.matches({"level": "WARN"})
    assert warn.matches({"level": "Error"})
    assert not warn.matches({"level": "info"})
    assert not warn.matches({"level": "bogus"})
    assert not warn.matches({})
    assert LogFilter().matches({"level": "bogus"})  # no threshold: everything is shown
    with pytest.raises(ValueError, match="unknown log level"):
        LogFilter(min_level="loud")


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        ({"peer_*"}, ["peer_up", "peer_down", "peer_up"]),
        ({"*_dropped"}, ["frame_dropped"]),
        ({"frame_?ropped", "worker_*"}, ["worker_started", "frame_dropped", "worker_crashed"]),
        ({"peer_[u]p", "queue_overflowed"}, ["peer_up", "queue_overflowed", "peer_up"]),
        ({"peer"}, []),  # exact names are not prefixes
        ({"PEER_*"}, []),  # case-sensitive
    ],
)
def test_event_globs(log: Path, patterns: set[str], expected: list[str]) -> None:
    assert events(log, LogFilter(events=frozenset(patterns))) == expected


def test_filter_requires_field_types() -> None:
    assert not LogFilter(workers=frozenset({1})).matches({"worker": True})
    assert not LogFilter(workers=frozenset({1})).matches({"worker": "1"})
    assert not LogFilter(peers=frozenset({"beta"})).matches({"event": "x"})
    assert not LogFilter(events=frozenset({"*"})).matches({"event": 3})
    assert not LogFilter(since=BASE).matches({"timestamp": "yesterday"})
    assert not LogFilter(until=BASE).matches({})


def test_filter_is_hashable_value_and_accepts_naive_bounds() -> None:
    a = LogFilter(events=frozenset({"peer_*"}))
    assert a == LogFilter(events=frozenset({"peer_*"}))
    assert hash(a) == hash(LogFilter(events=frozenset({"peer_*"})))
    naive = LogFilter(since=datetime(2026, 11, 26, 13, 0))  # naive = UTC
    assert naive.matches({"timestamp": "2026-11-26T13:00:00Z"})  # bounds are inclusive
    assert not naive.matches({"timestamp": "2026-11-26T12:59:59.999999Z"})
    assert naive.matches({"timestamp": "2026-11-26T14:30:00+01:00"})


# --------------------------------------------------------------------------- time


NOW = datetime(2026, 11, 26, 13, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10s", NOW - timedelta(seconds=10)),
        ("5m", NOW - timedelta(minutes=5)),
        ("2h", NOW - timedelta(hours=2)),
        ("1d", NOW - timedelta(days=1)),
        (" 90S ", NOW - timedelta(seconds=90)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2026-11-26T13:00:00", datetime(2026, 11, 26, 13, tzinfo=UTC)),
        ("2026-11-26T13:00:00Z", datetime(2026, 11, 26, 13, tzinfo=UTC)),
        ("2026-11-26T13:00:00z", datetime(2026, 11, 26, 13, tzinfo=UTC)),
        ("2026-11-26T15:00:00.5+02:00", datetime(2026, 11, 26, 13, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-26", datetime(2026, 11, 26, tzinfo=UTC)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    got = parse_time(text, NOW)
    assert got == expected
    assert got.utcoffset() == timedelta(0)


def test_parse_time_naive_now_is_utc() -> None:
    assert parse_time("5m", NOW.replace(tzinfo=None)) == NOW - timedelta(minutes=5)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "yesterday",
        "5",
        "m",
        "-5m",
        "5 minutes",
        "5w",
        "2026-13-01",
        "13:00 tomorrow",
        "99999999999d",
    ],
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"time|ISO 8601"):
        parse_time(text, NOW)


@settings(database=None)
@given(st.integers(min_value=0, max_value=10**5), st.sampled_from("smhd"))
def test_parse_time_relative_property(amount: int, unit: str) -> None:
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_time(f"{amount}{unit}", NOW) == NOW - timedelta(seconds=amount * seconds)


def test_relative_and_absolute_windows(log: Path) -> None:
    now = BASE + timedelta(minutes=6, seconds=30)
    last_3m = LogFilter(since=parse_time("3m", now))
    assert events(log, last_3m) == ["queue_overflowed", "worker_crashed", "peer_up"]
    window = LogFilter(
        since=parse_time("2026-11-26T13:01:00Z", now), until=parse_time("2026-11-26T13:03:00", now)
    )
    assert events(log, window) == ["peer_up", "frame_dropped"]
    offset = LogFilter(since=parse_time("2026-11-26T14:05:00+01:00", now))
    assert events(log, offset) == ["worker_crashed", "peer_up"]
    assert (
        events(
            log,
            LogFilter(
                since=parse_time("1h", BASE - timedelta(hours=2)), until=parse_time("30m", BASE)
            ),
        )
        == []
    )


# --------------------------------------------------------------------------- following


class Follower:
    """Runs follow_records in a thread; every wait is bounded."""

    def __init__(self, path: Path, flt: LogFilter | None = None, **kwargs: Any) -> None:
        self.records: list[dict[str, Any]] = []
        self.stats = ReadStats()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path, flt or LogFilter(), kwargs), daemon=True
        )
        self._thread.start()

    def _run(self, path: Path, flt: LogFilter, kwargs: dict[str, Any]) -> None:
        try:
            for record in follow_records(
                path, flt, poll_s=0.005, stop=self._stop.is_set, stats=self.stats, **kwargs
            ):
                self.records.append(record)
        except BaseException as exc:  # surfaced in wait()/close()
            self.error = exc

    def wait(self, count: int, timeout: float = 3.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline and not self.error:
            time.sleep(0.005)
        assert self.error is None, self.error
        assert len(self.records) >= count, f"timed out: got {self.names()}"
        return self.names()

    def settle(self, seconds: float = 0.05) -> list[str]:
        time.sleep(seconds)
        return self.names()

    def names(self) -> list[str]:
        return [r["event"] for r in self.records]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        assert not self._thread.is_alive(), "follow_records did not honour stop()"
        assert self.error is None, self.error


@pytest.fixture()
def follower() -> Iterator[Callable[..., Follower]]:
    started: list[Follower] = []

    def start(path: Path, flt: LogFilter | None = None, **kwargs: Any) -> Follower:
        started.append(Follower(path, flt, **kwargs))
        return started[-1]

    yield start
    for f in started:
        f.close()


def append(path: Path, text: str) -> None:
    with open(path, "a") as handle:
        handle.write(text)


def test_follow_reads_existing_then_appended_lines_from_writer_thread(
    log: Path, follower: Callable[..., Follower]
) -> None:
    f = follower(log)
    assert f.wait(7) == ALL  # the partial last line is held back, not dropped
    assert f.settle() == ALL

    def writer() -> None:
        with open(log, "a") as handle:
            rest = line(rec(7, "info", "control", 0, "peer_up"))[40:]
            handle.write(rest)  # completes the partial line
            handle.flush()
            for i in range(20):
                text = line(rec(8, "debug", "classifier", 0, f"packet_{i}_classified"))
                handle.write(text[:25])  # every line arrives in two pieces
                handle.flush()
                time.sleep(0.002)
                handle.write(text[25:])
                handle.flush()
            handle.write("garbage\n")
            handle.flush()

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(timeout=5)
    got = f.wait(28)
    assert got == ALL + ["peer_up"] + [f"packet_{i}_classified" for i in range(20)]
    assert f.settle(0.03) == got
    assert (f.stats.records, f.stats.malformed, f.stats.partial) == (28, 3, 0)


def test_follow_applies_filter(log: Path, follower: Callable[..., Follower]) -> None:
    f = follower(log, LogFilter(events=frozenset({"peer_*"}), peers=frozenset({"gamma"})))
    assert f.wait(1) == ["peer_up"]
    append(log, "\n" + line(rec(9, "info", "control", 3, "peer_down", peer="gamma")))
    append(log, line(rec(9, "info", "control", 3, "peer_down", peer="beta")))
    assert f.wait(2) == ["peer_up", "peer_down"]
    assert f.settle() == ["peer_up", "peer_down"]


def test_follow_from_end_skips_existing_but_keeps_partial_line(
    log: Path, follower: Callable[..., Follower]
) -> None:
    f = follower(log, from_end=True)
    assert f.settle() == []
    append(log, line(rec(7, "info", "control", 0, "peer_up"))[40:])
    append(log, line(rec(8, "info", "control", 0, "tunnel_opened")))
    assert f.wait(2) == ["peer_up", "tunnel_opened"]
    assert f.stats.skipped == 0


def test_follow_survives_truncation(tmp_path: Path, follower: Callable[..., Follower]) -> None:
    path = tmp_path / "alpha.log"
    path.write_text("".join(line(r) for r in RECORDS))
    f = follower(path)
    assert f.wait(7) == ALL
    # One write: once "marker" is seen, the partial line after it is pending in the follower.
    append(path, line({"event": "marker"}) + '{"event": "half_writ')
    assert f.wait(8)[-1] == "marker"
    with open(path, "w") as handle:  # truncate (copytruncate-style rotation)
        handle.write(line({"event": "after_truncate"}))
    assert f.wait(9)[-1] == "after_truncate"
    append(path, line({"event": "more"}))
    assert f.wait(10)[7:] == ["marker", "after_truncate", "more"]
    assert f.stats.partial == 1  # the half-written line was abandoned, not glued to new data


def test_follow_survives_replacement(tmp_path: Path, follower: Callable[..., Follower]) -> None:
    path = tmp_path / "alpha.log"
    path.write_text(line({"event": "old_1"}))
    f = follower(path)
    assert f.wait(1) == ["old_1"]
    fresh = tmp_path / "alpha.log.tmp"
    fresh.write_text(line({"event": "new_1"}) + line({"event": "new_2"}))
    # The new file is larger than the old one, so only the inode tells them apart.
    os.replace(fresh, path)
    assert f.wait(3) == ["old_1", "new_1", "new_2"]
    append(path, line({"event": "new_3"}))
    assert f.wait(4) == ["old_1", "new_1", "new_2", "new_3"]


def test_follow_rename_rotation_drains_old_file(
    tmp_path: Path, follower: Callable[..., Follower]
) -> None:
    path = tmp_path / "alpha.log"
    old = open(path, "a")  # a writer that keeps its descriptor across the rotation
    try:
        old.write(line({"event": "before"}))
        old.flush()
        f = follower(path)
        assert f.wait(1) == ["before"]
        os.rename(path, tmp_path / "alpha.log.1")
        old.write(line({"event": "late_write_to_old"}))
        old.flush()
        assert f.wait(2) == ["before", "late_write_to_old"]
        path.write_text(line({"event": "in_new_file"}))
        assert f.wait(3) == ["before", "late_write_to_old", "in_new_file"]
    finally:
        old.close()


def test_follow_waits_for_missing_file(tmp_path: Path, follower: Callable[..., Follower]) -> None:
    path = tmp_path / "later.log"
    f = follower(path, from_end=True)  # from_end does not skip a file that appears later
    assert f.settle() == []
    path.write_text(line({"event": "first"}))
    assert f.wait(1) == ["first"]


def test_follow_stops_promptly(tmp_path: Path) -> None:
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    path = tmp_path / "absent.log"
    assert list(follow_records(path, LogFilter(), poll_s=0.001, stop=stop)) == []
    assert list(follow_records(path, LogFilter(), stop=lambda: True)) == []


# --------------------------------------------------------------------------- formatting

SAMPLE = {
    "timestamp": "2026-11-26T13:45:01.123456Z",
    "level": "info",
    "event": "peer_up",
    "stage": "control",
    "worker": 0,
    "pid": 4242,
    "node": "alpha",
    "rtt_ms": 0.41,
    "peer": "beta",
}


def test_format_pretty_exact() -> None:
    assert (
        format_pretty(SAMPLE, color=False, tz=UTC)
        == "13:45:01.123 info  control[0] peer_up  peer=beta rtt_ms=0.41"
    )
    assert (
        format_pretty(SAMPLE, color=True, tz=UTC)
        == "13:45:01.123 \x1b[32minfo\x1b[0m  control[0] peer_up  peer=beta rtt_ms=0.41"
    )
    ist = timezone(timedelta(hours=5, minutes=30))
    assert format_pretty(SAMPLE, color=False, tz=ist).startswith("19:15:01.123 info  ")


def test_format_pretty_values_and_levels() -> None:
    record = {
        "timestamp": "2026-11-26T13:45:01.999999Z",
        "level": "critical",
        "event": "worker_crashed",
        "stage": "supervisor",
        "worker": 3,
        "reason": "killed by signal",
        "ok": False,
        "missing": None,
        "addrs": ["100.64.0.1", 2],
        "exception": "Traceback\n  boom\x1b[2J",
        "empty": "",
    }
    assert format_pretty(record, color=False, tz=UTC) == (
        "13:45:01.999 critical supervisor[3] worker_crashed  "
        'addrs=["100.64.0.1",2] empty="" exception="Traceback\\n  boom\\u001b[2J" '
        'missing=null ok=false reason="killed by signal"'
    )
    assert format_pretty(record, color=True, tz=UTC).startswith(
        "13:45:01.999 \x1b[1;37;41mcritical\x1b[0m supervisor[3] "
    )
    assert format_pretty({**record, "level": "warning"}, color=True, tz=UTC).startswith(
        "13:45:01.999 \x1b[33mwarning\x1b[0m supervisor[3] "
    )
    assert format_pretty({"event": "bare"}, color=True) == "--:--:--.--- ?     ? bare"


@pytest.fixture()
def india_local_time() -> Iterator[None]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "IST-05:30"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.usefixtures("india_local_time")
def test_format_pretty_defaults_to_local_time() -> None:
    assert format_pretty(SAMPLE, color=False).startswith("19:15:01.123 info  control[0]")


def test_format_json_exact() -> None:
    assert format_json(SAMPLE) == (
        '{"timestamp":"2026-11-26T13:45:01.123456Z","level":"info","event":"peer_up",'
        '"stage":"control","worker":0,"pid":4242,"node":"alpha","rtt_ms":0.41,"peer":"beta"}'
    )
    assert json.loads(format_json({"peer": "bêta\n"})) == {"peer": "bêta\n"}
    assert "\n" not in format_json({"peer": "bêta\n"})


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.dictionaries(st.sampled_from(sorted(SAMPLE)) | st.text(), json_value, max_size=8))
def test_format_pretty_is_always_one_clean_line(record: dict[str, Any]) -> None:
    text = format_pretty(record, color=False, tz=UTC)
    assert text.isprintable()  # no newlines, no escape sequences, whatever the log holds
    assert json.loads(format_json(record)) == record


# --------------------------------------------------------------------------- robustness


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.binary(max_size=60) | st.sampled_from([line(r).encode() for r in RECORDS])))
def test_read_records_never_fails_on_garbage(chunks: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.log"
        path.write_bytes(b"".join(chunks))
        stats = ReadStats()
        got = list(read_records(path, LogFilter(), stats=stats))
        assert all(isinstance(r, dict) for r in got)
        assert stats.records == len(got)


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_line_splitting_independent_of_chunk_boundaries(cuts: list[int]) -> None:
    data = "".join(line(r) for r in RECORDS).encode() + b"junk\n" + line(RECORDS[0]).encode()[:30]
    stats = ReadStats()
    parser = logview._LineParser(stats)
    got: list[dict[str, Any]] = []
    previous = 0
    for cut in sorted({min(c, len(data)) for c in cuts}) + [len(data)]:
        got.extend(parser.feed(data[previous:cut]))
        previous = cut
    assert got == RECORDS
    assert (stats.records, stats.malformed, stats.partial) == (7, 1, 0)
    parser.abandon()
    assert stats.partial == 1


def test_over_long_line_is_dropped_not_buffered(tmp_path: Path) -> None:
    path = tmp_path / "long.log"
    path.write_bytes(b"x" * (logview.MAX_LINE_BYTES + 10) + b"\n" + line(RECORDS[0]).encode())
    stats = ReadStats()
    assert list(read_records(path, LogFilter(), stats=stats)) == RECORDS[:1]
    assert stats.malformed == 1


# --------------------------------------------------------------------------- command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="supervisor logs")
    add_arguments(parser)
    return parser.parse_args(argv)


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_add_arguments_parses_all_options() -> None:
    args = parse(
        [
            "--stage",
            "control",
            "--stage",
            "overlay_io",
            "--worker",
            "1",
            "--worker",
            "2",
            "--level",
            "warning",
            "--event",
            "peer_*",
            "--peer",
            "beta",
            "--since",
            "5m",
            "--until",
            "2026-11-26T13:00:00Z",
            "-f",
            "--json",
        ]
    )
    assert args.stage == ["control", "overlay_io"]
    assert args.worker == [1, 2]
    assert (args.level, args.event, args.peer) == ("warning", ["peer_*"], ["beta"])
    assert (args.since, args.until, args.follow, args.json) == (
        "5m",
        "2026-11-26T13:00:00Z",
        True,
        True,
    )
    defaults = parse([])
    assert (defaults.level, defaults.follow, defaults.json, defaults.stage) == (
        "debug",
        False,
        False,
        None,
    )
    with pytest.raises(SystemExit):
        parse(["--worker", "one"])


def test_run_bad_since_exits_2(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert run(parse(["--since", "last tuesday"]), log, out) == 2
    assert out.getvalue() == ""
    err = capsys.readouterr().err
    assert "--since" in err and "last tuesday" in err and "ISO 8601" in err


def test_run_since_after_until_exits_2(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse(["--since", "1m", "--until", "1h"]), log, io.StringIO()) == 2
    assert "after --until" in capsys.readouterr().err


def test_run_pretty_without_tty(
    log: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logview, "format_pretty", lambda r, *, color: f"{r['event']} {color}")
    out = io.StringIO()
    assert run(parse(["--event", "peer_*", "--worker", "0", "--worker", "1"]), log, out) == 0
    assert out.getvalue() == "peer_up False\npeer_down False\n"
    assert "skipped 3 unparseable line(s)" in capsys.readouterr().err


def test_run_pretty_colour_only_on_tty(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = TtyIO()
    assert run(parse(["--level", "critical"]), log, tty) == 0
    assert (
        "\x1b[1;37;41mcritical\x1b[0m supervisor[0] worker_crashed  exit_code=-11" in tty.getvalue()
    )
    plain = io.StringIO()
    assert run(parse(["--level", "critical"]), log, plain) == 0
    assert "\x1b" not in plain.getvalue() and "critical supervisor[0]" in plain.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    tty = TtyIO()
    assert run(parse(["--level", "critical"]), log, tty) == 0
    assert "\x1b" not in tty.getvalue()


def test_run_json(log: Path) -> None:
    for out in (io.StringIO(), TtyIO()):  # --json wins even on a terminal
        assert run(parse(["--json", "--stage", "control"]), log, out) == 0
        assert [json.loads(x) for x in out.getvalue().splitlines()] == [RECORDS[1], RECORDS[3]]


def test_run_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(parse([]), tmp_path / "nope.log", io.StringIO()) == 1
    assert "cannot read" in capsys.readouterr().err


def test_run_follow_until_ctrl_c(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = 0

    def sleep(_seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 1:  # between polls, a writer appends a line
            append(log, line(rec(7, "info", "control", 0, "peer_up"))[40:])
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(logview, "time", types.SimpleNamespace(sleep=sleep))
    out = io.StringIO()
    assert run(parse(["-f", "--json", "--level", "critical"]), log, out) == 0
    append(log, line(rec(9, "critical", "control", 0, "node_failed")))
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["worker_crashed"]
    out = io.StringIO()
    assert run(parse(["-f", "--json", "--event", "peer_up", "--worker", "0"]), log, out) == 0
    assert [json.loads(x)["timestamp"][11:16] for x in out.getvalue().splitlines()] == [
        "13:01",
        "13:07",
    ]
