"""A bundle's files: listing, checksums, and reading a bundle that arrived as a zip.

Shared by pack, verify, import and diff, so each sees the same file list and the same digest.
A zip is extracted into a temporary folder with every entry checked first: no absolute names, no
``..``, no links, no more than ``MAX_UNPACKED_BYTES`` in all (zip-slip and zip bombs).
"""

from __future__ import annotations

import contextlib
import hashlib
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from medtl.errors import MedtlError
from medtl.fileio import sha256_file

CHECKSUMS = "SHA256SUMS"
PROVENANCE = "provenance.json"
MAX_UNPACKED_BYTES = 4 << 30
#: Produced by running a bundle, never shared: training logs may name local files.
RUN_OUTPUTS = ("runs", "eval", "cache", "__pycache__")


def bundle_files(root: str | Path) -> list[str]:
    """Every shared file under ``root`` as a sorted POSIX path, without run outputs and hidden files."""
    root = Path(root)
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in RUN_OUTPUTS or any(p.startswith(".") for p in rel.parts) or not path.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def sha256sums(root: str | Path, files: list[str] | None = None) -> dict[str, str]:
    """``{path: sha256}`` of the bundle's files (``SHA256SUMS`` itself excluded)."""
    root = Path(root)
    return {f: sha256_file(root / f) for f in (files or bundle_files(root)) if f != CHECKSUMS}


def format_sha256sums(sums: dict[str, str]) -> str:
    """The ``sha256sum`` format, so a receiving site can also check with ``sha256sum -c SHA256SUMS``."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def parse_sha256sums(text: str, path: str = CHECKSUMS) -> dict[str, str]:
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name:
            raise MedtlError(f"line {n} is not '<sha256>  <file>'", path=path)
        out[name.lstrip("*")] = digest.lower()
    return out


def bundle_digest(root: str | Path) -> str:
    """One sha256 for a bundle's content: the hash of its sorted checksum list (provenance and
    the checksum file itself left out, so packing does not change it)."""
    sums = {k: v for k, v in sha256sums(root).items() if k != PROVENANCE}
    return hashlib.sha256(format_sha256sums(sums).encode("utf-8")).hexdigest()


def _check_entry(info: zipfile.ZipInfo, archive: str) -> None:
    name = PurePosixPath(info.filename)
    if info.filename.startswith(("/", "\\")) or ":" in name.parts[0] or ".." in name.parts or "\\" in info.filename:
        raise MedtlError(f"entry {info.filename!r} would be written outside the bundle folder", path=archive,
                         hint="the archive is damaged or was built to overwrite files; do not unpack it")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise MedtlError(f"entry {info.filename!r} is a symbolic link", path=archive, hint="bundles hold plain files only")


def extract_zip(archive: str | Path, dest: str | Path) -> Path:
    """Extract a bundle zip into ``dest`` after checking every entry; returns the bundle root
    (the single top-level folder holding ``configs/``, or ``dest`` itself)."""
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_entry(info, archive.name)
            if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                raise MedtlError(f"unpacks to more than {MAX_UNPACKED_BYTES >> 30} GiB", path=archive.name)
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise MedtlError(f"not a readable zip archive ({exc})", path=archive.name) from None
    tops = [p for p in dest.iterdir()]
    if len(tops) == 1 and tops[0].is_dir() and not (dest / "configs").exists():
        return tops[0]
    return dest


@contextlib.contextmanager
def open_bundle(path: str | Path) -> Iterator[Path]:
    """The bundle folder for ``path``: the folder itself, or a zip extracted to a temporary folder."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise MedtlError("no such bundle folder or zip", path=path.name)
    with tempfile.TemporaryDirectory(prefix="medtl-bundle-") as tmp:
        yield extract_zip(path, tmp)


__all__ = ["CHECKSUMS", "PROVENANCE", "bundle_digest", "bundle_files", "extract_zip", "format_sha256sums", "open_bundle",
           "parse_sha256sums", "sha256sums"]
