"""Settings of a federated fine-tuning run, shared by the job that sends them and the sites that read them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from medtl.adapt.schedule import UNFREEZE_MODES
from medtl.errors import MedtlError
from medtl.fl.schedule import RoundSchedule
from medtl.transforms import LEVELS


@dataclass(frozen=True)
class FederatedRecipe:
    """FedAvg rounds of local fine-tuning with medtl's freeze -> unfreeze schedule, optionally FedProx.

    Rates and the schedule follow ``FineTuneRecipe`` with epochs counted in rounds: the head alone
    at ``head_lr`` for ``head_rounds``, then layer groups unfreezing from the top at
    ``lr * lr_decay**depth``. ``fedprox_mu`` > 0 adds FedProx's proximal term toward each round's
    global model. AdaBN and L2-SP are left out: BatchNorm statistics are averaged by FedAvg like
    every other tensor, and FedProx is the federated counterpart of L2-SP's pull.

    Examples:
        Five rounds of two local epochs, the head alone in the first, FedProx on::

            FederatedRecipe(rounds=5, local_epochs=2, head_rounds=1, fedprox_mu=0.01)
    """

    rounds: int = 5
    local_epochs: int = 2
    head_rounds: int = 1
    unfreeze: str = "gradual"
    unfreeze_every: int = 1
    head_lr: float = 1e-3
    lr: float = 1e-4
    lr_decay: float = 0.5
    fedprox_mu: float = 0.0
    batch_size: int = 8
    augment: str = "light"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.batch_size < 1:
            raise MedtlError(f"need rounds >= 1 and batch_size >= 1, got rounds={self.rounds}, batch_size={self.batch_size}")
        if not self.fedprox_mu >= 0:
            raise MedtlError(f"--fedprox-mu must be >= 0 (0: plain FedAvg), got {self.fedprox_mu}")
        if self.unfreeze not in UNFREEZE_MODES:
            raise MedtlError(f"unfreeze must be one of {', '.join(UNFREEZE_MODES)}, got {self.unfreeze!r}")
        if self.augment not in LEVELS:
            raise MedtlError(f"augment must be one of {', '.join(LEVELS)}, got {self.augment!r}")
        if min(self.head_lr, self.lr) <= 0 or not 0 < self.lr_decay <= 1:
            raise MedtlError(f"need head_lr > 0, lr > 0 and 0 < lr_decay <= 1, got {self.head_lr}, {self.lr}, {self.lr_decay}")
        self.schedule()  # checks head_rounds, unfreeze_every, local_epochs

    def schedule(self) -> RoundSchedule:
        """The round-keyed freeze -> unfreeze schedule every site follows."""
        return RoundSchedule(head_rounds=self.head_rounds, unfreeze=self.unfreeze, unfreeze_every=self.unfreeze_every,
                             local_epochs=self.local_epochs, head_lr=self.head_lr)

    def to_json(self) -> str:
        """The recipe as the one script argument the job hands every site."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FederatedRecipe:
        """The recipe a site was handed by ``to_json``."""
        return cls(**json.loads(text))


__all__ = ["FederatedRecipe"]
