"""``medtl adapt``: the demo's adaptation steps on the user's own target manifest and source weights.

source weights (bundle, state dict, checkpoint, TorchScript) -> evaluated on the target's test split
-> AdaBN -> fine-tuned on the target's labeled cases (freeze -> unfreeze, L2-SP, validation-selected)
-> optionally a smaller student distilled on its unlabeled scans -> the fine-tuned model exported as
a ``tumor_cls_finetune`` bundle. The test split is only scored, never used for a choice.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.utils import set_determinism

from medtl.adapt.adabn import adabn
from medtl.adapt.recipe import distill, finetune, loader, preprocess_splits, recipe_outcome
from medtl.bundle.components import class_names, load_source
from medtl.bundle.export import export_bundle, network_data_format_with_classes
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json
from medtl.loading import resolve_device
from medtl.manifest import load_manifest
from medtl.networks import resnet
from medtl.recipes import DistillRecipe, FineTuneRecipe
from medtl.report import render_report
from medtl.runlog import record_curve, record_explanations, run_folder
from medtl.stages import adaptation_finding, evaluate_items, print_stages, stages_json
from medtl.transforms import preprocessing


def run_adapt(
    source: str | Path,
    manifest: str | Path,
    root: str | Path,
    out: str | Path,
    *,
    widen_factor: float = 0.5,
    modality: str = "ct",
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
    """Adapt ResNet10 weights at ``source`` to the target ``manifest`` on ``device``; returns stage rows and the bundle.

    A source bundle's classes are matched to the manifest's by name, or by ``class_map``
    (``{target: source}``, or ``"new"`` for a new head); see ``medtl.bundle.components.load_source``."""
    out = Path(out)
    device = resolve_device(device)
    records = run_folder(out)
    set_determinism(seed)
    names = class_names(manifest)
    data = load_manifest(manifest)
    pre = preprocessing(modality=modality)
    items = preprocess_splits(data, root, ("train", "val", "test", "unlabeled"), pre, progress=progress)
    for split in ("train", "val", "test"):
        if not items[split]:
            raise MedtlError(
                f"the target manifest has no {split} cases",
                path=Path(manifest).name,
                hint="adaptation needs labeled train and val cases and a test split to report on",
            )
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

    network = resnet(widen_factor, num_classes=len(names))
    report = load_source(network, source, trust=trust, target_classes=names, class_map=class_map)
    stage("source-only", network, 0.0)
    source_network = copy.deepcopy(network)
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
    )
    results = {"target test": stage("fine-tuned", network, time.perf_counter() - t)}
    record_curve(records, "fine-tuned", run)
    if student_widen:
        pupil, t = resnet(student_widen, num_classes=len(names)), time.perf_counter()
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
        record_explanations(records, f"{name} on the target", explained, items["test"], names, device=device)
    bundle = export_bundle(
        network,
        out / "tumor_cls_finetune",
        template="tumor_cls_finetune",
        metrics=results,
        source=source,
        manifests=[data],
        recipe=recipe_outcome(run),
        changelog=f"adapted by medtl adapt from {Path(source).name} to {data['name']}",
        metadata={"network_data_format": network_data_format_with_classes(names)},
    )
    print_stages(rows)
    finding = adaptation_finding(
        source_network, network, items["test"], seed=seed, device=device, where="the target's test split"
    )
    print(finding["text"])
    print(
        f"\nfine-tuning: {recipe_outcome(run)['outcome']}; source load: {len(report['loaded'])} tensors loaded, "
        f"{len(report['mismatched'])} left to a new head; classes: {_mapping_text(report)}"
    )
    print(f"bundle: {bundle['path']} (TorchScript max abs diff {bundle['torchscript_max_abs_diff']:.1e})")
    summary = {
        "run": {"seed": seed, "manifest": {"name": data["name"], "content_sha256": data["content_sha256"]}},
        "stages": stages_json(rows),
        "finetune": {k: run[k] for k in ("best_epoch", "epochs_run", "best_val_auc", "val_auc")},
        "bundle": "tumor_cls_finetune",
        "finding": finding,
        "class_mapping": report["class_mapping"],
    }
    atomic_write_json(
        records / "run.json",
        {"seed": seed, "manifests": {data["name"]: data["content_sha256"]}, "findings": [finding["text"]]},
    )
    rendered = render_report(out, title=f"medtl adapt: {Path(source).name} to {data['name']}")
    atomic_write_json(out / "adapt_summary.json", summary | {"report": str(rendered["html"].relative_to(out))})
    print(f"report: {rendered['html']}")
    return {"rows": rows, "bundle": bundle, "finetune": run, "report": rendered}


def _mapping_text(report: Mapping[str, Any]) -> str:
    """How the target's classes took the source's outputs, for the closing lines."""
    mapping = report.get("class_mapping")
    if mapping is None:
        return "the source names none, so its outputs were taken in the target's order"
    return ", ".join(f"{t} <- {s}" if s is not None else f"{t} (new)" for t, s in mapping.items())


__all__ = ["run_adapt"]
