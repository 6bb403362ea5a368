"""The GPU check's first look (benchmarks/gpu_check.sh, stage "smoke"), and what it runs under
compute-sanitizer: every op forward and backward on each GPU backend with an int seed, None and a
0-d int64 seed tensor on the GPU, then a synchronize.

    python tests/gpu_smoke.py                 # every GPU backend, every seed kind
    python tests/gpu_smoke.py --backend cuda  # one backend (the sanitizer stages)

Prints ``available_backends()`` first and one line per backend and seed kind; exits 1 on the first
failure with its traceback, 0 when every line says ok. Without a GPU it says so and exits 0
(nothing to check), so a dry run of gpu_check.sh passes through it.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["triton", "cuda"], action="append")
    arguments = parser.parse_args(argv)
    import pini_kernels

    print("available_backends():", pini_kernels.available_backends(), flush=True)
    if not torch.cuda.is_available():
        print("SKIP: no CUDA GPU here (torch.cuda.is_available() is False)")
        return 0
    import test_gpu_only as gpu  # its run_every_op: the same calls the sync test makes

    backends = arguments.backend or gpu.GPU_BACKENDS
    missing = [name for name in backends if name not in pini_kernels.available_backends()]
    if missing:
        print(f"FAIL: backend(s) {missing} not available:", file=sys.stderr)
        for name in missing:
            print(f"  {name}: {pini_kernels.backends._unavailable_reason(name, gpu.CUDA)}")
        return 1
    for backend in backends:
        for kind, seed in (("int", 1234), ("None", None), ("device", gpu.device_seed(99))):
            begin = time.perf_counter()
            try:
                gpu.run_every_op(backend, seed)
                torch.cuda.synchronize()
            except Exception:
                print(f"{backend:<7} seed {kind:<7} FAIL", flush=True)
                traceback.print_exc()
                return 1
            took = time.perf_counter() - begin
            print(f"{backend:<7} seed {kind:<7} ok ({took:.2f} s, first includes compiling)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
