"""What the commands print and write (private, for ``moecomm demo`` and ``moecomm bench``): rich tables and
JSON files with the device, date and command line.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from typing import Any, Sequence

import torch

__all__ = ["FILE_WIDTH", "console", "device_name", "print_table", "write_json"]


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, e.g. ``NVIDIA H200`` or the CPU's processor string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


FILE_WIDTH = 120  # columns of the output where no stream is a terminal and COLUMNS is unset (a file, a pipe, CI)


def console(stderr: bool = False):
    """A rich console as wide as the terminal (rich reads it, or ``COLUMNS``), else :data:`FILE_WIDTH`."""
    from rich.console import Console

    width = None if "COLUMNS" in os.environ or any(_is_terminal(fd) for fd in (0, 1, 2)) else FILE_WIDTH
    return Console(stderr=stderr, width=width)


def _is_terminal(fd: int) -> bool:
    try:
        os.get_terminal_size(fd)
        return True
    except (OSError, ValueError):
        return False


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None, *,
                keys: int = 1, row_styles: Sequence[str | None] | None = None) -> None:
    """Print ``rows`` under ``columns`` as rich tables as wide as the console (:func:`console`).

    Floats get 4 significant digits, NaN reads n/a. The first ``keys`` columns name a row (left-justified,
    the others right-justified). A header wraps between its words, a cell only where one column beside the
    keys is wider than the console: where all columns do not fit, the table is cut into blocks of whole
    columns, one under the other (as pandas prints a wide frame), each repeating the ``keys`` columns; the
    title heads the first block, the caption follows the last as a paragraph as wide as the console. ``row_styles``: a rich style per row (e.g. ``"dim"``) or None.
    """
    from rich.table import Table

    out = console()
    cells = [[_cell(v) for v in row] for row in rows]
    texts = [[columns[c], *(row[c] for row in cells)] for c in range(len(columns))]
    most = [max(len(t) for t in column) for column in texts]  # nothing wraps
    whole = [max([_longest_word(column[0]), *(len(t) for t in column[1:])]) for column in texts]  # headers wrap
    fewest = [max(_longest_word(t) for t in column) for column in texts]  # cells wrap too, between words
    blocks = _column_blocks(out.width, whole, keys)
    for i, block in enumerate(blocks):
        shown = [*range(keys), *block]
        room = out.width - _BORDERS(len(shown))
        widths = _fit([whole[c] for c in shown], [most[c] for c in shown], room)
        widths = _fit([fewest[c] for c in shown], widths, room)
        table = Table(title=title if i == 0 else None)
        for c, width in zip(shown, widths):
            table.add_column(columns[c], justify="left" if c < keys else "right", width=width, overflow="fold")
        for r, row in enumerate(cells):
            table.add_row(*[row[c] for c in shown], style=row_styles[r] if row_styles else None)
        out.print(table)
    if caption:
        out.print(caption, markup=False, highlight=False)  # wrapped between words to the console's width


def _BORDERS(n: int) -> int:  # noqa: N802 - the characters of n columns besides their text: | x | y |
    return 3 * n + 1


def _longest_word(text: str) -> int:
    return max((len(word) for word in text.split()), default=0)


def _column_blocks(width: int, fewest: list[int], keys: int) -> list[list[int]]:
    """The columns after the ``keys`` first, cut into the fewest blocks that each fit ``width`` beside the keys
    at their ``fewest`` widths, as even as that allows; a block holds at least one column."""

    def cut(room: int) -> list[list[int]]:  # greedy: a new block where the next column would pass ``room``
        blocks: list[list[int]] = [[]]
        for c in range(keys, len(fewest)):
            block = blocks[-1]
            if block and sum(fewest[b] for b in [*range(keys), *block, c]) + _BORDERS(keys + len(block) + 1) > room:
                blocks.append([])
            blocks[-1].append(c)
        return blocks

    blocks = cut(width)
    for room in range(width * 2 // 3, width):  # narrower rooms spread the columns evenly over as many blocks
        even = cut(room)
        if len(even) == len(blocks):
            return even
    return blocks


def _fit(fewest: list[int], most: list[int], room: int) -> list[int]:
    """Column widths within ``room``: each its ``most``, narrowed one character at a time from the widest
    column still above its ``fewest``."""
    widths = list(most)
    while sum(widths) > room:
        narrowable = [c for c in range(len(widths)) if widths[c] > fewest[c]]
        if not narrowable:
            break
        widest = max(narrowable, key=lambda c: widths[c])
        widths[widest] -= 1
    return widths


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
