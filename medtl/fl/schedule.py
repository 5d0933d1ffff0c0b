"""The freeze -> unfreeze schedule of a federated run, keyed on the global round.

A site only sees one round at a time, but the schedule must be the one ``FineTuneSchedule`` would
follow over the whole run, or sites would unfreeze at different times and FedAvg would average a
trained layer with a frozen one. So round ``r`` (0-based, as NVFlare counts) with ``E`` local
epochs is global epochs ``r*E + 1 .. r*E + E`` of one ``FineTuneSchedule`` whose phases are
stated in rounds: the head alone for ``head_rounds``, then a layer group more every
``unfreeze_every`` rounds (or all at once). Every site derives the same state from the round number
it receives, so nothing about the schedule travels but that number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ignite.engine import Events

from medtl.adapt.schedule import FineTuneSchedule
from medtl.errors import MedtlError
from medtl.recipes import FederatedRecipe


class RoundSchedule:
    """``FineTuneSchedule`` stretched over rounds; ``for_round(r)`` is the ignite handler of round ``r``.

    Args:
        head_rounds: rounds in which only the (new) head trains on the frozen backbone.
        unfreeze: ``"gradual"`` (one layer group more every ``unfreeze_every`` rounds, from the top)
            or ``"all"`` (every group once the head rounds are over).
        unfreeze_every: rounds between two gradual unfreezing steps.
        local_epochs: epochs each site trains per round.
        head_lr: the head's learning rate during the head rounds (default: its fine-tune rate).

    Examples:
        Two head rounds, then layer4, layer3, ... one more per round, two local epochs each::

            schedule = RoundSchedule(head_rounds=2, unfreeze="gradual", local_epochs=2)
            schedule.trainable(2, ["stem", "layer1", "layer2", "layer3", "layer4", "head"])  # ['layer4', 'head']
            fit(network, train_loader, optimizer=optimizer, max_epochs=2, handlers=[schedule.for_round(2)])
    """

    def __init__(
        self,
        *,
        head_rounds: int = 1,
        unfreeze: str = "gradual",
        unfreeze_every: int = 1,
        local_epochs: int = 1,
        head_lr: float | None = None,
    ) -> None:
        if int(head_rounds) < 0 or int(unfreeze_every) < 1 or int(local_epochs) < 1:
            raise MedtlError(
                f"need head_rounds >= 0, unfreeze_every >= 1 and local_epochs >= 1; "
                f"got {head_rounds}, {unfreeze_every}, {local_epochs}"
            )
        self.local_epochs = int(local_epochs)
        self.epochs = FineTuneSchedule(
            head_epochs=int(head_rounds) * self.local_epochs,
            head_lr=head_lr,
            unfreeze=unfreeze,
            unfreeze_every=int(unfreeze_every) * self.local_epochs,
        )

    @classmethod
    def for_recipe(cls, recipe: FederatedRecipe) -> RoundSchedule:
        """The round-keyed freeze -> unfreeze schedule every site of a federated run follows."""
        return cls(
            head_rounds=recipe.head_rounds,
            unfreeze=recipe.unfreeze,
            unfreeze_every=recipe.unfreeze_every,
            local_epochs=recipe.local_epochs,
            head_lr=recipe.head_lr,
        )

    def global_epoch(self, round_: int, local_epoch: int) -> int:
        """The 1-based epoch of the whole run that ``local_epoch`` (1-based) of 0-based ``round_`` is."""
        if round_ < 0 or not 1 <= local_epoch <= self.local_epochs:
            raise MedtlError(
                f"round must be >= 0 and local epoch in 1..{self.local_epochs}, got {round_}, {local_epoch}"
            )
        return round_ * self.local_epochs + local_epoch

    def trainable(self, round_: int, groups: Sequence[str]) -> list[str]:
        """The layer groups (input to output, head last) that train in ``round_``. Unfreezing steps
        are whole rounds, so the set is the same in every local epoch of a round."""
        return list(groups[len(groups) - self.epochs.trainable(self.global_epoch(round_, 1), len(groups)) :])

    def for_round(self, round_: int) -> _AtRound:
        """The trainer handler for ``round_``: sets trainable groups, BatchNorm mode and learning
        rates at each local epoch, and leaves every parameter trainable when the round ends."""
        if round_ < 0:
            raise MedtlError(f"rounds count from 0, got {round_}")
        return _AtRound(self, round_)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every change of trainable groups so far (global epoch, groups, learning rates)."""
        return self.epochs.history


class _AtRound:
    """Ignite handler applying a ``RoundSchedule`` at the global epochs of one round."""

    def __init__(self, schedule: RoundSchedule, round_: int) -> None:
        self.schedule = schedule
        self.round = round_

    def attach(self, engine: Any) -> None:

        engine.add_event_handler(Events.EPOCH_STARTED, self._on_epoch)
        engine.add_event_handler(Events.COMPLETED, lambda e: self.schedule.epochs.release(e.network))

    def _on_epoch(self, engine: Any) -> None:
        epoch = self.schedule.global_epoch(self.round, engine.state.epoch)
        self.schedule.epochs.apply(engine.network, engine.optimizer, epoch)


__all__ = ["RoundSchedule"]
