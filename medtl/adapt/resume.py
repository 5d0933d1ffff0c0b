"""Continue a training run after it was killed, to the same weights it would have reached.

``TrainingCheckpoint`` is an ignite handler. After every epoch (and after that epoch's validation)
it writes, atomically, everything the next epoch depends on: network, optimizer, the trainer's
epoch and iteration, the state of handlers that keep any (learning-rate scheduler, best-epoch
keeper, early stopping), and every random state that shapes the data: torch, NumPy and Python
generators and the generators of MONAI's random transforms in the training loader. With
``resume`` it loads that file when training starts, so the run goes on with the next epoch as if
it had never stopped. The file holds tensors and plain numbers only and loads with
``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.transforms import Compose, Randomizable

from medtl.bundle import confine
from medtl.errors import MedtlError
from medtl.fileio import atomic_write

logger = logging.getLogger(__name__)

FORMAT = 1


def _numpy_state(state: tuple) -> list:
    """NumPy's ``RandomState.get_state()`` as plain values (the key array as a tensor)."""
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_tuple(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached


def _plain(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays turned into Python numbers and tensors, which
    ``weights_only`` loading accepts (handlers keep scores as NumPy floats)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, Mapping):
        return (
            type(value)((k, _plain(v)) for k, v in value.items())
            if not hasattr(value, "default_factory")
            else {k: _plain(v) for k, v in value.items()}
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def random_transforms(loaders: Iterable[Any]) -> list[Randomizable]:
    """The random transforms, in a fixed order, of the datasets behind ``loaders``, inner ones
    included: MONAI's dictionary transforms draw from the generator of the array transform they wrap."""
    found: dict[int, Randomizable] = {}

    def walk(obj: Any) -> None:
        if id(obj) in found:
            return
        if isinstance(obj, Randomizable):
            found[id(obj)] = obj
        children = obj.transforms if isinstance(obj, Compose) else []
        if isinstance(obj, Randomizable) or isinstance(obj, Compose):
            children = [*children, *(v for v in vars(obj).values() if isinstance(v, (Randomizable, Compose)))]
        for child in children:
            walk(child)

    for loader in loaders:
        walk(getattr(getattr(loader, "dataset", None), "transform", None))
    return list(found.values())


#: Where MONAI handlers keep state that decides later epochs (scheduler position, early-stopping
#: counter, the best score a key-metric checkpoint must beat).
_HANDLER_STATE = ("lr_scheduler", "_handler", "_key_metric_checkpoint", "_final_checkpoint", "_interval_checkpoint")


def handler_states(handlers: Iterable[Any]) -> dict[str, Any]:
    """The parts with ``state_dict``/``load_state_dict`` of MONAI/ignite handlers, by position."""
    out = {}
    for i, handler in enumerate(handlers):
        for attr in _HANDLER_STATE:
            part = getattr(handler, attr, None)
            if part is not None and hasattr(part, "state_dict") and hasattr(part, "load_state_dict"):
                out[f"{i}.{attr}"] = part
    return out


class _BestMetric:
    """A MONAI engine's best key metric and its epoch, as a state-dict object."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_metric": float(self.engine.state.best_metric),
            "best_metric_epoch": int(self.engine.state.best_metric_epoch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.state.best_metric, self.engine.state.best_metric_epoch = (
            state["best_metric"],
            state["best_metric_epoch"],
        )


class TrainingCheckpoint:
    """Save the whole training state each epoch to ``path``; with ``resume``, start from it.

    Args:
        path: checkpoint file, rewritten (temp file + rename) after every epoch.
        network, optimizer: what the trainer trains.
        objects: more state by name, each with ``state_dict``/``load_state_dict`` (an lr scheduler,
            ``medtl.adapt.train`` best-epoch keeper, ignite ``EarlyStopping``).
        handlers: MONAI handlers whose state is saved too (``handler_states``), looked up when
            training starts so handlers attached later in ``initialize`` are included.
        evaluators: MONAI evaluators whose best metric and its epoch are saved.
        loaders: data loaders whose dataset transforms draw random numbers (the training loader).
        resume: load ``path`` when the trainer starts; a missing file starts from scratch.

    Attach it last, after the validation handler, so the saved state includes that epoch's
    validation. In a bundle: ``"$@resume_state.attach(@train#trainer)"`` in ``initialize``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        objects: Mapping[str, Any] | None = None,
        handlers: Iterable[Any] = (),
        evaluators: Iterable[Any] = (),
        loaders: Iterable[Any] = (),
        resume: bool = False,
    ) -> None:
        self.path = confine.check(path, write=True, what="TrainingCheckpoint")
        self.network = network
        self.optimizer = optimizer
        self.objects = dict(objects or {})
        self.handlers = list(handlers)
        self.evaluators = list(evaluators)
        self.transforms = random_transforms(loaders)
        self.resume = resume
        self.resumed_from: int | None = None

    @property
    def resuming(self) -> bool:
        """Whether this run continues an earlier one (``resume`` and a saved state exists)."""
        return self.resume and self.path.is_file()

    def _stateful(self) -> dict[str, Any]:
        found = dict(self.objects) | handler_states(self.handlers)
        return found | {f"evaluator{i}": _BestMetric(e) for i, e in enumerate(self.evaluators)}

    def attach(self, engine: Any) -> None:

        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def state(self, engine: Any) -> dict[str, Any]:
        s = engine.state
        return {
            "format": FORMAT,
            "trainer": {
                "epoch": s.epoch,
                "iteration": s.iteration,
                "max_epochs": s.max_epochs,
                "epoch_length": s.epoch_length,
            },
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "objects": {name: _plain(obj.state_dict()) for name, obj in self._stateful().items()},
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state(np.random.get_state()),
                "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
            },
        }

    def save(self, engine: Any) -> None:
        state = self.state(engine)
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def load(self, engine: Any) -> None:
        if not self.path.is_file():
            logger.info("no checkpoint at %s: training starts from epoch 1", self.path.name)
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file must not end in a pickle traceback
            raise MedtlError(
                f"cannot resume from this checkpoint ({exc.__class__.__name__})",
                path=self.path.name,
                hint="it was damaged or written by something else; delete it to start over",
            ) from None
        if state.get("format") != FORMAT or len(state["rng"]["transforms"]) != len(self.transforms):
            raise MedtlError(
                "checkpoint was written by a different training setup",
                path=self.path.name,
                hint="resume with the same recipe and data, or delete it to start over",
            )
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        stateful = self._stateful()
        if set(stateful) != set(state["objects"]):
            raise MedtlError(
                "checkpoint was written by a different training setup (other handlers)",
                path=self.path.name,
                hint="resume with the same configs, or delete it to start over",
            )
        for name, obj in stateful.items():
            obj.load_state_dict(state["objects"][name])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_tuple(rng["numpy"]))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        for transform, saved in zip(self.transforms, rng["transforms"], strict=True):
            transform.R.set_state(_numpy_tuple(saved))
        t = state["trainer"]
        engine.state.epoch, engine.state.iteration = t["epoch"], t["iteration"]
        self.resumed_from = t["epoch"]
        logger.info("resumed from %s after epoch %d of %d", self.path.name, t["epoch"], t["max_epochs"])


__all__ = ["TrainingCheckpoint", "handler_states", "random_transforms"]
