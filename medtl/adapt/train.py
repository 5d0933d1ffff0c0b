"""Training runs built from MONAI's engines: validation-driven model selection and L2-SP.

``fit`` is the one training loop medtl uses from Python (benchmarks, ``medtl demo``): a MONAI
``SupervisedTrainer`` with a ``SupervisedEvaluator`` run on the validation split after every epoch
(ROC AUC as key metric), optional early stopping, and the weights of the best validation epoch put
back into the network at the end. The test split never enters it: choices are made on validation
data only. Bundles compose the same engines and handlers in JSON.

``L2SP`` pulls fine-tuned weights toward the source weights (Li et al., "Explicit Inductive Bias for
Transfer Learning with Convolutional Networks", 2018): with a few dozen target labels, plain
fine-tuning drifts from what the source taught and does worse than not adapting at all; a penalty
``beta/2 * ||w - w_source||^2`` on the backbone keeps what transfers.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch, default_prepare_batch
from monai.handlers import ROCAUC, EarlyStopHandler, ValidationHandler, from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import CommonKeys
from torch import nn

from medtl.adapt.placement import FastForward, memory_format, unwrap
from medtl.adapt.resume import TrainingCheckpoint
from medtl.adapt.schedule import layer_groups
from medtl.errors import MedtlError
from medtl.progress import EngineProgress

logger = logging.getLogger(__name__)


class L2SP:
    """Add ``beta/2 * sum ||w - w0||^2`` over the backbone to every training loss (ignite handler).

    ``w0`` is the network's weights when training starts (the source weights after a head swap), or
    ``reference`` given as a state dict. Parameters whose shape differs from the reference, and the
    classifier head (unless ``anchor_head``), are left free. Attach to a ``SupervisedTrainer``: the penalty is added on
    MONAI's ``LOSS_COMPLETED`` event, before the backward pass.
    """

    def __init__(
        self, beta: float = 0.01, *, reference: dict[str, torch.Tensor] | None = None, anchor_head: bool = False
    ) -> None:
        if not float(beta) >= 0:
            raise MedtlError(f"beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.reference = reference
        self.anchor_head = anchor_head
        self._pairs: list[tuple[nn.Parameter, torch.Tensor]] = []

    def bind(self, network: nn.Module) -> None:
        """Snapshot the reference weights of ``network`` (called at the start of training)."""
        network = unwrap(network)
        head = set() if self.anchor_head else set(layer_groups(network)[-1].params)
        source = (
            self.reference
            if self.reference is not None
            else {k: v.detach().clone() for k, v in network.state_dict().items()}
        )
        self._pairs = [
            (p, source[name].to(p.device, p.dtype))
            for name, p in network.named_parameters()
            if name not in head and name in source and source[name].shape == p.shape
        ]

    def penalty(self) -> torch.Tensor:
        terms = [((p - p0) ** 2).sum() for p, p0 in self._pairs if p.requires_grad]
        return 0.5 * self.beta * torch.stack(terms).sum() if terms else torch.zeros(())

    def attach(self, engine: Any) -> None:

        engine.add_event_handler(Events.STARTED, lambda e: self.bind(e.network))
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._add)

    def _add(self, engine: Any) -> None:
        if self.beta:
            engine.state.output[CommonKeys.LOSS] = engine.state.output[CommonKeys.LOSS] + self.penalty()


class PlainBatch(PrepareBatch):
    """``prepare_batch`` handing the network plain tensors: a ``MetaTensor`` batch makes every
    layer's operation go through its metadata bookkeeping (a measurable share of a CPU training step
    for the bundles' ResNet10: docs/benchmarks.md, training step), which training does not need."""

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        return as_plain(image), label


def as_plain(tensor: Any) -> Any:
    """The tensor without MONAI metadata (unchanged when it has none)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def make_evaluator(
    network: nn.Module,
    loader: Iterable[Any],
    *,
    num_classes: int,
    device: torch.device,
    handlers: Sequence[Any] = (),
    amp: bool = False,
) -> SupervisedEvaluator:
    """A ``SupervisedEvaluator`` computing ROC AUC of softmax outputs (key metric ``val_auc``);
    ``amp``: fp16 autocast on CUDA."""
    post = Compose(
        [
            Activationsd(keys=CommonKeys.PRED, softmax=True),
            AsDiscreted(keys=CommonKeys.LABEL, to_onehot=num_classes),
        ]
    )
    return SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        prepare_batch=PlainBatch(),
        network=network,
        postprocessing=post,
        key_val_metric={"val_auc": ROCAUC(output_transform=from_engine([CommonKeys.PRED, CommonKeys.LABEL]))},
        val_handlers=list(handlers),
        amp=amp,
    )


class _LossHistory:
    """Mean training loss of each epoch, for learning curves."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self._sum, self._n = 0.0, 0

    def attach(self, trainer: Any) -> None:

        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._add)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._close)

    def _add(self, engine: Any) -> None:
        self._sum += float(from_engine([CommonKeys.LOSS], first=True)(engine.state.output))
        self._n += 1

    def _close(self, _engine: Any) -> None:
        self.losses.append(self._sum / max(self._n, 1))
        self._sum, self._n = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = list(state["losses"])


class _KeepBest:
    """Copy the network's weights whenever the evaluator's key metric improves."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.best = -float("inf")
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch = 0
        self.scores: list[float] = []

    def __call__(self, evaluator: Any, trainer: Any) -> None:
        score = float(evaluator.state.metrics["val_auc"])
        self.scores.append(score)
        if score > self.best:  # NaN (one-class validation set) never counts as better
            self.best, self.epoch = score, trainer.state.epoch
            self.state = copy.deepcopy(self.network.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epoch": self.epoch, "scores": list(self.scores), "state": self.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.epoch, self.scores, self.state = (
            state["best"],
            state["epoch"],
            list(state["scores"]),
            state["state"],
        )


def fit(
    network: nn.Module,
    train_loader: Iterable[Any],
    *,
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    val_loader: Iterable[Any] | None = None,
    num_classes: int = 2,
    loss_function: Callable[..., torch.Tensor] | None = None,
    handlers: Sequence[Any] = (),
    prepare_batch: Callable[..., Any] | None = None,
    patience: int | None = None,
    keep_initial: bool = False,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "train",
    channels_last: bool = False,
    bf16: bool = False,
    amp: bool | None = None,
) -> dict[str, Any]:
    """Train ``network``; with ``val_loader``, validate each epoch and end with the best epoch's weights.

    Args:
        handlers: extra trainer handlers with ``attach`` (``FineTuneSchedule``, ``L2SP``, ...).
        patience: stop after this many epochs without a better validation AUC (needs ``val_loader``).
        keep_initial: validate the starting weights too (epoch 0): when no epoch beats them, the
            network ends as it started, so adapting never makes it worse on validation data.
        checkpoint: file for the whole training state, rewritten after every epoch
            (``medtl.adapt.resume.TrainingCheckpoint``); with ``resume``, training continues from it.
        channels_last, bf16: run the network in channels-last layout and/or bfloat16 autocast
            (``FastForward``); its weights return to the default layout when training ends.
        amp: MONAI's automatic mixed precision (fp16 autocast, gradient scaling); ``None`` turns it
            on for CUDA devices, as the bundles' ``amp`` does.

    Returns ``{"epochs_run", "best_epoch" (0: the starting weights), "best_val_auc", "val_auc" (per
    validation, epoch 0 first with ``keep_initial``), "train_loss" (mean per epoch), "seconds"}``.
    """
    if max_epochs < 1:
        raise MedtlError(f"max_epochs must be >= 1, got {max_epochs}")
    if (patience is not None or keep_initial) and val_loader is None:
        raise MedtlError("early stopping (patience) and keep_initial need a validation loader")
    device = torch.device(device)
    network.to(device, memory_format=memory_format(network, channels_last))
    runner = (
        FastForward(network, channels_last=channels_last, bf16=bf16, device_type=device.type)
        if channels_last or bf16
        else network
    )
    amp = device.type == "cuda" if amp is None else bool(amp)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=runner,
        optimizer=optimizer,
        loss_function=loss_function or nn.CrossEntropyLoss(),
        prepare_batch=prepare_batch or PlainBatch(),
        amp=amp,
    )
    for handler in handlers:
        handler.attach(trainer)
    bar = None
    if progress:
        bar = EngineProgress(desc=desc)
        loss_of = from_engine([CommonKeys.LOSS], first=True)
        bar.attach(trainer, output_transform=lambda output: {"loss": loss_of(output)})
    keep, history = _KeepBest(network), _LossHistory()
    history.attach(trainer)
    stateful: dict[str, Any] = {"loss_history": history}  # what TrainingCheckpoint saves besides network and optimizer
    for i, handler in enumerate(handlers):
        target = getattr(handler, "lr_scheduler", handler)  # MONAI's LrScheduleHandler keeps its state there
        if hasattr(target, "state_dict"):
            stateful[f"handler{i}"] = target
    if val_loader is not None:
        evaluator = make_evaluator(runner, val_loader, num_classes=num_classes, device=device, amp=amp)

        evaluator.add_event_handler(Events.COMPLETED, keep, trainer)
        if bar is not None:  # one line per epoch stays on screen: loss and metric, best so far
            evaluator.add_event_handler(
                Events.COMPLETED,
                lambda _e: bar.log_message(
                    f"{desc} epoch {trainer.state.epoch}/{max_epochs}: loss "
                    f"{history.losses[-1] if history.losses else float('nan'):.4f}, validation AUC "
                    f"{keep.scores[-1]:.3f} (best {keep.best:.3f} at epoch {keep.epoch})"
                ),
            )
        stateful["keep_best"] = keep
        if patience is not None:
            early = EarlyStopHandler(
                patience=int(patience), score_function=lambda e: float(e.state.metrics["val_auc"]), trainer=trainer
            )
            early.attach(evaluator)
            stateful["early_stopping"] = early._handler
        ValidationHandler(interval=1, validator=evaluator).attach(trainer)
        if keep_initial:
            evaluator.run()  # epoch 0: the starting weights are a candidate
    saver = None
    if checkpoint is not None:
        saver = TrainingCheckpoint(
            checkpoint, network=network, optimizer=optimizer, objects=stateful, loaders=[train_loader], resume=resume
        )
        saver.attach(trainer)  # after validation: the saved state includes this epoch's
    start = time.perf_counter()
    try:
        trainer.run()
    finally:
        network.to(memory_format=torch.contiguous_format)  # exports and callers expect the default layout
    if keep.state is not None:
        network.load_state_dict(keep.state)
    result = {
        "epochs_run": trainer.state.epoch,
        "best_epoch": keep.epoch if keep.state is not None else trainer.state.epoch,
        "best_val_auc": keep.best if keep.state is not None else None,
        "val_auc": keep.scores,
        "train_loss": history.losses,
        "seconds": time.perf_counter() - start,
        **({"resumed_after_epoch": saver.resumed_from} if saver is not None and saver.resumed_from else {}),
    }
    logger.info(
        "%s: %d epochs, best validation AUC %s at epoch %d",
        desc,
        result["epochs_run"],
        result["best_val_auc"],
        result["best_epoch"],
    )
    return result


__all__ = ["L2SP", "PlainBatch", "as_plain", "fit", "make_evaluator"]
