"""Command-signing keys: the vehicle's trusted keys file, and key generation for the backend.

Remote commands are signed with Ed25519 keys that are *not* the TLS keys: the TLS key
proves which connection a message came over, the command key proves who decided the
command, end to end through the broker. Provisioning puts a trusted keys file on the
vehicle (referenced by the agent config); its format, version 1 (YAML, or JSON, which is
YAML too)::

    version: 1
    keys:
      - kid: fleet-2025-01            # key id named by every command signed with it
        issuer: fleet-backend         # replay counters are per issuer, shared by its keys
        public_key: A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=   # raw 32 bytes, base64; or a PEM block
        not_before: 2025-01-01T00:00:00Z    # optional, ISO 8601 with a timezone
        not_after: 2026-01-01T00:00:00Z     # optional

``kid`` and ``issuer`` are 1-64 characters ``A-Z a-z 0-9 . _ : -`` starting with a letter
or digit. Key ids are unique, and so are public keys (one key belongs to one issuer).
Rotation: add the new key under a new kid, move the backend to it, then remove the old
entry (or give it a ``not_after``). The file must not be writable by group or others:
whoever can add a line to it can command the vehicle.

The backend's private key is a PKCS#8 PEM file written 0600 by
:func:`generate_signing_key`, which returns the public entry to add to vehicles' trusted
keys files (:func:`add_trusted_key` writes one).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.errors import ConfigError, ConfigProblem
from agent.pki import write_atomic
from agent.profile.loader import validate_model
from agent.profile.yamlsrc import load_yaml_file

TOKEN_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
TOKEN_RE: Final = re.compile(TOKEN_PATTERN)
TRUSTED_KEYS_VERSION: Final = 1
MAX_PRIVATE_KEY_BYTES: Final = 16 * 1024


def _public_key(text: str) -> Ed25519PublicKey:
    """Parse a raw base64 key or a PEM SubjectPublicKeyInfo block; ValueError says why not."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as exc:
            raise ValueError(f"not a readable PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"must be an Ed25519 key, this PEM holds {type(key).__name__}")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be 32 bytes in base64 or a PEM block") from None
    if len(raw) != 32:
        raise ValueError(f"a raw Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _ms(value: dt.datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


class TrustedKeyEntry(BaseModel):
    """One entry of the trusted keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kid: str = Field(pattern=TOKEN_PATTERN, description="key id, named by every command signed with the key")
    issuer: str = Field(pattern=TOKEN_PATTERN, description="who signs with it; replay counters are per issuer")
    public_key: str = Field(description="Ed25519 public key: raw 32 bytes in base64, or a PEM block")
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None

    @field_validator("public_key")
    @classmethod
    def _parses(cls, value: str) -> str:
        _public_key(value)
        return value

    @model_validator(mode="after")
    def _window(self) -> TrustedKeyEntry:
        if self.not_before is not None and self.not_after is not None and self.not_before >= self.not_after:
            raise ValueError("not_before must be earlier than not_after")
        return self

    def to_yaml(self) -> str:
        """The entry as a YAML list item, ready to paste under ``keys:``."""
        return yaml.safe_dump([self.to_document()], sort_keys=False)

    def to_document(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kid": self.kid, "issuer": self.issuer, "public_key": self.public_key}
        for name in ("not_before", "not_after"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat().replace("+00:00", "Z")
        return out


class TrustedKeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    keys: list[TrustedKeyEntry] = Field(min_length=1, description="at least one key; "
                                        "leave remote commands unconfigured to have none")


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A key the vehicle accepts commands from, with its validity window in ms since the epoch."""

    kid: str
    issuer: str
    public_key: Ed25519PublicKey
    not_before_ms: int | None = None
    not_after_ms: int | None = None

    @classmethod
    def from_entry(cls, entry: TrustedKeyEntry) -> TrustedKey:
        return cls(entry.kid, entry.issuer, _public_key(entry.public_key),
                   _ms(entry.not_before), _ms(entry.not_after))

    def window_problem(self, now_ms: int, skew_ms: int) -> str | None:
        """Why the key may not be used at ``now_ms`` (allowing ``skew_ms``), or None."""
        if self.not_before_ms is not None and now_ms + skew_ms < self.not_before_ms:
            return f"key {self.kid} is not valid before {self.not_before_ms} ms"
        if self.not_after_ms is not None and now_ms - skew_ms > self.not_after_ms:
            return f"key {self.kid} was valid until {self.not_after_ms} ms"
        return None


class Keyring:
    """The trusted command keys, by key id. Immutable; reload by building a new one."""

    def __init__(self, keys: Iterable[TrustedKey]) -> None:
        self._by_kid: dict[str, TrustedKey] = {}
        seen_raw: dict[bytes, str] = {}
        for key in keys:
            if key.kid in self._by_kid:
                raise ValueError(f"duplicate key id {key.kid!r}")
            raw = raw_public_key(key.public_key)
            if raw in seen_raw:
                raise ValueError(f"key {key.kid!r} has the same public key as {seen_raw[raw]!r}")
            seen_raw[raw] = key.kid
            self._by_kid[key.kid] = key

    def get(self, kid: str) -> TrustedKey | None:
        return self._by_kid.get(kid)

    def __len__(self) -> int:
        return len(self._by_kid)

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._by_kid.values())

    @property
    def issuers(self) -> set[str]:
        return {key.issuer for key in self._by_kid.values()}


def load_keyring(path: str | Path) -> Keyring:
    """Load and validate a trusted keys file; every problem is a located ConfigError."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError.single(str(path), "trusted command keys file not found") from None
    except OSError as exc:
        raise ConfigError.single(str(path), f"cannot read: {exc}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError.single(str(path), "not a regular file")
    if mode & 0o022:
        raise ConfigError.single(str(path), f"mode {stat.S_IMODE(mode):04o} lets group or others write it; "
                                 "anyone who can add a key can command the vehicle (chmod go-w)")
    data, source = load_yaml_file(path)
    spec: TrustedKeysFile = validate_model(TrustedKeysFile, data, source)
    problems: list[ConfigProblem] = []
    first_kid: dict[str, int] = {}
    first_raw: dict[bytes, int] = {}
    for i, entry in enumerate(spec.keys):
        if entry.kid in first_kid:
            problems.append(source.problem(("keys", i, "kid"),
                                           f"duplicate kid {entry.kid!r} (also keys[{first_kid[entry.kid]}])"))
        first_kid.setdefault(entry.kid, i)
        raw = raw_public_key(_public_key(entry.public_key))
        if raw in first_raw:
            problems.append(source.problem(("keys", i, "public_key"),
                                           f"same public key as keys[{first_raw[raw]}]; a key belongs to one "
                                           "kid and one issuer"))
        first_raw.setdefault(raw, i)
    if problems:
        raise ConfigError(problems)
    return Keyring(TrustedKey.from_entry(entry) for entry in spec.keys)


# --------------------------------------------------------------------------- backend side


def public_entry(private_key: Ed25519PrivateKey, *, kid: str, issuer: str,
                 not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> TrustedKeyEntry:
    """The trusted keys file entry for a signing key (public key as raw base64)."""
    raw = raw_public_key(private_key.public_key())
    return TrustedKeyEntry(kid=kid, issuer=issuer, public_key=base64.b64encode(raw).decode("ascii"),
                           not_before=not_before, not_after=not_after)


def generate_signing_key(path: str | Path, *, kid: str, issuer: str, not_before: dt.datetime | None = None,
                         not_after: dt.datetime | None = None, overwrite: bool = False) -> TrustedKeyEntry:
    """Create an Ed25519 command-signing key at ``path`` (PKCS#8 PEM, mode 0600).

    Returns the public entry for vehicles' trusted keys files (``entry.to_yaml()`` prints
    it). An existing key file is never replaced unless ``overwrite`` is set: losing a
    signing key means re-provisioning every vehicle that trusts it.
    """
    path = Path(path)
    private_key = Ed25519PrivateKey.generate()
    entry = public_entry(private_key, kid=kid, issuer=issuer, not_before=not_before, not_after=not_after)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to replace a signing key")
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    write_atomic(path, pem, 0o600)
    return entry


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a command-signing key; refuses a file that group or others can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError.single(str(path), f"mode {stat.S_IMODE(mode):04o}: a signing key must be "
                                     "readable by its owner only (chmod 600)")
        data = path.read_bytes()[:MAX_PRIVATE_KEY_BYTES + 1]
    except FileNotFoundError:
        raise ConfigError.single(str(path), "signing key file not found") from None
    except OSError as exc:
        raise ConfigError.single(str(path), f"cannot read: {exc}") from None
    if len(data) > MAX_PRIVATE_KEY_BYTES:
        raise ConfigError.single(str(path), "too large to be a signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError.single(str(path), f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError.single(str(path), f"must be an Ed25519 key, found {type(key).__name__}")
    return key


def add_trusted_key(path: str | Path, entry: TrustedKeyEntry) -> None:
    """Add ``entry`` to a trusted keys file (created if missing), written atomically, mode 0644.

    The file is re-written from its parsed content (comments are not kept); a duplicate
    kid or public key is refused with the same ConfigError loading would give.
    """
    path = Path(path)
    entries: list[TrustedKeyEntry] = []
    if path.exists():
        data, source = load_yaml_file(path)
        entries = list(validate_model(TrustedKeysFile, data, source).keys)
    raw = raw_public_key(_public_key(entry.public_key))
    for i, old in enumerate(entries):
        if old.kid == entry.kid or raw_public_key(_public_key(old.public_key)) == raw:
            raise ConfigError.single(str(path), f"keys[{i}] already has kid {old.kid!r} or the same public key",
                                     path=f"keys[{i}]")
    document = {"version": TRUSTED_KEYS_VERSION, "keys": [e.to_document() for e in [*entries, entry]]}
    write_atomic(path, yaml.safe_dump(document, sort_keys=False).encode("utf-8"), 0o644)
