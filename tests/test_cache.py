"""Caching: preprocessing runs once per case, the disk cache survives runs, and never serves stale data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, MapTransform, RandFlipd

from medtl.cache import cached_dataset, transform_fingerprint
from medtl.errors import MedtlError
from medtl.transforms import preprocessing


class CountingLoad(MapTransform):
    """Stands in for loading and preprocessing: counts its calls; ``scale`` is a setting."""

    calls = 0

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(keys="image")
        self.scale = scale

    def __call__(self, data):
        CountingLoad.calls += 1
        d = dict(data)
        d["image"] = torch.full((1, 4, 4, 4), float(d["value"]) * self.scale)
        return d


def _pipeline(scale: float = 1.0) -> Compose:
    return Compose([CountingLoad(scale), RandFlipd(keys="image", prob=0.5, spatial_axis=0)])


def _epochs(dataset, n: int = 2) -> list[float]:
    sums = []
    for _ in range(n):
        for batch in DataLoader(dataset, batch_size=4, shuffle=True):
            sums.append(float(batch["image"].sum()))
    return sums


DATA = [{"value": i, "case_id": f"c{i}", "files_sha256": f"{i:064x}"} for i in range(6)]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_preprocessing_runs_once_per_case_and_augmentation_every_epoch(cache, tmp_path):
    CountingLoad.calls = 0
    dataset = cached_dataset(DATA, _pipeline(), cache=cache, cache_dir=tmp_path, progress=False)
    _epochs(dataset, 3)
    assert CountingLoad.calls == len(DATA)  # the second and third epochs read the cache
    CountingLoad.calls = 0
    _epochs(cached_dataset(DATA, _pipeline(), cache="none"), 2)
    assert CountingLoad.calls == 2 * len(DATA)


def test_disk_cache_is_reused_by_later_runs_and_never_stale(tmp_path):
    CountingLoad.calls = 0
    _epochs(cached_dataset(DATA, _pipeline(), cache="disk", cache_dir=tmp_path), 1)
    assert CountingLoad.calls == len(DATA)
    _epochs(
        cached_dataset(DATA, _pipeline(), cache="disk", cache_dir=tmp_path), 2
    )  # a new run, same settings and files
    assert CountingLoad.calls == len(DATA)

    changed = cached_dataset(DATA, _pipeline(scale=2.0), cache="disk", cache_dir=tmp_path)  # another preset
    assert abs(sum(_epochs(changed, 1)) - 2 * 64 * sum(d["value"] for d in DATA)) < 1e-3
    assert CountingLoad.calls == 2 * len(DATA)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # one folder per fingerprint

    edited = [
        dict(d, files_sha256=f"{d['value'] + 100:064x}") if d["value"] == 0 else d for d in DATA
    ]  # a file changed
    _epochs(cached_dataset(edited, _pipeline(), cache="disk", cache_dir=tmp_path), 1)
    assert CountingLoad.calls == 2 * len(DATA) + 1


def test_fingerprint_follows_settings_not_object_identity():
    assert transform_fingerprint(preprocessing(modality="ct")) == transform_fingerprint(preprocessing(modality="ct"))
    assert transform_fingerprint(preprocessing(modality="ct")) != transform_fingerprint(
        preprocessing(modality="ct", ct_window=(-1200, 600))
    )
    assert transform_fingerprint(preprocessing(modality="ct")) != transform_fingerprint(
        preprocessing(modality="ct", crop_mm=(40, 40, 40))
    )
    assert transform_fingerprint(_pipeline(1.0)) != transform_fingerprint(_pipeline(2.0))
    with pytest.raises(MedtlError, match="unknown cache"):
        cached_dataset(DATA, _pipeline(), cache="ssd")
    with pytest.raises(MedtlError, match="needs cache_dir"):
        cached_dataset(DATA, _pipeline(), cache="disk")


def test_manifest_items_carry_their_files_checksum(small_demo):
    from medtl.manifest import datalist, load_manifest

    items = datalist(load_manifest(small_demo["sites"]["A"]["manifest"]), small_demo["out"], ["train", "val"])
    keys = [i["files_sha256"] for i in items]
    assert all(len(k) == 64 for k in keys) and len(set(keys)) == len(keys)
    assert np.all([isinstance(i["image"], list) for i in items])
