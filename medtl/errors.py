"""Errors a user can cause. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

from pathlib import Path


class MedtlError(Exception):
    """A problem with the user's input, named with the file it concerns and a hint to fix it."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.hint = hint
        self.message = message
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text += f" (hint: {hint})"
        super().__init__(text)


class DicomError(MedtlError):
    """A DICOM file or series that cannot be read or assembled into a volume."""


class ImageError(MedtlError):
    """An image (NIfTI or assembled series) whose content is unusable, e.g. 4D or non-finite."""


class ManifestError(MedtlError):
    """A manifest or label table that is inconsistent, leaks patients across splits, or is stale."""


def first_line(exc: BaseException, *, typed: bool = True) -> str:
    """``exc`` in one line for a report row or a log: its first non-empty line (at most 200
    characters), after its type's name when ``typed``; the type's name alone if it says nothing."""
    line = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")[:200]
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if typed else line


def reported(exc: BaseException, what: str, path: str | Path) -> MedtlError:
    """``exc``, raised while running a bundle's ``what``, as the user gets it: the ``MedtlError``
    inside it (a problem with their input), else one line naming its innermost cause."""
    return medtl_cause(exc) or MedtlError(
        f"{what} failed ({first_line(cause_chain(exc)[-1])})", path=path, hint="--debug shows the traceback"
    )


def cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what raised it, outermost first: MONAI wraps a failing transform's or component's
    error in ``RuntimeError``s, so the user's problem is further down."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def medtl_cause(exc: BaseException) -> MedtlError | None:
    """The first ``MedtlError`` in ``exc``'s cause chain: an input problem to report as such."""
    return next((c for c in cause_chain(exc) if isinstance(c, MedtlError)), None)
