"""medtl bundles as MONAI Label 0.8.5 runs them: its ``BundleInferTask`` wraps the bundle's preprocessing with
its own pre-transforms and adds its own keys to the data dict; the LIDC bundle must still give the
probabilities ``python -m monai.bundle run`` gives, and a request without the optional mask must still run.

MONAI Label is not installed here (0.8.5 does not import with pydicom 3), so what it does is reproduced with
MONAI's parts, from Project-MONAI/MONAILabel at tag 0.8.5:

- ``monailabel/tasks/infer/bundle.py``: ``BundleInferTask`` reads ``configs/inference.json`` with
  ``bundle_root`` set and no metadata (``_load_bundle_config``), sets ``use_click``, builds ``network_def``
  when ``models/model.pt`` exists and takes labels from ``channel_def`` (lower case, "background" left out).
  ``pre_transforms`` sets the request's ``device`` (``_update_device``), flattens the ``preprocessing``
  Compose into its transforms, sets ``image_only = False`` on every ``LoadImaged`` and wraps each in
  ``LoadImageTensord``; ``post_transforms`` is ``postprocessing`` without ``SaveImaged`` (plus
  ``Restored``, which fails on a classifier's output; an app passes ``add_post_restore=False``).
- ``monailabel/transform/pre.py``: ``LoadImageTensord`` looks up every key of the loader it wraps
  (``d[key]``: a missing one raises ``KeyError``); a value that is not a string is taken as a channel-last
  array already loaded, anything else goes to the wrapped ``LoadImaged``.
- ``monailabel/tasks/infer/basic_infer.py``: ``BasicInferTask.__call__`` copies the task config (``device``,
  ``model_filename``), updates it with the request and adds ``image_path``; ``run_pre_transforms`` calls each
  transform in turn (``monailabel/interfaces/utils/transform.py`` ``run_transforms``, which records
  ``latencies`` in the data); ``_get_network`` loads ``checkpoint.get("model", checkpoint)`` with
  ``strict=False`` and calls ``eval()``; ``run_inferer`` adds a batch axis, runs the bundle's inferer under
  ``no_grad`` and keeps item 0; ``writer`` for classification is ``ClassificationWriter``
  (``monailabel/transform/writer.py``): one score per output channel, named by the labels.
- ``monailabel/interfaces/app.py`` ``infer`` adds the task's ``description`` to the request.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import RUN_INFERENCE, monai_bundle
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, MapTransform, SaveImaged
from monai.utils import PostFix

from medtl.bundle.components import inference_cases, prepare_cases
from medtl.nifti import write_nifti
from medtl.volume import Volume

REPO = Path(__file__).resolve().parents[1]
LIDC = REPO / "bundles" / "lidc_nodule_malignancy"
SOURCE = REPO / "bundles" / "tumor_cls_source"
SPACING = (0.8, 0.9, 2.0)


class LoadImageTensord(MapTransform):
    """MONAI Label's wrapper of a bundle's ``LoadImaged`` (``monailabel/transform/pre.py``)."""

    def __init__(self, keys: Any, load_image_d: Callable) -> None:
        super().__init__(keys)
        self.load_image_d = load_image_d

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        in_memory = False
        for key in self.keys:
            if not isinstance(d[key], str):  # every key is looked up: a missing one is a KeyError
                meta = d.setdefault(f"{key}_{PostFix.meta()}", {})
                meta.update(spatial_shape=d[key].shape[:-1], original_channel_dim=-1, original_affine=None)
                d[key] = MetaTensor(d[key], meta=meta)
                in_memory = True
        return d if in_memory else self.load_image_d(d)


class BundleInferTask:
    """What MONAI Label 0.8.5's ``BundleInferTask`` (with ``BasicInferTask``) does with a classification
    request, from its config to the writer's result (the module docstring lists the source files)."""

    def __init__(self, bundle: Path) -> None:
        self.parser = ConfigParser()
        self.parser.read_config(bundle / "configs" / "inference.json")
        self.parser.config.update({"bundle_root": str(bundle)})
        self.parser.config["use_click"] = False
        weights = bundle / "models" / "model.pt"
        self.network = self.parser.get_parsed_content("network_def", instantiate=True) if weights.is_file() else None
        self.weights = weights
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
        pred = metadata["network_data_format"]["outputs"]["pred"]
        self.labels = {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"}
        self.description = metadata.get("description")
        self.config = {"device": ["cpu"], "model_filename": ["model.pt"]}

    def pre_transforms(self, data: Mapping[str, Any]) -> list[Callable]:
        self.parser.config["device"] = data["device"]  # _update_device
        self.parser.parse(reset=True)
        pre = self.parser.get_parsed_content("preprocessing", instantiate=True)
        pre = list(pre.transforms) if isinstance(pre, Compose) else pre
        for t in pre:
            if isinstance(t, LoadImaged):
                t._loader.image_only = False
        return [LoadImageTensord(keys=t.keys, load_image_d=t) if isinstance(t, LoadImaged) else t for t in pre]

    def post_transforms(self) -> list[Callable]:
        post = self.parser.get_parsed_content("postprocessing", instantiate=True)
        return [
            t for t in (list(post.transforms) if isinstance(post, Compose) else post) if not isinstance(t, SaveImaged)
        ]

    def _network(self) -> torch.nn.Module:
        network = copy.deepcopy(self.network)
        checkpoint = torch.load(self.weights, map_location="cpu")
        network.load_state_dict(checkpoint.get("model", checkpoint), strict=False)
        return network.eval()

    def run_pre(self, request: Mapping[str, Any]) -> dict:
        data = copy.deepcopy({**self.config, "description": self.description, **request})
        data["image_path"] = request["image"]
        for t in self.pre_transforms(data):
            data = t(data)
            data.setdefault("latencies", {}).setdefault("pre", {})[type(t).__name__] = 0.0
        return data

    def __call__(self, request: Mapping[str, Any]) -> dict:
        data = self.run_pre(request)
        inferer = self.parser.get_parsed_content("inferer", instantiate=True)
        inputs = data["image"] if torch.is_tensor(data["image"]) else torch.from_numpy(data["image"])
        with torch.no_grad():
            data["pred"] = inferer(inputs[None].to("cpu"), self._network())[0]
        for t in self.post_transforms():
            data = t(data)
        names = {v: k for k, v in self.labels.items()}
        return {"prediction": [{"idx": i, "label": names[i], "score": float(s)} for i, s in enumerate(data["pred"])]}


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    """A NIfTI CT (lung-like noise, a nodule off centre) and its nodule mask, as a MONAI Label datastore holds them."""
    folder = tmp_path_factory.mktemp("case")
    shape = (48, 40, 16)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    ball = ((x - 20) * SPACING[0]) ** 2 + ((y - 22) * SPACING[1]) ** 2 + ((z - 8) * SPACING[2]) ** 2 < 6.0**2
    ct = np.clip(np.random.default_rng(0).normal(-800.0, 60.0, size=shape), -1000, 0).astype(np.float32)
    ct[ball] = 30.0
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-20.0, 12.0, 40.0)
    image = write_nifti(Volume(ct, affine), folder / "ct.nii.gz")
    mask = write_nifti(Volume(ball.astype(np.float32), affine), folder / "mask.nii.gz")
    (folder / "cases.csv").write_text("image,mask\nct.nii.gz,mask.nii.gz\n", encoding="utf-8")
    return {"image": image, "mask": mask, "csv": folder / "cases.csv"}


def test_lidc_through_monai_labels_bundle_task_gives_the_bundle_runs_probabilities(case, tmp_path):
    """The mask reaches the bundle as a request parameter (MONAI Label's ``params``); the data dict also holds
    ``image_path``, ``device``, ``model_filename``, ``description`` and ``latencies``."""
    monai_bundle(
        *RUN_INFERENCE,
        "--input_csv",
        str(case["csv"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "$torch.device('cpu')",
        "--amp",
        "$False",
        cwd=LIDC,
    )
    row = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))["predictions"][0]
    request = {
        "model": "lidc_nodule_malignancy_classification",
        "image": str(case["image"]),
        "mask": str(case["mask"]),
        "device": "cpu",
    }
    result = BundleInferTask(LIDC)(request)["prediction"]
    assert [item["label"] for item in result] == ["benign", "malign"]
    scores = [item["score"] for item in result]
    assert scores == pytest.approx([row["prob_Benign"], row["prob_Malign"]], abs=1e-6)


def test_a_request_without_the_optional_mask_runs_as_the_bundle_does(case, tmp_path):
    """tumor_cls_source loads a mask when a case has one; MONAI Label's loader wrapper would demand it of every
    request, so medtl's loader is not a ``LoadImaged`` and the request runs, giving the bundle run's input."""
    task = BundleInferTask(SOURCE)
    data = task.run_pre({"model": "tumor_cls_source_classification", "image": str(case["image"]), "device": "cpu"})
    assert data["image_path"] == str(case["image"]) and "pre" in data["latencies"]
    table = tmp_path / "cases.csv"
    table.write_text(f"image\n{case['image']}\n", encoding="utf-8")
    parser = ConfigParser()
    parser.read_config(SOURCE / "configs" / "inference.json")
    parser.config.update({"bundle_root": str(SOURCE)})
    own = prepare_cases(
        inference_cases(input_csv=table, output_dir=tmp_path / "out"),
        parser.get_parsed_content("preprocessing"),
        progress=False,
    )["items"][0]
    assert torch.equal(torch.as_tensor(data["image"]), torch.as_tensor(own["image"]))


def test_the_reproduced_wrapper_requires_every_key_of_a_monai_loader(case):
    """Why medtl's loader holds a ``LoadImaged`` rather than being one: wrapped, an optional key is required."""
    wrapped = LoadImageTensord(keys=["mask"], load_image_d=LoadImaged(keys="mask", allow_missing_keys=True))
    with pytest.raises(KeyError, match="mask"):
        wrapped({"image": str(case["image"])})
