"""The adaptation recipe from Python: train a source model, fine-tune it on a few target labels,
distill a smaller student from the target's unlabeled scans.

Each step composes the engine's pieces (``fit``, ``FineTuneSchedule``, ``L2SP``, ``adabn``,
``DistillationLoss``) the same way the bundles compose them in JSON, so ``medtl demo``, ``medtl
adapt`` and the benchmarks share one implementation. Steps take *preprocessed* items (the output of
``preprocess``): the deterministic part of the transform chain runs once per case, augmentation runs
per step on top. Model selection uses the validation items only.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.handlers import LrScheduleHandler
from torch import nn

from medtl.adapt.adabn import adabn, has_running_stats
from medtl.adapt.distill import DistillationLoss, DistillBatch, label_with_teacher
from medtl.adapt.head import replace_head
from medtl.adapt.schedule import FineTuneSchedule, param_groups
from medtl.adapt.selection import mean_curve, patient_folds
from medtl.adapt.train import L2SP, fit
from medtl.errors import MedtlError, medtl_cause
from medtl.evaluate import collect_predictions, roc_auc_ovr
from medtl.loading import data_loader
from medtl.manifest import datalist
from medtl.networks import find_classifier
from medtl.progress import track
from medtl.recipes import SELECTIONS, DistillRecipe, FineTuneRecipe, TrainRecipe
from medtl.transforms import augmentation

logger = logging.getLogger(__name__)

Items = Sequence[Mapping[str, Any]]


def preprocess(data: Items, transform: Any, *, progress: bool = True, desc: str = "preprocess") -> list[dict[str, Any]]:
    """Run the deterministic ``transform`` once per case (a list that every later step reuses).

    A case the transform refuses (``MedtlError``, however deep MONAI's ``Compose`` wrapped it: a
    source bundle's own preprocessing) stops the run naming the case, before any training."""
    done = []
    for item in track(data, desc=desc, unit="case", disable=not progress, leave=False):
        try:
            done.append(transform(dict(item)))
        except Exception as exc:
            cause = medtl_cause(exc)
            if cause is None:
                raise
            raise MedtlError(
                f"case {item.get('case_id', '?')} ({desc}): {cause.message}", path=cause.path, hint=cause.hint
            ) from None
    return done


def preprocess_splits(
    manifest: Mapping[str, Any],
    root: str | Path,
    splits: Sequence[str],
    transform: Any,
    *,
    prefix: str = "",
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Each split of a loaded manifest, preprocessed once: ``{prefix + split: items}``."""
    return {
        f"{prefix}{split}": preprocess(
            datalist(manifest, root, split), transform, progress=progress, desc=f"{prefix}{split}"
        )
        for split in splits
    }


def loader(
    items: Items,
    *,
    augment: str = "none",
    batch_size: int = 8,
    shuffle: bool = False,
    device: str | torch.device | None = None,
) -> DataLoader:
    """Batches of preprocessed items, augmented per step at level ``augment`` (none/light/strong),
    in pinned memory when ``device`` is a GPU.

    Augmentation works at the items' own size and dimensionality (a 2D image is (C, H, W)), so it
    needs no preprocessing options repeated here.
    """
    if not items:
        raise MedtlError("no cases to load", hint="check the manifest split is not empty")
    transform = None
    if augment != "none":
        size = tuple(items[0]["image"].shape[1:])
        transform = augmentation(level=augment, spatial_dims=len(size), spatial_size=size)
    # a training batch of one case breaks BatchNorm (one value per channel): with shuffling, that odd case waits for
    # the next epoch
    drop_last = shuffle and len(items) % batch_size == 1 and len(items) > 1
    return data_loader(
        Dataset(list(items), transform),
        batch_size=batch_size,
        shuffle=shuffle,
        device=device,  # augments in a thread
        drop_last=drop_last,
    )


def validation_auc(network: nn.Module, items: Items, device: str | torch.device = "cpu") -> float:
    """ROC AUC (one-vs-rest for K > 2) of ``network`` on preprocessed labeled items."""
    y, probs, _ = collect_predictions(network, loader(items, batch_size=32, device=device), device)
    return roc_auc_ovr(y, probs)


def _num_outputs(network: nn.Module) -> int:
    return find_classifier(network)[1].out_features


def train(
    network: nn.Module,
    train_items: Items,
    val_items: Items | None,
    recipe: TrainRecipe = TrainRecipe(),
    *,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "train",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Train every layer of ``network`` from its current weights; returns ``fit``'s summary.
    ``checkpoint``/``resume``: the per-epoch training state, and continuing from it (``fit``).
    ``recipe.selection="kfold"`` chooses the epoch count on folds of train+val (``seed`` draws
    them), then trains on both, as ``finetune`` does."""
    _check_selection(recipe.selection)
    num_classes = num_classes or _num_outputs(network)

    def run(
        net: nn.Module, fit_items: Items, held_out: Items | None, epochs: int, name: str, **saving: Any
    ) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        schedule = LrScheduleHandler(
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs), print_lr=False
        )
        return fit(
            net,
            loader(fit_items, augment=recipe.augment, batch_size=recipe.batch_size, shuffle=True, device=device),
            optimizer=optimizer,
            max_epochs=epochs,
            handlers=[schedule],
            val_loader=loader(held_out, batch_size=32, device=device) if held_out else None,
            num_classes=num_classes,
            patience=recipe.patience if held_out and recipe.selection == "val" else None,
            device=device,
            progress=progress,
            desc=name,
            channels_last=recipe.channels_last,
            bf16=recipe.bf16,
            **saving,
        )

    if recipe.selection == "val":
        return run(network, train_items, val_items, recipe.epochs, desc, checkpoint=checkpoint, resume=resume) | {
            "recipe": asdict(recipe)
        }
    labeled = [*train_items, *(val_items or [])]
    selected = _kfold_select(
        network, labeled, folds=recipe.folds, epochs=recipe.epochs, seed=seed, keep_initial=False, desc=desc, run=run
    )
    final = run(
        network,
        labeled,
        None,
        selected["best_epoch"],
        f"{desc} on all {len(labeled)} labeled",
        checkpoint=checkpoint,
        resume=resume,
    )
    return final | selected | {"recipe": asdict(recipe)}


def _check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise MedtlError(f"unknown selection {selection!r}; allowed: {', '.join(SELECTIONS)}")


def _kfold_select(
    network: nn.Module, labeled: Items, *, folds: int, epochs: int, seed: int, keep_initial: bool, desc: str, run: Any
) -> dict[str, Any]:
    """The epoch count (0: ``network`` as it is, when ``keep_initial``) with the best mean validation
    AUC over ``folds`` patient-level folds of ``labeled``; ``run(net, train, val, epochs, desc)``
    trains a copy on each fold and returns ``fit``'s summary."""
    curves = []
    for k, held_out in enumerate(patient_folds(labeled, folds, seed=seed)):
        inside = set(held_out)
        fold = run(
            copy.deepcopy(network),
            [c for i, c in enumerate(labeled) if i not in inside],
            [labeled[i] for i in held_out],
            epochs,
            f"{desc} fold {k + 1}/{folds}",
        )
        curves.append(fold["val_auc"] if keep_initial else [None, *fold["val_auc"]])
    curve = mean_curve(curves)
    best = int(np.nanargmax(curve)) if np.isfinite(curve).any() else epochs  # the earliest of equal scores
    logger.info(
        "%s: %d-fold mean validation AUC %.3f at epoch %d (epoch 0 = as it started)", desc, folds, curve[best], best
    )
    return {
        "best_epoch": best,
        "best_val_auc": float(curve[best]),
        "val_auc": [None if v != v else float(v) for v in curve],
        "fold_val_auc": curves,
        "val_first_epoch": 0,
        "selected_on": len(labeled),
    }


def finetune(
    network: nn.Module,
    train_items: Items,
    val_items: Items,
    recipe: FineTuneRecipe = FineTuneRecipe(),
    *,
    num_classes: int = 2,
    unlabeled_items: Items = (),
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "fine-tune",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    new_head: bool = False,
) -> dict[str, Any]:
    """Adapt ``network`` (in place) to the target: AdaBN, new head if the class count differs, the
    freeze -> unfreeze schedule with discriminative rates, L2-SP; choices made as ``recipe.selection``
    says (``seed`` draws the folds). Returns ``fit``'s summary (with k-fold selection: the folds' mean
    validation curve as ``val_auc``, epoch 0 first, and the final run's ``train_loss``).

    ``new_head``: the classifier holds no source knowledge (a new task: its rows were freshly
    initialised when the source was loaded); so does one swapped here for another class count. A
    new head's starting point is random, so the unadapted model (0 epochs) is no candidate of the
    k-fold choice, and WiSE-FT averages the backbone only: the trained head is kept whole."""
    _check_selection(recipe.selection)
    summary: dict[str, Any] = {"recipe": asdict(recipe)}
    if _num_outputs(network) != num_classes:
        replace_head(network, num_classes)
        new_head = True
    if new_head:
        summary["new_head"] = True
    head = find_classifier(network)[0] if new_head else None
    judged = [*train_items, *val_items] if recipe.selection == "kfold" else list(val_items)
    if recipe.adabn and not has_running_stats(network):
        summary["adabn"] = {"kept": False, "skipped": "no BatchNorm statistics (the network normalises per input)"}
    elif recipe.adabn:
        candidate = copy.deepcopy(network)
        scans = [
            *train_items,
            *unlabeled_items,
            *(val_items if recipe.selection == "kfold" else []),
        ]  # k-fold: val cases train too
        stats = adabn(candidate, loader(scans, batch_size=16, device=device), device=device, progress=progress)
        before, after = (validation_auc(m, judged, device) for m in (network, candidate))
        # a fresh head has no "before" to keep
        kept = not recipe.adabn_judged or summary.get("new_head", False) or not after < before
        if kept:
            network.load_state_dict(candidate.state_dict())
        summary["adabn"] = stats | {
            "val_auc_before": before,
            "val_auc_after": after,
            "kept": kept,
            "judged_on": len(judged),
        }
        logger.info(
            "AdaBN %s: AUC on %d labeled cases %.3f -> %.3f",
            "kept" if kept else "discarded",
            len(judged),
            before,
            after,
        )
    start = copy.deepcopy(network.state_dict()) if recipe.wise < 1 else None
    if start is not None and head is not None:  # a random head is no point to average toward
        start = {k: v for k, v in start.items() if not k.startswith(f"{head}.")}
    if recipe.selection == "val":
        result, history = _schedule_fit(
            network,
            train_items,
            val_items,
            recipe,
            epochs=recipe.epochs,
            num_classes=num_classes,
            device=device,
            progress=progress,
            desc=desc,
            patience=recipe.patience,
            checkpoint=checkpoint,
            resume=resume,
        )
        if start is not None:
            network.load_state_dict(weight_average(start, network.state_dict(), recipe.wise))
        return summary | result | {"schedule": history}
    selected = _kfold_select(
        network,
        judged,
        folds=recipe.folds,
        epochs=recipe.epochs,
        seed=seed,
        keep_initial=recipe.keep_source and head is None,
        desc=desc,
        run=lambda net, fit_items, held_out, epochs, name: _schedule_fit(
            net,
            fit_items,
            held_out,
            recipe,
            epochs=epochs,
            num_classes=num_classes,
            device=device,
            progress=progress,
            desc=name,
            patience=None,
        )[0],
    )
    best = selected["best_epoch"]
    if best == 0:
        return summary | selected | {"epochs_run": 0, "train_loss": [], "seconds": 0.0, "schedule": []}
    result, history = _schedule_fit(
        network,
        judged,
        None,
        recipe,
        epochs=best,
        num_classes=num_classes,
        device=device,
        progress=progress,
        desc=f"{desc} on all {len(judged)} labeled",
        patience=None,
        checkpoint=checkpoint,
        resume=resume,
    )
    if start is not None:
        network.load_state_dict(weight_average(start, network.state_dict(), recipe.wise))
    return summary | result | selected | {"schedule": history}


def weight_average(
    start: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """``(1 - weight) * start + weight * tuned`` for every floating-point tensor (WiSE-FT, Wortsman
    et al. 2022): the fine-tuned model pulled back toward where it started keeps most of the target
    gain and loses less of what the start knew; integer buffers (BatchNorm's counter) and tensors
    ``start`` leaves out (a new head) come from ``tuned``."""
    return {
        k: torch.lerp(start[k].to(v.dtype), v, weight) if v.is_floating_point() and k in start else v
        for k, v in tuned.items()
    }


def _schedule_fit(
    network: nn.Module,
    train_items: Items,
    val_items: Items | None,
    recipe: FineTuneRecipe,
    *,
    epochs: int,
    num_classes: int,
    device: str | torch.device,
    progress: bool,
    desc: str,
    patience: int | None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> tuple[dict[str, Any], list[Any]]:
    """One run of the fine-tuning schedule for ``epochs`` epochs; with ``val_items``, the best
    validation epoch (``recipe.keep_source``: the starting weights too) is kept."""
    optimizer = torch.optim.AdamW(
        param_groups(network, lr=recipe.lr, lr_decay=recipe.lr_decay), weight_decay=recipe.weight_decay
    )
    schedule = FineTuneSchedule(
        head_epochs=recipe.head_epochs,
        head_lr=recipe.head_lr,
        unfreeze=recipe.unfreeze,
        unfreeze_every=recipe.unfreeze_every,
        warmup_epochs=recipe.warmup_epochs,
    )
    handlers: list[Any] = [schedule]
    if recipe.l2sp:
        handlers.append(L2SP(recipe.l2sp))
    validated = bool(val_items)
    result = fit(
        network,
        loader(train_items, augment=recipe.augment, batch_size=recipe.batch_size, shuffle=True, device=device),
        optimizer=optimizer,
        max_epochs=epochs,
        handlers=handlers,
        val_loader=loader(val_items, batch_size=32, device=device) if validated else None,
        num_classes=num_classes,
        patience=patience if validated else None,
        keep_initial=recipe.keep_source and validated,
        device=device,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        desc=desc,
        channels_last=recipe.channels_last,
        bf16=recipe.bf16,
    )
    return result, schedule.history


def recipe_outcome(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``finetune`` run did, in the form a model card and provenance record state it."""
    adabn_state = run.get("adabn", {})
    if "fold_val_auc" in run:
        chose = (
            f"{run['best_epoch']} epochs, then trained on all of them"
            if run["best_epoch"]
            else "0 epochs: no epoch beat the unadapted model, which is kept"
        )
        outcome = (
            f"{len(run['fold_val_auc'])}-fold selection on {run['selected_on']} labeled cases chose {chose} "
            f"(mean validation AUC {run['best_val_auc']:.3f})"
        )
    else:
        outcome = (
            f"kept epoch {run['best_epoch']} of {run['epochs_run']} (best validation AUC {run['best_val_auc']:.3f})"
        )
    if run["recipe"].get("wise", 1.0) < 1 and run.get("epochs_run", 0):
        outcome += (
            f"; weights averaged with the starting point's, {run['recipe']['wise']:g} on the fine-tuned (WiSE-FT)"
        )
    if adabn_state.get("skipped"):
        outcome += f"; no AdaBN: {adabn_state['skipped']}"
    elif adabn_state:
        outcome += (
            f"; AdaBN {'kept' if adabn_state['kept'] else 'discarded'} on "
            f"{adabn_state.get('judged_on', 'the validation')} labeled cases"
        )
    return {"fine-tuning": run["recipe"], "outcome": outcome}


def distill(
    teacher: nn.Module,
    student: nn.Module,
    labeled_items: Items,
    unlabeled_items: Items,
    val_items: Items,
    recipe: DistillRecipe = DistillRecipe(),
    *,
    class_names: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "distill",
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``student`` (in place) on the teacher's outputs for labeled and unlabeled target items.

    Labeled items keep their labels; unlabeled ones get a pseudo-label where the teacher is at least
    ``recipe.threshold`` sure, and the soft term everywhere. Returns ``fit``'s summary plus the
    pseudo-label report.
    """
    teacher = copy.deepcopy(teacher)  # never trained; its BatchNorm state stays as given
    data, report = label_with_teacher(
        teacher,
        [*labeled_items, *unlabeled_items],
        None,
        threshold=recipe.threshold,
        class_names=class_names,
        keep_uncertain=recipe.keep_uncertain,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = LrScheduleHandler(
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs), print_lr=False
    )
    result = fit(
        student,
        loader(data, augment=recipe.augment, batch_size=recipe.batch_size, shuffle=True, device=device),
        optimizer=optimizer,
        max_epochs=recipe.epochs,
        handlers=[schedule],
        val_loader=loader(val_items, batch_size=32, device=device),
        num_classes=_num_outputs(student),
        loss_function=DistillationLoss(recipe.alpha, recipe.temperature),
        prepare_batch=DistillBatch(),
        patience=recipe.patience,
        device=device,
        progress=progress,
        desc=desc,
        channels_last=recipe.channels_last,
        bf16=recipe.bf16,
        checkpoint=checkpoint,
        resume=resume,
    )
    return {"recipe": asdict(recipe), "pseudo_labels": report} | result


__all__ = [
    "DistillRecipe",
    "FineTuneRecipe",
    "TrainRecipe",
    "distill",
    "finetune",
    "loader",
    "preprocess",
    "preprocess_splits",
    "train",
    "validation_auc",
]
