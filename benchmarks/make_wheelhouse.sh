#!/usr/bin/env bash
# Builds benchmarks/wheelhouse/ (git-ignored): open_clip and the pure-Python and small binary
# packages `pini` needs beyond torch, Triton and numpy, at the versions installed in this
# checkout's .venv, for benchmarks/gpu_check.sh's `pini` stage on a GPU machine that is offline
# and has only torch and Triton. torchvision must match that machine's torch exactly: the
# wheelhouse holds the torchvision built for the torch installed here, and gpu_check.sh prints
# both versions and skips the stage when they do not match.
#   bash benchmarks/make_wheelhouse.sh [PYTHON_VERSIONS...]   (default: this python's and 3.12)
# The run tool carries it with `carry: ["benchmarks/wheelhouse"]` (64 MiB at most in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
WHEELHOUSE=benchmarks/wheelhouse
mkdir -p "$WHEELHOUSE"
versions=("$@")
if [ ${#versions[@]} -eq 0 ]; then
    versions=("$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" 3.12)
fi
# name==version of open_clip_torch, pillow and tqdm and everything they require, as installed
# here; never torch, triton, numpy or the nvidia-* runtime (the GPU machine's own are kept).
mapfile -t pins < <("$PYTHON" - <<'PY'
import re
from importlib.metadata import PackageNotFoundError, distribution

KEEP_THE_MACHINES = {"torch", "triton", "numpy", "setuptools", "pip", "wheel"}
todo, pins = ["open_clip_torch", "pillow", "tqdm"], {}
while todo:
    key = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if key in pins or key in KEEP_THE_MACHINES or key.startswith("nvidia-"):
        continue
    try:
        dist = distribution(key)
    except PackageNotFoundError:  # a requirement for another platform or Python (marker)
        continue
    pins[key] = dist.version
    todo += [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in dist.requires or []
             if "extra ==" not in r]
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
PY
)
echo "packages: ${pins[*]}"
for version in "${versions[@]}"; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELHOUSE" \
        --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any "${pins[@]}" \
        2> >(grep -v "is ignored: it is neither" >&2)
done
"$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])" > "$WHEELHOUSE/TORCH_VERSION"
du -sh "$WHEELHOUSE"
ls "$WHEELHOUSE"
