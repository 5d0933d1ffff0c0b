"""Mixed source + target training: draw each domain with a chosen probability, whatever its size.

Fine-tuning on the union of a large source set and a small target set lets the source dominate
every batch; plain oversampling of the target by hand is easy to get wrong. ``DomainSampler`` gives
each item the weight ``p(domain) / n(domain)``, so a domain is drawn with probability ``p`` however
many items it has. It is a ``torch.utils.data.WeightedRandomSampler``, built by name in a bundle::

    "train_data": {"_target_": "medtl.adapt.mixing.mix_datalists",
                   "lists": {"source": "@source_datalist", "target": "@target_datalist"}},
    "sampler": {"_target_": "medtl.adapt.mixing.DomainSampler", "datalist": "@train_data",
                "weights": {"source": 0.5, "target": 0.5}, "key": "domain", "seed": 0},
    "train_loader": {"_target_": "monai.data.DataLoader", "dataset": "@train_dataset",
                     "sampler": "@sampler", "batch_size": 8}

Manifest datalists already carry their ``site``, so weighting sites needs no tagging (the default
``key="site"``); ``mix_datalists`` tags items when domains are not sites (e.g. several source sites
against one target).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import WeightedRandomSampler

from medtl.errors import MedtlError

__all__ = ["DomainSampler", "domain_weights", "mix_datalists"]


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    if not weights:
        raise MedtlError("no domain weights given", hint='e.g. {"source": 0.5, "target": 0.5}')
    checked = {}
    for domain, weight in weights.items():
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise MedtlError(f"weight of domain {domain!r} must be a finite number >= 0, got {weight!r}")
        checked[str(domain)] = value
    if sum(checked.values()) <= 0:
        raise MedtlError(f"all domain weights are 0 ({checked}): nothing could be drawn", hint="give at least one domain a positive weight")
    return checked


def domain_weights(datalist: Sequence[Mapping[str, Any]], weights: Mapping[str, float], *, key: str = "site") -> list[float]:
    """Per-item sampling weights (summing to 1) that draw each domain with probability proportional to ``weights``.

    An item of domain ``d`` gets ``weights[d] / sum(weights) / n(d)``. Every domain in the data needs a
    weight (0 leaves it out) and every weighted domain needs items: a typo in a site name must not
    silently change the mixture.

    Examples:
        300 source cases and 30 target cases, drawn half and half:

        >>> items = [{"site": "A"}] * 300 + [{"site": "B"}] * 30
        >>> w = domain_weights(items, {"A": 0.5, "B": 0.5})
        >>> round(sum(w[:300]), 6), round(sum(w[300:]), 6)
        (0.5, 0.5)
    """
    checked = _check_weights(weights)
    missing_key = [i for i, item in enumerate(datalist) if key not in item]
    if missing_key:
        raise MedtlError(
            f"{len(missing_key)} item(s) have no {key!r} entry (first: item {missing_key[0]})",
            hint="tag each list with its domain using mix_datalists, or choose the key that names the domain",
        )
    counts = Counter(str(item[key]) for item in datalist)
    unweighted = sorted(set(counts) - set(checked))
    if unweighted:
        raise MedtlError(
            f"domain(s) {', '.join(unweighted)} occur in the data (by {key!r}) but have no weight; weighted: {', '.join(checked)}",
            hint="give every domain a weight (0 to leave it out)",
        )
    empty = sorted(set(checked) - set(counts))
    if empty:
        raise MedtlError(
            f"domain(s) {', '.join(empty)} have a weight but no items (by {key!r}); the data holds: {', '.join(sorted(counts)) or 'nothing'}",
            hint="check the domain names against the datalist",
        )
    total = sum(checked.values())
    return [checked[str(item[key])] / total / counts[str(item[key])] for item in datalist]


class DomainSampler(WeightedRandomSampler):
    """Draw dataset indices so each domain appears with a chosen probability (with replacement).

    Args:
        datalist: the data dicts the dataset was built from, in the same order.
        weights: ``{domain: weight}``; probabilities are the weights divided by their sum.
        num_samples: draws per epoch (default: the datalist's length).
        seed: seeds a private ``torch.Generator``, so the same seed gives the same order; None
            draws from torch's global generator.
        key: the item entry naming the domain.

    Examples:
        Half source, half target, although the target has a tenth of the cases::

            sampler = DomainSampler(source_items + target_items, {"A": 0.5, "B": 0.5}, seed=0)
            loader = monai.data.DataLoader(dataset, sampler=sampler, batch_size=8)
    """

    def __init__(
        self,
        datalist: Sequence[Mapping[str, Any]],
        weights: Mapping[str, float],
        *,
        num_samples: int | None = None,
        seed: int | None = None,
        key: str = "site",
    ):
        item_weights = domain_weights(datalist, weights, key=key)
        num_samples = len(item_weights) if num_samples is None else num_samples
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise MedtlError(f"num_samples must be a positive integer, got {num_samples!r}")
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        super().__init__(item_weights, num_samples, replacement=True, generator=generator)


def mix_datalists(lists: Mapping[str, Sequence[Mapping[str, Any]]], *, key: str = "domain") -> list[dict[str, Any]]:
    """Concatenate named datalists, each item copied and tagged ``item[key] = name``.

    The default key ``"domain"`` leaves each item's ``site`` as it was, so reports stay per site.
    """
    if not lists:
        raise MedtlError("no datalists given to mix", hint='e.g. {"source": source_items, "target": target_items}')
    return [{**item, key: str(name)} for name, items in lists.items() for item in items]
