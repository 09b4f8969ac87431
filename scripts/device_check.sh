#!/usr/bin/env bash
# The device check of issue 22 on a GPU machine that has PyTorch but not ltbench's other dependencies, and no
# internet: install the carried wheels (.whl/: hydra-core, omegaconf, antlr4, hydra-joblib-launcher, and for the
# foundation step open_clip, timm, ftfy, wcwidth; `make
# device-prep` downloads them) and ltbench itself (editable, offline), then run scripts/device_check.py with the
# arguments given, e.g.
#
#   bash scripts/device_check.sh --out /tmp/dc --minutes 9 --bundle "$OUT/device_check.tgz"
#
# Carry `.device_data` (the packed CIFAR-10-LT subset, `make device-prep`) and `.whl`. Where ltbench already
# imports (a machine set up with `make install`), nothing is installed. A dry run on a CPU: add --dry-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$PY" -c "import ltbench.conf, hydra, omegaconf" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ltbench_site .whl/*.whl
        export PYTHONPATH="/tmp/ltbench_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # ltbench itself: an editable install where setuptools can build it offline; else the source tree on the path,
    # with ltbench/conf a link to the top-level conf/ (the package ltbench.conf of an install). The link is made
    # only here, on a machine where ltbench did not import.
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
        [ -e ltbench/conf ] || ln -s ../conf ltbench/conf
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
"$PY" -c "import ltbench.conf" || { echo "device_check.sh: ltbench does not import here" >&2; exit 2; }
exec "$PY" scripts/device_check.py "$@"
