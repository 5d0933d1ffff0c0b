"""Every recipe medtl trains with, in one place: plain training, fine-tuning, distillation and
federated fine-tuning, with their defaults and the choices they accept.

Frozen dataclasses whose fields are declared with ``medtl.options.knob``: the command line
generates its options from them (``medtl adapt --lr``, ``medtl fl --rounds``), the bundles' knobs
are checked against them (``tests/test_recipes.py``), and the code that runs a recipe reads it.
This module imports nothing heavy, so ``medtl --help`` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from medtl.errors import MedtlError
from medtl.options import knob

AUGMENT_LEVELS = ("none", "light", "strong")  # medtl.transforms.augmentation
UNFREEZE_MODES = ("all", "gradual")  # medtl.adapt.schedule.FineTuneSchedule
SELECTIONS = ("kfold", "val")  # medtl.adapt.recipe.finetune


@dataclass(frozen=True)
class TrainRecipe:
    """Plain supervised training (a source model, or a target model from scratch): AdamW, cosine decay."""

    epochs: int = knob(30, "most training epochs")
    lr: float = knob(1e-3, "AdamW learning rate, decayed by a cosine to the end")
    weight_decay: float = knob(1e-4, "AdamW weight decay")
    batch_size: int = knob(16, "cases per training step")
    augment: str = knob("light", "augmentation level", choices=AUGMENT_LEVELS)
    patience: int | None = knob(None, "stop after this many epochs without a better validation AUC (none: never)")
    selection: str = knob(
        "val",
        "val: best epoch on the val split; kfold: epoch count by patient-level k-fold on train+val, "
        "then trained on both",
        choices=SELECTIONS,
    )
    folds: int = knob(3, "folds of the k-fold selection")
    channels_last: bool = knob(False, "channels-last layout: faster convolutions on CPUs, same arithmetic")
    bf16: bool = knob(False, "bfloat16 autocast: faster still, lower precision (benchmarks/precision.py)")


@dataclass(frozen=True)
class FineTuneRecipe:
    """Adapting a source model on few target labels without losing what it learned.

    Defaults: AdaBN on the target's scans (always, as the bundles do; ``adabn_judged`` keeps it
    only when it does not lower the AUC on the labeled cases); the new head alone for
    ``head_epochs``, then layer groups unfreezing from the top at ``lr * lr_decay**depth``, L2-SP
    toward the source weights; at the end the weights are averaged with the starting point's
    (``wise``, WiSE-FT). On the demo cohort (``benchmarks/adaptation.py``, 3 seeds) judging AdaBN on
    48 labeled cases discarded it where it helped, and fine-tuning alone ranged from -0.04 to +0.05
    AUC against source-only; averaging halved the losses (docs/benchmarks.md).

    ``selection`` says what the recipe's choices are made on. ``"kfold"`` (default) pools the
    target's labeled train and val cases: the number of epochs is the one whose mean validation AUC
    over ``folds`` patient-level folds is highest (0, the unadapted model, included when
    ``keep_source``), and the model is then trained on every labeled case for that many epochs
    (with ``adabn_judged``, AdaBN is judged on all of them). ``"val"`` makes the same choices on the
    val split alone (best epoch, early stopping after ``patience``), as a bundle's ``train.json``
    does. ``naive()`` is the plain full fine-tune it is compared with.
    """

    epochs: int = knob(30, "most fine-tuning epochs (k-fold selection picks how many of them)")
    head_epochs: int = knob(5, "epochs in which only the new head trains, the backbone frozen")
    head_lr: float = knob(1e-3, "learning rate of the head in the head epochs")
    lr: float = knob(1e-4, "learning rate of the head after them; layer groups further down get lr * lr_decay^depth")
    lr_decay: float = knob(0.5, "learning-rate factor per layer group away from the head")
    unfreeze: str = knob(
        "gradual",
        "after the head epochs, one layer group more every unfreeze_every epochs, or all at once",
        choices=UNFREEZE_MODES,
    )
    unfreeze_every: int = knob(2, "epochs between gradual unfreezing steps")
    warmup_epochs: float = knob(1.0, "linear learning-rate warm-up after each unfreezing")
    l2sp: float = knob(0.01, "L2-SP weight pulling the backbone toward the source weights")
    adabn: bool = knob(True, "re-estimate BatchNorm statistics on the target's scans (AdaBN) before fine-tuning")
    adabn_judged: bool = knob(False, "keep AdaBN only when it does not lower the AUC on the labeled cases")
    keep_source: bool = knob(True, "let the selection choose 0 epochs: the unadapted model")
    wise: float = knob(
        0.5, "weight of the fine-tuned weights averaged with the starting point's (WiSE-FT); 1: no averaging"
    )
    selection: str = knob(
        "kfold",
        "kfold: choices by patient-level k-fold over the labeled train+val cases; val: on the val split",
        choices=SELECTIONS,
    )
    folds: int = knob(3, "folds of the k-fold selection")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    batch_size: int = knob(8, "cases per training step")
    augment: str = knob("light", "augmentation level", choices=AUGMENT_LEVELS)
    patience: int | None = knob(10, "early stopping with selection val: epochs without a better val AUC (none: never)")
    channels_last: bool = knob(False, "channels-last layout: faster convolutions on CPUs, same arithmetic")
    bf16: bool = knob(False, "bfloat16 autocast: faster still, lower precision (benchmarks/precision.py)")

    @classmethod
    def naive(cls, **overrides: Any) -> FineTuneRecipe:
        """Every layer trains from the first step at one rate: the textbook fine-tune."""
        options = dict(
            head_epochs=0,
            lr=1e-3,
            lr_decay=1.0,
            unfreeze="all",
            warmup_epochs=0.0,
            l2sp=0.0,
            adabn=False,
            keep_source=False,
            selection="val",
            weight_decay=1e-4,
            patience=None,
            wise=1.0,
        )
        return cls(**{**options, **overrides})


@dataclass(frozen=True)
class DistillRecipe:
    """A student learning from the teacher's soft outputs and confident pseudo-labels."""

    epochs: int = knob(40, "most distillation epochs (early stopping after patience)")
    lr: float = knob(1e-3, "AdamW learning rate")
    weight_decay: float = knob(1e-4, "AdamW weight decay")
    alpha: float = knob(0.5, "weight of the teacher's soft targets against the hard labels")
    temperature: float = knob(4.0, "softmax temperature of the KL term")
    threshold: float = knob(0.8, "teacher probability from which an unlabeled scan gets a pseudo-label")
    keep_uncertain: bool = knob(True, "keep unlabeled scans below the threshold with soft targets only")
    batch_size: int = knob(16, "cases per training step")
    augment: str = knob("light", "augmentation level", choices=AUGMENT_LEVELS)
    patience: int | None = knob(15, "stop after this many epochs without a better val AUC (none: never)")
    channels_last: bool = knob(False, "channels-last layout: faster convolutions on CPUs, same arithmetic")
    bf16: bool = knob(False, "bfloat16 autocast: faster still, lower precision (benchmarks/precision.py)")


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

    rounds: int = knob(5, "FedAvg rounds")
    local_epochs: int = knob(2, "epochs each site trains per round")
    head_rounds: int = knob(1, "rounds in which only the classifier head trains")
    unfreeze: str = knob(
        "gradual",
        "after the head rounds, one layer group more every unfreeze_every rounds, or all at once",
        choices=UNFREEZE_MODES,
    )
    unfreeze_every: int = knob(1, "rounds between gradual unfreezing steps")
    head_lr: float = knob(1e-3, "learning rate of the head in the head rounds")
    lr: float = knob(1e-4, "learning rate of the head after the head rounds; lower layers get lr * lr_decay^depth")
    lr_decay: float = knob(0.5, "learning-rate factor per layer group away from the head")
    fedprox_mu: float = knob(0.0, "FedProx proximal weight mu (0: plain FedAvg)")
    batch_size: int = knob(8, "local batch size")
    augment: str = knob("light", "augmentation level", choices=AUGMENT_LEVELS)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.batch_size < 1:
            raise MedtlError(
                f"need rounds >= 1 and batch_size >= 1, got rounds={self.rounds}, batch_size={self.batch_size}"
            )
        if not self.fedprox_mu >= 0:
            raise MedtlError(f"--fedprox-mu must be >= 0 (0: plain FedAvg), got {self.fedprox_mu}")
        if self.unfreeze not in UNFREEZE_MODES:
            raise MedtlError(f"unfreeze must be one of {', '.join(UNFREEZE_MODES)}, got {self.unfreeze!r}")
        if self.augment not in AUGMENT_LEVELS:
            raise MedtlError(f"augment must be one of {', '.join(AUGMENT_LEVELS)}, got {self.augment!r}")
        if min(self.head_lr, self.lr) <= 0 or not 0 < self.lr_decay <= 1:
            raise MedtlError(
                f"need head_lr > 0, lr > 0 and 0 < lr_decay <= 1, got {self.head_lr}, {self.lr}, {self.lr_decay}"
            )
        if self.head_rounds < 0 or self.unfreeze_every < 1 or self.local_epochs < 1:
            raise MedtlError(
                f"need head_rounds >= 0, unfreeze_every >= 1 and local_epochs >= 1; got {self.head_rounds}, "
                f"{self.unfreeze_every}, {self.local_epochs}"
            )

    def to_json(self) -> str:
        """The recipe as the one script argument the job hands every site."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FederatedRecipe:
        """The recipe a site was handed by ``to_json``."""
        return cls(**json.loads(text))


__all__ = [
    "AUGMENT_LEVELS",
    "SELECTIONS",
    "UNFREEZE_MODES",
    "DistillRecipe",
    "FederatedRecipe",
    "FineTuneRecipe",
    "TrainRecipe",
]
