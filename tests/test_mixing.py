"""Mixed-domain sampling: domain frequencies follow the weights, seeded order, clear refusals."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from monai.bundle import ConfigParser
from torch.utils.data import WeightedRandomSampler

from medtl.adapt.mixing import DomainSampler, domain_weights, mix_datalists
from medtl.errors import MedtlError


def _items(n_source: int = 300, n_target: int = 30) -> list[dict]:
    return [{"case_id": f"a{i}", "site": "A"} for i in range(n_source)] + [{"case_id": f"b{i}", "site": "B"} for i in range(n_target)]


def test_weights_per_item_and_domain_frequencies():
    items = _items()
    w = domain_weights(items, {"A": 1.0, "B": 1.0})
    assert w[0] == pytest.approx(0.5 / 300) and w[-1] == pytest.approx(0.5 / 30) and sum(w) == pytest.approx(1.0)
    for weights, expected_b in (({"A": 0.5, "B": 0.5}, 0.5), ({"A": 0.8, "B": 0.2}, 0.2), ({"A": 0.0, "B": 3.0}, 1.0)):
        sampler = DomainSampler(items, weights, num_samples=20000, seed=0)
        assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == 20000
        drawn = Counter(items[i]["site"] for i in sampler)
        assert drawn["B"] / 20000 == pytest.approx(expected_b, abs=0.015), weights
    # without a weighted sampler the small site would be drawn 30/330 = 9 % of the time
    assert len(DomainSampler(items, {"A": 1, "B": 1})) == len(items)


def test_same_seed_same_order():
    items = _items()
    first = list(DomainSampler(items, {"A": 0.5, "B": 0.5}, seed=7))
    assert list(DomainSampler(items, {"A": 0.5, "B": 0.5}, seed=7)) == first
    assert list(DomainSampler(items, {"A": 0.5, "B": 0.5}, seed=8)) != first


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"A": -0.5, "B": 1.0}, "weight of domain 'A' must be a finite number >= 0, got -0.5"),
        ({"A": float("nan"), "B": 1.0}, "weight of domain 'A'"),
        ({"A": "half", "B": 1.0}, "got 'half'"),
        ({"A": 0.0, "B": 0.0}, "all domain weights are 0"),
        ({}, "no domain weights"),
        ({"A": 1.0}, "domain\\(s\\) B occur in the data .* but have no weight"),
        ({"A": 1.0, "B": 1.0, "C": 1.0}, "domain\\(s\\) C have a weight but no items"),
    ],
)
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(MedtlError, match=message):
        DomainSampler(_items(), weights)


def test_items_without_domain_and_bad_num_samples():
    with pytest.raises(MedtlError, match="1 item\\(s\\) have no 'site' entry \\(first: item 2\\)"):
        domain_weights([{"site": "A"}, {"site": "B"}, {"case_id": "x"}], {"A": 1, "B": 1})
    with pytest.raises(MedtlError, match="num_samples"):
        DomainSampler(_items(), {"A": 1, "B": 1}, num_samples=0)


def test_mix_datalists_tags_copies_and_bundle_builds_loader():
    source, target = _items(6, 0), _items(0, 2)
    mixed = mix_datalists({"source": source, "target": target})
    assert [m["domain"] for m in mixed] == ["source"] * 6 + ["target"] * 2
    assert mixed[0]["site"] == "A" and "domain" not in source[0]  # originals untouched
    config = {
        "data": [{**m, "image": torch.full((1, 2), float(i))} for i, m in enumerate(mixed)],
        "sampler": {"_target_": "medtl.adapt.mixing.DomainSampler", "datalist": "@data", "weights": {"source": 0.5, "target": 0.5},
                    "key": "domain", "num_samples": 400, "seed": 0},
        "loader": {"_target_": "monai.data.DataLoader", "dataset": "$monai.data.Dataset(@data)", "sampler": "@sampler", "batch_size": 50},
    }
    loader = ConfigParser(config).get_parsed_content("loader")
    domains = Counter(d for batch in loader for d in batch["domain"])
    assert sum(domains.values()) == 400 and domains["target"] / 400 == pytest.approx(0.5, abs=0.08)
    with pytest.raises(MedtlError, match="no datalists"):
        mix_datalists({})
