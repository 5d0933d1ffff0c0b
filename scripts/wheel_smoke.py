"""Smoke test of an installed medtl (scripts/check_wheel.sh runs it in a fresh venv holding the wheel).

Checks that medtl is imported from the installation, not a checkout, and that every template of the
checkout's ``bundles/`` is there as package data; exports a small network as the ``tumor_cls_source``
bundle from those templates (TorchScript and, with ``medtl[export]``, ONNX copies checked against
it) and runs the installed ``medtl bundle verify`` on it; then, unless ``--no-adapt``, runs
``medtl adapt`` from that bundle on a tiny generated demo cohort (site B, one epoch, about 1.5 min
on two cores) and verifies the bundle it writes (the source's own, its next version).

    python -I scripts/wheel_smoke.py OUT --checkout REPO
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _say(text: str) -> None:
    print(f"wheel_smoke: {text}", flush=True)


def _medtl(*args: str | Path) -> None:
    """The installed ``medtl`` command (beside this interpreter), as a user runs it."""
    command = [str(Path(sys.executable).with_name("medtl")), *map(str, args)]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[1:3])} failed with exit code {done.returncode}")


def _check_installation(checkout: Path) -> None:
    import medtl
    from medtl.bundle.templates import TEMPLATES, template_dir, template_names

    package = Path(medtl.__file__).resolve().parent
    if package.is_relative_to(checkout):
        sys.exit(f"medtl was imported from the checkout ({package}), not from the installed wheel")
    if TEMPLATES != package / "bundle_templates":
        sys.exit(f"templates resolve to {TEMPLATES}, not the wheel's {package / 'bundle_templates'}")
    expected = sorted(p.name for p in (checkout / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
    if template_names() != expected:
        sys.exit(f"the wheel carries the templates {template_names()}, the checkout has {expected}")
    for name in expected:
        template_dir(name)
    _say(f"medtl {medtl.__version__} from {package}: templates {', '.join(expected)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="work folder (created)")
    parser.add_argument("--checkout", type=Path, required=True, help="the repository the wheel was built from")
    parser.add_argument("--no-adapt", action="store_true", help="leave out medtl adapt on a tiny generated cohort")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    _check_installation(args.checkout.resolve())

    from medtl.bundle.export import export_bundle
    from medtl.demo import prepare_demo_data
    from medtl.networks import resnet

    source = export_bundle(
        resnet(0.5), args.out / "tumor_cls_source", template="tumor_cls_source", changelog="wheel smoke test"
    )
    _say(
        f"exported {source['path']} (max abs diff TorchScript {source['torchscript_max_abs_diff']}, "
        f"ONNX {source['onnx_max_abs_diff']})"
    )
    _medtl("bundle", "verify", source["path"])
    _say(f"export and verify took {time.perf_counter() - t0:.0f} s")

    if not args.no_adapt:
        t1 = time.perf_counter()
        demo = prepare_demo_data(args.out / "demo", scale=0.1, progress=False)  # the smallest with val cases on site B
        adapted = args.out / "adapted"
        _medtl(
            "-q",
            "adapt",
            "--source",
            source["path"],
            "--manifest",
            demo["sites"]["B"]["manifest"],
            "--root",
            demo["out"],
            "--out",
            adapted,
            "--epochs",
            "1",
        )
        written = json.loads((adapted / "adapt_summary.json").read_text(encoding="utf-8"))["bundle"]
        _medtl("bundle", "verify", adapted / written)  # the source bundle adapted as itself: its own name
        if not (adapted / "report" / "report.html").is_file():
            sys.exit(f"medtl adapt wrote no report at {adapted / 'report' / 'report.html'}")
        _say(f"adapt and verify took {time.perf_counter() - t1:.0f} s")
    _say(f"passed in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
