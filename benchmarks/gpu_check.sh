#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (the device tool's `run`):
#   bash benchmarks/gpu_check.sh
# builds the native kernels with that machine's python3 (which has torch, triton, pytest,
# pytest-benchmark and matplotlib), runs the kernel tests on the GPU (the Triton and CUDA backends
# against the reference), runs the benchmarks at full size, renders the report, and prints a
# short summary last. Everything it writes goes under $OUT (logs, benchmark JSON, report).
# The pini model/trainer tests need open_clip, which that machine lacks: they are not run there.
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PINI_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$OUT/env.log"
nvidia-smi >> "$OUT/env.log" 2>&1

start=$(date +%s)
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - start )) s"

start=$(date +%s)
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/ -q -p no:cacheprovider \
    --ignore=tests/test_pini_model.py --ignore=tests/test_pini_training.py \
    --ignore=tests/test_readme.py > "$OUT/tests.log" 2>&1
tests_rc=$?
echo "tests rc=$tests_rc in $(( $(date +%s) - start )) s"

start=$(date +%s)
PINI_BENCH_FULL=1 timeout "${BENCH_TIMEOUT:-240}" python3 -m pytest benchmarks/ --benchmark-only \
    -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc in $(( $(date +%s) - start )) s"
if [ -s "$OUT/bench.json" ]; then
    python3 -m benchmarks.report "$OUT/bench.json" --out "$OUT" > "$OUT/report.log" 2>&1
fi

echo "=== tests (tail) ==="
grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -2
grep -E "^FAILED|^ERROR" "$OUT/tests.log" | head -20
sed -n '/largest error against the reference/,/short test summary/p' "$OUT/tests.log" | head -60
echo "=== benchmarks (report) ==="
for report in "$OUT"/*.md; do [ -f "$report" ] && grep -E "^\| |^## |measured limits" "$report"; done | head -80
