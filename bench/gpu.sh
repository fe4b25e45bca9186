#!/bin/bash
# The GPU check (issue 11): gptqd's engine, GPTQModel beside it, the service end to end (also
# with a CUDA-touching preload in every worker process) and quality device vs CPU, on a CUDA
# machine with its own torch and no internet. Prints one table; with $OUT set, writes
# $OUT/gpu_table.md, $OUT/gpu_check.json (all figures) and $OUT/gpu_logs.txt (the logs' ends).
#
#   bash bench/gpu-prepare.sh                  # here first: carried wheels and fixtures
#   bash bench/gpu.sh [--device cuda|cpu] [--small] [--steps a,b] [--budget S]
#   GPU_CHECK_SMALL=1 bash bench/gpu.sh --device cpu   # the dry run on a CPU machine
#   bash bench/gpu.sh --simulate   # the cuda mode dry-run on a CPU machine's simulated card
#
# The project runs from source (PYTHONPATH=checkout). Packages the machine lacks come from
# .whl/svc and .whl/gpm, installed into separate folders: the GPTQModel set brings torchao,
# which must not be importable in the plain service run (it initialises CUDA at import).
set -u
GPU_CHECK_T0=$(date +%s.%N)  # the overall deadline counts the installs too
export GPU_CHECK_T0
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
SITE=${GPU_CHECK_SITE:-/tmp/gptqd-gpu-site}
export GPU_CHECK_SITE=$SITE

# install GROUP PROBE: the wheels of .whl/GROUP into $SITE/GROUP, unless PROBE imports already
install() {
  local group=$1 probe=$2
  if "$PY" -c "$probe" >/dev/null 2>&1; then echo "gpu.sh: $group: already importable"; return; fi
  if ! ls .whl/"$group"/*.whl >/dev/null 2>&1; then echo "gpu.sh: $group: no wheels in .whl/$group"; return; fi
  rm -rf "${SITE:?}/$group"
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE/$group" .whl/"$group"/*.whl 2>&1 | tail -3
  echo "gpu.sh: $group: installed $(ls .whl/"$group"/*.whl | wc -l) wheels into $SITE/$group"
}
install svc "import fastapi, celery, sqlalchemy, pydantic_settings, uvicorn, multipart"
install gpm "import gptqmodel"
exec "$PY" bench/gpu/check.py "$@"
