"""Tests for pipeline.crypto.noise: every cacophony vector byte for byte, then the failure modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt

from pipeline.crypto import noise
from pipeline.crypto.noise import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    CipherState,
    HandshakeState,
    NoiseError,
    Token,
    protocol_name_parts,
    public_key,
)

# The cacophony project's published vectors (public domain), the suites libsodium can run;
# see tests/data/noise/README.md.
VECTORS_PATH = Path(__file__).resolve().parent / "data/noise/cacophony-25519-chachapoly.json"
VECTOR_COUNT = 177

# Fixed keys for the unit tests (any 32 bytes are an X25519 private key).
INIT_S = bytes(range(1, 33))
RESP_S = bytes(range(101, 133))
INIT_E = bytes(range(201, 233))
RESP_E = bytes(range(33, 65))
PSK = bytes([7]) * 32


def load_vectors() -> list[Any]:
    """The vectors as test parameters; a missing file becomes one failing parameter, not a skip."""
    if not VECTORS_PATH.is_file():
        return [pytest.param(None, id="vectors-missing")]
    vectors = json.loads(VECTORS_PATH.read_text())["vectors"]
    return [pytest.param(v, id=f"{v['protocol_name']}-{i}") for i, v in enumerate(vectors)]


def unhex(vector: dict[str, Any], key: str) -> bytes | None:
    return bytes.fromhex(vector[key]) if key in vector else None


def vector_side(vector: dict[str, Any], side: str) -> HandshakeState:
    return HandshakeState(
        vector["protocol_name"],
        initiator=side == "init",
        prologue=bytes.fromhex(vector[f"{side}_prologue"]),
        s=unhex(vector, f"{side}_static"),
        e=unhex(vector, f"{side}_ephemeral"),
        rs=unhex(vector, f"{side}_remote_static"),
        psks=[bytes.fromhex(p) for p in vector.get(f"{side}_psks", [])],
    )


# -- the published vectors -------------------------------------------------------------------


def test_vector_count() -> None:
    assert VECTORS_PATH.is_file(), f"test vectors missing: {VECTORS_PATH}"
    assert len(json.loads(VECTORS_PATH.read_text())["vectors"]) == VECTOR_COUNT


@pytest.mark.parametrize("vector", load_vectors())
def test_cacophony_vector(vector: dict[str, Any] | None) -> None:
    if vector is None:
        pytest.fail(f"test vectors missing: {VECTORS_PATH}")
    init, resp = vector_side(vector, "init"), vector_side(vector, "resp")
    one_way = init.protocol.pattern.one_way
    transport: tuple[CipherState, CipherState, CipherState, CipherState] | None = None
    for i, message in enumerate(vector["messages"]):
        payload, expected = bytes.fromhex(message["payload"]), bytes.fromhex(message["ciphertext"])
        from_init = one_way or i % 2 == 0
        if not init.complete:
            sender, receiver = (init, resp) if from_init else (resp, init)
            assert sender.write_message(payload) == expected, f"handshake message {i}"
            assert receiver.read_message(expected) == payload
            continue
        if transport is None:
            assert resp.complete
            assert init.handshake_hash == resp.handshake_hash
            assert init.handshake_hash.hex() == vector["handshake_hash"]
            transport = (*init.split(), *resp.split())
        i_to_r_init, r_to_i_init, i_to_r_resp, r_to_i_resp = transport
        send, recv = (i_to_r_init, i_to_r_resp) if from_init else (r_to_i_resp, r_to_i_init)
        assert send.encrypt_with_ad(b"", payload) == expected, f"transport message {i}"
        assert recv.decrypt_with_ad(b"", expected) == payload
    assert transport is not None, "no transport messages after the handshake"


# -- helpers for the unit tests --------------------------------------------------------------


def pair(name: str, **overrides: Any) -> tuple[HandshakeState, HandshakeState]:
    """Initiator and responder for ``name`` with the fixed keys the pattern needs."""
    pattern = protocol_name_parts(name).pattern
    psks = [PSK] * sum(m.count(Token.PSK) for m in pattern.messages)
    init_kwargs: dict[str, Any] = {"s": INIT_S, "e": INIT_E, "psks": psks}
    resp_kwargs: dict[str, Any] = {"s": RESP_S, "e": RESP_E, "psks": psks}
    if Token.S in pattern.responder_pre:
        init_kwargs["rs"] = public_key(RESP_S)
    if Token.S in pattern.initiator_pre:
        resp_kwargs["rs"] = public_key(INIT_S)
    init_kwargs.update(overrides.get("init", {}))
    resp_kwargs.update(overrides.get("resp", {}))
    return (
        HandshakeState(name, initiator=True, **init_kwargs),
        HandshakeState(name, initiator=False, **resp_kwargs),
    )


def run_handshake(init: HandshakeState, resp: HandshakeState) -> None:
    sender, receiver = init, resp
    while not init.complete:
        assert receiver.read_message(sender.write_message(b"hi")) == b"hi"
        sender, receiver = receiver, sender
    assert resp.complete


# -- handshake failures ----------------------------------------------------------------------


def test_tampered_message_raises_and_state_does_not_advance() -> None:
    init, resp = pair("Noise_XX_25519_ChaChaPoly_BLAKE2b")
    resp.read_message(init.write_message(b""))
    genuine = resp.write_message(b"responder payload")
    before = (init.message_index, init.handshake_hash, init.remote_ephemeral)
    for i in range(len(genuine)):
        tampered = bytearray(genuine)
        tampered[i] ^= 0x80
        with pytest.raises(NoiseError):
            init.read_message(bytes(tampered))
        assert (init.message_index, init.handshake_hash, init.remote_ephemeral) == before
        assert init.remote_static is None
    with pytest.raises(NoiseError, match="noise_truncated"):
        init.read_message(genuine[:40])
    assert init.read_message(genuine) == b"responder payload"
    assert init.remote_static == public_key(RESP_S)
    resp.read_message(init.write_message(b""))
    assert init.complete and resp.complete
    assert init.handshake_hash == resp.handshake_hash
    (i_to_r, _), (r_from_i, _) = init.split(), resp.split()
    assert r_from_i.decrypt_with_ad(b"", i_to_r.encrypt_with_ad(b"", b"data")) == b"data"


def test_ik_wrong_remote_static_fails_at_responder() -> None:
    wrong = public_key(bytes([42]) * 32)
    init, resp = pair("Noise_IK_25519_ChaChaPoly_SHA256", init={"rs": wrong})
    with pytest.raises(NoiseError, match="noise_decrypt_failed"):
        resp.read_message(init.write_message(b"hello"))
    assert resp.message_index == 0
    assert resp.remote_static is None


def test_ik_low_order_ephemeral_is_a_noise_error() -> None:
    _, resp = pair("Noise_IK_25519_ChaChaPoly_BLAKE2b")
    with pytest.raises(NoiseError, match="noise_bad_public_key"):
        resp.read_message(bytes(32 + 48 + 16))


def test_psk_mismatch_fails_and_multi_psk_names_work() -> None:
    name = "Noise_NNpsk0+psk2_25519_ChaChaPoly_BLAKE2b"
    assert protocol_name_parts(name).pattern.messages == (
        (Token.PSK, Token.E),
        (Token.E, Token.EE, Token.PSK),
    )
    run_handshake(*pair(name))
    init, resp = pair(name, resp={"psks": [PSK, bytes(32)]})
    resp.read_message(init.write_message(b""))
    with pytest.raises(NoiseError):
        init.read_message(resp.write_message(b""))


def test_out_of_turn_and_after_completion() -> None:
    init, resp = pair("Noise_NN_25519_ChaChaPoly_BLAKE2b")
    with pytest.raises(NoiseError, match="noise_unexpected_message"):
        init.read_message(bytes(48))
    with pytest.raises(ValueError):
        resp.write_message(b"")
    with pytest.raises(ValueError):
        init.split()
    run_handshake(init, resp)
    with pytest.raises(ValueError):
        init.write_message(b"")
    with pytest.raises(NoiseError, match="noise_unexpected_message"):
        resp.read_message(bytes(48))
    init.split()
    with pytest.raises(ValueError):
        init.split()


def test_message_length_limits() -> None:
    init, resp = pair("Noise_NN_25519_ChaChaPoly_BLAKE2b")
    with pytest.raises(ValueError):
        init.write_message(bytes(MAX_MESSAGE_LEN - 32 + 1))  # e is 32 bytes of the message
    assert init.message_index == 0
    message = init.write_message(bytes(MAX_MESSAGE_LEN - 32))
    assert len(message) == MAX_MESSAGE_LEN
    with pytest.raises(NoiseError, match="noise_oversize"):
        resp.read_message(message + b"x")
    assert resp.read_message(message) == bytes(MAX_MESSAGE_LEN - 32)


def test_rng_generates_the_ephemeral() -> None:
    draws: list[int] = []

    def rng(n: int) -> bytes:
        draws.append(n)
        return bytes([len(draws)]) * n

    init, resp = pair("Noise_XX_25519_ChaChaPoly_SHA512", init={"e": None, "rng": rng})
    run_handshake(init, resp)
    assert draws == [32]
    assert resp.remote_ephemeral == public_key(bytes([1]) * 32)


# -- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Noise_ZZ_25519_ChaChaPoly_BLAKE2b",
        "Noise_XX_448_ChaChaPoly_BLAKE2b",
        "Noise_XX_25519_AESGCM_SHA256",
        "Noise_XX_25519_ChaChaPoly_BLAKE2s",
        "Noise_XXfallback_25519_ChaChaPoly_BLAKE2b",
        "Noise_NNpsk3_25519_ChaChaPoly_BLAKE2b",
        "Noise_NNpsk01_25519_ChaChaPoly_BLAKE2b",
        "Noise_NNpsk0+psk0_25519_ChaChaPoly_BLAKE2b",
        "Noise_XX_25519_ChaChaPoly_BLAKE2b_extra",
        "NoiseXX_25519_ChaChaPoly_BLAKE2b",
        "",
    ],
)
def test_unknown_protocol_name(name: str) -> None:
    with pytest.raises(ValueError):
        protocol_name_parts(name)
    with pytest.raises(ValueError):
        HandshakeState(name, initiator=True, s=INIT_S, e=INIT_E)


@pytest.mark.parametrize(
    ("name", "initiator", "kwargs"),
    [
        ("Noise_IK_25519_ChaChaPoly_BLAKE2b", True, {"s": INIT_S, "e": INIT_E}),  # no rs
        ("Noise_XX_25519_ChaChaPoly_BLAKE2b", True, {"e": INIT_E}),  # no s
        ("Noise_XX_25519_ChaChaPoly_BLAKE2b", False, {"s": RESP_S}),  # no e, no rng
        ("Noise_XX_25519_ChaChaPoly_BLAKE2b", True, {"s": INIT_S, "e": INIT_E, "rs": RESP_S}),
        ("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2b", True, {"e": INIT_E}),  # no psk
        ("Noise_NN_25519_ChaChaPoly_BLAKE2b", True, {"e": INIT_E, "psks": [PSK]}),
        ("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2b", True, {"e": INIT_E, "psks": [b"short"]}),
        ("Noise_XX_25519_ChaChaPoly_BLAKE2b", True, {"s": b"short", "e": INIT_E}),
        ("Noise_NK_25519_ChaChaPoly_BLAKE2b", True, {"e": INIT_E, "rs": bytes(32)}),  # low order
    ],
)
def test_missing_or_bad_keys(name: str, initiator: bool, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HandshakeState(name, initiator=initiator, **kwargs)


def test_public_key_rfc7748() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    expected = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert public_key(alice).hex() == expected


# -- CipherState -----------------------------------------------------------------------------


def test_cipher_state_nonce_and_failure() -> None:
    key = bytes(range(32))
    sender, receiver = CipherState(key), CipherState(key)
    first, second = sender.encrypt_with_ad(b"ad", b"same"), sender.encrypt_with_ad(b"ad", b"same")
    assert sender.n == 2 and first != second
    with pytest.raises(NoiseError, match="noise_decrypt_failed"):
        receiver.decrypt_with_ad(b"other ad", first)
    with pytest.raises(NoiseError, match="noise_truncated"):
        receiver.decrypt_with_ad(b"ad", first[:15])
    assert receiver.n == 0
    assert receiver.decrypt_with_ad(b"ad", first) == b"same"
    assert receiver.decrypt_with_ad(b"ad", second) == b"same"
    assert receiver.n == 2
    receiver.set_nonce(0)
    assert receiver.decrypt_with_ad(b"ad", first) == b"same"


def test_cipher_state_without_key_is_identity() -> None:
    cipher = CipherState()
    assert not cipher.has_key
    assert cipher.encrypt_with_ad(b"ad", b"clear") == b"clear"
    assert cipher.n == 0
    with pytest.raises(ValueError):
        cipher.rekey()


def test_cipher_state_nonce_exhaustion() -> None:
    cipher = CipherState(bytes(32), n=MAX_NONCE)
    with pytest.raises(ValueError):
        cipher.encrypt_with_ad(b"", b"x")
    with pytest.raises(NoiseError, match="noise_nonce_exhausted"):
        cipher.decrypt_with_ad(b"", bytes(17))
    with pytest.raises(ValueError):
        cipher.set_nonce(MAX_NONCE + 1)


def test_rekey_per_spec() -> None:
    key = bytes(range(32))
    plain, rekeyed = CipherState(key, n=5), CipherState(key, n=5)
    rekeyed.rekey()
    assert rekeyed.n == 5
    before, after = plain.encrypt_with_ad(b"", b"msg"), rekeyed.encrypt_with_ad(b"", b"msg")
    assert before != after
    max_nonce = bytes(4) + MAX_NONCE.to_bytes(8, "little")
    new_key = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(32), b"", max_nonce, key)[:32]
    assert CipherState(new_key, n=5).encrypt_with_ad(b"", b"msg") == after


# -- fuzzing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Noise_IK_25519_ChaChaPoly_BLAKE2b", "Noise_XX_25519_ChaChaPoly_BLAKE2b"]
)
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzz_first_message_raises_only_noise_error(name: str, data: bytes) -> None:
    _, resp = pair(name)
    hash_before = resp.handshake_hash
    try:
        resp.read_message(data)
    except NoiseError:
        assert resp.message_index == 0
        assert resp.handshake_hash == hash_before
        assert resp.remote_ephemeral is None
    else:
        assert name.startswith("Noise_XX") and len(data) >= 32  # XX's first message is clear
        assert resp.message_index == 1


def test_a_key_pair_shows_its_public_key_only() -> None:
    """A key pair's private key stays out of its repr and of rich's pretty print (what a
    traceback with locals would show)."""
    private = bytes(range(32))
    pair = noise._KeyPair.from_private(private)
    assert private.hex() not in repr(pair) and repr(private) not in repr(pair)
    assert repr(pair.public) in repr(pair)
    assert dict(pair.__rich_repr__()) == {"public": pair.public}
