"""Compile every Triton kernel for NVIDIA GPUs ahead of time, without a GPU.

Run as a script (tests/test_gpu_compile.py does, in a process without TRITON_INTERPRET): the
interpreter accepts programs the GPU compiler rejects, so this catches what it cannot. Exits
non-zero on the first failure.

Each kernel is compiled as its launcher launches it: the block sizes, rows per tile and warps
``launch.elementwise_config`` (or the row tiling) picks for a few problem shapes on a 132-SM GPU,
with the alignment hints a launch adds (``launch_hints``). ``--resources`` also runs ``ptxas -v``
on each sm_90 variant's PTX and prints the resource table (registers per thread, spill
stores/loads, static shared memory, and the dynamic shared memory the launch requests); it
fails when any kernel spills or a memory-bound kernel (noise, inject, normalize) needs more
than MEMORY_BOUND_MAX_REGISTERS: at 4 warps a thread's registers bound how many warps fit on an
SM, and a memory-bound kernel needs many in flight to approach copy bandwidth. Every sm_90
variant's approximate float32 instructions must be among those APPROXIMATE_MATH_ALLOWED lists
for it (the GPU tolerances rest on that table).
"""

import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pini_kernels.triton import inject, launch, logits_loss, noise_stream, normalize  # noqa: E402

CUDA = torch.device("cuda")  # the launchers' configurations for a GPU (none is needed here)

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
# 65536 registers per SM / (96 x 32 threads) = 21 warps: five 4-warp programs in flight per SM.
MEMORY_BOUND_MAX_REGISTERS = 96
MEMORY_BOUND_KERNELS = (
    "noise",
    "inject_forward",
    "inject_backward",
    "normalize",
    "normalize_backward",
)


# The approximate float32 instructions each kernel's sm_90 code may hold. The GPU tolerances rest
# on this table (STYLE.md's relative rule, docs in tests/helpers.py): each of these is within 2
# ulps of the exact result (PTX ISA: sqrt.approx.ftz relative error 2^-23, ex2.approx 2^-22.5 +
# ftz, div.full 2 ulps), far inside the 1e-5 float32 tolerances of the stream, inject and loss
# tests; the probability sums at logit scale 100, the one quantity where an exp's ulps show,
# are checked relative to torch's own float32 error. log, sin and cos of Box-Muller go through
# libdevice (correctly rounded to 1-2 ulps), so no sin.approx / lg2.approx may appear: they
# would be off by ~1e-6 absolute at 2*pi, times a radius up to 5.7.
APPROXIMATE_MATH_ALLOWED = {
    "noise": {"sqrt.approx.ftz.f32"},
    "inject_forward": {"sqrt.approx.ftz.f32"},
    "inject_backward": {"sqrt.approx.ftz.f32"},
    "normalize": {"sqrt.approx.ftz.f32", "div.full.f32"},
    "normalize_backward": {"sqrt.approx.ftz.f32", "div.full.f32"},
    "cosine_cross_entropy": {"ex2.approx.f32", "ex2.approx.ftz.f32", "div.full.f32"},
    "cosines": set(),
    "cross_entropy_grad": {"ex2.approx.f32", "ex2.approx.ftz.f32", "div.full.f32"},
    "cross_entropy_stats_grad": {"ex2.approx.f32", "ex2.approx.ftz.f32", "div.full.f32"},
}
APPROXIMATE_INSTRUCTION = re.compile(
    r"\b(?:sin|cos|lg2|ex2|sqrt|rsqrt|rcp|div|tanh)\.(?:approx|full)[a-z0-9.]*"
)


def approximations(name: str, ptx: str) -> list[str]:
    """The approximate instructions in ``ptx`` beyond what APPROXIMATE_MATH_ALLOWED allows."""
    used = set(APPROXIMATE_INSTRUCTION.findall(ptx))
    return sorted(used - APPROXIMATE_MATH_ALLOWED.get(name, set()))


# A GPU to size the launch grids for (H100 SXM: 132 SMs); the launchers read the device's count.
MULTIPROCESSORS = 132
# (rows, width) of the elementwise kernels' problems, as the launchers see them: a batch of
# (B, D) features with per-row parameters, the same per-feature ((B, D) as rows x D), raw images
# with per-pixel noise, a very tall narrow problem, and an odd width (no alignment, no hints).
ELEMENTWISE_PROBLEMS = {
    "feature B32 D512": (1, 32 * 512),
    "per-feature B256 D768": (256, 768),
    "image B32 3x224x224": (32, 3 * 224 * 224),
    "narrow 2^25 x 64": (2**25, 64),
    "odd 1000 x 37": (1000, 37),
}
# The widest feature row the Triton row kernels take (normalize.MAX_FEATURE_DIM) and CLIP's.
ROW_WIDTHS = (512, 768, normalize.MAX_FEATURE_DIM)


def launch_hints(kernel, signature: dict, values: dict) -> dict:
    """The alignment hints Triton adds when the launcher calls ``kernel``: tt.divisibility 16 on
    every pointer (torch's allocations are 16-byte aligned) and on every integer argument whose
    value (``values``, as the launcher passes it) is a multiple of 16."""
    hints = {}
    for index, name in enumerate(kernel.arg_names):
        kind = signature[name]
        if kind.startswith("*") or (kind[0] in "iu" and values.get(name, 1) % 16 == 0):
            hints[(index,)] = [["tt.divisibility", 16]]
    return hints


def compile_kernel(kernel, types: dict, constants: dict, target, launch_options, values=None):
    """The kernel compiled as the launch code runs it: its types, constexprs, launch options
    (warps, or a dict of Triton's options: num_warps, maxnreg) and (for the integer ``values``
    the launcher passes, and every pointer) the alignment hints of a launch."""
    if isinstance(launch_options, int):
        launch_options = {"num_warps": launch_options}
    if constants.get("SEED_IN_MEMORY"):  # the seed as a pointer to a 0-d int64 tensor
        types = dict(types, seed="*i64")
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    attrs = launch_hints(kernel, signature, values or {})
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=dict(launch_options))


def find_ptxas() -> str | None:
    """PINI_PTXAS, the CUDA toolkit's ptxas, or the one Triton ships."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    for candidate in (
        os.environ.get("PINI_PTXAS"),
        "/usr/local/cuda/bin/ptxas",
        shutil.which("ptxas"),
        str(bundled),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def ptxas_resources(ptxas: str, ptx: str) -> dict:
    """registers, spill_stores, spill_loads (bytes), shared (bytes) of the kernel in ``ptx``."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", str(path), "-o", str(Path(folder) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    report = result.stdout + result.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        shared=number(r"(\d+) bytes smem"),
    )


def describe_flags(flags: dict) -> str:
    """The flags that vary between variants, short: MULTIPLY=True -> MULTIPLY."""
    words = []
    for name, value in flags.items():
        if value is True:
            words.append(name)
        elif value is not False:
            words.append(f"{name}={value}")
    return " ".join(words)


def elementwise_launches():
    """(problem, config, integer argument values) of each ELEMENTWISE_PROBLEMS entry, configured
    by the launcher itself (``launch.elementwise_config`` for a GPU of MULTIPROCESSORS SMs)."""
    for problem, (rows, width) in ELEMENTWISE_PROBLEMS.items():
        config = launch.elementwise_config(
            width, rows, CUDA, multiprocessors=MULTIPROCESSORS, aligned=width % 4 == 0
        )
        values = dict(
            num_samples=1,
            numel=rows * width,
            rows=rows,
            width=width,
            inner=2,
            rows_per_program=config.rows_per_program,
            start=0,
        )
        yield problem, config, values


def variants():
    """(name, kernel, argument types, constexprs, warps, integer values) of every variant the
    launchers use."""
    sizes = dict(
        seed="i64",
        num_samples="i32",
        numel="i64",
        rows="i32",
        width="i32",
        inner="i32",
        rows_per_program="i32",
    )
    for problem, config, values in elementwise_launches():
        shape = dict(ROWS=config.rows_per_tile, BLOCK=config.block)
        aligned = values["width"] % 4 == 0
        for dtype, (multiply, has_inner) in itertools.product(
            ("fp32", "bf16", "fp16"), itertools.product((False, True), repeat=2)
        ):
            pointers = dict(
                x_ptr=f"*{dtype}", mu_ptr="*fp32", sigma_ptr="*fp32", out_ptr=f"*{dtype}"
            )
            # The seed in memory on the fp32 variants: every other flag is seen with both kinds.
            flags = dict(
                SEED_IN_MEMORY=dtype == "fp32",
                HAS_INNER=has_inner,
                MULTIPLY=multiply,
                ALIGNED=aligned,
                **shape,
            )
            kernel, types = inject._inject_forward_kernel, {**pointers, **sizes}
            yield "inject_forward", kernel, types, flags, config.launch_options, values, problem
        for multiply, need_x, need_params in itertools.product((False, True), repeat=3):
            pointers = dict(grad_out_ptr="*bf16", x_ptr="*bf16", grad_x_ptr="*bf16")
            for name in ("mu_ptr", "sigma_ptr", "partial_mu_ptr", "partial_sigma_ptr"):
                pointers[name] = "*fp32"
            # The seed in memory and the parameters' layout vary with the gradients wanted.
            flags = dict(SEED_IN_MEMORY=need_x, HAS_INNER=need_params, MULTIPLY=multiply)
            flags |= dict(ALIGNED=aligned, NEED_X_GRAD=need_x, NEED_PARAM_GRAD=need_params)
            flags |= shape
            kernel, types = inject._inject_backward_kernel, {**pointers, **sizes}
            yield "inject_backward", kernel, types, flags, config.launch_options, values, problem
    for problem, config, values in elementwise_launches():
        if values["rows"] != 1:  # the noise kernel is one row of numel elements
            continue
        for aligned, in_memory in itertools.product((False, True), repeat=2):
            types = dict(out_ptr="*fp32", seed="i64", start="i64", numel="i64")
            flags = dict(SEED_IN_MEMORY=in_memory, ALIGNED=aligned, BLOCK=config.block)
            options = launch.elementwise_config(
                values["width"], 1, CUDA, multiprocessors=MULTIPROCESSORS, aligned=aligned
            ).launch_options
            yield "noise", noise_stream._noise_kernel, types, flags, options, values, problem
    yield from cosine_variants()


def cosine_variants():
    row_types = dict(
        x_ptr="*bf16", x_row_stride="i64", seed="i64", stream_offset="i64", rows="i32", dim="i32"
    )
    for name in ("mu_row_stride", "mu_col_stride", "sigma_row_stride", "sigma_col_stride"):
        row_types[name] = "i64"
    for name in (
        "mu_ptr",
        "sigma_ptr",
        "unit_ptr",
        "norm_ptr",
        "grad_unit_ptr",
        "grad_x_ptr",
        "grad_mu_ptr",
        "grad_sigma_ptr",
    ):
        row_types[name] = "*fp32"
    # CLIP's widths (ViT-B 512, ViT-L 768) and the widest the ops take, tiled as the launcher
    # tiles them.
    for dim, has_noise, multiply, aligned in itertools.product(
        ROW_WIDTHS, (False, True), (False, True), (False, True)
    ):
        if dim != 512 and not has_noise:
            continue
        block, rows, warps = normalize._row_tiling(dim)
        flags = dict(
            SEED_IN_MEMORY=has_noise and multiply != aligned,
            HAS_NOISE=has_noise,
            MULTIPLY=multiply,
            ALIGNED=aligned,
            ROWS=rows,
            BLOCK=block,
        )
        values = dict(rows=1024, dim=dim if aligned else dim - 1, x_row_stride=dim)
        problem = f"D{dim}"
        kernel = normalize._noisy_normalize_kernel
        yield "normalize", kernel, row_types, flags, warps, values, problem
        for need_x, need_params in ((True, True), (True, False), (False, True)):
            backward_flags = dict(flags, NEED_X_GRAD=need_x, NEED_PARAM_GRAD=need_params)
            kernel = normalize._noisy_normalize_backward_kernel
            yield "normalize_backward", kernel, row_types, backward_flags, warps, values, problem
    loss_types = dict(
        rows="i32", classes="i32", dim="i32", classes_per_split="i32", target_ptr="*i64"
    )
    for name in (
        "image_ptr",
        "text_ptr",
        "scale_ptr",
        "partial_max_ptr",
        "partial_sum_ptr",
        "partial_target_ptr",
        "partial_logit_sum_ptr",
    ):
        loss_types[name] = "*fp32"
    for precision in ("ieee", "tf32"):
        flags = dict(
            BLOCK_ROWS=logits_loss.BLOCK_ROWS,
            BLOCK_CLASSES=logits_loss.BLOCK_CLASSES,
            BLOCK_DIM=logits_loss.BLOCK_DIM,
            INPUT_PRECISION=precision,
        )
        warps = logits_loss.LOGITS_TILE_WARPS
        values = dict(rows=32, classes=100, dim=512, classes_per_split=64)
        kernel = logits_loss._cosine_cross_entropy_kernel
        yield "cosine_cross_entropy", kernel, loss_types, flags, warps, values, "B32 C100 D512"
        cosine_types = dict(
            image_ptr="*fp32",
            text_ptr="*fp32",
            out_ptr="*fp32",
            rows="i32",
            classes="i32",
            dim="i32",
        )
        kernel = logits_loss._cosine_kernel
        yield "cosines", kernel, cosine_types, flags, warps, values, "B32 C100 D512"
    grad_types = dict(
        cosine_ptr="*fp32",
        lse_ptr="*fp32",
        target_ptr="*i64",
        row_grad_ptr="*fp32",
        scale_ptr="*fp32",
        scale_grad_ptr="*fp32",
        target_logit_ptr="*fp32",
        logit_sum_ptr="*fp32",
        classes="i32",
        label_smoothing="fp32",
    )
    for compute_stats in (False, True):
        flags = dict(BLOCK=logits_loss.BLOCK_GRAD_CLASSES, COMPUTE_STATS=compute_stats)
        name = "cross_entropy_stats_grad" if compute_stats else "cross_entropy_grad"
        values = dict(classes=100)
        kernel = logits_loss._cross_entropy_grad_kernel
        yield name, kernel, grad_types, flags, 4, values, "B32 C100"


def main() -> int:
    count = 0
    started = time.perf_counter()
    only_first_target = "--quick" in sys.argv
    ptxas = find_ptxas() if "--resources" in sys.argv else None
    if "--resources" in sys.argv and ptxas is None:
        print("no ptxas found (set PINI_PTXAS): resource table skipped")
    rows, problems = [], []
    for target in TARGETS[:1] if only_first_target else TARGETS:
        for name, kernel, types, flags, warps, values, shape in variants():
            try:
                compiled = compile_kernel(kernel, types, flags, target, warps, values)
            except Exception as error:
                print(f"FAILED {name} sm_{target.arch} {shape} {types} {flags}: {error}")
                return 1
            count += 1
            where = f"{name} {shape} [{describe_flags(flags)}]"
            unexpected = approximations(name, compiled.asm["ptx"])
            if unexpected and target.arch == 90:
                problems.append(
                    f"{where} uses {', '.join(unexpected)}, which the GPU tolerances do not allow "
                    "for (APPROXIMATE_MATH_ALLOWED)"
                )
            if ptxas is not None and target.arch == 90:
                used = ptxas_resources(ptxas, compiled.asm["ptx"])
                used["dynamic"] = compiled.metadata.shared  # what the launch asks for
                options = warps if isinstance(warps, dict) else {"num_warps": warps}
                settings = " ".join(f"{key}={value}" for key, value in options.items())
                rows.append((name, shape, f"{describe_flags(flags)} {settings}", used))
                if used["spill_stores"] or used["spill_loads"]:
                    problems.append(f"{where} spills")
                over = used["registers"] > MEMORY_BOUND_MAX_REGISTERS
                if name in MEMORY_BOUND_KERNELS and over:
                    problems.append(
                        f"{where} uses {used['registers']} registers "
                        f"(memory-bound kernels: at most {MEMORY_BOUND_MAX_REGISTERS})"
                    )
    if rows:
        print(
            f"{'kernel':<22} {'problem':<22} {'regs':>4} {'spill st':>8} {'spill ld':>8} "
            f"{'smem':>6} {'dyn smem':>8}  flags"
        )
        for name, shape, flags, used in rows:
            print(
                f"{name:<22} {shape:<22} {used['registers']:>4} {used['spill_stores']:>8} "
                f"{used['spill_loads']:>8} {used['shared']:>6} {used['dynamic']:>8}  {flags}"
            )
    print(f"compiled {count} kernel variants in {time.perf_counter() - started:.1f} s")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
