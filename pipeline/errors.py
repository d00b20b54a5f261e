"""The few exception types every stage shares.

Four kinds of fault, four types (after h11 and trio):

- ``ConfigError``: a bad configuration, found at start-up; lists every problem by key path.
- ``RemoteProtocolError``: something from outside (a frame, a datagram, a record) is malformed
  or illegal. Caught at exactly one boundary per core and turned into a counted drop.
- ``StageIOError``: the environment broke (TAP gone, socket error, ring missing). The stage logs
  one event and exits non-zero; the supervisor restarts it.
- Bugs: plain ``assert``; the process dies and is restarted.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` holds one (key path, message) per error."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in problems))


class RemoteProtocolError(Exception):
    """Input from outside the node is malformed. ``reason`` is a short snake_case drop reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class StageIOError(Exception):
    """A device, socket or ring the stage depends on is broken; the worker must exit."""
