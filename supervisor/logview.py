"""Log viewer for a node's structlog JSON log file.

Every worker process of a node appends one JSON object per line to the node's
log file.  This module filters those records (:class:`LogFilter`), reads them
once (:func:`read_records`) or follows the file like ``tail -F``
(:func:`follow_records`), and renders them for humans (:func:`format_pretty`)
or machines (:func:`format_json`).  :func:`add_arguments` and :func:`run` wire
it into an ``argparse`` command line.

Lines that are not a JSON object (garbage, or a line cut short while being
written) are skipped without a message and counted in a :class:`ReadStats`
passed by the caller.

Time conventions: record timestamps and ``--since``/``--until`` values that
carry no UTC offset are taken as UTC (the log writers always log UTC).  Both
window bounds are inclusive.  Pretty output shows the local time of day.

Stdlib only.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import IO, Any, TextIO

from pipeline.topology import Stage

__all__ = [
    "LEVELS",
    "STAGES",
    "LogFilter",
    "ReadStats",
    "add_arguments",
    "follow_records",
    "format_json",
    "format_pretty",
    "parse_time",
    "read_records",
    "run",
]

#: Log levels from least to most severe.
LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")
#: Pipeline stages that write to the log.
STAGES: tuple[str, ...] = (*(stage.value for stage in Stage), "supervisor")

_LEVEL_RANK: dict[str, int] = {name: rank for rank, name in enumerate(LEVELS)}
# Spellings other logging stacks use for the same severities.
_LEVEL_RANK.update({"warn": 2, "exception": 3, "fatal": 4, "notset": 0, "trace": 0})

# Fields shown in the fixed columns of the pretty format (or deliberately hidden).
_FIXED_FIELDS = frozenset({"timestamp", "level", "event", "stage", "worker", "pid", "node"})

_RESET = "\x1b[0m"
_LEVEL_COLOR: dict[str, str] = {
    "debug": "\x1b[90m",  # grey
    "info": "\x1b[32m",  # green
    "warning": "\x1b[33m",  # yellow
    "error": "\x1b[31m",  # red
    "critical": "\x1b[1;37;41m",  # bold white on red
}

_CHUNK = 64 * 1024
#: A line longer than this without a newline is garbage; it is dropped rather than buffered.
MAX_LINE_BYTES = 1024 * 1024

_RELATIVE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_BARE_RE = re.compile(r'[^\s="\\]+')


def _level_rank(level: object) -> int | None:
    if not isinstance(level, str):
        return None
    return _LEVEL_RANK.get(level.lower())


def _as_utc(moment: datetime) -> datetime:
    """Aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _record_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _as_utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        return None


@dataclass(frozen=True, slots=True)
class LogFilter:
    """Which records to show.  Every criterion left empty/None matches everything.

    ``events`` holds exact event names and/or ``fnmatch`` glob patterns
    (``"peer_*"``); matching is case-sensitive.  ``min_level`` is a threshold:
    records at that level or more severe pass.  ``since``/``until`` are
    inclusive; naive datetimes are taken as UTC.  A record lacking a field
    that a criterion tests (or with an unparseable timestamp when a time
    window is set) does not match.
    """

    stages: frozenset[str] = frozenset()
    workers: frozenset[int] = frozenset()
    min_level: str = "debug"
    events: frozenset[str] = frozenset()
    peers: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    # Derived in __post_init__; not part of the value.
    _min_rank: int = field(init=False, repr=False, compare=False, default=0)
    _event_glob: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _since_utc: datetime | None = field(init=False, repr=False, compare=False, default=None)
    _until_utc: datetime | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        rank = _level_rank(self.min_level)
        if rank is None:
            raise ValueError(
                f"unknown log level {self.min_level!r}: expected one of {', '.join(LEVELS)}"
            )
        setattr_ = object.__setattr__
        # Accept any iterable of values; keep the dataclass hashable.
        for name in ("stages", "workers", "events", "peers"):
            setattr_(self, name, frozenset(getattr(self, name)))
        setattr_(self, "_min_rank", rank)
        globs = [p for p in self.events if any(c in p for c in "*?[")]
        if globs:
            pattern = "|".join(f"(?:{fnmatch.translate(g)})" for g in sorted(globs))
            setattr_(self, "_event_glob", re.compile(pattern))
        setattr_(self, "_since_utc", None if self.since is None else _as_utc(self.since))
        setattr_(self, "_until_utc", None if self.until is None else _as_utc(self.until))

    def matches(self, record: Mapping[str, Any]) -> bool:
        if self._min_rank > 0:
            rank = _level_rank(record.get("level"))
            if rank is None or rank < self._min_rank:
                return False
        if self.stages and record.get("stage") not in self.stages:
            return False
        if self.workers:
            worker = record.get("worker")
            if not isinstance(worker, int) or isinstance(worker, bool):
                return False
            if worker not in self.workers:
                return False
        if self.events:
            event = record.get("event")
            if not isinstance(event, str):
                return False
            if event not in self.events and (
                self._event_glob is None or self._event_glob.match(event) is None
            ):
                return False
        if self.peers:
            peer = record.get("peer")
            if not isinstance(peer, str) or peer not in self.peers:
                return False
        if self._since_utc is not None or self._until_utc is not None:
            moment = _record_time(record.get("timestamp"))
            if moment is None:
                return False
            if self._since_utc is not None and moment < self._since_utc:
                return False
            if self._until_utc is not None and moment > self._until_utc:
                return False
        return True


def parse_time(text: str, now: datetime) -> datetime:
    """Parse an absolute or relative point in time; returns an aware UTC datetime.

    Absolute: ISO 8601 such as ``2026-11-26T13:00:00``, ``...T13:00:00Z``,
    ``...T13:00:00.5+02:00`` or ``2026-11-26``; without an offset it is UTC.
    Relative: ``<number><unit>`` with unit ``s``/``m``/``h``/``d`` means that
    long before ``now`` (``"10s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"1.5h"``).
    A naive ``now`` is taken as UTC.  Raises ``ValueError`` otherwise.
    """
    stripped = text.strip()
    hint = (
        "expected ISO 8601 (e.g. 2026-11-26T13:00:00Z) "
        "or a duration before now such as 10s, 5m, 2h, 1d"
    )
    if not stripped:
        raise ValueError(f"empty time: {hint}")
    relative = _RELATIVE_RE.fullmatch(stripped)
    if relative is not None:
        amount, unit = relative.groups()
        try:
            return _as_utc(now) - timedelta(seconds=float(amount) * _UNIT_SECONDS[unit.lower()])
        except OverflowError:
            raise ValueError(f"time {text!r} is too far in the past") from None
    iso = stripped[:-1] + "Z" if stripped.endswith("z") else stripped
    try:
        return _as_utc(datetime.fromisoformat(iso))
    except (ValueError, OverflowError):
        raise ValueError(f"invalid time {text!r}: {hint}") from None


@dataclass(slots=True)
class ReadStats:
    """Counters filled in by :func:`read_records` / :func:`follow_records`."""

    records: int = 0  # lines parsed into a record (before filtering)
    malformed: int = 0  # complete lines that were not a JSON object
    partial: int = 0  # unterminated lines abandoned (end of file, truncation, rotation)

    @property
    def skipped(self) -> int:
        return self.malformed + self.partial


class _LineParser:
    """Splits a byte stream into lines and parses each into a record."""

    __slots__ = ("_pending", "_discarding", "_stats")

    def __init__(self, stats: ReadStats) -> None:
        self._pending = bytearray()
        self._discarding = False  # dropping an over-long line up to its newline
        self._stats = stats

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            if self._discarding:
                self._discarding = False
            elif self._pending:
                self._pending += data[start:newline]
                line = bytes(self._pending)
                self._pending.clear()
                yield from self._parse(line)
            else:
                yield from self._parse(data[start:newline])
            start = newline + 1
        if not self._discarding:
            self._pending += data[start:]
            if len(self._pending) > MAX_LINE_BYTES:
                self._pending.clear()
                self._discarding = True
                self._stats.malformed += 1

    def finish(self) -> Iterator[dict[str, Any]]:
        """End of input: an unterminated last line counts if it is a whole record."""
        line = bytes(self._pending)
        self._pending.clear()
        self._discarding = False
        if not line.strip():
            return
        record = _parse_line(line)
        if record is None:
            self._stats.partial += 1
        else:
            self._stats.records += 1
            yield record

    def skip_to_newline(self) -> None:
        """Ignore input up to the next newline (we start in the middle of a line)."""
        self._pending.clear()
        self._discarding = True

    def abandon(self) -> None:
        """The stream restarts elsewhere: drop the unterminated line, if any."""
        if self._pending.strip():
            self._stats.partial += 1
        self._pending.clear()
        self._discarding = False

    def _parse(self, line: bytes) -> Iterator[dict[str, Any]]:
        if not line.strip():
            return
        record = _parse_line(line)
        if record is None:
            self._stats.malformed += 1
        else:
            self._stats.records += 1
            yield record


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # includes JSONDecodeError, UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def read_records(
    path: Path, flt: LogFilter, *, stats: ReadStats | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the records of the whole file that match ``flt``, in file order.

    Garbage lines are skipped and counted in ``stats``.  An unterminated last
    line is yielded only if it is a complete JSON object (otherwise it is a
    line still being written and counts as partial).  Raises ``OSError``
    (e.g. ``FileNotFoundError``) when the file cannot be opened.
    """
    parser = _LineParser(stats if stats is not None else ReadStats())
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            for record in parser.feed(chunk):
                if flt.matches(record):
                    yield record
    for record in parser.finish():
        if flt.matches(record):
            yield record


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _seek_to_last_line_start(handle: IO[bytes], parser: _LineParser) -> None:
    """Position at end of file, but before an unterminated last line so it is not lost."""
    size = handle.seek(0, os.SEEK_END)
    window = min(size, MAX_LINE_BYTES)
    handle.seek(size - window)
    tail = handle.read(window)
    newline = tail.rfind(b"\n")
    if newline >= 0:
        handle.seek(size - window + newline + 1)
    elif window == size:
        handle.seek(0)  # the whole file is one unterminated line
    else:
        handle.seek(size)  # mid-way through an over-long line: skip to its end
        parser.skip_to_newline()


def follow_records(
    path: Path,
    flt: LogFilter,
    *,
    poll_s: float = 0.2,
    stop: Callable[[], bool] = lambda: False,
    from_end: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield matching records from ``path`` and keep yielding appended ones, like ``tail -F``.

    - Starts at the beginning of the file, or with ``from_end`` just after its
      last complete line (``from_end`` applies only if the file exists at the
      start; a file that appears later is read from its beginning).
    - A last line without its newline is held back until the newline arrives.
    - Waits (polling every ``poll_s`` seconds) while the file does not exist.
    - Truncation (size below the read position) restarts at offset 0.
    - Replacement/rotation (the path names another inode, or disappears and
      reappears) drains the old file, then reads the new one from its start.
    - Returns when ``stop()`` is true; it is checked before every read, so
      within about ``poll_s`` when idle.

    Limitation shared with ``tail``: a truncation followed by regrowth past
    the old read position between two polls is not detected.
    """
    counters = stats if stats is not None else ReadStats()
    parser = _LineParser(counters)
    handle: IO[bytes] | None = None
    identity: tuple[int, int] | None = None
    position = 0
    first_attempt = True

    def matching(data: bytes) -> Iterator[dict[str, Any]]:
        for record in parser.feed(data):
            if flt.matches(record):
                yield record

    try:
        while not stop():
            if handle is None:
                try:
                    handle = open(path, "rb")
                except FileNotFoundError:
                    first_attempt = False
                    time.sleep(poll_s)
                    continue
                identity = _file_id(os.fstat(handle.fileno()))
                if from_end and first_attempt:
                    _seek_to_last_line_start(handle, parser)
                first_attempt = False
                position = handle.tell()

            chunk = handle.read(_CHUNK)
            if chunk:
                position += len(chunk)
                yield from matching(chunk)
                continue

            # At end of file: look for truncation, then for replacement.
            if os.fstat(handle.fileno()).st_size < position:
                parser.abandon()
                position = handle.seek(0)
                continue
            try:
                current: tuple[int, int] | None = _file_id(os.stat(path))
            except FileNotFoundError:
                current = None  # rotated away, new file not created yet: keep old one
            if current is not None and current != identity:
                while chunk := handle.read(_CHUNK):  # lines written just before rotation
                    yield from matching(chunk)
                parser.abandon()
                handle.close()
                handle = None
                continue
            time.sleep(poll_s)
    finally:
        if handle is not None:
            handle.close()


def _quote(text: str) -> str:
    """``text`` bare if it is plain, else as a JSON string (ASCII, no control characters)."""
    if _BARE_RE.fullmatch(text) and text.isprintable():
        return text
    return json.dumps(text)


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return _quote(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def format_pretty(record: Mapping[str, Any], *, color: bool, tz: tzinfo | None = None) -> str:
    """Render one record as one human-readable line (no trailing newline).

    ``13:45:01.123 info  control[0] peer_up  peer=beta rtt_ms=0.41``: time of
    day with milliseconds in ``tz`` (default: the local zone), level (padded
    to 5), ``stage[worker]``, event, then the remaining fields as sorted
    ``key=value`` (``pid``/``node`` are omitted).  Strings with spaces,
    quotes or control characters are JSON-quoted, other values are JSON, so
    the result is always a single line without escape sequences from the
    log.  With ``color`` the level is wrapped in an ANSI colour.
    """
    moment = _record_time(record.get("timestamp"))
    if moment is not None:
        local = moment.astimezone(tz)
        when = f"{local:%H:%M:%S}.{local.microsecond // 1000:03d}"
    elif "timestamp" in record:
        when = _format_value(record["timestamp"])
    else:
        when = "--:--:--.---"

    raw_level = record.get("level")
    level = _format_value(raw_level) if raw_level is not None else "?"
    padding = " " * max(0, 5 - len(level))
    if color:
        rank = _level_rank(raw_level)
        if rank is not None:
            level = f"{_LEVEL_COLOR[LEVELS[rank]]}{level}{_RESET}"
    level += padding

    stage = _format_value(record["stage"]) if "stage" in record else "?"
    if "worker" in record:
        stage += f"[{_format_value(record['worker'])}]"
    event = _format_value(record["event"]) if "event" in record else "?"

    line = f"{when} {level} {stage} {event}"
    extras = [
        f"{_quote(str(key))}={_format_value(record[key])}"
        for key in sorted(record, key=str)
        if key not in _FIXED_FIELDS
    ]
    if extras:
        line += "  " + " ".join(extras)
    return line


def format_json(record: Mapping[str, Any]) -> str:
    """Render one record as a compact JSON object (ASCII, keys in record order, no newline)."""
    return json.dumps(dict(record), separators=(",", ":"), default=str)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the log viewer options to ``parser`` (destinations named after the options)."""
    group = parser.add_argument_group("log filters")
    group.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        metavar="STAGE",
        help=f"only this pipeline stage; repeatable ({', '.join(STAGES)})",
    )
    group.add_argument(
        "--worker", action="append", type=int, metavar="N", help="only this worker; repeatable"
    )
    group.add_argument(
        "--level",
        choices=LEVELS,
        default="debug",
        help="minimum level to show (default: debug = everything)",
    )
    group.add_argument(
        "--event",
        action="append",
        metavar="NAME",
        help='only this event; glob patterns such as "peer_*" allowed; repeatable',
    )
    group.add_argument("--peer", action="append", metavar="NAME", help="only this peer; repeatable")
    group.add_argument(
        "--since",
        metavar="TIME",
        help="from this time: ISO 8601 (UTC unless offset) or 10s/5m/2h/1d",
    )
    group.add_argument(
        "--until",
        metavar="TIME",
        help="up to this time: ISO 8601 (UTC unless offset) or 10s/5m/2h/1d",
    )
    output = parser.add_argument_group("log output")
    output.add_argument(
        "--follow", "-f", action="store_true", help="keep printing records as they are appended"
    )
    output.add_argument(
        "--json", action="store_true", help="print JSON lines instead of the pretty format"
    )


def _build_filter(args: argparse.Namespace, now: datetime) -> LogFilter:
    bounds: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        text = getattr(args, name, None)
        try:
            bounds[name] = None if text is None else parse_time(text, now)
        except ValueError as exc:
            raise ValueError(f"--{name}: {exc}") from None
    since, until = bounds["since"], bounds["until"]
    if since is not None and until is not None and since > until:
        raise ValueError(f"--since ({since.isoformat()}) is after --until ({until.isoformat()})")
    return LogFilter(
        stages=frozenset(getattr(args, "stage", None) or ()),
        workers=frozenset(getattr(args, "worker", None) or ()),
        min_level=getattr(args, "level", None) or "debug",
        events=frozenset(getattr(args, "event", None) or ()),
        peers=frozenset(getattr(args, "peer", None) or ()),
        since=since,
        until=until,
    )


def run(args: argparse.Namespace, log_path: Path, out: TextIO) -> int:
    """Print the records of ``log_path`` selected by ``args`` (see :func:`add_arguments`).

    ``--json`` prints JSON lines, otherwise the pretty format, coloured only
    when ``out`` is a terminal (and ``NO_COLOR`` is unset).  With
    ``--follow`` it keeps printing appended records until interrupted.
    Diagnostics go to stderr.  Exit status: 0 on success or Ctrl-C, 1 if the
    log cannot be read, 2 for an invalid ``--since``/``--until``.
    """
    try:
        flt = _build_filter(args, datetime.now(UTC))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if getattr(args, "json", False):
        render: Callable[[Mapping[str, Any]], str] = format_json
    else:
        color = out.isatty() and not os.environ.get("NO_COLOR")

        def render(record: Mapping[str, Any]) -> str:
            return format_pretty(record, color=color)

    follow = bool(getattr(args, "follow", False))
    stats = ReadStats()
    status = 0
    try:
        if follow:
            if not log_path.exists():
                print(f"waiting for {log_path} to appear", file=sys.stderr)
            for record in follow_records(log_path, flt, stats=stats):
                out.write(render(record) + "\n")
                out.flush()
        else:
            for record in read_records(log_path, flt, stats=stats):
                out.write(render(record) + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        return 0  # reader went away (e.g. piped into head)
    except OSError as exc:
        if exc.filename is None:
            raise  # not about the log file (e.g. writing to ``out`` failed)
        print(f"error: cannot read {log_path}: {exc.strerror or exc}", file=sys.stderr)
        status = 1
    if stats.skipped:
        print(f"skipped {stats.skipped} unparseable line(s)", file=sys.stderr)
    return status
