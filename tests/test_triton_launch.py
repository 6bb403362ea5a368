"""How the Triton launchers shape a GPU launch (pini_kernels/triton/launch.py): warps follow the
tile, narrow rows are walked several at a time, a register cap that keeps ptxas from spilling,
and the widest feature row the row kernels take. The kernels themselves are tested under the
interpreter in test_inject.py / test_cosine.py (with these tiles forced small) and compiled for
sm_90 and sm_80 as launched in test_gpu_compile.py."""

import pytest
import torch
from conftest import FUSED_BACKENDS

import pini_kernels

triton = pytest.importorskip("triton")
launch = pytest.importorskip("pini_kernels.triton.launch")
normalize = pytest.importorskip("pini_kernels.triton.normalize")

H100_SMS = 132


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The launcher's GPU branch, without a GPU (it only reads the device type and SM count)."""
    monkeypatch.setattr(launch, "triton_interpreting", lambda: False)


# (rows, width) -> (block, rows a tile, warps, register cap)
GPU_SHAPES = {
    "features (32, 512) per row: one row of 16384": ((1, 16384), (1024, 1, 8, 64)),
    "features (256, 768) per feature": ((256, 768), (1024, 1, 8, 64)),
    "a 512-wide row": ((1, 512), (512, 1, 4, 64)),
    "tall and 64 wide": ((2**25, 64), (64, 16, 8, 64)),
    "three rows 64 wide": ((3, 64), (64, 4, 2, 64)),
    "one 16-wide row": ((1, 16), (16, 1, 1, 64)),
    "odd width": ((1000, 37), (64, 16, 8, 96)),
}


@pytest.mark.usefixtures("as_on_a_gpu")
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_gpu_launches_scale_warps_and_rows_to_the_block(name):
    (rows, width), expected = GPU_SHAPES[name]
    config = launch.elementwise_config(
        width, rows, torch.device("cuda"), multiprocessors=H100_SMS, aligned=width % 4 == 0
    )
    got = (config.block, config.rows_per_tile, config.num_warps, config.max_registers)
    assert got == expected
    # 4 elements a thread, at most 8 warps; a tile never holds more than 1024 elements.
    tile = config.rows_per_tile * config.block
    assert tile <= launch.MAX_BLOCK_GPU
    assert config.num_warps == max(1, min(8, tile // 128))
    # Whole tiles per program, every row covered once, the grid within CUDA's limits.
    assert config.rows_per_program % config.rows_per_tile == 0
    assert config.row_chunks * config.rows_per_program >= rows
    assert (config.row_chunks - 1) * config.rows_per_program < rows
    assert config.row_chunks <= launch.MAX_ROW_CHUNKS
    assert config.launch_options == {
        "num_warps": config.num_warps,
        "maxnreg": config.max_registers,
    }


@pytest.mark.usefixtures("as_on_a_gpu")
def test_a_tall_narrow_problem_walks_sixteen_times_fewer_tiles():
    """(2^25, 64) on 132 SMs: each program once walked 31,776 single rows; now 1,986 tiles."""
    config = launch.elementwise_config(64, 2**25, torch.device("cuda"), multiprocessors=H100_SMS)
    assert config.grid == (1, triton.cdiv(2**25, config.rows_per_program))
    assert config.rows_per_program // config.rows_per_tile == 1986


def test_the_interpreter_launch_has_no_register_cap():
    config = launch.elementwise_config(64, 100, torch.device("cpu"))
    assert config.max_registers is None and config.launch_options == {"num_warps": 1}


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="needs the Triton backend")
@pytest.mark.parametrize("op", ["logits", "loss"])
def test_triton_takes_rows_up_to_its_widest_and_refuses_wider(op):
    """D = MAX_FEATURE_DIM (2048) runs and equals the reference; one more is one line."""
    widest = normalize.MAX_FEATURE_DIM
    assert widest == 2048
    generator = torch.Generator().manual_seed(0)
    target = torch.tensor([0, 2])
    for dim in (widest, widest + 1):
        image = torch.randn(2, dim, generator=generator)
        text = torch.randn(3, dim, generator=generator)
        noise = (torch.zeros(dim), torch.full((dim,), 0.1))

        def call(backend, image=image, text=text, noise=noise):
            kwargs = dict(image_noise=noise, num_samples=2, seed=4, backend=backend)
            if op == "loss":
                return pini_kernels.noisy_cross_entropy(image, text, 10.0, target, **kwargs)
            return pini_kernels.noisy_cosine_logits(image, text, 10.0, **kwargs)

        if dim == widest:
            torch.testing.assert_close(call("triton"), call("reference"), atol=1e-5, rtol=1e-5)
        else:
            with pytest.raises(ValueError, match="D=2049 exceeds this backend's maximum 2048"):
                call("triton")
