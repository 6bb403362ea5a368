"""benchmarks/gpu_check.sh, the one-call GPU check, on a machine without a GPU: every stage runs
in order and says why it skips; a stage cut by its time limit still reports its counts."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
STAGES = [
    "build",
    "smoke",
    "sanitizer_memcheck",
    "sanitizer_racecheck",
    "sync_graphs",
    "correctness",
    "pini_step",
    "benchmarks",
]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _environment(out: Path, **extra) -> dict:
    """This interpreter's folder first on PATH, so the script's python3 is the test's."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "OUT": str(out), **extra}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU would run the stages")
@pytest.mark.parametrize("dry", ["1", "0"])
def test_every_stage_in_order_says_why_it_skips_within_a_minute(tmp_path, dry):
    begin = time.monotonic()
    ran = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_environment(tmp_path, GPU_CHECK_DRY=dry),
        timeout=120,
    )
    took = time.monotonic() - begin
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert took < 60, f"the dry run took {took:.0f} s"
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == STAGES, lines
    for line in lines:
        assert line.split()[1] == "SKIP:" and len(line.split()) > 3, f"no reason given: {line}"
    if dry == "0":
        assert "no CUDA GPU here" in lines[STAGES.index("smoke")]
    # The summary is the last thing printed.
    assert ran.stdout.rstrip().endswith(lines[-1])


def test_a_stage_cut_by_its_limit_reports_what_passed_and_failed(tmp_path):
    """The stage runner interrupts pytest with SIGINT at the limit: pytest writes its junit XML,
    and the summary line says TIMEOUT with the counts of the tests that finished."""
    tests = tmp_path / "test_cut.py"
    tests.write_text(
        "import time\n"
        "def test_one(): pass\n"
        "def test_two(): pass\n"
        "def test_fails(): assert False\n"
        "def test_slow(): time.sleep(120)\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    script = (
        f'OUT="{out}"; SUMMARY="$OUT/summary.txt"; BUDGET=100; STARTED=$(date +%s); DRY=0\n'
        f"source benchmarks/gpu_check_lib.sh\n"
        f'stage cut 8 "{sys.executable}" -m pytest -q -p no:cacheprovider '
        f'--rootdir "{tmp_path}" -c /dev/null "{tests}"\n'
    )
    begin = time.monotonic()
    ran = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_environment(out),
        timeout=90,
    )
    assert time.monotonic() - begin < 60, "the stage was not cut at its limit"
    assert ran.returncode == 124, (ran.stdout, ran.stderr)
    summary = (out / "summary.txt").read_text().strip()
    assert summary.startswith("cut") and "TIMEOUT after" in summary, summary
    assert "2 passed, 1 failed" in summary, summary
    assert (out / "cut.xml").exists() and (out / "cut.log").exists()
