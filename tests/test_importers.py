"""Importers of public datasets: LIDC nodule VOIs by slice spacing, MedMNIST with its own split."""

from __future__ import annotations

import csv
import warnings
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtl.errors import MedtlError
from medtl.importers import BACKGROUND_HU, LIDC_CLASSES, SHAPE_HU, import_lidc_vois, import_medmnist
from medtl.manifest import SPLITS, check_manifest, datalist, load_manifest
from medtl.nifti import read_nifti, write_nifti
from medtl.transforms import CT_WINDOW, preprocessing
from medtl.volume import Volume

REPO = Path(__file__).resolve().parents[1]

# (patient, z spacing mm, diagnosis): three thin, three thick (one 1.8 mm stored as float32), one between
FAKE_LIDC = [
    ("LIDC-IDRI-0001", 0.625, "Malign"),
    ("LIDC-IDRI-0001", 0.625, "Benign"),
    ("LIDC-IDRI-0002", 1.25, "Benign"),
    ("LIDC-IDRI-0003", 1.0, "Malign"),
    ("LIDC-IDRI-0004", 2.5, "Benign"),
    ("LIDC-IDRI-0004", 2.5, "Malign"),
    ("LIDC-IDRI-0005", float(np.float32(1.8)), "Benign"),
    ("LIDC-IDRI-0006", 1.5, "Malign"),
]
LIDC_HEADER = ["patient_id", "nodule_id", "image", "mask", "diagnosis", "malignancy_value", "diameter_mm", "seriesuid"]


def _voi(z_mm: float, seed: int) -> tuple[Volume, Volume]:
    """A 16x16x8 CT VOI in HU (LPS-like affine, as the LIDC files have) with a cubic nodule mask."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 400, size=(16, 16, 8)).astype(np.int16)
    mask = np.zeros(hu.shape, np.uint8)
    mask[6:10, 6:10, 3:5] = 1
    affine = np.diag([-0.7, -0.7, z_mm, 1.0])
    return Volume(hu, affine), Volume(mask, affine)


@pytest.fixture
def fake_lidc(tmp_path) -> Path:
    """Eight readable VOIs plus four bad rows: missing image, unreadable NIfTI, unknown label, empty mask."""
    src = tmp_path / "lidc"
    rows = []
    for i, (patient, z_mm, diagnosis) in enumerate(FAKE_LIDC):
        image, mask = f"image/{patient}_R_{i}.nii.gz", f"nodule_mask/{patient}_R_{i}.nii.gz"
        for rel, vol in zip((image, mask), _voi(z_mm, i), strict=True):
            write_nifti(vol, src / rel)
        rows.append([patient, i, image, mask, diagnosis, 4 if diagnosis == "Malign" else 2, 10.0 + i, f"1.2.3.{i}"])
    write_nifti(_voi(1.0, 20)[1], src / "nodule_mask/LIDC-IDRI-0007_R_1.nii.gz")
    rows.append(
        [
            "LIDC-IDRI-0007",
            1,
            "image/LIDC-IDRI-0007_R_1.nii.gz",
            "nodule_mask/LIDC-IDRI-0007_R_1.nii.gz",
            "Benign",
            1,
            5.0,
            "1.2.3.20",
        ]
    )
    (src / "image/LIDC-IDRI-0008_R_1.nii.gz").write_bytes(b"not a nifti")
    rows.append(
        [
            "LIDC-IDRI-0008",
            1,
            "image/LIDC-IDRI-0008_R_1.nii.gz",
            "nodule_mask/LIDC-IDRI-0001_R_0.nii.gz",
            "Benign",
            1,
            5.0,
            "1.2.3.21",
        ]
    )
    rows.append(
        [
            "LIDC-IDRI-0009",
            1,
            "image/LIDC-IDRI-0001_R_0.nii.gz",
            "nodule_mask/LIDC-IDRI-0001_R_0.nii.gz",
            "Indeterminate",
            3,
            5.0,
            "1.2.3.22",
        ]
    )
    hu, empty = _voi(1.0, 23)
    write_nifti(hu, src / "image/LIDC-IDRI-0010_R_1.nii.gz")
    write_nifti(Volume(np.zeros_like(empty.array), empty.affine), src / "nodule_mask/LIDC-IDRI-0010_R_1.nii.gz")
    rows.append(
        [
            "LIDC-IDRI-0010",
            1,
            "image/LIDC-IDRI-0010_R_1.nii.gz",
            "nodule_mask/LIDC-IDRI-0010_R_1.nii.gz",
            "Benign",
            1,
            5.0,
            "1.2.3.23",
        ]
    )
    with open(src / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LIDC_HEADER)
        writer.writerows(rows)
    return src


def _check_manifest_usable(manifest_path: Path, root: Path, **pre_options) -> dict:
    """Loads, verifies against the files, splits by patient, and one item runs through preprocessing."""
    manifest = load_manifest(manifest_path)
    assert check_manifest(manifest_path, root, progress=False)["ok"]
    items = datalist(manifest, root, SPLITS)
    assert len(items) == len(manifest["cases"])
    for item in items:
        assert Path(item["image"]).is_file() and Path(item.get("mask", item["image"])).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = preprocessing(**pre_options)(items[0])
    assert np.isfinite(np.asarray(data["image"])).all()
    return manifest


def test_lidc_sites_by_spacing_and_skipped_rows(fake_lidc, tmp_path):
    out = tmp_path / "out"
    summary = import_lidc_vois(fake_lidc, out, progress=False)
    assert summary["rows"] == 12 and summary["imported"] == 7
    assert {s: v["cases"] for s, v in summary["sites"].items()} == {"thin": 4, "thick": 3}
    assert summary["sites"]["thick"]["z_spacing_mm"] == {"1.8": 1, "2.5": 2}
    assert summary["left_out"]["count"] == 1 and summary["left_out"]["z_spacing_mm"] == {"1.5": 1}
    reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert len(reasons) == 4
    assert "not found" in reasons["image/LIDC-IDRI-0007_R_1.nii.gz"]
    assert "not a readable NIfTI" in reasons["image/LIDC-IDRI-0008_R_1.nii.gz"]
    assert "unknown diagnosis 'Indeterminate'" in reasons["image/LIDC-IDRI-0001_R_0.nii.gz"]
    assert "empty" in reasons["nodule_mask/LIDC-IDRI-0010_R_1.nii.gz"]
    assert summary["patients_in_both_sites"] == 0

    for site, n in (("thin", 4), ("thick", 3)):
        manifest = _check_manifest_usable(out / "manifests" / f"{site}.json", out, modality="ct")
        assert manifest["label_map"] == {c: i for i, c in enumerate(LIDC_CLASSES)}
        assert {c["site"] for c in manifest["cases"]} == {site} and len(manifest["cases"]) == n
        splits = defaultdict(set)
        for case in manifest["cases"]:
            splits[case["patient_key"]].add(case["split"])
        assert all(len(s) == 1 for s in splits.values())
        text = (out / "manifests" / f"{site}.json").read_text(encoding="utf-8")
        assert "LIDC-IDRI" not in text and str(tmp_path) not in text


def test_lidc_rater_columns_stay_out_of_model_inputs(fake_lidc, tmp_path):
    out = tmp_path / "out"
    import_lidc_vois(fake_lidc, out, progress=False)
    for name in ("labels_thin.csv", "labels_thick.csv", "manifests/thin.json", "manifests/thick.json"):
        text = (out / name).read_text(encoding="utf-8")
        assert "diameter" not in text and "malignancy" not in text
    with open(out / "baseline.csv") as fh:
        baseline = list(csv.DictReader(fh))
    cases = {
        (site, c["case_id"]): c["image"]["path"]
        for site in ("thin", "thick")
        for c in load_manifest(out / "manifests" / f"{site}.json")["cases"]
    }
    assert {(r["site"], r["case_id"]): r["image"] for r in baseline} == cases
    # fake diameters are 10 + row index; the thick rows are 4, 5 and 6
    assert sorted(float(r["diameter_mm"]) for r in baseline if r["site"] == "thick") == [14.0, 15.0, 16.0]


def test_lidc_rerun_reuses_converted_files_and_output_is_reproducible(fake_lidc, tmp_path):
    out = tmp_path / "out"
    first = import_lidc_vois(fake_lidc, out, progress=False)
    manifest = (out / "manifests" / "thin.json").read_bytes()
    again = import_lidc_vois(fake_lidc, out, progress=False)
    assert (first["converted"], first["reused"]) == (8, 0)
    assert (again["converted"], again["reused"]) == (0, 8)
    assert (out / "manifests" / "thin.json").read_bytes() == manifest
    # another folder (another machine) gets the same split, file names and manifests
    import_lidc_vois(fake_lidc, tmp_path / "elsewhere", progress=False)
    for name in ("manifests/thin.json", "manifests/thick.json", "baseline.csv"):
        assert (tmp_path / "elsewhere" / name).read_bytes() == (out / name).read_bytes()
    # a changed source file is converted again
    write_nifti(_voi(0.625, 99)[0], fake_lidc / "image/LIDC-IDRI-0001_R_0.nii.gz")
    assert import_lidc_vois(fake_lidc, out, progress=False)["converted"] == 1


def test_lidc_refuses_a_table_without_its_columns(tmp_path):
    (tmp_path / "labels.csv").write_text("patient_id,image\nA,image/a.nii.gz\n")
    with pytest.raises(MedtlError, match="missing column.*diagnosis"):
        import_lidc_vois(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(MedtlError, match="unknown site.*thik"):
        import_lidc_vois(tmp_path, tmp_path / "out", fractions={"thik": {"train": 1.0}}, progress=False)


def _fake_npz(path: Path, shape: tuple[int, ...], sizes=(6, 2, 3)) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(SPLITS, sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 28)], ids=["2d", "3d"])
def test_medmnist_keeps_the_file_split(tmp_path, shape):
    npz = _fake_npz(tmp_path / "fakemnist.npz", shape)
    out = tmp_path / "out"
    summary = import_medmnist(npz, out, classes=("normal", "lesion"), progress=False)
    assert summary["spatial_dims"] == len(shape) and summary["cases"] == 11
    assert summary["image_shape"] == ([28, 28, 1] if len(shape) == 2 else [28, 28, 28])
    manifest = _check_manifest_usable(out / summary["manifest"], out, **summary["preprocessing"])
    for split, n in zip(SPLITS, (6, 2, 3), strict=True):
        assert sum(summary["by_split_label"][split].values()) == n
        assert all(f"/{split}/" in c["image"]["path"] for c in manifest["cases"] if c["split"] == split)
    assert import_medmnist(npz, out, classes=("normal", "lesion"), progress=False)["reused"] == 11


def test_medmnist_2d_image_reads_back_upright(tmp_path):
    npz = _fake_npz(tmp_path / "fakemnist.npz", (28, 28))
    out = tmp_path / "out"
    summary = import_medmnist(npz, out, classes=("normal", "lesion"), progress=False)
    item = next(
        i
        for i in datalist(load_manifest(out / summary["manifest"]), out, "test")
        if i["image"].endswith("test-00001.nii.gz")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = preprocessing(**summary["preprocessing"])(item)["image"]
    original = np.load(npz)["test_images"][1]
    # i runs along the columns, j up the rows: row 0 of the picture is the top (highest j)
    assert image.shape == (1, 28, 28)  # the summary's preprocessing reads a 2D set as 2D images
    np.testing.assert_allclose(np.asarray(image[0]) * 255, original.T[:, ::-1], atol=1e-3)


def test_medmnist_refuses_unknown_labels_and_names(tmp_path):
    npz = _fake_npz(tmp_path / "fakemnist.npz", (28, 28))
    with pytest.raises(MedtlError, match="no built-in class names"):
        import_medmnist(npz, tmp_path / "out", progress=False)
    with pytest.raises(MedtlError, match=r"class indices \[1\]"):
        import_medmnist(npz, tmp_path / "out", classes=("only",), progress=False)


# (first voxel, length) along i of each box shape: one 27 voxels long, as AdrenalMNIST3D's longest glands
FAKE_SHAPES = [(0, 27), (8, 20), (3, 12), (20, 6), (1, 9), (5, 15), (24, 4), (2, 24)]


def _fake_shape_npz(path: Path, shapes=FAKE_SHAPES, sizes=(4, 2, 2)) -> Path:
    """3D shape masks as AdrenalMNIST3D holds them (uint8, 0 outside, 255 inside): boxes of varied length."""
    arrays, boxes = {}, iter(shapes)
    for split, n in zip(SPLITS, sizes, strict=True):
        images = np.zeros((n, 28, 28, 28), np.uint8)
        for image in images:
            start, length = next(boxes)
            image[start : start + length, 10:18, 9:15] = 255
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(path, **arrays)
    return path


def _lidc_bundle_preprocessing():
    """The shipped LIDC bundle's ``preprocessing``, as its inference config builds it."""
    from monai.bundle import ConfigParser

    bundle = REPO / "bundles" / "lidc_nodule_malignancy"
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content("preprocessing")


def _shape_items(out: Path, summary: dict) -> list[dict]:
    return datalist(load_manifest(out / summary["manifest"]), out, SPLITS)


def test_medmnist_shape_roi_is_ct_with_its_mask_for_the_lidc_bundle(tmp_path):
    npz = _fake_shape_npz(tmp_path / "shapes3d.npz")
    out = tmp_path / "out"
    summary = import_medmnist(npz, out, classes=("normal", "hyperplasia"), roi="shape", progress=False)
    assert summary["roi"] == {
        "from": "shape",
        "mask": "image == 255",
        "hu": {"shape": SHAPE_HU, "background": BACKGROUND_HU},
        "crop_mm_holding_every_shape": [28.0, 9.0, 7.0],  # a box of n voxels: n + 1 for the rounding
    }
    # the LIDC bundle's input: lung window, the mask as second channel, its 32 mm crop
    assert summary["preprocessing"] == {
        "modality": "ct",
        "mask_channel": True,
        "crop_mm": [32.0, 32.0, 32.0],
        "spatial_size": [32, 32, 32],
    }
    with open(out / "labels.csv") as fh:
        assert next(csv.reader(fh))[-1] == "mask"
    items = _shape_items(out, summary)
    assert len(items) == len(FAKE_SHAPES) and all("mask" in item for item in items)
    _check_manifest_usable(out / summary["manifest"], out, **summary["preprocessing"])

    originals = {f"{s}-{i:05d}": image for s in SPLITS for i, image in enumerate(np.load(npz)[f"{s}_images"])}
    lidc = _lidc_bundle_preprocessing()
    shape_value = (SHAPE_HU - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0])
    for item in items:
        original = originals[Path(item["image"]).name.removesuffix(".nii.gz")]
        image, mask = read_nifti(item["image"]), read_nifti(item["mask"])
        assert nib.load(item["image"]).get_data_dtype() == np.int16 and image.spacing == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(mask.array, original == 255)
        np.testing.assert_array_equal(image.array, np.where(original == 255, SHAPE_HU, BACKGROUND_HU))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = np.asarray(lidc({"image": item["image"], "mask": item["mask"]})["image"])
        assert x.shape == (2, 32, 32, 32)
        np.testing.assert_allclose(np.unique(x[0]), [0.0, shape_value], atol=1e-6)  # air 0, tissue 0.74
        assert x[1].sum() == pytest.approx((original == 255).sum())  # the 32 mm crop keeps the whole shape


def test_medmnist_shape_roi_reruns_and_converts_again_without_it(tmp_path):
    npz = _fake_shape_npz(tmp_path / "shapes3d.npz")
    out, classes = tmp_path / "out", ("normal", "hyperplasia")
    import_medmnist(npz, out, classes=classes, roi="shape", progress=False)
    assert import_medmnist(npz, out, classes=classes, roi="shape", progress=False)["reused"] == len(FAKE_SHAPES)
    plain = import_medmnist(npz, out, classes=classes, progress=False)
    assert plain["converted"] == len(FAKE_SHAPES) and "roi" not in plain
    assert all("mask" not in item for item in _shape_items(out, plain))
    assert read_nifti(out / "images/train/train-00000.nii.gz").array.max() == 255  # the file's own values again


def test_medmnist_shape_roi_crop_holds_an_off_centre_shape(tmp_path):
    """A cube with a thin tail: the crop is centred on the centre of mass, near the cube, so holding
    the tail's tip takes more than the bundles' 32 mm; the summary says how much, and that crop holds it."""
    npz = tmp_path / "tail3d.npz"
    image = np.zeros((28, 28, 28), np.uint8)
    image[0:8, 0:8, 0:8] = 255
    image[8:28, 3, 3] = 255
    np.savez(npz, **{f"{s}_{k}": a for s in SPLITS for k, a in (("images", image[None]), ("labels", np.zeros((1, 1))))})
    out = tmp_path / "out"
    summary = import_medmnist(npz, out, classes=("a", "b"), roi="shape", progress=False)
    crop = summary["roi"]["crop_mm_holding_every_shape"]
    assert crop[0] > 32 and summary["preprocessing"]["crop_mm"] == [crop[0], 32.0, 32.0]
    item = _shape_items(out, summary)[0]
    voxels = int((image == 255).sum())
    for crop_mm, whole in ((crop, True), ([32.0] * 3, False)):
        pre = preprocessing(modality="ct", mask_channel=True, crop_mm=crop_mm, spatial_size=[int(c) for c in crop_mm])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = float(np.asarray(pre(dict(item))["image"])[1].sum())
        assert (kept == pytest.approx(voxels)) is whole


def test_medmnist_shape_roi_refuses_what_is_not_a_3d_shape_set(tmp_path):
    classes = ("normal", "lesion")
    with pytest.raises(MedtlError, match="unknown roi 'blob'"):
        import_medmnist(_fake_shape_npz(tmp_path / "s.npz"), tmp_path / "o", classes=classes, roi="blob")
    with pytest.raises(MedtlError, match="needs a 3D set"):
        import_medmnist(_fake_npz(tmp_path / "flat.npz", (28, 28)), tmp_path / "o", classes=classes, roi="shape")
    with pytest.raises(MedtlError, match="two values.*voxels between 0 and 255.*import it without roi"):
        import_medmnist(_fake_npz(tmp_path / "grey.npz", (28, 28, 28)), tmp_path / "o", classes=classes, roi="shape")
    empty = _fake_shape_npz(tmp_path / "empty.npz", shapes=[*FAKE_SHAPES[:5], (0, 0), *FAKE_SHAPES[6:]])
    with pytest.raises(MedtlError, match=r"1 image\(s\) hold no shape voxel \(val/1\)"):
        import_medmnist(empty, tmp_path / "o", classes=classes, roi="shape", progress=False)


# ------------------------------------------------------------------------ real data (../shared/data)


def test_real_lidc_two_sites(shared_data, tmp_path):
    out = tmp_path / "lidc"
    summary = import_lidc_vois(shared_data / "lidc_nodule_vois", out, progress=False)
    sites = summary["sites"]
    # 773 table rows, two of which (LIDC-IDRI-1002) have a mask but no image volume
    assert summary["rows"] == 773 and summary["imported"] == 771
    assert [s["file"] for s in summary["skipped"]] == [
        "nodule_mask/LIDC-IDRI-1002_R_1.nii.gz",
        "nodule_mask/LIDC-IDRI-1002_R_2.nii.gz",
    ]
    assert (sites["thin"]["cases"], sites["thick"]["cases"], summary["left_out"]["count"]) == (469, 302, 0)
    assert (sites["thin"]["patients"], sites["thick"]["patients"]) == (266, 165)
    assert summary["patients_in_both_sites"] == 0
    for site in ("thin", "thick"):
        labels = defaultdict(int)
        for by_label in sites[site]["by_split_label"].values():
            for label, n in by_label.items():
                labels[label] += n
        assert 0.2 < labels["malignant"] / sites[site]["cases"] < 0.5  # thin 149/469, thick 122/302
        _check_manifest_usable(out / "manifests" / f"{site}.json", out, modality="ct")


def test_real_breastmnist(shared_data, tmp_path):
    out = tmp_path / "breastmnist"
    summary = import_medmnist(shared_data / "medmnist" / "breastmnist.npz", out, progress=False)
    assert {split: sum(n.values()) for split, n in summary["by_split_label"].items()} == {
        "train": 546,
        "val": 78,
        "test": 156,
    }
    assert summary["label_map"] == {"malignant": 0, "normal_or_benign": 1}
    assert summary["intensity"].startswith("uint8 0..255")
    _check_manifest_usable(out / summary["manifest"], out, **summary["preprocessing"])


def test_real_adrenalmnist3d_as_input_of_the_lidc_bundle(shared_data, tmp_path):
    out = tmp_path / "adrenal"
    summary = import_medmnist(shared_data / "medmnist" / "adrenalmnist3d.npz", out, roi="shape", progress=False)
    assert {split: sum(n.values()) for split, n in summary["by_split_label"].items()} == {
        "train": 1188,
        "val": 98,
        "test": 298,
    }
    assert max(summary["roi"]["crop_mm_holding_every_shape"]) <= 32  # the LIDC bundle's crop keeps every gland
    assert summary["preprocessing"]["crop_mm"] == [32.0, 32.0, 32.0]
    lidc = _lidc_bundle_preprocessing()
    for item in _shape_items(out, summary)[::150]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = np.asarray(lidc({"image": item["image"], "mask": item["mask"]})["image"])
        assert x.shape == (2, 32, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
        assert x[1].sum() == pytest.approx(read_nifti(item["mask"]).array.sum())
