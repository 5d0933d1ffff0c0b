"""A bundle's files: listing, checksums, and reading a bundle that arrived as a zip.

Shared by pack, verify, import and diff, so each sees the same file list and the same digest.
A zip is extracted into a temporary folder with every entry checked first: no absolute names, no
``..``, no links or special files, no name twice (tools disagree on which copy wins), no more than
``MAX_UNPACKED_BYTES`` in all (zip-slip and zip bombs). A folder is checked the same way: only
plain files and folders, no links that would copy files from outside it. Neither may hold a file
Python or the system would run (``CODE_SUFFIXES``), nor a top-level entry named like a module
this Python can import: ``python -m monai.bundle run`` puts the bundle folder on ``sys.path``,
where a ``medtl/`` or ``torch/`` folder, even without code, would shadow the installed package.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import json
import os
import pkgutil
import stat
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from medtl.errors import MedtlError, first_line
from medtl.fileio import sha256_file, size_text

CHECKSUMS = "SHA256SUMS"
#: The sender's signature over ``SHA256SUMS`` (``medtl.bundle.signing``); not listed in it.
SIGNATURE = "SHA256SUMS.sig"
PROVENANCE = "provenance.json"
#: model-zoo's list of the files too large for its repository (``monai.bundle download_large_files``).
LARGE_FILES = "large_files.yml"
#: Default cap on a bundle's unpacked size; a classification bundle is a few MB to a few hundred.
MAX_UNPACKED_BYTES = 2 << 30
#: A bundle zip's entries, and how many times a member above 1 MiB may inflate: deflate gains about
#: 1.1x on weights and 5-20x on configs and documents; a zip bomb 1000x and more.
MAX_ZIP_MEMBERS, MAX_ZIP_RATIO = 10_000, 200
#: Bounds on an entry's name that every file system takes: a part, the whole name, and folders deep.
MAX_NAME_PART, MAX_NAME, MAX_NAME_DEPTH = 255, 1024, 32
#: Produced by running a bundle, never shared: training logs may name local files.
RUN_OUTPUTS = ("runs", "eval", "cache", "__pycache__")
#: Files that hold code Python or the system would run: a bundle is configs, weights and documents.
CODE_SUFFIXES = frozenset(
    {".py", ".pyw", ".pyc", ".pyo", ".pyd", ".pth", ".so", ".dll", ".dylib", ".exe", ".sh", ".bat", ".whl", ".egg"}
    | {"." + s.rsplit(".", 1)[-1] for s in importlib.machinery.all_suffixes()}
)


def _folded(name: str) -> str:
    """A name as a case-insensitive, Unicode-folding file system or importer may match it."""
    return unicodedata.normalize("NFKC", name).casefold()


@functools.cache
def importable_names() -> frozenset[str]:
    """The top-level modules and packages this Python can import (folded): the standard library,
    every installed distribution's top-level names, and what the import path holds besides the
    working folder."""
    path = [p for p in sys.path if p and Path(p).resolve() != Path.cwd().resolve()]
    names = {
        *sys.stdlib_module_names,
        *sys.builtin_module_names,
        *importlib.metadata.packages_distributions(),
        *(m.name for m in pkgutil.iter_modules(path)),
    }
    return frozenset(_folded(n) for n in names)


def code_problem(rel: str, *, top: bool) -> str | None:
    """Why the bundle entry ``rel`` (POSIX, relative to the bundle) is refused as code, or None;
    ``top`` for an entry directly in the bundle folder, where it could shadow a module."""
    name = rel.rsplit("/", 1)[-1]
    # Windows drops trailing dots and spaces from names: "evil.py." is written as evil.py
    if Path(name.rstrip(". ")).suffix.lower() in CODE_SUFFIXES:
        return f"{rel}: a code file (a bundle ships configs, weights and documents)"
    stem = name.split(".", 1)[0]
    if top and _folded(stem) in importable_names():
        return (
            f"{rel}: named like the importable module {stem!r} (monai.bundle run puts the bundle folder "
            "on sys.path, where it would shadow the installed one)"
        )
    return None


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
    """``{path: sha256}`` of the bundle's files (``SHA256SUMS`` and its signature excluded)."""
    root = Path(root)
    return {f: sha256_file(root / f) for f in (files or bundle_files(root)) if f not in (CHECKSUMS, SIGNATURE)}


def format_sha256sums(sums: dict[str, str]) -> str:
    """The ``sha256sum`` format, so a receiving site can also check with ``sha256sum -c SHA256SUMS``."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def large_files_yml(root: str | Path, files: list[str], url: str = "") -> str:
    """``large_files.yml`` in model-zoo's format listing ``files`` (relative to the bundle ``root``)
    with their sha256. ``url`` is where they are published, empty until they are: with the files in
    place ``python -m monai.bundle download_large_files --bundle_path <root>`` checks their hashes and
    downloads nothing; the publisher puts the release URL of each file there.

    Examples:
        >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "models").mkdir()
        >>> _ = (d / "models" / "model.pt").write_bytes(b"w")
        >>> print(large_files_yml(d, ["models/model.pt"]).splitlines()[-4])
          - path: "models/model.pt"
    """
    root = Path(root)
    lines = [
        "# The bundle's weights with their sha256 (model-zoo's large_files format). url is empty until",
        "# the files are published: with them in place, `python -m monai.bundle download_large_files",
        "# --bundle_path .` checks the hashes and downloads nothing. Written by medtl's export.",
        "large_files:",
    ]
    for name in files:
        lines += [
            f"  - path: {json.dumps(name)}",
            f"    url: {json.dumps(url)}",  # a JSON string is a YAML one
            f'    hash_val: "{sha256_file(root / name)}"',
            '    hash_type: "sha256"',
        ]
    return "\n".join(lines) + "\n"


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
    mode = info.external_attr >> 16
    if not name.parts:
        raise MedtlError(
            f"entry {info.filename!r} names no file", path=archive, hint="the archive is damaged; do not unpack it"
        )
    if info.filename.startswith(("/", "\\")) or ":" in name.parts[0] or ".." in name.parts or "\\" in info.filename:
        raise MedtlError(
            f"entry {info.filename!r} would be written outside the bundle folder",
            path=archive,
            hint="the archive is damaged or was built to overwrite files; do not unpack it",
        )
    if stat.S_ISLNK(mode):
        raise MedtlError(
            f"entry {info.filename!r} is a symbolic link", path=archive, hint="bundles hold plain files only"
        )
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: the archiver stored permissions only
        raise MedtlError(
            f"entry {info.filename!r} is not a plain file (mode {mode:o})",
            path=archive,
            hint="bundles hold plain files only",
        )
    too_long = [p for p in name.parts if len(p.encode("utf-8")) > MAX_NAME_PART]
    if too_long or len(info.filename) > MAX_NAME or len(name.parts) > MAX_NAME_DEPTH:
        raise MedtlError(
            f"entry {info.filename[:60]!r}... has a name too long or too deep to unpack "
            f"(parts up to {MAX_NAME_PART} bytes, {MAX_NAME} characters, {MAX_NAME_DEPTH} folders)",
            path=archive,
        )


def inflation_problem(infos: list[zipfile.ZipInfo], name: str) -> str | None:
    """Why a zip's directory (``infos``) shows a bomb: a member above 1 MiB inflating more than
    ``MAX_ZIP_RATIO`` times. Read from the directory alone, before anything is extracted."""
    for info in infos:
        if info.file_size > 1 << 20 and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            return (
                f"{name}: member {info.filename[:60]!r} inflates {info.file_size // max(info.compress_size, 1)} "
                f"times (above {MAX_ZIP_RATIO}); not unpacked"
            )
    return None


def check_archive(infos: list[zipfile.ZipInfo], archive: str, max_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """Refuse a bundle zip from its directory alone: too many members, more than ``max_bytes`` in
    all, or a member that inflates like a zip bomb."""
    if len(infos) > MAX_ZIP_MEMBERS:
        raise MedtlError(f"holds {len(infos)} entries, above {MAX_ZIP_MEMBERS}", path=archive)
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise MedtlError(
            f"unpacks to {size_text(total)}, above the {size_text(max_bytes)} cap",
            path=archive,
            hint="raise the cap (--max-size) only for a sender you trust",
        )
    if problem := inflation_problem(infos, archive):
        raise MedtlError(problem, hint="the archive was built to exhaust the disk (a zip bomb); do not unpack it")


def _parents(key: str) -> list[str]:
    parts = key.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def extract_zip(archive: str | Path, dest: str | Path, *, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Extract a bundle zip into ``dest`` after checking every entry; returns the bundle root
    (the single top-level folder holding ``configs/``, or ``dest`` itself)."""
    archive, dest = Path(archive), Path(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            check_archive(infos, archive.name, max_bytes)
            seen: set[str] = set()
            files: set[str] = set()
            for info in infos:
                _check_entry(info, archive.name)
                key = unicodedata.normalize(
                    "NFC", info.filename.rstrip("/")
                ).casefold()  # one file on case-insensitive disks, macOS too
                if key in seen:
                    raise MedtlError(
                        f"entry {info.filename!r} appears twice",
                        path=archive.name,
                        hint=(
                            "tools disagree on which copy wins; the archive was built to show "
                            "different files to different readers"
                        ),
                    )
                seen.add(key)
                if not info.is_dir():
                    files.add(key)
            if clash := next((k for k in seen if any(p in files for p in _parents(k))), None):
                raise MedtlError(
                    f"entry {clash[:60]!r} lies inside a file of the archive",
                    path=archive.name,
                    hint="the archive was built to show different files to different readers; do not unpack it",
                )
            zf.extractall(dest)  # each member is read up to its declared size; a lying header fails its CRC
    except zipfile.BadZipFile as exc:
        raise MedtlError(f"not a readable zip archive ({exc})", path=archive.name) from None
    except (OSError, RecursionError) as exc:  # what the checks above let through and this disk refuses
        raise MedtlError(f"cannot be unpacked here ({first_line(exc)})", path=archive.name) from None
    tops = [p for p in dest.iterdir()]
    if len(tops) == 1 and tops[0].is_dir() and not (dest / "configs").exists():
        return tops[0]
    return dest


def check_plain_tree(root: str | Path, name: str | None = None, *, max_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """Refuse a bundle folder holding anything but plain files and folders (a link would make
    pack or import copy a file from outside it, a FIFO would hang a reader), any code file, or a
    top-level entry that would shadow an importable module (``code_problem``)."""
    root = Path(root)
    total = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        if Path(folder) == root:  # what bundle_files leaves out is never shared
            dirs[:] = [d for d in dirs if d not in RUN_OUTPUTS and not d.startswith(".")]
            files = [f for f in files if not f.startswith(".")]
        for entry in (*dirs, *files):
            path = Path(folder) / entry
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise MedtlError(
                    f"{rel} is a symbolic link", path=name or root.name, hint="bundles hold plain files only"
                )
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise MedtlError(
                    f"{rel} is not a plain file", path=name or root.name, hint="bundles hold plain files only"
                )
            if reason := code_problem(rel, top=Path(folder) == root):
                raise MedtlError(reason, path=name or root.name, hint="a bundle is configs, weights and documents")
            total += path.lstat().st_size if stat.S_ISREG(mode) else 0
    if total > max_bytes:
        raise MedtlError(f"holds {size_text(total)}, above the {size_text(max_bytes)} cap", path=name or root.name)


@contextlib.contextmanager
def open_bundle(path: str | Path, *, max_bytes: int = MAX_UNPACKED_BYTES) -> Iterator[Path]:
    """The bundle folder for ``path``: the folder itself (checked to hold plain files only), or a
    zip extracted to a private temporary folder that is removed afterwards."""
    path = Path(path)
    if path.is_dir():
        check_plain_tree(path, max_bytes=max_bytes)
        yield path
        return
    if not path.is_file():
        raise MedtlError("no such bundle folder or zip", path=path.name)
    with tempfile.TemporaryDirectory(prefix="medtl-bundle-") as tmp:
        root = extract_zip(path, tmp, max_bytes=max_bytes)
        check_plain_tree(root, path.name, max_bytes=max_bytes)
        yield root


__all__ = [
    "CHECKSUMS",
    "CODE_SUFFIXES",
    "MAX_UNPACKED_BYTES",
    "PROVENANCE",
    "SIGNATURE",
    "bundle_digest",
    "bundle_files",
    "check_archive",
    "check_plain_tree",
    "code_problem",
    "extract_zip",
    "format_sha256sums",
    "importable_names",
    "inflation_problem",
    "open_bundle",
    "parse_sha256sums",
    "sha256sums",
]
