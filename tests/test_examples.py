"""The examples run as written (a subprocess, as a user would start it), and prints the same every run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _result_line(stdout: str) -> str:
    """Rank 0's message (another rank's "ok" may land on the same line)."""
    (line,) = re.findall(r"sizes \[.*?\]: relative error vs one process \S+; bytes per token \d+ \(NVFP4\) "
                         r"vs \d+ \(bf16\)", stdout)
    return line


@pytest.fixture(scope="module")
def spawned():
    return subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                          timeout=300)


def test_quickstart_runs(spawned):
    assert spawned.returncode == 0, spawned.stderr[-3000:]
    assert spawned.stdout.strip().endswith("ok") and spawned.stdout.split().count("ok") == 1, spawned.stdout
    assert _result_line(spawned.stdout).startswith("sizes [3, 8]: ")


def test_quickstart_under_torchrun(spawned):
    # launch() runs in place under torchrun (env:// init): each of the 2 processes is one rank
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=300)
    # exit code 0: both processes passed their checks (torchrun fails if any rank fails); the two
    # processes' prints may interleave, so only rank 0's message is looked for
    assert run.returncode == 0, run.stderr[-3000:]
    # the data and the router are seeded: another run prints the same error, to the last digit
    assert _result_line(run.stdout) == _result_line(spawned.stdout)


@pytest.mark.parametrize("world_size", [2, 3])
def test_two_microbatches_equal_one_after_the_other(world_size):
    # the example asserts on every rank that the overlapped schedule equals the micro-batches run one after the
    # other through moe_forward, bit for bit; at 3 ranks one rank's micro-batch B is empty
    run = subprocess.run([sys.executable, str(EXAMPLES / "two_microbatches.py"), str(world_size)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{world_size} ranks, micro-batch A sizes" in run.stdout
    assert "equals one after the other, bit for bit" in run.stdout and run.stdout.strip().endswith("ok")


def test_quickstart_at_three_ranks_under_torchrun_prints_ok_once():
    # any world size: the experts are a multiple of it; rank 0 alone prints, after every rank's check
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
                          str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _result_line(run.stdout).startswith("sizes [3, 8, 13]: ")
    assert run.stdout.split().count("ok") == 1, run.stdout
    assert run.stdout.strip().endswith("ok")


def test_integration_example_on_three_ranks_with_an_idle_one():
    """docs/integration.md's example: a 2-layer DP-attention / EP-MoE model on 3 gloo ranks, the last one idle,
    against its float32 single-process reference (the example asserts the agreement on every rank)."""
    run = subprocess.run([sys.executable, str(EXAMPLES / "integration.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "world size 3, sizes [26, 8, 0] (rank 2 idle)" and lines[-1] == "ok", run.stdout
    assert run.stdout.split().count("ok") == 1
    assert re.fullmatch(r"strategy 'auto' -> agrs(-nvfp4)?: .*sum\(sizes\)=34 .* world size 3 .*", lines[1]), lines[1]
    error = float(re.search(r"relative error (\S+) over 34 tokens", run.stdout).group(1))
    assert 0 < error < 2.5e-2


def test_compiled_model_under_torchrun():
    """launch() returns one result per process under torchrun: the example's own check accepts that, and
    only rank 0 prints."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(EXAMPLES / "compiled_model.py")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok"], run.stdout
