"""Pretrained weights into a bundle's network, and a teacher's labels for a student
(``load_source``, ``load_bundle_network``, ``teacher_labeled``)."""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from medtl.adapt.distill import label_with_teacher
from medtl.adapt.head import class_mapping
from medtl.bundle import confine
from medtl.bundle.audit import audit_bundle
from medtl.bundle.components.data import channel_names, required_path
from medtl.errors import MedtlError
from medtl.fileio import atomic_write_json
from medtl.networks import find_classifier
from medtl.weights import backbone_not_loaded, bundle_member, load_weights, match_keys, read_checkpoint

logger = logging.getLogger(__name__)


def source_class_names(source: str | Path) -> list[str] | None:
    """The class names a source bundle (folder or zip) declares in its metadata's ``channel_def``, in
    output order; None for weights that carry no names (a state dict, checkpoint or TorchScript file)."""
    path = Path(source)
    member = path / "configs" / "metadata.json"
    try:
        if path.is_dir():
            text = member.read_text(encoding="utf-8") if member.is_file() else None
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = bundle_member(archive.namelist(), "configs/metadata.json")
                text = archive.read(member).decode("utf-8") if member is not None else None
        else:
            text = None
        meta = json.loads(text) if text is not None else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, zipfile.BadZipFile) as exc:
        raise MedtlError(f"cannot read the source bundle's metadata: {exc}", path=path.name) from None
    channel_def = meta
    for key in ("network_data_format", "outputs", "pred", "channel_def"):
        channel_def = channel_def.get(key) if isinstance(channel_def, Mapping) else None
    return channel_names(channel_def) if isinstance(channel_def, Mapping) and channel_def else None


def _remap_head(
    network: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    mapping: Mapping[str, str | None],
    source_names: Sequence[str],
    label: str,
) -> dict[str, torch.Tensor]:
    """The checkpoint with its classifier rows rearranged into the target's class order: row k is the
    source row of the class target k maps to, or the network's own fresh row for a new class."""
    head, layer = find_classifier(network)
    if layer.out_features != len(mapping):
        raise MedtlError(f"the network has {layer.out_features} outputs for {len(mapping)} target classes", path=label)
    by_model_name = {model: ckpt for ckpt, model in match_keys(state, network.state_dict()).items()}
    weight, bias = by_model_name.get(f"{head}.weight"), by_model_name.get(f"{head}.bias")
    if weight is None or state[weight].shape[1:] != layer.weight.shape[1:]:
        return dict(state)  # no head of this shape in the checkpoint: load_weights reports what is left
    if state[weight].shape[0] != len(source_names):
        raise MedtlError(
            f"the source's metadata names {len(source_names)} classes but its head has "
            f"{state[weight].shape[0]} outputs",
            path=label,
            hint="the bundle's channel_def and its weights disagree: ask its sender",
        )
    rows = {name: i for i, name in enumerate(source_names)}
    new_weight = layer.weight.detach().clone()
    new_bias = layer.bias.detach().clone() if layer.bias is not None else None
    for k, target in enumerate(mapping):
        if mapping[target] is not None:
            new_weight[k] = state[weight][rows[mapping[target]]]
            if new_bias is not None and bias is not None:
                new_bias[k] = state[bias][rows[mapping[target]]]
    remapped = dict(state)
    remapped[weight] = new_weight
    if bias is not None and new_bias is not None:
        remapped[bias] = new_bias
    return remapped


def load_source(
    network: torch.nn.Module,
    source: str | Path,
    *,
    trust: bool = False,
    allow_new_head: bool = True,
    target_classes: Sequence[str] | None = None,
    class_map: Mapping[str, str] | str | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Load pretrained weights (bundle folder/zip, state dict, checkpoint, TorchScript) into ``network``.

    With ``target_classes``, a source bundle's classes are matched to them by name
    (``medtl.adapt.head.class_mapping``; ``class_map`` ``{target: source}`` for names that differ,
    ``"new"`` for a new head): its classifier rows are taken in the target's order, so a source that
    lists the same classes in another order keeps their meaning, and an ambiguous correspondence is
    refused. The mapping is returned as ``class_mapping`` (None: the source names no classes, and its
    outputs are taken in the target's order). Without names, a head for another class count is
    reported as mismatched and starts fresh (``allow_new_head``). Any other tensor left unloaded means
    the source is another network, which is an error rather than a silent partly random start.
    ``state``: the tensors of ``source`` when the caller has read them already.
    """
    path = required_path(source, "source", "../tumor_cls_source")
    state = dict(state) if state is not None else read_checkpoint(path, trust=trust)
    mapping = None
    if target_classes is not None:
        source_names = source_class_names(path)
        if source_names is None and class_map not in (None, "", {}):
            raise MedtlError(
                "a class map was given but the source names no classes (only a bundle's metadata does)",
                path=path.name,
                hint="drop --class-map: the source's outputs are taken in the target's class order",
            )
        if source_names is not None:
            wanted = list(target_classes)
            mapping = (
                {t: None for t in wanted}
                if class_map == "new"
                else class_mapping(wanted, source_names, class_map or None)
            )
            state = _remap_head(network, state, mapping, source_names, path.name)
    report = load_weights(network, state)
    report.source = path.name  # logs name the file, not where it lives
    logger.info("%s", report.summary())
    left_out = (
        backbone_not_loaded(network, report)
        if allow_new_head
        else [*report.missing, *(m.name for m in report.mismatched)]
    )
    if left_out:
        raise MedtlError(
            f"the source weights do not fit this network: {report.summary()}",
            path=path.name,
            hint="the bundle's network_def must be the source's architecture (same depth and width)",
        )
    return report.to_dict() | {"class_mapping": mapping}


def load_bundle_network(
    bundle: str | Path, *, device: str | torch.device = "cpu", trust: bool = False
) -> torch.nn.Module:
    """A bundle's network with its weights, in eval mode: ``network_def`` from its inference config
    with ``models/model.pt`` (loaded weights-only), after the audit a received bundle gets
    (``medtl.bundle.audit``); ``trust`` builds it anyway. Its TorchScript copy is never run."""
    root = required_path(bundle, "teacher", "../tumor_cls_finetune")
    if not (root / "configs" / "metadata.json").is_file():
        raise MedtlError("not a MONAI bundle folder (no configs/metadata.json)", path=root.name)
    findings = audit_bundle(root)
    if findings and not trust:
        raise MedtlError(
            f"refusing to build its network: {len(findings)} config value(s) outside the allow-list: {findings[0]}",
            path=root.name,
            hint="review them with `medtl bundle verify`; trust it only if you know its sender",
        )
    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser.read_meta(root / "configs" / "metadata.json")
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    load_source(network, root, allow_new_head=False)
    return network.to(device).eval()


def teacher_labeled(
    teacher: torch.nn.Module,
    data: Sequence[Mapping[str, Any]],
    transform: Any,
    *,
    class_names: Sequence[str],
    threshold: float = 0.9,
    keep_uncertain: bool = True,
    cache_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """The student's training data: each case with the teacher's logits and, for unlabeled cases
    the teacher is sure of, a pseudo-label. Writes the pseudo-label counts to
    ``output_dir/pseudo_labels.json`` (how many were kept per class)."""

    labeled, report = label_with_teacher(
        teacher,
        data,
        transform,
        threshold=threshold,
        class_names=class_names,
        keep_uncertain=keep_uncertain,
        cache_dir=cache_dir,
        device=device,
        progress=True,
    )
    if output_dir is not None:
        atomic_write_json(confine.check(output_dir, write=True, what="teacher_labeled") / "pseudo_labels.json", report)
    return labeled
