"""Swap a network's classifier for the target label space, keeping what carries over.

The new head maps the backbone's feature dimension D to K target classes, optionally through
dropout and a hidden layer. Target classes whose names also exist in the source label space start
from the source head's weights for that class (a bare linear head only), so a site that keeps
"malignant" does not relearn it from scratch; the mapping is returned and stored on the model
(``model.medtl_head``) so bundles and reports can state it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medtl.errors import MedtlError
from medtl.networks import find_classifier


def class_mapping(
    target: Sequence[str], source: Sequence[str], class_map: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """Which source class each target class starts from (None: a new output), matched by name.

    Names shared by both label spaces map to each other in whatever order each lists them;
    ``class_map`` (``{target: source}``) maps the rest or overrides. Refused as ambiguous: label
    spaces of one size with no name in common (``0/1`` against ``benign/malignant`` could be either
    order), unless ``class_map`` says how they correspond; a ``class_map`` naming unknown classes or
    mapping two targets to one source. Disjoint label spaces of different sizes are a new task: every
    output starts new.

    Examples:
        >>> class_mapping(["malignant", "benign"], ["benign", "malignant"])
        {'malignant': 'malignant', 'benign': 'benign'}
        >>> class_mapping(["low", "high"], ["benign", "malignant"], {"low": "benign", "high": "malignant"})
        {'low': 'benign', 'high': 'malignant'}
    """
    class_map = dict(class_map or {})
    unknown = [t for t in class_map if t not in target] + [s for s in class_map.values() if s not in source]
    if unknown:
        raise MedtlError(
            f"the class map names classes that do not exist: {', '.join(map(repr, unknown))}",
            hint=f"target classes: {', '.join(target)}; source classes: {', '.join(source)}",
        )
    mapping = {t: class_map.get(t, t if t in source else None) for t in target}
    taken = [s for s in mapping.values() if s is not None]
    if len(taken) != len(set(taken)):
        raise MedtlError(
            f"two target classes map to one source class: {mapping}", hint="map each source class at most once"
        )
    if not class_map and not taken and len(target) == len(source):
        raise MedtlError(
            f"cannot tell how the target classes ({', '.join(target)}) correspond to the source's "
            f"({', '.join(source)}): same count, no name in common",
            hint=f"give the mapping, e.g. --class-map {target[0]}={source[0]},{target[1]}={source[1]}, "
            "or --class-map new to train a new head",
        )
    return mapping


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def replace_head(
    model: nn.Module,
    num_classes: int,
    *,
    target_classes: Sequence[str] | None = None,
    source_classes: Sequence[str] | None = None,
    class_map: Mapping[str, str] | None = None,
    dropout: float = 0.0,
    hidden: int | None = None,
) -> dict[str, Any]:
    """Replace the classifier in place with a head for ``num_classes`` classes; return its record.

    Args:
        num_classes: K, the number of target classes.
        target_classes: names of the K target classes (index order), for the recorded mapping.
        source_classes: names of the source head's classes; each target class that ``class_mapping``
            matches to one starts from its weights.
        class_map: ``{target: source}`` for names that differ (``class_mapping``).
        dropout: dropout probability before the (first) new linear layer.
        hidden: width of an optional hidden layer (Linear -> ReLU) before the output layer.
    """
    if int(num_classes) < 2:
        raise MedtlError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.0 <= float(dropout) < 1.0:
        raise MedtlError(f"dropout must be in [0, 1), got {dropout}")
    if target_classes is not None and len(target_classes) != num_classes:
        raise MedtlError(f"{len(target_classes)} target class names given for num_classes={num_classes}")
    name, old = find_classifier(model)
    if source_classes is not None and len(source_classes) != old.out_features:
        raise MedtlError(
            f"{len(source_classes)} source class names given, but the source head has {old.out_features} outputs"
        )
    out = nn.Linear(old.in_features if hidden is None else int(hidden), int(num_classes))
    layers: list[nn.Module] = [nn.Dropout(float(dropout))] if dropout else []
    if hidden is not None:
        layers += [nn.Linear(old.in_features, int(hidden)), nn.ReLU(inplace=True)]
    layers.append(out)
    mapping: dict[str, str | None] = {}
    if target_classes is not None:
        mapping = (
            class_mapping(target_classes, source_classes, class_map)
            if source_classes is not None
            else dict.fromkeys(target_classes)
        )
        source_index = {c: i for i, c in enumerate(source_classes or [])}
        for k, cls in enumerate(target_classes):
            if mapping[cls] is not None and hidden is None:
                with torch.no_grad():
                    out.weight[k] = old.weight[source_index[mapping[cls]]]
                    out.bias[k] = old.bias[source_index[mapping[cls]]] if old.bias is not None else 0.0
    head = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    _set_module(model, name, head.to(old.weight.device, old.weight.dtype))
    record = {
        "module": name,
        "in_features": old.in_features,
        "source_outputs": old.out_features,
        "num_classes": int(num_classes),
        "hidden": hidden,
        "dropout": float(dropout),
        "label_mapping": mapping,  # target class -> source class it started from (None: new)
    }
    model.medtl_head = record
    return record


def with_new_head(model: nn.Module, num_classes: int, **options: Any) -> nn.Module:
    """``replace_head`` returning the model, for bundle configs::

    "network": {"_target_": "medtl.adapt.head.with_new_head", "model": "@network_def", "num_classes": 2}
    """
    replace_head(model, num_classes, **options)
    return model
