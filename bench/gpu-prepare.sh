#!/bin/bash
# Fills the ignored folders that a device call carries for bench/gpu.sh (run here, not there):
#   .whl/svc/  wheels of the service's packages the GPU machine lacks (docs: /work/shared/gpu-notes.md)
#   .whl/gpm/  GPTQModel and the packages it needs there (source-only ones built with a Python 3.12)
#   .gpu/fixtures/  the few fixture files the check reads (../shared does not travel)
# Versions are pinned to what .venv has, so the device runs what the tests here ran.
# usage: bash bench/gpu-prepare.sh            (GPTQD_FIXTURES overrides ../shared/fixtures)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FIX=${GPTQD_FIXTURES:-$ROOT/../shared/fixtures}
VENV_PY=${VENV_PY:-$ROOT/.venv/bin/python}

# the GPU machine's interpreter: CPython 3.12 on x86-64 (manylinux)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
SVC=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv python-multipart sqlalchemy
     celery kombu billiard vine amqp click-didyoumean click-repl click-plugins prompt-toolkit wcwidth
     tzlocal redis uvicorn annotated-types typing-inspection opentelemetry-api)
# binary or pure wheels on PyPI; threadpoolctl and xxhash are needed by gptqmodel / datasets imports
GPM_BIN=(datasets dill multiprocess torchao threadpoolctl xxhash)
# published as source only: built here with Python 3.12 (pypcre compiles against libpcre2-8)
GPM_SRC=(gptqmodel device-smi pypcre tokenicer logbar defuser)

norm() { tr 'A-Z_.' 'a-z--' <<<"$1"; }
FREEZE=$("$VENV_PY" -m pip list --format=freeze 2>/dev/null)
pin() {  # NAME==VERSION as installed in .venv (fails loudly when .venv lacks it)
  local want v
  want=$(norm "$1")
  v=$(while IFS='=' read -r n _ ver; do [ "$(norm "$n")" = "$want" ] && echo "$ver"; done <<<"$FREEZE")
  [ -n "$v" ] || { echo "gpu-prepare: $1 is not installed in $VENV_PY" >&2; return 1; }
  echo "$1==$v"
}
pins() { local n; for n in "$@"; do pin "$n"; done; }

download() {  # DIR NAME...: cp312 manylinux (or pure) wheels, no dependencies
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$dir" $(pins "$@")
}

find_py312() {  # a CPython 3.12 (a pyenv shim of another version fails the check)
  local p
  for p in /root/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12)" /usr/bin/python3.12; do
    [ -x "$p" ] && "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$p"; return; }
  done
  return 1
}

echo "== service wheels -> .whl/svc"
download .whl/svc "${SVC[@]}"

echo "== GPTQModel wheels -> .whl/gpm"
if PY312=$(find_py312); then
  download .whl/gpm "${GPM_BIN[@]}"
  # pip reuses its wheel cache: about a minute the first time (pypcre compiles)
  $PY312 -m pip wheel -q --no-deps -w .whl/gpm $(pins "${GPM_SRC[@]}") 2>&1 | grep -v "is ignored: it is neither" || true
  ls .whl/gpm | grep -qi '^pypcre-.*cp312' || { echo "gpu-prepare: no cp312 pypcre wheel was built" >&2; exit 1; }
else
  echo "gpu-prepare: no Python 3.12 here: GPTQModel cannot be built; bench/gpu.sh will report it as not importable" >&2
  rm -rf .whl/gpm
fi

echo "== fixtures -> .gpu/fixtures (from $FIX)"
rm -rf .gpu/fixtures
mkdir -p .gpu/fixtures/wikitext-2 .gpu/fixtures/models .gpu/fixtures/tokenizers
cp -r "$FIX/tokenizers/gpt2" .gpu/fixtures/tokenizers/
cp "$FIX/wikitext-2/valid.txt" "$FIX/wikitext-2/test.txt" .gpu/fixtures/wikitext-2/
cp -r "$FIX/models/tiny-gpt2-wikitext2" .gpu/fixtures/models/

echo "== carried size (the device call carries at most 64 MiB with the working tree)"
du -sh .whl .gpu
du -scm .whl .gpu | tail -1 | awk '{ if ($1 > 60) { print "gpu-prepare: " $1 " MiB carried: over 60 MiB" > "/dev/stderr"; exit 1 } else print $1 " MiB carried in all" }'
