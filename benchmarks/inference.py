"""P3: CPU inference throughput of an exported bundle: the eager network against its TorchScript and
ONNX Runtime copies, on the same batches.

    .venv/bin/python benchmarks/inference.py [--bundle DIR] [--batch-sizes 1 16] [--iters 20]
        [--threads 2] [--out inference.json]

Without ``--bundle``, ``resnet(0.5)`` with random weights is exported with the
``tumor_cls_source`` template into a temporary folder (throughput does not depend on the weights).
Eager: ``network_def`` from ``configs/inference.json`` with ``models/model.pt``; TorchScript:
``models/model.ts``; ONNX: ``models/model.onnx`` on ``CPUExecutionProvider`` with as many intra-op
threads as torch, not spinning when idle. Outputs are checked to agree (max abs difference) before
timing; each figure is the median time per batch over ``--iters`` batches after warm-up, under
``torch.inference_mode``; the runtimes take turns batch by batch. Target: TorchScript ÷ eager and
ONNX ÷ eager throughput >= 1.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from monai.bundle import ConfigParser

from medtl.bundle.export import export_bundle
from medtl.fileio import atomic_write_json
from medtl.networks import resnet

TARGET = 1.0
WARMUP = 3


def eager_network(bundle: Path) -> torch.nn.Module:
    """The bundle's ``network_def`` with ``models/model.pt``, as ``monai.bundle run`` builds it."""
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    return network.eval()


def runners(bundle: Path, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Each runtime as a function from an input batch to its logits."""
    eager = eager_network(bundle)
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu").eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "0"
    )  # idle threads must not steal the next runtime's cores
    session = onnxruntime.InferenceSession(
        str(bundle / "models" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def torch_runner(network: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return network(torch.from_numpy(x)).numpy()

        return run

    return {
        "eager": torch_runner(eager),
        "TorchScript": torch_runner(scripted),
        "ONNX Runtime": lambda x: session.run(None, {name: x})[0],
    }


def seconds_per_batch(
    run: dict[str, Callable[[np.ndarray], np.ndarray]], batches: list[np.ndarray]
) -> dict[str, float]:
    """Median seconds per batch of each runtime; runtimes take turns on every batch, so load from
    other processes on a shared machine falls on all of them alike."""
    for x in batches[:WARMUP]:
        for fn in run.values():
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in run}
    for x in batches[WARMUP:]:
        for name, fn in run.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="exported bundle folder (default: export resnet(0.5) with random weights)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--iters", type=int, default=20, help="timed batches per runtime and batch size")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="medtl-inference-") as tmp:
        bundle = (
            Path(args.bundle)
            if args.bundle
            else export_bundle(resnet(0.5), Path(tmp) / "bundle", template="tumor_cls_source")["path"]
        )
        meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
        image = meta["network_data_format"]["inputs"]["image"]
        shape = (image["num_channels"], *image["spatial_shape"])
        run = runners(bundle, args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in args.batch_sizes:
        batches = [rng.random((batch_size, *shape), dtype=np.float32) for _ in range(WARMUP + args.iters)]
        reference = run["eager"](batches[0])
        diffs = {name: float(np.abs(fn(batches[0]) - reference).max()) for name, fn in run.items()}
        per_batch = seconds_per_batch(run, batches)
        for name in run:
            rows.append(
                {
                    "runtime": name,
                    "batch_size": batch_size,
                    "cases_per_s": batch_size / per_batch[name],
                    "ms_per_batch": per_batch[name] * 1e3,
                    "max_abs_diff": diffs[name],
                    "ratio": per_batch["eager"] / per_batch[name],
                }
            )
    print(
        f"\n{bundle.name if args.bundle else 'resnet(0.5), random weights'}: input {list(shape)}, CPU, {args.threads} "
        f"threads, median of {args.iters} batches after {WARMUP} warm-up"
    )
    print(
        f"{'runtime':<14}{'batch':>6}{'ms/batch':>10}{'cases/s':>9}{'vs eager':>10}{'target':>8}  result  max abs diff"
    )
    for r in rows:
        verdict = "" if r["runtime"] == "eager" else ("PASS" if r["ratio"] >= TARGET else "MISS")
        print(
            f"{r['runtime']:<14}{r['batch_size']:>6}{r['ms_per_batch']:>10.1f}{r['cases_per_s']:>9.1f}{r['ratio']:>9.2f}x"
            f"{'' if r['runtime'] == 'eager' else '>=1.0x':>8}  {verdict:<8}{r['max_abs_diff']:.1e}"
        )
    if args.out:
        atomic_write_json(
            args.out, {"threads": args.threads, "iters": args.iters, "input_shape": list(shape), "rows": rows}
        )


if __name__ == "__main__":
    main()
