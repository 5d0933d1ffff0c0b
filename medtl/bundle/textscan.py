"""A bundle file as the text a privacy scan reads: decoded and decompressed, never unpickled or run.

Text files are decoded as UTF-8, or as UTF-16 when they carry a byte-order mark or their bytes
look like it. Gzip streams and zip members are decompressed (a zip inside a zip down to
``MAX_NESTING`` archives), with at most ``MAX_DECOMPRESSED_BYTES`` read out of one bundle file, so
a zip bomb is reported instead of filling memory. Torch checkpoints are zips too: their member
names and pickles are scanned, their raw tensor storage is not. Pickles are read opcode by opcode
with ``pickletools`` (nothing is unpickled); ONNX models give their doc strings and metadata;
any other binary gives its printable runs, like ``strings``.
"""

from __future__ import annotations

import codecs
import gzip
import io
import pickletools
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

#: How many bytes may be decompressed out of one bundle file, all its members and nested archives together.
MAX_DECOMPRESSED_BYTES = 64 << 20
#: How many archives deep a member is still opened: a zip in a zip in a zip, a gzip counting as one.
MAX_NESTING = 3
TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".conf", ".csv", ".py", ".cfg", ".ini", ".html", ""}
_PRINTABLE = re.compile(rb"[\x20-\x7e]{4,}")
_GZIP_MAGIC = b"\x1f\x8b\x08"


@dataclass(frozen=True)
class FileText:
    """One part of a bundle file to scan.

    ``part`` is ``""`` for the file itself, else where inside it: ``#notes.txt`` for a zip member
    (``#data.pkl`` for a torch checkpoint's, its archive folder left out), ``#inner.zip#notes.txt``
    for a member of a nested zip. ``problem`` says why the part could not be read; ``text`` is
    then empty, and a privacy scan should fail rather than pass what it did not see.
    """

    part: str
    text: str = ""
    problem: str = ""


class _OverBudget(Exception):
    """More than ``MAX_DECOMPRESSED_BYTES`` came out of one file, the last bytes from part ``args[0]``: stop
    reading it."""


class _Budget:
    """The bytes still allowed out of one bundle file; every decompressing read goes through it."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit

    def read(self, stream: BinaryIO, part: str) -> bytes:
        data = stream.read(self.left + 1)
        if len(data) > self.left:
            raise _OverBudget(part)
        self.left -= len(data)
        return data


def file_texts(path: str | Path) -> Iterator[FileText]:
    """The text of ``path`` to scan for patient data, part by part (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".onnx" and (text := _onnx_text(path)) is not None:
        yield FileText("", text)
        return
    budget = _Budget(MAX_DECOMPRESSED_BYTES)
    try:
        if zipfile.is_zipfile(path):
            yield from _zip_texts(path, "", budget, depth=1)
        else:
            with path.open("rb") as stream:  # a plain file is read up to the budget, not whole
                yield from _data_texts(path.name, budget.read(stream, ""), "", budget, depth=0)
    except _OverBudget as exc:
        yield FileText(
            exc.args[0], problem=f"not scanned: decompresses to more than {budget.limit >> 20} MiB (a zip bomb?)"
        )


def _data_texts(name: str, data: bytes, part: str, budget: _Budget, depth: int) -> Iterator[FileText]:
    """The text of ``data``, a file called ``name``, unpacking it when it is a gzip stream or a zip."""
    is_gzip = data.startswith(_GZIP_MAGIC)
    is_zip = not is_gzip and zipfile.is_zipfile(io.BytesIO(data))
    if (is_gzip or is_zip) and depth >= MAX_NESTING:
        yield FileText(part, problem=f"not scanned: an archive nested more than {MAX_NESTING} deep")
    elif is_gzip:
        try:
            inner = budget.read(gzip.GzipFile(fileobj=io.BytesIO(data)), part)
        except (OSError, EOFError, zlib.error) as exc:
            yield FileText(part, problem=f"not scanned: not a readable gzip stream ({exc.__class__.__name__})")
            return
        yield from _data_texts(name.removesuffix(".gz"), inner, part, budget, depth + 1)
    elif is_zip:
        yield from _zip_texts(io.BytesIO(data), part, budget, depth + 1)
    else:
        yield FileText(part, _decoded(name, data))


def _zip_texts(source: Path | BinaryIO, part: str, budget: _Budget, depth: int) -> Iterator[FileText]:
    """The member names of a zip, then each member's text; a torch checkpoint's tensor storage is skipped."""
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        yield FileText(part, problem=f"not scanned: not a readable zip ({exc.__class__.__name__})")
        return
    with zf:
        names = zf.namelist()
        yield FileText(part, "\n".join(names))
        torch_roots = {n.removesuffix("/data.pkl") for n in names if n.count("/") == 1 and n.endswith("/data.pkl")}
        for info in zf.infolist():
            root, _, rest = info.filename.partition("/")
            if info.is_dir() or root in torch_roots and rest.startswith("data/") and not rest.endswith(".pkl"):
                continue  # raw tensor storage
            member = f"{part}#{rest if root in torch_roots else info.filename}"
            try:
                with zf.open(info) as stream:
                    data = budget.read(stream, member)
            except (RuntimeError, NotImplementedError) as exc:  # encrypted, or a compression zipfile cannot read
                yield FileText(member, problem=f"not scanned: {exc}")
                continue
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                yield FileText(member, problem=f"not scanned: damaged ({exc.__class__.__name__})")
                continue
            yield from _data_texts(PurePosixPath(info.filename).name, data, member, budget, depth)


def _decoded(name: str, data: bytes) -> str:
    """Text of a file that is not an archive: UTF-16 or UTF-8 text, a pickle's strings, or printable runs."""
    if (text := _utf16(data)) is not None:
        return text
    suffix = PurePosixPath(name).suffix
    if suffix in TEXT_SUFFIXES or name == "LICENSE":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if suffix == ".pkl" and (text := _pickle_strings(data)) is not None:
        return text
    return _printable(data)


def _utf16(data: bytes) -> str | None:
    """``data`` decoded as UTF-16 when it starts with a byte-order mark, or when nearly all its odd
    (little-endian) or even (big-endian) bytes are NUL and the others are not, as in UTF-16 text
    written in the Latin alphabet (binary data can look so too: its printable runs are added);
    otherwise None."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    sample = data[: 1 << 16]
    if len(sample) < 8:
        return None
    even, odd = sample[0::2], sample[1::2]
    for zeros, letters, encoding in ((odd, even, "utf-16-le"), (even, odd, "utf-16-be")):
        if zeros.count(0) >= 0.9 * len(zeros) and letters.count(0) <= 0.1 * len(letters):
            return data[: len(data) // 2 * 2].decode(encoding, errors="replace") + "\n" + _printable(data)
    return None


def _printable(data: bytes) -> str:
    return b"\n".join(_PRINTABLE.findall(data)).decode("ascii")


def _pickle_strings(data: bytes) -> str | None:
    """The strings a pickle holds (and the printable runs of its bytes objects and of anything after
    it), read opcode by opcode without unpickling, so nothing runs; None if it is not a pickle."""
    strings, end = [], len(data)
    try:
        for op, arg, pos in pickletools.genops(data):
            if isinstance(arg, str) and (
                "UNICODE" in op.name or op.name in ("GLOBAL", "STRING", "BINSTRING", "SHORT_BINSTRING")
            ):
                strings.append(arg)
            elif isinstance(arg, bytes):
                strings.append(_printable(arg))
            elif op.name == "STOP":
                end = pos + 1
    except Exception:  # noqa: BLE001 - not a well-formed pickle: the caller scans its printable runs
        return None
    return "\n".join([*strings, _printable(data[end:])]).rstrip("\n")


def _onnx_text(path: Path) -> str | None:
    """The free text of an ONNX model (doc strings, metadata), not its layer names, which look like paths."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - onnx missing or the file unreadable: scan its printable runs
        return None
    parts = [model.doc_string, model.graph.doc_string, *(f"{p.key}={p.value}" for p in model.metadata_props)]
    parts += [n.doc_string for n in model.graph.node]
    return "\n".join(p for p in parts if p)


__all__ = ["MAX_DECOMPRESSED_BYTES", "MAX_NESTING", "FileText", "file_texts"]
