"""What the commands print fits the terminal (or 120 columns in a file or a pipe) and stays readable: a table
wider than the terminal is cut into blocks of whole columns, each repeating the columns that name a row;
the long-running commands show progress on stderr, off with ``--no-progress``."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _moecomm(args, columns=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    # no terminal on any stream: stdin from /dev/null, stdout and stderr to pipes (a file, as in CI)
    return subprocess.run([sys.executable, "-m", "moecomm.cli", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def _headers(text: str) -> list[list[str]]:
    """The column headers of every table block in rich's output, each header's lines joined by spaces."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("┏"):
            joined = None
            for head in lines[i + 1:]:
                if head.lstrip().startswith("┡"):
                    break
                cells = [c.strip() for c in head.strip().strip("┃").split("┃")]
                joined = cells if joined is None else [f"{a} {b}".strip() for a, b in zip(joined, cells)]
            blocks.append(joined)
    return blocks


def _assert_readable(text: str, columns: int, tables: list[list[str]], keys: list[int]):
    """No line over ``columns``; every header whole (not broken mid-word); each block starts with the key columns
    of its table, and together the blocks of a table show all its columns."""
    longest = max(text.splitlines(), key=len)
    assert len(longest) <= columns, f"{len(longest)} > {columns}: {longest!r}"
    blocks = _headers(text)
    assert blocks, text
    for block in blocks:
        table = next((t for t in tables if set(block) <= set(t)), None)
        assert table is not None, f"headers broken or unknown: {block}"
    for table, k in zip(tables, keys):
        mine = [b for b in blocks if set(b) <= set(table) and b[:k] == table[:k]]
        assert {h for b in mine for h in b} == set(table), (table, mine)


MOE_COLUMNS = ["regime", "pattern", "sizes", "strategy", "quantize (us)", "dispatch (us)", "experts (us)",
               "combine (us)", "total (us)", "total / experts", "speedup vs allreduce", "host dispatch (us)",
               "host combine (us)", "host step (us)", "wire bytes (all tokens)"]
CHUNK_COLUMNS = ["sizes", "strategy", "experts only (us)", "chunks=1 (us)", "chunks=2 (us)", "best / experts only",
                 "auto / chunks=1"]
COLLECTIVE_COLUMNS = ["op", "payload", "pattern", "sizes", "impl", "bytes (all ranks)", "eager (us)", "vs best",
                      "vs bf16 wire", "graphed (us)", "vs best", "vs bf16 wire", "host (us)"]


def test_bench_moe_fits_a_100_column_terminal_and_shows_progress():
    run = _moecomm(["bench", "moe", "--world-size", "2", "--decode", "1", "--prefill", "4", "--iters", "1",
                    "--chunks", "2"], columns=100)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_readable(run.stdout, 100, [MOE_COLUMNS, CHUNK_COLUMNS], [4, 2])
    # progress on stderr: one step per (case, strategy), all done at the end; 5 cases (decode [0, 2] is skewed
    # and idle at once) x 5 variants of bf16 experts
    assert re.search(r"MoE layer step, world size 2 .* 25/25 ", run.stderr), run.stderr[-3000:]


def test_bench_collectives_in_a_file_is_120_wide_and_quiet_with_no_progress():
    run = _moecomm(["bench", "collectives", "--world-size", "1", "--rows", "1", "--iters", "1", "--no-progress"])
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_readable(run.stdout, 120, [COLLECTIVE_COLUMNS], [5])
    assert max(len(line) for line in run.stdout.splitlines()) > 100  # it uses the width it has
    assert run.stderr == "", run.stderr[-3000:]


def test_bench_collectives_shows_progress():
    run = _moecomm(["bench", "collectives", "--world-size", "1", "--rows", "1,2", "--iters", "1"], columns=100)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_readable(run.stdout, 100, [COLLECTIVE_COLUMNS], [5])
    # (3 payloads of all_gatherv + reduce_scatterv) x 2 row counts, one pattern at world size 1
    assert re.search(r"collectives, world size 1 .* 8/8 ", run.stderr), run.stderr[-3000:]


DEMO_JSON = "docs/results/2026-12-03-cpu/demo.json"  # moecomm demo --json, as docs/demo.md shows it
DEMO_COLUMNS = ["strategy", "combine", "split", "sentences/rank", "wire B/token", "wire KB/layer", "seconds", "cos min",
                "cos mean", "hidden max|Δ|", "NN top-1 same", "NN top-5 overlap"]


@pytest.mark.parametrize("columns", [100, 80, 200])
def test_demo_table_fits_the_terminal(capsys, monkeypatch, columns):
    from moecomm.demo import print_results
    from moecomm.demo.run import StrategyResult

    monkeypatch.setenv("COLUMNS", str(columns))
    data = json.loads((ROOT / DEMO_JSON).read_text())
    print_results([StrategyResult.from_json(r) for r in data["strategies"]], data["config"])
    out = capsys.readouterr().out
    _assert_readable(out, columns, [DEMO_COLUMNS], [3])
    assert (len(_headers(out)) == 1) == (columns == 200)  # one block where it fits


def test_print_table_without_rows_and_in_a_narrow_console(capsys, monkeypatch):
    from moecomm._output import print_table

    monkeypatch.setenv("COLUMNS", "40")
    print_table("none", ["op", "time (us)"], [], caption="nothing measured")
    print_table("wide", ["key", *(f"column number {i}" for i in range(6))], [["x", *range(6)]], keys=1)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 40
    assert "nothing measured" in out and len(_headers(out)) >= 3  # the wide one in blocks of whole columns
    for block in _headers(out)[1:]:
        assert block[0] == "key" and all(h.startswith("column number ") for h in block[1:]), block
