"""Fine-tune schedule: which parameters train in which epoch, frozen BatchNorm, discriminative and warm-up rates."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from torch import nn

from medtl.adapt.head import replace_head
from medtl.adapt.schedule import FineTuneSchedule, layer_groups, param_groups
from medtl.adapt.train import L2SP
from medtl.errors import MedtlError
from medtl.networks import create_network


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_network("resnet10", num_classes=2, widen_factor=0.125)


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        ("resnet10", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
        ("densenet121", ["stem", "block1", "block2", "block3", "block4", "head"]),
        ("efficientnet-b0", ["stem", *(f"stage{i}" for i in range(7)), "top", "head"]),
    ],
)
def test_layer_groups_cover_every_parameter_once(arch, names):
    model = create_network(arch, num_classes=2, **({"widen_factor": 0.125} if arch == "resnet10" else {}))
    groups = layer_groups(model)
    assert [g.name for g in groups] == names
    listed = [p for g in groups for p in g.params]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert len(listed) == len(set(listed))


def test_layer_groups_generic_custom_and_swapped_head():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 3))
    assert [g.name for g in layer_groups(model)] == ["0", "1", "head"]
    assert [g.name for g in layer_groups(model, {"features": r"^[01]\."})] == ["features", "head"]
    with pytest.raises(MedtlError, match="belong to no layer group"):
        layer_groups(model, {"conv": r"^0\."})
    with pytest.raises(MedtlError, match="match no parameter"):
        layer_groups(model, {"all": r"^[01]\.", "none": r"^9\."})
    resnet = _resnet()
    replace_head(resnet, 3, hidden=8, dropout=0.1)  # the head becomes a Sequential with two Linears
    head = layer_groups(resnet)[-1]
    assert head.name == "head" and set(head.params) == {"fc.1.weight", "fc.1.bias", "fc.3.weight", "fc.3.bias"}


def test_param_groups_have_discriminative_rates():
    model = _resnet()
    groups = param_groups(model, lr=1e-3, lr_decay=0.5)
    assert [g["name"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5**k for k in (5, 4, 3, 2, 1, 0)])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def _train(schedule: FineTuneSchedule, epochs: int, *, iterations: int = 2):
    """Run a SupervisedTrainer; record per epoch which parameters changed and the rates used."""
    model = _resnet()
    optimizer = torch.optim.SGD(param_groups(model, lr=0.1, lr_decay=0.5), lr=0.1)
    torch.manual_seed(1)
    data = [{"image": torch.randn(4, 1, 16, 16, 16), "label": torch.tensor([0, 1, 0, 1])} for _ in range(iterations)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=data,
        network=model,
        optimizer=optimizer,
        loss_function=nn.CrossEntropyLoss(),
    )
    schedule.attach(trainer)
    changed, rates, snapshot, graded = {}, {}, {}, {}
    from ignite.engine import Events

    @trainer.on(Events.EPOCH_STARTED)
    def _before(engine):
        snapshot.clear()
        snapshot.update({k: v.clone() for k, v in model.state_dict().items()})

    @trainer.on(Events.ITERATION_COMPLETED)
    def _rate(engine):
        rates.setdefault(engine.state.epoch, []).append({g["name"]: g["lr"] for g in optimizer.param_groups})
        graded[engine.state.epoch] = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    @trainer.on(Events.EPOCH_COMPLETED)
    def _after(engine):
        changed[engine.state.epoch] = {k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])}

    trainer.run()
    return model, changed, rates, graded


def _group_of(model: nn.Module) -> dict[str, str]:
    return {p: g.name for g in layer_groups(model) for p in g.params}


def test_head_first_then_gradual_unfreeze_moves_exactly_the_scheduled_groups():
    schedule = FineTuneSchedule(head_epochs=2, head_lr=0.5, unfreeze="gradual", unfreeze_every=1)
    model, changed, rates, graded = _train(schedule, epochs=5)
    owner = _group_of(model)
    expected = {
        1: {"head"},
        2: {"head"},
        3: {"head", "layer4"},
        4: {"head", "layer4", "layer3"},
        5: {"head", "layer4", "layer3", "layer2"},
    }
    for epoch, groups in expected.items():
        moved_params = {k for k in changed[epoch] if k in owner}
        assert {owner[k] for k in moved_params} == groups, epoch
        # exactly the live groups' parameters get gradients; BatchNorm statistics of frozen groups stay
        assert graded[epoch] == {p for p, g in owner.items() if g in groups}, epoch
        frozen_buffers = {
            k for k in changed[epoch] if k not in owner and owner.get(k.rsplit(".", 1)[0] + ".weight") not in groups
        }
        assert not frozen_buffers, (epoch, sorted(frozen_buffers)[:3])
    assert rates[1][0]["head"] == 0.5 and rates[1][0]["layer4"] == 0.0
    assert rates[3][0]["head"] == pytest.approx(0.1) and rates[3][0]["layer4"] == pytest.approx(0.05)
    assert [h["trainable"] for h in schedule.history] == [
        ["head"],
        ["layer4", "head"],
        ["layer3", "layer4", "head"],
        ["layer2", "layer3", "layer4", "head"],
    ]
    assert (
        schedule.history[1]["epoch"] == 3
        and schedule.history[1]["trainable_params"] < schedule.history[1]["total_params"]
    )


def test_unfreeze_all_with_warmup_and_cosine():
    schedule = FineTuneSchedule(head_epochs=1, unfreeze="all", warmup_epochs=1, decay="cosine")
    model, changed, rates, _ = _train(schedule, epochs=3, iterations=2)
    assert {_group_of(model)[k] for k in changed[2] if k in _group_of(model)} == {
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "head",
    }
    # epoch 2: backbone warms up linearly over its 2 iterations (0.5, 1.0 of base) times the cosine factor
    cos = [0.5 * (1 + torch.cos(torch.tensor(torch.pi * x / 2)).item()) for x in (0.5, 1.0, 1.5, 2.0)]
    assert rates[2][0]["stem"] == pytest.approx(0.1 * 0.5**5 * 0.5 * cos[0])
    assert rates[2][1]["stem"] == pytest.approx(0.1 * 0.5**5 * 1.0 * cos[1])
    assert rates[2][0]["head"] == pytest.approx(0.1 * cos[0])  # the head was training already: no warm-up
    assert rates[3][0]["layer4"] == pytest.approx(0.1 * 0.5 * cos[2])


def test_schedule_is_a_function_of_the_epoch_for_resumed_runs():
    model = _resnet()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3))
    FineTuneSchedule(head_epochs=2, unfreeze="gradual").apply(model, optimizer, epoch=4)
    trainable = {
        g.name for g in layer_groups(model) if all(dict(model.named_parameters())[p].requires_grad for p in g.params)
    }
    assert trainable == {"head", "layer4", "layer3"}


def test_schedule_errors_are_clear():
    with pytest.raises(MedtlError, match="unfreeze must be"):
        FineTuneSchedule(unfreeze="sometimes")
    with pytest.raises(MedtlError, match="head_epochs"):
        FineTuneSchedule(head_epochs=-1)
    model = _resnet()
    with pytest.raises(MedtlError, match="param_groups"):
        FineTuneSchedule().apply(model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)


def test_l2sp_penalty_is_distance_to_the_reference_and_spares_the_head():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    reg = L2SP(beta=0.2)
    reg.bind(model)
    assert reg.penalty().item() == 0.0
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[2].weight.add_(5.0)  # the head is free to move
    assert reg.penalty().item() == pytest.approx(0.5 * 0.2 * model[0].weight.numel())
    penalty = reg.penalty()
    penalty.backward()
    torch.testing.assert_close(model[0].weight.grad, torch.full_like(model[0].weight, 0.2))


def test_schedule_releases_the_network_when_training_ends():
    from monai.data import DataLoader

    net = create_network("resnet10", num_classes=2, widen_factor=0.125)
    data = [{"image": torch.rand(1, 8, 8, 8), "label": i % 2} for i in range(4)]
    schedule = FineTuneSchedule(head_epochs=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(data, batch_size=2),
        network=net,
        optimizer=torch.optim.SGD(param_groups(net, lr=0.1), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    schedule.attach(trainer)
    trainer.run()  # ends inside the head phase: the backbone is still frozen at that point
    assert all(p.requires_grad for p in net.parameters())
    assert not any(m._forward_pre_hooks for m in net.modules())
    torch.jit.script(net)  # exportable
