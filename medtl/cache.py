"""Preprocess once, augment every epoch: datasets that cache the deterministic part of a pipeline.

MONAI's ``CacheDataset`` (memory) and ``PersistentDataset`` (disk) apply the transforms before the
first random one once and keep the result. A disk cache must never serve a result computed with
other settings or from other files, and MONAI keys it by the data dict and the transforms' class
names only, so a changed CT window or crop size would reuse stale tensors. Here the cache folder is
named by a fingerprint of the deterministic transforms' settings, and each item's key includes the
sha256 of its files recorded in the manifest (``files_sha256``).
"""

from __future__ import annotations

import hashlib
import json
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, RandomizableTrait, Transform

from medtl.bundle import confine
from medtl.errors import MedtlError

CACHES = ("memory", "disk", "none")
_MAX_DEPTH = 6


def _describe(value: Any, depth: int, seen: set[int]) -> Any:
    """A JSON-able description of a transform's settings (class names, numbers, strings, nested
    transforms), without random generators or memory addresses, so equal settings give equal text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        return (
            array.tolist()
            if array.size <= 64
            else {"shape": list(array.shape), "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
        )
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_describe(v, depth + 1, seen) for v in items]
    if isinstance(value, dict):
        return {str(k): _describe(v, depth + 1, seen) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, torch.device):  # the device a cached tensor lives on
        return str(value)
    if isinstance(value, np.random.RandomState):
        return "RandomState"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if depth > _MAX_DEPTH or id(value) in seen or not hasattr(value, "__dict__"):
        return name
    seen = seen | {id(value)}
    state = {k: _describe(v, depth + 1, seen) for k, v in sorted(vars(value).items()) if k not in ("R", "_rand_state")}
    return {"class": name, "settings": state}


def deterministic_prefix(transform: Callable | None) -> list[Any]:
    """The transforms a cache may store the output of: those before the first random one."""
    if transform is None:
        return []
    flat = transform.flatten().transforms if isinstance(transform, Compose) else (transform,)
    prefix = []
    for t in flat:
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform):
            break
        prefix.append(t)
    return prefix


def transform_fingerprint(transform: Callable | None) -> str:
    """sha256 (hex) of the settings of ``transform``'s cacheable part."""
    text = json.dumps(_describe(deterministic_prefix(transform), 0, set()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def item_key(item: Any) -> bytes:
    """Cache key of one data dict: its entries, file checksums included when the manifest gave them."""
    return pickle_hashing(item)


def cached_dataset(
    data: Sequence[dict[str, Any]],
    transform: Callable | None,
    *,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    num_workers: int | None = 0,
) -> Dataset:
    """``data`` through ``transform`` with its deterministic part cached in ``"memory"``, on
    ``"disk"`` under ``cache_dir/<fingerprint>/`` (reused by later runs with the same settings and
    files), or not at all (``"none"``)."""
    if cache not in CACHES:
        raise MedtlError(f"unknown cache {cache!r}; allowed: {', '.join(CACHES)}")
    if cache == "memory":
        return CacheDataset(list(data), transform, progress=progress, num_workers=num_workers)
    if cache == "disk":
        if cache_dir in (None, ""):
            raise MedtlError("a disk cache needs cache_dir", hint="e.g. cache_dir=<bundle>/cache")
        folder = confine.check(cache_dir, write=True, what="cache_dir") / transform_fingerprint(transform)[:16]
        return PersistentDataset(list(data), transform, cache_dir=folder, hash_func=item_key)
    return Dataset(list(data), transform)


__all__ = ["CACHES", "cached_dataset", "deterministic_prefix", "item_key", "transform_fingerprint"]
