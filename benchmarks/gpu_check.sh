#!/usr/bin/env bash
# The prepared GPU check (issue 12): one run on a GPU machine gives a verdict, even a partial one.
#
#   bash benchmarks/make_wheelhouse.sh          # once, on a machine with PyPI (see that script)
#   bash benchmarks/gpu_check.sh                # on the GPU machine, from the repository root
#
# The GPU machine needs only python3 with torch, Triton and pytest (pytest-benchmark for the
# benchmarks); nvcc for the "cuda" backend; compute-sanitizer for the sanitizer stages;
# benchmarks/wheelhouse/ (git-ignored, carried along) for the `pini` stage. Stages run in order
# of value, each with its own timeout inside one overall budget (GPU_CHECK_BUDGET seconds, 510 by
# default, so the whole run stays under ~9 minutes); a stage that cannot run says why and the next
# one starts. Everything goes under $OUT (a new temporary folder when unset): a log per stage,
# the benchmark JSON and report, and summary.txt, the one-screen summary printed last.
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"  # scratch that does not come back: the wheelhouse's packages, the pini run
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PINI_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
BUDGET="${GPU_CHECK_BUDGET:-510}"
STARTED=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfEs)

remaining() { echo $(( BUDGET - ($(date +%s) - STARTED) )); }
note() { printf '%-34s %s\n' "$1" "$2" | tee -a "$SUMMARY"; }

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND (output in $OUT/NAME.log) with the smaller of
# MAX_SECONDS and what is left of the budget; records PASS / FAIL / TIMEOUT with its time.
stage() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining)
    if (( left < 20 )); then
        note "$name" "SKIP: out of time (${left} s of the ${BUDGET} s budget left)"
        return 1
    fi
    (( limit > left )) && limit=$left
    echo "--- $name (at most ${limit} s) ---"
    local begin rc
    begin=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - begin ))
    local counts
    counts=$(grep -E "^=*[^=]*[0-9]+ (passed|failed|skipped|error)" "$OUT/$name.log" | tail -1 | tr -d '=')
    if (( rc == 0 )); then
        note "$name" "PASS in ${took} s ${counts}"
    elif (( rc == 124 || rc == 137 )); then
        note "$name" "TIMEOUT after ${took} s ${counts}"
    else
        note "$name" "FAIL (rc $rc) in ${took} s ${counts}"
    fi
    return $rc
}

skip() { note "$1" "SKIP: $2"; }

# --- 0. the machine -------------------------------------------------------------------------------
{
    python3 -V
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    for tool in nvcc compute-sanitizer ptxas; do
        found=$(command -v "$tool" || ls "$CUDA_HOME/bin/$tool" 2>/dev/null || echo "not found")
        echo "$tool: $found"
    done
} 2>&1 | tee "$OUT/env.log"
HAS_GPU=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null)
NVCC=$(command -v nvcc || ls "$CUDA_HOME/bin/nvcc" 2>/dev/null)

# --- 1. the native CUDA kernels build in the background while the Triton checks run -----------
BUILD_PID=""
if [ "$HAS_GPU" != 1 ]; then
    skip build "no CUDA GPU here (torch.cuda.is_available() is False)"
elif [ -z "$NVCC" ]; then
    skip build "no nvcc in PATH or \$CUDA_HOME/bin: the 'cuda' backend is not checked"
else
    echo "--- build (background) ---"
    BUILD_BEGIN=$(date +%s)
    timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 &
    BUILD_PID=$!
fi

# --- 2. sync-free ops, CUDA graphs, realistic shapes: the Triton backend ------------------------
# (Without a GPU every test skips with its reason: the dry run shows they are collected.)
stage gpu_only_triton 200 "${PYTEST[@]}" tests/test_gpu_only.py -k "triton"

# --- 3. the same for the native CUDA kernels, once built -----------------------------------------
HAS_CUDA_BACKEND=0
if [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    build_rc=$?
    took=$(( $(date +%s) - BUILD_BEGIN ))
    if (( build_rc == 0 )) && python3 -c "import pini_kernels, sys;
sys.exit('cuda' not in pini_kernels.available_backends())" 2>> "$OUT/build.log"; then
        note build "PASS in ${took} s"
        HAS_CUDA_BACKEND=1
    else
        note build "FAIL (rc $build_rc) in ${took} s: see build.log; the 'cuda' backend is not checked"
    fi
fi
if [ "$HAS_CUDA_BACKEND" = 1 ]; then
    stage gpu_only_cuda 150 "${PYTEST[@]}" tests/test_gpu_only.py tests/test_cuda_launch.py \
        -k "cuda or graph or sync or launch"
else
    skip gpu_only_cuda "no native 'cuda' backend (see build above)"
fi

# --- 4. every kernel test on the GPU backends (Triton, CUDA) against the reference --------------
if [ "$HAS_GPU" = 1 ]; then
    stage kernel_tests 200 "${PYTEST[@]}" tests/test_noise_stream.py tests/test_inject.py \
        tests/test_cosine.py tests/test_api.py tests/test_native.py
else
    skip kernel_tests "no CUDA GPU here (the CPU runs these in the ordinary test suite)"
fi

# --- 5. compute-sanitizer over a small run of every CUDA op --------------------------------------
EVERY_OP="import sys; sys.path.insert(0, 'tests'); import test_gpu_only as t; \
t.run_every_op('cuda', 1234); t.run_every_op('cuda', t.device_seed(99))"
for tool in memcheck racecheck; do
    if [ "$HAS_CUDA_BACKEND" != 1 ]; then
        skip "sanitizer_$tool" "no native 'cuda' backend to check"
    elif [ -z "$SANITIZER" ]; then
        skip "sanitizer_$tool" "no compute-sanitizer in PATH or \$CUDA_HOME/bin"
    else
        stage "sanitizer_$tool" 90 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            --target-processes all python3 -c "$EVERY_OP"
    fi
done

# --- 6. one pini training step and evaluation on the GPU (open_clip from the wheelhouse) -------
pini_stage_reason() {
    local torch_here wheel_torch python_tag
    torch_here=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
    wheel_torch=$(cat benchmarks/wheelhouse/TORCH_VERSION 2>/dev/null)
    python_tag=$(python3 -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
    echo "pini stage versions: torch here $torch_here, the wheelhouse's torchvision is for" \
        "torch ${wheel_torch:-(no wheelhouse)}; python $python_tag" >&2
    [ "$HAS_GPU" = 1 ] || { echo "no CUDA GPU here"; return; }
    [ -d benchmarks/wheelhouse ] || {
        echo "no benchmarks/wheelhouse (bash benchmarks/make_wheelhouse.sh, then carry it)"
        return
    }
    [ "$torch_here" = "$wheel_torch" ] || {
        echo "the wheelhouse's torchvision is for torch ${wheel_torch:-?}, this machine has" \
            "$torch_here (rebuild it with that torch)"
        return
    }
    ls benchmarks/wheelhouse/torchvision-*-"$python_tag"-*.whl > /dev/null 2>&1 || {
        echo "no torchvision wheel for $python_tag in the wheelhouse"
        return
    }
    python3 -c "import numpy" 2> /dev/null || echo "numpy is not installed (the wheelhouse has none)"
}
pini_step() {
    local deps="$WORK/site-packages" python_tag
    python_tag=$(python3 -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
    # The wheels for this python, less the distributions this machine already has (its own kept).
    mapfile -t wheels < <(python3 - "$python_tag" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

tag = sys.argv[1]
for wheel in sorted(Path("benchmarks/wheelhouse").glob("*.whl")):
    parts = wheel.stem.split("-")  # name-version[-build]-python-abi-platform
    name, python, abi = parts[0], parts[-3].split("."), parts[-2]
    if "py3" not in python and tag not in python and abi != "abi3":
        continue
    try:
        version(name)
        print(f"kept this machine's {name}", file=sys.stderr)
    except PackageNotFoundError:
        print(wheel)
PY
)
    python3 -m pip install --quiet --no-index --no-deps --target "$deps" "${wheels[@]}" || return 1
    python3 - "$WORK/data/shapes" <<'PY' || return 1
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# Four classes of 32x32 images a tiny CLIP can tell apart: a colour per class, with noise.
root, generator = Path(sys.argv[1]), np.random.default_rng(0)
colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "grey": (128,) * 3}
for split, count in (("train", 8), ("test", 6)):
    for name, colour in colours.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = np.clip(np.array(colour) + generator.normal(0, 30, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(root / split / name / f"{index}.png")
PY
    local run="$WORK/run"
    PYTHONPATH="$deps:$PYTHONPATH" python3 -m pini train --root "$WORK/data" --dataset shapes \
        --model pini-tiny --device cuda --shots 4 --epochs 2 --no-progress --output "$run" &&
    PYTHONPATH="$deps:$PYTHONPATH" python3 -m pini eval --checkpoint "$run/checkpoint.pt" \
        --device cuda --no-progress &&
    cp "$run/summary.json" "$OUT/pini_summary.json"
}
reason=$(pini_stage_reason 2> >(tee -a "$OUT/env.log" >&2))
if [ -n "$reason" ]; then
    skip pini_step "$reason"
else
    export -f pini_step
    export WORK OUT
    stage pini_step 150 bash -c pini_step
fi
PYTHONPATH="$WORK/site-packages:$PYTHONPATH"  # the benchmarks' model step needs open_clip too

# --- 7. the full benchmarks and their report -------------------------------------------------------
if [ "$HAS_GPU" != 1 ]; then
    skip benchmarks "no CUDA GPU here (the CPU sizes run with: pytest benchmarks/ --benchmark-only)"
elif ! python3 -c "import pytest_benchmark" 2> /dev/null; then
    skip benchmarks "pytest-benchmark is not installed"
else
    stage benchmarks 240 env PINI_BENCH_FULL=1 "${PYTEST[@]}" benchmarks/ --benchmark-only \
        --benchmark-json="$OUT/bench.json"
    if [ -s "$OUT/bench.json" ]; then
        python3 -m benchmarks.report "$OUT/bench.json" --out "$OUT" > "$OUT/report.log" 2>&1 ||
            note report "FAIL: see report.log"
    fi
fi

# --- 8. the Triton kernels' registers and spills on sm_90 (ptxas -v; any machine) ---------------
stage ptxas_resources 120 python3 tests/gpu_compile_check.py --quick --resources

# --- the summary, last ----------------------------------------------------------------------------
rm -rf "$WORK"
{
    echo
    echo "=== GPU check: $(head -2 "$OUT/env.log" | tail -1) ==="
    echo "=== in $(( $(date +%s) - STARTED )) s of a ${BUDGET} s budget; logs in $OUT ==="
    cat "$SUMMARY"
    for log in "$OUT"/gpu_only_*.log "$OUT"/kernel_tests.log; do
        [ -f "$log" ] && grep -E "^(FAILED|ERROR)" "$log" | head -5
    done
    [ -f "$OUT/ptxas_resources.log" ] &&
        grep -E "^(compiled|RESOURCE PROBLEM|no ptxas)" "$OUT/ptxas_resources.log" | head -4
    [ -f "$OUT/kernel_tests.log" ] &&
        sed -n '/largest error against the reference/,/short test summary/p' \
            "$OUT/kernel_tests.log" | head -14
    for report in "$OUT"/*.md; do
        [ -f "$report" ] && grep -E "^\| |^## " "$report" | head -12
    done
} | tee "$OUT/summary_screen.txt"
