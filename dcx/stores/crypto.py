"""Secrets at rest in a bucket store: the cluster's private SSH key and engine secrets (tokens,
kubeconfigs) are sealed with AES-256-GCM under a key derived from DCX_STATE_KEY, bound to the object's
path (a sealed object cannot be swapped for another). Nothing else in the store is secret: state.json
holds no tokens or passwords (swarm join tokens are read from a manager when needed, never stored;
become passwords are never written)."""

from __future__ import annotations

import os

from dcx.errors import InputError

MAGIC = b"dcx-sealed-v1\n"
NONCE = 12
# A fixed salt: one passphrase opens every store it sealed (export/migrate move files, not keys).
SALT = b"dcx state store key v1"


def is_secret(rel: str) -> bool:
    """Files of a cluster directory that must never be stored in clear."""
    return rel == "ssh/id_ed25519" or rel.startswith("secrets/")


class Sealer:
    def __init__(self, passphrase: str) -> None:
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        if len(passphrase) < 16:
            raise InputError("DCX_STATE_KEY: use at least 16 characters (e.g. `openssl rand -base64 32`)")
        self._key = Scrypt(salt=SALT, length=32, n=2**14, r=8, p=1).derive(passphrase.encode())

    def seal(self, rel: str, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(NONCE)
        return MAGIC + nonce + AESGCM(self._key).encrypt(nonce, data, rel.encode())

    def open(self, rel: str, blob: bytes, where: str) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not blob.startswith(MAGIC):
            raise InputError(f"{where}: not sealed by dcx; a secret must never be stored in clear: remove it")
        body = blob[len(MAGIC):]
        try:
            return AESGCM(self._key).decrypt(body[:NONCE], body[NONCE:], rel.encode())
        except InvalidTag:
            raise InputError(f"{where}: DCX_STATE_KEY does not open it (another key sealed it)") from None


def sealer_from_env() -> Sealer | None:
    key = os.environ.get("DCX_STATE_KEY", "")
    return Sealer(key) if key else None
