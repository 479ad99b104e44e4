"""The README's example runs as written (a subprocess, as a user would start it)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_runs():
    run = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "relative error vs one process" in run.stdout and run.stdout.strip().endswith("ok")


def test_quickstart_under_torchrun():
    # launch() runs in place under torchrun (env:// init): each of the 2 processes is one rank
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=300)
    # exit code 0: both processes passed their checks (torchrun fails if any rank fails); the two
    # processes' prints may interleave, so only rank 0's message is looked for
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("relative error vs one process") == 1
