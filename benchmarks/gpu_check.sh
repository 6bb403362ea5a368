#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine gives a verdict, even a partial one.
#
#   bash benchmarks/make_wheelhouse.sh   # once, here: open_clip & co. for the GPU machine's Python
#   bash benchmarks/gpu_check.sh         # on the GPU machine, from the repository root
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # every stage in order, each saying why it
#                                                  # would skip or what it would run (no GPU work)
#
# The GPU machine has python3 with torch, Triton, pytest and nvcc; benchmarks/wheelhouse/
# (git-ignored, carried along) brings open_clip and what else `pini` needs. Stages, in order:
#
#   build          the native CUDA kernels, in the foreground (CUDA_HOME from the nvcc on PATH)
#   smoke          every op on both GPU backends, int / None / device seeds (tests/gpu_smoke.py)
#   sanitizer_*    compute-sanitizer memcheck and racecheck on the smoke script, "cuda" backend
#   sync_graphs    no host syncs, CUDA-graph replay, torch.compile's graphs (test_gpu_only.py)
#   correctness    float64 truth at CLIP's shapes, odd widths, misaligned views, fp16/bf16, TF32
#                  on and off, past 2^31 elements (test_gpu_only.py and the kernel tests)
#   pini_step      a ViT-B/16-sized training step and `pini train` + `pini eval` on the GPU
#   benchmarks     the benchmarks at full size and their report, with the time left
#
# Each stage runs under the smaller of its own limit and what is left of the budget
# (GPU_CHECK_BUDGET seconds, 420 by default, so one stage can be rerun within a 10-minute call).
# A stage cut by its limit gets SIGINT first (pytest then writes its summary and junit XML), a
# kill 15 s later. Counts come from the junit XML, so a cut stage still says what passed and
# failed. Everything goes under $OUT (a new temporary folder when unset): a log and an XML per
# stage, the benchmark JSON and report, and summary.txt, the table printed last.
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"  # scratch that does not come back: the wheelhouse's packages, the pini run
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PINI_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
BUDGET="${GPU_CHECK_BUDGET:-420}"
DRY="${GPU_CHECK_DRY:-0}"
STARTED=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfEs)

# shellcheck source=benchmarks/gpu_check_lib.sh
source "$(dirname "$0")/gpu_check_lib.sh"

# --- the machine ------------------------------------------------------------------------------
export CUDA_HOME
CUDA_HOME=$(cuda_home)
{
    python3 -V
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    echo "CUDA_HOME: $CUDA_HOME"
    for tool in nvcc compute-sanitizer ptxas; do
        found=$(command -v "$tool" || ls "$CUDA_HOME/bin/$tool" 2>/dev/null || echo "not found")
        echo "$tool: $found"
    done
} 2>&1 | tee "$OUT/env.log"
HAS_GPU=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
NO_GPU="no CUDA GPU here (torch.cuda.is_available() is False)"
SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME/bin/compute-sanitizer" 2>/dev/null)
NVCC=$(command -v nvcc || ls "$CUDA_HOME/bin/nvcc" 2>/dev/null)

# --- build: the native CUDA kernels, in the foreground ----------------------------------------
HAS_CUDA_BACKEND=0
if [ "$HAS_GPU" != 1 ] && [ "$DRY" != 1 ]; then
    skip build "$NO_GPU"
elif [ -z "$NVCC" ]; then
    skip build "no nvcc in PATH or \$CUDA_HOME/bin: the 'cuda' backend is not checked"
elif stage build 200 python3 setup.py build_ext --inplace && [ "$DRY" != 1 ]; then
    if python3 -c "import pini_kernels, sys; sys.exit('cuda' not in
pini_kernels.available_backends())" >> "$OUT/build.log" 2>&1; then
        HAS_CUDA_BACKEND=1
    else
        note build "FAIL: built, but the 'cuda' backend is not available (see build.log)"
    fi
fi

# --- smoke: every op on both GPU backends ------------------------------------------------------
if [ "$HAS_GPU" = 1 ] || [ "$DRY" = 1 ]; then
    stage smoke 60 python3 tests/gpu_smoke.py
else
    skip smoke "$NO_GPU"
fi

# --- compute-sanitizer over the smoke script, "cuda" backend ------------------------------------
for tool in memcheck racecheck; do
    if [ "$HAS_CUDA_BACKEND" != 1 ] && [ "$DRY" != 1 ]; then
        skip "sanitizer_$tool" "no native 'cuda' backend to check"
    elif [ -z "$SANITIZER" ]; then
        skip "sanitizer_$tool" "no compute-sanitizer in PATH or \$CUDA_HOME/bin"
    else
        stage "sanitizer_$tool" 60 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            --target-processes all python3 tests/gpu_smoke.py --backend cuda
        rc=$?
        # Some machines refuse the sanitizer ("Device not supported"): that is no verdict.
        if (( rc != 0 )) && grep -qiE "device not supported|not supported on this" \
            "$OUT/sanitizer_$tool.log" 2>/dev/null; then
            sed -i '$d' "$SUMMARY"
            skip "sanitizer_$tool" "compute-sanitizer refuses this GPU: $(grep -m1 -iE \
                'not supported' "$OUT/sanitizer_$tool.log" | cut -c1-100)"
        fi
    fi
done

# --- no syncs, CUDA graphs, compiled graphs ----------------------------------------------------
if [ "$HAS_GPU" = 1 ] || [ "$DRY" = 1 ]; then
    stage sync_graphs 90 "${PYTEST[@]}" tests/test_gpu_only.py -k "sync or graph or overhead"
else
    skip sync_graphs "$NO_GPU"
fi

# --- correctness against float64 and the reference, every GPU path -----------------------------
if [ "$HAS_GPU" = 1 ] || [ "$DRY" = 1 ]; then
    stage correctness 150 "${PYTEST[@]}" tests/test_gpu_only.py -k "not (sync or graph or overhead)" \
        tests/test_api.py tests/test_noise_stream.py tests/test_inject.py \
        tests/test_cosine.py tests/test_native.py tests/test_cuda_launch.py
else
    skip correctness "$NO_GPU (the CPU runs these kernel tests in the ordinary suite)"
fi

# --- pini on the GPU: a ViT-B/16 training step, then train and eval through the CLI ------------
pini_stage_reason() {
    local torch_here wheel_torch python_tag
    [ "$HAS_GPU" = 1 ] || [ "$DRY" = 1 ] || { echo "$NO_GPU"; return; }
    [ -d benchmarks/wheelhouse ] || {
        echo "no benchmarks/wheelhouse (bash benchmarks/make_wheelhouse.sh here, then carry it)"
        return
    }
    torch_here=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
    wheel_torch=$(cat benchmarks/wheelhouse/TORCH_VERSION 2>/dev/null)
    [ "$torch_here" = "$wheel_torch" ] || {
        echo "the wheelhouse's torchvision is for torch ${wheel_torch:-?}, this machine has" \
            "$torch_here (set GPU_STACK_TORCH in ./dev and rebuild the wheelhouse)"
        return
    }
    python_tag=$(python3 -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
    ls benchmarks/wheelhouse/torchvision-*-"$python_tag"-*.whl > /dev/null 2>&1 ||
        echo "no torchvision wheel for $python_tag in the wheelhouse"
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
    export PYTHONPATH="$deps:$PYTHONPATH"
    # One training step of the ViT-B/16 geometry with random weights, fused and eager noise paths.
    python3 -m pytest -q -p no:cacheprovider benchmarks/test_train_step_bench.py -k ViT-B-16 \
        --benchmark-disable || return 1
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
    python3 -m pini train --root "$WORK/data" --dataset shapes --model pini-tiny --device cuda \
        --shots 4 --epochs 2 --no-progress --output "$run" &&
    python3 -m pini eval --checkpoint "$run/checkpoint.pt" --device cuda --no-progress &&
    cp "$run/summary.json" "$OUT/pini_summary.json"
}
reason=$(pini_stage_reason)
if [ -n "$reason" ]; then
    skip pini_step "$reason"
else
    export -f pini_step
    export WORK OUT
    stage pini_step 120 bash -c pini_step
fi

# --- the benchmarks at full size and their report, with what is left ----------------------------
if [ "$HAS_GPU" != 1 ] && [ "$DRY" != 1 ]; then
    skip benchmarks "$NO_GPU (the CPU sizes run with: pytest benchmarks/ --benchmark-only)"
elif ! python3 -c "import pytest_benchmark" 2> /dev/null; then
    skip benchmarks "pytest-benchmark is not installed"
else
    PYTHONPATH="$WORK/site-packages:$PYTHONPATH" stage benchmarks 300 env PINI_BENCH_FULL=1 \
        "${PYTEST[@]}" benchmarks/ --benchmark-only --benchmark-json="$OUT/bench.json"
    if [ -s "$OUT/bench.json" ]; then
        python3 -m benchmarks.report "$OUT/bench.json" --out "$OUT" > "$OUT/report.log" 2>&1 ||
            note report "FAIL: see report.log"
    fi
fi

# --- the summary, last ------------------------------------------------------------------------
rm -rf "$WORK"
{
    echo
    echo "=== GPU check: $(grep -m1 -E "^torch |Error" "$OUT/env.log") ==="
    echo "=== in $(( $(date +%s) - STARTED )) s of a ${BUDGET} s budget; logs in $OUT ==="
    cat "$SUMMARY"
    for log in "$OUT"/*.log; do
        grep -hE "^(FAILED|ERROR) " "$log" 2> /dev/null | head -5
    done
    [ -f "$OUT/correctness.log" ] &&
        sed -n '/largest error against the reference/,/short test summary/p' \
            "$OUT/correctness.log" | head -14
    for report in "$OUT"/*.md; do
        [ -f "$report" ] && grep -E "^\| |^## " "$report" | head -12
    done
} | tee "$OUT/summary_screen.txt"
# Exit status: 1 when a stage failed or ran out of time, else 0 (skips included).
! grep -qE "^[^ ]+ +(FAIL|TIMEOUT)" "$SUMMARY"
