"""Head swap for a new label space, and AdaBN changing only BatchNorm running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtl.adapt.adabn import adabn
from medtl.adapt.head import replace_head, with_new_head
from medtl.errors import MedtlError
from medtl.networks import create_network, find_classifier


@pytest.mark.parametrize(
    ("arch", "head", "features"),
    [("resnet10", "fc", 128), ("densenet121", "class_layers.out", 1024), ("efficientnet-b0", "_fc", 1280)],
)
def test_replace_head_for_monai_networks(arch, head, features):
    kwargs = {"widen_factor": 0.25} if arch == "resnet10" else {}
    model = create_network(arch, num_classes=5, **kwargs)
    record = replace_head(model, 2)
    assert record["module"] == head and record["in_features"] == features and record["source_outputs"] == 5
    model.eval()
    assert model(torch.randn(2, 1, 32, 32, 32)).shape == (2, 2)


def test_generic_module_last_linear_and_hidden_dropout():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    assert find_classifier(model)[0] == "3"
    record = with_new_head(model, 3, hidden=5, dropout=0.2).medtl_head
    assert record["hidden"] == 5
    new = model[3]
    assert isinstance(new, nn.Sequential) and [type(m) for m in new] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    assert model(torch.randn(2, 2, 4)).shape == (2, 3)
    with pytest.raises(MedtlError, match="no nn.Linear"):
        find_classifier(nn.Conv3d(1, 1, 1))


def test_shared_class_names_keep_their_source_weights():
    model = nn.Sequential(nn.Linear(4, 3))
    old_w, old_b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    record = replace_head(
        model, 2, source_classes=["benign", "malignant", "metastasis"], target_classes=["malignant", "cyst"]
    )
    assert record["label_mapping"] == {"malignant": "malignant", "cyst": None}
    assert torch.equal(model[0].weight[0], old_w[1]) and model[0].bias[0] == old_b[1]
    assert not torch.equal(model[0].weight[1], old_w[0])
    with pytest.raises(MedtlError, match="source class names"):
        replace_head(nn.Sequential(nn.Linear(4, 3)), 2, source_classes=["a", "b"], target_classes=["a", "b"])


def test_new_head_follows_the_class_mapping_rule():
    """The same rule as loading a source bundle (``class_mapping``): a class map for names that
    differ, and same-size label spaces with no shared name refused rather than guessed."""
    model = nn.Sequential(nn.Linear(4, 2))
    old_w = model[0].weight.detach().clone()
    record = replace_head(
        model,
        2,
        source_classes=["benign", "malignant"],
        target_classes=["high", "low"],
        class_map={"high": "malignant"},
    )
    assert record["label_mapping"] == {"high": "malignant", "low": None}
    assert torch.equal(model[0].weight[0], old_w[1])
    with pytest.raises(MedtlError, match="no name in common"):
        replace_head(nn.Sequential(nn.Linear(4, 2)), 2, source_classes=["0", "1"], target_classes=["a", "b"])
    with pytest.raises(MedtlError, match="at least 2"):
        replace_head(nn.Sequential(nn.Linear(4, 3)), 1)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm3d(2),
        nn.Conv3d(2, 4, 3),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_adabn_changes_only_batchnorm_running_stats():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = [torch.randn(4, 2, 6, 6, 6) * 3 + torch.tensor([5.0, -2.0]).view(1, 2, 1, 1, 1) for _ in range(3)]
    stats = adabn(model, [{"image": x} for x in target])
    assert stats == {"bn_layers": 2, "batches": 3, "images": 12}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.{b}" for i in (0, 2) for b in ("running_mean", "running_var", "num_batches_tracked")}
    # the first layer sees the raw input: its statistics are the target data's per-channel moments
    # (cumulative average over equal-sized batches, unbiased variance per batch)
    all_x = torch.cat(target)
    torch.testing.assert_close(model[0].running_mean, all_x.mean(dim=(0, 2, 3, 4)), rtol=1e-4, atol=1e-4)
    expected_var = torch.stack([x.var(dim=(0, 2, 3, 4), unbiased=True) for x in target]).mean(0)
    torch.testing.assert_close(model[0].running_var, expected_var, rtol=1e-4, atol=1e-4)
    assert model[0].momentum == 0.1 and not model.training


def test_adabn_failure_leaves_source_statistics():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken():
        yield torch.randn(2, 2, 6, 6, 6)
        raise OSError("disk went away")

    with pytest.raises(OSError):
        adabn(model, broken())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(MedtlError, match="empty"):
        adabn(model, [])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(MedtlError, match="no BatchNorm"):
        adabn(nn.Linear(2, 2), [torch.randn(1, 2)])
