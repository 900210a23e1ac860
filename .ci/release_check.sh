#!/usr/bin/env bash
# Release readiness, run by .ci/run:
#   1. `python -m build` makes an sdist and a wheel (the wheel is built from the sdist), and
#      both ship lagnet/py.typed;
#   2. the wheel installs (--no-deps) into a fresh virtual environment that reuses this
#      interpreter's torch (--system-site-packages), and every public name imports from it,
#      with the version the wheel was built with;
#   3. the wheel's `lagnet` console script runs (`--version`, `train --help`, a refused start
#      that prints one error line, exits 2 and writes nothing), as does `python -m lagnet`;
#   4. the documentation builds with `mkdocs build --strict`.
# Everything is written under a temporary folder that is removed on exit.
# LAGNET_BUILD_NO_ISOLATION=1 builds with the installed setuptools instead of an isolated
# build environment (for machines without access to the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lagnet-release.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'release check FAILED: %s\n' "$*" >&2; exit 1; }

step "build sdist and wheel"
build_args=(--outdir "$WORK/dist")
if [[ "${LAGNET_BUILD_NO_ISOLATION:-0}" == "1" ]]; then
    build_args+=(--no-isolation)
fi
if ! "$PYTHON" -m build "${build_args[@]}" "$ROOT" >"$WORK/build.log" 2>&1; then
    cat "$WORK/build.log" >&2
    fail "python -m build failed"
fi
shopt -s nullglob
sdists=("$WORK"/dist/lagnet-*.tar.gz)
wheels=("$WORK"/dist/lagnet-*.whl)
shopt -u nullglob
[[ ${#sdists[@]} -eq 1 ]] || fail "expected one sdist in dist/, found ${#sdists[@]}"
[[ ${#wheels[@]} -eq 1 ]] || fail "expected one wheel in dist/, found ${#wheels[@]}"
SDIST="${sdists[0]}"
WHEEL="${wheels[0]}"
echo "built $(basename "$SDIST") and $(basename "$WHEEL")"

step "both archives ship lagnet/py.typed"
"$PYTHON" - "$SDIST" "$WHEEL" <<'PY'
import sys
import tarfile
import zipfile

sdist, wheel = sys.argv[1], sys.argv[2]
with tarfile.open(sdist) as tar:
    sdist_names = tar.getnames()
with zipfile.ZipFile(wheel) as zf:
    wheel_names = zf.namelist()
problems = []
if not any(n.endswith("/lagnet/py.typed") for n in sdist_names):
    problems.append(f"{sdist} has no lagnet/py.typed")
if "lagnet/py.typed" not in wheel_names:
    problems.append(f"{wheel} has no lagnet/py.typed")
for mod in ("lagnet/__init__.py", "lagnet/__main__.py", "lagnet/cli/__init__.py", "lagnet/export.py",
            "lagnet/viz.py", "lagnet/layers/__init__.py"):
    if mod not in wheel_names:
        problems.append(f"{wheel} has no {mod}")
stray = [n for n in wheel_names if n.split("/")[0] in ("tests", "examples", "docs", "benchmarks")]
if stray:
    problems.append(f"{wheel} ships non-package files: {stray[:5]}")
if problems:
    sys.exit("\n".join(problems))
print(f"sdist: {len(sdist_names)} entries, wheel: {len(wheel_names)} entries, py.typed in both")
PY

step "install the wheel into a fresh virtual environment"
"$PYTHON" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --no-deps --no-index "$WHEEL"

step "import every public name from the installed wheel"
WHEEL_VERSION="$(basename "$WHEEL" | cut -d- -f2)"
# run outside the checkout, so that `import lagnet` cannot pick up the source tree
(cd "$WORK" && "$VPY" - "$WORK/venv" "$WHEEL_VERSION" <<'PY'
import importlib
import sys
from pathlib import Path

venv, wheel_version = Path(sys.argv[1]).resolve(), sys.argv[2]
import lagnet

location = Path(lagnet.__file__).resolve()
if venv not in location.parents:
    sys.exit(f"lagnet was imported from {location}, not from the wheel installed in {venv}")
if not (location.parent / "py.typed").is_file():
    sys.exit("the installed package has no py.typed")
if lagnet.__version__ != wheel_version:
    sys.exit(f"lagnet.__version__ {lagnet.__version__!r} != wheel version {wheel_version!r}")
count = 0
for module_name in (
    "lagnet",
    "lagnet.layers",
    "lagnet.data",
    "lagnet.evaluation",
    "lagnet.export",
    "lagnet.viz",
):
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if not names:
        sys.exit(f"{module_name} has no __all__")
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        sys.exit(f"{module_name}.__all__ names missing attributes: {missing}")
    for name in names:  # `from module import name` for every public name
        exec(f"from {module_name} import {name}", {})
    count += len(names)
print(f"lagnet {lagnet.__version__} from {location.parent}: {count} public names import")
PY
)

step "the lagnet console script of the installed wheel"
LAGNET="$WORK/venv/bin/lagnet"
[[ -x "$LAGNET" ]] || fail "the wheel installed no lagnet console script at $LAGNET"
# run outside the checkout, so that the command cannot pick up the source tree
version_line="$(cd "$WORK" && "$LAGNET" --version)" || fail "lagnet --version failed"
[[ "$version_line" == "lagnet $WHEEL_VERSION" ]] \
    || fail "lagnet --version printed '$version_line', expected 'lagnet $WHEEL_VERSION'"
(cd "$WORK" && "$LAGNET" train --help >"$WORK/train-help.txt") || fail "lagnet train --help failed"
grep -q -- "--resume" "$WORK/train-help.txt" || fail "lagnet train --help does not list --resume"
(cd "$WORK" && "$VPY" -m lagnet --version >/dev/null) || fail "python -m lagnet --version failed"
set +e
(cd "$WORK" && "$LAGNET" train --epochs 0 --output "$WORK/never" 2>"$WORK/error.txt")
status=$?
set -e
[[ $status -eq 2 ]] || fail "lagnet train --epochs 0 exited with $status, expected 2"
[[ "$(cat "$WORK/error.txt")" == "lagnet: error: --epochs must be >= 1, got 0" ]] \
    || fail "unexpected error output: $(cat "$WORK/error.txt")"
[[ ! -e "$WORK/never" ]] || fail "a refused lagnet train left $WORK/never behind"
echo "$version_line; lagnet train --help and a refused start work from the wheel"

step "documentation: mkdocs build --strict"
NO_MKDOCS_2_WARNING=1 "$PYTHON" -m mkdocs build --strict --site-dir "$WORK/site" >"$WORK/mkdocs.log" 2>&1 || {
    cat "$WORK/mkdocs.log" >&2
    fail "mkdocs build --strict failed"
}
tail -n 1 "$WORK/mkdocs.log"

printf '\nrelease check passed\n'
