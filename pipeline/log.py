"""structlog, configured once per process: JSON lines to the node's log file.

Every record carries ``timestamp``, ``level``, ``event``, ``stage``, ``worker``, ``pid`` and
``node``. Event names are past-tense facts (``worker_started``); details are fields. The
supervisor also mirrors its own records to the terminal. LOGGING.md lists the events.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS |= {"error": logging.ERROR}


def _json(logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
    rendered = structlog.processors.JSONRenderer()(logger, name, event)
    return rendered if isinstance(rendered, str) else rendered.decode()


class _Tee:
    """Writes the JSON line to the file and a pretty line to the console."""

    def __init__(self, file: TextIO, console: TextIO | None) -> None:
        self.file = file
        self.console = console
        self.pretty = structlog.dev.ConsoleRenderer(colors=bool(console and console.isatty()))

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        if self.console is not None:
            shown = {k: v for k, v in event.items() if k not in ("pid", "node", "worker")}
            print(self.pretty(logger, name, dict(shown)), file=self.console, flush=True)
        return _json(logger, name, event)


def configure_logging(
    *, stage: str, worker: int, node: str, level: str, file: Path, console: bool = False
) -> structlog.typing.FilteringBoundLogger:
    file.parent.mkdir(parents=True, exist_ok=True)
    stream = open(file, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _Tee(stream, sys.stderr if console else None),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    log: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return log.bind(stage=stage, worker=worker, pid=os.getpid(), node=node)
