"""Markdown tables for docs/benchmarks.md, made from the benchmarks' JSON (never retyped; tests/test_docs.py
checks that the doc holds them unchanged).

    python scripts/bench_tables.py moe FILE.json          # step, graphed skew table, padding tax, chunks
    python scripts/bench_tables.py shared FILE.json       # bench moe --shared-experts: overlapped vs sequential
    python scripts/bench_tables.py collectives FILE.json  # auto vs the fastest, eager and graphed, host time
    python scripts/bench_tables.py counted FILE.json      # bench counted: one graph per rank, host time, wire bytes
"""
import json
import sys


def _us(v):
    return "n/a" if v is None else f"{v * 1e6:.0f}"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def moe(path) -> str:
    """The tables of a ``bench moe --json`` file (blank lines between them): the step, the graphed step, the
    padding tax, the chunked step."""
    results = json.load(open(path))["results"]
    base = {(r["regime"], str(r["sizes"])): r["seconds"] for r in results if r["strategy"] == "allreduce"}
    step, graphed, pad, chunks = [], [], [], []
    for r in results:
        s, b = r["seconds"], base[(r["regime"], str(r["sizes"]))]
        if r["regime"] != "padding":
            step.append([r["regime"], r["pattern"], r["sizes"], r["strategy"], _us(s["experts"]), _us(s["total"]),
                         f"{s['total'] / s['experts']:.3f}", f"{b['total'] / s['total']:.3f}", _us(s.get("host_dispatch")),
                         _us(s.get("host_combine")), _us(s.get("host_total"))])
        if s.get("graphed") is not None:
            row = [r["pattern"], r["sizes"], r["bucket"], r["strategy"], _us(s["graphed"])]
            (pad if r["regime"] == "padding" else graphed).append(row)
        timed = {k: v for k, v in s.items() if k.startswith("chunks_") and v is not None}
        if timed:
            chunks.append([r["sizes"], r["strategy"], _us(s["experts"]), _us(s["total"])] +
                          [f"{_us(v)} ({v / s['total']:.2f}x)" for _, v in sorted(timed.items())])
    tables = [_table(["regime", "pattern", "sizes", "strategy", "experts only (us)", "step (us)", "step / experts",
                      "vs allreduce", "host dispatch (us)", "host combine (us)", "host step (us)"], step),
              _table(["pattern", "sizes", "bucket", "strategy", "graphed step (us)"], graphed),
              _table(["live tokens", "sizes", "bucket", "strategy", "graphed step (us)"], pad)]
    if chunks:
        keys = sorted({k for r in results for k, v in r["seconds"].items() if k.startswith("chunks_") and v is not None})
        labels = ["chunks=auto" if k == "chunks_0" else k.replace("_", "=") for k in keys]
        tables.append(_table(["sizes", "strategy", "experts only (us)", "chunks=1 (us)"] + labels, chunks))
    return "\n\n".join(tables)


def shared(path) -> str:
    """The table of a ``bench moe --shared-experts --json`` file: overlapped against sequential."""
    rows = []
    for r in json.load(open(path))["results"]:
        s = r["seconds"]
        rows.append([r["regime"], r["pattern"], r["sizes"], r["strategy"]]
                    + [_us(s[k]) for k in ("routed", "shared", "sequential", "overlapped")]
                    + [f"{r[k]:.3f}" for k in ("overlapped_vs_sequential", "overlapped_vs_routed_plus_shared",
                                               "speedup_vs_allreduce_sequential")]
                    + [_us(s["host_sequential"]), _us(s["host_overlapped"])])
    return _table(["regime", "pattern", "sizes", "strategy", "routed only (us)", "shared only (us)", "sequential (us)",
                   "overlapped (us)", "overlapped / sequential", "overlapped / (routed + shared)",
                   "vs allreduce sequential", "host sequential (us)", "host overlapped (us)"], rows)


def counted(path) -> str:
    """The table of a ``bench counted --json`` file: correctness, host time per call and per replay, step time."""
    rows = []
    for r in json.load(open(path))["results"]:
        s = r["seconds"]
        rows.append([r["pattern"], r["sizes"], r["strategy"], r["transport"], "yes" if r["replay_equals_eager"] else "NO",
                     {True: "yes", False: "NO", None: "n/a"}[r["equals_host_list"]], f"{s['host_call'] * 1e6:.1f}",
                     f"{s['host_replay'] * 1e6:.1f}", _us(s["step"]), _us(s["bucket_step"]), r["wire_bytes"],
                     r["bucket_wire_bytes"]])
    return _table(["pattern", "sizes", "strategy", "transport", "replay == eager", "== host list", "host call (us)",
                   "host replay (us)", "one-graph step (us)", "bucket step (us)", "wire bytes", "bucket wire bytes"],
                  rows)


FLOOR = "nccl binding alone"  # a host-time floor, not an alternative: excluded from the fastest


def collectives(path) -> str:
    """The table of a ``bench collectives --json`` file: ``auto`` against the fastest per case."""
    results = json.load(open(path))["results"]
    cases = {}
    for r in results:
        cases.setdefault((r["op"], r["payload"], r["pattern"], r["rows_per_rank"]), []).append(r)
    rows = []
    for (op, payload, pattern, _), group in cases.items():
        auto = next(r for r in group if r["impl"] == "auto")
        row = [op, payload, pattern, auto["sizes"]]
        for mode in ("eager_s", "graphed_s"):
            timed = [r for r in group if r["impl"] != FLOOR and r[mode] is not None]
            best = min(timed, key=lambda r: r[mode])
            row += [f"{auto[mode] * 1e6:.1f}", f"{auto[mode] / best[mode]:.3f} ({best['impl']})"]
        floor = next((r for r in group if r["impl"] == FLOOR), None)
        row += [f"{auto['host_s'] * 1e6:.1f}", "" if floor is None else f"{floor['host_s'] * 1e6:.1f}"]
        rows.append(row)
    return _table(["op", "payload", "pattern", "sizes", "auto eager (us)", "/ fastest (which)", "auto graphed (us)",
                   "/ fastest (which)", "auto host (us)", "NCCL alone host (us)"], rows)


if __name__ == "__main__":
    print({"moe": moe, "shared": shared, "collectives": collectives, "counted": counted}[sys.argv[1]](sys.argv[2]))
