"""``medtl`` command line: parse, call one library function, print. User errors print one line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtl import __version__
from medtl.bundle.files import MAX_UNPACKED_BYTES
from medtl.errors import MedtlError
from medtl.options import add_recipe_options, recipe_from_args
from medtl.recipes import DistillRecipe, FederatedRecipe, FineTuneRecipe


def _scan(args: argparse.Namespace) -> int:
    from medtl.dicom import write_scan_index

    index = write_scan_index(args.dir, args.output, real_ids=args.real_ids, progress=not args.quiet)
    s = index["summary"]
    print(
        f"{s['files']} files: {s['series']} series ({s['loadable_series']} loadable), "
        f"{s['skipped_files']} skipped -> {args.output}"
    )
    for series in index["series"]:
        flags = "; ".join(p["message"] for p in series["problems"]) or "ok"
        shape = "x".join(str(v) for v in series["shape"])
        print(
            f"  {series['series_key']}  {series['modality']:<3} {series['num_instances']:>4} files  {shape:<12} "
            f"{'' if series['loadable'] else 'NOT LOADABLE: '}{flags}"
        )
    for item in index["skipped"]:
        print(f"  skipped {item['path']}: {item['reason']}")
    if index["skipped"] and not args.real_ids:
        print("  (folders are named by salted keys, dir-...; `medtl scan --real-ids` names them as they are on disk)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from medtl.nifti import write_nifti
    from medtl.reader import load_volume

    volume = load_volume(args.series_dir, series=args.series)
    write_nifti(volume, args.output)
    spacing = ", ".join(f"{v:.3g}" for v in volume.spacing)
    print(f"wrote {args.output}: shape {volume.shape}, spacing ({spacing}) mm, RAS")
    return 0


def _identifiers(args: argparse.Namespace) -> set[str]:
    from medtl.privacy import identifiers_from_dicom

    return identifiers_from_dicom(args.identifiers_from) if args.identifiers_from else set()


def _bundle_verify(args: argparse.Namespace) -> int:
    from medtl.bundle.verify import verify_bundle

    report = verify_bundle(
        args.path,
        trust=args.trust,
        identifiers=_identifiers(args),
        trusted_keys=args.trusted_keys,
        max_bytes=_mib(args.max_size),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


def _bundle_pack(args: argparse.Namespace) -> int:
    from medtl.bundle.share import pack_bundle

    result = pack_bundle(
        args.dir, args.output, identifiers=_identifiers(args), sign_key=args.sign_key, signer=args.signer
    )
    print(result["verification"].table())
    signed = (
        f", signed by {result['signature'].signer!r} (key {result['signature'].fingerprint})"
        if result["signature"]
        else ""
    )
    print(f"packed {result['files']} files{signed} -> {result['path']}")
    return 0


def _bundle_keygen(args: argparse.Namespace) -> int:
    from medtl.bundle.signing import generate_key

    private, public = generate_key(args.out, args.name)
    print(f"private key (keep it at your site; pack --sign-key) -> {private}")
    print(f"public key (give it to the sites that receive your bundles; --trusted-keys) -> {public}")
    return 0


def _mib(value: float) -> int:
    return int(value * (1 << 20))


def _bundle_import(args: argparse.Namespace) -> int:
    from medtl.bundle.share import import_bundle

    result = import_bundle(
        args.path,
        args.to,
        trust=args.trust,
        replace=args.replace,
        trusted_keys=args.trusted_keys,
        max_bytes=_mib(args.max_size),
    )
    print(result["verification"].table())
    print(f"imported {result['name']} {result['version']} -> {result['path']}")
    return 0


def _bundle_run(args: argparse.Namespace) -> int:
    from medtl.bundle.run import run_bundle

    rest = list(args.args)
    trust = args.trust or "--trust" in rest
    run_bundle(args.dir, [a for a in rest if a != "--trust"], trust=trust)
    print(f"ran {Path(args.dir).name} confined")
    return 0


def _bundle_diff(args: argparse.Namespace) -> int:
    from medtl.bundle.share import diff_bundles, format_diff

    print(format_diff(diff_bundles(args.a, args.b)))
    return 0


def _parse_fractions(text: str) -> dict[str, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise MedtlError(f"--split takes three fractions train,val,test (e.g. 0.7,0.15,0.15), got {text!r}")
    return dict(zip(("train", "val", "test"), values, strict=True))


def _manifest_build(args: argparse.Namespace) -> int:
    from medtl.manifest import build_manifest_file

    manifest = build_manifest_file(
        labels=args.labels,
        classes=args.classes.split(","),
        out=args.output,
        scan=args.scan,
        root=args.root,
        site=args.site,
        fractions=_parse_fractions(args.split),
        seed=args.seed,
        name=args.name,
        progress=not args.quiet,
    )
    counts = manifest["counts"]
    print(f"{counts['cases']} cases from {counts['patients']} patients -> {args.output}")
    print(json.dumps(counts["by_site_split_label"], indent=2))
    return 0


def _manifest_check(args: argparse.Namespace) -> int:
    from medtl.manifest import check_manifest

    report = check_manifest(args.manifest, args.root, progress=not args.quiet)
    print(f"{report['manifest']}: {report['cases']} cases, {report['files']} files checked")
    for kind in ("missing", "changed", "leakage"):
        for item in report[kind]:
            print(f"  {kind}: {item}")
    print("OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


def _demo_data(args: argparse.Namespace) -> int:
    from medtl.cohort import generate_cohort

    summary = generate_cohort(args.out, seed=args.seed, scale=args.scale, progress=not args.quiet)
    for name, site in summary["sites"].items():
        print(
            f"site {name}: {site['patients']} patients ({site['malignant']} malignant, {site['benign']} benign, "
            f"{site['unlabeled']} without label) -> {Path(args.out) / f'site_{name}'}"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from medtl.demo import run_demo

    run_demo(
        args.out,
        seed=args.seed,
        scale=args.scale,
        source_epochs=args.source_epochs,
        target_epochs=args.target_epochs,
        student_epochs=args.student_epochs,
        progress=not args.quiet,
        device=args.device,
        seeds=args.seeds,
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from medtl.report import render_report

    written = render_report(args.run_dir, args.output)
    print(f"report: {written['html']}")
    print(
        f"markdown: {written['markdown']} ({len(written['figures'])} figures in "
        f"{written['markdown'].parent / 'figures'})"
    )
    return 0


def _weights_inspect(args: argparse.Namespace) -> int:
    from medtl.weights import inspect_checkpoint

    report = inspect_checkpoint(
        args.checkpoint,
        arch=args.arch,
        spatial_dims=args.spatial_dims,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        trust=args.trust,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def _shift(args: argparse.Namespace) -> int:
    from medtl.adapt.shift import format_shift_report, network_from_checkpoint, shift_report

    if (args.checkpoint is None) != (args.arch is None):
        raise MedtlError("--checkpoint and --arch go together: the network is built by name, then the weights loaded")
    models = None
    if args.checkpoint is not None:
        options = {} if args.widen_factor is None else {"widen_factor": args.widen_factor}
        models = {Path(args.checkpoint).name: network_from_checkpoint(args.checkpoint, arch=args.arch, **options)}
    report = shift_report(
        args.source,
        args.target,
        args.root,
        target_root=args.target_root,
        model=models,
        splits=args.split,
        modality=args.modality,
        n_permutations=args.permutations,
        seed=args.seed,
        out=args.output,
        progress=not args.quiet,
    )
    print(format_shift_report(report), end="")
    print(f"-> {args.output}")
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from medtl.adapt.job import run_adapt

    run_adapt(
        args.source,
        args.manifest,
        args.root,
        args.out,
        arch=args.arch,
        spatial_dims=args.spatial_dims,
        in_channels=args.in_channels,
        widen_factor=args.widen_factor,
        modality=args.modality,
        recipe=recipe_from_args(FineTuneRecipe, args),
        student_widen=args.student_widen,
        student=recipe_from_args(DistillRecipe, args, prefix="student_"),
        class_map=args.class_map,
        trust=args.trust,
        resume=args.resume,
        seed=args.seed,
        progress=not args.quiet,
        device=args.device,
    )
    return 0


def _fl(args: argparse.Namespace) -> int:
    from medtl.fl.job import run_federated

    run_federated(
        args.source,
        args.manifest,
        args.root,
        args.out,
        recipe=recipe_from_args(FederatedRecipe, args),
        arch=args.arch,
        spatial_dims=args.spatial_dims,
        in_channels=args.in_channels,
        widen_factor=args.widen_factor,
        modality=args.modality,
        threads=args.threads,
        trust=args.trust,
        seed=args.seed,
        device=args.device,
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from medtl.importers import import_lidc_vois, import_medmnist

    if args.dataset == "lidc":
        summary = import_lidc_vois(args.source, args.output, seed=args.seed, progress=not args.quiet)
        for name, site in summary["sites"].items():
            print(
                f"site {name} ({site['rule']}): {site['cases']} nodules, {site['patients']} patients "
                f"-> {Path(args.output) / site['manifest']}"
            )
    else:
        classes = args.classes.split(",") if args.classes else None
        summary = import_medmnist(args.source, args.output, classes=classes, roi=args.roi, progress=not args.quiet)
        print(
            f"{summary['dataset']}: {summary['cases']} images {summary['image_shape']} ({summary['intensity']}), "
            f"per split and label {summary['by_split_label']} -> {Path(args.output) / summary['manifest']}"
        )
        if "roi" in summary:
            print(
                f"masks: the shape ({summary['roi']['mask']}); a crop of "
                f"{summary['roi']['crop_mm_holding_every_shape']} mm around each holds it whole"
            )
    for item in summary.get("skipped", []):
        print(f"skipped {item.get('file', item.get('row'))}: {item['reason']}")
    print(f"-> {Path(args.output) / 'import.json'}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from medtl.predict import format_predictions, predict

    result = predict(
        args.dicom_dir,
        args.bundle,
        args.output,
        confidence=args.confidence,
        sr=args.sr,
        secondary_capture=args.secondary_capture,
        real_ids=args.real_ids,
        masks=args.masks,
        trust=args.trust,
        progress=not args.quiet,
    )
    print(format_predictions(result))
    if result["dicom"]:
        print(f"{len(result['dicom'])} DICOM objects -> {Path(args.output) / 'dicom'}")
    print(f"-> {Path(args.output) / 'predictions.csv'}, {Path(args.output) / 'predictions.json'}")
    return 0


def _cohort_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the default patient counts (default 1.0)")


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto, cpu, cuda or cuda:N (default auto: the first GPU when CUDA is present, with mixed precision "
        "and pinned memory; else the CPU)",
    )


def _add_scan(verbs: Any) -> None:
    p = verbs.add_parser(
        "scan",
        help="index a DICOM folder (headers only) into a series index JSON",
        description=(
            "Walk DIR recursively, read DICOM headers only and write one record per series (geometry, "
            "transfer syntax, slice-ordered files, problems). Unreadable files are skipped and listed. "
            "Patient/study/series identifiers and folder names are replaced by salted hashes; the "
            "salt (.medtl-salt) is kept beside the output."
        ),
    )
    p.add_argument("dir", help="folder to scan (recursively)")
    p.add_argument("-o", "--output", required=True, help="series index to write, e.g. scan.json")
    p.add_argument(
        "--real-ids",
        action="store_true",
        help="write folder names as they are on disk; by default they are salted keys (dir-...), because export "
        "folders are often named after the patient (`medtl manifest build` finds the folders either way)",
    )
    p.set_defaults(func=_scan)


def _add_convert(verbs: Any) -> None:
    p = verbs.add_parser(
        "convert",
        help="write one DICOM series as NIfTI (canonical RAS, HU)",
        description=(
            "Load one DICOM series (geometric slice order, rescale applied, canonical RAS) and write it as NIfTI."
        ),
    )
    p.add_argument("series_dir", help="folder holding the series (or a single DICOM file)")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. out.nii.gz")
    p.add_argument("--series", help="SeriesNumber or SeriesInstanceUID to pick when the folder holds several series")
    p.set_defaults(func=_convert)


def _add_manifest(verbs: Any) -> None:
    p = verbs.add_parser(
        "manifest",
        help="build or check a data manifest",
        description="Data manifests join images with labels, sites and patient-level splits.",
    )
    msub = p.add_subparsers(
        dest="manifest_verb", metavar="ACTION", required=True, help="build: create a manifest; check: re-verify one"
    )
    b = msub.add_parser(
        "build",
        help="join a scan index and/or NIfTI files with a label table",
        description=(
            "Join a label table (patient_id,label[,series_uid|image][,site,mask,roi_center_mm,roi_size_mm,split]) "
            "with a scan index into a manifest with seeded patient-level splits stratified by site and label. Refuses "
            "unknown labels, missing images, duplicate rows and patients in two splits, naming the rows."
        ),
    )
    b.add_argument("--labels", required=True, help="label table CSV (UTF-8; comma, semicolon or tab separated)")
    b.add_argument("--classes", required=True, help="comma-separated class names in index order, e.g. benign,malignant")
    b.add_argument("--scan", help="series index from `medtl scan` (needed for DICOM series)")
    b.add_argument(
        "--root", help="data root all paths are made relative to (default: common folder of labels and scanned data)"
    )
    b.add_argument("--site", help="site name for rows without a 'site' column value")
    b.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (default 0.7,0.15,0.15)")
    b.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    b.add_argument("--name", help="manifest name (default: label table name)")
    b.add_argument("-o", "--output", required=True, help="manifest JSON to write")
    b.set_defaults(func=_manifest_build)
    c = msub.add_parser("check", help="re-verify a manifest: schema, content hash, leakage, file checksums")
    c.add_argument("manifest", help="manifest JSON")
    c.add_argument("--root", required=True, help="data root the manifest's paths are relative to")
    c.set_defaults(func=_manifest_check)


def _add_demo_data(verbs: Any) -> None:
    p = verbs.add_parser(
        "demo-data",
        help="generate the embedded two-site demo cohort (DICOM + masks + labels)",
        description="Write a deterministic two-site chest-CT lesion cohort as real DICOM series, NIfTI lesion masks "
        "and labels.csv. Site B differs from site A like another scanner (thick slices, blur, noise, HU offset).",
    )
    p.add_argument("out", help="output folder")
    _cohort_options(p)
    p.set_defaults(func=_demo_data)


def _add_demo(verbs: Any) -> None:
    p = verbs.add_parser(
        "demo",
        help="run the main job on the embedded demo cohort",
        description=(
            "Generate the demo cohort if absent, scan both sites and build their manifests; train a source model "
            "on site A, evaluate it on sites A and B, adapt it to site B (AdaBN, then fine-tuning on a few labeled "
            "cases with the freeze->unfreeze schedule), distill a smaller student on site B's unlabeled scans, "
            "export the source and fine-tuned MONAI bundles, run the fine-tuned bundle's inference.json with "
            "python -m monai.bundle run on site-B DICOM folders it never saw, and print each stage's test AUC "
            "and accuracy with 95% CIs and where every artifact is."
        ),
    )
    p.add_argument("--out", default="medtl-demo", help="working folder (default ./medtl-demo)")
    _cohort_options(p)
    p.add_argument("--source-epochs", type=int, default=20, help="epochs of source training on site A (default 20)")
    p.add_argument(
        "--target-epochs",
        type=int,
        default=15,
        help="epochs of fine-tuning on site B; k-fold selection picks how many of them (default 15)",
    )
    p.add_argument(
        "--student-epochs",
        type=int,
        default=15,
        help="most epochs of student distillation (default 15; early stopping)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat fine-tuning and the student with this many seeds and report each "
        "stage's spread (default 1; about 3.5 min per extra seed)",
    )
    _device_option(p)
    p.set_defaults(func=_demo)


def _add_shift(verbs: Any) -> None:
    p = verbs.add_parser(
        "shift",
        help="report the domain shift between a source and a target manifest",
        description=(
            "Compare the cases of two manifests: voxel spacing, image shape, raw intensities (HU for CT) and "
            "intensities of the preprocessed lesion crop, case and label counts. With --checkpoint, also the squared "
            "MMD between the two sites' penultimate features, with a permutation p-value. Cases whose image cannot be "
            "loaded are skipped and listed. The JSON report holds no file paths."
        ),
    )
    p.add_argument("--source", required=True, help="manifest of the source site (the data the network was trained on)")
    p.add_argument("--target", required=True, help="manifest of the target site")
    p.add_argument("--root", required=True, help="data root the manifests' paths are relative to")
    p.add_argument("--target-root", help="data root of the target manifest (default: --root)")
    p.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="trained network weights: adds the feature-space distance between the sites",
    )
    p.add_argument("--arch", help="network name of --checkpoint, e.g. resnet10")
    p.add_argument(
        "--widen-factor",
        type=float,
        help="ResNet width multiplier the checkpoint was trained with (default: the network's)",
    )
    p.add_argument(
        "--split",
        nargs="+",
        default=["train", "val", "test", "unlabeled"],
        help="manifest splits to include (default: train val test unlabeled)",
    )
    p.add_argument("--modality", default="ct", help="ct or mr: crop preprocessing and intensity units (default ct)")
    p.add_argument("--permutations", type=int, default=500, help="permutations of the MMD test (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation test (default 0)")
    p.add_argument("-o", "--output", required=True, help="report JSON to write, e.g. shift.json")
    p.set_defaults(func=_shift)


def _source_options(parser: argparse.ArgumentParser) -> None:
    """What adapt and fl share: the source weights, how far to trust them, the network they fit."""
    parser.add_argument(
        "--source",
        required=True,
        help="a bundle folder or zip (adapted as itself: its own network, inputs and configs), or a raw "
        "checkpoint of --arch: a state dict, training checkpoint, TorchScript or MedicalNet file",
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="allow a source bundle outside the allow-list or a checkpoint that needs pickled code (runs its code)",
    )
    parser.add_argument(
        "--arch",
        metavar="NAME",
        help="the raw checkpoint's architecture (default resnet10), or the one to take a bundle's weights into: "
        "resnet10..resnet200, densenet121/169/201, efficientnet-b0..b7, or a segmentation network's encoder "
        "(segresnet-encoder, unet-encoder, monai-unet-encoder, swinunetr-encoder); medtl.networks.list_networks()",
    )
    parser.add_argument(
        "--spatial-dims", type=int, choices=[2, 3], help="a raw checkpoint's network: 2D or 3D (default 3)"
    )
    parser.add_argument(
        "--in-channels",
        type=int,
        choices=[1, 2],
        help="a raw checkpoint's network input: 1 (the scan) or 2 (the scan and its lesion mask); default 1",
    )
    parser.add_argument(
        "--widen-factor", type=float, help="a raw ResNet checkpoint's width (medtl's own ResNet10: 0.5, the default)"
    )
    parser.add_argument(
        "--modality",
        choices=["ct", "mr"],
        help="intensity preset of a raw checkpoint's inputs (default ct); a source bundle keeps its own",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    _device_option(parser)


def _class_map(text: str) -> dict[str, str] | str:
    """``--class-map low=benign,high=malignant`` (target=source), or ``new``."""
    if text.strip().lower() == "new":
        return "new"
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected TARGET=SOURCE pairs separated by commas, or new; got {text!r}")
    return {target.strip(): source.strip() for target, source in pairs}


def _add_adapt(verbs: Any) -> None:
    p = verbs.add_parser(
        "adapt",
        help="adapt source weights to your own target manifest and export the bundle",
        description=(
            "The demo's adaptation on your data. A source bundle (folder or zip) is imported and verified as "
            "`medtl bundle import` does it and adapted as itself: its own network_def, inputs and configs, exported "
            "as its next minor version. A raw checkpoint is loaded into --arch (a new head when the target has "
            "other classes) and exported as a tumor_cls_finetune bundle that builds that architecture. Mismatches "
            "are refused before any training. Then: scored on the target's test split, AdaBN, fine-tuned on the "
            "target's labeled cases (head first, gradual unfreezing, L2-SP, epochs chosen by k-fold over its labeled "
            "cases, WiSE-FT weight averaging), optionally a smaller student distilled on its unlabeled scans; the "
            "bundle gets TorchScript and ONNX copies where the network allows them."
        ),
    )
    _source_options(p)
    p.add_argument(
        "--manifest", required=True, help="the target site's manifest (train, val and test splits; unlabeled optional)"
    )
    p.add_argument("--root", required=True, help="data root the manifest's paths are relative to")
    p.add_argument("--out", default="medtl-adapt", help="output folder (default ./medtl-adapt)")
    p.add_argument(
        "--class-map",
        type=_class_map,
        metavar="T=S,...",
        help="how the target's classes correspond to a source bundle's when their names differ (target=source pairs), "
        "or new for a new head; classes with the same name are matched without it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue an interrupted fine-tuning from OUT/training_state.pt (saved after "
            "every epoch) with the same arguments"
        ),
    )
    add_recipe_options(p, FineTuneRecipe, title="fine-tuning recipe (medtl.recipes.FineTuneRecipe)")
    p.add_argument(
        "--student-widen",
        type=float,
        help="also distill a student ResNet10 of this width, e.g. 0.25, taking the source's inputs",
    )
    add_recipe_options(
        p, DistillRecipe, prefix="student_", title="student recipe, with --student-widen (medtl.recipes.DistillRecipe)"
    )
    p.set_defaults(func=_adapt)


def _add_fl(verbs: Any) -> None:
    p = verbs.add_parser(
        "fl",
        help="federated fine-tuning of source weights across sites with NVIDIA FLARE (simulator)",
        description=(
            "Fine-tune source weights across several sites whose scans never leave them, with NVIDIA FLARE (pip "
            "install medtl[fl]): the server runs FedAvg (FedProx with --fedprox-mu) from the source weights; "
            "each site, named site-1, site-2, ... in --manifest order, trains on its own manifest with the "
            "freeze->unfreeze schedule keyed on the round (the head alone for --head-rounds, then layer groups "
            "unfrozen from the top) and returns only weights and metrics. Runs the job in NVFlare's simulator on this "
            "machine, has every site evaluate the source and the final global model on its own val/test splits (95% "
            "CIs), prints per-round and per-site tables, and exports the global model as a tumor_cls_finetune bundle "
            "naming the sites by pseudonym. OUT/job/medtl_fl is the NVFlare job folder."
        ),
    )
    _source_options(p)
    p.add_argument(
        "--manifest", required=True, nargs="+", help="one manifest per site, e.g. --manifest site_A.json site_B.json"
    )
    p.add_argument(
        "--root", required=True, nargs="+", help="data root of the manifests' paths: one for all, or one per --manifest"
    )
    p.add_argument("--out", default="medtl-fl", help="output folder (default ./medtl-fl)")
    p.add_argument("--threads", type=int, help="sites the simulator trains at once (default: all of them)")
    add_recipe_options(p, FederatedRecipe, title="federated recipe (medtl.recipes.FederatedRecipe)")
    p.set_defaults(func=_fl)


def _add_import(verbs: Any) -> None:
    p = verbs.add_parser(
        "import",
        help="import a public dataset (LIDC-IDRI nodule VOIs, MedMNIST .npz) as NIfTI + manifests",
        description=(
            "Convert a public dataset into medtl's own files (NIfTI volumes, label tables, manifests) so it "
            "flows through the same manifest -> transforms -> bundle path as DICOM. lidc: a lidc_nodule_vois "
            "folder, split into a thin-slice site (z spacing <= 1.3 mm) and a thick-slice site (>= 1.8 mm) by "
            "patient; the nodule diameter goes only to baseline.csv. medmnist: a MedMNIST .npz, keeping its own "
            "train/val/test split. Reruns convert only what changed."
        ),
    )
    p.add_argument("dataset", choices=["lidc", "medmnist"], help="which importer")
    p.add_argument("source", help="lidc: the lidc_nodule_vois folder; medmnist: the .npz file")
    p.add_argument("-o", "--output", required=True, help="folder to write (one dataset per folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the lidc patient split (default 0)")
    p.add_argument(
        "--classes", help="medmnist: comma-separated class names in label order (default: built in for known files)"
    )
    p.add_argument(
        "--roi",
        choices=["shape"],
        help="medmnist: 'shape' for a 3D set of shape masks (AdrenalMNIST3D): images as CT in HU (40 HU shape in "
        "-1000 HU air) and the shape as each case's mask, the input of a CT bundle with a mask channel",
    )
    p.set_defaults(func=_import)


def _add_bundle(verbs: Any) -> None:
    p = verbs.add_parser(
        "bundle",
        help="share bundles between sites: verify, pack, import, diff",
        description="Check a bundle before sharing or running it (schema, checksums, configs, portable paths, "
        "an audit of every $expression, weights without pickled code, TorchScript/ONNX parity, privacy scan), "
        "pack it into a reproducible zip with provenance and checksums, import a received one, compare two versions.",
    )
    bsub = p.add_subparsers(
        dest="bundle_verb",
        metavar="ACTION",
        required=True,
        help="verify: check; pack: zip to send; import: receive; run: run one confined; diff: compare versions; "
        "keygen: a signing key",
    )
    v = bsub.add_parser(
        "verify", help="check a bundle folder or zip and print a pass/fail table (exit 1 on any failure)"
    )
    v.add_argument("path", help="bundle folder or .zip")
    v.add_argument(
        "--trust",
        action="store_true",
        help="report expressions outside the allow-list and pickled checkpoints as warnings",
    )
    v.add_argument("--json", action="store_true", help="print the table as JSON")
    k = bsub.add_parser(
        "pack", help="verify a bundle folder and write NAME_VERSION.zip with SHA256SUMS and provenance.json"
    )
    k.add_argument("dir", help="bundle folder")
    k.add_argument("-o", "--output", help="zip to write (default: NAME_VERSION.zip here)")
    i = bsub.add_parser("import", help="verify a received bundle, then unpack it into a new folder in one step")
    i.add_argument("path", help="bundle .zip or folder")
    i.add_argument("--to", required=True, help="folder to create for the bundle")
    i.add_argument(
        "--trust",
        action="store_true",
        help="accept expressions outside the allow-list and pickled checkpoints (trusted senders only)",
    )
    i.add_argument("--replace", action="store_true", help="replace an existing folder at --to")
    for sub in (v, i):
        sub.add_argument(
            "--trusted-keys",
            nargs="+",
            metavar="PUB",
            help="public keys (.pub files or folders of them) of senders you trust: the bundle must be signed by one",
        )
        sub.add_argument(
            "--max-size",
            type=float,
            default=MAX_UNPACKED_BYTES / (1 << 20),
            metavar="MIB",
            help=f"refuse a bundle that unpacks to more than this many MiB (default {MAX_UNPACKED_BYTES >> 20})",
        )
    k.add_argument(
        "--sign-key", metavar="KEY", help="sign SHA256SUMS with this Ed25519 private key (medtl bundle keygen)"
    )
    k.add_argument("--signer", help="the name the signature shows (default: the key file's name)")
    g = bsub.add_parser("keygen", help="make an Ed25519 key pair for signing the bundles this site sends")
    g.add_argument("name", help="a name for the key, e.g. the site's (shown to receivers with the signature)")
    g.add_argument("--out", default=".", help="folder for NAME.key and NAME.pub (default: here)")
    for sub in (v, k):
        sub.add_argument(
            "--identifiers-from",
            metavar="DICOM_DIR",
            help=(
                "also search for the patient names, IDs, UIDs and dates found in these "
                "DICOM headers (the training data)"
            ),
        )
    r = bsub.add_parser(
        "run",
        help="run a received bundle's workflow as python -m monai.bundle run does, audited and confined",
        description="Takes python -m monai.bundle run's arguments after the bundle folder (--config_file, "
        "--meta_file, ids, --KEY VALUE overrides). The run may read the bundle and the paths given on the "
        "command line, and write only the bundle and the folders given as --*_dir options (--input_dir, "
        "--dataset_dir and --data_dir are read only); it starts no programs and opens no connections.",
    )
    r.add_argument("dir", help="bundle folder (medtl bundle import unpacks a zip)")
    r.add_argument("--trust", action="store_true", help="run configs outside the allow-list (still confined)")
    r.add_argument("args", nargs=argparse.REMAINDER, help="python -m monai.bundle run's arguments")
    d = bsub.add_parser("diff", help="config, metadata and metric differences between two bundles (folders or zips)")
    d.add_argument("a", help="the earlier bundle (folder or zip)")
    d.add_argument("b", help="the later bundle (folder or zip)")
    for sub, func in (
        (v, _bundle_verify),
        (k, _bundle_pack),
        (i, _bundle_import),
        (d, _bundle_diff),
        (g, _bundle_keygen),
        (r, _bundle_run),
    ):
        sub.set_defaults(func=func)


def _add_report(verbs: Any) -> None:
    p = verbs.add_parser(
        "report",
        help="write an HTML report (and Markdown twin) of a run: metrics, ROC, calibration, Grad-CAM",
        description="Render the records a medtl demo or medtl adapt run keeps in RUN_DIR/run/ as a self-contained "
        "HTML page (images embedded), a Markdown twin and PNG figures: the metric table with 95% CIs, ROC curves "
        "of every stage on one plot, confusion matrices, a reliability diagram, learning curves, the domain-shift "
        "figures and Grad-CAM overlays of correct and wrong cases.",
    )
    p.add_argument("run_dir", help="the run's output folder (holding run/), or its run/ folder")
    p.add_argument("-o", "--output", default=None, help="report folder (default RUN_DIR/report)")
    p.set_defaults(func=_report)


def _add_weights(verbs: Any) -> None:
    p = verbs.add_parser(
        "weights",
        help="inspect how pretrained weights load into a network",
        description=(
            "Pretrained weights from a MONAI bundle (folder or .zip), a state dict or training "
            "checkpoint (.pt/.pth/.ckpt, Lightning, DataParallel), TorchScript, MedicalNet/Med3D or a "
            "segmentation network's (SegResNet, UNet, SwinUNETR, MONAI's self-supervised Swin-ViT), "
            "matched onto a registered network."
        ),
    )
    wsub = p.add_subparsers(
        dest="weights_verb",
        metavar="ACTION",
        required=True,
        help="inspect: report what would load, adapt or be left out",
    )
    w = wsub.add_parser(
        "inspect",
        help="report which tensors of a checkpoint load into a network",
        description="Build --arch, load CKPT into it without training and report every tensor: loaded, "
        "missing (kept initialisation), unexpected (ignored), mismatched (other shape) and adapted "
        "(input channels, 2D->3D inflation). Files needing pickled code are refused unless --trust is given.",
    )
    w.add_argument(
        "checkpoint", metavar="CKPT", help="weights file (.pt/.pth/.ckpt/.ts) or MONAI bundle folder or .zip"
    )
    w.add_argument(
        "--arch",
        required=True,
        # spelled out rather than read from medtl.networks, whose import (torch, MONAI) would slow every command
        help="registered network to build: resnet10, resnet18, resnet34, resnet50, resnet101, resnet152, resnet200, "
        "densenet121, densenet169, densenet201, efficientnet-b0 ... efficientnet-b7, segresnet-encoder (SegResNet), "
        "unet-encoder (BasicUNet), monai-unet-encoder (UNet), swinunetr-encoder (SwinUNETR's Swin-ViT). "
        "MedicalNet's shortcut layout and an encoder's sizes are taken from the checkpoint's tensors and stated "
        "in the report",
    )
    w.add_argument("--spatial-dims", type=int, default=3, help="2 or 3 (default 3)")
    w.add_argument("--in-channels", type=int, default=1, help="input channels of the network (default 1)")
    w.add_argument("--num-classes", type=int, default=2, help="classifier outputs of the network (default 2)")
    w.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON (loaded, missing, unexpected, mismatched, adapted)",
    )
    w.add_argument(
        "--trust",
        action="store_true",
        help="allow pickled code in the checkpoint (can run arbitrary code; only for trusted files)",
    )
    w.set_defaults(func=_weights_inspect)


def _add_predict(verbs: Any) -> None:
    p = verbs.add_parser(
        "predict",
        help="classify every series in a DICOM folder with a bundle; flag uncertain ones; DICOM SR/SC",
        description=(
            "Run a bundle's own configs/inference.json in this process, as python -m monai.bundle run would, on "
            "every series in DICOM_DIR, after the expression audit that medtl bundle import runs. Prints one line "
            "per series (its pseudonymous key, the predicted class, that class's probability and a confidence "
            "flag) and the series skipped with their reason; writes OUT/predictions.csv and OUT/predictions.json "
            "(the bundle's columns plus the flag; folders named by salted keys unless --real-ids). Optionally "
            "writes, per series, DICOM objects that file with the source study in a PACS: a Structured Report and "
            "a Grad-CAM Secondary Capture (pip install medtl[dicom-out])."
        ),
    )
    p.add_argument(
        "dicom_dir",
        help="folder with the DICOM series to classify (searched recursively; several series per folder allowed)",
    )
    p.add_argument(
        "--bundle",
        required=True,
        help="bundle folder (configs/, models/model.pt), e.g. one unpacked by `medtl bundle import`",
    )
    p.add_argument("-o", "--output", default="medtl-predictions", help="output folder (default ./medtl-predictions)")
    p.add_argument(
        "--confidence",
        type=float,
        default=0.8,
        help=(
            "confidence flag threshold (default 0.8): 'ok' when the predicted class's probability reaches it, "
            "'review' when it is lower, meaning the model is unsure and a person should look at the series"
        ),
    )
    p.add_argument(
        "--sr",
        action="store_true",
        help="also write a DICOM Comprehensive 3D SR per series (OUT/dicom/): the predicted "
        "class and its probability, the bundle's name and version as the algorithm, the source instances as evidence",
    )
    p.add_argument(
        "--secondary-capture",
        action="store_true",
        help="also write a DICOM Secondary Capture per series (OUT/dicom/): "
        "the Grad-CAM overlay on the central axial slice of the crop the network saw, in the source study",
    )
    p.add_argument(
        "--masks",
        metavar="CSV",
        help=(
            "lesion masks as NIfTI files: a table with columns series (the id this command prints, the folder "
            "relative to DICOM_DIR, or the SeriesInstanceUID) and mask (path relative to the table, on the "
            "series' voxel grid as medtl convert writes it). Without a row, a series' mask is read from the "
            "DICOM SEG in DICOM_DIR that references it. A bundle that takes the mask as an input channel "
            "skips the series with neither"
        ),
    )
    p.add_argument(
        "--real-ids",
        action="store_true",
        help=(
            "name series by their folder as it is on disk in the id column and the skipped list; by "
            "default the folder is a salted key (dir-...#SERIES_NUMBER, salt in OUT/.medtl-salt), because "
            "export folders are often named after the patient"
        ),
    )
    p.add_argument(
        "--trust",
        action="store_true",
        help=(
            "run a bundle whose configs hold expressions outside the allow-list (runs their code; trusted senders only)"
        ),
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars (same as medtl -q)"
    )
    p.set_defaults(func=_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtl",
        description="Adapt a pretrained network to your own DICOM/NIfTI data for tumor classification "
        "and share it as a MONAI bundle. Data flows: scan -> manifest -> transforms -> adapt -> bundle -> predict.",
    )
    parser.add_argument("--version", action="version", version=f"medtl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    verbs = parser.add_subparsers(
        dest="verb", metavar="VERB", required=True, help="what to do (`medtl VERB --help` for its options)"
    )
    _add_scan(verbs)
    _add_convert(verbs)
    _add_manifest(verbs)
    _add_demo_data(verbs)
    _add_demo(verbs)
    _add_shift(verbs)
    _add_adapt(verbs)
    _add_fl(verbs)
    _add_import(verbs)
    _add_bundle(verbs)
    _add_report(verbs)
    _add_weights(verbs)
    _add_predict(verbs)
    return parser


def _never_fail_on_text() -> None:
    """Under a C/POSIX locale without Python's UTF-8 mode, stdout is ASCII and printing "±" or a
    progress bar would crash the run; characters the terminal cannot show are replaced instead."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    _never_fail_on_text()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("medtl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for people, the traceback with --debug
        if args.debug:
            raise
        print(f"medtl: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    """A MedtlError as it is; a file-system error with its file; anything else as an internal error."""
    if isinstance(exc, MedtlError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{Path(exc.filename).name if exc.filename else 'file system'}: {exc.strerror}"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"unexpected {type(exc).__name__}: {first} (run again with --debug for the traceback, and please report it)"


if __name__ == "__main__":
    sys.exit(main())
