#!/usr/bin/env bash
# The GPU check in one call (under 8 minutes on an H100/H200): installs what the device image lacks from
# carried wheels (.whl/: monai, SimpleITK, nibabel; see ../shared/gpu-anchors.md), runs the CUDA-marked
# tests, then benchmarks/gpu_check.py (generator forward fp32 vs bf16 + channels-last at 128^3 against the
# anchors, one training step of every method at 128^3, ICAM's 20-sample maps, the 1 mm end-to-end
# attribution) and prints one table (also written to $OUT/gpu_check.md when OUT is set).
#
#   bash benchmarks/gpu_check.sh           # on a lent GPU
#   bash benchmarks/gpu_check.sh --tiny    # CPU smoke run at toy sizes (the test suite runs this)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import monai, SimpleITK, nibabel" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/CounterfactualVA:$PWD/CounterfactualVATraining:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
status=0
if [ "${1:-}" != "--tiny" ]; then
    "$PY" -m pytest -q -m cuda -p no:cacheprovider Testing || status=1
fi
"$PY" benchmarks/gpu_check.py "$@" ${OUT:+--out "$OUT/gpu_check.md"} || status=1
exit $status
