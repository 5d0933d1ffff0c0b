"""Pseudonyms for patient, study and series identifiers.

Identifiers are replaced by salted hashes. The salt is per project and lives beside the scan index
or manifest (``.medtl-salt``), so the same patient gets the same key in every file of one project,
while the key cannot be reversed or matched across projects. Salts never go into bundles.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from medtl.errors import MedtlError
from medtl.fileio import atomic_write_text

SALT_FILENAME = ".medtl-salt"


def salt_path(directory: str | Path) -> Path:
    return Path(directory) / SALT_FILENAME


def load_or_create_salt(directory: str | Path) -> str:
    """Read the project salt stored in ``directory``, creating a random one on first use."""
    path = salt_path(directory)
    if path.exists():
        salt = path.read_text(encoding="utf-8").strip()
        if len(salt) < 16:
            raise MedtlError("salt file is too short or empty", path=path, hint="delete it only if no manifest uses it yet")
        return salt
    salt = secrets.token_hex(32)
    atomic_write_text(path, salt + "\n")
    return salt


def load_salt(directory: str | Path) -> str:
    path = salt_path(directory)
    if not path.exists():
        raise MedtlError(
            "no project salt found", path=path, hint="keep the .medtl-salt written by `medtl scan` beside scan.json"
        )
    return load_or_create_salt(directory)


def pseudonym(value: str, salt: str, prefix: str, length: int = 16) -> str:
    """Keyed hash of an identifier, e.g. ``pat-3f2a...``; empty values map to a fixed 'unknown' key."""
    value = str(value).strip()
    if not value:
        return f"{prefix}-unknown"
    digest = hmac.new(salt.encode("utf-8"), value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:length]}"
