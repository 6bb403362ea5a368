#!/usr/bin/env bash
# Builds benchmarks/wheelhouse/ (git-ignored) for benchmarks/gpu_check.sh's `pini` stage on the
# GPU machine, which is offline and has Python 3.12, torch 2.11.0 and Triton but no open_clip:
# the wheels of everything `pini train` / `pini eval` need beyond torch and Triton, at the
# versions installed in .venv-gpu-stack (the GPU machine's software, tested by
# ./dev test-gpu-stack, which this script runs first when that environment is missing), for that
# environment's Python. torchvision is the release built for that torch. matplotlib, scipy and
# scikit-learn (visualize, sweep, the linear probe and the demo's digits) stay out, so the
# wheelhouse fits the device tool's 64 MiB carry.
#   bash benchmarks/make_wheelhouse.sh
# The run tool carries it with `carry: ["benchmarks/wheelhouse"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv-gpu-stack/bin/python}"
[ -x "$PYTHON" ] || ./dev setup-gpu-stack
WHEELHOUSE=benchmarks/wheelhouse
rm -rf "$WHEELHOUSE"
mkdir -p "$WHEELHOUSE"
# name==version of pini's requirements and everything they require, as installed there; never
# torch, triton or the nvidia-* runtime (the GPU machine's own are kept).
mapfile -t pins < <("$PYTHON" - <<'PY'
import re
from importlib.metadata import PackageNotFoundError, distribution

THE_MACHINES = {"torch", "triton", "setuptools", "pip", "wheel"}
# Not needed by `pini train` / `pini eval` on an image folder: matplotlib draws (pini visualize),
# scikit-learn fits the linear probe and ships the demo's digits, scipy serves sweep's intervals.
LEFT_OUT = {"matplotlib", "scikit-learn", "scipy"}
todo, pins = [r for r in distribution("pini").requires if "extra ==" not in r], {}
while todo:
    key = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", todo.pop()).group(0)).lower()
    if key in pins or key in THE_MACHINES | LEFT_OUT or key.startswith(("nvidia-", "cuda-")):
        continue
    try:
        dist = distribution(key)
    except PackageNotFoundError:  # a requirement for another platform or Python (marker)
        continue
    pins[key] = dist.version
    todo += [r for r in dist.requires or [] if "extra ==" not in r]
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
PY
)
version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "packages for Python $version: ${pins[*]}"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELHOUSE" \
    --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any "${pins[@]}" \
    2> >(grep -v "is ignored: it is neither" >&2)
"$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])" > "$WHEELHOUSE/TORCH_VERSION"
ls -S "$WHEELHOUSE"
size=$(du -sm "$WHEELHOUSE" | cut -f1)
echo "benchmarks/wheelhouse: ${size} MiB (the device tool carries at most 64 MiB in all)"
if (( size > 60 )); then
    echo "too large to carry beside a built extension" >&2
    exit 1
fi
