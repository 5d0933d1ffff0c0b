"""FedProx: a proximal term that keeps a site's local update near the global model it received.

Sites differ (scanner, protocol, case mix), so several local epochs on one site's data pull the
weights toward that site and FedAvg then averages updates that disagree (client drift). FedProx
(Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) adds
``mu/2 * ||w - w_global||^2`` to the local loss, ``w_global`` being the weights at the start of the
round. It differs from ``medtl.adapt.train.L2SP`` in its anchor (this round's global model, not the
source) and in covering the head too, which every site trains and FedAvg averages.
"""

from __future__ import annotations

from medtl.adapt.train import L2SP
from medtl.errors import MedtlError


class FedProx(L2SP):
    """Add ``mu/2 * sum ||w - w_global||^2`` over the trainable parameters to every training loss (ignite handler).

    ``w_global`` is snapshot when the trainer starts (the global weights just loaded). It is L2-SP's
    penalty with the head anchored as well; frozen parameters are left out, as there: they cannot
    move, so their term is zero and only costs time.

    Examples:
        A round of local training that may not drift far from the global model::

            fit(network, train_loader, optimizer=optimizer, max_epochs=2, handlers=[FedProx(0.01)])
    """

    def __init__(self, mu: float) -> None:
        if not float(mu) >= 0:
            raise MedtlError(f"the FedProx mu must be >= 0, got {mu}")
        super().__init__(mu, anchor_head=True)

    @property
    def mu(self) -> float:
        return self.beta


__all__ = ["FedProx"]
