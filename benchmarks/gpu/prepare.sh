#!/usr/bin/env bash
# Before a GPU run, here (with PyPI and ../shared): fill benchmarks/gpu/cache/ (git-ignored; name it in the device
# tool's `carry`) with the CIFAR-10 archive and the wheels of the packages adaptkit needs that the GPU image lacks
# (SQLAlchemy, Alembic, Mako: Python 3.12, x86-64), at the versions installed here.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=benchmarks/gpu/cache
mkdir -p "$cache/wheels"
archive=../shared/data/cifar10.tar.gz
if [ -f "$archive" ]; then cp "$archive" "$cache/"; else echo "no $archive: the torchrun part will use synthetic JPEGs"; fi
pins=$(python3 -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in ('sqlalchemy', 'alembic', 'mako')))")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$cache/wheels" $pins
ls -la "$cache" "$cache/wheels"
