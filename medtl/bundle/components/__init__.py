"""What medtl's bundle configs name by ``_target_`` or ``$`` expression beyond MONAI's own parts.

One module per concern: ``data`` (cases and class names from manifests), ``runs`` (seeding, the run
record), ``source`` (pretrained weights, a teacher's labels), ``inputs`` (DICOM folders and CSVs to
predict) and ``handlers`` (metrics and prediction writers). Configs name them through this package
(``medtl.bundle.components.datalist``), as MONAI's configs name ``monai.transforms.LoadImaged``,
so a bundle does not depend on which module holds a part.

Every file written is written atomically; nothing written names a patient or holds an absolute
path: input folders, which PACS exports often name after the patient, appear as salted keys
(``dir-3f2a...``) unless a run asks for ``real_ids``, and CSV cells a spreadsheet would read as a
formula are written as text.
"""

from medtl.bundle.components.data import channel_names, class_names, datalist
from medtl.bundle.components.handlers import MetricsReport, PredictionWriter
from medtl.bundle.components.inputs import inference_cases, prepare_cases, require_cases, require_inputs
from medtl.bundle.components.runs import configure_torch, run_record
from medtl.bundle.components.source import (
    load_bundle_network,
    load_source,
    teacher_labeled,
)

__all__ = [
    "MetricsReport",
    "PredictionWriter",
    "channel_names",
    "class_names",
    "configure_torch",
    "datalist",
    "inference_cases",
    "load_bundle_network",
    "load_source",
    "prepare_cases",
    "require_cases",
    "require_inputs",
    "run_record",
    "teacher_labeled",
]
