"""Pseudonyms for patient, study and series identifiers, and a scan for identifiers that leaked.

Identifiers are replaced by salted hashes. The salt is per project and lives beside the scan index
or manifest (``.medtl-salt``), so the same patient gets the same key in every file of one project,
while the key cannot be reversed or matched across projects. Salts never go into bundles.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import pydicom
import pydicom.errors

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
            raise MedtlError(
                "salt file is too short or empty", path=path, hint="delete it only if no manifest uses it yet"
            )
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


# Finding patient data where it must not be: bundles, reports, logs.

#: DICOM attributes that identify a patient or an examination.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientAddress",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyID",
    "ReferringPhysicianName",
    "InstitutionName",
)
_NAME_AFTER_PATIENT_WORD = "person name after a patient word"
_PATTERNS = (
    # tried only where a run of name characters starts, so a long run without a caret costs one pass
    ("DICOM person name", re.compile(r"(?<![A-Za-z'\-])[A-Za-z][A-Za-z'\-]++\^[A-Za-z][A-Za-z'\-^]*")),
    ("DICOM UID", re.compile(r"(?<![\d.])[12]\.\d+(?:\.\d+){4,}(?![\d.])")),
    (
        "identifying DICOM attribute with a value",
        re.compile(
            r"\b(?:"
            + "|".join(IDENTIFYING_KEYWORDS)
            + r")\b[\"']?\s*[:=]\s*[\"']?(?!pat-|null|None|\"|')([^\s\"',}\]]{2,})"
        ),
    ),
    # a date only next to a birth word: the dates a bundle holds (changelogs, releases) identify nobody
    (
        "birth date",
        re.compile(
            r"(?:\b(?:birth\s*date|date\s+of\s+birth|dob|birthdate|born(?:\s+on)?)\b|\bd\.o\.b\.)\W{0,5}"
            r"(?:\d{4}[-/.]?\d{2}[-/.]?\d{2}"  # ISO or DICOM
            r"|(?:[012]?\d|3[01])[-/.](?:[012]?\d|3[01])[-/.](?:19|20)\d{2}(?!\d))",  # US (or day first)
            re.IGNORECASE,
        ),
    ),
    (
        "medical record number",
        re.compile(
            r"\b(?:mrn|medical\s+record\s+(?:number|no\b\.?))[ \t]*(?:[:#=\-]|no\b\.?)?[ \t]*[A-Za-z]{0,3}\d{3,}\b",
            re.IGNORECASE,
        ),
    ),
    (
        _NAME_AFTER_PATIENT_WORD,
        re.compile(
            r"(?i:\bpatient(?:'s)?(?:[ \t]+name)?[\"']?|(?<!\d[ \t])\bpt\b\.?|\bname(?=[ \t]*:))"
            r"[ \t]*[:=#]?[ \t]*[\"']?[ \t]*(?=(?P<name>[^\W\d_][\w'.\-]*(?:[ \t]+[^\W\d_][\w'.\-]*){1,3}))"
        ),
    ),  # a look-ahead: a rejected name consumes nothing
    ("user home path", re.compile(r"(?:/home/|/Users/|[A-Za-z]:\\{1,2}Users\\{1,2}|/root/)[^/\\\s\"']+")),
    (
        "absolute path",
        re.compile(
            r"(?<![\w.:/~\\])(?:/(?!home/|Users/|root/)[\w.\-]+){3,}|\b[A-Za-z]:\\(?!Users\\)[\w.\-]+\\[\w.\-]+"
        ),
    ),
)
#: UIDs of the DICOM standard itself (transfer syntaxes, SOP classes) identify nobody.
_STANDARD_UID = "1.2.840.10008."
#: Capitalised words that follow "patient" or "name:" in headings and configs, not in a person's name.
_NOT_NAMES = frozenset(
    {
        "a",
        "an",
        "and",
        "all",
        "any",
        "each",
        "every",
        "for",
        "in",
        "is",
        "no",
        "not",
        "of",
        "on",
        "one",
        "or",
        "the",
        "to",
        "two",
        "was",
        "with",
        "access",
        "age",
        "anonymisation",
        "anonymization",
        "background",
        "benign",
        "care",
        "case",
        "cases",
        "characteristics",
        "class",
        "classes",
        "classifier",
        "classification",
        "cohort",
        "cohorts",
        "comments",
        "consent",
        "count",
        "counts",
        "criteria",
        "data",
        "dataset",
        "datasets",
        "demographics",
        "details",
        "detection",
        "directory",
        "distribution",
        "exclusion",
        "file",
        "files",
        "folder",
        "gender",
        "group",
        "groups",
        "hash",
        "history",
        "id",
        "ids",
        "identifier",
        "identifiers",
        "identity",
        "image",
        "images",
        "imaging",
        "inclusion",
        "info",
        "information",
        "key",
        "keys",
        "label",
        "labels",
        "lesion",
        "level",
        "levels",
        "list",
        "lung",
        "malignancy",
        "malignant",
        "management",
        "model",
        "network",
        "nodule",
        "notes",
        "number",
        "numbers",
        "outcome",
        "outcomes",
        "population",
        "position",
        "positioning",
        "preparation",
        "preprocessing",
        "privacy",
        "pseudonym",
        "pseudonyms",
        "record",
        "records",
        "report",
        "reports",
        "safety",
        "sample",
        "samples",
        "scan",
        "scans",
        "segmentation",
        "selection",
        "series",
        "set",
        "sets",
        "setup",
        "sex",
        "site",
        "sites",
        "size",
        "split",
        "splits",
        "studies",
        "study",
        "summary",
        "table",
        "tables",
        "test",
        "train",
        "training",
        "tumor",
        "tumour",
        "validation",
        "weight",
        "workflow",
    }
)


def _mask(value: str) -> str:
    return value[:3] + "*" * min(8, max(3, len(value) - 3))


def _person_name(words: str) -> bool:
    """Whether ``words`` start with a name: two or more capitalised words (initials such as ``A.``
    count, one real word at least), the first two real words not common ones ("Patient Data Sheet")."""
    taken = []
    for word in words.split():
        word = word.strip(".'-")
        initial = len(word) == 1 and word.isupper()
        if not (initial or word[:1].isupper() and any(c.islower() for c in word)):
            break
        taken.append((word, initial))
    full = [word.lower() for word, initial in taken if not initial]
    return len(taken) >= 2 and bool(full) and not any(word in _NOT_NAMES for word in full[:2])


def find_identifiers(text: str, known: Iterable[str] = ()) -> list[str]:
    """Descriptions (values masked) of what in ``text`` looks like patient data.

    ``known`` are identifiers taken from the training data (``identifiers_from_dicom``), found
    anywhere in the text whatever their form; the patterns catch the common shapes without them:
    DICOM names and UIDs, identifying DICOM attributes with a value, dates next to a birth word (ISO,
    DICOM or US form; a date alone is not reported), medical record numbers, two capitalised words
    after "patient", "pt." or "name:" (common words such as "Patient Data" excepted), home and
    absolute paths.
    """
    found = []
    for label, pattern in _PATTERNS:
        for match in pattern.finditer(text):
            value = match.group(0)
            if label == "DICOM UID" and (value.startswith(_STANDARD_UID) or len(value) < 16):
                continue
            if label == _NAME_AFTER_PATIENT_WORD and not _person_name(match.group("name")):
                continue
            found.append(f"{label} {_mask(value)!r}")
    lowered = text.lower()
    for value in known:
        if value.lower() in lowered:
            found.append(f"identifier from the training data {_mask(value)!r}")
    return sorted(set(found))


def _name_forms(name: str) -> list[str]:
    """``DOE^JANE`` as it may appear in free text: ``DOE^JANE``, ``DOE JANE``, ``JANE DOE``, ``DOE, JANE``."""
    parts = [p for p in name.split("^") if p]
    if len(parts) < 2:
        return [name]
    family, given = parts[0], parts[1]
    return [name, f"{family} {given}", f"{given} {family}", f"{family}, {given}"]


def identifiers_from_dicom(root: str | Path) -> set[str]:
    """The identifying values in the headers of every DICOM file under ``root`` (unreadable files
    skipped), to search a bundle for before it leaves the site. Values shorter than 4 characters
    are dropped: they would match everywhere."""
    values: set[str] = set()
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(IDENTIFYING_KEYWORDS))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError):
            continue
        for keyword in IDENTIFYING_KEYWORDS:
            value = str(ds.get(keyword, "") or "").strip()
            if keyword.endswith("Name") and keyword != "InstitutionName":
                values.update(_name_forms(value))
            elif value:
                values.add(value)
    return {v for v in values if len(v) >= 4}
