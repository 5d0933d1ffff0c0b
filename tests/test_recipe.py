"""The adaptation recipe end to end on tiny volumes: source training, fine-tuning, distillation."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import resnet10
from monai.utils import set_determinism

from medtl.adapt.recipe import distill, finetune, loader, preprocess, recipe_outcome, train
from medtl.errors import MedtlError
from medtl.evaluate import collect_predictions
from medtl.recipes import DistillRecipe, FineTuneRecipe, TrainRecipe


def _items(n: int, seed: int, *, labeled: bool = True, shift: float = 0.0) -> list[dict]:
    """Bright blob = class 1, dark = class 0, plus noise; ``shift`` moves the intensities (another site)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = i % 2
        image = torch.rand(1, 12, 12, 12, generator=g) * 0.5 + shift
        image[:, 4:8, 4:8, 4:8] += 0.8 * label
        out.append(
            {"case_id": f"{seed}-{i}", "patient": f"p{seed}-{i}", "image": image, "label": label if labeled else -1}
        )
    return out


def _net(widen: float = 0.125, classes: int = 2) -> torch.nn.Module:
    return resnet10(spatial_dims=3, n_input_channels=1, num_classes=classes, widen_factor=widen)


def test_preprocess_runs_the_transform_once_per_case():
    calls = []
    items = preprocess([{"x": 1}, {"x": 2}], lambda d: calls.append(d["x"]) or {**d, "y": d["x"] * 2}, progress=False)
    assert calls == [1, 2] and items == [{"x": 1, "y": 2}, {"x": 2, "y": 4}]


def test_source_then_finetune_then_distill(tmp_path):
    set_determinism(0)
    source_train, source_val = _items(24, 0), _items(12, 1)
    target_train, target_val = _items(8, 2, shift=0.3), _items(8, 3, shift=0.3)
    unlabeled = _items(12, 4, labeled=False, shift=0.3)

    source = _net()
    fitted = train(
        source, source_train, source_val, TrainRecipe(epochs=4, batch_size=8, augment="none"), progress=False
    )
    assert len(fitted["val_auc"]) == 4 and fitted["best_val_auc"] == max(fitted["val_auc"])

    # a new label space: three target classes, so the head is replaced; AdaBN sees the target scans
    model = copy.deepcopy(source)
    recipe = FineTuneRecipe(
        epochs=4, head_epochs=2, unfreeze_every=1, patience=None, augment="none", batch_size=4, selection="val"
    )
    three = [{**d, "label": i % 3} for i, d in enumerate(target_train)]
    three_val = [{**d, "label": i % 3} for i, d in enumerate(target_val)]
    stem_before = model.conv1.weight.detach().clone()
    result = finetune(model, three, three_val, recipe, num_classes=3, unlabeled_items=unlabeled, progress=False)
    assert result["new_head"] and model.fc.out_features == 3
    assert result["adabn"]["images"] == len(three) + len(unlabeled)
    trainable = [h["trainable"] for h in result["schedule"]]
    assert trainable[0] == ["head"] and len(trainable[-1]) > len(trainable[0])  # head first, then more groups
    assert trainable[-1] == ["layer3", "layer4", "head"]  # epoch 4: two groups below the head
    assert torch.equal(stem_before, model.conv1.weight)  # never unfrozen in 4 epochs (whichever epoch was best)
    assert (
        0 <= result["best_epoch"] <= 4 and len(result["val_auc"]) == 5
    )  # epoch 0: the unadapted model, a candidate too
    assert result["adabn"]["kept"]  # a new head: AdaBN always applies
    assert result["recipe"]["l2sp"] == recipe.l2sp

    # the same label space keeps the source head; the naive recipe skips AdaBN and the head phase
    naive = copy.deepcopy(source)
    result = finetune(naive, target_train, target_val, FineTuneRecipe.naive(epochs=2, augment="none"), progress=False)
    assert "new_head" not in result and "adabn" not in result
    assert len(result["schedule"][0]["trainable"]) > 1  # every group trains from the first epoch

    student = _net(widen=0.0625)
    out = distill(
        source,
        student,
        target_train,
        unlabeled,
        target_val,
        DistillRecipe(epochs=3, threshold=0.5, patience=None, augment="none", batch_size=8),
        class_names=["dark", "bright"],
        cache_dir=tmp_path,
        progress=False,
    )
    report = out["pseudo_labels"]
    assert report["labeled"] == 8 and report["unlabeled"] == 12
    assert sum(report["pseudo_labels_kept"].values()) + report["below_threshold"] == 12
    assert list(tmp_path.glob("teacher-*.npz"))
    y, probs, ids = collect_predictions(student, loader(target_val, batch_size=4))
    assert probs.shape == (8, 2) and ids == [d["case_id"] for d in target_val]
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in source.parameters()) / 2


def _trained(recipe: TrainRecipe) -> torch.nn.Module:
    set_determinism(0)
    network = _net()
    train(network, _items(8, 0), _items(4, 1), recipe, progress=False)
    return network


def test_channels_last_trains_the_same_weights_and_hands_back_the_default_layout():
    recipe = TrainRecipe(epochs=2, batch_size=4)
    plain = _trained(recipe)
    fast = _trained(TrainRecipe(epochs=2, batch_size=4, channels_last=True))
    ours, theirs = plain.state_dict(), fast.state_dict()
    assert list(ours) == list(theirs)
    # same arithmetic in another summation order; Adam turns the rounding noise on gradients that are
    # ~0 (a convolution bias right before BatchNorm, which subtracts it again) into steps of about its
    # learning rate, so those biases, and the running means they shift, may differ by up to
    # lr per step in either run; every other weight agrees to rounding
    steps = recipe.epochs * 2  # 8 training cases in batches of 4
    before_bn = {k for k in ours if k.endswith(("downsample.0.bias", "downsample.1.running_mean"))}
    assert len(before_bn) == 6  # layer2..layer4 each have a biased downsampling convolution before its BatchNorm
    for name, weight in ours.items():
        if not weight.is_floating_point():
            assert torch.equal(weight, theirs[name]), name  # num_batches_tracked
            continue
        bound = 2 * recipe.lr * steps if name in before_bn else 1e-4
        assert (weight - theirs[name]).abs().max() < bound, name
    x = torch.stack([i["image"] for i in _items(6, 2)])
    with torch.no_grad():
        difference = (torch.softmax(plain.eval()(x), 1) - torch.softmax(fast.eval()(x), 1)).abs().max()
    assert difference < 5e-3
    assert all(p.is_contiguous() for p in fast.parameters())  # exports and callers see the usual layout


def test_bf16_autocast_trains_and_the_schedule_sees_through_the_wrapper():
    from medtl.adapt.placement import FastForward, unwrap

    source = _net()
    tuned = copy.deepcopy(source)
    recipe = FineTuneRecipe(
        epochs=1,
        head_epochs=1,
        batch_size=4,
        adabn=False,
        keep_source=False,
        l2sp=0.01,
        channels_last=True,
        bf16=True,
        patience=None,
        selection="val",
    )
    run = finetune(tuned, _items(8, 0), _items(4, 1), recipe, progress=False)
    assert run["epochs_run"] == 1 and run["train_loss"][0] == run["train_loss"][0]  # a finite float32 loss
    assert torch.equal(tuned.conv1.weight, source.conv1.weight)  # head epoch: the frozen backbone did not move
    assert not torch.equal(tuned.fc.weight, source.fc.weight)
    wrapped = FastForward(tuned, bf16=True)
    assert unwrap(wrapped) is tuned and wrapped(torch.rand(2, 1, 12, 12, 12)).dtype == torch.float32


def test_place_network_keeps_the_names_and_outputs_in_channels_last_layout():
    """The bundles' ``--channels_last``: weights and inputs change layout, parameter names do not."""
    from medtl.adapt.placement import place_network

    plain = _net().eval()
    placed = place_network(copy.deepcopy(plain), "cpu", channels_last=True)
    assert list(placed.state_dict()) == list(plain.state_dict())

    def weight(network):  # a convolution with several input channels: one channel fits either layout
        return next(m.weight for m in network.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)

    assert weight(placed).is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.rand(3, 1, 12, 12, 12)  # a contiguous batch, as a loader gives it
    with torch.no_grad():
        assert torch.allclose(placed(x), plain(x), atol=1e-5)
    (hook,) = placed._forward_pre_hooks.values()  # inputs are converted on their way in
    (converted,) = hook(placed, (torch.rand(2, 3, 4, 4, 4),))
    assert converted.is_contiguous(memory_format=torch.channels_last_3d)
    assert not weight(place_network(_net(), "cpu")).is_contiguous(memory_format=torch.channels_last_3d)  # the default


def test_patient_folds_keep_patients_together_and_spread_each_class():
    from medtl.adapt.selection import patient_folds

    items = [{"patient": f"p{i // 2}", "label": (i // 2) % 3 == 0} for i in range(30)]  # 15 patients, 2 cases each
    folds = patient_folds(items, 3, seed=1)
    assert sorted(i for f in folds for i in f) == list(range(30))
    for fold in folds:
        patients = {items[i]["patient"] for i in fold}
        assert all(items[i]["patient"] not in patients for other in folds if other is not fold for i in other)
        assert sum(items[i]["label"] for i in fold) in (2 * 1, 2 * 2)  # 5 positive patients over 3 folds: 1 or 2 each
    assert folds == patient_folds(items, 3, seed=1) and folds != patient_folds(items, 3, seed=2)
    with pytest.raises(MedtlError, match="at least 4 labeled patients"):
        patient_folds(items[:6], 4)


def test_kfold_selection_chooses_the_epoch_on_every_labeled_case_then_trains_on_all():
    set_determinism(0)
    source = _net()
    train(source, _items(24, 0), _items(12, 1), TrainRecipe(epochs=3, batch_size=8, augment="none"), progress=False)
    target_train, target_val = _items(10, 2, shift=0.3), _items(6, 3, shift=0.3)
    recipe = FineTuneRecipe(epochs=3, head_epochs=1, unfreeze_every=1, augment="none", batch_size=4, folds=3)
    tuned = copy.deepcopy(source)
    run = finetune(
        tuned,
        target_train,
        target_val,
        recipe,
        unlabeled_items=_items(6, 4, labeled=False, shift=0.3),
        progress=False,
        seed=0,
    )
    assert run["adabn"]["judged_on"] == 16 and run["adabn"]["images"] == 22  # AdaBN judged on all 16 labeled cases
    assert len(run["fold_val_auc"]) == 3 and all(len(c) == 4 for c in run["fold_val_auc"])  # epoch 0 (unadapted) first
    mean = [sum(c[e] for c in run["fold_val_auc"]) / 3 for e in range(4)]
    assert run["best_epoch"] == mean.index(max(mean)) and run["val_auc"] == pytest.approx(mean)
    assert run["epochs_run"] == run["best_epoch"] == len(run["train_loss"])  # the final run: exactly the chosen epochs
    start = copy.deepcopy(source)
    if run["adabn"]["kept"]:
        from medtl.adapt.adabn import adabn

        adabn(start, loader([*target_train, *_items(6, 4, labeled=False, shift=0.3), *target_val], batch_size=16))
    same = all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), tuned.state_dict().values(), strict=True))
    assert same == (run["best_epoch"] == 0)
    assert "3-fold selection on 16 labeled cases" in recipe_outcome(run)["outcome"]


def test_training_from_scratch_can_choose_its_epochs_by_kfold_too():
    set_determinism(0)
    network = _net()
    run = train(
        network,
        _items(12, 0),
        _items(6, 1),
        TrainRecipe(epochs=2, batch_size=4, augment="none", selection="kfold", folds=2),
        progress=False,
        seed=3,
    )
    assert [c[0] for c in run["fold_val_auc"]] == [None, None]  # no "as it started" candidate for a random network
    assert 1 <= run["best_epoch"] == run["epochs_run"] <= 2 and run["selected_on"] == 18
    with pytest.raises(MedtlError, match="unknown selection"):
        train(_net(), _items(4, 0), _items(4, 1), TrainRecipe(epochs=1, selection="test"), progress=False)


def test_fine_tuned_weights_are_averaged_with_the_adabn_start_point():
    """WiSE-FT: the default recipe returns halfway between the (AdaBN) start and the fine-tuned weights."""
    set_determinism(0)
    source = _net()
    train(source, _items(16, 0), _items(8, 1), TrainRecipe(epochs=2, batch_size=8, augment="none"), progress=False)
    target_train, target_val, unlabeled = (
        _items(8, 2, shift=0.3),
        _items(6, 3, shift=0.3),
        _items(6, 4, labeled=False, shift=0.3),
    )
    runs = {}
    for wise in (1.0, 0.5):
        set_determinism(1)
        runs[wise] = copy.deepcopy(source)
        result = finetune(
            runs[wise],
            target_train,
            target_val,
            FineTuneRecipe(
                epochs=2,
                head_epochs=1,
                augment="none",
                batch_size=4,
                selection="val",
                keep_source=False,
                patience=None,
                wise=wise,
            ),
            unlabeled_items=unlabeled,
            progress=False,
        )
        assert result["adabn"]["kept"]  # not judged by default: AdaBN is applied, as the bundles apply it
    start = copy.deepcopy(source)
    from medtl.adapt.adabn import adabn

    adabn(start, loader([*target_train, *unlabeled], batch_size=16), progress=False)
    tuned, averaged = runs[1.0].state_dict(), runs[0.5].state_dict()
    for name, value in averaged.items():
        expected = (start.state_dict()[name] + tuned[name]) / 2 if value.is_floating_point() else tuned[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert not torch.equal(averaged["fc.weight"], tuned["fc.weight"])


def test_a_new_head_is_neither_a_kfold_candidate_nor_averaged_toward(monkeypatch):
    """A head with nothing of the source's (a new task) starts random: the k-fold choice cannot pick
    0 epochs, and WiSE-FT averages the backbone toward the source but keeps the trained head."""
    import medtl.adapt.recipe as recipe_module

    averaged_from: list[set[str]] = []
    real = recipe_module.weight_average
    monkeypatch.setattr(
        recipe_module,
        "weight_average",
        lambda start, tuned, w: averaged_from.append(set(start)) or real(start, tuned, w),
    )
    set_determinism(0)
    recipe = FineTuneRecipe(epochs=2, head_epochs=1, augment="none", batch_size=4, folds=2, wise=0.5, adabn=False)
    for new_head in (True, False):
        result = finetune(_net(), _items(8, 2), _items(4, 3), recipe, progress=False, new_head=new_head)
        if new_head:
            assert result["new_head"] and result["best_epoch"] >= 1 and result["val_auc"][0] is None
    if len(averaged_from) == 2:  # the source-head run chose >= 1 epoch too: it averages every tensor
        assert "fc.weight" not in averaged_from[0] and "fc.weight" in averaged_from[1]
    assert "conv1.weight" in averaged_from[0] and "fc.weight" not in averaged_from[0]


def test_weight_average_keeps_tensors_the_start_leaves_out():
    from medtl.adapt.recipe import weight_average

    start, tuned = {"a": torch.zeros(2)}, {"a": torch.ones(2), "fc.weight": torch.full((2,), 3.0)}
    averaged = weight_average(start, tuned, 0.5)
    assert torch.equal(averaged["a"], torch.full((2,), 0.5)) and torch.equal(averaged["fc.weight"], tuned["fc.weight"])
