"""Autonomic addressing on the TAP side of a node: DHCP, DNS and frames waiting for a route.
Sans-I/O. Pure.

Theory of operation:

- **DHCP.** Without a static address the node answers its own DHCP client (frames to UDP
  port 67 from the TAP) with ``DhcpServer``: the address it offers is won with a DHT create
  of ``ip:<namespace>:<address>`` naming this node (the server's ``Claim``s; a lost create
  moves to the next candidate; claims wait until the node is on the overlay's circle
  (``RoutingCore.joined``: its first near connection, before ``Joined``), so a
  client that starts with the node is not offered a candidate the DHT never saw), renewals
  renew the record, a release deletes it. The
  granted address becomes the node's address (``ControlCore.set_address``) and the
  driver persists it, so a restarted node asks for it first.
- **Host names.** The node registers ``name:<namespace>:<label>`` (the 4 bytes of its
  address, signed by it) for its node name and for the host name its DHCP client sent,
  once it has an address; the DHT renews them.
- **DNS.** Queries to the virtual gateway's port 53 go to ``DnsResponder``; the lookups it
  asks for are DHT gets of ``name:`` keys, answered from records whose value is an address.
- **Frames waiting for a route.** An IP packet to an address without a route (the
  classifier's RESOLVE) waits here while ``ControlCore`` resolves the address (at most
  ``WAIT_PER_ADDRESS`` packets an address, ``WAIT_ADDRESSES`` addresses, ``WAIT_S``
  seconds); it is then sent on the route's link, or dropped with an ICMP host unreachable
  to its sender (at most ``ICMP_PER_S`` a second) when the address did not resolve.
- **Senders not yet known.** A packet from a peer whose source address has no route here
  (the classifier's VERIFY: the first packet of a node that resolved us) waits the same way
  while that address resolves; it reaches the TAP only if the address belongs to the node
  of the link it came on, and is a counted drop (a spoofed source) otherwise. One link's
  packets may keep at most ``MEMBER_UNKNOWN`` such sources resolving at once (of the
  ``WAIT_ADDRESSES``; ``dropped_member_resolves`` beyond), so one member cannot take every
  resolution from the others.

Inputs: ``frame_from_tap(frame, now)``, ``packet_to_resolve(packet, now, wall)``,
``packet_from_unknown(slot, packet, now, wall)``,
``dht_result(event, now)`` (every DHT result the core did not take; True if it was ours),
``handle_timer(now, wall)``. Outputs: ``frames_to_tap()``, ``packets_to_send()`` (slot,
packet), ``events()`` (for the log; ``lease_granted`` carries the address to persist),
``next_deadline()``, ``statistics()``.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import msgspec

from pipeline.control import events as ev
from pipeline.control.dhcp import (
    Claim,
    DhcpServer,
    DhcpSettings,
    LeaseExpired,
    LeaseGranted,
    LeaseReleased,
    LeaseRenewed,
    LeaseRevoked,
    Release,
)
from pipeline.control.dht import CreateResult, DhtEvent, GetResult, LeaseLost
from pipeline.control.dns import DnsResponder, DnsSettings, host_key, host_label
from pipeline.control.routing import RoutingCore
from pipeline.errors import RemoteProtocolError
from pipeline.wire import ethernet, ipv4, udp

WAIT_S = 1.0
WAIT_PER_ADDRESS = 16
WAIT_ADDRESSES = 256
MEMBER_UNKNOWN = 32  # sources one link's packets may have us resolving at once (of the 256)
ICMP_PER_S = 10
NAME_LEASE_S = 600.0
STATIC_RETRY_S = 60.0
DNS_PORT = 53

Client = tuple[IPv4Address, int, bytes]  # a DNS client: address, port, MAC


class AddressingSettings(msgspec.Struct, frozen=True):
    subnet: IPv4Network
    gateway: IPv4Address
    domain: str
    namespace: str
    node_name: str
    tap_mac: bytes
    gateway_mac: bytes
    mtu: int
    dhcp: bool  # no static address: serve DHCP to the TAP
    dhcp_lease_s: int = 3600
    router: bool = False  # the TAP is a port of a segment: one lease per machine (MAC)
    dhcp_port: int = 67
    allowed_macs: frozenset[bytes] | None = None  # router mode: the only machines served
    allow_static: bool = False  # router mode: register machines with addresses of their own
    max_machines: int = 1024


class Addressing:
    def __init__(
        self,
        core: RoutingCore,
        settings: AddressingSettings,
        *,
        rng: random.Random,
        preferred: IPv4Address | None = None,
    ) -> None:
        self.core = core
        self.settings = settings
        s = settings
        self.dhcp: DhcpServer | None = None
        if s.dhcp:
            self.dhcp = DhcpServer(
                DhcpSettings(
                    subnet=s.subnet,
                    server_address=s.gateway,
                    namespace=s.namespace,
                    node_id=core.identity.node_id,
                    domain=s.domain,
                    mtu=s.mtu,
                    lease_s=s.dhcp_lease_s,
                    server_port=s.dhcp_port,
                    max_clients=s.max_machines if s.router else 1,
                    allowed_macs=s.allowed_macs,
                ),
                rng=random.Random(rng.getrandbits(64)),
            )
            if preferred is not None:
                self.dhcp.preferred(preferred)
        self.dns: DnsResponder[Client] = DnsResponder(
            DnsSettings(domain=s.domain, subnet=s.subnet, namespace=s.namespace)
        )
        self.counters: Counter[str] = Counter()
        self._claims: dict[int, Claim] = {}  # DHT request id -> the DHCP claim it carries
        self._deferred: list[Claim | Release] = []  # made before the overlay was joined
        self._lookups: dict[int, int] = {}  # DHT request id -> DNS lookup token
        self._names: dict[int, str] = {}  # DHT request id -> host label being registered
        self._other: set[int] = set()  # our DHT requests whose results need no action
        self._registered: dict[str, IPv4Address] = {}  # host label -> address registered
        # router mode: the machines behind this node, by leased address
        self.machines: dict[IPv4Address, Machine] = {}
        self.machines_version = 0
        self._restored: list[tuple[bytes, IPv4Address]] = []  # records to renew once joined
        self._static: dict[int, Machine] = {}  # DHT request id -> a static address being claimed
        self._static_refused: dict[IPv4Address, float] = {}  # held by another node: until
        self._hostname: str | None = None  # the DHCP client's host name
        self._waiting: dict[IPv4Address, deque[tuple[float, bytes]]] = {}
        self._unknown: dict[IPv4Address, deque[tuple[float, int, bytes]]] = {}
        self._unknown_by: dict[IPv4Address, int] = {}  # the link whose packet asked first
        self._unknown_per_link: Counter[int] = Counter()
        self._tap_out: list[bytes] = []
        self._send_out: list[tuple[int, bytes]] = []
        self._events: list[ev.ControlEvent] = []
        self._icmp_window = 0.0
        self._icmp_sent = 0
        self._now = 0.0
        self._wall = 0.0

    # -- outputs ---------------------------------------------------------------------------------

    def frames_to_tap(self) -> list[bytes]:
        out, self._tap_out = self._tap_out, []
        return out

    def packets_to_send(self) -> list[tuple[int, bytes]]:
        out, self._send_out = self._send_out, []
        return out

    def events(self) -> list[ev.ControlEvent]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        times = [self.dns.next_deadline()]
        if self.dhcp is not None:
            times.append(self.dhcp.next_deadline())
        times += [q[0][0] + WAIT_S for q in self._waiting.values() if q]
        times += [q[0][0] + WAIT_S for q in self._unknown.values() if q]
        lease = self.settings.dhcp_lease_s
        times += [
            max(m.since, m.renewed) + lease
            for m in self.machines.values()
            if m.restored and not m.static
        ]
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "counters": dict(self.counters),
            "waiting": sum(len(q) for q in self._waiting.values()),
            "dns": self.dns.statistics(),
            "names": {label: str(a) for label, a in self._registered.items()},
        }
        if self.settings.router:
            out["machines"] = [
                {
                    "address": str(m.address),
                    "mac": m.mac.hex(":"),
                    "hostname": m.hostname,
                    "lease_age_s": round(self._now - m.since, 1),
                    "static": m.static,
                }
                for m in sorted(self.machines.values(), key=lambda m: m.address)
            ]
        if self.dhcp is not None:
            out["dhcp"] = self.dhcp.statistics()
            out["leases"] = [
                {k: str(v) if isinstance(v, IPv4Address | bytes) else v for k, v in row.items()}
                for row in (msgspec.structs.asdict(lease) for lease in self.dhcp.leases())
            ]
        return out

    # -- inputs ----------------------------------------------------------------------------------

    def frame_from_tap(self, frame: bytes | memoryview, now: float) -> None:
        """A frame the classifier handed over: DHCP to port 67, or DNS to the gateway."""
        self._now = now
        try:
            eth = ethernet.parse(frame)
            packet = memoryview(frame)[ethernet.HEADER_LEN :]
            ip = ipv4.parse(packet)
            datagram = packet[ip.header_length : ip.total_length]
            header = udp.parse(datagram)
        except RemoteProtocolError as exc:
            self.counters[f"dropped_{exc.reason}"] += 1
            return
        if header.dst_port == self.settings.dhcp_port:
            if self.dhcp is None:
                self.counters["dhcp_not_served"] += 1  # a static address: no DHCP here
                return
            self.dhcp.receive_frame(frame, now)
        elif header.dst_port == DNS_PORT and ip.dst == self.settings.gateway:
            client: Client = (ip.src, header.src_port, bytes(eth.src))
            self.dns.receive(datagram[udp.HEADER_LEN :], client, now)
        else:
            self.counters["dropped_not_for_us"] += 1
            return
        self._pump()

    def packet_to_resolve(self, packet: bytes | memoryview, now: float, wall: float) -> None:
        """An IP packet to an address without a route: hold it while the address resolves."""
        self._now, self._wall = now, wall
        if len(packet) < 20:
            self.counters["dropped_short_packet"] += 1
            return
        dst = IPv4Address(bytes(packet[16:20]))
        slot = self.core.route_slot(dst)
        if slot is not None:  # the route came after the classifier's table was made
            self._send_out.append((slot, bytes(packet)))
            return
        queue = self._waiting.get(dst)
        if queue is None:
            if len(self._waiting) >= WAIT_ADDRESSES:
                self.counters["dropped_too_many_waiting"] += 1
                return
            queue = self._waiting[dst] = deque(maxlen=WAIT_PER_ADDRESS)
        if len(queue) == WAIT_PER_ADDRESS:
            self.counters["dropped_wait_full"] += 1
        queue.append((now, bytes(packet)))
        self.counters["packets_held"] += 1
        self.core.route_miss(dst, now, wall)
        self._flush_waiting()

    def packet_from_unknown(self, slot: int, packet: bytes, now: float, wall: float) -> None:
        """A packet from link ``slot`` whose source has no route: deliver it once the source
        resolves to that link's node."""
        self._now, self._wall = now, wall
        if len(packet) < 20:
            self.counters["dropped_short_packet"] += 1
            return
        src = IPv4Address(packet[12:16])
        queue = self._unknown.get(src)
        if queue is None:
            if self._unknown_per_link[slot] >= MEMBER_UNKNOWN:
                # one member cannot take every resolution slot from the others
                self.counters["dropped_member_resolves"] += 1
                return
            if len(self._unknown) >= WAIT_ADDRESSES:
                self.counters["dropped_too_many_waiting"] += 1
                return
            queue = self._unknown[src] = deque(maxlen=WAIT_PER_ADDRESS)
            self._unknown_by[src] = slot
            self._unknown_per_link[slot] += 1
        queue.append((now, slot, packet))
        self.counters["packets_verified_held"] += 1
        self.core.route_miss(src, now, wall)
        self._flush_unknown()

    def static_seen(self, frame: bytes, now: float) -> None:
        """Router mode, ``allow_static``: a frame from a machine of the subnet that holds no
        lease (the classifier's CLAIM: an IPv4 frame, or its ARP request). Its address is
        claimed in the DHT for this node and, once won, it is a machine like the leased
        ones."""
        self._now = now
        s = self.settings
        if not (s.router and s.allow_static) or len(frame) < 34:
            self.counters["dropped_static_not_allowed"] += 1
            return
        if frame[12:14] == b"\x08\x06":  # ARP: the sender's addresses
            address, mac = IPv4Address(frame[28:32]), bytes(frame[22:28])
        else:
            address, mac = IPv4Address(frame[26:30]), bytes(frame[6:12])
        pending = any(m.address == address for m in self._static.values())
        if address in self.machines or pending or self._static_refused.get(address, 0) > now:
            return
        if s.allowed_macs is not None and mac not in s.allowed_macs:
            self.counters["dropped_static_mac_not_allowed"] += 1
            return
        if self.dhcp is not None and any(lease.address == address for lease in self.dhcp.leases()):
            self.counters["dropped_static_leased_to_another"] += 1
            return
        key = f"ip:{s.namespace}:{address}".encode()
        rid = self.core.dht.create(key, self.core.identity.node_id, float(s.dhcp_lease_s), now)
        self._static[rid] = Machine(address, mac, None, now, b"static:" + mac, static=True)
        self._pump()

    def dht_result(self, event: DhtEvent, now: float) -> bool:
        """A DHT result the core did not take. True if it answered a request of ours."""
        self._now = now
        if isinstance(event, LeaseLost):
            prefix = f"ip:{self.settings.namespace}:".encode()
            if not event.key.startswith(prefix) or self.dhcp is None:
                return False
            try:
                address = IPv4Address(event.key[len(prefix) :].decode())
            except ValueError:
                return False
            self.dhcp.address_lost(None, address, now)
            self._pump()
            return True
        rid = event.request_id
        if rid in self._claims and isinstance(event, CreateResult):
            self._on_claim(self._claims.pop(rid), event, now)
        elif rid in self._lookups and isinstance(event, GetResult):
            self.dns.resolved(self._lookups.pop(rid), _address_of(event), now)
        elif rid in self._names and isinstance(event, CreateResult):
            label = self._names.pop(rid)
            if event.ok:
                held = str(self._registered.get(label))
                self._events.append(ev.NameRegistered(host=label, address=held))
            else:
                self._registered.pop(label, None)
                holder = event.holder.hex() if event.holder else None
                self._events.append(
                    ev.NameNotRegistered(host=label, reason=event.reason, holder=holder)
                )
        elif rid in self._static and isinstance(event, CreateResult):
            machine = self._static.pop(rid)
            if event.ok:
                self.machines[machine.address] = machine
                self._machines_changed()
                self._events.append(
                    ev.MachineStatic(address=str(machine.address), mac=machine.mac.hex(":"))
                )
            else:
                self._static_refused[machine.address] = now + STATIC_RETRY_S
                self.counters["static_refused"] += 1
        elif rid in self._other:
            self._other.discard(rid)
        else:
            return False
        self._pump()
        return True

    def handle_timer(self, now: float, wall: float) -> None:
        self._now, self._wall = now, wall
        if self.dhcp is not None:
            due = self.dhcp.next_deadline()
            if due is not None and due <= now:
                self.dhcp.handle_timer(now)
        due = self.dns.next_deadline()
        if due is not None and due <= now:
            self.dns.handle_timer(now)
        self._expire_waiting(now)
        self._forget_restored(now)
        for src, held in list(self._unknown.items()):
            while held and now - held[0][0] >= WAIT_S:
                held.popleft()
                self.counters["dropped_source_unresolved"] += 1
            if not held:
                self._forget_unknown(src)
        self._pump()

    # -- the glue --------------------------------------------------------------------------------

    def _pump(self) -> None:
        now = self._now
        dht = self.core.dht
        if self.dhcp is not None:
            self._tap_out += self.dhcp.reply_frames(self.settings.gateway_mac)
            self._deferred += self.dhcp.dht_requests()
            if not self.core.joined:
                requests = []  # a claim before the overlay is joined finds no replicas: wait
            else:
                requests, self._deferred = self._deferred, []
            if self.core.joined:
                for key, _ in self._restored:
                    lease = float(self.settings.dhcp_lease_s)
                    self._other.add(dht.create(key, self.core.identity.node_id, lease, now))
                    self.counters["restored_records_renewed"] += 1
                self._restored = []
            for request in requests:
                if isinstance(request, Claim):
                    rid = dht.create(request.key, request.value, request.lease_s, now)
                    self._claims[rid] = request
                elif isinstance(request, Release):
                    self._other.add(dht.delete(request.key, now))
            for event in self.dhcp.events():
                self._on_dhcp_event(event)
        for answer in self.dns.answers():
            self._tap_out.append(self._dns_frame(answer.response, answer.client))
        for lookup in self.dns.lookups():
            self._lookups[dht.get(lookup.key, now)] = lookup.token
        self._flush_waiting()
        self._flush_unknown()
        self.core.pump()

    def _on_claim(self, claim: Claim, result: CreateResult, now: float) -> None:
        assert self.dhcp is not None
        if result.ok:
            self.dhcp.address_won(claim.token, claim.address, now)
        elif result.reason == "exists":
            self.dhcp.address_lost(claim.token, claim.address, now)
        else:
            self.dhcp.claim_failed(claim.token, claim.address, now)

    def _on_dhcp_event(self, event: object) -> None:
        if self.settings.router:
            self._on_machine_event(event)
            return
        if isinstance(event, LeaseGranted):
            self._hostname = host_label(event.hostname) if event.hostname else None
            self.core.set_address(event.address)
            self._events.append(
                ev.LeaseGranted(
                    address=str(event.address),
                    mac=event.mac.hex(":"),
                    hostname=event.hostname,
                    lease_s=event.lease_s,
                )
            )
            self._events.append(ev.HoldAddress(str(event.address)))
            self._register_names()
        elif isinstance(event, LeaseRenewed):
            self.counters["leases_renewed"] += 1
        elif isinstance(event, LeaseReleased | LeaseExpired | LeaseRevoked):
            self.core.set_address(None)
            why = type(event).__name__[5:].lower()
            self._events.append(ev.LeaseEnded(address=str(event.address), why=why))
        else:
            self.counters[f"dhcp_{type(event).__name__}"] += 1

    def _on_machine_event(self, event: object) -> None:
        """Router mode: a lease is a machine behind this node, not the node's address."""
        if isinstance(event, LeaseGranted):
            label = host_label(event.hostname) if event.hostname else None
            old = self.machines.get(event.address)
            self.machines[event.address] = Machine(
                event.address, event.mac, label, self._now if old is None else old.since,
                event.client_id,
            )  # fmt: skip
            self._machines_changed()
            self._events.append(
                ev.MachineLeased(
                    address=str(event.address), mac=event.mac.hex(":"), hostname=event.hostname
                )
            )
            if label is not None:
                self._register(label, event.address)
        elif isinstance(event, LeaseRenewed):
            self.counters["leases_renewed"] += 1
            machine = self.machines.get(event.address)
            if machine is not None:
                machine.renewed = self._now
                machine.restored = False
        elif isinstance(event, LeaseReleased | LeaseExpired | LeaseRevoked):
            if self.machines.pop(event.address, None) is not None:
                self._machines_changed()
            self._events.append(
                ev.MachineGone(
                    address=str(event.address),
                    mac=event.mac.hex(":"),
                    why=type(event).__name__[5:].lower(),
                )
            )
        else:
            self.counters[f"dhcp_{type(event).__name__}"] += 1

    def _forget_restored(self, now: float) -> None:
        """A restored machine whose client did not renew within a lease: it is gone."""
        lease = self.settings.dhcp_lease_s
        for address, m in list(self.machines.items()):
            if m.static:
                continue  # claimed again by the DHT's renewals while it is ours
            if m.restored and now - m.since >= lease and now - m.renewed >= lease:
                del self.machines[address]
                self._machines_changed()
                key = f"ip:{self.settings.namespace}:{address}".encode()
                self._other.add(self.core.dht.delete(key, now))
                self._events.append(
                    ev.MachineGone(address=str(address), mac=m.mac.hex(":"), why="not_back")
                )

    def _machines_changed(self) -> None:
        """Router mode: the machines changed: the classifier learns them with the routes, and
        the state directory keeps their leases."""
        self.machines_version += 1
        leases = tuple(
            {
                "address": str(m.address),
                "mac": m.mac.hex(),
                "hostname": m.hostname,
                "client_id": m.client_id.hex(),
                "static": m.static,
            }
            for m in self.machines.values()
        )
        self._events.append(ev.HoldLeases(leases))

    def is_local(self, address: IPv4Address) -> bool:
        """Is ``address`` this node's (interface mode) or a machine's behind it (router)?"""
        if self.settings.router:
            return address in self.machines
        return address == self.core.address

    def mac_of(self, address: IPv4Address) -> bytes:
        """The MAC frames to a local address go to: the machine's, or the TAP's."""
        machine = self.machines.get(address)
        return machine.mac if machine is not None else self.settings.tap_mac

    def restore(self, machines: list[Machine]) -> None:
        """Router mode, after a restart: the machines that held leases. They keep their
        addresses (their clients renew later, or ask for the same one): traffic flows at
        once, and each address record is renewed as soon as the node has joined. A machine
        whose client does not come back within a lease is forgotten."""
        if self.dhcp is None:
            return
        for machine in machines:
            self.dhcp.preferred(machine.address, machine.client_id)
            machine.restored = True
            self.machines[machine.address] = machine
            key = f"ip:{self.settings.namespace}:{machine.address}".encode()
            self._restored.append((key, machine.address))
        if machines:
            self.machines_version += 1  # restored from the state directory: nothing to save

    def register_names(self, now: float) -> None:
        """Register this node's host names for its current address (after it changes)."""
        self._now = now
        self._register_names()
        self._pump()

    def _register_names(self) -> None:
        address = self.core.address
        if address is None:
            return
        labels = {host_label(self.settings.node_name), self._hostname} - {None}
        for label in sorted(label for label in labels if label is not None):
            self._register(label, address)

    def _register(self, label: str, address: IPv4Address) -> None:
        if self._registered.get(label) == address:
            return
        self._registered[label] = address
        key = host_key(self.settings.namespace, label)
        rid = self.core.dht.create(key, address.packed, NAME_LEASE_S, self._now)
        self._names[rid] = label

    def _dns_frame(self, response: bytes, client: Client) -> bytes:
        ip, port, mac = client
        gateway = self.settings.gateway
        datagram = udp.build(DNS_PORT, port, response, src=gateway, dst=ip)
        packet = ipv4.build(src=gateway, dst=ip, protocol=ipv4.Protocol.UDP, payload=datagram)
        return ethernet.build(mac, self.settings.gateway_mac, ethernet.ETHERTYPE_IPV4, packet)

    # -- packets waiting for a route ---------------------------------------------------------------

    def _flush_unknown(self) -> None:
        for src in list(self._unknown):
            slot = self.core.route_slot(src)
            if slot is None and not self.core.unresolvable(src, self._now):
                continue
            held = self._unknown[src]
            self._forget_unknown(src)
            for _, came_on, packet in held:
                if slot != came_on:
                    self.counters["dropped_spoofed_source"] += 1
                elif not self.is_local(IPv4Address(packet[16:20])):
                    self.counters["dropped_not_for_us"] += 1
                else:
                    mac = self.mac_of(IPv4Address(packet[16:20]))
                    header = ethernet.build(mac, self.settings.gateway_mac, ethernet.ETHERTYPE_IPV4)
                    self._tap_out.append(header + packet)
                    self.counters["packets_delivered_after_verification"] += 1

    def _forget_unknown(self, src: IPv4Address) -> None:
        del self._unknown[src]
        slot = self._unknown_by.pop(src, None)
        if slot is not None:
            self._unknown_per_link[slot] -= 1
            if self._unknown_per_link[slot] <= 0:
                del self._unknown_per_link[slot]

    def _flush_waiting(self) -> None:
        for address in list(self._waiting):
            slot = self.core.route_slot(address)
            if slot is not None:
                for _, packet in self._waiting.pop(address):
                    self._send_out.append((slot, packet))
                    self.counters["packets_sent_after_resolution"] += 1
            elif self.core.unresolvable(address, self._now):
                for _, packet in self._waiting.pop(address):
                    self._unreachable(packet)

    def _expire_waiting(self, now: float) -> None:
        for address, queue in list(self._waiting.items()):
            while queue and now - queue[0][0] >= WAIT_S:
                self._unreachable(queue.popleft()[1])
            if not queue:
                del self._waiting[address]

    def _unreachable(self, packet: bytes) -> None:
        """Drop ``packet`` and tell its sender (ICMP host unreachable), rate-limited."""
        self.counters["dropped_unresolved"] += 1
        if self._now - self._icmp_window >= 1.0:
            self._icmp_window, self._icmp_sent = self._now, 0
        header_length = (packet[0] & 0x0F) * 4 if packet else 0
        if header_length < 20 or len(packet) < header_length + 8:
            return  # no IP header and 8 bytes to quote (RFC 792): no ICMP error about it
        if self._icmp_sent >= ICMP_PER_S or (
            packet[9] == ipv4.Protocol.ICMP and packet[header_length] == 3
        ):
            return  # never an ICMP error about an ICMP error
        self._icmp_sent += 1
        body = bytes(8) + packet[: header_length + 8]
        icmp = bytearray(b"\x03\x01" + body[2:])  # type 3 (unreachable), code 1 (host)
        icmp[2:4] = ipv4.checksum(bytes(icmp)).to_bytes(2, "big")
        sender = IPv4Address(packet[12:16])
        reply = ipv4.build(
            src=self.settings.gateway, dst=sender, protocol=ipv4.Protocol.ICMP, payload=bytes(icmp)
        )
        frame = ethernet.build(
            self.mac_of(sender), self.settings.gateway_mac, ethernet.ETHERTYPE_IPV4, reply
        )
        self._tap_out.append(frame)
        self.counters["icmp_unreachable_sent"] += 1


class Machine(msgspec.Struct):
    """Router mode: a machine behind this node, with the address leased to it."""

    address: IPv4Address
    mac: bytes
    hostname: str | None
    since: float
    client_id: bytes
    renewed: float = 0.0
    restored: bool = False  # from the state directory after a restart, not yet renewed
    static: bool = False  # an address of its own (allow_static), claimed when first seen


def _address_of(event: GetResult) -> IPv4Address | None:
    """The address a ``name:`` record names (4 bytes), from the newest live record."""
    for record in sorted(event.records, key=lambda r: -r.seq):
        if not record.deleted and len(record.value) == 4:
            return IPv4Address(bytes(record.value))
    return None


def machines_from_leases(leases: list[dict[str, Any]], now: float) -> list[Machine]:
    """Router mode: the machines of leases kept in the state directory (``HoldLeases``).
    ValueError for a malformed entry (the caller restores none of them then)."""
    try:
        return [
            Machine(
                IPv4Address(m["address"]),
                bytes.fromhex(m["mac"]),
                m.get("hostname"),
                now,
                bytes.fromhex(m["client_id"]),
                static=bool(m.get("static", False)),
            )
            for m in leases
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed lease: {exc!r}") from None
