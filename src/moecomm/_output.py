"""What the commands print and write (private, for ``moecomm demo`` and ``moecomm bench``): rich tables and
JSON files with the device, date and command line.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
from typing import Any, Sequence

import torch

__all__ = ["device_name", "print_table", "write_json"]


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, e.g. ``NVIDIA H200`` or the CPU's processor string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> None:
    """Print ``rows`` under ``columns`` as a rich table (floats with 4 significant digits, NaN as n/a)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, caption_justify="left")
    for c in columns:
        table.add_column(c, justify="right", overflow="fold")  # wrap a long cell, never cut it
    for row in rows:
        table.add_row(*[_cell(v) for v in row])
    Console(width=200).print(table)


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else "n/a"
    return str(v)


def write_json(path: str, device: torch.device, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` with the device, date (UTC) and command line added.

    Values that were not measured (NaN in the tables) are written as ``null``: strict JSON.
    """
    meta = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
    }
    with open(path, "w") as f:
        json.dump(_finite_or_none({"meta": meta, **payload}), f, indent=1, allow_nan=False)
