"""Public datasets into medtl's own files: NIfTI volumes, label tables and manifests.

Real data must meet the model through the same path as a user's DICOM export (manifest ->
``datalist`` -> transforms), so each importer writes what ``medtl manifest build`` would read and
then calls it. Two sources:

* LIDC-IDRI nodule volumes of interest (``import_lidc_vois``): CT in HU with nodule masks, split
  into two sites by slice spacing (thin-slice source, thick-slice target) for transfer learning;
* MedMNIST ``.npz`` files (``import_medmnist``): small 2D or 3D uint8 images with the file's own
  train/val/test split; 3D shape sets (AdrenalMNIST3D) also as CT-like images with their shape as
  the lesion mask (``roi="shape"``), the input a CT bundle with a mask channel takes.

Outputs are written atomically; an ``import.json`` beside them records what was converted from
which source bytes, so a rerun converts only what changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.errors import ImageError, MedtlError
from medtl.fileio import atomic_write_csv, atomic_write_json, atomic_write_text, csv_problem, sha256_file
from medtl.manifest import SPLITS, build_manifest_file
from medtl.nifti import read_nifti, write_nifti
from medtl.privacy import load_or_create_salt, pseudonym, salt_path
from medtl.progress import track
from medtl.volume import Volume

IMPORTER_VERSION = 1  # bump when the conversion changes, so reruns convert again
STATE_FILE = "import.json"

# LIDC: the label is the consensus diagnosis; class names match the demo cohort's, so a model
# trained on one reads the other's label_map the same way (benign = 0, malignant = 1).
LIDC_CLASSES = ("benign", "malignant")
_LIDC_DIAGNOSES = {"Benign": "benign", "Malign": "malignant"}
_LIDC_COLUMNS = ("patient_id", "image", "mask", "diagnosis", "diameter_mm")
# The source site keeps most patients for training; the target site, like the demo's site B,
# gives adaptation few labeled cases and keeps most for evaluation.
LIDC_SPLITS = {"thin": {"train": 0.7, "val": 0.15, "test": 0.15}, "thick": {"train": 0.3, "val": 0.2, "test": 0.5}}

# MedMNIST label indices, in the order of each dataset's ``info["label"]``.
MEDMNIST_CLASSES = {
    "breastmnist": ("malignant", "normal_or_benign"),
    "adrenalmnist3d": ("normal", "hyperplasia"),
}
# roi="shape": a shape set's voxels written as CT shows an organ, soft tissue in air (import_medmnist says why)
ROI_CHOICES = ("shape",)
SHAPE_HU = 40
BACKGROUND_HU = -1000
# the lesion crop of medtl's CT bundles (lidc_nodule_malignancy's crop_mm), which a shape should fit
BUNDLE_CROP_MM = 32.0


def _load_state(out: Path) -> dict[str, dict[str, Any]]:
    """Records of the previous run's conversions, or none when absent, unreadable or outdated."""
    try:
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(state, dict) or state.get("importer_version") != IMPORTER_VERSION:
        return {}
    return state.get("files", {})


def _public_salt(out: Path, dataset: str) -> str:
    """The salt beside the manifests, fixed by the dataset's name on first use.

    Patient keys order the split draw, so a random salt would give every machine its own split;
    a public dataset's identifiers are published codes, not hospital records, so a fixed salt
    costs no privacy and makes its manifests (and benchmark figures) the same everywhere.
    """
    path = salt_path(out / "manifests")
    if not path.exists():
        atomic_write_text(path, hashlib.sha256(f"medtl-public-{dataset}".encode()).hexdigest() + "\n")
    return load_or_create_salt(path.parent)


def _current(record: Mapping[str, Any] | None, source: Mapping[str, str], out: Path) -> bool:
    """True when ``record`` converted exactly these source bytes and its outputs are untouched."""
    if not record or record.get("source") != dict(source):
        return False
    return all(
        (out / rel).is_file() and sha256_file(out / rel) == sha for rel, sha in record.get("outputs", {}).items()
    )


def _integral_dtype(array: np.ndarray, dtype: type) -> type | None:
    """``dtype`` when every voxel fits it exactly (HU stored as integers), else None to keep float32."""
    info = np.iinfo(dtype)
    if array.size and np.all(np.round(array) == array) and array.min() >= info.min and array.max() <= info.max:
        return dtype
    return None


# --------------------------------------------------------------------------------------------- LIDC


def _lidc_site(z_mm: float, thin_max_mm: float, thick_min_mm: float) -> str | None:
    """Site of a scan by slice spacing; None for the gap between, which neither domain claims."""
    if z_mm <= thin_max_mm:
        return "thin"
    if z_mm >= thick_min_mm:
        return "thick"
    return None


def _read_lidc_table(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MedtlError(
            "labels.csv not found",
            path=path,
            hint="give the lidc_nodule_vois folder holding labels.csv, image/ and nodule_mask/",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MedtlError(f"cannot read the label table ({exc})", path=path) from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        missing = [c for c in _LIDC_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise MedtlError(
                f"missing column(s) {', '.join(missing)}",
                path=path,
                hint=f"an LIDC VOI table has {', '.join(_LIDC_COLUMNS)}, ...",
            )
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as exc:
        raise MedtlError(csv_problem(exc, reader.reader.line_num), path=path) from None


def _convert_lidc_case(image: Path, mask: Path, out: Path, key: str) -> tuple[float, dict[str, str]]:
    """Read, check and re-write one VOI and its mask in RAS; return the slice spacing and outputs.

    Re-writing (rather than copying) gives every case the same orientation and dtype and drops
    whatever text the source header carried. Cases are converted whatever their site, so a rerun
    with other spacing limits reuses them. Raises ImageError naming the file that is unusable.
    """
    volume, lesion = read_nifti(image), read_nifti(mask)
    if not np.any(lesion.array > 0):
        raise ImageError("nodule mask is empty (no voxel > 0)", path=mask)
    outputs = [f"images/{key}.nii.gz", f"masks/{key}.nii.gz"]
    write_nifti(volume, out / outputs[0], dtype=_integral_dtype(volume.array, np.int16))
    write_nifti(Volume(lesion.array > 0, lesion.affine), out / outputs[1], dtype=np.uint8)
    # float32 headers store 1.8 mm as 1.7999999523; millimetre hundredths are what the thresholds mean
    return round(volume.spacing[2], 2), {rel: sha256_file(out / rel) for rel in outputs}


def import_lidc_vois(
    src: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    thin_max_mm: float = 1.3,
    thick_min_mm: float = 1.8,
    fractions: Mapping[str, Mapping[str, float]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Import LIDC-IDRI nodule VOIs as two sites, ``thin`` (z spacing <= ``thin_max_mm``) and
    ``thick`` (>= ``thick_min_mm``), each with its own patient-level split and manifest.

    Scans between the thresholds are left out and counted. Rows that cannot be used (missing or
    unreadable file, empty mask, unknown diagnosis, duplicate image) are skipped and listed with
    the reason and file; the rest is imported. ``diameter_mm`` is a rater measurement that almost
    decides the label, so it never reaches a label table or manifest: it goes to ``baseline.csv``
    only, for the size-only baseline an image model must beat.

    Args:
        src: the ``lidc_nodule_vois`` folder (``labels.csv``, ``image/``, ``nodule_mask/``).
        out: output folder; see ``Returns`` for its layout.
        seed: seed of the patient-level split.
        thin_max_mm, thick_min_mm: slice-spacing limits of the two sites.
        fractions: train/val/test fractions per site; defaults to ``LIDC_SPLITS``.
        progress: show progress bars.

    Returns:
        A summary, also saved in ``out/import.json``: counts per site, split and label, what was
        left out or skipped and why, and the files written under ``out``::

            images/voi-*.nii.gz, masks/voi-*.nii.gz   CT (int16 HU) and nodule masks, RAS
            labels_thin.csv, labels_thick.csv         medtl label tables (patient_id,label,site,image,mask)
            manifests/thin.json, manifests/thick.json  one manifest per site (fixed salt in manifests/.medtl-salt)
            baseline.csv                               site,case_id,image,diameter_mm (not a model input)

    Examples:
        Source and target domains of lung-nodule CT, then the source training list::

            summary = import_lidc_vois("shared/data/lidc_nodule_vois", "lidc")
            items = datalist(load_manifest("lidc/manifests/thin.json"), "lidc", "train")
    """
    src, out = Path(src), Path(out)
    started = time.perf_counter()
    unknown = set(fractions or {}) - set(LIDC_SPLITS)
    if unknown:
        raise MedtlError(
            f"fractions given for unknown site(s) {', '.join(sorted(unknown))}; the sites are {', '.join(LIDC_SPLITS)}"
        )
    fractions = {**LIDC_SPLITS, **(fractions or {})}
    if not thin_max_mm < thick_min_mm:
        raise MedtlError(f"thin_max_mm must be below thick_min_mm, got {thin_max_mm} and {thick_min_mm}")
    table = src / "labels.csv"
    rows = _read_lidc_table(table)
    salt = _public_salt(out, "lidc_nodule_vois")  # the manifests' salt also names the files
    previous = _load_state(out)
    files: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, Any]] = []
    left_out: Counter[float] = Counter()
    by_site: dict[str, list[dict[str, str]]] = {"thin": [], "thick": []}
    z_by_site: dict[str, Counter[float]] = {"thin": Counter(), "thick": Counter()}
    diameters: dict[str, str] = {}
    seen: dict[str, int] = {}
    reused = 0
    for line, row in enumerate(track(rows, desc="importing LIDC VOIs", unit="nodule", disable=not progress), start=2):
        try:
            key, record, was_current = _lidc_row(row, line, src, out, salt, seen, previous)
        except MedtlError as exc:
            file = (
                Path(exc.path).relative_to(src).as_posix()
                if exc.path
                else row.get("image") or row.get("mask") or table.name
            )
            skipped.append({"row": line, "file": file, "reason": exc.message})
            continue
        files[key] = record
        reused += was_current
        site = _lidc_site(record["z_mm"], thin_max_mm, thick_min_mm)
        if site is None:
            left_out[record["z_mm"]] += 1
            continue
        image = f"images/{key}.nii.gz"
        by_site[site].append(
            {
                "patient_id": row["patient_id"],
                "label": _LIDC_DIAGNOSES[row["diagnosis"]],
                "site": site,
                "image": image,
                "mask": f"masks/{key}.nii.gz",
            }
        )
        z_by_site[site][record["z_mm"]] += 1
        diameters[image] = row["diameter_mm"]

    sites: dict[str, Any] = {}
    baseline: list[dict[str, str]] = []
    for site, site_rows in by_site.items():
        labels, manifest_path = out / f"labels_{site}.csv", out / "manifests" / f"{site}.json"
        if not site_rows:  # nothing of this site in the source: no stale table or manifest stays behind
            labels.unlink(missing_ok=True)
            manifest_path.unlink(missing_ok=True)
            continue
        atomic_write_csv(labels, site_rows, ("patient_id", "label", "site", "image", "mask"))
        manifest = build_manifest_file(
            labels=labels,
            classes=LIDC_CLASSES,
            out=manifest_path,
            root=out,
            fractions=dict(fractions[site]),
            seed=seed,
            name=f"lidc_{site}",
            progress=progress,
        )
        baseline += [
            {
                "site": site,
                "case_id": c["case_id"],
                "image": c["image"]["path"],
                "diameter_mm": diameters[c["image"]["path"]],
            }
            for c in manifest["cases"]
        ]
        sites[site] = {
            "rule": f"z spacing <= {thin_max_mm} mm" if site == "thin" else f"z spacing >= {thick_min_mm} mm",
            "manifest": manifest_path.relative_to(out).as_posix(),
            "labels": labels.name,
            "cases": manifest["counts"]["cases"],
            "patients": manifest["counts"]["patients"],
            "by_split_label": manifest["counts"]["by_site_split_label"][site],
            "z_spacing_mm": {str(z): n for z, n in sorted(z_by_site[site].items())},
        }
    atomic_write_csv(out / "baseline.csv", baseline, ("site", "case_id", "image", "diameter_mm"))
    patients = {s: {r["patient_id"] for r in rs} for s, rs in by_site.items()}
    summary = {
        "dataset": "lidc_nodule_vois",
        "rows": len(rows),
        "imported": sum(s["cases"] for s in sites.values()),
        "converted": len(files) - reused,
        "reused": reused,
        "classes": list(LIDC_CLASSES),
        "label_map": {c: i for i, c in enumerate(LIDC_CLASSES)},
        "sites": sites,
        # a patient in both sites would be seen by the source model and tested on in the target
        "patients_in_both_sites": len(patients["thin"] & patients["thick"]),
        "left_out": {
            "count": sum(left_out.values()),
            "reason": f"z spacing between {thin_max_mm} and {thick_min_mm} mm",
            "z_spacing_mm": {str(z): n for z, n in sorted(left_out.items())},
        },
        "skipped": skipped,
        "baseline": "baseline.csv",
        "preprocessing": {"modality": "ct"},
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / STATE_FILE, {"importer_version": IMPORTER_VERSION, "summary": summary, "files": files})
    return summary


def _lidc_row(
    row: Mapping[str, str],
    line: int,
    src: Path,
    out: Path,
    salt: str,
    seen: dict[str, int],
    previous: Mapping[str, dict[str, Any]],
) -> tuple[str, dict[str, Any], bool]:
    """Check one table row and convert its files unless the previous run already did.

    Returns the case key (a salted hash of the source image path, so file names carry no patient
    ID), its record for ``import.json`` and whether the record was reused. Raises MedtlError with
    the reason the row is skipped.
    """
    if not row.get("patient_id"):
        raise MedtlError("empty patient_id")
    if row.get("diagnosis") not in _LIDC_DIAGNOSES:
        raise MedtlError(f"unknown diagnosis {row.get('diagnosis')!r} (expected {' or '.join(_LIDC_DIAGNOSES)})")
    for column in ("image", "mask"):
        if not row.get(column):
            raise MedtlError(f"no {column} file given")
        if not (src / row[column]).is_file():
            raise MedtlError(f"{column} file {row[column]!r} not found")
    if row["image"] in seen:
        raise MedtlError(f"image {row['image']!r} is already used by row {seen[row['image']]}")
    seen[row["image"]] = line
    key = pseudonym(row["image"], salt, "voi")
    source = {"image": sha256_file(src / row["image"]), "mask": sha256_file(src / row["mask"])}
    record = previous.get(key)
    if _current(record, source, out):
        return key, record, True
    z_mm, outputs = _convert_lidc_case(src / row["image"], src / row["mask"], out, key)
    return key, {"source": source, "z_mm": z_mm, "outputs": outputs}, False


# ----------------------------------------------------------------------------------------- MedMNIST


def _medmnist_name(stem: str) -> str:
    """``breastmnist_224`` -> ``breastmnist``: MedMNIST+ files carry the image size in their name."""
    return re.sub(r"_(28|64|128|224)$", "", stem)


def _read_medmnist(npz: Path, n_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(images, labels) per split, checked: one label per image, each an index into the classes."""
    try:
        with np.load(npz) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise MedtlError("file not found", path=npz) from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise MedtlError(f"not a readable .npz file ({exc})", path=npz) from None
    splits = {}
    for split in SPLITS:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise MedtlError(
                f"no {split}_images / {split}_labels arrays (found {', '.join(sorted(arrays)) or 'none'})",
                path=npz,
                hint="a MedMNIST file holds train, val and test images and labels",
            )
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] == 3):
            raise MedtlError(
                f"{split}_images has shape {images.shape}; expected grey-level (N, H, W) or (N, D, H, W)",
                path=npz,
                hint="colour MedMNIST sets are not supported",
            )
        labels = labels.reshape(len(labels), -1)
        if labels.shape[1] != 1 or len(labels) != len(images):
            raise MedtlError(
                f"{split}_labels has shape {labels.shape} for {len(images)} images; expected one class index per image",
                path=npz,
                hint="multi-label MedMNIST sets are not supported",
            )
        unknown = sorted(set(labels[:, 0].tolist()) - set(range(n_classes)))
        if unknown:
            raise MedtlError(
                f"{split}_labels holds class indices {unknown} beyond the {n_classes} class names",
                path=npz,
                hint="pass one class name per label index",
            )
        splits[split] = (images, labels[:, 0])
    if len({images.ndim for images, _ in splits.values()}) > 1:
        raise MedtlError("the splits mix 2D and 3D images", path=npz)
    return splits


def _medmnist_volume(image: np.ndarray) -> Volume:
    """One image at a nominal 1 mm spacing (MedMNIST resizes away the true one).

    A 2D image (rows, columns) becomes a single-slice volume with i along the columns and j up the
    rows, so viewers show it upright; 3D arrays keep the file's axis order.
    """
    array = image.T[:, ::-1, None] if image.ndim == 2 else image
    return Volume(np.ascontiguousarray(array), np.eye(4))


def _check_shape_set(splits: Mapping[str, tuple[np.ndarray, np.ndarray]], lo: int, hi: int, npz: Path) -> None:
    """Refuse what ``roi="shape"`` cannot read as masks: 2D sets, grey-level images, an empty shape."""
    if next(iter(splits.values()))[0].ndim != 4:
        raise MedtlError("roi='shape' needs a 3D set (N, D, H, W); this file holds 2D images", path=npz)
    grey = sum(int(np.count_nonzero((images != lo) & (images != hi))) for images, _ in splits.values())
    if lo == hi or grey:
        raise MedtlError(
            f"roi='shape' needs shape masks of two values (background and shape); this file's images hold "
            f"{'one value' if lo == hi else f'{grey} voxels between {lo} and {hi}'}",
            path=npz,
            hint="a grey-level set (CT, MR) has no shape to take as its mask: import it without roi",
        )
    empty = [
        f"{split}/{i}"
        for split, (images, _) in splits.items()
        for i in np.flatnonzero(~(images == hi).reshape(len(images), -1).any(axis=1))
    ]
    if empty:
        raise MedtlError(
            f"{len(empty)} image(s) hold no shape voxel ({', '.join(empty[:3])}), so there is no lesion to crop around",
            path=npz,
        )


def _shape_volumes(image: np.ndarray, hi: int) -> tuple[Volume, Volume]:
    """A shape image as (CT in HU, its mask): ``SHAPE_HU`` where the file holds ``hi``, else ``BACKGROUND_HU``."""
    mask = _medmnist_volume(image == hi)
    hu = np.where(mask.array, SHAPE_HU, BACKGROUND_HU).astype(np.int16)
    return Volume(hu, mask.affine), Volume(mask.array.astype(np.uint8), mask.affine)


def _shape_crop_mm(splits: Mapping[str, tuple[np.ndarray, np.ndarray]], hi: int) -> list[float]:
    """Per axis, a crop size (mm at the nominal 1 mm) that holds every whole shape when centred on its
    centre of mass, as the bundles centre their lesion crop: twice the farthest shape voxel's distance
    from that centre, plus one voxel for the rounding of the box to whole voxels and one for the voxel itself."""
    sizes = []
    for axis in range(3):
        farthest = 0.0
        for images, _ in splits.values():
            masks = images == hi
            others = tuple(a for a in range(1, 4) if a != axis + 1)
            counts = masks.sum(axis=others)  # (N, length of this axis): shape voxels per plane
            index = np.arange(counts.shape[1])
            center = (counts * index).sum(axis=1) / counts.sum(axis=1)
            present = counts > 0
            first = present.argmax(axis=1)
            last = counts.shape[1] - 1 - present[:, ::-1].argmax(axis=1)
            farthest = max(farthest, float(np.max(np.maximum(center - first, last - center))))
        sizes.append(float(np.ceil(2 * farthest + 2)))
    return sizes


def import_medmnist(
    npz: str | Path,
    out: str | Path,
    *,
    classes: Sequence[str] | None = None,
    name: str | None = None,
    roi: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Import a MedMNIST ``.npz`` as NIfTI files and one manifest that keeps the file's own split.

    MedMNIST publishes results on its official train/val/test split, so that split is kept
    (the label table's ``split`` column) rather than drawn again. Images have no patient IDs;
    each one is its own patient. Intensities are uint8 0..255, not HU, and some sets are binary
    masks (adrenalmnist3d), which a z-score of the nonzero voxels would turn to zeros. So the
    summary's ``preprocessing`` entry (``medtl.transforms.preprocessing`` arguments) scales the
    file's value range linearly to [0, 1] through the CT preset's window, and crops the whole image;
    for a 2D set it also says ``spatial_dims=2``, so the single-slice files become (1, H, W) images
    for a 2D network.

    ``roi="shape"`` reads a 3D set of shape masks (AdrenalMNIST3D: adrenal glands segmented from CT,
    normal vs hyperplasia) as the input of a CT bundle with a mask channel (``lidc_nodule_malignancy``):
    each image is written as CT in HU, shape voxels at ``SHAPE_HU`` (40, unenhanced soft tissue, as
    adrenal tissue and solid nodules measure) over ``BACKGROUND_HU`` (-1000, air), and the shape itself
    as the case's ``mask`` (the region of interest), so the manifest's cases carry ``roi.mask``. Air
    rather than the retroperitoneal fat (-100 HU) around real adrenals: the bundles' lung window
    (-1000..400 HU) then maps the shape to 0.74 over 0, the contrast of a solid nodule in aerated
    lung that a lung-CT source model learned, and the crop's padding (0, i.e. -1000 HU) where it
    leaves the 28 mm image is the background itself, not a box edge. The nominal 1 mm spacing keeps
    the files' size in millimetres; the summary's ``roi`` says which crop holds every whole shape
    when centred on its centre of mass, as the bundles centre it (AdrenalMNIST3D at 28³: 31 mm, so
    the bundles' 32 mm crop keeps each gland whole; the 64³ file needs a larger one).

    Args:
        npz: a MedMNIST file with ``{train,val,test}_{images,labels}`` arrays, 2D (N, H, W) or
            3D (N, D, H, W), one class index per image.
        out: output folder, one dataset per folder; see ``Returns``.
        classes: class names in label-index order; built in for ``MEDMNIST_CLASSES``.
        name: dataset name for the site and manifest; defaults to the file's name without size suffix.
        roi: ``"shape"`` for a 3D set of shape masks: CT-like images in HU with the shape as their mask.
        progress: show a progress bar.

    Returns:
        A summary, also saved in ``out/import.json``, of the files written under ``out``::

            images/{train,val,test}/<split>-NNNNN.nii.gz   one image each, 1 mm nominal spacing
            masks/{train,val,test}/<split>-NNNNN.nii.gz    with roi="shape": the shape (uint8 0/1)
            labels.csv                                      patient_id,label,site,image,split (,mask)
            manifests/<name>.json                           the manifest (fixed salt in manifests/.medtl-salt)

    Examples:
        Breast ultrasound, 0 = malignant and 1 = normal or benign::

            summary = import_medmnist("shared/data/medmnist/breastmnist.npz", "breastmnist")
            pre = preprocessing(**summary["preprocessing"])

        Adrenal glands as CT with their mask, for the LIDC bundle's two-channel input::

            summary = import_medmnist("shared/data/medmnist/adrenalmnist3d.npz", "adrenal", roi="shape")
            pre = preprocessing(**summary["preprocessing"])  # modality="ct", mask_channel=True, crop_mm 32
    """
    npz, out = Path(npz), Path(out)
    started = time.perf_counter()
    name = name or _medmnist_name(npz.stem)
    if classes is None:
        if name not in MEDMNIST_CLASSES:
            raise MedtlError(
                f"no built-in class names for {name!r}",
                path=npz,
                hint=f"pass classes (built in: {', '.join(MEDMNIST_CLASSES)})",
            )
        classes = MEDMNIST_CLASSES[name]
    classes = tuple(classes)
    if roi is not None and roi not in ROI_CHOICES:
        raise MedtlError(f"unknown roi {roi!r}; allowed: {', '.join(ROI_CHOICES)}")
    splits = _read_medmnist(npz, len(classes))
    lo = min(images.min().item() for images, _ in splits.values())
    hi = max(images.max().item() for images, _ in splits.values())
    if roi == "shape":
        _check_shape_set(splits, lo, hi, npz)
    npz_sha = sha256_file(npz)
    _public_salt(out, name)
    previous = _load_state(out)
    files: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, str]] = []
    reused = 0
    total = sum(len(labels) for _, labels in splits.values())
    with track(total=total, desc=f"importing {name}", unit="image", disable=not progress) as bar:
        for split, (images, labels) in splits.items():
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                key = f"{split}-{i:05d}"
                rel, mask_rel = f"images/{split}/{key}.nii.gz", f"masks/{split}/{key}.nii.gz"
                # the conversion is part of the source, so switching roi on or off converts again
                source = {"npz": npz_sha, "index": f"{split}/{i}", **({"roi": roi} if roi else {})}
                if _current(previous.get(key), source, out):
                    files[key] = previous[key]
                    reused += 1
                elif roi == "shape":
                    hu, mask = _shape_volumes(image, hi)
                    write_nifti(hu, out / rel, dtype=np.int16)
                    write_nifti(mask, out / mask_rel, dtype=np.uint8)
                    files[key] = {"source": source, "outputs": {p: sha256_file(out / p) for p in (rel, mask_rel)}}
                else:
                    volume = _medmnist_volume(image)
                    write_nifti(volume, out / rel, dtype=_integral_dtype(volume.array, np.uint8))
                    files[key] = {"source": source, "outputs": {rel: sha256_file(out / rel)}}
                row = {"patient_id": key, "label": classes[int(label)], "site": name, "image": rel, "split": split}
                rows.append(row | ({"mask": mask_rel} if roi else {}))
                bar.update()
    labels_path = out / "labels.csv"
    columns = ("patient_id", "label", "site", "image", "split", *(("mask",) if roi else ()))
    atomic_write_csv(labels_path, rows, columns)
    sizes = {split: len(labels) for split, (_, labels) in splits.items()}
    manifest = build_manifest_file(
        labels=labels_path,
        classes=classes,
        out=out / "manifests" / f"{name}.json",
        root=out,
        fractions={split: n / total for split, n in sizes.items()},
        name=name,
        progress=progress,
    )
    shape = list(_medmnist_volume(splits["train"][0][0]).shape)
    spatial_dims = splits["train"][0].ndim - 1
    size = shape[:spatial_dims]  # a 2D image's file keeps a slice axis of 1 that preprocessing drops
    dtype = splits["train"][0].dtype
    if roi == "shape":
        crop_mm = _shape_crop_mm(splits, hi)
        intensity = f"{dtype} shape masks ({lo} outside, {hi} inside), written as {SHAPE_HU} HU in {BACKGROUND_HU} HU"
        # the CT bundles' input: lung window, the mask as a second channel, their 32 mm crop unless a shape needs more
        preprocessing = {
            "modality": "ct",
            "mask_channel": True,
            "crop_mm": [max(BUNDLE_CROP_MM, c) for c in crop_mm],
            "spatial_size": [32, 32, 32],
        }
    else:
        intensity = f"{dtype} {lo}..{hi}, not HU"
        preprocessing = {
            "modality": "ct",
            "ct_window": [lo, hi],
            "spatial_dims": spatial_dims,
            "target_spacing": [1.0] * spatial_dims,
            "crop_mm": [float(n) for n in size],
            "spatial_size": size,
        }
    summary = {
        "dataset": name,
        "source": npz.name,
        "spatial_dims": spatial_dims,
        "image_shape": shape,
        "intensity": intensity,
        "classes": list(classes),
        "label_map": manifest["label_map"],
        "cases": total,
        "by_split_label": manifest["counts"]["by_site_split_label"][name],
        "manifest": f"manifests/{name}.json",
        "labels": labels_path.name,
        "converted": total - reused,
        "reused": reused,
        **(
            {
                "roi": {
                    "from": "shape",
                    "mask": f"image == {hi}",
                    "hu": {"shape": SHAPE_HU, "background": BACKGROUND_HU},
                    "crop_mm_holding_every_shape": crop_mm,
                }
            }
            if roi == "shape"
            else {}
        ),
        "preprocessing": preprocessing,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / STATE_FILE, {"importer_version": IMPORTER_VERSION, "summary": summary, "files": files})
    return summary
