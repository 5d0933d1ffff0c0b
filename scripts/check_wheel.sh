#!/usr/bin/env bash
# The wheel as a user gets it (.ci/run): built from a copy of the files git sees in this checkout
# (no stale build/ or run outputs), installed into a fresh venv (the CPU wheel torch==2.13.0 first, so
# pip never pulls a CUDA build, then the wheel with its dependencies and the export extra, from pip's
# cache where it can), and run from a folder outside the checkout: `medtl --help`, `medtl demo --help`
# and scripts/wheel_smoke.py (a bundle exported from the wheel's templates and `medtl bundle verify`,
# then `medtl adapt` on a tiny generated cohort). About 4.5 min on two shared cores: 2 min to build and
# install, 0.5 min export, 2 min adapt. ADAPT=0 leaves adapt out; KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
unset PYTHONPATH
start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/medtl-wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "check_wheel: work folder $work"; else trap 'rm -rf "$work"' EXIT; fi

mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$work/src"
"$PY" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" wheel -qq --no-deps "$work/src" -w "$work/dist"
wheel=$(ls "$work"/dist/medtl-*.whl)
"${pip[@]}" install -qq "torch==2.13.0"
"${pip[@]}" install -qq "$wheel[export]"
echo "check_wheel: built and installed $(basename "$wheel") in $((SECONDS - start)) s"

cd "$work"
"$work/venv/bin/medtl" --help >/dev/null
"$work/venv/bin/medtl" demo --help >/dev/null
smoke=("$work/venv/bin/python" -I "$repo/scripts/wheel_smoke.py" "$work/smoke" --checkout "$repo")
if [ "${ADAPT:-1}" = 0 ]; then smoke+=(--no-adapt); fi
"${smoke[@]}"
echo "check_wheel: passed in $((SECONDS - start)) s"
