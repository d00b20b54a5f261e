"""Prometheus metrics of a running node, served by the supervisor (``[metrics] listen``).

Theory of operation: the supervisor already gathers every worker's counters from their
heartbeats and reads the rings' own counters (``NodeSupervisor.status``, what ``supervisor
status --json`` prints). While metrics are on, its loop publishes that status as a snapshot
twice a second: a fresh dict, never changed after, put in place by one assignment.
prometheus-client's HTTP server answers scrapes in a thread of its own; ``StatusCollector``
reads the latest snapshot there and turns it into metric families (``families``, a pure
function of the snapshot), so a scrape never waits for the supervisor's loop nor touches
its state, and the loop never waits for a scrape. No stage counts anything for metrics.

Names follow Prometheus' conventions: ``autovn_`` first, base units in the name
(``_seconds``, ``_bytes``), counters end in ``_total``; labels ``stage``, ``worker``,
``reason``, ``peer``, ``direction`` (``outbound``: from the TAP towards UDP, the inside to
the outside; ``inbound``: the other way). docs/config.md lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pipeline.config import Endpoint

Snapshot = Mapping[str, Any]

#: classifier ``actions`` by number (``pipeline.classifier.classify.Action``)
ACTIONS = ("to_peer", "to_tap", "drop", "to_control", "resolve", "verify", "claim")
#: DHT counters that are failures (with those starting ``dropped_`` and ``refused_``)
DHT_FAILURES = frozenset({"request_timeouts", "route_failed", "no_quorum"})
#: overlay counters that are gauges, sent as metrics of their own
OVERLAY_GAUGES = ("connections_", "estimated_size")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _ms(value: Any) -> float | None:
    n = _number(value)
    return None if n is None else n / 1000


class _Families:
    """Metric families by name, made on first use, so that code reads as one call a sample."""

    def __init__(self) -> None:
        self.made: dict[str, Metric] = {}

    def _get(
        self,
        kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
        name: str,
        doc: str,
        labels: tuple[str, ...],
    ) -> Any:
        family = self.made.get(name)
        if family is None:
            family = kind(name, doc, labels=list(labels))
            self.made[name] = family
        return family

    def counter(self, name: str, doc: str, labels: Mapping[str, str], value: Any) -> None:
        n = _number(value)
        if n is not None:
            family = self._get(CounterMetricFamily, name, doc, tuple(labels))
            family.add_metric(list(labels.values()), n)

    def gauge(self, name: str, doc: str, labels: Mapping[str, str], value: Any) -> None:
        n = _number(value)
        if n is not None:
            family = self._get(GaugeMetricFamily, name, doc, tuple(labels))
            family.add_metric(list(labels.values()), n)


def families(st: Snapshot) -> list[Metric]:
    """Every metric of the node, from one ``status`` snapshot."""
    f = _Families()
    _node(f, st)
    for w in st.get("workers") or []:
        _worker(f, w)
    for ring in st.get("rings") or []:
        _ring(f, ring)
    for peer in st.get("peers") or []:
        _peer(f, peer)
    for link in st.get("link_table") or []:
        _link(f, link)
    _handshakes(f, st.get("links") or {})
    overlay = st.get("overlay")
    if overlay:
        _overlay(f, overlay)
    control = next((w for w in st.get("workers") or [] if w.get("stage") == "control"), None)
    addressing = ((control or {}).get("stats") or {}).get("addressing")
    if addressing:
        _addressing(f, addressing)
    if st.get("machines") is not None and st.get("mode") == "router":
        f.gauge(
            "autovn_router_machines", "machines leased behind this router", {}, len(st["machines"])
        )
    return list(f.made.values())


def _node(f: _Families, st: Snapshot) -> None:
    info = GaugeMetricFamily(
        "autovn_node_info",
        "the node: name, virtual network, node id, virtual address, mode (value 1)",
        labels=["node", "namespace", "node_id", "address", "mode"],
    )
    info.add_metric(
        [str(st.get(k) or "") for k in ("node", "namespace", "node_id", "address", "mode")], 1
    )
    f.made[info.name] = info
    f.gauge(
        "autovn_node_uptime_seconds", "time since the supervisor started", {}, st.get("uptime_s")
    )
    f.gauge(
        "autovn_node_encrypted",
        "1 unless security.insecure_plaintext",
        {},
        st.get("encrypted", True),
    )


def _worker(f: _Families, w: Mapping[str, Any]) -> None:
    stage = str(w.get("stage"))
    labels = {"stage": stage, "worker": str(w.get("worker"))}
    f.gauge(
        "autovn_worker_up",
        "1 while the worker runs (said ready)",
        labels,
        w.get("state") == "running",
    )
    f.counter(
        "autovn_worker_restarts",
        "times the supervisor restarted the worker",
        labels,
        w.get("restarts"),
    )
    f.gauge(
        "autovn_worker_heartbeat_age_seconds",
        "time since the worker's last heartbeat",
        labels,
        w.get("heartbeat_age_s"),
    )
    stats = w.get("stats") or {}
    frames_doc = "frames a stage handled (overlay_io: UDP datagrams), by direction"
    bytes_doc = "bytes a stage handled (overlay_io: UDP payload bytes), by direction"
    drops_doc = "frames, datagrams or messages a worker dropped, by reason"
    directions: Iterable[tuple[str, str, str | None]] = ()
    if stage == "tap_reader":
        directions = (
            ("outbound", "frames_read", "bytes_read"),
            ("inbound", "frames_written", "bytes_written"),
        )
        f.counter(
            "autovn_drops", drops_doc, labels | {"reason": "tap_write"}, stats.get("write_drops")
        )
    elif stage == "overlay_io":
        directions = (
            ("outbound", "datagrams_sent", "bytes_sent"),
            ("inbound", "datagrams_received", "bytes_received"),
        )
        f.counter(
            "autovn_drops", drops_doc, labels | {"reason": "send_error"}, stats.get("send_errors")
        )
        for kind in ("sent", "forwarded", "delivered"):
            f.counter(
                "autovn_relay_datagrams",
                "relayed datagrams: ours sent relayed, others' passed on, relayed to us",
                {"worker": labels["worker"], "kind": kind},
                stats.get(f"relay_{kind}"),
            )
        for direction, count in (stats.get("sessions") or {}).items():
            f.gauge(
                "autovn_overlay_io_sessions",
                "session keys an overlay_io worker holds, for receiving and for sending",
                {"worker": labels["worker"], "direction": str(direction)},
                count,
            )
    elif stage == "classifier":
        cls = stats.get("classifier") or {}
        directions = (("outbound", "from_inside", None), ("inbound", "from_outside", None))
        stats = cls
        for number, count in (cls.get("actions") or {}).items():
            index = int(number) if str(number).isdigit() else -1
            action = ACTIONS[index] if 0 <= index < len(ACTIONS) else str(number)
            f.counter(
                "autovn_classifier_actions",
                "the classifier's verdicts, by action",
                {"worker": labels["worker"], "action": action},
                count,
            )
    for direction, frames, size in directions:
        f.counter("autovn_frames", frames_doc, labels | {"direction": direction}, stats.get(frames))
        if size is not None:
            f.counter("autovn_bytes", bytes_doc, labels | {"direction": direction}, stats.get(size))
    for reason, count in sorted((stats.get("drops") or {}).items()):
        f.counter("autovn_drops", drops_doc, labels | {"reason": str(reason)}, count)


def _ring(f: _Families, r: Mapping[str, Any]) -> None:
    ring = {"ring": str(r.get("name"))}
    f.gauge("autovn_ring_capacity_bytes", "a shared-memory ring's size", ring, r.get("capacity"))
    f.gauge(
        "autovn_ring_used_bytes", "bytes waiting in a ring (its fill)", ring, r.get("used_bytes")
    )
    for side, verb in (("in", "pushed"), ("out", "popped")):
        f.counter(
            f"autovn_ring_{verb}_records",
            f"records {verb} {'into' if side == 'in' else 'from'} a ring",
            ring,
            r.get(f"frames_{side}"),
        )
        f.counter(
            f"autovn_ring_{verb}_bytes",
            f"bytes {verb} through a ring",
            ring,
            r.get(f"bytes_{side}"),
        )
    f.counter(
        "autovn_ring_dropped_records", "records dropped: the ring was full", ring, r.get("drops")
    )
    f.counter(
        "autovn_ring_dropped_bytes",
        "bytes of records dropped: ring full",
        ring,
        r.get("drop_bytes"),
    )


def _peer(f: _Families, p: Mapping[str, Any]) -> None:
    peer = {"peer": str(p.get("name"))}
    f.gauge(
        "autovn_peer_up", "1 while a static peer answers keepalives", peer, p.get("state") == "up"
    )
    f.gauge(
        "autovn_peer_rtt_seconds",
        "a static peer's keepalive round-trip time",
        peer,
        _ms(p.get("rtt_ms")),
    )
    f.gauge(
        "autovn_peer_last_heard_seconds",
        "time since a static peer was last heard",
        peer,
        p.get("last_heard_s"),
    )
    f.gauge(
        "autovn_peer_session_age_seconds",
        "age of the newest session with a static peer: time since its last handshake",
        peer,
        p.get("session_age_s"),
    )
    f.counter(
        "autovn_peer_handshakes",
        "handshakes completed with a static peer",
        peer,
        p.get("handshakes"),
    )
    f.counter(
        "autovn_peer_pings_sent", "keepalives sent to a static peer", peer, p.get("pings_sent")
    )
    f.counter(
        "autovn_peer_pongs_received",
        "keepalive answers from a static peer",
        peer,
        p.get("pongs_received"),
    )


def link_peer(link: Mapping[str, Any]) -> str:
    """The ``peer`` label of a link: its node's name, else the start of its node id."""
    return str(link.get("name") or (link.get("node_id") or "?")[:16])


def _link(f: _Families, lk: Mapping[str, Any]) -> None:
    labels = {"peer": link_peer(lk), "slot": str(lk.get("slot"))}
    endpoint = str(lk.get("endpoint") or "")
    info = labels | {
        "node_id": str(lk.get("node_id") or ""),
        "kind": str(lk.get("kind") or ""),
        "path": "relayed"
        if endpoint.startswith("via:") or "relayed" in str(lk.get("kind"))
        else "direct",
        "endpoint": endpoint,
    }
    f.gauge(
        "autovn_link_info",
        "a link: its node, kind (near, far, leaf, relayed, ...), path and endpoint (value 1)",
        info,
        1,
    )
    f.gauge("autovn_link_up", "1 while a link has a confirmed session", labels, lk.get("up"))
    f.gauge(
        "autovn_link_rtt_seconds",
        "the overlay's round-trip time over a link",
        labels,
        _ms(lk.get("rtt_ms")),
    )
    f.gauge(
        "autovn_link_session_age_seconds",
        "age of a link's newest session: time since its last handshake",
        labels,
        lk.get("age_s"),
    )
    f.gauge(
        "autovn_link_routes",
        "virtual addresses routed over a link",
        labels,
        len(lk.get("routes") or []),
    )
    f.counter(
        "autovn_link_sent_bytes_total",
        "bytes of datagrams sent over a link, headers included (a relayed link's: its "
        "end-to-end datagrams)",
        labels,
        lk.get("bytes_sent"),
    )
    f.counter(
        "autovn_link_received_bytes_total",
        "bytes of datagrams opened from a link, headers included (a relayed link's: its "
        "end-to-end datagrams)",
        labels,
        lk.get("bytes_received"),
    )


def _handshakes(f: _Families, links: Mapping[str, Any]) -> None:
    for event, count in sorted(links.items()):
        if event == "refused":
            for reason, n in sorted((count or {}).items()):
                f.counter(
                    "autovn_handshakes_refused",
                    "handshake datagrams refused, by reason",
                    {"reason": str(reason)},
                    n,
                )
        else:
            f.counter(
                "autovn_handshake_events",
                "handshake messages and outcomes, by event",
                {"event": str(event)},
                count,
            )


def _split(
    f: _Families,
    prefix: str,
    what: str,
    counters: Mapping[str, Any],
    failure: Callable[[str], bool],
) -> None:
    """A core's counters: ``sent_<type>``/``received_<type>`` as messages by direction and type,
    failures by reason, the rest as events."""
    for key, count in sorted(counters.items()):
        if key.startswith("sent_") or key.startswith("received_"):
            direction, _, kind = key.partition("_")
            f.counter(
                f"{prefix}_messages",
                f"{what} messages, by direction and type",
                {"direction": direction, "type": kind},
                count,
            )
        elif failure(key):
            f.counter(
                f"{prefix}_failures",
                f"{what} failures and drops, by reason",
                {"reason": key},
                count,
            )
        else:
            f.counter(f"{prefix}_events", f"other {what} counters, by event", {"event": key}, count)


def _overlay(f: _Families, ov: Mapping[str, Any]) -> None:
    f.gauge(
        "autovn_overlay_joined",
        "1 once the node has its place on the overlay",
        {},
        ov.get("state") == "joined",
    )
    f.gauge(
        "autovn_overlay_address_registered",
        "1 while this node's address record is in the DHT",
        {},
        ov.get("registered"),
    )
    f.gauge(
        "autovn_overlay_estimated_nodes",
        "the overlay's size as this node estimates it",
        {},
        ov.get("estimated_size"),
    )
    f.gauge(
        "autovn_overlay_resolved_routes",
        "virtual addresses resolved through the DHT",
        {},
        ov.get("routes"),
    )
    core = dict(ov.get("overlay") or {})
    for key in list(core):
        if key.startswith("connections_") and not key.startswith(
            ("connections_added", "connections_removed")
        ):
            f.gauge(
                "autovn_overlay_connections",
                "overlay connections, by kind",
                {"kind": key.removeprefix("connections_")},
                core.pop(key),
            )
    core.pop("estimated_size", None)
    for direction in ("sent", "received"):
        f.counter(
            "autovn_overlay_bytes",
            "overlay message bytes, by direction",
            {"direction": direction},
            core.pop(f"bytes_{direction}", None),
        )
    _split(
        f, "autovn_overlay", "overlay", core, lambda k: k.startswith(("dropped_", "route_failed"))
    )
    _split(
        f,
        "autovn_dht",
        "DHT",
        ov.get("dht") or {},
        lambda k: k in DHT_FAILURES or k.startswith(("dropped_", "refused_")),
    )
    for event, count in sorted((ov.get("counters") or {}).items()):
        f.counter(
            "autovn_routing_events",
            "control's glue of links, overlay, DHT and routes, by event",
            {"event": str(event)},
            count,
        )


def _addressing(f: _Families, ad: Mapping[str, Any]) -> None:
    states: dict[str, int] = {}
    for lease in ad.get("leases") or []:
        states[str(lease.get("state"))] = states.get(str(lease.get("state")), 0) + 1
    for state, n in sorted(states.items()):
        f.gauge(
            "autovn_dhcp_leases",
            "DHCP leases this node holds for its clients, by state",
            {"state": state},
            n,
        )
    if "dhcp" in ad:
        _split(f, "autovn_dhcp", "DHCP", ad.get("dhcp") or {}, lambda k: k.startswith("dropped_"))
    dns = ad.get("dns") or {}
    f.counter("autovn_dns_queries", "DNS queries to the virtual gateway", {}, dns.get("queries"))
    for key, count in sorted(dns.items()):
        if key.startswith("answered_"):
            f.counter(
                "autovn_dns_answers",
                "DNS answers, by response code",
                {"rcode": key.removeprefix("answered_")},
                count,
            )


class StatusCollector(Collector):
    """Metrics from the latest status snapshot: ``snapshot()`` returns it (None: not yet)."""

    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        st = self.snapshot()
        if st is not None:
            yield from families(st)


class MetricsServer:
    """prometheus-client's HTTP server for one node, in its own daemon thread."""

    def __init__(self, endpoint: Endpoint, snapshot: Callable[[], Snapshot | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(snapshot))
        self.server, self.thread = start_http_server(
            endpoint.port, str(endpoint.host), registry=self.registry
        )
        self.address = f"{endpoint.host}:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


__all__ = ["MetricsServer", "StatusCollector", "families"]
