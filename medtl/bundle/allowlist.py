"""What a bundle received from another site may name: exact, fully qualified lists.

The audit (``medtl.bundle.audit``) accepts a ``_target_`` only when its string is one of
``TARGETS`` and a call in a ``$`` expression only when its dotted name is one of ``CALLS``. Nothing
is matched by prefix: ``torch.cuda.is_available`` is allowed, ``torch.os.system`` (the same walk
from an allowed module) is not. Each entry was chosen because a classification bundle needs it and
it neither runs programs nor unpickles files with the arguments the audit lets through
(``ARGUMENT_RULES``). A site that needs more says ``--trust`` for a sender it knows.
"""

from __future__ import annotations

from typing import Any

_TRANSFORMS = (
    "Compose",
    "LoadImaged",
    "EnsureChannelFirstd",
    "EnsureTyped",
    "Orientationd",
    "Spacingd",
    "ScaleIntensityRanged",
    "ScaleIntensityd",
    "NormalizeIntensityd",
    "CropForegroundd",
    "Resized",
    "ResizeWithPadOrCropd",
    "SpatialPadd",
    "CenterSpatialCropd",
    "RandSpatialCropd",
    "RandFlipd",
    "RandRotate90d",
    "RandRotated",
    "RandZoomd",
    "RandAffined",
    "RandGaussianNoised",
    "RandScaleIntensityd",
    "RandShiftIntensityd",
    "ConcatItemsd",
    "CopyItemsd",
    "DeleteItemsd",
    "SelectItemsd",
    "CastToTyped",
    "ToTensord",
    "Activationsd",
    "AsDiscreted",
    "Activations",
    "AsDiscrete",
    "ResampleToMatchd",  # resamples one image onto another's grid (the lesion mask onto the CT)
)
_HANDLERS = (
    "CheckpointLoader",
    "CheckpointSaver",
    "StatsHandler",
    "TensorBoardStatsHandler",
    "ValidationHandler",
    "EarlyStopHandler",
    "LrScheduleHandler",
    "ROCAUC",
    "ClassificationSaver",
    "MetricsSaver",
    "from_engine",
    "stopping_fn_from_metric",
)
_NETS = (
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet200",
    "ResNet",
    "DenseNet121",
    "DenseNet169",
    "DenseNet201",
    "EfficientNetBN",
    "SEResNet50",
    # segmentation networks, whose bundles are sources for medtl.encoders (none downloads anything)
    "SegResNet",
    "BasicUNet",
    "UNet",
    "SwinUNETR",
)

#: ``_target_`` values a received bundle may use.
TARGETS: frozenset[str] = frozenset(
    {
        *(f"monai.transforms.{n}" for n in _TRANSFORMS),
        *(f"monai.handlers.{n}" for n in _HANDLERS),
        *(f"monai.networks.nets.{n}" for n in _NETS),
        "monai.data.Dataset",
        "monai.data.CacheDataset",
        "monai.data.PersistentDataset",
        "monai.data.DataLoader",
        "monai.data.DistributedSampler",
        "monai.data.ITKReader",
        "monai.data.NibabelReader",
        "monai.data.PydicomReader",
        "monai.engines.SupervisedTrainer",
        "monai.engines.SupervisedEvaluator",
        "monai.inferers.SimpleInferer",
        "monai.inferers.SlidingWindowInferer",
        "monai.utils.set_determinism",
        "ignite.metrics.Accuracy",
        "torch.nn.CrossEntropyLoss",
        "torch.nn.BCEWithLogitsLoss",
        "torch.nn.parallel.DistributedDataParallel",
        "torch.optim.SGD",
        "torch.optim.Adam",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "torch.optim.lr_scheduler.StepLR",
        "torch.optim.lr_scheduler.MultiStepLR",
        "torch.optim.lr_scheduler.LinearLR",
        # medtl's own components, as its bundles reference them
        "medtl.adapt.adabn.adabn",
        "medtl.adapt.distill.DistillBatch",
        "medtl.adapt.distill.DistillationLoss",
        "medtl.adapt.resume.TrainingCheckpoint",
        "medtl.adapt.schedule.FineTuneSchedule",
        "medtl.adapt.schedule.param_groups",
        "medtl.adapt.train.L2SP",
        "medtl.adapt.train.PlainBatch",
        "medtl.adapt.placement.place_network",
        "medtl.bundle.components.MetricsReport",
        "medtl.bundle.components.PredictionWriter",
        "medtl.bundle.components.channel_names",
        "medtl.bundle.components.class_names",
        "medtl.bundle.components.configure_torch",
        "medtl.bundle.components.datalist",
        "medtl.bundle.components.inference_cases",
        "medtl.bundle.components.load_bundle_network",
        "medtl.bundle.components.load_source",
        "medtl.bundle.components.prepare_cases",
        "medtl.bundle.components.run_record",
        "medtl.bundle.components.teacher_labeled",
        "medtl.bundle.components.require_cases",
        "medtl.bundle.components.require_inputs",
        "medtl.bundle.distributed.device",
        "medtl.bundle.distributed.start",
        "medtl.bundle.distributed.finish",
        "medtl.bundle.distributed.rank_handlers",
        "medtl.cache.cached_dataset",
        "medtl.encoders.BasicUNetEncoder",
        "medtl.encoders.SegResNetEncoder",
        "medtl.encoders.SwinUNETREncoder",
        "medtl.encoders.UNetEncoder",
        "medtl.inferers.FlipInferer",
        "medtl.loading.data_loader",
        "medtl.reader.LoadVolumed",
        "medtl.transforms.preprocessing",
        "medtl.transforms.train_transforms",
    }
)

#: Callables a ``$`` expression may call, by the dotted name written in it. The roots are the
#: names MONAI's ``ConfigParser`` defines for every expression (``torch``, ``monai``) and builtins;
#: none that loops or allocates by a number it is given (``range``, ``sum``).
CALLS: frozenset[str] = frozenset(
    {
        "len",
        "str",
        "int",
        "float",
        "bool",
        "min",
        "max",
        "abs",
        "round",
        "list",
        "tuple",
        "dict",
        "sorted",
        "any",
        "all",
        "torch.device",
        "torch.cuda.is_available",
        "torch.cuda.device_count",
        "torch.cuda.set_device",
        "torch.distributed.is_available",
        "torch.distributed.is_initialized",
        "torch.distributed.get_rank",
        "torch.distributed.get_world_size",
        "monai.handlers.from_engine",
        "monai.handlers.stopping_fn_from_metric",
        "monai.utils.set_determinism",
        "monai.data.load_decathlon_datalist",  # reads a JSON case list (json.load), nothing else
    }
)
#: Module attributes an expression may read without calling them.
VALUES: frozenset[str] = frozenset({"torch.float32", "torch.float16", "torch.bfloat16", "torch.int64", "torch.long"})
#: Methods an expression may call on a config reference (``@evaluator.run()``): the workflow's own
#: verbs on objects the allow-listed components built.
METHODS: frozenset[str] = frozenset(
    {"run", "parameters", "to", "attach", "set_trainer", "eval", "keys", "values", "items", "get"}
)
#: Fields an expression may read on a config reference (``@resume_state.resuming``).
FIELDS: frozenset[str] = frozenset({"resuming"})

#: Image readers ``LoadImage(d)`` may be given by name. MONAI looks any other string up as a dotted
#: path and calls it with the transform's keyword arguments.
READERS: frozenset[str] = frozenset({"ITKReader", "NibabelReader", "PydicomReader", "NrrdReader", "PILReader"})


def _reader_rule(value: Any) -> str | None:
    if value is None or isinstance(value, str) and value in READERS:
        return None
    if isinstance(value, dict) and value.get("_target_") in TARGETS:
        return None  # an allow-listed reader component, audited as such
    return f"reader must be one of {', '.join(sorted(READERS))} (MONAI imports and calls any other name)"


#: Per-argument rules wherever the argument appears: a function of the value giving the reason to
#: refuse it, or None. MONAI's loaders default to safe loading; these arguments turn it off or
#: name code to run.
ARGUMENT_RULES = {
    "weights_only": lambda v: None if v is True else "weights_only must stay true: anything else unpickles code",
    "allow_pickle": lambda v: None if v is False else "allow_pickle must stay false: anything else unpickles code",
    "pickle_module": lambda v: "a custom pickle module runs code",
    "reader": _reader_rule,
    # MONAI's networks download weights when asked: a received bundle's come in models/, checked
    "pretrained": lambda v: None if v is False else "pretrained must stay false: anything else downloads weights",
    # a spawned or forkserver worker is a fresh Python that the run's confinement does not reach; forked ones inherit it
    "multiprocessing_context": lambda v: (
        None if v in (None, "fork") else "multiprocessing_context must stay unset: spawned workers run unconfined"
    ),
}
#: Keyword arguments refused in any call or component: they switch safety checks off.
DENIED_KEYWORDS = frozenset({"trust", "unsafe", "trust_remote_code", "pickle_module"})

__all__ = ["ARGUMENT_RULES", "CALLS", "DENIED_KEYWORDS", "FIELDS", "METHODS", "READERS", "TARGETS", "VALUES"]
