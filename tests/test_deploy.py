"""A medtl bundle in a MONAI Deploy app: the App SDK's ``MonaiBundleInferenceOperator`` must give the
probabilities that the bundle's own ``inference.json`` run writes, class names from ``channel_def``.

The app is the one a MAP would run: a source operator emits one CT volume as the SDK ``Image`` that
``DICOMSeriesToVolumeOperator`` produces (DHW array, DICOM spacing, NIfTI affine), the operator
loads the bundle folder (``models/model.ts``, ``configs/metadata.json``, the ``preprocessing``,
``inferer`` and ``postprocessing`` ids of ``configs/inference.json``), and a sink keeps what it emits.
The reference is the same volume as a NIfTI file scored by the bundle's evaluator (its loader and
preprocessing, the eager ``network_def`` with ``models/model.pt``, softmax, ``PredictionWriter``).

Needs the SDK, which ``bash scripts/setup_deploy.sh`` installs into ``.venv-deploy`` layered over
``.venv`` (it pulls holoscan and tritonclient and pins protobuf, so it stays out of the main
environment): ``.venv-deploy/bin/python -m pytest tests/test_deploy.py``. Skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
try:
    from holoscan.conditions import CountCondition  # installed with the SDK
    from monai.deploy.core import AppContext, Application, Image, IOType, Operator, OperatorSpec
    from monai.deploy.operators import IOMapping, MonaiBundleInferenceOperator
except Exception as exc:  # ImportError, or holoscan failing to load its native libraries
    if os.environ.get("MEDTL_REQUIRE_DEPLOY"):  # CI installs the SDK: a failing import there is a failure
        raise
    pytest.skip(
        f"MONAI Deploy App SDK not importable ({type(exc).__name__}: {exc}); "
        "bash scripts/setup_deploy.sh, then .venv-deploy/bin/python -m pytest tests/test_deploy.py",
        allow_module_level=True,
    )

from conftest import RUN_INFERENCE, monai_bundle  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from medtl.bundle.export import export_bundle  # noqa: E402
from medtl.networks import resnet  # noqa: E402

SPACING = (0.8, 0.9, 2.0)  # mm, (column, row, slice) as DICOMSeriesToVolumeOperator names them


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``tumor_cls_source`` exported with random weights, as ``medtl`` writes it."""
    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("deploy") / "tumor_cls_source"
    export_bundle(resnet(0.5), dest, template="tumor_cls_source", onnx=False)
    return dest


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory) -> dict[str, Any]:
    """A 40 x 36 x 16 CT volume (lung-like background, a dense lesion off centre), as a NIfTI file and
    as the SDK ``Image`` a DICOM series becomes."""
    rng = np.random.default_rng(0)
    whd = rng.normal(-700.0, 150.0, size=(40, 36, 16))
    x, y, z = np.meshgrid(*(np.arange(n) for n in whd.shape), indexing="ij")
    lesion = ((x - 22) * SPACING[0]) ** 2 + ((y - 17) * SPACING[1]) ** 2 + ((z - 8) * SPACING[2]) ** 2 < 7.0**2
    whd[lesion] = rng.normal(40.0, 30.0, size=int(lesion.sum()))
    whd = whd.astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-15.0, 12.0, 30.0)
    folder = tmp_path_factory.mktemp("case")
    nib.save(nib.Nifti1Image(whd, affine), str(folder / "case.nii.gz"))
    (folder / "cases.csv").write_text("image\ncase.nii.gz\n")
    meta = {
        "row_pixel_spacing": SPACING[0],
        "col_pixel_spacing": SPACING[1],
        "depth_pixel_spacing": SPACING[2],
        "nifti_affine_transform": affine,
    }
    return {"csv": folder / "cases.csv", "image": Image(np.ascontiguousarray(np.swapaxes(whd, 0, 2)), metadata=meta)}


@pytest.fixture(scope="module")
def reference(exported, ct_case, tmp_path_factory) -> dict[str, Any]:
    """predictions.json of the exported bundle's own inference run on the case."""
    return _bundle_predictions(exported, ct_case["csv"], tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def channel_def(exported) -> dict[str, str]:
    return json.loads((exported / "configs" / "metadata.json").read_text(encoding="utf-8"))["network_data_format"][
        "outputs"
    ]["pred"]["channel_def"]


def _bundle_predictions(bundle: Path, cases_csv: Path, out: Path) -> dict[str, Any]:
    """``run`` of the bundle's inference.json (what ``python -m monai.bundle run`` evaluates), in process."""
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.update(
        {
            "bundle_root": str(bundle),
            "input_csv": str(cases_csv),
            "output_dir": str(out),
            "device": "$torch.device('cpu')",
        }
    )
    parser.get_parsed_content("run")
    return json.loads((out / "predictions.json").read_text(encoding="utf-8"))


class _Source(Operator):
    """Emits one ``Image`` once, as a DICOM loader chain would."""

    def __init__(self, fragment: Any, *args: Any, image: Image, **kwargs: Any) -> None:
        self.image = image
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        op_output.emit(self.image, "image")


class _Sink(Operator):
    """Keeps what arrives on ``pred``."""

    def __init__(self, fragment: Any, *args: Any, received: list, **kwargs: Any) -> None:
        self.received = received
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        self.received.append(op_input.receive("pred"))


class _ClassifyApp(Application):
    """source -> MonaiBundleInferenceOperator -> sink, given a bundle folder or, as a MAP is packaged,
    only the model file the app context's model path names."""

    def __init__(self, *, image: Image, received: list, bundle: Path | None = None, model: Path | None = None) -> None:
        self.bundle, self.model, self.image, self.received = bundle, model, image, received
        super().__init__(["medtl-deploy-test"])

    def compose(self) -> None:
        # a model path with nothing there leaves the operator to the bundle folder it is given
        context = AppContext({"model": str(self.model or self.bundle / "no-such-model")})
        source = _Source(self, CountCondition(self, 1), image=self.image, name="source")
        infer = MonaiBundleInferenceOperator(
            self,
            app_context=context,
            bundle_path=self.bundle,
            name="bundle_inference",
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", dict, IOType.IN_MEMORY)],
        )
        self.add_flow(source, infer, {("image", "image")})
        self.add_flow(infer, _Sink(self, received=self.received, name="sink"), {("pred", "pred")})


def _run_app(image: Image, **where: Path) -> dict[str, Any]:
    received: list = []
    _ClassifyApp(image=image, received=received, **where).run()
    assert len(received) == 1, f"the sink got {len(received)} outputs"
    return received[0]


def _check_same_prediction(sdk: dict[str, Any], reference: dict[str, Any], channel_def: dict[str, str]) -> None:
    probs = np.asarray(sdk["probabilities"], dtype=np.float64).reshape(-1)
    row = reference["predictions"][0]
    expected = np.array([row[f"prob_{name}"] for name in reference["class_names"]])
    assert [channel_def[str(i)] for i in range(len(channel_def))] == reference["class_names"]
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert channel_def[str(int(np.argmax(probs)))] == row["pred"]
    # The operator's "result" holds names from channel_def. Note: SDK 4.0.0 looks up
    # channel_def[str(int(p))] for each probability p, not the argmax, so read the class from
    # "probabilities" as above.
    assert sdk["result"] and set(sdk["result"]) <= set(channel_def.values())


def test_exported_bundle_runs_unchanged_in_the_sdk_operator(exported, ct_case, reference, channel_def):
    """The bundle folder as exported: the operator strips nothing medtl needs, adds nothing it lacks."""
    _check_same_prediction(_run_app(ct_case["image"], bundle=exported), reference, channel_def)


def test_exported_model_file_alone_runs_in_the_sdk_operator(exported, ct_case, reference, channel_def, monkeypatch):
    """As a MAP packages it: only models/model.ts, whose embedded metadata.json and inference.json the
    operator reads."""
    monkeypatch.chdir(exported)  # where a MAP runs it: bundle_root "." and nothing else of the bundle
    _check_same_prediction(_run_app(ct_case["image"], model=exported / "models" / "model.ts"), reference, channel_def)


# ------------------------------------------------------------------ the LIDC app on real DICOM (deploy/lidc_app)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
LIDC_BUNDLE = REPO / "bundles" / "lidc_nodule_malignancy"
#: CT series and the DICOM SEG made on it: MONAI's 4-slice test CT (gaps 202.5, 1.25, 1.25 mm) with
#: highdicom's binary SEG of its last three slices, and dcmqi's 3-slice 512x512 CT with its liver SEG.
LIDC_CASES = {
    "uneven_4_slices": ("monai_testing_data/CT_DICOM", "highdicom_test_files/seg_image_ct_binary.dcm"),
    "even_512x512": ("dcmqi_data/segmentations/ct-3slice", "dcmqi_data/segmentations/liver.dcm"),
}
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA} (a fresh clone has none; CI does)")
    return DATA


@pytest.fixture(scope="module")
def lidc_app():
    """deploy/lidc_app/app.py as a module (the app folder is not a package medtl installs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lidc_app", REPO / "deploy" / "lidc_app" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ct_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _mask_series(ct_folder: Path, seg_path: Path, dest: Path) -> Path:
    """The SEG's segment as a DICOM series on the CT's own slices, placed by the SEG's source-image
    references (not by position, as the app does), for the bundle's own reader."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    by_sop = {
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: frames[i]
        for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence)
    }
    dest.mkdir()
    series_uid = generate_uid()
    for path in _ct_files(ct_folder):
        ds = pydicom.dcmread(path)
        mask = by_sop.get(ds.SOPInstanceUID, np.zeros((ds.Rows, ds.Columns)))
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.asarray(mask, dtype=np.uint16).tobytes()
        ds.save_as(dest / path.name, enforce_file_format=True)
    return dest


def _bundle_cli_predictions(ct_folder: Path, mask_folder: Path, work: Path) -> dict[str, Any]:
    """``python -m monai.bundle run`` of the LIDC bundle's inference.json on the series and mask."""
    (work / "cases.csv").write_text(f"image,mask\n{ct_folder},{mask_folder}\n", encoding="utf-8")
    monai_bundle(
        *RUN_INFERENCE,
        "--input_csv",
        str(work / "cases.csv"),
        "--output_dir",
        str(work / "out"),
        "--device",
        "$torch.device('cpu')",
        "--amp",
        "$False",
        cwd=LIDC_BUNDLE,
    )
    return json.loads((work / "out" / "predictions.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=sorted(LIDC_CASES))
def lidc_run(request, tmp_path_factory) -> dict[str, Any]:
    """The app on a folder holding the CT series and its SEG, and the bundle's own run on the same series."""
    data = _shared_data()
    ct_folder, seg_path = (data / rel for rel in LIDC_CASES[request.param])
    work = tmp_path_factory.mktemp(request.param)
    inbox = work / "in"
    inbox.mkdir()
    for path in _ct_files(ct_folder):
        (inbox / path.name).symlink_to(path)
    (inbox / "nodule_seg.dcm").symlink_to(seg_path)
    app = [
        sys.executable,
        str(REPO / "deploy" / "lidc_app" / "app.py"),
        "-i",
        str(inbox),
        "-o",
        str(work / "app"),
        "-m",
        str(LIDC_BUNDLE),
    ]
    done = subprocess.run(app, check=False, capture_output=True, text=True, timeout=600)  # as a user runs it
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _bundle_cli_predictions(ct_folder, _mask_series(ct_folder, seg_path, work / "mask"), work)
    return {
        "case": request.param,
        "ct": ct_folder,
        "out": work / "app",
        "reference": reference,
        "app": json.loads((work / "app" / "predictions.json").read_text(encoding="utf-8")),
    }


def test_lidc_app_matches_the_bundle_run_on_real_dicom(lidc_run):
    """DICOM loader -> series selector -> series to volume -> bundle operator gives the bundle's own
    probabilities, on evenly and unevenly spaced slices (the app re-places the SDK's slices as medtl reads them)."""
    app, reference = lidc_run["app"], lidc_run["reference"]
    row = reference["predictions"][0]
    assert app["class_names"] == reference["class_names"] == ["Benign", "Malign"]
    diff = max(abs(app[f"prob_{name}"] - row[f"prob_{name}"]) for name in reference["class_names"])
    print(
        f"{lidc_run['case']}: SDK app P(Malign) {app['prob_Malign']:.6f}, bundle run "
        f"{row['prob_Malign']:.6f}, max abs diff {diff:.2e}"
    )
    assert diff <= 1e-4
    assert app["pred"] == row["pred"]
    grid = app["slice_grid"]
    if lidc_run["case"] == "uneven_4_slices":
        assert (
            grid["resampled"]
            and grid["slices_acquired"] == 4
            and grid["slices"] == 165
            and grid["slice_spacing_mm"] == 1.25
        )
    else:
        assert not grid["resampled"] and grid["slices"] == grid["slices_acquired"] == 3


def test_lidc_app_writes_a_text_sr_in_the_study(lidc_run):
    """The SR joins the CT's study, names the class and the model; predictions.json names no patient or series."""
    import pydicom

    srs = sorted(lidc_run["out"].glob("*.dcm"))
    assert len(srs) == 1, srs
    sr = pydicom.dcmread(srs[0])
    ct = pydicom.dcmread(_ct_files(lidc_run["ct"])[0], stop_before_pixels=True)
    assert sr.Modality == "SR" and sr.SOPClassUID == BASIC_TEXT_SR
    assert sr.StudyInstanceUID == ct.StudyInstanceUID and sr.SeriesInstanceUID != ct.SeriesInstanceUID
    text = " ".join(str(item.get("TextValue", "")) for item in sr.ContentSequence)
    version = json.loads((LIDC_BUNDLE / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
    assert f"lidc_nodule_malignancy {version}): {lidc_run['app']['pred']}" in text
    assert f"Malign {lidc_run['app']['prob_Malign']:.3f}" in text and "not for clinical decisions" in text
    written = json.dumps(lidc_run["app"])
    for tag in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ct.get(tag, "")).strip()
        assert not value or value not in written, tag


def test_sdk_volume_misplaces_uneven_slices(lidc_app):
    """Why the app re-places slices: DICOMSeriesToVolumeOperator spaces the 4 slices (gaps 202.5, 1.25,
    1.25 mm) evenly from the first to the last, 68.3 mm apart, so slices 2 and 3 land 134 and 67 mm
    off; medtl's grid keeps every slice where it was acquired. And the app's refusals: a series
    without its SEG, a SEG made on another grid."""
    from monai.deploy.core import Fragment
    from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, DICOMSeriesToVolumeOperator

    ct_folder = _shared_data() / LIDC_CASES["uneven_4_slices"][0]
    fragment = Fragment()
    studies = DICOMDataLoaderOperator(fragment, name="loader").load_data_to_studies(ct_folder)
    selection = DICOMSeriesSelectorOperator(fragment, rules=lidc_app.CT_RULES, name="selector").filter(
        json.loads(lidc_app.CT_RULES), studies
    )
    image = DICOMSeriesToVolumeOperator(fragment, name="to_volume").convert_to_image(selection)
    sdk_z = image.metadata()["nifti_affine_transform"][2, 2]
    assert image.asnumpy().shape[0] == 4 and sdk_z == pytest.approx(205.0 / 3, abs=1e-3)
    series = lidc_app._selected_series(selection)
    headers = lidc_app.series_headers(series)
    with pytest.raises(lidc_app.DicomError, match="0 DICOM SEG instance"):
        lidc_app.find_seg(lidc_app.study_segs(studies), str(series.SeriesInstanceUID))
    ordered = lidc_app.stack_geometry(headers)[0]
    wrong_seg = _shared_data() / LIDC_CASES["even_512x512"][1]
    import pydicom

    from medtl.seg import seg_mask  # the app's and medtl predict's one SEG reader

    with pytest.raises(lidc_app.DicomError, match="512x512"):
        seg_mask(pydicom.dcmread(wrong_seg), ordered)
