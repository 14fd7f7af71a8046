#!/usr/bin/env bash
# benchmarks/gpu/run.py on a lent GPU machine, which has no network and none of adaptkit's registry packages:
# installs the wheels that benchmarks/gpu/prepare.sh put in benchmarks/gpu/cache/wheels (carried with the working
# tree), then runs every part. Arguments go to run.py, e.g.  bash benchmarks/gpu/run.sh --out $OUT/report.md
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
wheels=benchmarks/gpu/cache/wheels
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/adaptkit-site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH="/tmp/adaptkit-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi || true
exec python3 benchmarks/gpu/run.py "$@"
