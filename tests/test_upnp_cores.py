"""UPnP IGD port mapping without a network: ``PortMapper``'s UPnP policy driven by hand
(the commands it hands out, the results it takes, on an explicit clock), the way it reaches
the control core (a MAPPED candidate, netcheck, status, the delete at stop), and the
driver's thread (``UpnpClient``) with a fake miniupnpc."""

from __future__ import annotations

import random
import select
import threading
import time
from ipaddress import IPv4Network
from typing import Any

import pytest

from pipeline.control import events as ev
from pipeline.control.core import ControlCore, ControlSettings, Credentials
from pipeline.control.nat import (
    Mapping,
    MappingChanged,
    MappingDeleted,
    MappingFailed,
    MappingLost,
    Phase,
    PortMapper,
    PortMapSettings,
    Protocol,
    UpnpDelete,
    UpnpMap,
    UpnpResult,
)
from pipeline.control.nat.upnp import MAX_LEASE_S, igd_gone, reason
from pipeline.control.upnp_client import UpnpClient
from pipeline.crypto.cert import RevocationList
from pipeline.wire import pcp
from tests.test_links import WALL, ca_pair, member, rng_from

GATEWAY = "198.19.1.1"
CLIENT = ("198.19.1.10", 40000)
WAN = "198.18.90.11"


def upnp_mapper(**settings: Any) -> PortMapper:
    chosen = PortMapSettings(**({"protocols": (Protocol.UPNP,)} | settings))
    return PortMapper(GATEWAY, CLIENT, 0.0, random.Random(3), chosen)


def one(m: PortMapper) -> UpnpMap | UpnpDelete:
    (command,) = m.upnp_to_run()
    return command


def ok(command: UpnpMap | UpnpDelete, lease: int | None = None) -> UpnpResult:
    if isinstance(command, UpnpMap):
        return UpnpResult(command.id, True, WAN, command.lease_s if lease is None else lease)
    return UpnpResult(command.id, True)


def failed(command: UpnpMap | UpnpDelete, why: str) -> UpnpResult:
    return UpnpResult(command.id, False, error=why)


# ----------------------------------------------------------------------------------------------
# what an IGD's error means


def test_reasons() -> None:
    assert reason("ConflictInMappingEntry") == "conflict"
    assert reason("OnlyPermanentLeasesSupported") == "only_permanent_leases"
    assert reason("Miniupnpc HTTP error") == "http_error"
    assert reason("Action not authorized") == "not_authorized"
    assert reason("Some Vendor's Own Error!") == "some_vendor_s_own_error"
    assert reason("") == "unknown_error"
    assert igd_gone("http_error") and igd_gone("no_igd")
    assert not igd_gone("conflict") and not igd_gone("not_authorized")


# ----------------------------------------------------------------------------------------------
# PortMapper's UPnP policy


def test_upnp_alone_maps_the_node_s_port_with_a_lease() -> None:
    m = upnp_mapper()
    assert m.datagrams_to_send() == []  # no PCP, no NAT-PMP
    command = one(m)
    assert command == UpnpMap(command.id, CLIENT, 40000, 7200, "autovn")
    assert m.phase is Phase.ASKING and m.next_deadline() == 20.0  # upnp_timeout_s
    assert m.receive_upnp(ok(command, lease=7199), 2.5)
    mapping = Mapping(Protocol.UPNP, (WAN, 40000), 40000, 7199, 2.5)
    assert m.mapping == mapping and m.events() == [MappingChanged(mapping)]
    assert m.next_deadline() == 2.5 + 7199 / 2  # renewed at half the lease granted


def test_renewal_asks_again_for_the_held_port() -> None:
    m = upnp_mapper(lifetime_s=600)
    m.receive_upnp(ok(one(m)), 1.0)
    m.events()
    m.handle_timer(300.9)
    assert m.upnp_to_run() == []
    m.handle_timer(301.0)
    renewal = one(m)
    assert isinstance(renewal, UpnpMap)
    assert (renewal.external_port, renewal.lease_s) == (40000, 600)
    assert m.next_deadline() == 321.0  # the renewal's own timeout comes before the expiry
    assert m.receive_upnp(ok(renewal), 302.0)
    assert m.events() == [] and m.mapping is not None and m.mapping.obtained_at == 302.0
    assert m.statistics()["renewals"] == 1


def test_the_lease_asked_for_is_at_most_a_week_and_the_granted_one_is_capped() -> None:
    m = upnp_mapper(lifetime_s=30 * 86400)
    command = one(m)
    assert isinstance(command, UpnpMap) and command.lease_s == MAX_LEASE_S
    m = upnp_mapper(lifetime_s=600)
    m.receive_upnp(ok(one(m), lease=MAX_LEASE_S), 0.0)  # more than asked: renewed as asked
    assert m.mapping is not None and m.mapping.lifetime_s == 600


def test_an_igd_with_only_permanent_leases_gets_lease_0_and_is_checked_all_the_same() -> None:
    m = upnp_mapper(lifetime_s=600)
    first = one(m)
    m.receive_upnp(failed(first, "only_permanent_leases"), 0.5)
    again = one(m)
    assert isinstance(again, UpnpMap) and again.lease_s == 0 and again.external_port == 40000
    assert m.receive_upnp(ok(again, lease=0), 0.6)
    mapping = m.mapping
    assert mapping is not None and mapping.permanent and mapping.lifetime_s == 0
    assert m.events() == [MappingChanged(mapping)]
    assert m.next_deadline() == 300.6  # no expiry: only the check at lifetime_s / 2
    m.handle_timer(300.6)
    check = one(m)
    assert isinstance(check, UpnpMap) and check.lease_s == 0  # permanent for the mapper's life
    m.handle_timer(320.6)  # the check timed out: again halfway through lifetime_s
    assert m.phase is Phase.MAPPED and m.next_deadline() == 620.6
    assert m.statistics()["upnp_permanent"] == 1


def test_a_conflict_tries_other_ports_then_gives_up() -> None:
    m = upnp_mapper(upnp_port_tries=3)
    ports = []
    for t in (0.1, 0.2, 0.3):
        command = one(m)
        assert isinstance(command, UpnpMap)
        ports.append(command.external_port)
        m.receive_upnp(failed(command, "conflict"), t)
    assert ports[0] == 40000 and len(set(ports)) == 3
    assert all(1024 <= p < 65536 for p in ports)
    assert m.phase is Phase.FAILED
    assert m.events() == [MappingFailed(((Protocol.UPNP, "conflict"),), 300.3)]
    assert m.statistics()["upnp_conflicts"] == 3


def test_a_conflict_resolved_on_another_port() -> None:
    m = upnp_mapper()
    m.receive_upnp(failed(one(m), "conflict"), 0.1)
    other = one(m)
    assert isinstance(other, UpnpMap) and other.external_port != 40000
    m.receive_upnp(ok(other), 0.2)
    assert m.mapping is not None and m.mapping.external == (WAN, other.external_port)


def test_upnp_after_pcp_and_natpmp_fail() -> None:
    m = upnp_mapper(protocols=(Protocol.PCP, Protocol.NATPMP, Protocol.UPNP))
    assert m.upnp_to_run() == [] and len(m.datagrams_to_send()) == 1  # PCP first
    for t in (0.25, 0.75, 1.75, 2.0, 2.5, 3.5):
        m.handle_timer(t)
    m.datagrams_to_send()
    command = one(m)  # NAT-PMP gave up at 3.5: UPnP at once
    assert isinstance(command, UpnpMap)
    m.receive_upnp(ok(command), 5.0)
    assert m.mapping is not None and m.mapping.protocol is Protocol.UPNP
    assert m.statistics()["timeouts"] == 2


def test_every_protocol_failing_names_upnp_s_reason_and_retries() -> None:
    m = upnp_mapper(protocols=(Protocol.NATPMP, Protocol.UPNP), retry_s=60.0)
    for t in (0.25, 0.75, 1.75):
        m.handle_timer(t)
    m.receive_upnp(failed(one(m), "no_igd"), 4.0)
    assert m.events() == [
        MappingFailed(((Protocol.NATPMP, "timeout"), (Protocol.UPNP, "no_igd")), 64.0)
    ]
    assert m.statistics()["refused_no_igd"] == 1
    m.datagrams_to_send()
    m.handle_timer(64.0)
    assert len(m.datagrams_to_send()) == 2  # a new round, NAT-PMP first


def test_a_silent_driver_times_out_and_a_late_success_is_deleted() -> None:
    m = upnp_mapper(protocols=(Protocol.UPNP, Protocol.PCP))
    late = one(m)
    m.handle_timer(20.0)  # given up on: PCP next
    assert m.statistics()["timeouts"] == 1
    (request, _), *_ = m.datagrams_to_send()
    assert m.receive_upnp(ok(late), 21.0)  # it mapped after all: not wanted any more
    (cleanup,) = m.upnp_to_run()
    assert cleanup == UpnpDelete(cleanup.id, CLIENT, 40000)
    assert m.statistics()["upnp_late"] == 1
    assert m.phase is Phase.ASKING and m.mapping is None
    assert not m.receive_upnp(ok(late), 22.0)  # once
    assert not m.receive_upnp(UpnpResult(12345, True, WAN, 60), 22.0)  # not this mapper's
    assert isinstance(pcp.parse_request(request), pcp.MapRequest)


def test_a_late_renewal_of_the_held_port_is_kept() -> None:
    m = upnp_mapper(lifetime_s=600)
    m.receive_upnp(ok(one(m)), 0.0)
    m.handle_timer(300.0)
    renewal = one(m)
    m.handle_timer(320.0)  # given up: tried again halfway to the expiry
    assert m.phase is Phase.MAPPED and m.next_deadline() == 460.0
    m.receive_upnp(ok(renewal), 321.0)
    assert m.upnp_to_run() == []  # the port it holds: no delete


def test_a_refused_renewal_loses_the_mapping_and_asks_again() -> None:
    m = upnp_mapper(lifetime_s=600)
    m.receive_upnp(ok(one(m)), 0.0)
    m.events()
    m.handle_timer(300.0)
    m.receive_upnp(failed(one(m), "conflict"), 300.5)  # another host has taken the port
    assert m.events() == [MappingLost(Protocol.UPNP, "conflict")]
    again = one(m)
    assert isinstance(again, UpnpMap) and again.external_port == 40000


def test_stop_deletes_the_mapping() -> None:
    m = upnp_mapper()
    m.receive_upnp(ok(one(m)), 0.0)
    m.events()
    m.stop(10.0)
    delete = one(m)
    assert delete == UpnpDelete(delete.id, CLIENT, 40000)
    assert m.phase is Phase.STOPPING and m.next_deadline() == 30.0
    assert m.receive_upnp(ok(delete), 10.1)
    assert m.events() == [MappingDeleted(Protocol.UPNP, True)] and m.done


def test_stop_while_asking_deletes_what_is_being_asked_for_once() -> None:
    m = upnp_mapper()
    asked = one(m)
    m.stop(1.0)
    delete = one(m)
    assert delete == UpnpDelete(delete.id, CLIENT, 40000)
    assert m.receive_upnp(ok(asked), 1.5)  # the map ran first (the driver keeps the order)
    assert m.upnp_to_run() == []  # the delete queued behind it covers it
    m.receive_upnp(failed(delete, "http_error"), 1.6)
    assert m.events() == [MappingDeleted(Protocol.UPNP, False)] and m.done


def test_stop_with_a_silent_driver_gives_up() -> None:
    m = upnp_mapper()
    m.receive_upnp(ok(one(m)), 0.0)
    m.events()
    m.stop(10.0)
    one(m)
    m.handle_timer(30.0)
    assert m.events() == [MappingDeleted(Protocol.UPNP, False)] and m.done


def test_stop_after_every_protocol_failed_deletes_nothing() -> None:
    m = upnp_mapper()
    m.receive_upnp(failed(one(m), "no_igd"), 0.5)
    m.stop(1.0)
    assert m.done and m.upnp_to_run() == []


# ----------------------------------------------------------------------------------------------
# in the control core


def encrypted_core(protocols: tuple[str, ...] = ("upnp",)) -> ControlCore:
    ca, ca_cert = ca_pair()
    ident, cert = member(ca, ca_cert, 40, "a")
    settings = ControlSettings(
        node_name="a",
        namespace="lab",
        subnet=IPv4Network("100.64.0.0/24"),
        address=None,
        listen_port=4789,
        port_mapping=True,
        port_mapping_protocols=protocols,
    )
    return ControlCore(
        settings,
        credentials=Credentials(ident, cert, ca_cert, RevocationList.empty()),
        rng=random.Random(1),
        entropy=rng_from(60),
        epoch=7,
        now=100.0,
    )


def test_the_core_advertises_a_upnp_mapping_and_gives_it_back() -> None:
    core = encrypted_core()
    core.set_local_addresses(["198.19.1.10"], GATEWAY, 100.0, WALL)
    assert core.portmap_to_send() == []
    (command,) = core.upnp_to_run()
    assert command == UpnpMap(command.id, ("198.19.1.10", 4789), 4789, 7200, "autovn a")
    core.receive_upnp(UpnpResult(command.id, True, WAN, 7200), 102.0, WALL)
    assert core.nat is not None
    assert f"{WAN}:4789 mapped" in core.nat.picture()["candidates"]
    events = [e for e in core.events() if isinstance(e, ev.PortMapped)]
    assert [(e.protocol, e.external) for e in events] == [("upnp", f"{WAN}:4789")]
    status = core.status(103.0)["port_mapping"]
    assert status["protocol"] == "upnp" and status["external"] == f"{WAN}:4789"
    assert status["protocols"] == ["upnp"] and status["lifetime_s"] == 7200
    assert status["statistics"]["mapped_upnp"] == 1
    core.stop(200.0, WALL)
    (delete,) = core.upnp_to_run()
    assert delete == UpnpDelete(delete.id, ("198.19.1.10", 4789), 4789)
    core.receive_upnp(UpnpResult(delete.id, True), 200.1, WALL)
    unmapped = [e for e in core.events() if isinstance(e, ev.PortUnmapped)]
    assert [(e.protocol, e.confirmed) for e in unmapped] == [("upnp", True)]
    core.receive_upnp(UpnpResult(99, True), 200.2, WALL)
    assert core.counters["upnp_unexpected"] == 1


def test_a_move_deletes_the_old_mapping_before_the_new_one_is_asked_for() -> None:
    core = encrypted_core()
    core.set_local_addresses(["198.19.1.10"], GATEWAY, 100.0, WALL)
    (first,) = core.upnp_to_run()
    core.receive_upnp(UpnpResult(first.id, True, WAN, 7200), 101.0, WALL)
    core.set_local_addresses(["198.19.1.77"], GATEWAY, 110.0, WALL)
    delete, again = core.upnp_to_run()
    assert isinstance(delete, UpnpDelete) and delete.internal == ("198.19.1.10", 4789)
    assert isinstance(again, UpnpMap) and again.internal == ("198.19.1.77", 4789)


# ----------------------------------------------------------------------------------------------
# the driver's thread, with a fake miniupnpc


class FakeIgd:
    """miniupnpc.UPnP's calls used by UpnpClient, against a table of mappings."""

    instances: list[FakeIgd] = []

    def __init__(self, multicastif: str, *, devices: int = 1, fail: str = "") -> None:
        self.multicastif = multicastif
        self.devices = devices
        self.fail = fail
        self.table: dict[int, tuple[str, int, str, bool, int]] = {}
        self.calls: list[str] = []
        self.thread = ""
        FakeIgd.instances.append(self)

    def discover(self) -> int:
        self.thread = threading.current_thread().name
        self.calls.append("discover")
        time.sleep(0.05)  # a blocking call, off the caller's thread
        if not self.devices:
            raise Exception("Success")  # what miniupnpc says when nothing answered
        return self.devices

    def selectigd(self) -> str:
        self.calls.append("selectigd")
        return "http://198.19.1.1:5000/ctl/IPConn"

    def externalipaddress(self) -> str:
        self.calls.append("externalipaddress")
        return WAN

    def addportmapping(
        self, ext: int, proto: str, host: str, port: int, desc: str, remote: str, lease: int
    ) -> bool:
        self.calls.append(f"add {ext} {lease}")
        if self.fail:
            raise Exception(self.fail)
        self.table[ext] = (host, port, desc, True, lease or MAX_LEASE_S)
        return True

    def getspecificportmapping(self, ext: int, proto: str) -> tuple[Any, ...] | None:
        return self.table.get(ext)

    def deleteportmapping(self, ext: int, proto: str, remote: str) -> bool:
        self.calls.append(f"delete {ext}")
        del self.table[ext]
        return True


def wait_results(client: UpnpClient, count: int) -> list[UpnpResult]:
    got: list[UpnpResult] = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        select.select([client.fileno()], [], [], 0.5)  # what the worker's epoll does
        got += client.results()
    return got


@pytest.fixture
def fake() -> Any:
    FakeIgd.instances = []
    return FakeIgd


def test_client_maps_and_deletes_in_its_own_thread(fake: Any) -> None:
    client = UpnpClient(lambda interface: fake(interface))
    assert client._thread is None  # no thread until there is something to do
    client.submit(UpnpMap(1, CLIENT, 40000, 3600, "autovn a"))
    client.submit(UpnpDelete(2, CLIENT, 40000))
    assert wait_results(client, 2) == [UpnpResult(1, True, WAN, 3600), UpnpResult(2, True)]
    (igd,) = fake.instances  # one discovery, kept
    assert igd.multicastif == "198.19.1.10" and igd.thread == "upnp"
    assert igd.calls == [
        "discover", "selectigd", "externalipaddress", "add 40000 3600", "delete 40000"
    ]  # fmt: skip
    assert client.statistics() == {"commands": 2, "discoveries": 1, "mapped": 1, "deleted": 1}
    assert client.close(1.0) == []


def test_client_reports_failures_as_reasons(fake: Any) -> None:
    client = UpnpClient(lambda interface: fake(interface, fail="ConflictInMappingEntry"))
    client.submit(UpnpMap(1, CLIENT, 40000, 3600, "autovn"))
    client.submit(UpnpDelete(2, CLIENT, 40000))  # nothing there: already gone
    assert wait_results(client, 2) == [
        UpnpResult(1, False, error="conflict"),
        UpnpResult(2, True),
    ]
    assert len(fake.instances) == 1  # a conflict says nothing against the IGD
    client.close(1.0)


def test_client_without_an_igd_discovers_again_next_time(fake: Any) -> None:
    client = UpnpClient(lambda interface: fake(interface, devices=0))
    client.submit(UpnpMap(1, CLIENT, 40000, 3600, "autovn"))
    client.submit(UpnpMap(2, CLIENT, 40000, 3600, "autovn"))
    assert [r.error for r in wait_results(client, 2)] == ["no_igd", "no_igd"]
    assert len(fake.instances) == 2
    assert client.statistics()["failed_no_igd"] == 2
    client.close(1.0)


def test_client_does_not_discover_to_delete_what_it_never_mapped(fake: Any) -> None:
    client = UpnpClient(lambda interface: fake(interface, devices=0))
    client.submit(UpnpMap(1, CLIENT, 40000, 3600, "autovn"))
    client.submit(UpnpDelete(2, CLIENT, 40000))  # the node stops behind a gateway without IGD
    assert [r.error for r in wait_results(client, 2)] == ["no_igd", "no_igd"]
    assert len(fake.instances) == 1 and client.statistics()["discoveries"] == 1
    client.close(1.0)


def test_client_leaves_another_host_s_mapping_alone(fake: Any) -> None:
    igd = fake("198.19.1.10")
    igd.table[40000] = ("198.19.1.99", 40000, "theirs", True, 600)
    client = UpnpClient(lambda interface: igd)
    client.submit(UpnpMap(1, ("198.19.1.10", 40001), 40001, 600, "autovn"))
    client.submit(UpnpDelete(2, CLIENT, 40000))
    assert wait_results(client, 2)[1] == UpnpResult(2, False, error="not_ours")
    assert 40000 in igd.table
    client.close(1.0)


def test_close_lets_the_last_delete_finish_and_hands_its_result_back(fake: Any) -> None:
    client = UpnpClient(lambda interface: fake(interface))
    client.submit(UpnpMap(1, CLIENT, 40000, 3600, "autovn"))
    client.submit(UpnpDelete(2, CLIENT, 40000))
    results = client.close(5.0)  # not taken before: handed back by close
    assert results == [UpnpResult(1, True, WAN, 3600), UpnpResult(2, True)]
    client.submit(UpnpMap(3, CLIENT, 40000, 3600, "autovn"))  # closed: ignored
    assert fake.instances[0].table == {}


def test_close_does_not_wait_for_ever_on_a_stuck_call() -> None:
    release = threading.Event()

    class Stuck(FakeIgd):
        def discover(self) -> int:
            release.wait(10)
            return 1

    client = UpnpClient(lambda interface: Stuck(interface))
    client.submit(UpnpMap(1, CLIENT, 40000, 3600, "autovn"))
    started = time.monotonic()
    assert client.close(0.2) == []
    assert time.monotonic() - started < 2
    assert client.statistics()["unfinished_at_close"] == 1
    release.set()


def test_the_mapper_and_the_client_together(fake: Any) -> None:
    """The policy and the thread, as the control worker joins them (minus its loop)."""
    client = UpnpClient(lambda interface: fake(interface))
    m = upnp_mapper()
    for command in m.upnp_to_run():
        client.submit(command)
    for result in wait_results(client, 1):
        assert m.receive_upnp(result, 1.0)
    assert m.mapping == Mapping(Protocol.UPNP, (WAN, 40000), 40000, 7200, 1.0)
    m.stop(2.0)
    for command in m.upnp_to_run():
        client.submit(command)
    for result in client.close(5.0):
        m.receive_upnp(result, 2.5)
    assert m.done and MappingDeleted(Protocol.UPNP, True) in m.events()
    assert fake.instances[0].table == {}


def test_netcheck_names_the_protocol_that_answered_and_the_order() -> None:
    from supervisor.cli import format_netcheck

    picture = {
        "encrypted": True,
        "port_mapping": {"enabled": True, "protocols": ["pcp", "nat-pmp", "upnp"],
                         "protocol": "upnp", "external": f"{WAN}:4789", "lifetime_s": 7200},
    }  # fmt: skip
    lines = format_netcheck(picture).splitlines()
    assert f"port mapping        {WAN}:4789 (upnp, lease 7200 s)" in lines
    assert "  asks               pcp, nat-pmp, upnp, in this order" in lines
    failed = picture["port_mapping"] | {"protocol": None, "external": None}
    assert "port mapping        - (none answered)" in format_netcheck(
        picture | {"port_mapping": failed}
    )
