import os

import pytest
import torch

# Triton kernels run on the CPU interpreter where no GPU exists. Set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--shard", default=None, metavar="I/N",
        help="run only the selected tests whose position modulo N is I (0 <= I < N): one selection spread over "
             "N parallel pytest processes (scripts/gpu_check.sh)",
    )  # fmt: skip


@pytest.hookimpl(trylast=True)  # after -m / -k deselected: the shards split what is left
def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if spec is not None:
        i, n = _shard(spec)
        config.hook.pytest_deselected(items=[t for pos, t in enumerate(items) if pos % n != i])
        items[:] = items[i::n]
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard must be I/N with integers, got {spec!r}") from None
    if not 0 <= i < n:
        raise pytest.UsageError(f"--shard I/N needs 0 <= I < N, got {spec!r}")
    return i, n
