"""Cases to predict: the series of a DICOM folder or the rows of a CSV, named without patient data
(``inference_cases``, ``prepare_cases``, ``require_cases``); the inputs a workflow must be given
(``require_inputs``)."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

from medtl.bundle import confine
from medtl.bundle.components.masks import NO_MASK, UNUSED_SEG, Series, is_seg_record, series_masks
from medtl.dicom import folder_key, pseudonymous_path, scan_dicom
from medtl.errors import MedtlError, cause_chain, medtl_cause
from medtl.fileio import csv_problem
from medtl.privacy import load_or_create_salt, load_salt
from medtl.progress import track

logger = logging.getLogger(__name__)


def inference_cases(
    input_dir: str | Path | None = None,
    input_csv: str | Path | None = None,
    output_dir: str | Path = "out",
    *,
    real_ids: bool = False,
    missing_ok: bool = False,
    masks: str | Path | None = None,
    mask_required: bool = False,
) -> dict[str, Any]:
    """Cases to predict: every series in a DICOM folder, or the rows of a CSV (``image`` and an
    optional ``mask`` or ``roi_center_mm``, paths relative to the CSV).

    A series' lesion mask is the NIfTI file the ``masks`` table (``series,mask``) names for it, else
    the segment of the one DICOM SEG in the folder that references it, written on the series' grid
    to ``output_dir/masks/<series key>.nii.gz`` (``components.masks``); a bad table row is an error
    naming it, before any work. ``mask_required`` (the model takes the mask as an input channel:
    ``medtl predict`` tells from its preprocessing) skips every series or row without one, before
    its image is read, and makes it an error when no case is left.

    Series come from medtl's header scan, so a folder holding several series gives one case each
    and a stray non-DICOM file is skipped, not fatal. Returns ``{"cases", "skipped", "root",
    "salt_dir"}``; cases carry an ``id`` (relative folder and series number, or the CSV row's image
    path) and no patient data. Without a mask or ROI centre the crop is centred on the volume.
    ``missing_ok`` gives no cases when neither input is given (the workflow is being built or
    inspected, not run).

    Export folders are often named after the patient, so ids, skipped ids and the paths that start
    skip reasons name folders by salted keys, as ``medtl scan`` and ``medtl predict`` do
    (``dicom.folder_key``, ``dicom.pseudonymous_path``): ``DOE_JANE/CT#2`` is written
    ``dir-3f2a...#2``, a skipped ``DOE_JANE/notes.txt`` ``dir-3f2a.../notes.txt``, a CSV row's
    image ``DOE_JANE/ct.nii.gz`` ``dir-3f2a.../ct.nii.gz`` (the CSV's own ``image``/``mask`` text is
    kept in ``csv_image``/``csv_mask``: the site wrote it). ``real_ids`` (``--real_ids true`` to
    ``python -m monai.bundle run``) names them as they are on disk. The salt is
    ``output_dir/.medtl-salt`` (``privacy.load_or_create_salt``, made on the first run), so runs
    writing to one output folder, through MONAI's CLI or ``medtl predict``, give a folder one key;
    copy it to another output folder to get the same keys there, and never share it: with the
    folder names it turns keys back into names. ``salt_dir`` tells ``prepare_cases`` where it is
    (empty with ``real_ids``).

    Examples:
        A PACS export ``incoming/DOE_JANE/CT/*.dcm`` (series 2) gives the case
        ``{"id": "dir-3f2a...#2", ...}``, and with ``real_ids=True`` ``{"id": "DOE_JANE/CT#2", ...}``.
    """
    real_ids = _switch(real_ids, "real_ids")
    mask_required = _switch(mask_required, "mask_required")
    for option, given in (("input_dir", input_dir), ("input_csv", input_csv), ("masks", masks)):
        if given not in (None, ""):
            confine.check(given, write=False, what=option)
    confine.check(output_dir, write=True, what="output_dir")
    if masks not in (None, "") and input_csv not in (None, ""):
        raise MedtlError(
            "a masks table is for a DICOM folder; a case table gives each case's mask in its 'mask' column",
            path=Path(masks).name,
        )
    if missing_ok and input_dir in (None, "") and input_csv in (None, ""):
        return {"cases": [], "skipped": [], "root": "", "salt_dir": ""}
    if (input_dir in (None, "")) == (input_csv in (None, "")):
        raise MedtlError(
            "give exactly one of input_dir (a DICOM folder) or input_csv (a table of images)",
            hint="e.g. --input_dir scans/ or --input_csv cases.csv",
        )
    if input_csv not in (None, ""):
        rows = _csv_rows(Path(input_csv))  # a table that cannot be read leaves no salt behind
        found = _csv_cases(
            Path(input_csv), rows, None if real_ids else _output_salt(output_dir), mask_required=mask_required
        )
    else:  # the scan keys series UIDs with the salt too
        found = _dicom_cases(
            Path(input_dir),
            _output_salt(output_dir),
            keyed=not real_ids,
            masks=None if masks in (None, "") else Path(masks),
            mask_required=mask_required,
            output_dir=Path(output_dir),
        )
    return {**found, "salt_dir": "" if real_ids else str(output_dir)}


def _output_salt(output_dir: str | Path) -> str:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return load_or_create_salt(output_dir)


def _switch(value: Any, option: str) -> bool:
    """A yes/no option as MONAI's CLI passes it: ``--real_ids true`` arrives as the text ``"true"``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise MedtlError(f"{option} is true or false, got {value!r}", hint=f"pass --{option} true or --{option} false")


def _named(relative: str, root: Path, salt: str | None) -> str:
    """A path relative to the input as ids name it: with a salt, a folder by its salted key and a
    file by its folder's key and its own name (``.`` and a bare file name have no folder to key);
    without one, as it is."""
    if salt is None:
        return relative
    return folder_key(relative, salt) if (root / relative).is_dir() else pseudonymous_path(relative, salt)


def _dicom_cases(
    root: Path, salt: str, *, keyed: bool, masks: Path | None, mask_required: bool, output_dir: Path
) -> dict[str, Any]:
    """Every loadable series under ``root`` as a case, in folder order, with its lesion mask where it
    has one (``components.masks``); folders keyed with ``salt`` when ``keyed``. DICOM SEG series are
    masks, not cases: listed as skipped only when they reference none of the series."""
    index = scan_dicom(root, salt, progress=False)
    name_salt = salt if keyed else None
    found, skipped = [], [{"id": _named(s["path"], root, name_salt), "reason": s["reason"]} for s in index["skipped"]]
    segs = []  # (id, record): masks, listed as skipped when they reference no series
    for series in index["series"]:
        number = series["series_number"] if series["series_number"] is not None else series["series_key"]
        folder = series["folders"][0]
        ident = f"{_named(folder, root, name_salt)}#{number}"
        if not series["loadable"]:
            if is_seg_record(series):
                segs.append((ident, series))
            else:
                reasons = "; ".join(p["message"] for p in series["problems"] if p["blocking"])
                skipped.append({"id": ident, "reason": reasons})
            continue
        case = {"id": ident, "series": series["series_key"], "image": [str(root / f) for f in series["files"]]}
        found.append((f"{folder}#{number}", case, series))  # sorted by the folder on disk, however it is named
    ids = [case["id"] for _, case, _ in found]
    for _, case, _ in found:  # two series with one number in one folder: the pseudonymous key tells them apart
        if ids.count(case["id"]) > 1:
            case["id"] = f"{case['id']}:{case['series']}"
    found.sort(key=lambda item: (item[0], item[1]["id"]))
    masks_found = series_masks(
        [Series(case["id"], record, root) for _, case, record in found],
        [record for _, record in segs],
        table=masks,
        salt=salt,
        output_dir=output_dir,
        name=lambda relative: _named(relative, root, name_salt),
    )
    skipped += [
        {"id": ident, "reason": UNUSED_SEG}
        for ident, record in segs
        if record["series_key"] not in masks_found.used_segs
    ]
    cases, unmasked = [], []  # unmasked: series skipped for want of a usable mask
    for _, case, _ in found:
        mask = masks_found.paths.get(case["series"])
        if case["series"] in masks_found.problems or (mask is None and mask_required):
            unmasked.append(case["id"])
            skipped.append({"id": case["id"], "reason": masks_found.problems.get(case["series"], NO_MASK)})
        else:
            cases.append({**case, "mask": mask} if mask else case)
    if not cases and unmasked:
        problems = [f"{s['id']}: {s['reason']}" for s in skipped if s["id"] in unmasked and s["reason"] != NO_MASK]
        raise MedtlError(
            f"none of the {len(unmasked)} series has a usable lesion mask"
            + (", which this model takes as an input channel" if mask_required else "")
            + f" ({', '.join(unmasked[:5])}{', ...' if len(unmasked) > 5 else ''})",
            path=root.name,
            hint="; ".join(
                [
                    "put the DICOM SEG that references each series into the folder, or give a masks table "
                    "(medtl predict --masks masks.csv, columns series,mask)",
                    *problems[:3],
                ]
            ),
        )
    if not cases:
        raise MedtlError(
            "no loadable image series found",
            path=root.name,
            hint=f"{len(skipped)} files/series skipped; run `medtl scan` on it to see why",
        )
    return {"cases": cases, "skipped": skipped, "root": str(root)}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a case table, which must have an ``image`` column; a table that cannot be read is
    a ``MedtlError`` naming it (and the line, for a broken quote or an oversized field)."""
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
        rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise MedtlError(f"cannot read the case table ({exc})", path=path.name) from None
    except csv.Error as exc:
        raise MedtlError(
            f"cannot read the case table: {csv_problem(exc, reader.line_num)}",
            path=path.name,
            hint="check the quotes around that line; a cell holds one path or three numbers",
        ) from None
    if not rows or "image" not in rows[0]:
        raise MedtlError(
            "the case table needs an 'image' column (and optionally 'mask' or 'roi_center_mm')", path=path.name
        )
    return rows


def _csv_cases(
    path: Path, rows: Sequence[Mapping[str, str]], salt: str | None, *, mask_required: bool = False
) -> dict[str, Any]:
    """The case table's rows as cases; ids name an image's folder by its key with ``salt``, as written
    without. With ``mask_required`` a row without a mask is skipped."""
    root = path.parent
    cases, skipped, unmasked = [], [], 0
    for n, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        if not image:
            skipped.append({"id": f"row {n}", "reason": "empty image path"})
            continue
        # the paths as written in the table, repeated in the output ("image_..." names are the image's meta keys in
        # MONAI)
        case: dict[str, Any] = {
            "id": _named(image, root, salt),
            "image": str(root / image),
            "csv_image": image,
            "csv_mask": "",
        }
        if (row.get("mask") or "").strip():
            case["mask"] = str(root / row["mask"].strip())
            case["csv_mask"] = row["mask"].strip()
        elif mask_required:
            unmasked += 1
            skipped.append(
                {"id": case["id"], "reason": "no mask in the 'mask' column, which this model takes as an input channel"}
            )
            continue
        elif (row.get("roi_center_mm") or "").strip():
            try:
                center = [float(v) for v in row["roi_center_mm"].replace(";", " ").split()]
            except ValueError:
                center = []
            if len(center) != 3:
                skipped.append(
                    {
                        "id": case["id"],
                        "reason": f"roi_center_mm is not 3 numbers (x y z, RAS mm): {row['roi_center_mm']!r}",
                    }
                )
                continue
            case["roi_center_mm"] = center
        cases.append(case)
    if unmasked and not cases:
        raise MedtlError(
            f"none of the {unmasked} row(s) with an image has a mask, which this model takes as an input channel",
            path=path.name,
            hint="give each row's lesion mask (a NIfTI file relative to the table) in a 'mask' column",
        )
    return {"cases": cases, "skipped": skipped, "root": str(root)}


def _relative_name(path: str | None, root: str | None) -> str | None:
    if not path:
        return None
    if root and Path(path).is_absolute():
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return Path(path).name if Path(path).is_absolute() else path


def _in_input_terms(text: str, case: Mapping[str, Any], root: Path, salt: str | None) -> str:
    """A loader's message about ``case`` with the case's files and folders, which it may quote by
    absolute path, named relative to the input as ids name them (keyed with ``salt``); what is left
    of the input's own path becomes ``.``."""
    paths: set[str] = set()
    for key in ("image", "mask"):
        value = case.get(key)
        for path in value if isinstance(value, list | tuple) else [value]:
            if isinstance(path, str | Path) and str(path):
                paths.update({str(path), str(Path(path).parent)})
    for path in sorted(paths, key=len, reverse=True):  # a file before its folder
        if len(Path(path).parts) < 2:  # "/" or ".": no name to replace, and in every path
            continue
        try:
            relative = Path(path).relative_to(root).as_posix()
        except ValueError:
            relative = path  # outside the input (an absolute path in a CSV): its folder is keyed all the same
        text = text.replace(path, _named(relative, root, salt))
    return text.replace(str(root), ".") if len(root.parts) > 1 else text


def prepare_cases(found: Mapping[str, Any], transform: Any, *, progress: bool = True) -> dict[str, Any]:
    """Run the deterministic preprocessing on each case; a case that fails is skipped with its
    reason and the others go on. Returns ``{"items", "skipped"}`` (skips from scanning included).
    No cases at all (no input given yet) gives no items; cases that all fail are an error.

    A reason names the files it concerns relative to the input, never by absolute path, their
    folders keyed with the salt in ``found["salt_dir"]`` as ``inference_cases`` keyed the ids (as
    they are on disk when it is empty)."""
    items, skipped = [], list(found.get("skipped", []))
    root = Path(found.get("root") or ".")
    salt: str | None = None
    for case in track(found["cases"], desc="preprocess", unit="case", disable=not progress, leave=False):
        try:
            items.append(transform(dict(case)))
        except Exception as exc:  # MONAI wraps transform errors; report the medtl message if there is one
            if found.get("salt_dir") and salt is None:
                salt = load_salt(found["salt_dir"])
            cause = medtl_cause(exc)
            if cause is not None:  # named relative to the input, never by its absolute path
                where = _relative_name(cause.path, str(root))
                told = cause.message + (f" (hint: {cause.hint})" if cause.hint else "")
                reason = (f"{_named(where, root, salt)}: " if where else "") + _in_input_terms(told, case, root, salt)
            else:
                innermost = cause_chain(exc)[-1]
                told = str(innermost).splitlines()[0] if str(innermost) else type(innermost).__name__
                reason = _in_input_terms(told, case, root, salt)
            logger.warning("skipped %s: %s", case["id"], reason)
            skipped.append({"id": case["id"], "reason": reason})
    if not items and skipped:
        raise MedtlError(
            f"every case failed preprocessing ({len(skipped)} skipped)",
            hint="; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3]),
        )
    return {"items": items, "skipped": skipped}


def require_cases(data: Sized, *, give: str) -> int:
    """The first step of a bundle's ``run``: stop with a clear error when the workflow was built
    without input (its data components take ``missing_ok``), rather than let MONAI skip an empty
    run with a warning. ``give`` says what to pass, e.g. ``"--manifest manifests/site.json"``.
    Returns the number of cases."""
    if len(data) == 0:
        raise MedtlError(
            "no cases to run on: the bundle was given no input", hint=f"pass {give} to python -m monai.bundle run"
        )
    return len(data)


def require_inputs(given: Mapping[str, Any], *, examples: Mapping[str, str], config: str) -> None:
    """The first step of a workflow whose ``initialize`` already needs its inputs (a fine-tune loads
    its source and runs AdaBN and a validation pass; a distillation labels the data with its teacher):
    one error naming every config value still empty and how to give it, before any work, rather than
    the first component that needs one failing deep in MONAI's config resolution. ``given`` maps
    config ids to their values, ``examples`` ids to a sample value; ``config`` names the config file."""
    missing = [key for key, value in given.items() if value is None or (isinstance(value, Sized) and not len(value))]
    if missing:
        flags = " ".join(f"--{key} {examples.get(key, key.upper())}" for key in missing)
        raise MedtlError(
            f"this workflow needs {', '.join(missing)}, not given",
            path=config,
            hint=f"python -m monai.bundle run: pass {flags}; monai.bundle.load: workflow_type='inference' builds "
            f"the trained network without them, or give {', '.join(missing)} (and bundle_root) in args_file",
        )
