"""Distillation (loss, cached teacher outputs, pseudo-labels, student step) and the fit() loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Lambdad
from torch import nn

from medtl.adapt.distill import (
    TEACHER_KEY,
    DistillationLoss,
    DistillBatch,
    distillation_loss,
    label_with_teacher,
    model_fingerprint,
    pseudo_label,
    teacher_logits,
)
from medtl.adapt.train import L2SP, fit
from medtl.errors import MedtlError


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_kd_loss_matches_a_hand_computation():
    student = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0]])
    teacher = np.array([[1.0, 0.0, -1.0], [2.0, 2.5, -0.5], [0.0, 1.0, 4.0]])
    labels = np.array([0, -1, 1])  # the second case is unlabeled: soft term only
    alpha, t = 0.3, 2.5

    p_t, p_s = _softmax(teacher / t), _softmax(student / t)
    kl = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1))
    log_p = np.log(_softmax(student))
    ce = -np.mean([log_p[0, 0], log_p[2, 1]])
    expected = alpha * ce + (1 - alpha) * t * t * kl

    got = distillation_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), alpha=alpha, temperature=t
    )
    assert got.item() == pytest.approx(expected, rel=1e-10)
    module = DistillationLoss(alpha=alpha, temperature=t)
    target = {"label": torch.tensor(labels), "teacher": torch.tensor(teacher)}
    assert module(torch.tensor(student), target).item() == pytest.approx(expected, rel=1e-10)
    # no labels at all: the soft term alone; plain labels: cross-entropy ignoring -1
    soft = distillation_loss(
        torch.tensor(student), torch.tensor(teacher), torch.full((3,), -1), alpha=alpha, temperature=t
    )
    assert soft.item() == pytest.approx((1 - alpha) * t * t * kl, rel=1e-10)
    assert module(torch.tensor(student), torch.tensor(labels)).item() == pytest.approx(ce, rel=1e-10)
    # identical logits: KL is zero
    same = distillation_loss(torch.tensor(teacher), torch.tensor(teacher), None, alpha=0.0, temperature=t)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(MedtlError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(MedtlError, match="temperature"):
        DistillationLoss(temperature=0)


class _CountingNet(nn.Module):
    """Tiny classifier that counts how many cases it has seen."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(4, 2)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.fc(x.reshape(len(x), -1))


def _data(n: int = 6, labeled: int = 2) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"case_id": f"c{i:02d}", "image": rng.normal(size=4).astype(np.float32), "label": i % 2 if i < labeled else -1}
        for i in range(n)
    ]


def _to_tensor():
    return Lambdad(keys="image", func=torch.as_tensor)


def test_teacher_outputs_are_cached_by_case_and_weights(tmp_path):
    data, teacher = _data(), _CountingNet()
    first = teacher_logits(teacher, data, _to_tensor(), cache_dir=tmp_path, batch_size=4)
    assert teacher.seen == 6 and sorted(first) == [d["case_id"] for d in data]
    x = torch.as_tensor(np.stack([d["image"] for d in data]))
    np.testing.assert_allclose(np.stack([first[d["case_id"]] for d in data]), teacher.fc(x).detach().numpy(), rtol=1e-6)
    cached = list(tmp_path.glob("teacher-*.npz"))
    assert len(cached) == 1 and model_fingerprint(teacher)[:16] in cached[0].name

    again = teacher_logits(teacher, data, _to_tensor(), cache_dir=tmp_path)
    assert teacher.seen == 6  # nothing recomputed
    assert all(np.array_equal(first[k], again[k]) for k in first)
    teacher_logits(
        teacher,
        data + [{"case_id": "new", "image": np.ones(4, np.float32), "label": -1}],
        _to_tensor(),
        cache_dir=tmp_path,
    )
    assert teacher.seen == 7  # only the new case

    with torch.no_grad():
        teacher.fc.bias.add_(1.0)
    changed = teacher_logits(teacher, data, _to_tensor(), cache_dir=tmp_path)
    assert teacher.seen == 13 and len(list(tmp_path.glob("teacher-*.npz"))) == 2  # new weights, new key
    assert not np.allclose(changed["c00"], first["c00"])

    damaged = _CountingNet(seed=3)
    path = tmp_path / f"teacher-{model_fingerprint(damaged)[:16]}.npz"
    path.write_bytes(b"PK\x03\x04 not a zip")
    teacher_logits(damaged, data, _to_tensor(), cache_dir=tmp_path)
    assert damaged.seen == 6  # damaged cache recomputed and rewritten
    teacher_logits(damaged, data, _to_tensor(), cache_dir=tmp_path)
    assert damaged.seen == 6
    with pytest.raises(MedtlError, match="not unique"):
        teacher_logits(teacher, data + data[:1], _to_tensor())


def test_pseudo_labels_respect_threshold_and_are_counted_per_class():
    data = [
        {"case_id": "a", "label": 1},  # labeled: keeps its label whatever the teacher says
        {"case_id": "b", "label": -1},  # p(0) = 0.95
        {"case_id": "c", "label": -1},  # p(1) = 0.98
        {"case_id": "d", "label": -1},  # p(1) = 0.6: below the threshold
        {"case_id": "e", "label": -1},  # p(1) = 0.93
    ]
    logits = {
        "a": np.log([0.99, 0.01]),
        "b": np.log([0.95, 0.05]),
        "c": np.log([0.02, 0.98]),
        "d": np.log([0.4, 0.6]),
        "e": np.log([0.07, 0.93]),
    }
    out, report = pseudo_label(data, logits, threshold=0.9, class_names=["benign", "malignant"])
    assert [d["label"] for d in out] == [1, 0, 1, -1, 1]
    assert [d["pseudo_label"] for d in out] == [False, True, True, False, True]
    assert report["pseudo_labels_kept"] == {"benign": 1, "malignant": 2}
    assert report["labeled"] == 1 and report["unlabeled"] == 4 and report["below_threshold"] == 1
    np.testing.assert_allclose(out[3][TEACHER_KEY], logits["d"], rtol=1e-6)

    strict, report = pseudo_label(data, logits, threshold=0.96, keep_uncertain=False)
    assert [d["case_id"] for d in strict] == ["a", "c"]
    assert report["pseudo_labels_kept"] == {"0": 0, "1": 1} and report["below_threshold_use"] == "dropped"
    with pytest.raises(MedtlError, match="no teacher output for case x"):
        pseudo_label([{"case_id": "x", "label": -1}], logits)
    with pytest.raises(MedtlError, match="threshold"):
        pseudo_label(data, logits, threshold=0)


def test_student_trains_on_cached_teacher_outputs_in_a_supervised_trainer(tmp_path):
    data, teacher = _data(n=8, labeled=2), _CountingNet(seed=1)
    labeled, report = label_with_teacher(teacher, data, _to_tensor(), threshold=0.5, cache_dir=tmp_path)
    assert sum(report["pseudo_labels_kept"].values()) == 6  # at 0.5 every case is confident
    seen_after_labeling = teacher.seen

    student = _CountingNet(seed=2)
    before = student.fc.weight.detach().clone()
    loader = DataLoader(Dataset(labeled, _to_tensor()), batch_size=4)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=3,
        train_data_loader=loader,
        network=student,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.5),
        loss_function=DistillationLoss(alpha=0.0, temperature=2.0),
        prepare_batch=DistillBatch(),
    )
    trainer.run()
    assert teacher.seen == seen_after_labeling  # the teacher never ran during training
    assert not torch.equal(before, student.fc.weight)
    # with alpha=0 the student matches the teacher's distribution on these cases
    x = torch.as_tensor(np.stack([d["image"] for d in data]))
    with torch.no_grad():
        gap_before = (torch.softmax(teacher.fc(x), 1) - torch.softmax(x @ before.T + student.fc.bias, 1)).abs().mean()
        gap_after = (torch.softmax(teacher.fc(x), 1) - torch.softmax(student.fc(x), 1)).abs().mean()
    assert gap_after < gap_before

    online = DistillBatch(teacher=teacher)
    image, target = online({"image": x, "label": torch.zeros(8)})
    assert teacher.seen == seen_after_labeling + 8 and target["teacher"].shape == (8, 2)
    with pytest.raises(MedtlError, match="no teacher network"):
        DistillBatch()({"image": x, "label": torch.zeros(8)})


def _separable(n: int, seed: int, noise: float = 0.5) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.normal(scale=noise, size=(n, 4)).astype(np.float32)
    x[:, 0] += np.where(labels == 1, 1.0, -1.0)
    return [{"case_id": f"s{seed}-{i}", "image": x[i], "label": int(labels[i])} for i in range(n)]


def test_fit_restores_the_best_validation_epoch_and_stops_early():
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    train = DataLoader(Dataset(_separable(40, 0), _to_tensor()), batch_size=8, shuffle=True)
    val = DataLoader(Dataset(_separable(20, 1), _to_tensor()), batch_size=20)
    result = fit(
        net,
        train,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.2),
        max_epochs=30,
        val_loader=val,
        patience=3,
        progress=False,
    )
    assert result["best_val_auc"] > 0.9 and result["best_val_auc"] == max(result["val_auc"])
    assert result["epochs_run"] == len(result["val_auc"])
    assert (
        result["epochs_run"] < 30 and result["epochs_run"] - result["best_epoch"] == 3
    )  # stopped 3 epochs after the best

    # the network ends with the best epoch's weights: re-evaluating gives the best AUC again
    from monai.metrics import ROCAUCMetric

    batch = next(iter(val))
    with torch.no_grad():
        prob = torch.softmax(net(batch["image"]), 1)[:, 1]
    metric = ROCAUCMetric()
    metric(prob, batch["label"])
    assert metric.aggregate() == pytest.approx(result["best_val_auc"], abs=1e-6)

    with pytest.raises(MedtlError, match="validation loader"):
        fit(net, train, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), max_epochs=1, patience=2)
    with pytest.raises(MedtlError, match="max_epochs"):
        fit(net, train, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), max_epochs=0)


def test_fit_with_l2sp_stays_closer_to_the_source_weights():
    def run(beta: float) -> float:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        source = [p.detach().clone() for p in net[0].parameters()]
        train = DataLoader(Dataset(_separable(32, 2), _to_tensor()), batch_size=8)
        fit(
            net,
            train,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.3),
            max_epochs=5,
            handlers=[L2SP(beta)],
            progress=False,
        )
        return sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(net[0].parameters(), source, strict=True))

    assert run(5.0) < 0.5 * run(0.0)


def test_fingerprint_covers_batchnorm_buffers():
    bn = nn.BatchNorm1d(3)
    before = model_fingerprint(bn)  # holds a 0-dim num_batches_tracked buffer
    bn.train()(torch.randn(4, 3))
    assert model_fingerprint(bn) != before and len(before) == 64


def test_fit_keeps_the_starting_weights_when_training_only_hurts():
    torch.manual_seed(0)
    net = nn.Linear(4, 2)
    with torch.no_grad():  # a good classifier already: feature 0 decides
        net.weight.copy_(torch.tensor([[-3.0, 0, 0, 0], [3.0, 0, 0, 0]]))
        net.bias.zero_()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    flipped = [{**d, "label": 1 - d["label"]} for d in _separable(40, 0)]  # training labels that teach the opposite
    train = DataLoader(Dataset(flipped, _to_tensor()), batch_size=8)
    val = DataLoader(Dataset(_separable(20, 1), _to_tensor()), batch_size=20)
    result = fit(
        net,
        train,
        optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
        max_epochs=3,
        val_loader=val,
        keep_initial=True,
        progress=False,
    )
    assert result["best_epoch"] == 0 and len(result["val_auc"]) == 4 and result["val_auc"][0] > 0.95
    assert all(torch.equal(start[k], v) for k, v in net.state_dict().items())
