"""Predictions for a site's DICOM folder from a bundle: a table with confidence flags, and DICOM objects
that file with the study.

The bundle's own ``configs/inference.json`` runs in this process through MONAI's ``ConfigParser``,
the way ``python -m monai.bundle run`` runs it, so the predictions are the bundle's. Its configs are
audited first like ``medtl bundle import`` audits them: MONAI evaluates ``$`` expressions and imports
``_target_`` names, so an unreviewed bundle could run any code.

On top of the bundle's ``predictions.csv``/``.json`` each series gets a confidence flag: ``ok``
when the predicted class has at least the threshold probability, ``review`` when a person should
look. With highdicom (``pip install medtl[dicom-out]``) each predicted series can also get:

- a Secondary Capture (RGB) of the Grad-CAM overlay on the central axial slice of the crop the
  network saw (the lesion's, when the input gives its position; else the volume's centre), and
- a Comprehensive 3D SR (TID 1500) holding the predicted class, its probability and the bundle's
  name and version as the algorithm, with the source series' instances as evidence.

Both join the source study (its StudyInstanceUID and patient module) in new series.

The bundle names each series by its folder, and export folders are often named after the patient,
so the ``id`` column and the skipped items name folders by salted keys (``dir-3f2a...#2`` for
``DOE_JANE/CT#2``, salt in ``output_dir/.medtl-salt``) unless ``real_ids``. The bundle's
``inference_cases`` does the keying, so ``python -m monai.bundle run`` with the same output folder
gives the same ids. Cells a spreadsheet would read as a formula are written as text
(``fileio.csv_cell``). Example::

    result = predict("incoming/", "bundles/tumor_cls_finetune", "out", sr=True)
    print(format_predictions(result))
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import torch
from monai.bundle import ConfigParser
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medtl.bundle.audit import audit_bundle, require_accepted
from medtl.bundle.components.masks import table_files
from medtl.bundle.confine import confined, retarget
from medtl.errors import MedtlError, first_line, reported
from medtl.fileio import atomic_write, atomic_write_csv, atomic_write_json
from medtl.progress import EngineProgress
from medtl.transforms import requires_mask

logger = logging.getLogger(__name__)

__all__ = ["CONFIDENCE", "confidence_flag", "format_predictions", "predict", "top_probability"]

#: Default probability of the predicted class below which a series is flagged for review.
CONFIDENCE = 0.8
REQUIRED = ("configs/metadata.json", "configs/inference.json", "models/model.pt")
#: Side of the Secondary Capture picture in pixels (the network's crop is upscaled to about this).
SC_SIZE = 256
#: Series numbers of the derived series, high so they sort after the acquired ones in a viewer.
SC_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9002
#: Private coding scheme of the classes: code value = output channel index, meaning = class name.
CLASS_SCHEME = "99MEDTL"


def top_probability(row: Mapping[str, Any]) -> float:
    """The probability of the predicted class in a ``PredictionWriter`` row."""
    return float(row[f"prob_{row['pred']}"])


def confidence_flag(probability: float, threshold: float) -> str:
    """``"ok"`` when the predicted class's probability reaches ``threshold``, else ``"review"``."""
    return "ok" if probability >= threshold else "review"


def predict(
    input_dir: str | Path,
    bundle: str | Path,
    output_dir: str | Path,
    *,
    confidence: float = CONFIDENCE,
    sr: bool = False,
    secondary_capture: bool = False,
    real_ids: bool = False,
    masks: str | Path | None = None,
    trust: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``bundle``'s inference on every series in ``input_dir``; write the flagged predictions
    (and, when asked, DICOM SR/SC under ``output_dir/dicom``).

    A series' lesion mask is the NIfTI file the ``masks`` table (columns ``series,mask``) names for
    it, else the DICOM SEG in ``input_dir`` that references it (``inference_cases``; the bundle
    crops around it, and takes it as an input channel when its preprocessing requires one). When the
    bundle requires a mask, a series without one is skipped before any image is read, and a run
    where no series has one is refused.

    Series the bundle cannot read are skipped with their reason and the others go on. Folders are
    named by salted keys in ids and skipped items unless ``real_ids`` (the bundle's
    ``inference_cases`` option of that name). Raises ``MedtlError`` for a bundle missing files, not
    listing its cases with ``inference_cases`` or failing the expression audit (``trust`` runs it
    anyway), an input that is not a folder or holds no loadable series, a masks table that is missing
    or has bad rows, and a threshold outside [0, 1].
    Returns the content of ``predictions.json``.
    """
    root, input_dir, out = Path(bundle), Path(input_dir), Path(output_dir)
    if not 0.0 <= confidence <= 1.0:
        raise MedtlError(f"the confidence threshold is a probability between 0 and 1, got {confidence}")
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if missing:
        raise MedtlError(
            f"not a usable bundle: {', '.join(missing)} missing",
            path=root,
            hint="give a bundle folder exported by medtl (or unpacked by `medtl bundle import`)",
        )
    if not input_dir.is_dir():
        raise MedtlError("not a folder", path=input_dir, hint="give the folder that holds the DICOM series")
    if masks is not None and not Path(masks).is_file():
        raise MedtlError("no such masks table", path=Path(masks).name, hint="give a CSV file with columns series,mask")
    hd = _highdicom() if sr or secondary_capture else None
    meta = _audited_meta(root, trust)
    model = {"name": str(meta.get("name", root.name)), "version": str(meta.get("version", ""))}
    logger.info(
        "predict: %s %s, confidence threshold %.2f, SR %s, Secondary Capture %s",
        model["name"],
        model["version"],
        confidence,
        "yes" if sr else "no",
        "yes" if secondary_capture else "no",
    )

    parser = _run_inference(root, input_dir, out, real_ids=real_ids, masks=masks, progress=progress)
    result, columns = _flagged(out, confidence, model)
    network, predicted = (
        _predicted_cases(parser, result["predictions"]) if hd is not None else (None, [])
    )  # by the bundle's ids
    result["dicom"] = []
    _write_predictions(out, result, columns)  # at once, with the confidence flag
    written: list[str] = []
    for row, case, item in predicted:
        sources = _source_headers(case["image"])
        if secondary_capture:
            picture = _gradcam_picture(item, network, result["class_names"].index(row["pred"]))
            written.append(_write_secondary_capture(hd, out, row, picture, sources, model))
        if sr:
            written.append(_write_sr(hd, out, row, sources, result["class_names"], model))
    if written:
        result["dicom"] = sorted(written)
        _write_predictions(out, result, columns)
    return result


def format_predictions(result: Mapping[str, Any]) -> str:
    """The console table: one line per series (its pseudonymous key, never a path), then the skips and a summary."""
    rows = result["predictions"]
    header = ("series", "prediction", "probability", "confidence")
    lines = [[row["series"], row["pred"], f"{top_probability(row):.3f}", row["confidence"]] for row in rows]
    widths = [max(len(str(v)) for v in column) for column in zip(header, *lines, strict=True)]
    table = [
        " ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [list(header), *lines]
    ]
    table += [f"skipped {item['id']}: {item['reason']}" for item in result["skipped"]]
    review = sum(row["confidence"] == "review" for row in rows)
    table.append(
        f"{len(rows)} series predicted ({review} to review: top probability below {result['confidence_threshold']:g}), "
        f"{len(result['skipped'])} skipped"
    )
    return "\n".join(table)


# ----------------------------------------------------------------------------------- the bundle's inference


def _highdicom() -> ModuleType:
    try:
        import highdicom
    except ImportError:
        raise MedtlError(
            "writing DICOM SR or Secondary Capture needs highdicom, which is not installed",
            hint="pip install medtl[dicom-out]",
        ) from None
    # highdicom logs every copied module at INFO, naming the source instances' UIDs: noise, and identifiers
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    return highdicom


def _audited_meta(root: Path, trust: bool) -> dict[str, Any]:
    """The bundle's metadata, after ``medtl bundle import``'s audit of the two files predict
    parses (``logging.conf`` is never applied here, so it is not run either)."""
    require_accepted(audit_bundle(root), root, trust=trust)
    try:
        return ConfigParser.load_config_file(root / "configs" / "metadata.json")
    except Exception as exc:  # noqa: BLE001 - any parse error is the bundle's, reported by file
        raise MedtlError(f"configs/metadata.json does not parse ({first_line(exc)})", path=root) from exc


def _run_inference(
    root: Path, input_dir: Path, out: Path, *, real_ids: bool, masks: str | Path | None, progress: bool
) -> Any:
    """Parse and run ``inference.json`` as ``monai.bundle run`` does (initialize, run, finalize);
    returns the parser, whose resolved parts (network, cases) explain the predictions.

    ``real_ids`` and ``masks`` go to its ``cases`` (``inference_cases``), the one place folders are
    keyed and masks found, also in a bundle exported before they were options of their own; so does
    whether its preprocessing requires a mask (``transforms.requires_mask``), which skips the series
    without one before any image is read.

    It runs confined (``bundle.confine``): MONAI's path-taking components are built in their
    confined forms, and the run may read the bundle, ``input_dir`` and the masks table's files and
    write the bundle and ``out`` only; nothing starts programs or connects anywhere."""
    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser.read_meta(root / "configs" / "metadata.json")
    parser.update({"bundle_root": str(root), "input_dir": str(input_dir), "output_dir": str(out)})
    parser.set(retarget(parser.get()))
    cases = parser.get("cases")
    if not (isinstance(cases, dict) and str(cases.get("_target_", "")).endswith("inference_cases")):
        raise MedtlError(
            "its inference.json does not list its cases with medtl.bundle.components.inference_cases, "
            "which names the input folders by salted keys",
            path=root / "configs" / "inference.json",
            hint="give a bundle exported by medtl, or run this one with python -m monai.bundle run",
        )
    parser["cases#real_ids"] = real_ids
    parser["cases#masks"] = "" if masks is None else str(masks)
    prepared = parser.get("prepared")
    if not progress and isinstance(prepared, dict) and str(prepared.get("_target_", "")).endswith("prepare_cases"):
        parser["prepared#progress"] = False
    inputs = [input_dir] if masks is None else [input_dir, masks, *table_files(masks)]
    try:
        with confined(root, inputs=inputs, outputs=[out]):
            parser["cases#mask_required"] = "preprocessing" in parser and requires_mask(
                parser.get_parsed_content("preprocessing")
            )
            parser.parse(reset=True)
            if progress and "evaluator" in parser:
                EngineProgress(desc="inference").attach(parser.get_parsed_content("evaluator"))
            for stage in ("initialize", "run", "finalize"):
                _run_stage(parser, stage)
    except Exception as exc:  # noqa: BLE001 - a user's input error is reported as such, anything else as the bundle's
        raise reported(exc, "the bundle's inference.json", root) from exc
    return parser


def _run_stage(parser: Any, stage: str) -> None:
    """Evaluate one stage's expression or list of expressions, as ``ConfigWorkflow`` does."""
    if stage not in parser:
        return
    if isinstance(parser[stage], list):
        for i in range(len(parser[stage])):
            parser.get_parsed_content(f"{stage}#{i}")
    else:
        parser.get_parsed_content(stage)


def _flagged(out: Path, threshold: float, model: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The bundle's ``predictions.json`` with a confidence flag on every row, and its CSV columns plus the flag's."""
    path = out / "predictions.json"
    try:
        written = json.loads(path.read_text(encoding="utf-8"))
        columns = next(csv.reader(io.StringIO((out / "predictions.csv").read_text(encoding="utf-8"))))
    except (OSError, ValueError, StopIteration) as exc:
        raise MedtlError(
            f"the bundle's inference wrote no readable predictions ({type(exc).__name__})",
            path=path.name,
            hint="its inference.json must write predictions.csv and .json, as PredictionWriter does",
        ) from None
    for row in written["predictions"]:
        row["confidence"] = confidence_flag(top_probability(row), threshold)
    return {**written, "confidence_threshold": threshold, "model": dict(model)}, [*columns, "confidence"]


def _write_predictions(out: Path, result: Mapping[str, Any], columns: Sequence[str]) -> None:
    atomic_write_csv(out / "predictions.csv", result["predictions"], columns)
    atomic_write_json(out / "predictions.json", result)


def _predicted_cases(
    parser: Any, rows: Sequence[Mapping[str, Any]]
) -> tuple[Any, list[tuple[Mapping, Mapping, Mapping]]]:
    """The network that scored the series and each prediction with its case (source files) and preprocessed item."""
    try:
        cases = {c["id"]: c for c in parser.get_parsed_content("cases")["cases"]}
        items = {i["id"]: i for i in parser.get_parsed_content("prepared")["items"]}
        network = parser.get_parsed_content("network")
    except (KeyError, TypeError) as exc:
        raise MedtlError(
            f"DICOM output needs the cases, prepared and network of a medtl inference.json ({exc})",
            path="configs/inference.json",
        ) from None
    return network, [(row, cases[row["id"]], items[row["id"]]) for row in rows]


# ----------------------------------------------------------------------------------- DICOM output


def _source_headers(files: Sequence[str]) -> list[Any]:
    """The source series' headers (no pixels): the evidence an SR cites and the patient/study both copy."""
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _equipment(model: Mapping[str, str], what: str) -> dict[str, str]:
    """Series description and equipment naming the bundle (LO values: 64 characters at most), marked as
    research content."""
    return {
        "manufacturer": "medtl",
        "manufacturer_model_name": model["name"][:64],
        "software_versions": model["version"][:64],
        "series_description": f"medtl {what} {model['name']} {model['version']}"[:64],
        "content_qualification": "RESEARCH",
    }


def _save(dataset: Any, out: Path, name: str) -> str:
    """Write ``out/dicom/name`` atomically; returns its path relative to ``out``."""
    atomic_write(out / "dicom" / name, lambda tmp: dataset.save_as(tmp, enforce_file_format=True))
    return f"dicom/{name}"


def _gradcam_picture(item: Mapping[str, Any], network: Any, class_index: int) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB Grad-CAM overlay on the crop's central axial slice, upscaled, and its pixel spacing (rows, columns) in mm."""
    from medtl.explain import central_slices, gradcam, overlay

    image = item["image"]
    heat = gradcam(network, torch.as_tensor(image)[None], class_index=class_index)[0]
    volume = image.detach().cpu().numpy()[0]
    rgb = overlay(central_slices(volume)["axial"], central_slices(heat)["axial"])
    factor = max(1, SC_SIZE // max(rgb.shape[:2]))
    affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=float)
    spacing_x, spacing_y = np.linalg.norm(affine[:3, :2], axis=0)
    return np.ascontiguousarray(rgb.repeat(factor, 0).repeat(factor, 1)), (spacing_y / factor, spacing_x / factor)


def _write_secondary_capture(
    hd: ModuleType,
    out: Path,
    row: Mapping[str, Any],
    picture: tuple[np.ndarray, tuple[float, float]],
    sources: Sequence[Any],
    model: Mapping[str, str],
) -> str:
    """``dicom/<series>_gradcam_sc.dcm``: radiological display (patient left on the image right, anterior at
    the top)."""
    pixels, spacing = picture
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[0],
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=hd.UID(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        patient_orientation=("L", "P"),
        pixel_spacing=spacing,
        **_equipment(model, "Grad-CAM"),
    )
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = (
        f"Grad-CAM for class {row['pred']} (probability {top_probability(row):.3f}) on the central "
        "axial slice of the crop the network saw"
    )
    sc.SourceImageSequence = [Dataset() for _ in sources]
    for ref, source in zip(sc.SourceImageSequence, sources, strict=True):
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    return _save(sc, out, f"{row['series']}_gradcam_sc.dcm")


def _write_sr(
    hd: ModuleType,
    out: Path,
    row: Mapping[str, Any],
    sources: Sequence[Any],
    class_names: Sequence[str],
    model: Mapping[str, str],
) -> str:
    """``dicom/<series>_sr.dcm``: a TID 1500 measurement report with one group: Finding = the
    predicted class, Probability = its probability, both by the bundle as algorithm."""
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes

    index = class_names.index(row["pred"])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"lesion classification by {model['name']}"[:64]
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(name=model["name"], version=model["version"], manufacturer="medtl"),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.Finding, value=hd.sr.CodedConcept(str(index), CLASS_SCHEME, row["pred"])
            )
        ],
        measurements=[
            hd.sr.Measurement(name=codes.DCM.Probability, value=top_probability(row), unit=codes.UCUM.NoUnits)
        ],
    )
    # one observer UID per bundle version: reports by the same model are recognisably the same device
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["medtl", model["name"], model["version"]]),
        name="medtl",
        model_name=model["name"][:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    procedure = codes.LN.CTUnspecifiedBodyRegion if sources[0].get("Modality") == "CT" else codes.SCT.ImagingProcedure
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=procedure, imaging_measurements=[group]
    )
    scheme = CodingSchemeIdentificationItem(
        designator=CLASS_SCHEME, name=f"output classes of bundle {model['name']}"[:64]
    )
    document = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        is_complete=True,
        coding_schemes=[scheme],
        **_equipment(model, "classification"),
    )
    return _save(document, out, f"{row['series']}_sr.dcm")
