"""Encryption at rest for a tier: AES-256-GCM, one random 96-bit nonce per object, the object key as associated
data (so a blob copied under another name fails to decrypt). Stored form: nonce (12 B) | ciphertext | tag (16 B).

Keys are 32 bytes, given as a file (raw, hex or base64) or the value of an environment variable; the caller
resolves them once at start (cluster config) and passes bytes down. Keys are never logged or put in errors.
"""
from __future__ import annotations

import base64
import binascii
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE, TAG = 12, 16
OVERHEAD = NONCE + TAG


class KeyError_(ValueError):
    pass


def parse_key(raw: bytes, where: str) -> bytes:
    raw_s = raw.strip()
    if len(raw) == 32:
        return raw
    for decode in (binascii.unhexlify, base64.b64decode):
        try:
            k = decode(raw_s)
        except (binascii.Error, ValueError):
            continue
        if len(k) == 32:
            return k
    raise KeyError_(f"{where}: an AES-256 key must be 32 bytes (raw, 64 hex characters or base64); "
                    f"got {len(raw)} bytes that decode to no 32-byte key")


def load_key(key_file: str | None = None, key_env: str | None = None, environ=None) -> bytes:
    if key_file:
        try:
            with open(key_file, "rb") as f:
                return parse_key(f.read(), f"key file {key_file}")
        except OSError as e:
            raise KeyError_(f"key file {key_file}: cannot read: {e.strerror}") from e
    if key_env:
        env = os.environ if environ is None else environ
        if key_env not in env:
            raise KeyError_(f"environment variable {key_env} (named as the tier's key) is not set")
        return parse_key(env[key_env].encode(), f"environment variable {key_env}")
    raise KeyError_("encryption needs key_file or key_env")


def stored_size(plain_size: int) -> int:
    return plain_size + OVERHEAD


def encrypt(key: bytes, data, aad: str) -> bytes:
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, memoryview(data).cast("B"), aad.encode())


class DecryptError(Exception):
    pass


def decrypt(key: bytes, stored, aad: str) -> np.ndarray:
    """Plaintext in a fresh buffer (never in place, so a failed decrypt leaves nothing half-written)."""
    mv = memoryview(stored).cast("B")
    if len(mv) < OVERHEAD:
        raise DecryptError(f"{len(mv)} bytes is shorter than nonce and tag")
    try:
        plain = AESGCM(key).decrypt(bytes(mv[:NONCE]), mv[NONCE:], aad.encode())
    except InvalidTag as e:
        raise DecryptError("authentication tag does not verify (wrong key, or tampered/corrupt object)") from e
    return np.frombuffer(plain, np.uint8)
