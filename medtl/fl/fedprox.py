"""FedProx: a proximal term that keeps a site's local update near the global model it received.

Sites differ (scanner, protocol, case mix), so several local epochs on one site's data pull the
weights toward that site and FedAvg then averages updates that disagree (client drift). FedProx
(Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) adds
``mu/2 * ||w - w_global||^2`` to the local loss, ``w_global`` being the weights at the start of the
round. It differs from ``medtl.adapt.train.L2SP`` in its anchor (this round's global model, not the
source) and in covering the head too, which every site trains and FedAvg averages.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from medtl.errors import MedtlError


class FedProx:
    """Add ``mu/2 * sum ||w - w_global||^2`` over the trainable parameters to every training loss (ignite handler).

    ``w_global`` is snapshot when the trainer starts (the global weights just loaded). Frozen
    parameters are left out: they cannot move, so their term is zero and only costs time.

    Examples:
        A round of local training that may not drift far from the global model::

            fit(network, train_loader, optimizer=optimizer, max_epochs=2, handlers=[FedProx(0.01)])
    """

    def __init__(self, mu: float) -> None:
        if not float(mu) >= 0:
            raise MedtlError(f"the FedProx mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self._pairs: list[tuple[nn.Parameter, torch.Tensor]] = []

    def bind(self, network: nn.Module) -> None:
        """Snapshot the global weights of ``network`` (called when the round's training starts)."""
        self._pairs = [(p, p.detach().clone()) for p in network.parameters()]

    def penalty(self) -> torch.Tensor:
        """The proximal term for the current weights."""
        terms = [((p - p0) ** 2).sum() for p, p0 in self._pairs if p.requires_grad]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else torch.zeros(())

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self.bind(e.network))
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._add)

    def _add(self, engine: Any) -> None:
        if self.mu:
            engine.state.output[CommonKeys.LOSS] = engine.state.output[CommonKeys.LOSS] + self.penalty()


__all__ = ["FedProx"]
