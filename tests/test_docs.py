"""The docs stay true: every configuration key is in docs/config.md and configs/interface.toml,
every log event the code emits is in LOGGING.md, and docs/wire.md's table of ring records is
the one the code has."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pipeline.config import Endpoint, Settings
from pipeline.records import EDGE_KINDS, RecordKind, ring_graph

ROOT = Path(__file__).resolve().parent.parent


def keys(tp: type[Settings], path: str = "") -> list[str]:
    out = []
    for name, f in tp.schema.items():
        t = f.type
        inner = typing.get_args(t)[0] if typing.get_origin(t) is tuple else t
        full = f"{path}.{name}" if path else name
        if isinstance(inner, type) and hasattr(inner, "schema") and inner is not Endpoint:
            out += keys(inner, full)
        else:
            out.append(full)
    return out


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs/config.md").read_text()
    example = (ROOT / "configs/interface.toml").read_text()
    for key in keys(Settings):
        leaf = key.rsplit(".", 1)[-1]
        assert f"`{leaf}`" in doc, key
        assert re.search(rf"^#? ?{leaf} = ", example, re.M), key


def test_every_logged_event_is_in_logging_md() -> None:
    doc = (ROOT / "LOGGING.md").read_text()
    sources = list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "supervisor").rglob("*.py"))
    # direct calls, and the control core's typed log events, which control logs by name
    pattern = re.compile(r"\.(?:debug|info|warning|error|critical)\(\s*\"([a-z_]+)\"")
    events = {m for p in sources for m in pattern.findall(p.read_text())}
    typed = re.compile(r"^    name = \"([a-z_]+)\"$", re.M)
    events |= set(typed.findall((ROOT / "pipeline/control/events.py").read_text()))
    assert "route_added" in events and "handshake_refused" in events
    assert len(events) >= 15
    missing = sorted(e for e in events if f"`{e}`" not in doc)
    assert not missing, missing


def test_ring_record_table_is_the_code_s() -> None:
    """Every (kind, edge) row of docs/wire.md's ring record table is in ``EDGE_KINDS`` and
    every edge's kind has its row, with the kind's number."""
    doc = (ROOT / "docs/wire.md").read_text()
    rows = re.findall(
        r"^\| (\d+) \| ([A-Z_]+) \| ([a-z_]+) → ([a-z_]+)(?: \(([a-z]+) lane\))? \|", doc, re.M
    )
    documented = {(RecordKind[name], p, c, lane) for _, name, p, c, lane in rows}
    assert all(RecordKind[name].value == int(number) for number, name, *_ in rows)
    in_code = {
        (kind, producer.value, consumer.value, lane.value)
        for (producer, consumer, lane), kinds in EDGE_KINDS.items()
        for kind in kinds
    }
    assert documented == in_code


def test_architecture_draws_the_ring_graph_of_the_code() -> None:
    """docs/architecture.md's drawing of the ring graph is ``records.ring_graph()``, and names
    every stage's module that a newcomer follows a frame through."""
    doc = (ROOT / "docs/architecture.md").read_text()
    assert ring_graph() in doc
    for path in (
        "pipeline/tap_reader/stage.py",
        "pipeline/classifier/stage.py",
        "pipeline/overlay_io/stage.py",
        "pipeline/topology.py",
        "pipeline/records.py",
    ):
        assert f"`{path}`" in doc and (ROOT / path).exists(), path
