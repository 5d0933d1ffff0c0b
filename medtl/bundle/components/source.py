"""Pretrained weights into a bundle's network, and a teacher's labels for a student
(``load_source``, ``load_bundle_network``, ``teacher_labeled``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from medtl.adapt.distill import label_with_teacher
from medtl.bundle.audit import audit_bundle
from medtl.bundle.components.data import required_path
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json
from medtl.weights import backbone_not_loaded, load_weights

logger = logging.getLogger(__name__)


def load_source(network: torch.nn.Module, source: str | Path, *, trust: bool = False, allow_new_head: bool = True) -> dict[str, list[str]]:
    """Load pretrained weights (bundle folder/zip, state dict, checkpoint, TorchScript) into ``network``.

    A head for another class count is reported as mismatched and starts fresh: that is the head
    swap (``allow_new_head``). Any other tensor left unloaded means the source is another network,
    which is an error rather than a silent partly random start.
    """

    report = load_weights(network, required_path(source, "source", "../tumor_cls_source"), trust=trust)
    report.source = Path(source).name  # logs name the file, not where it lives
    logger.info("%s", report.summary())
    left_out = backbone_not_loaded(network, report) if allow_new_head else [*report.missing, *(m.name for m in report.mismatched)]
    if left_out:
        raise MedtlError(f"the source weights do not fit this network: {report.summary()}", path=Path(source).name,
                         hint="the bundle's network_def must be the source's architecture (same depth and width)")
    return report.to_dict()


def load_bundle_network(bundle: str | Path, *, device: str | torch.device = "cpu", trust: bool = False) -> torch.nn.Module:
    """A bundle's network with its weights, in eval mode: ``network_def`` from its inference config
    with ``models/model.pt`` (loaded weights-only), after the audit a received bundle gets
    (``medtl.bundle.audit``); ``trust`` builds it anyway. Its TorchScript copy is never run."""


    root = required_path(bundle, "teacher", "../tumor_cls_finetune")
    if not (root / "configs" / "metadata.json").is_file():
        raise MedtlError("not a MONAI bundle folder (no configs/metadata.json)", path=root.name)
    findings = audit_bundle(root)
    if findings and not trust:
        raise MedtlError(f"refusing to build its network: {len(findings)} config value(s) outside the allow-list: {findings[0]}",
                         path=root.name, hint="review them with `medtl bundle verify`; trust it only if you know its sender")
    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser.read_meta(root / "configs" / "metadata.json")
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    load_source(network, root, allow_new_head=False)
    return network.to(device).eval()


def teacher_labeled(teacher: torch.nn.Module, data: Sequence[Mapping[str, Any]], transform: Any, *, class_names: Sequence[str],
                    threshold: float = 0.9, keep_uncertain: bool = True, cache_dir: str | Path | None = None,
                    output_dir: str | Path | None = None, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """The student's training data: each case with the teacher's logits and, for unlabeled cases
    the teacher is sure of, a pseudo-label. Writes the pseudo-label counts to
    ``output_dir/pseudo_labels.json`` (how many were kept per class)."""

    labeled, report = label_with_teacher(teacher, data, transform, threshold=threshold, class_names=class_names,
                                         keep_uncertain=keep_uncertain, cache_dir=cache_dir, device=device, progress=True)
    if output_dir is not None:
        atomic_write_json(Path(output_dir) / "pseudo_labels.json", report)
    return labeled
