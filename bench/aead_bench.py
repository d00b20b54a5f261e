"""Cost per packet of the data path's AEADs (ChaCha20-Poly1305 and AES-256-GCM, 96-bit
nonce) seal and open, per Python binding.

Usage (from the repo root)::

    python bench/aead_bench.py [--runs 5] [--sizes 64,1400,9000,65535] [--target 0.15]

Every operation uses 16 bytes of associated data (the overlay header) and a 12-byte nonce
(4 zero bytes + the counter, little-endian), as the data path does. Bindings:

- ``nacl``: PyNaCl's low-level ``nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt`` /
  ``_decrypt`` (libsodium through cffi; takes ``bytes`` only, returns a fresh ``bytes``);
- ``crypt``: ``cryptography``'s ``ChaCha20Poly1305.encrypt`` / ``decrypt`` (OpenSSL through
  Rust; takes any buffer, returns a fresh ``bytes``);
- ``crypt_into``: ``ChaCha20Poly1305.encrypt_into`` / ``decrypt_into`` into a preallocated
  buffer, when the installed version has them;
- ``crypt_aes``: ``cryptography``'s ``AESGCM.encrypt`` / ``decrypt`` with a 32-byte key
  (AES-256-GCM, the other data cipher a session may agree on);
- ``nacl_aes``: libsodium's ``crypto_aead_aes256gcm_*`` (only where the CPU has AES-NI).

After the first table, the ratio AES-256-GCM / ChaCha20-Poly1305 of ``cryptography``'s
calls at each size (the same run).

Each cell is the median over ``--runs`` runs of one timed loop of N calls (N chosen so a run
lasts about ``--target`` seconds); ns/packet includes the Python loop (its cost is printed
as ``empty loop``). MB/s counts payload bytes (10^6 B/s). A second table times the nonce
construction alone, a third the whole packet as the data path builds it (header + AEAD +
output object), including ``pipeline.crypto.datapath`` itself. The machine may be shared:
the ``min`` column shows the least disturbed run next to the median.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nacl.bindings import (  # noqa: E402
    crypto_aead_aes256gcm_decrypt,
    crypto_aead_aes256gcm_encrypt,
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

try:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
except ImportError:  # pragma: no cover - the bench still runs the nacl rows
    AESGCM = ChaCha20Poly1305 = None  # type: ignore[assignment,misc]

KEY = bytes(range(32))
AD = bytes(range(100, 116))  # stands in for the 16-byte overlay header
COUNTER = 0x0102030405
NONCE = b"\x00\x00\x00\x00" + COUNTER.to_bytes(8, "little")
TAG = 16
HEADER = struct.Struct("!BBHIQ")


class Cell:
    def __init__(self, per_run_ns: list[float]) -> None:
        self.median = statistics.median(per_run_ns)
        self.min = min(per_run_ns)


def calibrate(fn: Callable[[], object], target: float) -> int:
    n = 16
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > 0.02 or n >= 1 << 24:
            return max(200, int(n * target / max(dt, 1e-9)))
        n *= 4


def measure(fn: Callable[[], object], runs: int, target: float) -> Cell:
    fn()  # warm up (first-call caches, page faults of the output)
    n = calibrate(fn, target)
    rng = range(n)
    per_run: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        for _ in rng:
            fn()
        per_run.append((time.perf_counter_ns() - t0) / n)
    return Cell(per_run)


def binding_ops(size: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """(seal, open) closures per binding for one payload size; each is checked once."""
    payload = bytes(size)
    ops: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}

    ct_nacl = crypto_aead_chacha20poly1305_ietf_encrypt(payload, AD, NONCE, KEY)

    def nacl_seal() -> object:
        return crypto_aead_chacha20poly1305_ietf_encrypt(payload, AD, NONCE, KEY)

    def nacl_open() -> object:
        return crypto_aead_chacha20poly1305_ietf_decrypt(ct_nacl, AD, NONCE, KEY)

    assert nacl_open() == payload
    ops["nacl"] = (nacl_seal, nacl_open)

    if ChaCha20Poly1305 is not None:
        aead = ChaCha20Poly1305(KEY)
        ct = aead.encrypt(NONCE, payload, AD)
        assert ct == ct_nacl, "the two bindings disagree"
        enc, dec = aead.encrypt, aead.decrypt

        def crypt_seal() -> object:
            return enc(NONCE, payload, AD)

        def crypt_open() -> object:
            return dec(NONCE, ct, AD)

        assert crypt_open() == payload
        ops["crypt"] = (crypt_seal, crypt_open)

        if hasattr(aead, "encrypt_into") and hasattr(aead, "decrypt_into"):
            out_ct = bytearray(size + TAG)
            out_pt = bytearray(size)
            enc_into, dec_into = aead.encrypt_into, aead.decrypt_into

            def into_seal() -> object:
                return enc_into(NONCE, payload, AD, out_ct)

            def into_open() -> object:
                return dec_into(NONCE, ct, AD, out_pt)

            into_seal()
            assert out_ct == ct
            into_open()
            assert out_pt == payload
            ops["crypt_into"] = (into_seal, into_open)
    ops.update(aes_ops(payload))
    return ops


def aes_ops(payload: bytes) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """AES-256-GCM's (seal, open) closures: ``cryptography``'s and, with AES-NI, libsodium's."""
    ops: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {}
    if AESGCM is None:
        return ops
    aead = AESGCM(KEY)
    enc, dec = aead.encrypt, aead.decrypt
    ct = enc(NONCE, payload, AD)

    def aes_seal() -> object:
        return enc(NONCE, payload, AD)

    def aes_open() -> object:
        return dec(NONCE, ct, AD)

    assert aes_open() == payload
    ops["crypt_aes"] = (aes_seal, aes_open)
    try:
        assert crypto_aead_aes256gcm_encrypt(payload, AD, NONCE, KEY) == ct, "bindings disagree"
    except RuntimeError:  # libsodium's AES-GCM needs the CPU's AES instructions
        return ops

    def nacl_aes_seal() -> object:
        return crypto_aead_aes256gcm_encrypt(payload, AD, NONCE, KEY)

    def nacl_aes_open() -> object:
        return crypto_aead_aes256gcm_decrypt(ct, AD, NONCE, KEY)

    ops["nacl_aes"] = (nacl_aes_seal, nacl_aes_open)
    return ops


def nonce_ops() -> dict[str, Callable[[], object]]:
    buf = bytearray(12)
    le = struct.Struct("<4xQ")
    pack_into, pack = le.pack_into, le.pack
    zero4 = b"\x00\x00\x00\x00"
    c = COUNTER

    def struct_pack_into() -> object:
        return pack_into(buf, 0, c)

    def struct_pack() -> object:
        return pack(c)

    def int_to_bytes() -> object:
        return zero4 + c.to_bytes(8, "little")

    struct_pack_into()
    assert bytes(buf) == struct_pack() == int_to_bytes() == NONCE
    ops = {
        "struct.pack_into(reused bytearray)": struct_pack_into,
        "struct.pack -> new bytes": struct_pack,
        "b'\\0'*4 + int.to_bytes(8, 'little')": int_to_bytes,
    }
    if ChaCha20Poly1305 is not None:
        # what matters is nonce + AEAD call together: the binding reads the buffer it is given
        enc = ChaCha20Poly1305(KEY).encrypt
        payload = bytes(64)

        def into_then_encrypt() -> object:
            pack_into(buf, 0, c)
            return enc(buf, payload, AD)

        def pack_then_encrypt() -> object:
            return enc(pack(c), payload, AD)

        ops["pack_into(bytearray) + crypt seal 64 B"] = into_then_encrypt
        ops["pack -> bytes + crypt seal 64 B"] = pack_then_encrypt
    return ops


def packet_ops(size: int) -> dict[str, Callable[[], object]]:
    """Whole-packet seal variants: header + AEAD + the object handed to the socket."""
    payload = bytes(size)
    ops: dict[str, Callable[[], object]] = {}
    nonce = bytearray(12)
    le_pack_into = struct.Struct("<4xQ").pack_into
    hpack, hpack_into = HEADER.pack, HEADER.pack_into
    le_pack = struct.Struct("<4xQ").pack
    c = COUNTER

    def nacl_concat() -> object:
        h = hpack(1, 1, 0, 7, c)
        return h + crypto_aead_chacha20poly1305_ietf_encrypt(payload, h, le_pack(c), KEY)

    ops["nacl: header + encrypt() (concat)"] = nacl_concat
    if ChaCha20Poly1305 is not None:
        aead = ChaCha20Poly1305(KEY)
        enc = aead.encrypt

        def crypt_concat() -> object:
            le_pack_into(nonce, 0, c)
            h = hpack(1, 1, 0, 7, c)
            return h + enc(nonce, payload, h)

        def crypt_pair() -> object:
            le_pack_into(nonce, 0, c)
            h = hpack(1, 1, 0, 7, c)
            return [h, enc(nonce, payload, h)]

        def crypt_pair_bytes_nonce() -> object:
            h = hpack(1, 1, 0, 7, c)
            return [h, enc(le_pack(c), payload, h)]

        ops["crypt: header + encrypt() (concat)"] = crypt_concat
        ops["crypt: [header, encrypt()]"] = crypt_pair
        ops["crypt: [header, encrypt()], nonce new bytes"] = crypt_pair_bytes_nonce
        if hasattr(aead, "encrypt_into"):
            enc_into = aead.encrypt_into
            total = 16 + size + TAG

            def crypt_into_fresh() -> object:
                le_pack_into(nonce, 0, c)
                out = bytearray(total)
                hpack_into(out, 0, 1, 1, 0, 7, c)
                mv = memoryview(out)
                enc_into(nonce, payload, mv[:16], mv[16:])
                return out

            ops["crypt: encrypt_into(fresh bytearray)"] = crypt_into_fresh
    try:
        from pipeline.crypto.ciphers import DataCipher
        from pipeline.crypto.datapath import RecvSession, SendSession
    except ImportError:
        return ops
    for cipher in DataCipher:
        ops.update(datapath_ops(SendSession, RecvSession, cipher, payload))
    return ops


def datapath_ops(
    send_type: Any, recv_type: Any, cipher: Any, payload: bytes
) -> dict[str, Callable[[], object]]:
    """``pipeline.crypto.datapath``'s own seal and open, with ``cipher``."""
    ops: dict[str, Callable[[], object]] = {}
    send = send_type(KEY, index=7, created=0.0, cipher=cipher)
    recv = recv_type(KEY, index=7, created=0.0, cipher=cipher)
    datagram = b"".join(send.seal(1, payload))
    assert bytes(recv.open(datagram)) == payload
    seal = send.seal

    def dp_seal() -> object:
        return seal(1, payload)

    ops[f"datapath.SendSession.seal {cipher}"] = dp_seal
    # open() of a fresh datagram each time would need a sender in the loop; instead the
    # receiver's window is rewound so the same datagram passes the replay check again.
    window = recv.window
    dp_open_fn = recv.open

    def dp_open() -> object:
        window.reset()
        return dp_open_fn(datagram)

    view = memoryview(datagram)

    def dp_open_view() -> object:
        window.reset()
        return dp_open_fn(view)

    def reset_only() -> object:
        window.reset()
        return None

    ops[f"datapath.RecvSession.open(bytes)+reset {cipher}"] = dp_open
    ops[f"datapath.RecvSession.open(view)+reset {cipher}"] = dp_open_view
    ops[f"  (window.reset alone) {cipher}"] = reset_only
    return ops


def mbps(size: int, ns: float) -> float:
    return size / ns * 1e3 if size else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="64,1400,9000,65535")
    ap.add_argument("--target", type=float, default=0.15, help="seconds per timed run")
    opts = ap.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    runs, target = opts.runs, opts.target

    import nacl

    versions = f"PyNaCl {nacl.__version__}"
    if ChaCha20Poly1305 is not None:
        import cryptography

        versions += f", cryptography {cryptography.__version__}"
        has_into = hasattr(ChaCha20Poly1305, "encrypt_into")
        versions += f" (encrypt_into/decrypt_into: {'yes' if has_into else 'no'})"
    print(f"Python {sys.version.split()[0]}, {versions}")
    print(f"median of {runs} runs; ns/packet includes the Python call; MB/s of payload")

    loop = measure(lambda: None, runs, target)
    print(f"empty loop (lambda call): {loop.median:.0f} ns\n")

    head = f"{'size':>6} {'binding':<11} {'op':<5} {'ns/pkt':>9} {'MB/s':>9} {'min ns':>9}"
    print(head)
    print("-" * len(head))
    medians: dict[tuple[int, str, str], float] = {}
    for size in sizes:
        for name, (seal, open_) in binding_ops(size).items():
            for op, fn in (("seal", seal), ("open", open_)):
                cell = measure(fn, runs, target)
                medians[size, name, op] = cell.median
                print(
                    f"{size:>6} {name:<11} {op:<5} {cell.median:>9.0f} "
                    f"{mbps(size, cell.median):>9.1f} {cell.min:>9.0f}",
                    flush=True,
                )
    if AESGCM is not None:
        print("\nAES-256-GCM / ChaCha20-Poly1305, cryptography's calls (medians above)")
        for size in sizes:
            seal_ratio = medians[size, "crypt_aes", "seal"] / medians[size, "crypt", "seal"]
            open_ratio = medians[size, "crypt_aes", "open"] / medians[size, "crypt", "open"]
            print(f"{size:>6} seal {seal_ratio:.2f}  open {open_ratio:.2f}")

    print(f"\nnonce construction (12 bytes: 4 zero + u64 LE), median of {runs}")
    print(f"{'method':<40} {'ns':>7} {'min ns':>7}")
    for name, fn in nonce_ops().items():
        cell = measure(fn, runs, target)
        print(f"{name:<40} {cell.median:>7.0f} {cell.min:>7.0f}", flush=True)

    print(f"\nwhole packet (header + nonce + AEAD + output object), median of {runs}")
    print(f"{'size':>6} {'variant':<58} {'ns/pkt':>9} {'MB/s':>9} {'min ns':>9}")
    for size in sizes:
        for name, fn in packet_ops(size).items():
            cell = measure(fn, runs, target)
            rate = "-" if name.startswith(" ") else f"{mbps(size, cell.median):.1f}"
            print(
                f"{size:>6} {name:<58} {cell.median:>9.0f} {rate:>9} {cell.min:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
