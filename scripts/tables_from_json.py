"""Markdown tables from the JSON that ``moecomm demo --json`` and ``moecomm bench experts | quant | accuracy --json``
write.

    python scripts/tables_from_json.py docs/results/2026-11-29-h200/experts.json
    python scripts/tables_from_json.py docs/results/2026-12-03-cpu/demo.json

A table in docs/ that cites a result file is pasted from this output, never retyped, so that the two agree
(tests/test_docs.py checks it). Files written before the JSON keys were renamed (``format`` -> ``token_format``,
``ratio`` -> ``ratio_vs_bare``, ...) are read as well: docs/results/ keeps them as they were written.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

# bench experts' keys before 2026-11-30 -> now (the table of bench quant reads keys that stayed)
_RENAMED = {"format": "token_format", "weights": "weight_format", "ratio": "ratio_vs_bare",
            "graphed_ratio": "graphed_ratio_vs_bare"}


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def experts_table(records: list[dict[str, Any]]) -> str:
    """The table of ``bench experts`` (as in docs/experts.md): times in ms, ratios to the bare grouped GEMMs."""
    columns = ["tokens", "weights", "T", "M", "ms", "TFLOP/s", "bare ms", "ratio", "graphed ms", "graphed bare ms",
               "graphed ratio"]
    rows = [[r["token_format"], r["weight_format"], str(r["tokens"]), str(r["local_rows"]), _ms(r["seconds"]),
             f"{r['tflops']:.0f}", _ms(r["bare_seconds"]), _ratio(r["ratio_vs_bare"]), _ms(r["graphed_seconds"]),
             _ms(r["graphed_bare_seconds"]), _ratio(r["graphed_ratio_vs_bare"])] for r in records]
    return _markdown(columns, rows)


def quant_table(records: list[dict[str, Any]]) -> str:
    """The timing table of ``bench quant``, a row per operation and format and a column per M: time per call and
    the bandwidth (bytes read + written per second) as a fraction of a device-to-device copy's."""
    tokens = sorted({r["tokens"] for r in records})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in records:
        op = r.get("op", "quantize")
        op = f"{op} x{r['pieces']}" if op == "dequantize-sum" else op
        cells.setdefault((op, r["format"]), {})[r["tokens"]] = f"{r['time_us']:.1f} us / {r['fraction_of_copy']:.2f}"
    rows = [[op, fmt, *(by_m.get(m, "n/a") for m in tokens)] for (op, fmt), by_m in cells.items()]
    return _markdown(["op", "format", *(f"M={m}" for m in tokens)], rows)


_ACTIVATIONS = {"gaussian": 0, "outliers": 1, "massive": 2}  # bench accuracy's activation sets, mildest first


def accuracy_table(records: list[dict[str, Any]]) -> str:
    """The table of ``bench accuracy``: per activation set and world size, each combine format's bytes and errors."""
    columns = ["activations", "world size", "combine", "B/token", "rel L2 vs fp64 layer", "x bf16 combine",
               "rel L2 vs exact combine", "other channels"]
    rows = [[r["activations"], str(r["world_size"]), r["combine_format"], str(r["combine_bytes_per_token"]),
             f"{r['rel_l2_vs_fp64_layer']:.5f}", _ratio(r.get("vs_bf16_combine")),
             f"{r['rel_l2_vs_exact_combine']:.5f}", f"{r['rel_l2_other_channels']:.5f}"]
            for r in sorted(records, key=lambda r: (_ACTIVATIONS.get(r["activations"], 9), r["activations"],
                                                    r["world_size"]))]
    return _markdown(columns, rows)


def demo_table(data: dict[str, Any]) -> str:
    """The table ``moecomm demo`` prints, from its ``--json`` file: the same rows (``result_table``), in markdown."""
    from moecomm.demo.run import StrategyResult, result_table

    _, columns, rows, _ = result_table([StrategyResult.from_json(r) for r in data["strategies"]], data["config"])
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731 - a cell's "|" would end it
    return _markdown([escape(c) for c in columns], [[escape(c) for c in row] for row in rows])


def table(data: dict[str, Any]) -> str:
    """The markdown table of one result file (the parsed JSON), by the command named in its command line.

    Raises
    ------
    ValueError
        The file is not from ``moecomm demo``, ``bench experts``, the timing run of ``bench quant`` or
        ``bench accuracy``.
    """
    command = data.get("meta", {}).get("command", "")
    if re.search(r"\bdemo\b", command) and "strategies" in data:
        return demo_table(data)
    match = re.search(r"\bbench (\w+)", command)
    bench = match.group(1) if match else None
    key = {"experts": "results", "quant": "timing", "accuracy": "results"}.get(bench)
    if key not in data:
        raise ValueError(f"not a result file of 'demo', 'bench experts', 'bench quant' (timing) or 'bench accuracy': "
                         f"command {command!r}")
    if bench == "quant":
        return quant_table(data[key])
    if bench == "accuracy":
        return accuracy_table(data[key])
    return experts_table([{_RENAMED.get(k, k): v for k, v in r.items()} for r in data[key]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a JSON file written by moecomm demo / bench experts / quant / accuracy --json")
    args = parser.parse_args()
    try:
        with open(args.path) as f:
            data = json.load(f)
        print(table(data))
    except (OSError, ValueError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
