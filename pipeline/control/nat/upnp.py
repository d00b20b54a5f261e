"""UPnP IGD port mapping: what ``PortMapper`` asks the driver to do, what comes back, and
what an error means. Pure.

UPnP IGD is SSDP discovery (multicast) and SOAP over HTTP: blocking calls, made by the
control driver's UPnP thread (``pipeline/control/upnp_client.py``, with miniupnpc), never on
its event loop. The mapper hands out commands (``PortMapper.upnp_to_run()``), the driver
runs them in order, one at a time, and hands each one's ``UpnpResult`` back
(``PortMapper.receive_upnp``), matched by ``id``:

- ``UpnpMap``: find the gateway's IGD (SSDP from the node's LAN address; the driver keeps
  the one it found until a call fails for a reason that says it is gone, ``igd_gone``), read
  its external address, add (or refresh: the same request again) a UDP mapping of
  ``external_port`` to ``internal`` with ``lease_s`` (0: permanent), then read the entry back
  for the lease the IGD granted. The result has the external address and that lease.
- ``UpnpDelete``: delete the mapping of ``external_port``, if it is ``internal``'s (the
  entry is read first: another host's is left alone, a missing one is already deleted).

A failed call's message (miniupnpc raises a bare ``Exception`` with the UPnP error's name,
``strupnperror``) becomes a short reason (``reason``) for logs and counters: "conflict"
(718: another host holds the port), "only_permanent_leases" (725: the IGD wants lease 0),
"not_authorized" (606), "no_igd", "http_error", ...
"""

from __future__ import annotations

import re

import msgspec

Address = tuple[str, int]

MAX_LEASE_S = 604800  # IGDv2's longest lease (one week); an IGDv2 grants it for lease 0
DISCOVERY_MS = 2000  # how long SSDP discovery waits for answers

CONFLICT = "conflict"
ONLY_PERMANENT = "only_permanent_leases"
NO_IGD = "no_igd"
NO_EXTERNAL_ADDRESS = "no_external_address"
NOT_OURS = "not_ours"

_REASONS = {
    "ConflictInMappingEntry": CONFLICT,
    "OnlyPermanentLeasesSupported": ONLY_PERMANENT,
    "Action not authorized": "not_authorized",
    "No UPnP device discovered": NO_IGD,
    "Miniupnpc HTTP error": "http_error",
    "Miniupnpc Socket error": "socket_error",
    "Miniupnpc Invalid response": "invalid_response",
    "Miniupnpc Unknown Error": "unknown_error",
    "Miniupnpc Invalid Arguments": "invalid_arguments",
    "Miniupnpc Memory allocation error": "memory_error",
    "SamePortValuesRequired": "same_port_values_required",
    "ExternalPortOnlySupportsWildcard": "external_port_only_wildcard",
    "RemoteHostOnlySupportsWildcard": "remote_host_only_wildcard",
    "NoSuchEntryInArray": "no_such_entry",
    "Invalid Args": "invalid_args",
    "Action Failed": "action_failed",
}

# reasons after which the IGD found before is not to be trusted: discover again
_GONE = frozenset(
    {NO_IGD, NO_EXTERNAL_ADDRESS, "http_error", "socket_error", "invalid_response", "unknown_error"}
)


class UpnpMap(msgspec.Struct, frozen=True):
    """Map UDP ``external_port`` on the IGD to ``internal`` for ``lease_s`` (0: permanent)."""

    id: int
    internal: Address  # the node's LAN address (SSDP goes out of its interface) and port
    external_port: int
    lease_s: int
    description: str


class UpnpDelete(msgspec.Struct, frozen=True):
    """Delete the UDP mapping of ``external_port``, if it is ``internal``'s."""

    id: int
    internal: Address
    external_port: int


UpnpCommand = UpnpMap | UpnpDelete


class UpnpResult(msgspec.Struct, frozen=True):
    """The outcome of command ``id``. A map's: the IGD's external address and the lease it
    reports for the entry (None: it did not say; 0: permanent)."""

    id: int
    ok: bool
    external_address: str = ""
    lease_s: int | None = None
    error: str = ""  # a reason (``reason``) when not ok


def reason(message: str) -> str:
    """A failed miniupnpc call's message as a short reason: "conflict", "no_igd", ..."""
    known = _REASONS.get(message.strip())
    if known is not None:
        return known
    words = re.sub(r"[^a-z0-9]+", "_", message.strip().lower()).strip("_")
    return words[:40] or "unknown_error"


def igd_gone(why: str) -> bool:
    """Whether a failure says the IGD found before is gone or unusable (discover anew)."""
    return why in _GONE
