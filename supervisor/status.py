"""``supervisor status`` as a human reads it: the node, a short table of its peers (who,
where, by which path, how fast, when they last shook hands, bytes sent and received), then
the details: workers, rings, static peers, the overlay, every link, drops. ``--json``
prints the whole status."""

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
        "peers",
    ]
    peers = peer_rows(st)
    lines += table(PEER_HEADERS, peers) if peers else ["  none yet"]
    lines += ["", "workers"]
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
    if st["peers"]:
        lines += ["", "static peers"]
    rows = [
        [
            p["name"],
            p["state"],
            (p.get("node_id") or "-")[:12],
            p["endpoint"],
            ",".join(p["addresses"]),
            p["rtt_ms"],
            p.get("pattern"),
            p.get("cipher") or "-",
            p.get("session_age_s"),
        ]
        for p in st["peers"]
    ]
    headers = ["peer", "state", "node_id", "endpoint", "addresses", "rtt_ms", "link", "cipher"]
    headers.append("key_age_s")
    lines += table(headers, rows) if rows else []
    overlay = st.get("overlay")
    if overlay:
        lines += [
            "",
            f"overlay  {overlay['state']}, about {overlay['estimated_size']} nodes, "
            f"{_address_state(st, overlay)}, {overlay['routes']} resolved routes",
        ]
    mapping_line = port_mapping_line(st.get("port_mapping"))
    if mapping_line:
        lines += [mapping_line] if overlay else ["", mapping_line]
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
                lk.get("cipher") or "-",
                ",".join(lk["routes"]),
            ]
            for lk in st["link_table"]
        ]
        lines += ["", "links"]
        headers = ["slot", "name", "node_id", "kind", "endpoint", "state", "rtt_ms", "age_s"]
        lines += table([*headers, "cipher", "routes"], rows)
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


def port_mapping_line(mapping: dict[str, Any] | None) -> str | None:
    """``port mapping  198.18.90.11:4789 (upnp, lease 7200 s)``; None when there is nothing
    to say (plaintext, or an old node's status)."""
    if not mapping:
        return None
    if not mapping.get("enabled"):
        return "port mapping  off"
    external = mapping.get("external")
    if external:
        lifetime = mapping.get("lifetime_s")
        lease = "permanent" if lifetime == 0 else f"lease {lifetime} s"
        return f"port mapping  {external} ({mapping.get('protocol')}, {lease})"
    asked = ", ".join(mapping.get("protocols") or []) or "-"
    return f"port mapping  none ({mapping.get('phase') or 'no gateway'}; asks {asked})"


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


PEER_HEADERS = ["peer", "address", "path", "rtt_ms", "last handshake", "sent", "received", "state"]


def peer_rows(st: dict[str, Any]) -> list[list[Any]]:
    """One row a peer: the links (static peers' and the overlay's) merged with the static
    peers' keepalive state. Bytes are the link's (``bytes_sent``/``bytes_received``, headers
    included; a relayed peer's are its end-to-end datagrams); a static peer without a link
    has none."""
    static = {p["name"]: p for p in st.get("peers") or []}
    rows: list[list[Any]] = []
    seen: set[str] = set()
    for lk in st.get("link_table") or []:
        name = lk.get("name") or (lk.get("node_id") or "?")[:12]
        peer = static.get(lk.get("name") or "")
        addresses = lk.get("routes") or (peer["addresses"] if peer else [])
        rtt = peer["rtt_ms"] if peer and peer.get("rtt_ms") is not None else lk.get("rtt_ms")
        state = peer["state"] if peer else ("up" if lk.get("up") else "down")
        kind = lk.get("kind") or "-"
        rows.append([name, ",".join(addresses) or "-", _path(lk.get("endpoint"), kind), rtt,
                     _ago(lk.get("age_s")), human_bytes(lk.get("bytes_sent")),
                     human_bytes(lk.get("bytes_received")), state])  # fmt: skip
        seen.add(name)
    for name, p in static.items():
        if name not in seen:
            path = _path(p.get("endpoint"), "static")
            age = _ago(p.get("session_age_s"))
            rows.append(
                [name, ",".join(p["addresses"]), path, p.get("rtt_ms"), age, None, None, p["state"]]
            )
    return rows


def _path(endpoint: Any, kind: str) -> str:
    """``direct 198.18.0.2:4789 (near)``, or ``relayed via 3fa2b1c0d4e5 (relayed)``."""
    text = str(endpoint or "-")
    if text.startswith("via:"):
        return f"relayed via {text[4:16]} ({kind})"
    return f"direct {text} ({kind})"


def _ago(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def human_bytes(n: Any) -> str | None:
    """``512 B``, ``1.2 kB``, ``3.4 MB``, ``5.0 GB`` (powers of 1000); None when unknown (an
    old node's status)."""
    if not isinstance(n, int | float) or isinstance(n, bool):
        return None
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 999.95:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def _address_state(st: dict[str, Any], overlay: dict[str, Any]) -> str:
    """Whose addresses the node holds in the DHT: its static one (registered by routing),
    the one its TAP leased by DHCP, or, in router mode, the machines' leases."""
    if st.get("mode") == "router":
        return f"{len(st.get('machines') or [])} machines leased"
    if st.get("addressing") == "dhcp":
        leased = st.get("address") not in (None, "", "-")
        return f"address {st['address']} leased by DHCP" if leased else "no DHCP lease yet"
    return f"address {'registered' if overlay['registered'] else 'not registered'}"
