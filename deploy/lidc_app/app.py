"""MONAI Deploy app: benign vs malignant for a lung nodule, from a CT series and its nodule DICOM SEG.

DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (CT) -> DICOMSeriesToVolumeOperator ->
NoduleInputOperator (slice grid as medtl reads it, the SEG's segment as the mask) ->
NoduleBundleInferenceOperator (the SDK's MonaiBundleInferenceOperator with a mask port) ->
ResultOperator (predictions.json) -> DICOMTextSRWriterOperator (a Basic Text SR in the study).

Run it with the shipped bundle (see README.md)::

    python deploy/lidc_app/app.py -i INPUT_DICOM_FOLDER -o OUTPUT_FOLDER -m bundles/lidc_nodule_malignancy
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.dicom_text_sr_writer_operator import DICOMTextSRWriterOperator, EquipmentInfo, ModelInfo
from monai.deploy.operators.monai_bundle_inference_operator import (
    IOMapping,
    MonaiBundleInferenceOperator,
    get_bundle_config,
)
from monai.transforms import EnsureChannelFirst

from medtl.dicom import Header, needs_resampling, read_header, resample_slices, stack_geometry
from medtl.errors import DicomError, MedtlError
from medtl.fileio import atomic_write_json
from medtl.seg import find_seg, is_seg, stacked_mask

#: Selects the CT series; ``all_matched`` so that a folder with several CT series is refused, not cut to the first.
CT_RULES = json.dumps(
    {"selections": [{"name": "CT series", "all_matched": True, "conditions": {"Modality": "(?i)CT"}}]}
)
#: Which segment of the SEG is the nodule when it holds several (its SegmentNumber).
SEGMENT_ENV = "LIDC_APP_SEGMENT"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _selected_series(selection: list[StudySelectedSeries]) -> Any:
    """The one selected CT series; several would make the SDK convert only the first, silently."""
    chosen = [s.series for study in selection or [] for s in study.selected_series]
    if len(chosen) != 1:
        raise DicomError(
            f"the input holds {len(chosen)} CT series; this app scores one series with its nodule SEG",
            path="input folder",
            hint="give a folder with one CT series and the DICOM SEG of its nodule",
        )
    return chosen[0]


def series_headers(series: Any) -> list[Header]:
    """medtl's headers of the SDK series' files, which the loader read from disk."""
    paths = [getattr(sop.get_native_sop_instance(), "filename", None) for sop in series.get_sop_instances()]
    if not all(isinstance(p, (str, Path)) and Path(p).is_file() for p in paths):
        raise DicomError(
            "the series' instances do not name their files, so their slice geometry cannot be read",
            path="input folder",
            hint="load the series with DICOMDataLoaderOperator from a folder",
        )
    return [read_header(p) for p in paths]


def study_segs(studies: list[Any]) -> list[pydicom.Dataset]:
    """The DICOM SEG instances the SDK loaded with the studies (their datasets, pixel data included)."""
    return [
        sop.get_native_sop_instance()
        for study in studies
        for series in study.get_all_series()
        for sop in series.get_sop_instances()
        if is_seg(sop.get_native_sop_instance())
    ]


class NoduleInputOperator(Operator):
    """The CT volume and the nodule mask on medtl's slice grid, as the bundle's own reader builds it.

    ``DICOMSeriesToVolumeOperator`` spaces the slices evenly from the first to the last; on a
    series with missing slices or uneven gaps that moves every inner slice (MONAI's 4-slice test
    CT: gaps 202.5, 1.25, 1.25 mm become 68.3 mm each), and its affine scales the in-plane axes by
    each other's pixel spacing. This operator keeps the SDK's decoded voxels and re-places them
    with ``medtl.dicom.stack_geometry``, linearly resampled onto a uniform grid where the slices are
    uneven (``resample_slices``), exactly as ``medtl.reader`` does for the bundle's own runs.

    Named inputs: ``dicom_study_list``, ``study_selected_series_list``, ``image``.
    Named outputs: ``image`` and ``mask`` (SDK ``Image``, DHW, the same geometry), ``grid`` (a dict).
    """

    def __init__(self, fragment: Fragment, *args: Any, segment: int | None = None, **kwargs: Any) -> None:
        self.segment = segment
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("dicom_study_list")
        spec.input("study_selected_series_list")
        spec.input("image")
        spec.output("image")
        spec.output("mask")
        spec.output("grid")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        studies = op_input.receive("dicom_study_list")
        series = _selected_series(op_input.receive("study_selected_series_list"))
        image: Image = op_input.receive("image")
        ct, mask, meta, grid = self.align(image, series, studies)
        op_output.emit(Image(np.ascontiguousarray(ct.transpose(2, 1, 0)), meta), "image")
        op_output.emit(Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), dict(meta)), "mask")
        op_output.emit(grid, "grid")

    def align(self, image: Image, series: Any, studies: list[Any]) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        """[column, row, slice] CT and mask, the Image metadata for their grid, and a summary of it."""
        ordered, geom, affine = stack_geometry(series_headers(series), name="CT series")
        sdk_uids = [str(sop.get_native_sop_instance().SOPInstanceUID) for sop in series.get_sop_instances()]
        stack = np.asarray(image.asnumpy())[[sdk_uids.index(h.sop_instance_uid) for h in ordered]]
        ct = stack.transpose(2, 1, 0).astype(np.float32)
        mask = stacked_mask(
            find_seg(study_segs(studies), str(series.SeriesInstanceUID)),
            ordered,
            geom,
            self.segment,
            frame_of_reference=str(
                series.get_sop_instances()[0].get_native_sop_instance().get("FrameOfReferenceUID", "")
            ),
            name="nodule SEG",
            choose=f"set {SEGMENT_ENV} to the nodule's segment number",
        )
        resampled = needs_resampling(geom)
        if resampled:
            ct = resample_slices(ct, geom.positions_mm, geom.slice_spacing)
        meta = dict(image.metadata())
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        meta.update(
            {
                "nifti_affine_transform": affine,
                "affine": affine,
                "dicom_affine_transform": _RAS_TO_LPS @ affine,
                "row_pixel_spacing": float(spacing[0]),
                "col_pixel_spacing": float(spacing[1]),
                "depth_pixel_spacing": float(spacing[2]),
            }
        )
        grid = {
            "slices_acquired": len(ordered),
            "slices": int(ct.shape[2]),
            "slice_spacing_mm": round(float(spacing[2]), 4),
            "resampled": resampled,
            "problems": [p["code"] for p in geom.problems],
        }
        return ct, mask, meta, grid


class NoduleBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator with a ``mask`` port: it feeds the bundle only the inputs its
    ``network_data_format`` names (``image``), but this bundle's preprocessing also needs the nodule
    mask, which it resamples onto the CT, crops with and concatenates as the second channel."""

    def setup(self, spec: OperatorSpec) -> None:
        super().setup(spec)
        spec.input("mask")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        value, meta = self._convert_from_image(op_input.receive("mask"))
        # channel first, as the bundle's LoadVolumed gives a mask file: (1, W, H, D) with its affine
        self._mask = EnsureChannelFirst()(MetaTensor.ensure_torch_and_prune_meta(torch.as_tensor(value), meta))
        super().compute(op_input, op_output, context)

    def pre_process(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        return super().pre_process({**data, "mask": self._mask}, *args, **kwargs)


class ResultOperator(Operator):
    """Class probabilities as ``predictions.json`` (no patient or series identifiers) and as the SR's text.

    The SDK's ``result`` names a class per probability value, not the argmax, so the class is read
    from ``probabilities`` and ``channel_def``.
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_folder: Path,
        class_names: list[str],
        model: dict[str, str],
        **kwargs: Any,
    ) -> None:
        self.output_folder, self.class_names, self.model = Path(output_folder), class_names, model
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")
        spec.input("grid")
        spec.output("text")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        pred, grid = op_input.receive("pred"), op_input.receive("grid")
        probs = np.asarray(pred["probabilities"], dtype=np.float64).reshape(-1)
        if len(probs) != len(self.class_names):
            raise MedtlError(f"the bundle gave {len(probs)} probabilities for {len(self.class_names)} classes")
        predicted = self.class_names[int(np.argmax(probs))]
        result = {
            "model": self.model,
            "class_names": self.class_names,
            "pred": predicted,
            **{f"prob_{name}": float(p) for name, p in zip(self.class_names, probs, strict=True)},
            "slice_grid": grid,
        }
        self.output_folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_folder / "predictions.json", result)
        listing = ", ".join(f"{name} {p:.3f}" for name, p in zip(self.class_names, probs, strict=True))
        op_output.emit(
            f"Lung nodule malignancy ({self.model['name']} {self.model['version']}): {predicted} "
            f"(probabilities: {listing}). Research use only, not for clinical decisions.",
            "text",
        )


def model_path(given: Path) -> Path:
    """The bundle's TorchScript file (which embeds its metadata.json and inference.json), from the
    bundle folder or the file itself."""
    found = given / "models" / "model.ts" if given.is_dir() else given
    if not found.is_file():
        raise MedtlError(
            "no bundle TorchScript model here",
            path=found,
            hint="give -m bundles/lidc_nodule_malignancy (or its models/model.ts)",
        )
    return found


class LidcNoduleApp(Application):
    """Scores the nodule a DICOM SEG outlines in the CT series it references, writing
    ``predictions.json`` and a Basic Text SR into the output folder."""

    def compose(self) -> None:
        context: AppContext = Application.init_app_context(self.argv)
        model_file, output = model_path(Path(context.model_path)), Path(context.output_path)
        # the SDK's model factory gives a folder no predictor: hand it the TorchScript file, as a MAP does
        context.update({"model": str(model_file)})
        meta = get_bundle_config(str(model_file), ["inference"])["_meta_"]
        channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        model = {"name": str(meta.get("name", "lidc_nodule_malignancy")), "version": str(meta.get("version", ""))}
        segment = os.environ.get(SEGMENT_ENV)

        loader = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(context.input_path), name="loader"
        )
        selector = DICOMSeriesSelectorOperator(self, rules=CT_RULES, name="selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        nodule = NoduleInputOperator(self, segment=int(segment) if segment else None, name="nodule_input")
        infer = NoduleBundleInferenceOperator(
            self,
            app_context=context,
            bundle_path=model_file,
            name="bundle_inference",
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", dict, IOType.IN_MEMORY)],
        )
        result = ResultOperator(
            self,
            output_folder=output,
            class_names=[channel_def[str(i)] for i in range(len(channel_def))],
            model=model,
            name="result",
        )
        sr = DICOMTextSRWriterOperator(
            self,
            output_folder=output,
            copy_tags=True,
            name="sr_writer",
            model_info=ModelInfo(creator="medtl", name=model["name"], version=model["version"]),
            equipment_info=EquipmentInfo(
                manufacturer="medtl", manufacturer_model="MONAI Deploy app", series_number="9002"
            ),
            custom_tags={"SeriesDescription": "AI nodule malignancy, research use only"},
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(loader, nodule, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(selector, nodule, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, nodule, {("image", "image")})
        self.add_flow(nodule, infer, {("image", "image"), ("mask", "mask")})
        self.add_flow(nodule, result, {("grid", "grid")})
        self.add_flow(infer, result, {("pred", "pred")})
        self.add_flow(result, sr, {("text", "text")})
        self.add_flow(selector, sr, {("study_selected_series_list", "study_selected_series_list")})


if __name__ == "__main__":
    LidcNoduleApp().run()
