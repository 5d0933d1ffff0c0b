"""Atomic writes and checksums: an interrupted run leaves the old file or the new one, never half.

Every CSV table medtl writes goes through ``csv_text``, which keeps a spreadsheet from reading a
cell as a formula.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medtl.errors import MedtlError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_WRITE_HINTS = {
    errno.ENOSPC: "free disk space and run again",
    errno.EDQUOT: "free space within your disk quota and run again",
    errno.EACCES: "check the folder's write permissions",
    errno.EPERM: "check the folder's write permissions",
    errno.EROFS: "write to a folder on a writable disk",
}


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A failing disk (full, read-only, no permission) raises ``MedtlError`` naming ``path``; the
    previous file, if any, is left as it was and no temporary file stays behind.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes)  # keep .nii.gz so writers that sniff the suffix behave
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise MedtlError(
            f"cannot write ({exc.strerror or exc}); the previous file, if any, is unchanged",
            path=path,
            hint=_WRITE_HINTS.get(exc.errno, "check the folder exists and is writable"),
        ) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def utf8_child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Python child process that reads and writes UTF-8 whatever the locale (a C
    or POSIX locale would otherwise give it ASCII stdio); decode its output as UTF-8 too."""
    return {**(os.environ if env is None else env), "PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8"}


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """Stable JSON text (sorted keys, fixed indent) so the same content hashes the same."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, canonical_json(obj))


#: First characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell a spreadsheet shows and never runs: text starting with ``= + - @``,
    a tab or a carriage return gets a leading ``'`` (a folder named ``=cmd|' /C calc'!A0`` is
    written ``'=cmd|' /C calc'!A0``); numbers, however written (``-0.5``, ``+3``, ``-1e-3``), stay
    numbers. ``csv_value`` undoes it when medtl reads its own tables back.
    """
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return value


def csv_value(text: str) -> str:
    """The value ``csv_cell`` wrote as ``text``: one leading ``'`` before a formula character removed."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A CSV table (header, then one line per row, ``\\n`` line ends) with every cell, header
    included, passed through ``csv_cell``. A row key outside ``columns`` raises ValueError."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writerow({c: csv_cell(c) for c in columns})
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def atomic_write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    return atomic_write_text(path, csv_text(rows, columns))


def csv_problem(exc: csv.Error, line: int) -> str:
    """A ``csv`` module error while reading a table, said for people: where, and what to look for."""
    detail = str(exc)
    if "field larger than field limit" in detail:
        return (
            f"line {line}: a field is longer than {csv.field_size_limit():,} characters, the most a cell may hold "
            "(often a quote that is never closed, which makes the rest of the file one field)"
        )
    return f"line {line}: not a readable CSV table ({detail})"


def size_text(n: int) -> str:
    """A byte count as a person reads it in a limit or a refusal: MiB, or GiB from 1 GiB up."""
    return f"{n / (1 << 30):.3g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.3g} MiB"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
