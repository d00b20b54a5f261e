"""``supervisor status`` as a human reads it: the node, its workers, rings and peers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: list[list[Any]]) -> list[str]:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip()]
    for r in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return out


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"node {st['node']}  {st['address']} in {st['subnet']} (namespace {st['namespace']}, "
        f"{st['mode']} mode, device {st['device']})",
        f"node id {st.get('node_id') or '-'}"
        + ("" if st.get("encrypted", True) else "  (INSECURE PLAINTEXT: no encryption)"),
        f"listening on {st['listen']}, supervisor pid {st['supervisor_pid']}, "
        f"up {st['uptime_s']} s",
        "",
        "workers",
    ]
    rows = [
        [w["stage"], w["worker"], w["pid"], w["state"], w["uptime_s"], w["restarts"]]
        for w in st["workers"]
    ]
    lines += table(["stage", "worker", "pid", "state", "uptime_s", "restarts"], rows)
    lines += ["", "rings"]
    rows = [
        [
            r["name"],
            r["frames_in"],
            r["bytes_in"],
            r["drops"],
            r["frames_out"],
            f"{100 * r['used_bytes'] / r['capacity']:.1f}%",
        ]
        for r in st["rings"]
    ]
    lines += table(["ring", "frames", "bytes", "drops", "consumed", "occupancy"], rows)
    lines += ["", "peers"]
    rows = [
        [
            p["name"],
            p["state"],
            (p.get("node_id") or "-")[:12],
            p["endpoint"],
            ",".join(p["addresses"]),
            p["rtt_ms"],
            p.get("pattern"),
            p.get("session_age_s"),
        ]
        for p in st["peers"]
    ]
    headers = ["peer", "state", "node_id", "endpoint", "addresses", "rtt_ms", "link", "key_age_s"]
    lines += table(headers, rows)
    overlay = st.get("overlay")
    if overlay:
        lines += [
            "",
            f"overlay  {overlay['state']}, about {overlay['estimated_size']} nodes, "
            f"address {'registered' if overlay['registered'] else 'not registered'}, "
            f"{overlay['routes']} resolved routes",
        ]
    if st.get("link_table"):
        rows = [
            [
                lk["slot"],
                lk["name"],
                (lk["node_id"] or "-")[:12],
                lk["kind"],
                lk["endpoint"],
                "up" if lk["up"] else "down",
                lk["rtt_ms"],
                lk["age_s"],
                ",".join(lk["routes"]),
            ]
            for lk in st["link_table"]
        ]
        lines += ["", "links"]
        headers = ["slot", "name", "node_id", "kind", "endpoint", "state", "rtt_ms", "age_s"]
        lines += table([*headers, "routes"], rows)
    if st.get("machines"):
        lines += ["", "machines behind this router"]
        rows = [
            [
                m["address"],
                m["mac"],
                m["hostname"],
                m["lease_age_s"],
                m.get("to_overlay"),
                m.get("from_overlay"),
            ]
            for m in st["machines"]
        ]
        headers = ["address", "mac", "name", "lease_age_s", "to_overlay", "from_overlay"]
        lines += table(headers, rows)
    refused = (st.get("links") or {}).get("refused") or {}
    if refused:
        lines += ["", "handshakes refused"]
        lines += table(["reason", "count"], [[r, n] for r, n in sorted(refused.items())])
    drops = _drops(st)
    if drops:
        lines += ["", "drops"]
        lines += table(["worker", "reason", "count"], drops)
    return "\n".join(lines)


def _drops(st: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for w in st["workers"]:
        stats = w.get("stats") or {}
        found = dict(stats.get("drops") or {})
        cls = stats.get("classifier") or {}
        found.update(cls.get("drops") or {})
        for reason, count in sorted(found.items()):
            if count:
                rows.append([f"{w['stage']}:{w['worker']}", reason, count])
    return rows
