"""WireGuard keys (X25519, base64) made with `cryptography`, so no `wg` binary is needed in a job."""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

_RAW = dict(encoding=serialization.Encoding.Raw)


def generate_private() -> str:
    raw = X25519PrivateKey.generate().private_bytes(
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
        **_RAW,
    )
    return base64.b64encode(raw).decode()


def public_from_private(private_b64: str) -> str:
    key = X25519PrivateKey.from_private_bytes(decode(private_b64))
    return base64.b64encode(
        key.public_key().public_bytes(format=serialization.PublicFormat.Raw, **_RAW)
    ).decode()


def generate_psk() -> str:
    import os

    return base64.b64encode(os.urandom(32)).decode()


def decode(b64: str) -> bytes:
    """32 raw bytes from a base64 key; ValueError when it is not one."""
    try:
        raw = base64.b64decode(b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if len(raw) != 32:
        raise ValueError(f"{len(raw)} bytes, not 32")
    return raw


def is_key(b64: str) -> bool:
    try:
        decode(b64)
        return True
    except ValueError:
        return False
