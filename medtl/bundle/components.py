"""What medtl's bundle configs name by ``_target_`` or ``$`` expression beyond MONAI's own parts.

Data from manifests (``datalist``, ``class_names``), series found in a DICOM folder or listed in a
CSV for inference (``inference_cases``, ``prepare_cases``), an evaluation handler that writes the
target-domain metrics with confidence intervals (``MetricsReport``) and one that writes predictions
(``PredictionWriter``). Every file written is written atomically; nothing written names a patient
or holds an absolute path: input folders, which PACS exports often name after the patient, appear as
salted keys (``dir-3f2a...``) unless a run asks for ``real_ids``, and CSV cells a spreadsheet would
read as a formula are written as text.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medtl.dicom import folder_key, pseudonymous_path, scan_dicom
from medtl.errors import MedtlError, cause_chain, medtl_cause
from medtl.evaluate import classification_metrics, format_table
from medtl.fileio import atomic_write_csv, atomic_write_json, atomic_write_text, csv_problem, sha256_file
from medtl.manifest import datalist as _datalist
from medtl.manifest import load_manifest
from medtl.privacy import load_or_create_salt, load_salt

logger = logging.getLogger(__name__)


def _required(value: Any, option: str, example: str) -> Path:
    if value in (None, ""):
        raise MedtlError(f"no {option} given", hint=f"pass --{option} {example} to python -m monai.bundle run")
    return Path(value)


Manifests = str | Path | Sequence[str | Path]


def _manifest_paths(manifest: Manifests) -> list[Path]:
    """One manifest file, or several sites' files to pool (``--manifest "['a.json', 'b.json']"``)."""
    many = manifest if isinstance(manifest, Sequence) and not isinstance(manifest, str) else [manifest]
    if not many:
        raise MedtlError("no manifest given", hint="pass --manifest manifests/site.json to python -m monai.bundle run")
    return [_required(m, "manifest", "manifests/site.json") for m in many]


def _no_manifest(manifest: Manifests) -> bool:
    return manifest in (None, "") or (isinstance(manifest, Sequence) and not isinstance(manifest, str) and not manifest)


def datalist(manifest: Manifests, dataset_dir: str | Path, splits: str | Sequence[str], *, num_classes: int | None = None,
             missing_ok: bool = False) -> list[dict[str, Any]]:
    """Data dicts of ``splits`` from one manifest file or several (pooled, in the order given),
    paths resolved under ``dataset_dir``.

    ``num_classes`` (the bundle's literal class count, which its ``network_def`` is built with)
    must be the manifests' class count. ``missing_ok`` gives no cases while no manifest is given,
    so a workflow can be built and inspected without data (MONAI's ``create_workflow``,
    ``check_properties``, ``monai.bundle.load``); its ``run`` then stops at ``require_cases``.
    """
    if missing_ok and _no_manifest(manifest):
        return []
    paths = _manifest_paths(manifest)
    names = class_names(paths)  # pooled sites must mean the same by each label index
    if num_classes is not None and len(names) != int(num_classes):
        raise MedtlError(f"the manifest has {len(names)} classes ({', '.join(names)}) but the bundle's network is built "
                         f"for num_classes={num_classes}", path=", ".join(p.name for p in paths),
                         hint=f"train with --num_classes {len(names)}, or give a manifest labelled with the bundle's "
                              f"{num_classes} classes")
    root = _required(dataset_dir, "dataset_dir", "DATA_ROOT")
    items = [item for path in paths for item in _datalist(load_manifest(path), root, splits)]
    if not items:
        raise MedtlError(f"the manifest has no cases in split(s) {splits!r}", path=", ".join(p.name for p in paths))
    return items


def class_names(manifest: Manifests) -> list[str]:
    """Class names in label-index order, from the manifests' label map (pooled ones must agree)."""
    maps = {path.name: load_manifest(path)["label_map"] for path in _manifest_paths(manifest)}
    first = next(iter(maps.values()))
    for name, label_map in maps.items():
        if label_map != first:
            raise MedtlError(f"the manifests' label maps differ ({label_map} vs {first}), so their cases cannot be pooled", path=name)
    return sorted(first, key=first.get)


def channel_names(channel_def: Mapping[str, str]) -> list[str]:
    """Class names in output-channel order from the metadata's ``outputs/pred/channel_def``
    (``{"0": "benign", "1": "malignant"}``), the one place a bundle keeps them."""
    try:
        return [str(channel_def[str(i)]) for i in range(len(channel_def))]
    except KeyError as exc:
        raise MedtlError(f"channel_def must number the classes 0..{len(channel_def) - 1}; {exc} is missing",
                         path="configs/metadata.json") from None


def configure_torch(seed: int | None = 0, deterministic: bool = True) -> None:
    """Seed every generator; then either repeatable kernels or, on CUDA, cuDNN's autotuner.

    ``set_determinism`` also turns cuDNN's benchmark mode off. Crops have one fixed shape, which is
    where ``cudnn.benchmark`` pays: the bundles ask for it on CUDA (``deterministic`` defaults to
    "no GPU") and keep bitwise repeatability on the CPU, where these flags change nothing.
    """
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def run_record(manifest: Manifests = "", seed: int | None = None, output_dir: str | Path | None = None,
               weights: str | Path | None = None, **settings: Any) -> dict[str, Any]:
    """What a run's results depend on: the seed, the data manifest (name and content hash, never
    its cases or paths), the weights' sha256, settings worth stating and the software versions.
    Written to ``output_dir/run.json`` when given; ``MetricsReport`` embeds it in every metrics file."""
    import monai

    from medtl import __version__

    record: dict[str, Any] = {"seed": seed, **settings,
                              "software": {"medtl": __version__, "monai": monai.__version__, "torch": torch.__version__.split("+")[0]}}
    if weights not in (None, "") and Path(weights).is_file():
        record["weights_sha256"] = sha256_file(weights)
    if manifest not in (None, "", []):
        data = [load_manifest(path) for path in _manifest_paths(manifest)]
        named = [{"name": d["name"], "content_sha256": d["content_sha256"]} for d in data]
        record["manifest"] = named[0] if len(named) == 1 else named
    if output_dir is not None:
        atomic_write_json(Path(output_dir) / "run.json", record)
    return record


# ----------------------------------------------------------------------------------- source and teacher


def load_source(network: torch.nn.Module, source: str | Path, *, trust: bool = False, allow_new_head: bool = True) -> dict[str, list[str]]:
    """Load pretrained weights (bundle folder/zip, state dict, checkpoint, TorchScript) into ``network``.

    A head for another class count is reported as mismatched and starts fresh: that is the head
    swap (``allow_new_head``). Any other tensor left unloaded means the source is another network,
    which is an error rather than a silent partly random start.
    """
    from medtl.weights import backbone_not_loaded, load_weights

    report = load_weights(network, _required(source, "source", "../tumor_cls_source"), trust=trust)
    report.source = Path(source).name  # logs name the file, not where it lives
    logger.info("%s", report.summary())
    left_out = backbone_not_loaded(network, report) if allow_new_head else [*report.missing, *(m.name for m in report.mismatched)]
    if left_out:
        raise MedtlError(f"the source weights do not fit this network: {report.summary()}", path=Path(source).name,
                         hint="the bundle's network_def must be the source's architecture (same depth and width)")
    return report.to_dict()


def load_bundle_network(bundle: str | Path, *, device: str | torch.device = "cpu", trust: bool = False) -> torch.nn.Module:
    """A bundle's network with its weights, in eval mode: ``network_def`` from its inference config
    with ``models/model.pt`` (loaded weights-only), after the audit a received bundle gets
    (``medtl.bundle.audit``); ``trust`` builds it anyway. Its TorchScript copy is never run."""
    from monai.bundle import ConfigParser

    from medtl.bundle.audit import audit_bundle

    root = _required(bundle, "teacher", "../tumor_cls_finetune")
    if not (root / "configs" / "metadata.json").is_file():
        raise MedtlError("not a MONAI bundle folder (no configs/metadata.json)", path=root.name)
    findings = audit_bundle(root)
    if findings and not trust:
        raise MedtlError(f"refusing to build its network: {len(findings)} config value(s) outside the allow-list: {findings[0]}",
                         path=root.name, hint="review them with `medtl bundle verify`; trust it only if you know its sender")
    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser.read_meta(root / "configs" / "metadata.json")
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    load_source(network, root, allow_new_head=False)
    return network.to(device).eval()


def teacher_labeled(teacher: torch.nn.Module, data: Sequence[Mapping[str, Any]], transform: Any, *, class_names: Sequence[str],
                    threshold: float = 0.9, keep_uncertain: bool = True, cache_dir: str | Path | None = None,
                    output_dir: str | Path | None = None, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """The student's training data: each case with the teacher's logits and, for unlabeled cases
    the teacher is sure of, a pseudo-label. Writes the pseudo-label counts to
    ``output_dir/pseudo_labels.json`` (how many were kept per class)."""
    from medtl.adapt.distill import label_with_teacher

    labeled, report = label_with_teacher(teacher, data, transform, threshold=threshold, class_names=class_names,
                                         keep_uncertain=keep_uncertain, cache_dir=cache_dir, device=device, progress=True)
    if output_dir is not None:
        atomic_write_json(Path(output_dir) / "pseudo_labels.json", report)
    return labeled


# ----------------------------------------------------------------------------------- inference input


def inference_cases(input_dir: str | Path | None = None, input_csv: str | Path | None = None,
                    output_dir: str | Path = "out", *, real_ids: bool = False, missing_ok: bool = False) -> dict[str, Any]:
    """Cases to predict: every series in a DICOM folder, or the rows of a CSV (``image`` and an
    optional ``mask`` or ``roi_center_mm``, paths relative to the CSV).

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
    if missing_ok and input_dir in (None, "") and input_csv in (None, ""):
        return {"cases": [], "skipped": [], "root": "", "salt_dir": ""}
    if (input_dir in (None, "")) == (input_csv in (None, "")):
        raise MedtlError("give exactly one of input_dir (a DICOM folder) or input_csv (a table of images)",
                         hint="e.g. --input_dir scans/ or --input_csv cases.csv")
    if input_csv not in (None, ""):
        rows = _csv_rows(Path(input_csv))  # a table that cannot be read leaves no salt behind
        found = _csv_cases(Path(input_csv), rows, None if real_ids else _output_salt(output_dir))
    else:  # the scan keys series UIDs with the salt too
        found = _dicom_cases(Path(input_dir), _output_salt(output_dir), keyed=not real_ids)
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


def _dicom_cases(root: Path, salt: str, *, keyed: bool) -> dict[str, Any]:
    """Every loadable series under ``root`` as a case, in folder order; folders keyed with ``salt`` when ``keyed``."""
    index = scan_dicom(root, salt, progress=False)
    name_salt = salt if keyed else None
    found, skipped = [], [{"id": _named(s["path"], root, name_salt), "reason": s["reason"]} for s in index["skipped"]]
    for series in index["series"]:
        number = series["series_number"] if series["series_number"] is not None else series["series_key"]
        folder = series["folders"][0]
        ident = f"{_named(folder, root, name_salt)}#{number}"
        if not series["loadable"]:
            reasons = "; ".join(p["message"] for p in series["problems"] if p["blocking"])
            skipped.append({"id": ident, "reason": reasons})
            continue
        case = {"id": ident, "series": series["series_key"], "image": [str(root / f) for f in series["files"]]}
        found.append((f"{folder}#{number}", case))  # sorted by the folder on disk, however it is named in the output
    ids = [case["id"] for _, case in found]
    for _, case in found:  # two series with one number in one folder: the pseudonymous key tells them apart
        if ids.count(case["id"]) > 1:
            case["id"] = f"{case['id']}:{case['series']}"
    cases = [case for _, case in sorted(found, key=lambda pair: (pair[0], pair[1]["id"]))]
    if not cases:
        raise MedtlError("no loadable image series found", path=root.name,
                         hint=f"{len(skipped)} files/series skipped; run `medtl scan` on it to see why")
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
        raise MedtlError(f"cannot read the case table: {csv_problem(exc, reader.line_num)}", path=path.name,
                         hint="check the quotes around that line; a cell holds one path or three numbers") from None
    if not rows or "image" not in rows[0]:
        raise MedtlError("the case table needs an 'image' column (and optionally 'mask' or 'roi_center_mm')", path=path.name)
    return rows


def _csv_cases(path: Path, rows: Sequence[Mapping[str, str]], salt: str | None) -> dict[str, Any]:
    """The case table's rows as cases; ids name an image's folder by its key with ``salt``, as written without."""
    root = path.parent
    cases, skipped = [], []
    for n, row in enumerate(rows, start=2):
        image = (row.get("image") or "").strip()
        if not image:
            skipped.append({"id": f"row {n}", "reason": "empty image path"})
            continue
        # the paths as written in the table, repeated in the output ("image_..." names are the image's meta keys in MONAI)
        case: dict[str, Any] = {"id": _named(image, root, salt), "image": str(root / image), "csv_image": image, "csv_mask": ""}
        if (row.get("mask") or "").strip():
            case["mask"] = str(root / row["mask"].strip())
            case["csv_mask"] = row["mask"].strip()
        elif (row.get("roi_center_mm") or "").strip():
            try:
                center = [float(v) for v in row["roi_center_mm"].replace(";", " ").split()]
            except ValueError:
                center = []
            if len(center) != 3:
                skipped.append({"id": case["id"], "reason": f"roi_center_mm is not 3 numbers (x y z, RAS mm): {row['roi_center_mm']!r}"})
                continue
            case["roi_center_mm"] = center
        cases.append(case)
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
    for case in tqdm(found["cases"], desc="preprocess", unit="case", disable=not progress, leave=False):
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
        raise MedtlError(f"every case failed preprocessing ({len(skipped)} skipped)",
                         hint="; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3]))
    return {"items": items, "skipped": skipped}


def require_cases(data: Sized, *, give: str) -> int:
    """The first step of a bundle's ``run``: stop with a clear error when the workflow was built
    without input (its data components take ``missing_ok``), rather than let MONAI skip an empty
    run with a warning. ``give`` says what to pass, e.g. ``"--manifest manifests/site.json"``.
    Returns the number of cases."""
    if len(data) == 0:
        raise MedtlError("no cases to run on: the bundle was given no input", hint=f"pass {give} to python -m monai.bundle run")
    return len(data)


# ----------------------------------------------------------------------------------- ignite handlers


def _probabilities(engine: Any) -> np.ndarray:
    return np.stack([torch.as_tensor(o["pred"]).detach().float().cpu().reshape(-1).numpy() for o in engine.state.output])


def _column(batch: Any, key: str, n: int) -> list[Any] | None:
    """``key`` of every case in the batch, collated (dict of lists) or decollated (list of dicts, MONAI's default)."""
    if isinstance(batch, Mapping):
        values = batch.get(key)
    elif all(isinstance(item, Mapping) and key in item for item in batch):
        values = [item[key] for item in batch]
    else:
        values = None
    if values is None:
        return None
    values = values.tolist() if isinstance(values, torch.Tensor) else [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    return values if len(values) == n else None


class MetricsReport:
    """Target-domain metrics of an evaluation run, with bootstrap CIs per site, as JSON and a table.

    Attach to a ``SupervisedEvaluator`` whose postprocessing applies softmax to ``pred``. Labels,
    patients (for patient-level resampling) and sites are read from the batch.
    """

    def __init__(self, output_dir: str | Path, class_names: Sequence[str], *, filename: str = "metrics",
                 n_boot: int = 1000, seed: int = 0, enabled: bool = True, run: Mapping[str, Any] | None = None) -> None:
        self.output_dir, self.filename = Path(output_dir), filename
        self.class_names, self.n_boot, self.seed, self.enabled = list(class_names), n_boot, seed, enabled
        self.run = dict(run or {})
        self.result: dict[str, Any] | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.enabled:
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, _engine: Any) -> None:
        self._probs, self._labels, self._patients, self._sites = [], [], [], []

    def _collect(self, engine: Any) -> None:
        probs = _probabilities(engine)
        batch, n = engine.state.batch, len(probs)
        self._probs.append(probs)
        self._labels += _column(batch, "label", n) or []
        self._patients += _column(batch, "patient", n) or [None] * n
        self._sites += _column(batch, "site", n) or [None] * n

    def _write(self, _engine: Any) -> None:
        probs = np.concatenate(self._probs)
        y = np.asarray(self._labels).reshape(-1).astype(np.int64)
        patients = None if None in self._patients else self._patients
        sites = None if None in self._sites else self._sites
        self.result = classification_metrics(y, probs, class_names=self.class_names, patient_ids=patients, sites=sites,
                                             n_boot=self.n_boot, seed=self.seed)
        atomic_write_json(self.output_dir / f"{self.filename}.json", self.result | ({"run": self.run} if self.run else {}))
        atomic_write_text(self.output_dir / f"{self.filename}.md", format_table(self.result))
        logger.info("metrics on %d cases -> %s.json\n%s", len(y), self.filename, format_table(self.result))


class PredictionWriter:
    """One row per case: its identifying columns, class probabilities (``prob_<class>``), predicted
    class and model version; CSV (``fileio.atomic_write_csv``: a cell a spreadsheet would read as a
    formula, such as a folder named ``=cmd|' /C calc'!A0``, is written as text) and JSON.

    ``columns`` maps output column names to batch keys (a plain list repeats keys under their own
    names): ``{"image": "csv_image", "mask": "csv_mask"}`` repeats a CSV input's paths as given.
    ``skipped`` (from ``prepare_cases``) is written beside the predictions so nothing goes missing
    silently.
    """

    def __init__(self, output_dir: str | Path, class_names: Sequence[str], *, skipped: Sequence[Mapping[str, Any]] = (),
                 model_version: str = "", columns: Sequence[str] | Mapping[str, str] = ("id", "series"),
                 filename: str = "predictions") -> None:
        self.output_dir, self.filename = Path(output_dir), filename
        self.class_names, self.skipped = list(class_names), list(skipped)
        self.model_version = str(model_version)
        self.columns = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Any) -> None:
        probs = _probabilities(engine)
        extra = {c: _column(engine.state.batch, key, len(probs)) or [""] * len(probs) for c, key in self.columns.items()}
        for i, p in enumerate(probs):
            row = {c: extra[c][i] for c in self.columns}
            row.update({f"prob_{name}": round(float(v), 6) for name, v in zip(self.class_names, p)})
            row["pred"] = self.class_names[int(np.argmax(p))]
            row["model_version"] = self.model_version
            self.rows.append(row)

    def _write(self, _engine: Any) -> None:
        fields = [*self.columns, *(f"prob_{n}" for n in self.class_names), "pred", "model_version"]
        atomic_write_csv(self.output_dir / f"{self.filename}.csv", self.rows, fields)  # a formula-like cell is text
        atomic_write_json(self.output_dir / f"{self.filename}.json",
                          {"model_version": self.model_version, "class_names": self.class_names,
                           "predictions": self.rows, "skipped": self.skipped})
        logger.info("%d predictions, %d skipped -> %s.csv", len(self.rows), len(self.skipped), self.filename)


__all__ = [
    "MetricsReport",
    "PredictionWriter",
    "configure_torch",
    "class_names",
    "datalist",
    "inference_cases",
    "load_bundle_network",
    "load_source",
    "prepare_cases",
    "require_cases",
    "teacher_labeled",
]
