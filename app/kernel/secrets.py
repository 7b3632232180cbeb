"""Signing secrets encrypted at rest: a database dump alone cannot sign our webhooks.

Each `whsec_` secret is stored as `aesgcm1$<key id>$<base64url(nonce | ciphertext | tag)>`,
AES-256-GCM under `SECRETS_KEY` (32 random bytes, base64, from the environment), with the
table's name as associated data. The key id (the first 8 hex digits of the key's SHA-256) says
which key wrote a value, so a key can be rotated: set the new key as `SECRETS_KEY`, the old one
in `SECRETS_PREVIOUS_KEYS`, run `smsgate reencrypt-secrets`, then drop the old key.

The column type `EncryptedSecret` encrypts on write and decrypts on read with the process's
keyring, installed at start-up (`install`) by every process that reads or writes secrets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from app.kernel.settings import Settings

PREFIX: Final = "aesgcm1"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
# Binds a ciphertext to its table: one copied into another table does not decrypt there.
ASSOCIATED_DATA: Final = b"signing_secrets"


class SecretsKeyError(RuntimeError):
    """The secrets key is missing or unusable, or a stored value does not decrypt with it."""


def generate_key() -> str:
    """A new `SECRETS_KEY`: 32 random bytes, base64."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def parse_key(text: str) -> bytes:
    """The 32 bytes of a base64 key; `SecretsKeyError` saying what is wrong otherwise."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SecretsKeyError("SECRETS_KEY is not base64") from None
    if len(key) != KEY_BYTES:
        raise SecretsKeyError(f"SECRETS_KEY must be {KEY_BYTES} bytes, base64 (it is {len(key)})")
    return key


def key_id(key: bytes) -> str:
    """Which key encrypted a value: not secret, and too short to help guess the key."""
    return hashlib.sha256(key).hexdigest()[:8]


class Keyring:
    """The current key (encrypts) and previous ones (still decrypt, during a rotation)."""

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        self.current_id = key_id(current)
        self._current = AESGCM(current)
        self._keys = {key_id(key): AESGCM(key) for key in (*previous, current)}

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        """The keyring of `SECRETS_KEY` and `SECRETS_PREVIOUS_KEYS`; `SecretsKeyError` if unset."""
        current = settings.secrets_key.get_secret_value()
        if not current.strip():
            raise SecretsKeyError(
                "SECRETS_KEY is not set: signing secrets are encrypted with it "
                "(make one with `smsgate generate-secrets-key`; README, 'Secrets at rest')"
            )
        previous = [
            parse_key(text)
            for text in settings.secrets_previous_keys.get_secret_value().split(",")
            if text.strip()
        ]
        return cls(parse_key(current), previous)

    def encrypt(self, plaintext: str) -> str:
        """`plaintext` encrypted with the current key, in the stored form."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._current.encrypt(nonce, plaintext.encode(), ASSOCIATED_DATA)
        payload = base64.urlsafe_b64encode(nonce + sealed).decode()
        return f"{PREFIX}${self.current_id}${payload}"

    def decrypt(self, stored: str) -> str:
        """The plaintext of a stored value; `SecretsKeyError` if no key of ours wrote it (or it
        was tampered with, or it is not encrypted at all)."""
        prefix, _, rest = stored.partition("$")
        kid, _, payload = rest.partition("$")
        if prefix != PREFIX:
            raise SecretsKeyError("a stored signing secret is not encrypted")
        cipher = self._keys.get(kid)
        if cipher is None:
            raise SecretsKeyError(
                f"a stored signing secret was encrypted with key {kid}, which is neither "
                "SECRETS_KEY nor one of SECRETS_PREVIOUS_KEYS"
            )
        try:
            raw = base64.urlsafe_b64decode(payload)
            return cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], ASSOCIATED_DATA).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretsKeyError(
                f"a stored signing secret does not decrypt with key {kid}"
            ) from None

    def is_current(self, stored: str) -> bool:
        """Whether the current key wrote `stored` (else `reencrypt-secrets` redoes it)."""
        return stored.startswith(f"{PREFIX}${self.current_id}$")


_installed: Keyring | None = None


def install(keyring: Keyring | None) -> None:
    """Make `keyring` the one `EncryptedSecret` columns use in this process."""
    global _installed
    _installed = keyring


def installed() -> Keyring:
    """The process's keyring; `SecretsKeyError` when none was installed."""
    if _installed is None:
        raise SecretsKeyError("no SECRETS_KEY was loaded in this process")
    return _installed


class EncryptedSecret(TypeDecorator[str]):
    """A text column stored encrypted (see the module's docstring)."""

    impl = String(200)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        """Encrypt on the way in."""
        return None if value is None else installed().encrypt(str(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        """Decrypt on the way out."""
        return None if value is None else installed().decrypt(str(value))
