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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.handlers import LrScheduleHandler
from torch import nn
from tqdm import tqdm

from medtl.adapt.adabn import adabn
from medtl.adapt.distill import DistillationLoss, DistillBatch, label_with_teacher
from medtl.adapt.head import find_classifier, replace_head
from medtl.adapt.schedule import FineTuneSchedule, param_groups
from medtl.adapt.train import L2SP, fit
from medtl.errors import MedtlError
from medtl.evaluate import collect_predictions, roc_auc_ovr
from medtl.loading import data_loader
from medtl.manifest import datalist
from medtl.transforms import augmentation

logger = logging.getLogger(__name__)

Items = Sequence[Mapping[str, Any]]


def preprocess(data: Items, transform: Any, *, progress: bool = True, desc: str = "preprocess") -> list[dict[str, Any]]:
    """Run the deterministic ``transform`` once per case (a list that every later step reuses)."""
    return [transform(dict(item)) for item in tqdm(data, desc=desc, unit="case", disable=not progress, leave=False)]


def preprocess_splits(manifest: Mapping[str, Any], root: str | Path, splits: Sequence[str], transform: Any, *,
                      prefix: str = "", progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Each split of a loaded manifest, preprocessed once: ``{prefix + split: items}``."""
    return {f"{prefix}{split}": preprocess(datalist(manifest, root, split), transform, progress=progress, desc=f"{prefix}{split}")
            for split in splits}


def loader(items: Items, *, augment: str = "none", batch_size: int = 8, shuffle: bool = False,
           device: str | torch.device | None = None) -> DataLoader:
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
    return data_loader(Dataset(list(items), transform), batch_size=batch_size, shuffle=shuffle, device=device)  # augments in a thread


def validation_auc(network: nn.Module, items: Items, device: str | torch.device = "cpu") -> float:
    """ROC AUC (one-vs-rest for K > 2) of ``network`` on preprocessed labeled items."""
    y, probs, _ = collect_predictions(network, loader(items, batch_size=32, device=device), device)
    return roc_auc_ovr(y, probs)


def _num_outputs(network: nn.Module) -> int:
    return find_classifier(network)[1].out_features


@dataclass
class TrainRecipe:
    """Plain supervised training (a source model, or a target model from scratch): AdamW, cosine decay."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    augment: str = "light"
    patience: int | None = None
    channels_last: bool = False  # faster convolutions on CPUs, same arithmetic (FastForward)
    bf16: bool = False  # bfloat16 autocast: faster still, lower precision; see benchmarks/precision.py


@dataclass
class FineTuneRecipe:
    """Adapting a source model on few target labels without losing what it learned.

    Defaults: AdaBN on the target's scans, kept when it does not lower the validation AUC; the new
    head alone for ``head_epochs``, then layer groups unfreezing from the top at
    ``lr * lr_decay**depth``, L2-SP toward the source weights; the best validation epoch kept, the
    unadapted model included (``keep_source``), so the recipe never ends below where it started on
    validation data. ``naive()`` is the plain full fine-tune it is compared with.
    """

    epochs: int = 30
    head_epochs: int = 5
    head_lr: float = 1e-3
    lr: float = 1e-4
    lr_decay: float = 0.5
    unfreeze: str = "gradual"
    unfreeze_every: int = 2
    warmup_epochs: float = 1.0
    l2sp: float = 0.01
    adabn: bool = True
    keep_source: bool = True
    weight_decay: float = 0.0
    batch_size: int = 8
    augment: str = "light"
    patience: int | None = 10
    channels_last: bool = False  # faster convolutions on CPUs, same arithmetic (FastForward)
    bf16: bool = False  # bfloat16 autocast: faster still, lower precision; see benchmarks/precision.py

    @classmethod
    def naive(cls, **overrides: Any) -> FineTuneRecipe:
        """Every layer trains from the first step at one rate: the textbook fine-tune."""
        options = dict(head_epochs=0, lr=1e-3, lr_decay=1.0, unfreeze="all", warmup_epochs=0.0, l2sp=0.0,
                       adabn=False, keep_source=False, weight_decay=1e-4, patience=None)
        return cls(**{**options, **overrides})


@dataclass
class DistillRecipe:
    """A student learning from the teacher's soft outputs and confident pseudo-labels."""

    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    alpha: float = 0.5
    temperature: float = 4.0
    threshold: float = 0.8
    keep_uncertain: bool = True
    batch_size: int = 16
    augment: str = "light"
    patience: int | None = 15
    channels_last: bool = False  # faster convolutions on CPUs, same arithmetic (FastForward)
    bf16: bool = False  # bfloat16 autocast: faster still, lower precision; see benchmarks/precision.py


def train(network: nn.Module, train_items: Items, val_items: Items | None, recipe: TrainRecipe = TrainRecipe(), *,
          num_classes: int | None = None, device: str | torch.device = "cpu", progress: bool = True,
          desc: str = "train", checkpoint: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train every layer of ``network`` from its current weights; returns ``fit``'s summary.
    ``checkpoint``/``resume``: the per-epoch training state, and continuing from it (``fit``)."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = LrScheduleHandler(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs), print_lr=False)
    return fit(
        network, loader(train_items, augment=recipe.augment, batch_size=recipe.batch_size, shuffle=True, device=device),
        optimizer=optimizer, max_epochs=recipe.epochs, handlers=[schedule],
        val_loader=loader(val_items, batch_size=32, device=device) if val_items else None,
        num_classes=num_classes or _num_outputs(network), patience=recipe.patience if val_items else None,
        checkpoint=checkpoint, resume=resume, device=device, progress=progress, desc=desc,
        channels_last=recipe.channels_last, bf16=recipe.bf16,
    ) | {"recipe": asdict(recipe)}


def finetune(network: nn.Module, train_items: Items, val_items: Items, recipe: FineTuneRecipe = FineTuneRecipe(), *,
             num_classes: int = 2, unlabeled_items: Items = (), device: str | torch.device = "cpu",
             progress: bool = True, desc: str = "fine-tune", checkpoint: str | Path | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Adapt ``network`` (in place) to the target: AdaBN, new head if the class count differs, the
    freeze -> unfreeze schedule with discriminative rates, L2-SP; returns ``fit``'s summary."""
    summary: dict[str, Any] = {"recipe": asdict(recipe)}
    if _num_outputs(network) != num_classes:
        replace_head(network, num_classes)
        summary["new_head"] = True
    if recipe.adabn:
        candidate = copy.deepcopy(network)
        stats = adabn(candidate, loader([*train_items, *unlabeled_items], batch_size=16, device=device), device=device, progress=progress)
        before, after = (validation_auc(m, val_items, device) for m in (network, candidate))
        kept = summary.get("new_head", False) or not after < before  # a fresh head has no "before" to keep
        if kept:
            network.load_state_dict(candidate.state_dict())
        summary["adabn"] = stats | {"val_auc_before": before, "val_auc_after": after, "kept": kept}
        logger.info("AdaBN %s: validation AUC %.3f -> %.3f", "kept" if kept else "discarded", before, after)
    optimizer = torch.optim.AdamW(param_groups(network, lr=recipe.lr, lr_decay=recipe.lr_decay), weight_decay=recipe.weight_decay)
    schedule = FineTuneSchedule(head_epochs=recipe.head_epochs, head_lr=recipe.head_lr, unfreeze=recipe.unfreeze,
                                unfreeze_every=recipe.unfreeze_every, warmup_epochs=recipe.warmup_epochs)
    handlers: list[Any] = [schedule]
    if recipe.l2sp:
        handlers.append(L2SP(recipe.l2sp))
    result = fit(
        network, loader(train_items, augment=recipe.augment, batch_size=recipe.batch_size, shuffle=True, device=device),
        optimizer=optimizer, max_epochs=recipe.epochs, handlers=handlers, val_loader=loader(val_items, batch_size=32, device=device),
        num_classes=num_classes, patience=recipe.patience, keep_initial=recipe.keep_source, device=device,
        checkpoint=checkpoint, resume=resume, progress=progress, desc=desc,
        channels_last=recipe.channels_last, bf16=recipe.bf16,
    )
    return summary | result | {"schedule": schedule.history}


def recipe_outcome(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a ``finetune`` run did, in the form a model card and provenance record state it."""
    adabn_state = run.get("adabn", {})
    outcome = f"kept epoch {run['best_epoch']} of {run['epochs_run']} (best validation AUC {run['best_val_auc']:.3f})"
    if adabn_state:
        outcome += f"; AdaBN {'kept' if adabn_state['kept'] else 'discarded'} on validation"
    return {"fine-tuning": run["recipe"], "outcome": outcome}


def distill(teacher: nn.Module, student: nn.Module, labeled_items: Items, unlabeled_items: Items, val_items: Items,
            recipe: DistillRecipe = DistillRecipe(), *, class_names: Sequence[str] | None = None,
            cache_dir: str | Path | None = None, device: str | torch.device = "cpu", progress: bool = True,
            desc: str = "distill", checkpoint: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``student`` (in place) on the teacher's outputs for labeled and unlabeled target items.

    Labeled items keep their labels; unlabeled ones get a pseudo-label where the teacher is at least
    ``recipe.threshold`` sure, and the soft term everywhere. Returns ``fit``'s summary plus the
    pseudo-label report.
    """
    teacher = copy.deepcopy(teacher)  # never trained; its BatchNorm state stays as given
    data, report = label_with_teacher(
        teacher, [*labeled_items, *unlabeled_items], None, threshold=recipe.threshold, class_names=class_names,
        keep_uncertain=recipe.keep_uncertain, cache_dir=cache_dir, device=device, progress=progress,
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = LrScheduleHandler(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs), print_lr=False)
    result = fit(
        student, loader(data, augment=recipe.augment, batch_size=recipe.batch_size, shuffle=True, device=device),
        optimizer=optimizer, max_epochs=recipe.epochs, handlers=[schedule], val_loader=loader(val_items, batch_size=32, device=device),
        num_classes=_num_outputs(student), loss_function=DistillationLoss(recipe.alpha, recipe.temperature),
        prepare_batch=DistillBatch(), patience=recipe.patience, device=device, progress=progress, desc=desc,
        channels_last=recipe.channels_last, bf16=recipe.bf16,
        checkpoint=checkpoint, resume=resume,
    )
    return {"recipe": asdict(recipe), "pseudo_labels": report} | result


__all__ = ["DistillRecipe", "FineTuneRecipe", "TrainRecipe", "distill", "finetune", "loader", "preprocess", "preprocess_splits", "train", "validation_auc"]
