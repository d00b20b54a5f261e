"""``supervisor map``: the crawl drawn as the overlay's circle (SVG written here, no library),
and as text. Pure but for ``write_png``.

Every node sits on the circle at the angle of its node id (id / 2^160 of a turn, clockwise
from the top), labelled with its name and virtual address(es). A *link* is a pair of nodes
that either of them lists as a connection: one line per pair, in the style of the strongest
kind either end gives it (near > far > tunnel > shortcut > leaf; both kinds are in its
``data-kinds``), dashed when relayed (a tunnel, or a link whose datagrams go through another
node; ``data-via`` names that node). A node that was named but did not answer (or was not
asked: the crawl sampled) is a hollow circle. The SVG's elements carry classes
(``node``, ``link kind-<kind>``, ``relayed``) so that tests and style sheets find them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

SIZE_IDS = 1 << 160
KINDS = ("near", "far", "tunnel", "shortcut", "leaf")  # strongest first
STYLE = {
    "near": ("#1f77b4", 2.6, ""),
    "far": ("#ff7f0e", 1.6, ""),
    "tunnel": ("#9467bd", 2.0, ""),
    "shortcut": ("#2ca02c", 2.0, ""),
    "leaf": ("#7f7f7f", 1.2, "2,3"),
}
RELAYED_DASH = "7,4"
WIDTH, HEIGHT = 1100, 900
CX, CY, RADIUS = 440, 470, 320
LABEL_CROWDED = 0.12  # radians: a label this close to the previous one goes further out


def links_of(crawl: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pair of nodes that either lists as a connection, once: ``a`` < ``b`` (hex node
    ids), ``kind`` (the strongest), ``kinds`` (all given), ``relayed``, ``via`` (node ids)."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for node in crawl.get("nodes", []):
        me = node["node_id"]
        for c in node.get("connections", []):
            other = c["node_id"]
            if other == me:
                continue
            key = (min(me, other), max(me, other))
            link = pairs.setdefault(
                key, {"a": key[0], "b": key[1], "kinds": set(), "relayed": False, "via": set()}
            )
            link["kinds"].add(c["kind"])
            if c.get("path") == "relayed":
                link["relayed"] = True
                if c.get("via"):
                    link["via"].add(c["via"])
    out = []
    for key in sorted(pairs):
        link = pairs[key]
        kinds = sorted(link["kinds"], key=_rank)
        out.append(
            {
                "a": link["a"],
                "b": link["b"],
                "kind": kinds[0],
                "kinds": kinds,
                "relayed": link["relayed"],
                "via": sorted(link["via"]),
            }
        )
    return out


def _rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def _angle(node_id: str) -> float:
    """Radians clockwise from the top."""
    return int(node_id, 16) / SIZE_IDS * 2 * math.pi


def _place(node_id: str, radius: float = RADIUS) -> tuple[float, float]:
    a = _angle(node_id)
    return CX + radius * math.sin(a), CY - radius * math.cos(a)


def summary(crawl: dict[str, Any]) -> str:
    """One line: how many nodes and links, and whether the crawl is whole."""
    nodes, links = crawl.get("nodes", []), links_of(crawl)
    stopped = crawl.get("stopped")
    if crawl.get("sampled"):
        left = len(crawl.get("not_asked", []))
        how = f"a sample: stopped at {crawl.get('max_nodes')} nodes ({left} not asked)"
        if stopped == "deadline":
            how = f"a sample: the deadline came ({left} not asked)"
    elif stopped == "deadline":
        how = "incomplete: the deadline came"
    else:
        how = "complete" if crawl.get("complete") else "complete but for silent nodes"
    silent = len(crawl.get("unanswered", []))
    extra = f", {silent} did not answer" if silent else ""
    refused = crawl.get("refused", 0)
    extra += f", {refused} answers refused" if refused else ""
    return (
        f"{len(nodes)} nodes, {len(links)} links in {crawl.get('elapsed_s', 0):g} s: {how}{extra}"
    )


def format_map(crawl: dict[str, Any]) -> str:
    """The crawl as text: a line a node (in circle order) with its connections."""
    if "error" in crawl:
        return f"no map: {crawl['error']}"
    names = {n["node_id"]: n["name"] for n in crawl.get("nodes", [])}
    lines = [summary(crawl)]
    for node in sorted(crawl.get("nodes", []), key=lambda n: int(n["node_id"], 16)):
        where = ", ".join(node["addresses"]) or "-"
        lines.append(f"{node['name']:<12} {where:<15} {node['node_id'][:16]}")
        for c in node["connections"]:
            peer = names.get(c["node_id"], c["node_id"][:16])
            via = f" via {names.get(c['via'], (c['via'] or '')[:16])}" if c.get("via") else ""
            lines.append(f"    {c['kind']:<9} {peer:<16} {c['path']}{via}")
    return "\n".join(lines)


def render_svg(crawl: dict[str, Any]) -> str:
    """The circle as an SVG document (see the module)."""
    nodes = {n["node_id"]: n for n in crawl.get("nodes", [])}
    names = {nid: n["name"] for nid, n in nodes.items()}
    silent = [n for n in crawl.get("unanswered", []) if n not in nodes]
    unasked = [n for n in crawl.get("not_asked", []) if n not in nodes]
    links = links_of(crawl)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect class="background" x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
    ]
    crawler = names.get(crawl.get("crawler", ""), (crawl.get("crawler") or "?")[:16])
    out.append(
        f'<text class="title" x="20" y="28" font-size="18">autovn overlay, crawled from '
        f"{escape(crawler)}</text>"
    )
    out.append(f'<text class="summary" x="20" y="50">{escape(summary(crawl))}</text>')
    out.append(
        f'<circle class="orbit" cx="{CX}" cy="{CY}" r="{RADIUS}" fill="none" '
        'stroke="#dddddd" stroke-width="1"/>'
    )
    for link in links:
        x1, y1 = _place(link["a"])
        x2, y2 = _place(link["b"])
        colour, width, dash = STYLE.get(link["kind"], ("#000000", 1.0, ""))
        if link["relayed"]:
            dash = RELAYED_DASH
        classes = f"link kind-{link['kind']}" + (" relayed" if link["relayed"] else "")
        via = " ".join(link["via"])
        title = f"{names.get(link['a'], link['a'][:16])} - {names.get(link['b'], link['b'][:16])}"
        title += f": {'/'.join(link['kinds'])}"
        if link["relayed"]:
            title += ", relayed" + (
                " via " + ", ".join(names.get(v, v[:16]) for v in link["via"]) if via else ""
            )
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line class="{classes}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{colour}" stroke-width="{width}"{dash_attr} '
            f'data-a="{link["a"]}" data-b="{link["b"]}" data-kinds="{" ".join(link["kinds"])}"'
            f' data-via="{via}"><title>{escape(title)}</title></line>'
        )
    drawn = [(nid, n["name"], n.get("addresses", []), "node") for nid, n in nodes.items()]
    drawn += [(nid, nid[:8], [], "node unanswered") for nid in silent]
    drawn += [(nid, nid[:8], [], "node not-asked") for nid in unasked]
    drawn.sort(key=lambda d: int(d[0], 16))
    level, last = 0, -1.0
    for nid, name, addresses, classes in drawn:
        angle = _angle(nid)
        level = level + 1 if last >= 0 and angle - last < LABEL_CROWDED and level < 4 else 0
        last = angle
        out += _node(nid, name, addresses, classes, RADIUS + 16 + 14 * level)
    out += _legend()
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _node(
    nid: str, name: str, addresses: list[str], classes: str, label_radius: float
) -> list[str]:
    x, y = _place(nid)
    answered = classes == "node"
    fill = "#222222" if answered else "white"
    lx, ly = _place(nid, label_radius)
    angle = _angle(nid)
    anchor = "start" if math.sin(angle) > 0.15 else "end" if math.sin(angle) < -0.15 else "middle"
    if math.cos(angle) < -0.5:
        ly += 10
    label = name + (f" {addresses[0]}" if addresses else "")
    title = f"{name} {' '.join(addresses)} {nid}".strip()
    return [
        f'<circle class="{classes}" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{fill}" '
        f'stroke="#222222" stroke-width="1.5" data-node-id="{nid}">'
        f"<title>{escape(title)}</title></circle>",
        f'<text class="label" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" '
        f"data-node-id={quoteattr(nid)}>{escape(label)}</text>",
    ]


def _legend() -> list[str]:
    x, y = WIDTH - 260, 100
    out = [f'<g class="legend"><text x="{x}" y="{y}" font-size="14">links</text>']
    rows = [(k, k, STYLE[k][2]) for k in KINDS]
    rows.append(("relayed", "relayed (via another node)", RELAYED_DASH))
    for i, (kind, text, dash) in enumerate(rows):
        yy = y + 24 + 22 * i
        colour, width = (STYLE[kind][0], STYLE[kind][1]) if kind in STYLE else ("#444444", 2.0)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<line class="legend-line" x1="{x}" y1="{yy}" x2="{x + 40}" y2="{yy}" '
            f'stroke="{colour}" stroke-width="{width}"{dash_attr}/>'
        )
        out.append(f'<text x="{x + 50}" y="{yy + 4}">{escape(text)}</text>')
    yy = y + 24 + 22 * len(rows) + 10
    out.append(
        f'<circle class="legend-node" cx="{x + 20}" cy="{yy}" r="6" fill="#222222" '
        'stroke="#222222"/>'
    )
    out.append(f'<text x="{x + 50}" y="{yy + 4}">node (name, virtual address)</text>')
    out.append(
        f'<circle class="legend-node" cx="{x + 20}" cy="{yy + 22}" r="6" fill="white" '
        'stroke="#222222"/>'
    )
    out.append(f'<text x="{x + 50}" y="{yy + 26}">named, not answered or not asked</text>')
    out.append(
        f'<text x="{x}" y="{yy + 52}" fill="#666666">place on the circle: node id / 2^160</text>'
    )
    out.append("</g>")
    return out


def write_png(svg: str, path: Path) -> str | None:
    """Write the SVG as a PNG with the optional ``cairosvg`` (``pip install autovn[map]``);
    None when done, else why not."""
    try:
        import cairosvg  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except (ImportError, OSError) as exc:  # OSError: the cairo library itself is missing
        return f"PNG needs the optional extra autovn[map] (cairosvg): {exc}"
    cairosvg.svg2png(bytestring=svg.encode(), write_to=str(path))
    return None
