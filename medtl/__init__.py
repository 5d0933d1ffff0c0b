"""medtl: adapt pretrained networks to local DICOM/NIfTI data for tumor classification."""

from importlib.metadata import PackageNotFoundError, version

from medtl.errors import MedtlError

try:
    __version__ = version("medtl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["MedtlError", "__version__"]
