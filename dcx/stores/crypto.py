"""Secrets at rest in a bucket store: the cluster's private SSH key and engine secrets (tokens,
kubeconfigs) are sealed with AES-256-GCM under a key derived from DCX_STATE_KEY, bound to the object's
path (a sealed object cannot be swapped for another). Nothing else in the store is secret: state.json
holds no tokens or passwords (swarm join tokens are read from a manager when needed, never stored;
become passwords are never written).

With DCX_STATE_KMS_KEY (an AWS KMS key id, ARN or alias; s3:// stores only) each secret is sealed by
envelope encryption instead: KMS GenerateDataKey gives a fresh 256-bit data key per object (in clear
for this process, and wrapped under the KMS key); the object is sealed with it as above (AES-256-GCM,
bound to its path) and carries the wrapped key; opening it asks KMS Decrypt (KeyId pinned to
DCX_STATE_KMS_KEY) to unwrap it. The data key never leaves this process in clear. The KMS encryption
context {"dcx-state-object": PATH} binds the wrapped key to the object as well (and names it in
CloudTrail). gs:// and az:// stores: DCX_STATE_KEY only for now (Cloud KMS and Key Vault are not done)."""

from __future__ import annotations

import os

from dcx.errors import DcxError, InputError

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


KMS_MAGIC = b"dcx-sealed-kms-v1\n"
KMS_ENV = "DCX_STATE_KMS_KEY"


class KmsSealer:
    """Envelope encryption under an AWS KMS key (boto3 `kms`: GenerateDataKey, Decrypt; the endpoint and
    credentials as for S3: AWS_ENDPOINT_URL(_KMS), AWS_PROFILE, OIDC web identity...)."""

    def __init__(self, key_id: str) -> None:
        import boto3

        self.key_id = key_id
        self.client = boto3.client("kms")

    def _call(self, op: str, where: str, **kw: object) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(KeyId=self.key_id, **kw)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "NotFoundException":
                raise InputError(f"{KMS_ENV}: no KMS key '{self.key_id}' (in this account and region)") from None
            if op == "decrypt" and code in ("AccessDeniedException", "IncorrectKeyException",
                                            "InvalidCiphertextException"):
                raise InputError(f"{where}: {KMS_ENV} ({self.key_id}) does not open it (sealed under another "
                                 f"KMS key, or no kms:Decrypt on this one): {code}") from None
            raise DcxError(f"{KMS_ENV}: KMS {op} with key {self.key_id} failed: {code}: "
                           f"{exc.response.get('Error', {}).get('Message', '')}") from None
        except BotoCoreError as exc:
            raise DcxError(f"{KMS_ENV}: KMS {op} failed: {exc}") from None

    def seal(self, rel: str, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        got = self._call("generate_data_key", rel, KeySpec="AES_256", EncryptionContext={"dcx-state-object": rel})
        wrapped, nonce = got["CiphertextBlob"], os.urandom(NONCE)
        return (KMS_MAGIC + len(wrapped).to_bytes(2, "big") + wrapped + nonce
                + AESGCM(got["Plaintext"]).encrypt(nonce, data, rel.encode()))

    def open(self, rel: str, blob: bytes, where: str) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        body = blob[len(KMS_MAGIC):]
        size = int.from_bytes(body[:2], "big")
        wrapped, rest = body[2:2 + size], body[2 + size:]
        if size == 0 or len(rest) <= NONCE:
            raise InputError(f"{where}: a damaged KMS-sealed object (too short): remove it")
        key = self._call("decrypt", where, CiphertextBlob=wrapped,
                         EncryptionContext={"dcx-state-object": rel})["Plaintext"]
        try:
            return AESGCM(key).decrypt(rest[:NONCE], rest[NONCE:], rel.encode())
        except InvalidTag:
            raise InputError(f"{where}: damaged, or not sealed for this path (authentication failed)") from None


class Sealers:
    """What a store's secrets are sealed and opened with: KMS when DCX_STATE_KMS_KEY is set, else
    DCX_STATE_KEY; an object is opened with whichever sealed it (its first line says)."""

    def __init__(self, passphrase: Sealer | None, kms: KmsSealer | None) -> None:
        self.passphrase, self.kms = passphrase, kms

    def seal(self, rel: str, data: bytes) -> bytes:
        sealer = self.kms or self.passphrase
        assert sealer is not None
        return sealer.seal(rel, data)

    def open(self, rel: str, blob: bytes, where: str) -> bytes:
        if blob.startswith(KMS_MAGIC):
            if self.kms is None:
                raise InputError(f"{where}: sealed with AWS KMS: set {KMS_ENV} (the key the cluster was made with)")
            return self.kms.open(rel, blob, where)
        if blob.startswith(MAGIC) and self.passphrase is None:
            raise InputError(f"{where}: sealed with DCX_STATE_KEY: set it (the key the cluster was made with)")
        if self.passphrase is None:
            raise InputError(f"{where}: not sealed by dcx; a secret must never be stored in clear: remove it")
        return self.passphrase.open(rel, blob, where)


def check_kms(scheme: str) -> None:
    """DCX_STATE_KMS_KEY names an AWS KMS key: usable with s3:// stores only (exit 2 otherwise)."""
    if os.environ.get(KMS_ENV) and scheme != "s3":
        article = "an" if scheme == "az" else "a"
        raise InputError(f"{KMS_ENV}: KMS envelope encryption is AWS KMS only, for s3:// stores; {article} "
                         f"{scheme}:// store seals secrets with DCX_STATE_KEY (Cloud KMS and Key Vault are not "
                         "supported yet)")


def sealer_from_env(scheme: str = "s3") -> Sealers | None:
    """The store's sealers from DCX_STATE_KMS_KEY and DCX_STATE_KEY; None when neither is set."""
    check_kms(scheme)
    key, kms = os.environ.get("DCX_STATE_KEY", ""), os.environ.get(KMS_ENV, "").strip()
    if not key and not kms:
        return None
    return Sealers(Sealer(key) if key else None, KmsSealer(kms) if kms else None)
