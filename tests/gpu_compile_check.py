"""Compile every Triton kernel for NVIDIA GPUs ahead of time, without a GPU.

Run as a script (tests/test_gpu_compile.py does, in a process without TRITON_INTERPRET): the
interpreter accepts programs the GPU compiler rejects, so this catches what it cannot.
Prints one line per compiled variant; exits non-zero on the first failure.
"""

import itertools
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pini_kernels.triton import cosine, inject, noise_stream  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]


def compile_kernel(kernel, types: dict, constants: dict, target) -> None:
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=target)


def variants():
    sizes = dict(
        seed="i64",
        num_samples="i32",
        numel="i64",
        rows="i32",
        width="i32",
        inner="i32",
        rows_per_program="i32",
    )
    for dtype, (multiply, aligned, has_inner) in itertools.product(
        ("fp32", "bf16", "fp16"), itertools.product((False, True), repeat=3)
    ):
        pointers = dict(x_ptr=f"*{dtype}", mu_ptr="*fp32", sigma_ptr="*fp32", out_ptr=f"*{dtype}")
        flags = dict(HAS_INNER=has_inner, MULTIPLY=multiply, ALIGNED=aligned, BLOCK=1024)
        yield "inject_forward", inject._inject_forward_kernel, {**pointers, **sizes}, flags
    for multiply, aligned, need_x, need_params in itertools.product((False, True), repeat=4):
        pointers = dict(grad_out_ptr="*bf16", x_ptr="*bf16", grad_x_ptr="*bf16")
        for name in ("mu_ptr", "sigma_ptr", "partial_mu_ptr", "partial_sigma_ptr"):
            pointers[name] = "*fp32"
        flags = dict(
            HAS_INNER=aligned,
            MULTIPLY=multiply,
            ALIGNED=aligned,
            NEED_X_GRAD=need_x,
            NEED_PARAM_GRAD=need_params,
            BLOCK=1024,
        )
        yield "inject_backward", inject._inject_backward_kernel, {**pointers, **sizes}, flags
    for aligned in (False, True):
        types = dict(out_ptr="*fp32", seed="i64", start="i64", numel="i64")
        yield "noise", noise_stream._noise_kernel, types, dict(ALIGNED=aligned, BLOCK=1024)
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
    for has_noise, multiply, aligned in itertools.product((False, True), repeat=3):
        flags = dict(HAS_NOISE=has_noise, MULTIPLY=multiply, ALIGNED=aligned, ROWS=4, BLOCK=512)
        yield "normalize", cosine._noisy_normalize_kernel, row_types, flags
        for need_x, need_params in ((True, True), (True, False), (False, True)):
            backward_flags = dict(flags, NEED_X_GRAD=need_x, NEED_PARAM_GRAD=need_params)
            yield (
                "normalize_backward",
                cosine._noisy_normalize_backward_kernel,
                row_types,
                (backward_flags),
            )
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
            BLOCK_ROWS=cosine.BLOCK_ROWS,
            BLOCK_CLASSES=cosine.BLOCK_CLASSES,
            BLOCK_DIM=cosine.BLOCK_DIM,
            INPUT_PRECISION=precision,
        )
        yield "cosine_cross_entropy", cosine._cosine_cross_entropy_kernel, loss_types, flags
    grad_types = dict(
        cosine_ptr="*fp32",
        lse_ptr="*fp32",
        target_ptr="*i64",
        row_grad_ptr="*fp32",
        scale_ptr="*fp32",
        scale_grad_ptr="*fp32",
        classes="i32",
        label_smoothing="fp32",
    )
    yield "cross_entropy_grad", cosine._cross_entropy_grad_kernel, grad_types, dict(BLOCK=1024)


def main() -> int:
    count = 0
    started = time.perf_counter()
    only_first_target = "--quick" in sys.argv
    for target in TARGETS[:1] if only_first_target else TARGETS:
        for name, kernel, types, flags in variants():
            try:
                compile_kernel(kernel, types, flags, target)
            except Exception as error:
                print(f"FAILED {name} sm_{target.arch} {types} {flags}: {error}")
                return 1
            count += 1
    print(f"compiled {count} kernel variants in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
