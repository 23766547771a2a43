#!/usr/bin/env bash
# Sets up a virtualenv with alt_jax built from this checkout (native core against that
# venv's jaxlib headers). Usage: scripts/setup.sh [--bench] [VENV_DIR]
#   --bench   also install the benchmark peers and plotting (requirements-bench.txt)
# PYTHON=python3.12 chooses the interpreter, JAX_SPEC pins jax (default: newest for it).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bench=0
if [ "${1:-}" = "--bench" ]; then
  bench=1
  shift
fi
venv="${1:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
# Build requirements first: the native core is built without isolation so that it compiles
# against the XLA FFI headers of the jaxlib this venv runs.
$pip install -q "${JAX_SPEC:-jax}" jaxlib setuptools wheel "pybind11>=2.12" "cmake>=3.18" numpy absl-py
$pip install -q -r "$root/requirements-test.txt"
if [ "$bench" = 1 ]; then
  $pip install -q -r "$root/requirements-bench.txt"
fi
$pip install -q --no-build-isolation -e "$root"
"$venv/bin/python" -c "import alt_jax, alt_jax._core, jax; print('alt_jax ready: jax', jax.__version__)"
