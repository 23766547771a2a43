#!/usr/bin/env bash
# The GPU check (issue 13): on a machine with an NVIDIA GPU, nvcc and a CUDA jax, build
# alt_jax (its CUDA FFI handler too), run the gpu-marked tests against lax, then ResNet-50
# and the BERT layer (batch 1 and 32) against jax.jit on the GPU. Under 8 minutes on an
# H200. Results go to $RESULTS (default gpu_check_results/): tests.log, bench.json,
# bench.log, summary.txt. Where there is no GPU it runs every step up to that point and
# says where it stopped.
# Usage: bash scripts/gpu_check.sh [RESULTS_DIR]     (PYTHON=python3 chooses the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:-${RESULTS:-gpu_check_results}}"
mkdir -p "$results"
python="${PYTHON:-python3}"
summary="$results/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
started=$(date +%s)
export ALT_JAX_CACHE_DIR="${ALT_JAX_CACHE_DIR:-$PWD/.gpu-check-cache/kernels}"

say "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    | sed 's/^/gpu: /' | tee -a "$summary" || say "gpu: nvidia-smi not found"
command -v nvcc >/dev/null && say "nvcc: $(nvcc --version | tail -1)" || say "nvcc: not found"

# 1. build alt_jax in place against this interpreter's jaxlib (no downloads: nothing else
#    is fetched; the machine's jax, jaxlib, pybind11, cmake and pytest are used)
say "== build"
if ! "$python" -m pip install -q --no-deps --no-build-isolation -e . > "$results/build.log" 2>&1; then
  say "build FAILED (see build.log)"; exit 1
fi
"$python" -c "import jax, alt_jax._core as c; print('jax', jax.__version__, '| backend', jax.default_backend(), '| CUDA handler:', hasattr(c, 'cuda_ffi_handler'))" \
    2>&1 | tee -a "$summary"

# 2. the gpu-marked tests (kernels through the CUDA runtime; optimize() on GPU arrays)
say "== pytest -m gpu"
"$python" -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_kernels.py \
    tests/test_cuda_dispatch.py > "$results/tests.log" 2>&1
rc=$?
tail -1 "$results/tests.log" | sed 's/^/tests: /' | tee -a "$summary"
if [ $rc -ne 0 ]; then say "gpu tests FAILED (rc=$rc, see tests.log)"; fi

# 3. the models against jax.jit on the GPU
say "== benchmark"
PYTHONUNBUFFERED=1 "$python" -m benchmarks.gpu_bench --out="$results/bench.json" \
    > "$results/bench.log" 2>&1
brc=$?
tail -8 "$results/bench.log" | tee -a "$summary"
if grep -q '"gpu": null' "$results/bench.json" 2>/dev/null; then
  say "stopped here: no GPU visible to jax (every step before this one ran)"
fi
say "== done in $(( $(date +%s) - started )) s (tests rc=$rc, bench rc=$brc)"
[ $rc -eq 0 ] && [ $brc -eq 0 ]
