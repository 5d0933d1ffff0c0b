"""Who sent a bundle: an Ed25519 signature over its ``SHA256SUMS``, checked against keys a site trusts.

``SHA256SUMS`` lists every file of a packed bundle, so one signature over it covers them all. The
signature travels in the bundle as ``SHA256SUMS.sig`` (JSON: the signer's label, the public key
and the signature); it proves who signed only when the public key is one the receiving site
already holds (``--trusted-keys``). Keys are made by ``medtl bundle keygen``; the cryptography is
the ``cryptography`` library's, nothing here is hand-made.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medtl.bundle.files import CHECKSUMS, SIGNATURE
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_text


@dataclass(frozen=True)
class Signature:
    """A checked signature: the label the signer gave, its key's fingerprint, and whether the key is trusted."""

    signer: str
    fingerprint: str
    trusted: bool | None  # None when no trusted keys were given


def fingerprint(public_raw: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, owner-only) and ``NAME.pub`` (to give to receiving sites)."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,63}", name):
        raise MedtlError(f"key name {name!r} must be letters, digits, '.', '-' or '_'", hint="e.g. site-a")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{name}.key", out / f"{name}.pub"
    if private.exists():
        raise MedtlError("a key of that name exists", path=private.name, hint="choose another name or folder")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    atomic_write_text(
        public,
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii"),
    )
    return private, public


def _load_private(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise MedtlError(
            f"not a readable private key ({exc.__class__.__name__})",
            path=Path(path).name,
            hint="make one with `medtl bundle keygen NAME`",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MedtlError("not an Ed25519 key", path=Path(path).name, hint="make one with `medtl bundle keygen NAME`")
    return key


def _load_public(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise MedtlError(f"not a readable public key ({exc.__class__.__name__})", path=path.name) from None
    if not isinstance(key, Ed25519PublicKey):
        raise MedtlError("not an Ed25519 public key", path=path.name)
    return key


def trusted_fingerprints(paths: Iterable[str | Path]) -> set[str]:
    """Fingerprints of the public keys in ``paths`` (``.pub`` files, or folders of them)."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.pub")) if path.is_dir() else [path]
    if not files:
        raise MedtlError(
            "no public keys found",
            path=", ".join(str(Path(p).name) for p in paths),
            hint="pass NAME.pub files or a folder of them",
        )
    return {fingerprint(_raw(_load_public(f))) for f in files}


def sign(root: str | Path, private_key: str | Path, signer: str) -> Signature:
    """Sign ``root/SHA256SUMS`` and write ``root/SHA256SUMS.sig``."""
    root = Path(root)
    key = _load_private(private_key)
    checksums = (root / CHECKSUMS).read_bytes()
    public = _raw(key.public_key())
    record = {
        "algorithm": "ed25519",
        "signer": signer,
        "public_key": base64.b64encode(public).decode("ascii"),
        "signature": base64.b64encode(key.sign(checksums)).decode("ascii"),
    }
    atomic_write_text(root / SIGNATURE, json.dumps(record, indent=2) + "\n")
    return Signature(signer, fingerprint(public), None)


def check(root: str | Path, trusted: set[str] | None) -> Signature:
    """The valid signature of ``root/SHA256SUMS``; ``MedtlError`` when it is damaged or does not match."""
    root = Path(root)
    try:
        record = json.loads((root / SIGNATURE).read_text(encoding="utf-8"))
        if record.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {record.get('algorithm')!r}")
        public = base64.b64decode(record["public_key"], validate=True)
        signature = base64.b64decode(record["signature"], validate=True)
        signer = str(record.get("signer", ""))[:64]
        key = Ed25519PublicKey.from_public_bytes(public)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MedtlError(f"not a readable signature ({exc.__class__.__name__}: {exc})", path=SIGNATURE) from None
    try:
        key.verify(signature, (root / CHECKSUMS).read_bytes())
    except InvalidSignature:
        raise MedtlError("the signature does not match SHA256SUMS (changed after signing)", path=SIGNATURE) from None
    except OSError:
        raise MedtlError("signed, but SHA256SUMS is missing", path=SIGNATURE) from None
    fp = fingerprint(public)
    return Signature(signer, fp, None if trusted is None else fp in trusted)


__all__ = ["Signature", "check", "fingerprint", "generate_key", "sign", "trusted_fingerprints"]
