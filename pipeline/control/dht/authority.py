"""Which signer may hold a DHT record: the check of a record's certificate. Pure.

A record of a namespaced key (``ip:<namespace>:...``, ``name:<namespace>:...``; see
``wire.key_namespace``) carries its owner's certificate (``DhtRecord.certificate``).
``RecordAuthority.check`` accepts it only if that certificate decodes, is for the record's
owner key, is signed by the network authority, is neither revoked nor out of its validity
window, and lists the namespace. Anything else is a drop reason (``record_<reason>``): a
member of another virtual network sharing the overlay (``record_wrong_network``), a record
with no certificate (``record_no_certificate``), a certificate of another key
(``record_key_mismatch``), and the certificate's own reasons (``record_foreign_ca``,
``record_expired``, ...). Keys of no namespace pass: their owner's signature is all the DHT
checks.

Checking a certificate costs two Ed25519 verifications; a verdict is kept for
``CACHE_S`` seconds of wall time (so a revocation or an expiry is seen that late at most),
for at most ``CACHE_MAX`` certificates.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.control.dht.wire import DhtRecord, key_namespace
from pipeline.crypto.cert import (
    Certificate,
    CertificateError,
    RevocationList,
    decode_certificate,
    verify,
)

CACHE_S = 60.0
CACHE_MAX = 4096


class RecordAuthority:
    """Checks records against the network authority ``ca``; ``revoked`` and ``wall`` (unix
    seconds) are read at each check, so a new revocation list counts at once."""

    def __init__(
        self,
        ca: Certificate,
        revoked: Callable[[], RevocationList],
        wall: Callable[[], float],
    ) -> None:
        self.ca = ca
        self._revoked = revoked
        self._wall = wall
        # certificate bytes -> (the certificate or the reason it is unusable, checked at)
        self._verdicts: dict[bytes, tuple[Certificate | str, float, RevocationList]] = {}

    def check(self, record: DhtRecord) -> str | None:
        """Why the record may not be held (a drop reason), or None."""
        namespace = key_namespace(record.key)
        if namespace is None:
            return None
        if not record.certificate:
            return "record_no_certificate"
        verdict = self._certificate(record.certificate)
        if isinstance(verdict, str):
            return verdict
        if verdict.public_key != record.owner:
            return "record_key_mismatch"
        if namespace not in verdict.networks:
            return "record_wrong_network"
        return None

    def _certificate(self, data: bytes) -> Certificate | str:
        wall = self._wall()
        revoked = self._revoked()
        held = self._verdicts.get(data)
        if held is not None and wall - held[1] < CACHE_S and held[2] is revoked:
            return held[0]
        verdict: Certificate | str
        try:
            cert = decode_certificate(data)
            verify(cert, self.ca, now=wall, network=None, revoked=revoked)
            verdict = cert
        except CertificateError as exc:
            verdict = f"record_{exc.reason}"
        self._verdicts.pop(data, None)
        self._verdicts[data] = (verdict, wall, revoked)
        while len(self._verdicts) > CACHE_MAX:
            del self._verdicts[next(iter(self._verdicts))]
        return verdict
