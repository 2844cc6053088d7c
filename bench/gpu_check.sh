#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py; how to run it on the device machine: bench/README.md).
#   bash bench/gpu_check.sh --prepare   here, with pip's index: the open_clip wheels into .gpu_wheels/
#   bash bench/gpu_check.sh [ARGS...]   there: python3 -m bench.gpu_check ARGS (outputs in $OUT when set)
# The GPU image's python3 has PyTorch, JAX (with its CUDA plugin), flax, optax and h5py but not open_clip: when
# python3 cannot import it, the wheels of .gpu_wheels/ are installed into a temporary folder first (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=.gpu_wheels
if [[ ${1:-} == --prepare ]]; then
    pin=$(grep -i '^open_clip_torch==' requirements.txt)
    # for the GPU machine's python3 (CPython 3.12 on x86-64), whatever this machine runs
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" "$pin" ftfy wcwidth
    ls "$wheels"
    exit 0
fi
if ! "$py" -c 'import open_clip' 2>/dev/null; then
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        echo "error: $py cannot import open_clip and $wheels/ holds no wheels; run 'bash bench/gpu_check.sh" \
             "--prepare' where pip works and carry $wheels" >&2
        exit 2
    fi
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$py" -m bench.gpu_check "$@"
