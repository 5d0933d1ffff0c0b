"""``medtl adapt``: the demo's adaptation steps on the user's own target manifest and source.

source (a bundle adapted as itself, or a raw checkpoint of a registered architecture:
``medtl.adapt.source``) -> evaluated on the target's test split -> AdaBN -> fine-tuned on the
target's labeled cases (freeze -> unfreeze, L2-SP, epochs chosen by k-fold) -> optionally a smaller
student distilled on its unlabeled scans -> the fine-tuned model exported as a bundle: the source
bundle's next version, or a ``tumor_cls_finetune`` bundle that builds the checkpoint's architecture.
The test split is only scored, never used for a choice.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.utils import set_determinism

from medtl.adapt.adabn import adabn, has_running_stats
from medtl.adapt.recipe import distill, finetune, loader, preprocess_splits, recipe_outcome
from medtl.adapt.source import RAW_TEMPLATE, Source, check_inputs, open_source
from medtl.bundle.components import class_names
from medtl.bundle.export import export_bundle, network_data_format_with_classes
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json
from medtl.loading import resolve_device
from medtl.manifest import load_manifest
from medtl.recipes import DistillRecipe, FineTuneRecipe
from medtl.report import render_report
from medtl.runlog import record_curve, record_explanations, run_folder
from medtl.stages import adaptation_finding, evaluate_items, print_stages, stages_json


def run_adapt(
    source: str | Path,
    manifest: str | Path,
    root: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    widen_factor: float | None = None,
    modality: str | None = None,
    recipe: FineTuneRecipe = FineTuneRecipe(),
    student_widen: float | None = None,
    student: DistillRecipe = DistillRecipe(),
    class_map: Mapping[str, str] | str | None = None,
    trust: bool = False,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    device: str = "auto",
) -> dict[str, Any]:
    """Adapt the ``source`` to the target ``manifest`` on ``device``; returns stage rows and the bundle.

    ``source`` is a bundle (folder or zip), adapted as itself: its own network_def and inputs, exported
    from its own configs as its next minor version; or a raw checkpoint of the registered network
    ``arch`` (default ``resnet10``; ``spatial_dims``, ``in_channels``, ``widen_factor`` describe it),
    exported as a ``tumor_cls_finetune`` bundle that builds that network (``medtl.adapt.source``).
    A source bundle's classes are matched to the manifest's by name, or by ``class_map``
    (``{target: source}``, or ``"new"`` for a new head); see ``medtl.bundle.components.load_source``.
    Every mismatch is refused before the first epoch."""
    out = Path(out)
    device = resolve_device(device)
    records = run_folder(out)
    set_determinism(seed)
    names = class_names(manifest)
    data = load_manifest(manifest)
    src = open_source(
        source,
        target_classes=names,
        workdir=out,
        class_map=class_map,
        arch=arch,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        modality=modality,
        network_options={"widen_factor": widen_factor} if widen_factor is not None else None,
        trust=trust,
    )
    items = preprocess_splits(data, root, ("train", "val", "test", "unlabeled"), src.preprocessing, progress=progress)
    for split in ("train", "val", "test"):
        if not items[split]:
            raise MedtlError(
                f"the target manifest has no {split} cases",
                path=Path(manifest).name,
                hint="adaptation needs labeled train and val cases and a test split to report on",
            )
    check_inputs(src, items["train"][0], len(names), where=Path(manifest).name)
    input_shape = [int(v) for v in items["train"][0]["image"].shape]
    rows: list[dict[str, Any]] = []
    shutil.rmtree(records, ignore_errors=True)  # a report shows this run only

    def stage(name: str, network: Any, seconds: float) -> dict[str, Any]:
        result = evaluate_items(
            network, items["test"], seed=seed, class_names=names, record=(records, name, "target test"), device=device
        )
        rows.append(
            {
                "stage": name,
                "evaluated on": "target test",
                "result": result,
                "params": sum(p.numel() for p in network.parameters()),
                "seconds": seconds,
            }
        )
        return result

    network, report = src.network, src.load_report
    stage("source-only", network, 0.0)
    source_network = copy.deepcopy(network)
    if has_running_stats(network):  # GroupNorm/LayerNorm encoders have no statistics to re-estimate
        t = time.perf_counter()
        adapted = copy.deepcopy(network)
        adabn(
            adapted,
            loader([*items["train"], *items["unlabeled"]], batch_size=16, device=device),
            progress=progress,
            device=device,
        )
        stage("AdaBN", adapted, time.perf_counter() - t)
    t = time.perf_counter()
    run = finetune(
        network,
        items["train"],
        items["val"],
        recipe,
        num_classes=len(names),
        checkpoint=out / "training_state.pt",
        resume=resume,
        unlabeled_items=items["unlabeled"],
        progress=progress,
        desc="fine-tune",
        device=device,
        seed=seed,
        new_head=src.new_head,
    )
    results = {"target test": stage("fine-tuned", network, time.perf_counter() - t)}
    record_curve(records, "fine-tuned", run)
    if student_widen:
        pupil, t = src.student("resnet10", widen_factor=student_widen), time.perf_counter()
        distilled = distill(
            network,
            pupil,
            items["train"],
            items["unlabeled"],
            items["val"],
            student,
            class_names=names,
            cache_dir=out / "cache",
            progress=progress,
            desc="distill student",
            device=device,
        )
        stage(f"student ({student_widen:g})", pupil, time.perf_counter() - t)
        record_curve(records, f"student ({student_widen:g})", distilled)
    for name, explained in (("source-only", source_network), ("fine-tuned", network)):
        try:
            record_explanations(records, f"{name} on the target", explained, items["test"], names, device=device)
        except MedtlError as exc:  # a network Grad-CAM cannot read (a transformer encoder): the report goes without
            print(f"no Grad-CAM for {name}: {exc}")
    bundle = export_adapted(src, network, out, names, input_shape, data, results, recipe_outcome(run), source)
    print_stages(rows)
    finding = adaptation_finding(
        source_network, network, items["test"], seed=seed, device=device, where="the target's test split"
    )
    print(finding["text"])
    print(
        f"\nfine-tuning: {recipe_outcome(run)['outcome']}; source load: {len(report['loaded'])} tensors loaded, "
        f"{len(report['mismatched'])} left to a new head; classes: {_mapping_text(report)}"
    )
    if src.bundle is not None:
        print(f"inputs: {src.label}'s own ({input_shape[0]} channel(s), {input_shape[1:]} voxels)")
    diff = bundle["torchscript_max_abs_diff"]
    print(
        f"bundle: {bundle['path']} "
        + (f"(TorchScript max abs diff {diff:.1e})" if diff is not None else "(no TorchScript copy: see the warning)")
    )
    summary = {
        "run": {"seed": seed, "manifest": {"name": data["name"], "content_sha256": data["content_sha256"]}},
        "stages": stages_json(rows),
        "finetune": {k: run[k] for k in ("best_epoch", "epochs_run", "best_val_auc", "val_auc")},
        "bundle": bundle["path"].name,
        "finding": finding,
        "class_mapping": report["class_mapping"],
    }
    atomic_write_json(
        records / "run.json",
        {"seed": seed, "manifests": {data["name"]: data["content_sha256"]}, "findings": [finding["text"]]},
    )
    rendered = render_report(out, title=f"medtl adapt: {src.label} to {data['name']}")
    atomic_write_json(out / "adapt_summary.json", summary | {"report": str(rendered["html"].relative_to(out))})
    print(f"report: {rendered['html']}")
    return {"rows": rows, "bundle": bundle, "finetune": run, "report": rendered}


def export_adapted(
    src: Source,
    network: Any,
    out: Path,
    names: list[str],
    input_shape: list[int],
    data: Mapping[str, Any],
    results: Mapping[str, Any],
    recipe: Mapping[str, Any],
    source: str | Path,
) -> dict[str, Any]:
    """The adapted network as a bundle: a source bundle's own next minor version (its configs,
    network_def and inputs, the target's classes), or a ``tumor_cls_finetune`` bundle whose
    configs build the raw checkpoint's architecture with the inputs it was trained on."""
    changelog = f"adapted by medtl adapt from {src.label} to {data['name']}"
    fmt = network_data_format_with_classes(names, src.template, input_shape)
    if src.bundle is not None:
        meta = json.loads((src.bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
        dest, derived, settings = out / meta["name"], "minor", {}
        description = f"Adapted by medtl from {meta['name']} {meta['version']} to {data['name']}. {meta['description']}"
    else:
        dest, derived, settings = out / RAW_TEMPLATE, None, src.settings
        mr = settings["modality"] == "mr"  # the template describes CT
        fmt["inputs"]["image"].update(modality="MR" if mr else "CT", format="magnitude" if mr else "hounsfield")
        params = sum(p.numel() for p in network.parameters())
        description = (
            f"{src.arch} ({params / 1e6:.1f}M parameters, {len(input_shape) - 1}D, {input_shape[0]} input channel(s)"
            f"{': the scan and its lesion mask' if input_shape[0] == 2 else ''}) initialised from {src.label} and "
            f"adapted to {data['name']} by medtl adapt: BatchNorm statistics re-estimated on the target's scans "
            "(AdaBN), a head for the target's classes trained on the frozen backbone, then layer groups unfrozen "
            "from the top at discriminative learning rates with an L2-SP penalty toward the source weights. "
            "evaluate.json reports target-domain metrics with patient-level bootstrap CIs; inference.json scores "
            "DICOM folders or CSV-listed volumes."
        )
    return export_bundle(
        network,
        dest,
        template=src.template,
        metrics=results,
        source=source,
        manifests=[data],
        recipe=recipe,
        changelog=changelog,
        metadata={"network_data_format": fmt, "description": description},
        settings=settings,
        network_def=src.network_def,
        derived=derived,
    )


def _mapping_text(report: Mapping[str, Any]) -> str:
    """How the target's classes took the source's outputs, for the closing lines."""
    mapping = report.get("class_mapping")
    if mapping is None:
        return "the source names none, so its outputs were taken in the target's order"
    return ", ".join(f"{t} <- {s}" if s is not None else f"{t} (new)" for t, s in mapping.items())


__all__ = ["export_adapted", "run_adapt"]
