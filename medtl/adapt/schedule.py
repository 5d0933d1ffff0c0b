"""Fine-tuning schedule: train the new head on a frozen backbone, then unfreeze with smaller learning rates.

A pretrained backbone holds features learned on far more data than a target site has; training a
randomly initialised head on top of it while every layer moves at full speed wrecks those
features in the first epochs (the head's gradients are large and meaningless). So:

1. **head phase** (``head_epochs``): only the head trains, at ``head_lr``; frozen layers' BatchNorm
   keeps the source statistics (``freeze_bn``), so the head learns on stable features;
2. **fine-tune phase**: layer groups unfreeze all at once or one by one from the top
   (``unfreeze="gradual"``), each at its own discriminative learning rate (``lr * lr_decay**depth``,
   depth counted from the head: early, generic layers move least), optionally warmed up
   linearly and decayed by a cosine to the end of training.

Layer groups are named per network family (MONAI ResNet, DenseNet, EfficientNet; any other
network: its top-level children) or given as ``{name: regex}``. ``param_groups`` builds the
optimizer's groups with MONAI's ``generate_param_groups``; ``FineTuneSchedule`` is an ignite
handler that owns ``requires_grad``, BatchNorm mode and every group's learning rate, derived from
the epoch alone, so a resumed run lands in the same state. In bundle JSON::

    "optimizer": {"_target_": "torch.optim.AdamW", "params": "$medtl.adapt.schedule.param_groups(@network, lr=1e-4)"},
    "train_handlers": [{"_target_": "medtl.adapt.schedule.FineTuneSchedule", "head_epochs": 3, "head_lr": 1e-3}, ...]

Do not combine it with another learning-rate scheduler: both would write the same ``lr``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from ignite.engine import Events
from monai.optimizers import generate_param_groups
from torch import nn

from medtl.adapt.placement import unwrap
from medtl.errors import MedtlError
from medtl.networks import find_classifier, layer_patterns
from medtl.recipes import UNFREEZE_MODES

logger = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DECAYS = ("none", "cosine")


@dataclass(frozen=True)
class LayerGroup:
    """Parameters that freeze, unfreeze and share a learning rate together, in input-to-output order."""

    name: str
    params: tuple[str, ...]  # parameter names
    modules: tuple[str, ...]  # module names whose every parameter is in the group (for BatchNorm handling)


def layer_groups(model: nn.Module, groups: Mapping[str, str] | None = None) -> list[LayerGroup]:
    """The model's layer groups, input to output, the classifier head last (named ``head``).

    Args:
        groups: ``{name: regex}`` on parameter names, input to output, for the backbone; the head is
            found by ``find_classifier`` and added last. Default: the network family's groups
            (``medtl.networks``), else one group per top-level child module.

    Every parameter lands in exactly one group; one no pattern matches is an error naming it.
    """
    head_prefix = getattr(model, "medtl_head", {}).get("module") or find_classifier(model)[0]
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith(head_prefix + ".")]
    body = [n for n in names if not n.startswith(head_prefix + ".")]
    patterns = dict(groups) if groups is not None else layer_patterns(model)
    if patterns is None:
        children = list(dict.fromkeys(n.split(".")[0] for n in body))
        patterns = {c: rf"^{re.escape(c)}\." for c in children}
    try:
        compiled = {g: re.compile(p) for g, p in patterns.items()}
    except re.error as exc:
        raise MedtlError(
            f"bad layer-group regex: {exc}", hint="groups maps a group name to a regex on parameter names"
        ) from exc
    members: dict[str, list[str]] = {g: [] for g in compiled}
    unmatched = []
    for n in body:
        group = next((g for g, rx in compiled.items() if rx.search(n)), None)
        (members[group] if group else unmatched).append(n)
    if unmatched:
        raise MedtlError(
            f"{len(unmatched)} parameters belong to no layer group, e.g. {', '.join(unmatched[:3])}",
            hint="extend the groups' regexes so every backbone parameter matches one",
        )
    empty = [g for g, m in members.items() if not m]
    if empty:
        raise MedtlError(
            f"layer groups match no parameter: {', '.join(empty)}",
            hint="check the regexes against model.named_parameters()",
        )
    members["head"] = head
    out = []
    for g, params in members.items():
        owned = set(params)
        modules = tuple(
            name
            for name, m in model.named_modules()
            if any(True for _ in m.parameters()) and all(f"{name}.{p}" in owned for p, _ in m.named_parameters())
        )
        out.append(LayerGroup(g, tuple(params), modules))
    return out


def discriminative_lrs(groups: Sequence[LayerGroup], lr: float, lr_decay: float) -> dict[str, float]:
    """``lr`` for the head, times ``lr_decay`` for each group further from it."""
    if lr <= 0 or not 0 < lr_decay <= 1:
        raise MedtlError(f"need lr > 0 and 0 < lr_decay <= 1, got lr={lr}, lr_decay={lr_decay}")
    depth = len(groups) - 1
    return {g.name: float(lr) * float(lr_decay) ** (depth - i) for i, g in enumerate(groups)}


def param_groups(
    network: nn.Module, *, lr: float, lr_decay: float = 0.5, groups: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per layer group, each with its discriminative learning rate
    and its ``name`` (which ``FineTuneSchedule`` uses to find it)."""
    network = unwrap(network)
    layout = layer_groups(network, groups)
    lrs = discriminative_lrs(layout, lr, lr_decay)
    out = generate_param_groups(
        network,
        layer_matches=[lambda item, names=frozenset(g.params): item[0] in names for g in layout],
        match_types=["filter"] * len(layout),
        lr_values=[lrs[g.name] for g in layout],
        include_others=False,
    )
    for group, spec in zip(out, layout, strict=True):
        group["params"] = list(group["params"])
        group["name"] = spec.name
    return out


def _freeze_bn_hook(module: nn.Module, _args: Any) -> None:
    module.train(False)


class FineTuneSchedule:
    """Head first on a frozen backbone, then unfreeze with discriminative learning rates (ignite handler).

    Args:
        head_epochs: epochs during which only the head trains (0: no head phase).
        head_lr: the head's learning rate in the head phase (default: its fine-tune rate).
        unfreeze: ``"all"`` unfreezes every group after the head phase; ``"gradual"`` one group per
            ``unfreeze_every`` epochs, from the last backbone group down to the stem.
        unfreeze_every: epochs between two gradual unfreezing steps.
        warmup_epochs: a newly unfrozen group's learning rate ramps linearly from ~0 over this many
            epochs (fractions allowed; per iteration).
        decay: ``"cosine"`` decays every rate to 0 from the end of the head phase to ``max_epochs``.
        freeze_bn: BatchNorm layers of frozen groups stay in eval mode (source statistics kept).
        groups: ``{name: regex}`` layer groups, as for ``layer_groups``; must match ``param_groups``.

    ``history`` records every change (epoch, trainable groups, learning rates), also logged.

    Examples:
        Head for 3 epochs at 1e-3, then layer4, layer3, ... one per epoch at 1e-4 * 0.5**depth::

            optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4), weight_decay=1e-4)
            FineTuneSchedule(head_epochs=3, head_lr=1e-3, unfreeze="gradual").attach(trainer)
    """

    def __init__(
        self,
        *,
        head_epochs: int = 3,
        head_lr: float | None = None,
        unfreeze: str = "all",
        unfreeze_every: int = 1,
        warmup_epochs: float = 0.0,
        decay: str = "none",
        freeze_bn: bool = True,
        groups: Mapping[str, str] | None = None,
    ) -> None:
        if int(head_epochs) < 0 or int(unfreeze_every) < 1 or float(warmup_epochs) < 0:
            raise MedtlError(
                f"need head_epochs >= 0, unfreeze_every >= 1, warmup_epochs >= 0; "
                f"got {head_epochs}, {unfreeze_every}, {warmup_epochs}"
            )
        if unfreeze not in UNFREEZE_MODES:
            raise MedtlError(f"unfreeze must be one of {', '.join(UNFREEZE_MODES)}, got {unfreeze!r}")
        if decay not in DECAYS:
            raise MedtlError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        if head_lr is not None and float(head_lr) <= 0:
            raise MedtlError(f"head_lr must be > 0, got {head_lr}")
        self.head_epochs = int(head_epochs)
        self.head_lr = None if head_lr is None else float(head_lr)
        self.unfreeze = unfreeze
        self.unfreeze_every = int(unfreeze_every)
        self.warmup_epochs = float(warmup_epochs)
        self.decay = decay
        self.freeze_bn = bool(freeze_bn)
        self.groups = groups
        self.history: list[dict[str, Any]] = []
        self._layout: list[LayerGroup] | None = None
        self._hooks: dict[str, list[Any]] = {}
        self._state: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ pure schedule, from the epoch

    def trainable(self, epoch: int, n_groups: int) -> int:
        """How many groups, counted from the head, train in 1-based ``epoch``."""
        if epoch <= self.head_epochs:
            return 1
        if self.unfreeze == "all":
            return n_groups
        steps = (epoch - self.head_epochs - 1) // self.unfreeze_every + 1
        return min(n_groups, 1 + steps)

    def unfrozen_at(self, k: int) -> int:
        """The 1-based epoch in which the ``k``-th group from the head (0: head) starts training."""
        if k == 0:
            return 1
        if self.unfreeze == "all":
            return self.head_epochs + 1
        return self.head_epochs + 1 + (k - 1) * self.unfreeze_every

    def lr_factor(self, k: int, progress: float, max_epochs: int | None) -> float:
        """Multiplier of group ``k``'s base rate (0: head) when ``progress`` epochs, fractional and
        counting the current step, are done."""
        factor = 1.0
        since = progress - (self.unfrozen_at(k) - 1)
        new_head = k == 0 and self.head_epochs > 0  # trains at head_lr from the start, no warm-up
        if self.warmup_epochs > 0 and not new_head and since < self.warmup_epochs:
            factor = max(since, 0.0) / self.warmup_epochs
        if self.decay == "cosine" and max_epochs and progress > self.head_epochs:
            span = max(max_epochs - self.head_epochs, 1)
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - self.head_epochs) / span)))
        return factor

    # ------------------------------------------------------------------ applying it to a model

    def _groups_of(self, network: nn.Module) -> list[LayerGroup]:
        if self._layout is None:
            self._layout = layer_groups(network, self.groups)
        return self._layout

    def apply(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        progress: float | None = None,
        max_epochs: int | None = None,
    ) -> None:
        """Set ``requires_grad``, BatchNorm mode and learning rates for 1-based ``epoch``; ``progress``
        is the epochs done counting the current step (default: ``epoch``, whole-epoch steps). Usable
        from a plain training loop."""
        network = unwrap(network)
        layout = self._groups_of(network)
        n = len(layout)
        progress = float(epoch) if progress is None else float(progress)
        live = tuple(g.name for g in layout[n - self.trainable(epoch, n) :])
        params = dict(network.named_parameters())
        by_name = self._optimizer_groups(optimizer, layout, params)
        base = {}
        for i, group in enumerate(layout):
            opt_group = by_name[group.name]
            base[group.name] = opt_group.setdefault("medtl_base_lr", opt_group["lr"])
            if i == n - 1 and epoch <= self.head_epochs and self.head_lr is not None:
                base[group.name] = self.head_lr
            factor = self.lr_factor(n - 1 - i, progress, max_epochs) if group.name in live else 0.0
            opt_group["lr"] = base[group.name] * factor
        if live != self._state:
            self._state = live
            self._set_trainable(network, layout, params, live)
            count = sum(params[p].numel() for g in layout if g.name in live for p in g.params)
            total = sum(p.numel() for p in params.values())
            entry = {
                "epoch": epoch,
                "trainable": list(live),
                "lr": {g: base[g] for g in live},
                "trainable_params": count,
                "total_params": total,
            }
            self.history.append(entry)
            rates = ", ".join(f"{g} {lr:.2g}" for g, lr in entry["lr"].items())
            logger.info(
                "epoch %d: training %s (%d of %d parameters); lr %s", epoch, ", ".join(live), count, total, rates
            )

    def _set_trainable(
        self, network: nn.Module, layout: list[LayerGroup], params: dict[str, nn.Parameter], live: tuple[str, ...]
    ) -> None:
        modules = dict(network.named_modules())
        for group in layout:
            on = group.name in live
            for p in group.params:
                params[p].requires_grad_(on)
            for hook in self._hooks.pop(group.name, []):
                hook.remove()
            if not on and self.freeze_bn:
                bns = [modules[m] for m in group.modules if isinstance(modules[m], _BN)]
                self._hooks[group.name] = [bn.register_forward_pre_hook(_freeze_bn_hook) for bn in bns]

    @staticmethod
    def _optimizer_groups(
        optimizer: torch.optim.Optimizer, layout: list[LayerGroup], params: dict[str, nn.Parameter]
    ) -> dict[str, dict]:
        named = {g.get("name"): g for g in optimizer.param_groups}
        if all(g.name in named for g in layout):
            return named
        ids = {id(p): i for i, og in enumerate(optimizer.param_groups) for p in og["params"]}
        out: dict[str, int] = {}
        for group in layout:
            owners = {ids.get(id(params[p])) for p in group.params}
            if len(owners) != 1 or None in owners or owners & set(out.values()):
                raise MedtlError(
                    f"the optimizer's parameter groups do not line up with layer group {group.name!r}",
                    hint="build the optimizer from medtl.adapt.schedule.param_groups(network, lr=...)",
                )
            out[group.name] = owners.pop()
        return {name: optimizer.param_groups[i] for name, i in out.items()}

    def release(self, network: nn.Module) -> None:
        """End of training: every parameter trainable again and BatchNorm hooks removed, so the
        network leaves as a plain module (exportable to TorchScript, ready for further training)."""
        network = unwrap(network)
        for hooks in self._hooks.values():
            for hook in hooks:
                hook.remove()
        self._hooks.clear()
        for p in network.parameters():
            p.requires_grad_(True)
        self._state = None

    # ------------------------------------------------------------------ ignite

    def attach(self, engine: Any) -> None:

        engine.add_event_handler(Events.COMPLETED, lambda e: self.release(e.network))
        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch)
        if self.warmup_epochs > 0 or self.decay != "none":
            engine.add_event_handler(Events.ITERATION_STARTED, self._on_iteration)

    def _on_epoch(self, engine: Any) -> None:
        self.apply(engine.network, engine.optimizer, engine.state.epoch, max_epochs=engine.state.max_epochs)

    def _on_iteration(self, engine: Any) -> None:
        done = engine.state.iteration / (engine.state.epoch_length or 1)
        self.apply(
            engine.network, engine.optimizer, engine.state.epoch, progress=done, max_epochs=engine.state.max_epochs
        )


__all__ = ["DECAYS", "FineTuneSchedule", "LayerGroup", "discriminative_lrs", "layer_groups", "param_groups", "unwrap"]
