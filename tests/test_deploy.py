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
    pytest.skip(f"MONAI Deploy App SDK not importable ({type(exc).__name__}: {exc}); "
                "bash scripts/setup_deploy.sh, then .venv-deploy/bin/python -m pytest tests/test_deploy.py", allow_module_level=True)

from monai.bundle import ConfigParser  # noqa: E402

from medtl.bundle.export import export_bundle  # noqa: E402
from medtl.demo import resnet  # noqa: E402

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
    meta = {"row_pixel_spacing": SPACING[0], "col_pixel_spacing": SPACING[1], "depth_pixel_spacing": SPACING[2],
            "nifti_affine_transform": affine}
    return {"csv": folder / "cases.csv", "image": Image(np.ascontiguousarray(np.swapaxes(whd, 0, 2)), metadata=meta)}


@pytest.fixture(scope="module")
def reference(exported, ct_case, tmp_path_factory) -> dict[str, Any]:
    """predictions.json of the exported bundle's own inference run on the case."""
    return _bundle_predictions(exported, ct_case["csv"], tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def channel_def(exported) -> dict[str, str]:
    return json.loads((exported / "configs" / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]["outputs"]["pred"]["channel_def"]


def _bundle_predictions(bundle: Path, cases_csv: Path, out: Path) -> dict[str, Any]:
    """``run`` of the bundle's inference.json (what ``python -m monai.bundle run`` evaluates), in process."""
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.update({"bundle_root": str(bundle), "input_csv": str(cases_csv), "output_dir": str(out),
                   "device": "$torch.device('cpu')"})
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
            self, app_context=context, bundle_path=self.bundle, name="bundle_inference",
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
    """As a MAP packages it: only models/model.ts, whose embedded metadata.json and inference.json the operator reads."""
    monkeypatch.chdir(exported)  # where a MAP runs it: bundle_root "." and nothing else of the bundle
    _check_same_prediction(_run_app(ct_case["image"], model=exported / "models" / "model.ts"), reference, channel_def)
