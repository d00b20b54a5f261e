"""The DHCP server of one virtual network (RFC 2131, options of RFC 2132), sans-I/O. Pure.

Shaped like h11 or aioquic: ``DhcpServer`` takes bytes, DHT results and the time, and
gives back bytes to send, DHT requests to make and events; it never calls the DHT, reads a
clock or draws randomness other than from the ``rng`` it was given. ``now`` is the
driver's monotonic clock, in seconds.

Theory of operation:

- **An address is a DHT record.** This node may give a client an address only while it
  holds the record ``ip:<namespace>:<address>`` naming its node id: it wins it with an
  atomic DHT create (put if absent). The server asks for that with a ``Claim`` in
  ``dht_requests()``; the driver makes the create and reports ``address_won``,
  ``address_lost`` (another node holds it) or ``claim_failed`` (no answer), with the
  claim's ``token``. Giving an address up (RELEASE, DECLINE, an expired lease or offer, a
  claim that failed or is no longer wanted) is a ``Release`` (a DHT delete). The DHT
  renews the records it owns by itself; the server also asks for a renewing ``Claim``
  when a client renews (at most once per quarter lease), which checks the address is
  still ours. Requests are in the order they were made: the driver makes them in order.
  A win reported for a claim given up already (its timeout passed) is released too: the
  DHT may have created the record after all (it retries a STALE create past a delete).
- **Leases** are kept per client: option 61 (client identifier) if sent, else
  ``b"\\x01"`` + the MAC (the usual form of a hardware client id, so a client that sends
  that is the same client). A lease is *claiming* (a claim is in flight, nothing held
  yet), *offered* or *bound* (the address is held). At most ``max_clients`` leases: a
  node in interface mode (``max_clients=1``) serves only its own host, and a new client
  there (a new MAC after the TAP was re-created, another DHCP client program) takes over
  the one lease and its address; in router mode (many clients) a new client beyond the
  limit is dropped (``table_full``). A client with a new id but the MAC of a lease takes
  that lease over in both modes: one lease per MAC. A lease taken over while its claim is
  in flight keeps the claim but owes the old client no answer: won, the address is held
  (offered) for the new client, who asks for it; lost, the lease ends.
- **DISCOVER** → OFFER of the client's held address if it has one; else a *search*: the
  first usable candidate of: the address ``preferred`` for this client, the one preferred
  for the node (what it held before, from the driver's state directory), the client's
  requested address (option 50, from its own lease file), the *derived* address
  (``derive_address``: a hash of the node id, plus the client id in router mode, into the
  host range), then random host addresses. Usable: in the subnet, not reserved (network,
  broadcast, server, DNS, ``reserved``), not another client's, not found taken or
  declined in the last ``avoid_s``, not tried in this search. The candidate is claimed;
  won → OFFER; lost → the next candidate, ``claim_tries`` claims in all, then
  ``ClaimsExhausted`` and no OFFER (the client will DISCOVER again). A DISCOVER while a
  claim is in flight only updates the message to answer.
- **REQUEST**. SELECTING (server identifier present): ours and the address we offered →
  ACK; ours and another address → NAK; another server's → the client chose it: our offer
  is withdrawn (released), no answer. INIT-REBOOT (option 50, no ciaddr), RENEWING and
  REBINDING (ciaddr): the client's held address → ACK (a renewal: ``LeaseRenewed`` and a
  renewing claim); another address, one outside the subnet, or an unusable one → NAK. A
  client we have no lease for (this node restarted, or control did) gets its address
  claimed for it, and the ACK (won) or NAK (lost) when the claim ends: a restart of
  control does not take the host's address away.
- **DECLINE** of the client's address → released, avoided for ``avoid_s``
  (``AddressDeclined``). **RELEASE** of it → released (``LeaseReleased``). **INFORM** →
  ACK with the options but no address and no lease times, to ciaddr.
- **Timers** (``handle_timer`` at ``next_deadline``): an offer not requested within
  ``offer_timeout_s``, a lease not renewed by its end, a claim not answered within
  ``claim_timeout_s`` (taken as failed): each releases its address.
- **Losing an address.** ``address_lost`` of an address a client holds (any of our
  claims of it answered EXISTS, a renewal's say, or the DHT's ``LeaseLost`` passed with
  token None) revokes the lease (``LeaseRevoked``): the client's next REQUEST is NAKed
  and it starts over. There is no way to tell the client sooner (FORCERENEW needs
  authentication, RFC 3203).
- **Replies** (RFC 2131 §4.1, table 3): NAK is broadcast; a client with ciaddr gets
  unicast there; else broadcast if it set the B flag, else unicast to yiaddr at its MAC
  (we write the frame, so no ARP is needed). OFFER and ACK carry options 53, 54, 51, 58
  (T1 = lease/2), 59 (T2 = lease·7/8), 1, 3, 6, 15, 26, the client's 12 (host name) and
  61 (client id, RFC 6842) echoed; all of them whatever the parameter request list asks.
  A reply over the client's maximum message size (option 57, at least 576) drops the
  host name, then the domain.
- **Input never raises.** Malformed or unwanted messages are counted drops,
  ``statistics()["dropped_<reason>"]``: the codec's reasons (``dhcp_truncated``,
  ``dhcp_bad_cookie``, ``dhcp_bad_message_type``, ...), the frame's (``receive_frame``:
  ``ethernet_*``, ``ipv4_*``, ``udp_*``, ``dhcp_frame_*``) and ``not_request`` (op is
  not BOOTREQUEST), ``unsupported_hardware`` (not htype 1, hlen 6), ``relayed`` (giaddr
  set: no relay agents on a virtual network), ``chaddr_mismatch`` (chaddr is not the
  frame's source MAC), ``mac_not_allowed``, ``bootp`` (no message type),
  ``not_client_message`` (OFFER, ACK, NAK), ``unknown_message_type``,
  ``dhcp_bad_option_<code>`` (a wrong length for 12, 50, 54, 57, 61),
  ``request_without_address``, ``other_server``, ``table_full``, ``claim_in_progress``,
  ``decline_unknown``, ``release_unknown``.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections import Counter
from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network

import msgspec

from pipeline.control.dhcp import events as ev
from pipeline.control.dhcp import frames
from pipeline.control.dhcp.events import BROADCAST_ADDRESS, Claim, Release, Reply
from pipeline.control.dhcp.wire import (
    BOOTREPLY,
    BOOTREQUEST,
    HTYPE_ETHERNET,
    UNSPECIFIED,
    DhcpMessage,
    MessageType,
    Option,
    decode,
    encode,
    pack_addresses,
    pack_u16,
    pack_u32,
)
from pipeline.control.dht.wire import MAX_LEASE_S
from pipeline.errors import RemoteProtocolError
from pipeline.wire import ethernet

__all__ = ["DhcpServer", "DhcpSettings", "LeaseInfo", "derive_address"]

MIN_MESSAGE_SIZE = 576  # every client takes an IP datagram this long (RFC 2131 §2)
_IP_UDP_HEADERS = 28
_RANDOM_DRAWS = 64
_SCAN_LIMIT = 1024
_CLIENT_TYPES = frozenset(
    {
        MessageType.DISCOVER,
        MessageType.REQUEST,
        MessageType.DECLINE,
        MessageType.RELEASE,
        MessageType.INFORM,
    }
)
_SERVER_TYPES = frozenset({MessageType.OFFER, MessageType.ACK, MessageType.NAK})


class DhcpSettings(msgspec.Struct, frozen=True):
    """One virtual network's DHCP service. ValueError if inconsistent (see ``__post_init__``).

    ``server_address`` is the virtual gateway: router (option 3) and server identifier
    (54); ``dns`` (option 6) defaults to it. ``node_id`` (20 bytes) is the value of every
    address record. ``reserved``: addresses never handed out, besides the network,
    broadcast, server and DNS addresses. ``max_clients``: 1 in interface mode, more in
    router mode. ``allowed_macs``: if set, only these clients are answered (router mode
    sharing a segment with another DHCP server). The rest are timers and bounds (module
    docstring)."""

    subnet: IPv4Network
    server_address: IPv4Address
    namespace: str
    node_id: bytes
    domain: str
    dns: IPv4Address | None = None
    mtu: int = 1400
    lease_s: int = 3600
    server_port: int = 67
    reserved: frozenset[IPv4Address] = frozenset()
    max_clients: int = 1
    allowed_macs: frozenset[bytes] | None = None
    claim_tries: int = 8
    claim_timeout_s: float = 30.0
    offer_timeout_s: float = 60.0
    avoid_s: float = 600.0

    def __post_init__(self) -> None:
        subnet = self.subnet
        checks = (
            (subnet.prefixlen <= 30, f"subnet {subnet} has no room for clients (/30 at most)"),
            (
                self.server_address in subnet
                and self.server_address not in (subnet.network_address, subnet.broadcast_address),
                f"server_address {self.server_address} is not a host address of {subnet}",
            ),
            (
                self.namespace.isascii() and 0 < len(self.namespace) <= 64,
                "namespace must be 1 to 64 ASCII characters",
            ),
            (len(self.node_id) == 20, "node_id must be 20 bytes"),
            (self.domain.isascii() and 0 < len(self.domain) <= 253, "domain: 1 to 253 ASCII"),
            (68 <= self.mtu <= 0xFFFF, f"mtu {self.mtu} out of range 68..65535"),
            (16 <= self.lease_s <= MAX_LEASE_S, f"lease_s {self.lease_s} out of range"),
            (0 < self.server_port < 0xFFFF, f"server_port {self.server_port} out of range"),
            (self.max_clients >= 1, "max_clients must be at least 1"),
            (self.claim_tries >= 1, "claim_tries must be at least 1"),
            (
                min(self.claim_timeout_s, self.offer_timeout_s, self.avoid_s) > 0,
                "timeouts must be positive",
            ),
            (
                all(len(m) == ethernet.MAC_LEN for m in self.allowed_macs or ()),
                "allowed_macs must be 6-byte MACs",
            ),
        )
        for ok, problem in checks:
            if not ok:
                raise ValueError(problem)

    @property
    def client_port(self) -> int:
        return self.server_port + 1

    @property
    def renewal_s(self) -> int:
        """T1 (option 58)."""
        return self.lease_s // 2

    @property
    def rebinding_s(self) -> int:
        """T2 (option 59)."""
        return self.lease_s * 7 // 8

    @property
    def dns_address(self) -> IPv4Address:
        return self.server_address if self.dns is None else self.dns

    @property
    def reserved_addresses(self) -> frozenset[IPv4Address]:
        """Every address of the subnet never handed out."""
        subnet = self.subnet
        fixed = {subnet.network_address, subnet.broadcast_address, self.server_address}
        return frozenset(a for a in fixed | {self.dns_address} | self.reserved if a in subnet)

    def key(self, address: IPv4Address) -> bytes:
        """The DHT key of ``address``: ``ip:<namespace>:<address>``."""
        return f"ip:{self.namespace}:{address}".encode()


def derive_address(
    subnet: IPv4Network, seed: bytes, reserved: Collection[IPv4Address]
) -> IPv4Address | None:
    """A host address of ``subnet`` (not its network or broadcast address) chosen by a hash
    of ``seed`` (the node id): always the same for the same arguments; a reserved address
    is skipped by hashing again. None if 64 hashes all fell on reserved addresses."""
    first = int(subnet.network_address) + 1
    count = subnet.num_addresses - 2
    for i in range(64):
        digest = hashlib.blake2b(
            seed, digest_size=16, person=b"autovn-dhcp", salt=i.to_bytes(16, "big")
        ).digest()
        address = IPv4Address(first + int.from_bytes(digest, "big") % count)
        if address not in reserved:
            return address
    return None


class LeaseInfo(msgspec.Struct, frozen=True):
    """A lease, as ``DhcpServer.leases()`` shows it. ``state``: ``claiming``, ``offered``,
    ``bound``; ``expires``: the end of the lease or offer (``now`` scale), or the claim's
    deadline."""

    client_id: bytes
    mac: bytes
    address: IPv4Address
    state: str
    expires: float


class _State(enum.Enum):
    CLAIMING = "claiming"  # a claim for the address is in flight: not held yet
    OFFERED = "offered"
    BOUND = "bound"


class _Request(msgspec.Struct, frozen=True):
    """A validated client message."""

    msg: DhcpMessage
    kind: MessageType
    client_id: bytes
    mac: bytes
    requested: IPv4Address | None  # option 50
    server_id: IPv4Address | None  # option 54
    hostname: bytes | None  # option 12
    max_size: int  # the longest DHCP payload the client takes


class _Lease(msgspec.Struct):
    client_id: bytes
    mac: bytes
    address: IPv4Address
    state: _State
    expires: float = math.inf  # claiming: the claim's deadline; else the offer's or lease's end
    claim: int | None = None  # the token of the claim in flight (the address's, or a renewal)
    answer: tuple[_Request, MessageType] | None = None  # claiming: what to send when won
    tried: list[IPv4Address] = msgspec.field(default_factory=list)  # lost in this search
    hostname: bytes | None = None
    confirmed: float = -math.inf  # when the DHT last said the address is ours
    granted: bool = False  # LeaseGranted was reported for this client

    @property
    def held(self) -> bool:
        return self.state is not _State.CLAIMING


class _Pending(msgspec.Struct, frozen=True):
    """A claim the driver is making for us."""

    lease: _Lease
    address: IPv4Address
    renewal: bool
    deadline: float


class DhcpServer:
    """The DHCP server of one virtual network. See the module docstring."""

    def __init__(self, settings: DhcpSettings, rng: random.Random) -> None:
        self.settings = settings
        self._rng = rng
        self._reserved = settings.reserved_addresses
        self._leases: dict[bytes, _Lease] = {}
        self._claims: dict[int, _Pending] = {}
        self._next_token = 1
        self._preferred: dict[bytes | None, IPv4Address] = {}
        self._avoid: dict[IPv4Address, float] = {}
        self._replies: list[Reply] = []
        self._dht: list[Claim | Release] = []
        self._events: list[ev.DhcpEvent] = []
        self._stats: Counter[str] = Counter()

    # -- outputs and queries -----------------------------------------------------------------

    def replies(self) -> list[Reply]:
        """The DHCP messages to send since the last call (see ``frames.reply_frame``)."""
        out, self._replies = self._replies, []
        return out

    def reply_frames(self, server_mac: bytes) -> list[bytes]:
        """``replies()`` as Ethernet frames from ``server_mac`` and the server address."""
        s = self.settings
        return [
            frames.reply_frame(
                r, server_mac=server_mac, server_address=s.server_address, server_port=s.server_port
            )
            for r in self.replies()
        ]

    def dht_requests(self) -> list[Claim | Release]:
        """The DHT creates (``Claim``) and deletes (``Release``) wanted, in order."""
        out, self._dht = self._dht, []
        return out

    def events(self) -> list[ev.DhcpEvent]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        times = [p.deadline for p in self._claims.values()]
        times += [lease.expires for lease in self._leases.values() if lease.held]
        return min(times) if times else None

    def statistics(self) -> dict[str, int]:
        """Counters since start: ``dropped_<reason>`` (module docstring), ``received_<type>``
        and ``sent_<type>`` (message types in lower case), ``claims``, ``claims_won``,
        ``claims_lost``, ``claims_failed``, ``claim_timeouts``, ``claims_exhausted``,
        ``renewal_claims``, ``releases``, ``offers_expired``, ``leases_expired``,
        ``leases_released``, ``leases_revoked``, ``declines``, ``leases_taken_over``,
        ``replies_shortened``, ``unknown_claim`` and ``claim_mismatch`` (results naming no
        claim in flight, or another address), ``lost_not_held``, ``preferred_ignored``."""
        return dict(self._stats)

    def leases(self) -> list[LeaseInfo]:
        return [
            LeaseInfo(x.client_id, x.mac, x.address, x.state.value, x.expires)
            for x in self._leases.values()
        ]

    # -- inputs ------------------------------------------------------------------------------

    def receive(self, payload: bytes | memoryview, client_mac: bytes, now: float) -> None:
        """A DHCP message (UDP payload to the server port) from ``client_mac`` (the frame's
        source). Never raises on bad input: a counted drop."""
        try:
            request = self._parse(decode(payload), bytes(client_mac))
        except RemoteProtocolError as exc:
            self._drop(exc.reason)
            return
        self._stats[f"received_{request.kind.name.lower()}"] += 1
        if request.kind is MessageType.DISCOVER:
            self._on_discover(request, now)
        elif request.kind is MessageType.REQUEST:
            self._on_request(request, now)
        elif request.kind is MessageType.DECLINE:
            self._on_decline(request, now)
        elif request.kind is MessageType.RELEASE:
            self._on_release(request)
        else:
            self._send(request, MessageType.ACK, None)

    def receive_frame(self, frame: bytes | memoryview, now: float) -> None:
        """``receive`` of the DHCP message in an Ethernet frame from the TAP (checked by
        ``frames.request_from_frame``; a bad frame is a counted drop)."""
        try:
            payload, mac = frames.request_from_frame(frame, self.settings.server_port)
        except RemoteProtocolError as exc:
            self._drop(exc.reason)
            return
        self.receive(payload, mac, now)

    def address_won(self, token: int, address: IPv4Address, now: float) -> None:
        """The claim ``token`` of ``address`` succeeded: the record is ours. (Also for a
        claim given up already: a create that ends after its timeout must not stay.)"""
        pending = self._take_claim(token, address)
        if pending is None:
            if token not in self._claims:
                self._release(address)  # ours now, but given up: the DHT would renew it
            return
        self._stats["claims_won"] += 1
        lease = pending.lease
        if not self._waiting(lease, token):
            self._release(address)  # nobody wants it any more
            return
        lease.claim, lease.confirmed = None, now
        if pending.renewal:
            return
        answer, lease.answer = lease.answer, None
        lease.state, lease.expires = _State.OFFERED, now + self.settings.offer_timeout_s
        if answer is None:
            return  # taken over while claiming: held for the new client, who will ask
        request, kind = answer
        if kind is MessageType.OFFER:
            self._send(request, MessageType.OFFER, address)
        else:
            self._ack(lease, request, now)

    def address_lost(self, token: int | None, address: IPv4Address, now: float) -> None:
        """Another node holds ``address``: the answer (EXISTS) to the claim ``token``, or,
        with token None, the DHT's ``LeaseLost`` for the key of an address we held. Whoever
        holds ``address`` here loses it."""
        self._avoid[address] = now + self.settings.avoid_s
        holder = self._holder(address)
        if holder is not None:
            self._revoke(holder)
        elif token is None:
            self._stats["lost_not_held"] += 1
        if token is None:
            return
        pending = self._take_claim(token, address)
        if pending is None:
            return
        self._stats["claims_lost"] += 1
        lease = pending.lease
        if self._waiting(lease, token):  # a claiming lease: the next candidate, or NAK
            del self._leases[lease.client_id]
            if lease.answer is None:
                return  # taken over while claiming: the new client will ask
            request, kind = lease.answer
            assert request.client_id == lease.client_id
            if kind is MessageType.OFFER:
                self._search(request, [*lease.tried, address], now)
            else:
                self._nak(request, address, "taken")

    def claim_failed(self, token: int, address: IPv4Address, now: float) -> None:
        """The claim ``token`` got no verdict (timeout, no quorum, refused, no route)."""
        pending = self._take_claim(token, address)
        if pending is not None:
            self._stats["claims_failed"] += 1
            self._claim_failed(token, pending)

    def handle_timer(self, now: float) -> None:
        for token, pending in list(self._claims.items()):
            if pending.deadline <= now:
                del self._claims[token]
                self._stats["claim_timeouts"] += 1
                self._claim_failed(token, pending)
        for lease in list(self._leases.values()):
            if lease.held and lease.expires <= now:
                del self._leases[lease.client_id]
                self._release(lease.address)
                if lease.state is _State.OFFERED:
                    self._stats["offers_expired"] += 1
                    self._events.append(ev.OfferExpired(lease.client_id, lease.mac, lease.address))
                else:
                    self._stats["leases_expired"] += 1
                    self._events.append(ev.LeaseExpired(lease.client_id, lease.mac, lease.address))
        self._avoid = {a: until for a, until in self._avoid.items() if until > now}

    def preferred(self, address: IPv4Address, client_id: bytes | None = None) -> bool:
        """Try ``address`` first for ``client_id`` (None: for any client, i.e. the address
        this node held before). False (and ignored) if it is not a usable host address."""
        if address not in self.settings.subnet or address in self._reserved:
            self._stats["preferred_ignored"] += 1
            return False
        self._preferred[client_id] = address
        return True

    # -- messages ----------------------------------------------------------------------------

    def _parse(self, msg: DhcpMessage, client_mac: bytes) -> _Request:
        """Check a decoded message; RemoteProtocolError(reason) if it is to be dropped."""
        if msg.op != BOOTREQUEST:
            raise RemoteProtocolError("not_request", f"op {msg.op}")
        if msg.htype != HTYPE_ETHERNET or msg.hlen != ethernet.MAC_LEN:
            raise RemoteProtocolError("unsupported_hardware", f"htype {msg.htype}")
        if msg.giaddr != UNSPECIFIED:
            raise RemoteProtocolError("relayed", str(msg.giaddr))
        mac = msg.hardware_address
        if mac != client_mac:
            raise RemoteProtocolError("chaddr_mismatch", mac.hex())
        allowed = self.settings.allowed_macs
        if allowed is not None and mac not in allowed:
            raise RemoteProtocolError("mac_not_allowed", mac.hex())
        kind = msg.message_type()
        if kind is None:
            raise RemoteProtocolError("bootp")
        if kind in _SERVER_TYPES:
            raise RemoteProtocolError("not_client_message", str(kind))
        if kind not in _CLIENT_TYPES:
            raise RemoteProtocolError("unknown_message_type", str(kind))
        options = msg.options
        client_id = options.get(Option.CLIENT_ID, b"\x01" + mac)
        hostname = options.get(Option.HOST_NAME)
        max_size = options.get(Option.MAX_MESSAGE_SIZE, pack_u16(MIN_MESSAGE_SIZE))
        for code, value, ok in (
            (Option.CLIENT_ID, client_id, len(client_id) >= 2),
            (Option.HOST_NAME, hostname, hostname is None or len(hostname) >= 1),
            (Option.MAX_MESSAGE_SIZE, max_size, len(max_size) == 2),
        ):
            if not ok:
                raise RemoteProtocolError(f"dhcp_bad_option_{code}", repr(value))
        return _Request(
            msg=msg,
            kind=MessageType(kind),
            client_id=client_id,
            mac=mac,
            requested=msg.address_option(Option.REQUESTED_ADDRESS),
            server_id=msg.address_option(Option.SERVER_ID),
            hostname=hostname,
            max_size=max(MIN_MESSAGE_SIZE, int.from_bytes(max_size, "big")) - _IP_UDP_HEADERS,
        )

    def _on_discover(self, request: _Request, now: float) -> None:
        lease = self._lease_for(request)
        if lease is None:
            if len(self._leases) >= self.settings.max_clients:
                self._drop("table_full")
            else:
                self._search(request, [], now)
            return
        lease.hostname = request.hostname
        if lease.state is _State.CLAIMING:
            lease.answer = (request, MessageType.OFFER)  # answer the latest DISCOVER
            return
        if lease.state is _State.OFFERED:
            lease.expires = now + self.settings.offer_timeout_s
        self._send(request, MessageType.OFFER, lease.address)

    def _on_request(self, request: _Request, now: float) -> None:
        settings = self.settings
        lease = self._lease_for(request)
        if request.server_id is not None:  # SELECTING
            if request.server_id != settings.server_address:
                if lease is not None and lease.state is _State.OFFERED:
                    del self._leases[lease.client_id]  # it took another server's offer
                    self._release(lease.address)
                self._drop("other_server")
            elif request.requested is None:
                self._drop("request_without_address")
            elif lease is not None and lease.held and lease.address == request.requested:
                self._ack(lease, request, now)
            else:
                self._nak(request, request.requested, "not_offered")
            return
        # INIT-REBOOT (option 50), RENEWING or REBINDING (ciaddr)
        ciaddr = request.msg.ciaddr
        address = request.requested if ciaddr == UNSPECIFIED else ciaddr
        if address is None:
            self._drop("request_without_address")
        elif address not in settings.subnet:
            self._nak(request, address, "not_in_subnet")
        elif lease is not None and lease.held:
            if lease.address == address:
                self._ack(lease, request, now)
            else:
                self._nak(request, address, "wrong_address")
        elif lease is not None:  # claiming
            if lease.address == address:
                lease.answer = (request, MessageType.ACK)
            else:
                self._drop("claim_in_progress")
        elif not self._usable(address, request.client_id, (), now):
            self._nak(request, address, "unavailable")
        elif len(self._leases) >= settings.max_clients:
            self._drop("table_full")
        else:  # a client we do not know (this node restarted): claim its address for it
            self._claim(request, address, MessageType.ACK, [], now)

    def _on_decline(self, request: _Request, now: float) -> None:
        lease = self._own_lease(request, request.requested, "decline_unknown")
        if lease is not None:
            self._avoid[lease.address] = now + self.settings.avoid_s
            self._stats["declines"] += 1
            self._events.append(ev.AddressDeclined(lease.client_id, lease.mac, lease.address))

    def _on_release(self, request: _Request) -> None:
        lease = self._own_lease(request, request.msg.ciaddr, "release_unknown")
        if lease is not None:
            self._stats["leases_released"] += 1
            self._events.append(ev.LeaseReleased(lease.client_id, lease.mac, lease.address))

    def _own_lease(
        self, request: _Request, address: IPv4Address | None, unknown: str
    ) -> _Lease | None:
        """DECLINE and RELEASE: end the client's lease of ``address`` and release it."""
        if request.server_id is not None and request.server_id != self.settings.server_address:
            self._drop("other_server")
            return None
        lease = self._leases.get(request.client_id)
        if lease is None or not lease.held or lease.address != address:
            self._drop(unknown)
            return None
        del self._leases[lease.client_id]
        self._release(lease.address)
        return lease

    def _ack(self, lease: _Lease, request: _Request, now: float) -> None:
        settings = self.settings
        lease.state, lease.expires = _State.BOUND, now + settings.lease_s
        lease.mac, lease.hostname = request.mac, request.hostname
        self._send(request, MessageType.ACK, lease.address)
        ident = (lease.client_id, lease.mac, lease.address)
        if not lease.granted:
            lease.granted = True
            hostname = None
            if lease.hostname is not None:
                hostname = lease.hostname.decode("ascii", "backslashreplace")
            self._events.append(ev.LeaseGranted(*ident, settings.lease_s, hostname))
            return
        self._events.append(ev.LeaseRenewed(*ident, settings.lease_s))
        if lease.claim is None and now - lease.confirmed >= settings.lease_s / 4:
            self._stats["renewal_claims"] += 1
            lease.claim = self._new_claim(lease, lease.address, now, renewal=True)

    def _nak(self, request: _Request, address: IPv4Address | None, reason: str) -> None:
        self._events.append(ev.NakSent(request.client_id, request.mac, address, reason))
        self._send(request, MessageType.NAK, None, reason)

    def _send(
        self, request: _Request, kind: MessageType, address: IPv4Address | None, text: str = ""
    ) -> None:
        """Answer ``request`` with an OFFER, ACK (an INFORM's if ``address`` is None) or NAK."""
        settings = self.settings
        msg = request.msg
        options: dict[int, bytes] = {
            Option.MESSAGE_TYPE: bytes((kind,)),
            Option.SERVER_ID: settings.server_address.packed,
        }
        if kind is MessageType.NAK:
            options[Option.MESSAGE] = text.encode()
        else:
            if address is not None:
                options[Option.LEASE_TIME] = pack_u32(settings.lease_s)
                options[Option.RENEWAL_TIME] = pack_u32(settings.renewal_s)
                options[Option.REBINDING_TIME] = pack_u32(settings.rebinding_s)
            options[Option.SUBNET_MASK] = settings.subnet.netmask.packed
            options[Option.ROUTER] = pack_addresses(settings.server_address)
            options[Option.DNS_SERVERS] = pack_addresses(settings.dns_address)
            options[Option.DOMAIN_NAME] = settings.domain.encode("ascii")
            options[Option.INTERFACE_MTU] = pack_u16(settings.mtu)
            if request.hostname is not None:
                options[Option.HOST_NAME] = request.hostname
        if Option.CLIENT_ID in msg.options:
            options[Option.CLIENT_ID] = request.client_id
        reply = DhcpMessage(
            op=BOOTREPLY,
            xid=msg.xid,
            chaddr=msg.chaddr,
            htype=msg.htype,
            hlen=msg.hlen,
            flags=msg.flags,
            ciaddr=msg.ciaddr if kind is MessageType.ACK else UNSPECIFIED,
            yiaddr=address or UNSPECIFIED,
            giaddr=msg.giaddr,
            options=options,
        )
        payload = encode(reply)
        for optional in (Option.HOST_NAME, Option.DOMAIN_NAME):
            if len(payload) > request.max_size and optional in options:
                self._stats["replies_shortened"] += 1
                del options[optional]
                payload = encode(reply)
        if kind is MessageType.NAK:
            dst_ip, dst_mac = BROADCAST_ADDRESS, ethernet.BROADCAST
        elif msg.ciaddr != UNSPECIFIED:
            dst_ip, dst_mac = msg.ciaddr, request.mac
        elif msg.broadcast or address is None:
            dst_ip, dst_mac = BROADCAST_ADDRESS, ethernet.BROADCAST
        else:
            dst_ip, dst_mac = address, request.mac
        self._stats[f"sent_{kind.name.lower()}"] += 1
        self._replies.append(Reply(payload, dst_ip, dst_mac, kind))

    # -- leases and claims -------------------------------------------------------------------

    def _lease_for(self, request: _Request) -> _Lease | None:
        """The client's lease, taking one over if the client is new: the lease of its MAC,
        or in interface mode (one client) the only lease."""
        lease = self._leases.get(request.client_id)
        if lease is not None:
            return lease
        lease = next((x for x in self._leases.values() if x.mac == request.mac), None)
        if lease is None and self.settings.max_clients == 1 and self._leases:
            lease = next(iter(self._leases.values()))
        if lease is not None:
            self._stats["leases_taken_over"] += 1
            del self._leases[lease.client_id]
            lease.client_id, lease.mac, lease.granted = request.client_id, request.mac, False
            lease.answer = None  # a claim in flight goes on, but answers the old client no more
            self._leases[request.client_id] = lease
        return lease

    def _search(self, request: _Request, tried: list[IPv4Address], now: float) -> None:
        """Claim the next candidate address for a DISCOVER, or give up."""
        candidate = None
        if len(tried) < self.settings.claim_tries:
            candidate = self._candidate(request, tried, now)
        if candidate is None:
            self._leases.pop(request.client_id, None)
            self._stats["claims_exhausted"] += 1
            self._events.append(ev.ClaimsExhausted(request.client_id, request.mac, len(tried)))
            return
        self._claim(request, candidate, MessageType.OFFER, tried, now)

    def _candidate(
        self, request: _Request, tried: list[IPv4Address], now: float
    ) -> IPv4Address | None:
        settings = self.settings
        seed = settings.node_id
        if settings.max_clients > 1:
            seed += request.client_id
        firsts = (
            self._preferred.get(request.client_id),
            self._preferred.get(None),
            request.requested,
            derive_address(settings.subnet, seed, self._reserved),
        )
        for address in firsts:
            if address is not None and self._usable(address, request.client_id, tried, now):
                return address
        first = int(settings.subnet.network_address) + 1
        count = settings.subnet.num_addresses - 2
        for _ in range(_RANDOM_DRAWS):
            address = IPv4Address(first + self._rng.randrange(count))
            if self._usable(address, request.client_id, tried, now):
                return address
        start = self._rng.randrange(count)  # a small or crowded subnet: look at them in turn
        for i in range(min(count, _SCAN_LIMIT)):
            address = IPv4Address(first + (start + i) % count)
            if self._usable(address, request.client_id, tried, now):
                return address
        return None

    def _usable(
        self, address: IPv4Address, client_id: bytes, tried: Collection[IPv4Address], now: float
    ) -> bool:
        return (
            address in self.settings.subnet
            and address not in self._reserved
            and address not in tried
            and self._avoid.get(address, -math.inf) <= now
            and all(x.address != address for x in self._leases.values() if x.client_id != client_id)
        )

    def _claim(
        self,
        request: _Request,
        address: IPv4Address,
        answer: MessageType,
        tried: list[IPv4Address],
        now: float,
    ) -> None:
        lease = _Lease(request.client_id, request.mac, address, _State.CLAIMING)
        lease.answer, lease.tried, lease.hostname = (request, answer), tried, request.hostname
        lease.claim = self._new_claim(lease, address, now, renewal=False)
        lease.expires = self._claims[lease.claim].deadline
        self._leases[request.client_id] = lease
        self._stats["claims"] += 1

    def _new_claim(self, lease: _Lease, address: IPv4Address, now: float, *, renewal: bool) -> int:
        settings = self.settings
        token, self._next_token = self._next_token, self._next_token + 1
        self._claims[token] = _Pending(lease, address, renewal, now + settings.claim_timeout_s)
        key = settings.key(address)
        self._dht.append(Claim(token, address, key, settings.node_id, settings.lease_s, renewal))
        return token

    def _take_claim(self, token: int, address: IPv4Address) -> _Pending | None:
        pending = self._claims.get(token)
        if pending is None:
            self._stats["unknown_claim"] += 1
            return None
        if pending.address != address:
            self._stats["claim_mismatch"] += 1
            return None
        del self._claims[token]
        return pending

    def _waiting(self, lease: _Lease, token: int) -> bool:
        """``lease`` is still in the table and waiting for the claim ``token``."""
        return self._leases.get(lease.client_id) is lease and lease.claim == token

    def _claim_failed(self, token: int, pending: _Pending) -> None:
        lease = pending.lease
        if self._waiting(lease, token):
            lease.claim = None
            if pending.renewal:
                return  # the lease stands: the DHT still renews the record
            del self._leases[lease.client_id]  # no answer: the client will ask again
        if not pending.renewal:
            self._release(pending.address)  # a create without a verdict may have been stored

    def _holder(self, address: IPv4Address) -> _Lease | None:
        return next((x for x in self._leases.values() if x.held and x.address == address), None)

    def _revoke(self, lease: _Lease) -> None:
        del self._leases[lease.client_id]
        self._stats["leases_revoked"] += 1
        self._events.append(ev.LeaseRevoked(lease.client_id, lease.mac, lease.address))

    def _release(self, address: IPv4Address) -> None:
        """Ask for the record of ``address`` to be deleted, unless a lease still holds or is
        claiming it (a delete made after that claim's create would undo it)."""
        if all(x.address != address for x in self._leases.values()):
            self._stats["releases"] += 1
            self._dht.append(Release(address, self.settings.key(address)))

    def _drop(self, reason: str) -> None:
        self._stats[f"dropped_{reason}"] += 1
