"""Knowledge distillation: a teacher labels the target site's unlabeled scans, a smaller student learns.

The teacher (any loadable network, typically the fine-tuned model) gives every target case soft
labels (its logits) and, where it is confident, a hard pseudo-label. The student minimises

    loss = alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al., 2015): the T^2 keeps the soft term's gradients on the scale of the hard term's as
T grows. Cases without a label or confident pseudo-label (``label == -1``) contribute the soft term
only. Teacher logits are computed once per case and cached on disk, keyed by case id and the
teacher's weight hash, so a 50-epoch student run does not pay 50 teacher passes; that is right when
augmentation is light (the teacher's answer on the clean crop stands for every augmented view).
With strong augmentation give ``DistillBatch`` the teacher to label each augmented view instead.

In bundle JSON the pieces are a loss and a ``prepare_batch``::

    "loss": {"_target_": "medtl.adapt.distill.DistillationLoss", "alpha": 0.5, "temperature": 4.0},
    "prepare_batch": {"_target_": "medtl.adapt.distill.DistillBatch"}
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.engines.utils import PrepareBatch
from torch import Tensor, nn

from medtl.adapt.train import as_plain
from medtl.errors import MedtlError
from medtl.fileio import atomic_write
from medtl.progress import track
from medtl.weights import state_sha256

logger = logging.getLogger(__name__)

TEACHER_KEY = "teacher_logits"
UNLABELED = -1


def distillation_loss(
    student: Tensor, teacher: Tensor, labels: Tensor | None, *, alpha: float, temperature: float
) -> Tensor:
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, batch means.

    CE averages over cases with ``label >= 0``; with none (or ``labels=None``) it is 0. KL is the
    per-case sum over classes averaged over the batch (``batchmean``), as in its definition.
    """
    t = float(temperature)
    kl = (
        F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.log_softmax(teacher.to(student.dtype) / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )
    if labels is None or alpha == 0:
        return (1.0 - alpha) * kl
    labels = labels.reshape(-1).long()
    known = labels >= 0
    ce = F.cross_entropy(student[known], labels[known]) if known.any() else student.sum() * 0.0
    return alpha * ce + (1.0 - alpha) * kl


class DistillationLoss(nn.Module):
    """The distillation loss as a module taking ``(student_logits, target)``.

    ``target`` is what ``DistillBatch`` returns: ``{"label": (B,), "teacher": (B, K)}``. A plain label
    tensor gives cross-entropy alone, so the same loss serves validation-free fine-tuning too.

    Args:
        alpha: weight of the hard-label term, in [0, 1].
        temperature: softening temperature T > 0 of both distributions.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0) -> None:
        super().__init__()
        if not 0.0 <= float(alpha) <= 1.0:
            raise MedtlError(f"alpha must be in [0, 1], got {alpha}")
        if float(temperature) <= 0:
            raise MedtlError(f"temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def forward(self, student: Tensor, target: Tensor | Mapping[str, Tensor]) -> Tensor:
        if isinstance(target, Mapping):
            return distillation_loss(
                student, target["teacher"], target.get("label"), alpha=self.alpha, temperature=self.temperature
            )
        labels = target.reshape(-1).long()
        return F.cross_entropy(student, labels, ignore_index=UNLABELED)


class DistillBatch(PrepareBatch):
    """``prepare_batch`` for a ``SupervisedTrainer`` training a student: returns the image and
    ``{"label", "teacher"}``. Teacher logits come from the batch (``teacher_key``, cached by
    ``label_with_teacher``) or, given ``teacher``, from running it on this (augmented) batch."""

    def __init__(
        self,
        teacher: nn.Module | None = None,
        *,
        image_key: str = "image",
        label_key: str = "label",
        teacher_key: str = TEACHER_KEY,
    ) -> None:
        self.teacher = teacher
        self.image_key, self.label_key, self.teacher_key = image_key, label_key, teacher_key

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        image = as_plain(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        label = torch.as_tensor(batchdata[self.label_key]).to(device=device, non_blocking=non_blocking)
        if self.teacher is not None:
            self.teacher.to(device).eval()
            with torch.no_grad():
                teacher = self.teacher(image).float()
        elif self.teacher_key in batchdata:
            teacher = torch.as_tensor(batchdata[self.teacher_key]).float().to(device=device, non_blocking=non_blocking)
        else:
            raise MedtlError(
                f"batch has no {self.teacher_key!r} and no teacher network was given",
                hint="attach cached teacher logits with medtl.adapt.distill.label_with_teacher, or pass teacher=",
            )
        return image, {"label": label, "teacher": teacher}


# -------------------------------------------------------------------------------- teacher outputs


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state (names, shapes, dtypes, values): the cache key of its outputs."""
    return state_sha256(model.state_dict())


def case_key(item: Mapping[str, Any]) -> str:
    """A case's key in teacher outputs: ``site/case_id`` when the item names its site (case ids are
    unique within one manifest, not across sites), else ``case_id``."""
    site = item.get("site")
    return f"{site}/{item['case_id']}" if site not in (None, "") else str(item["case_id"])


def _cache_path(cache_dir: str | Path, teacher_hash: str, tag: str) -> Path:
    suffix = f"-{tag}" if tag else ""
    return Path(cache_dir) / f"teacher-{teacher_hash[:16]}{suffix}.npz"


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {str(c): row for c, row in zip(data["case_ids"], data["logits"], strict=True)}
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        zipfile.BadZipFile,
    ) as exc:  # a damaged cache is recomputed, never trusted
        logger.warning("%s: unreadable teacher cache (%s), recomputing", path.name, exc)
        return {}


def _write_cache(path: Path, cache: Mapping[str, np.ndarray]) -> None:
    ids = sorted(cache)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, case_ids=np.array(ids, dtype=str), logits=np.stack([cache[i] for i in ids]).astype(np.float32))

    atomic_write(path, write)


def teacher_logits(
    teacher: nn.Module,
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    *,
    cache_dir: str | Path | None = None,
    tag: str = "",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """The teacher's logits for every case (``case_key`` -> (K,) float32), each computed once.

    With ``cache_dir``, logits are read from and added to ``teacher-<hash>[-tag].npz`` there: the
    hash is ``model_fingerprint(teacher)``, so changed weights never reuse stale outputs; ``tag``
    names anything else that changes them (e.g. the preprocessing). ``transform`` is the
    deterministic preprocessing (no augmentation).
    """

    ids = [case_key(d) for d in data]
    if len(set(ids)) != len(ids):
        raise MedtlError("case ids are not unique, so teacher outputs cannot be keyed by case")
    path = _cache_path(cache_dir, model_fingerprint(teacher), tag) if cache_dir is not None else None
    cache = _read_cache(path) if path is not None else {}
    todo = [{**d, "_key": case_key(d)} for d in data if case_key(d) not in cache]
    if todo:
        teacher.to(device).eval()
        loader = DataLoader(Dataset(list(todo), transform), batch_size=batch_size)
        with torch.no_grad():
            for batch in track(loader, desc="teacher", unit="batch", disable=not progress, leave=False):
                out = teacher(batch["image"].to(device)).float().cpu().numpy()
                cache.update(zip(batch["_key"], out, strict=True))
        if path is not None:
            _write_cache(path, cache)
    logger.info("teacher logits: %d cases, %d computed, %d from cache", len(ids), len(todo), len(ids) - len(todo))
    return {i: np.asarray(cache[i], dtype=np.float32) for i in ids}


def pseudo_label(
    data: Sequence[Mapping[str, Any]],
    logits: Mapping[str, np.ndarray],
    *,
    threshold: float = 0.9,
    class_names: Sequence[str] | None = None,
    keep_uncertain: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Attach teacher logits to every case; give unlabeled ones (``label == -1``) a pseudo-label
    where the teacher's top probability reaches ``threshold``.

    Labeled cases keep their true label. Unlabeled cases below the threshold keep ``-1`` (soft term
    only) or, with ``keep_uncertain=False``, are dropped. Returns the new data list and a report of
    how many pseudo-labels were kept per class.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise MedtlError(f"threshold must be in (0, 1], got {threshold}")
    out, kept, uncertain = [], {}, 0
    for item in data:
        case = case_key(item)
        if case not in logits:
            raise MedtlError(
                f"no teacher output for case {case}", hint="compute teacher_logits over the same data list"
            )
        z = np.asarray(logits[case], dtype=np.float64)
        new = {**item, TEACHER_KEY: z.astype(np.float32), "pseudo_label": False}
        if int(item.get("label", UNLABELED)) == UNLABELED:
            p = np.exp(z - z.max())
            p /= p.sum()
            if p.max() >= threshold:
                new["label"], new["pseudo_label"] = int(p.argmax()), True
                kept[int(p.argmax())] = kept.get(int(p.argmax()), 0) + 1
            else:
                new["label"] = UNLABELED
                uncertain += 1
                if not keep_uncertain:
                    continue
        out.append(new)
    k = len(next(iter(logits.values()))) if logits else 0
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    report = {
        "threshold": float(threshold),
        "labeled": sum(1 for d in data if int(d.get("label", UNLABELED)) != UNLABELED),
        "unlabeled": sum(kept.values()) + uncertain,
        "pseudo_labels_kept": {names[c]: kept.get(c, 0) for c in range(len(names))},
        "below_threshold": uncertain,
        "below_threshold_use": "soft targets only" if keep_uncertain else "dropped",
    }
    logger.info(
        "pseudo-labels at p >= %.2f: %s kept, %d below threshold (%s)",
        threshold,
        report["pseudo_labels_kept"],
        uncertain,
        report["below_threshold_use"],
    )
    return out, report


def label_with_teacher(
    teacher: nn.Module,
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    *,
    threshold: float = 0.9,
    class_names: Sequence[str] | None = None,
    keep_uncertain: bool = True,
    **options: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``teacher_logits`` then ``pseudo_label``: a student-ready data list and the pseudo-label report
    (``options`` go to ``teacher_logits``: cache_dir, tag, batch_size, device, progress)."""
    logits = teacher_logits(teacher, data, transform, **options)
    return pseudo_label(data, logits, threshold=threshold, class_names=class_names, keep_uncertain=keep_uncertain)


__all__ = [
    "TEACHER_KEY",
    "case_key",
    "DistillBatch",
    "DistillationLoss",
    "distillation_loss",
    "label_with_teacher",
    "model_fingerprint",
    "pseudo_label",
    "teacher_logits",
]
