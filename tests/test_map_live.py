"""supervisor map live: six real nodes on one bridged segment form the overlay; once it has
settled, ``supervisor map FILE --json`` on one of them crawls it through the overlay and
finds every node and every overlay connection that the nodes' own ``supervisor status
--json`` list (taken just before and just after the crawl, and equal: connections may
change while crawling, e.g. leaf connections closing a minute after joining; then it tries
again). The SVG it writes is well-formed, with a circle a node and a line a link.

That an answer from a non-member or a forged origin is refused is tested at the core level
(tests/test_map.py: six ControlCores, a member passing off a foreign-signed answer and
another member's answer as its own): a non-member cannot link to a live node at all, so it
cannot put an answer on the overlay here."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.mapview import links_of
from supervisor.testbed import Node, Testbed, overlay_nodes, overlay_settled, statuses, wait_for

pytestmark = pytest.mark.netns

KINDS = ("near", "far", "leaf", "shortcut")
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def six(tmp_path: Path) -> Iterator[list[Node]]:
    with Testbed("map") as tb:
        yield overlay_nodes(tb, tmp_path, 6)


def connections(st: dict[str, Any]) -> set[tuple[str, str]]:
    """(peer node id, kind) of a node's overlay connections and shortcuts, as status says."""
    out = set()
    for lk in st["link_table"]:
        kind = lk["kind"].split("+")[0]
        if kind in KINDS and lk["node_id"]:
            out.add((lk["node_id"], kind))
    return out


def test_map_finds_every_node_and_connection_that_status_lists(
    six: list[Node], tmp_path: Path
) -> None:
    nodes = six
    wait_for("the overlay to settle", lambda: overlay_settled(nodes), 90, every=0.5)
    crawler = nodes[2]
    svg_path = tmp_path / "map.svg"
    for attempt in range(6):
        before = statuses(nodes)
        res = crawler.cli(
            "map", str(crawler.config), "--json", "--svg", str(svg_path), check=False, timeout=60
        )
        after = statuses(nodes)
        assert res.returncode == 0, res.stdout + res.stderr
        assert before is not None and after is not None
        if [connections(s) for s in before] == [connections(s) for s in after]:
            break
        print(f"attempt {attempt}: connections changed during the crawl, again")
        time.sleep(2)
    else:
        pytest.fail("the overlay's connections kept changing")
    found = json.loads(res.stdout)
    assert "map written to" in res.stderr
    assert found["stopped"] == "complete" and found["complete"] and not found["sampled"]
    assert found["refused"] == 0 and found["unanswered"] == []
    assert found["crawler"] == before[2]["node_id"]
    by_id = {n["node_id"]: n for n in found["nodes"]}
    assert set(by_id) == {s["node_id"] for s in before}  # every node
    for n, st in zip(nodes, before, strict=True):
        mine = by_id[st["node_id"]]
        assert mine["name"] == n.name and mine["addresses"] == [n.address]
        crawled = {(c["node_id"], c["kind"]) for c in mine["connections"]}
        assert crawled == connections(st), n.name  # every connection, and no other
        assert all(c["path"] == "direct" for c in mine["connections"])  # one segment
    root = ET.parse(svg_path).getroot()
    circles = [e for e in root.iter(f"{SVG}circle") if e.get("class") == "node"]
    assert len(circles) == 6
    lines = [e for e in root.iter(f"{SVG}line") if "link" in e.get("class", "").split()]
    assert len(lines) == len(links_of(found)) >= 6 * 2  # at least the circle's near links
    labels = " ".join(e.text or "" for e in root.iter(f"{SVG}text"))
    for n in nodes:
        assert f"{n.name} {n.address}" in labels
    # the text form, and --max-nodes: a sample that says so
    res = crawler.cli("map", str(crawler.config), "--max-nodes", "3", "--svg", str(svg_path))
    assert "a sample: stopped at 3 nodes" in res.stdout, res.stdout
