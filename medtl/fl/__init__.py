"""Federated fine-tuning with NVIDIA FLARE: one model adapted to several sites whose scans never leave them.

``medtl fl`` (``medtl.fl.job``) builds an NVFlare job: the server runs FedAvg (FedProx with
``--fedprox-mu``) from the source weights, each site runs ``medtl/fl/client.py`` through NVFlare's
Client API on its own manifest, and the final global model is evaluated at every site and exported
as a medtl bundle. ``schedule`` (freeze -> unfreeze keyed on the global round) and ``fedprox`` (the
proximal term) are plain PyTorch/ignite pieces that need no NVFlare.

NVFlare is an optional dependency (``pip install medtl[fl]``): nothing outside this package imports
it, and inside it is imported where a job is built or a site runs, through ``require_nvflare``.
"""

from __future__ import annotations

from medtl.errors import MedtlError

#: The NVFlare release whose job API this package is written against (FedAvg's ``fedprox_mu``
#: contract, the server's ``metrics/round_metrics.jsonl``, ScriptRunner's in-process mode).
MIN_NVFLARE = (2, 9)


def require_nvflare() -> None:
    """Fail with a one-line error and the install hint when NVFlare is missing or too old."""
    try:
        import nvflare
    except ImportError:
        raise MedtlError(
            "federated fine-tuning needs NVIDIA FLARE, which is not installed", hint="pip install medtl[fl]"
        ) from None
    found = tuple(int(p) for p in nvflare.__version__.split(".")[:2] if p.isdigit())
    if found < MIN_NVFLARE:
        wanted = ".".join(map(str, MIN_NVFLARE))
        raise MedtlError(
            f"federated fine-tuning needs NVIDIA FLARE >= {wanted}, found {nvflare.__version__}",
            hint="pip install -U medtl[fl]",
        )


__all__ = ["MIN_NVFLARE", "require_nvflare"]
