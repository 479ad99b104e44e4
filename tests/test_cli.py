"""The ``moecomm`` command line: bad arguments end in one line and exit status 2 before any work (no rank is
spawned here), the shared options read the same everywhere, and the demo and bench output says what it shows."""

import argparse
import importlib
import json
import struct

import pytest
import torch

from moecomm import _args
from moecomm.cli import main

CUDA = torch.cuda.is_available()


def _usage_error(capsys, argv) -> str:
    """Run ``moecomm argv``; assert exit status 2 and one error line after argparse's usage; return that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("usage: moecomm ")
    last = err.strip().splitlines()[-1]
    command = " ".join(["moecomm", *argv[: 2 if argv[0] == "bench" else 1]])
    assert last.startswith(f"{command}: error: ")
    return last


BAD = [
    (["demo", "--world-size", "0"], "argument --world-size: must be at least 1, got 0"),
    (["demo", "--world-size", "1", "--splits", "idle"], "--splits idle needs --world-size >= 2"),
    (["demo", "--world-size", "-3"], "argument --world-size: must be at least 1, got -3"),
    (["demo", "--world-size", "two"], "argument --world-size: expected an integer, got 'two'"),
    (["demo", "--strategies", "bogus"], "argument --strategies: unknown 'bogus'; choose from allreduce, agrs, "
                                        "agrs-nvfp4, agrs-fp8, auto"),
    (["demo", "--strategies", ","], "argument --strategies: expected at least one of"),
    (["demo", "--splits", "uneven,even"], "argument --splits: unknown 'even'; choose from uneven, idle"),
    (["demo", "--sentences", "0"], "argument --sentences: must be at least 1, got 0"),
    (["demo", "--sentences", "400"], "--sentences must be in [1, 332], got 400"),
    (["demo", "--experts", "0"], "argument --experts: must be at least 1, got 0"),  # used to run with 8
    (["demo", "--experts", "3"], "--experts 3 must be a positive multiple of the world size 4"),
    (["demo", "--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
    (["demo", "--top-k", "9"], "--top-k must be in [1, 8] (the number of experts), got 9"),
    (["demo", "--world-size", "2", "--experts", "4", "--top-k", "5"], "--top-k must be in [1, 4]"),
    (["demo", "--device", "tpu"], "argument --device: choose from auto, cpu, cuda, got 'tpu'"),
    (["demo", "--json", "/no/such/dir/x.json"], "argument --json: directory /no/such/dir does not exist"),
    (["bench", "collectives", "--rows", "-1"], "argument --rows: every value must be at least 1, got -1"),
    (["bench", "collectives", "--rows", "16,x"], "argument --rows: expected comma-separated integers, got '16,x'"),
    (["bench", "collectives", "--rows", ","], "argument --rows: expected at least one integer"),
    (["bench", "collectives", "--iters", "0"], "argument --iters: must be at least 1, got 0"),
    (["bench", "collectives", "--world-size", "-3"], "argument --world-size: must be at least 1, got -3"),
    (["bench", "collectives", "--world-size", "0"], "argument --world-size: must be at least 1, got 0"),  # was 4
    (["bench", "collectives", "--json", "/no/such/dir/c.json"], "argument --json: directory /no/such/dir"),
    (["bench", "collectives", "--write-table", "/no/such/dir/t.json"], "argument --write-table: directory"),
    (["bench", "moe", "--world-size", "0"], "argument --world-size: must be at least 1, got 0"),
    (["bench", "moe", "--iters", "0"], "argument --iters: must be at least 1, got 0"),
    (["bench", "moe", "--prefill", "0"], "argument --prefill: every value must be at least 1, got 0"),
    (["bench", "moe", "--decode", "1,-16"], "argument --decode: every value must be at least 1, got -16"),
    (["bench", "moe", "--chunks", "2,-1"], "argument --chunks: every value must be at least 0, got -1"),
    (["bench", "moe", "--sm-carveout", "-8"], "argument --sm-carveout: must be at least 0, got -8"),
    (["bench", "moe", "--experts", "int4"], "argument --experts: invalid choice: 'int4'"),
    (["bench", "moe", "--plot", "/no/such/dir/m.png"], "argument --plot: directory /no/such/dir does not exist"),
    (["bench", "moe", "--write-crossover", "/no/such/dir/c.json"], "argument --write-crossover: directory"),
    (["bench", "moe", "--shared-experts", "-1"], "argument --shared-experts: must be at least 0, got -1"),
    (["bench", "moe", "--world-size", "2", "--shared-experts", "1", "--chunks", "2"],
     "--shared-experts has its own table: measure --graphs, --chunks, --plot and --write-crossover in another run"),
    (["bench", "quant", "--iters", "0"], "argument --iters: must be at least 1, got 0"),
    (["bench", "quant", "--warmup", "-1"], "argument --warmup: must be at least 0, got -1"),
    (["bench", "quant", "--hidden", "0"], "argument --hidden: must be at least 1, got 0"),
    (["bench", "quant", "--hidden", "100"], "--hidden 100 must be a multiple of 128"),
    (["bench", "quant", "--tokens", "0"], "argument --tokens: every value must be at least 1, got 0"),
    (["bench", "quant", "--rows", "0"], "argument --rows: must be at least 1, got 0"),
    (["bench", "quant", "--formats", "nvfp4,int4"], "argument --formats: unknown 'int4'; choose from nvfp4"),
    (["bench", "quant", "--ops", "dequantize-sum", "--dtype", "fp16"], "--ops dequantize-sum writes bf16 or fp32"),
    (["bench", "quant", "--pieces", "0"], "argument --pieces: every value must be at least 1, got 0"),
    (["demo", "--combine-format", "int4"], "argument --combine-format: unknown 'int4'; choose from bf16, int8, fp8"),
    (["demo", "--strategies", "allreduce", "--combine-format", "int8,fp8"],  # it ran nothing and printed nothing
     "--strategies allreduce combines in bf16 only: with --combine-format int8,fp8 nothing is left to run"),
    (["bench", "collectives", "--wire-formats", "int4"], "argument --wire-formats: unknown 'int4'"),
    (["bench", "moe", "--combine-formats", "bf16,int4"], "argument --combine-formats: unknown 'int4'"),
    (["bench", "accuracy", "--world-sizes", "1"], "argument --world-sizes: every value must be at least 2, got 1"),
    (["bench", "accuracy", "--hidden", "200"], "--hidden 200 must be a multiple of 128"),
    (["bench", "accuracy", "--experts", "12"], "--experts 12 must be a multiple of 8 groups and of every world size"),
    (["bench", "accuracy", "--experts", "8"], "--experts 8: 4 groups of 1 experts hold fewer than top-8"),
    (["bench", "accuracy", "--formats", "int4"], "argument --formats: unknown 'int4'; choose from bf16, int8, fp8"),
    (["bench", "experts", "--iters", "0"], "argument --iters: must be at least 1, got 0"),
    (["bench", "experts", "--tokens", "16,0"], "argument --tokens: every value must be at least 1, got 0"),
    (["bench", "experts", "--formats", "fp4"], "argument --formats: unknown 'fp4'; choose from bf16, nvfp4, fp8"),
    (["bench", "experts", "--device", "gpu"], "argument --device: choose from auto, cpu, cuda, got 'gpu'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_end_in_one_line_and_exit_2(capsys, argv, message):
    assert message in _usage_error(capsys, argv)


@pytest.mark.skipif(CUDA, reason="checks a machine without CUDA")
def test_graphs_without_cuda(capsys):
    line = _usage_error(capsys, ["bench", "moe", "--world-size", "2", "--graphs"])
    assert line.endswith("--graphs replays CUDA graphs: it needs one GPU per rank (2 ranks, 0 GPUs)")


@pytest.mark.skipif(CUDA, reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", [["demo"], ["bench", "quant"], ["bench", "experts"]])
def test_device_cuda_without_cuda(capsys, command):
    line = _usage_error(capsys, [*command, "--device", "cuda"])
    assert line.endswith("argument --device: cuda, but no CUDA device is visible; use --device cpu")


@pytest.fixture
def two_cores_4gib(monkeypatch):
    """This machine as the checks see it: 2 CPU cores, 4 GiB available, no GPU."""
    monkeypatch.setattr(_args, "_cpu_cores", lambda: 2)
    monkeypatch.setattr(_args, "_available_memory", lambda: 4 << 30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("command", [["demo"], ["bench", "collectives"], ["bench", "moe"]])
def test_world_size_above_the_machine_is_refused_before_any_rank_starts(capsys, two_cores_4gib, command):
    line = _usage_error(capsys, [*command, "--world-size", "1000"])
    assert line.endswith("--world-size 1000: more CPU ranks than this machine's 2 cores (at most 4); "
                         "pass --force to run anyway")


def test_check_world_size(two_cores_4gib):
    gib = 1 << 30
    _args.check_world_size(4, gpu=False, bytes_per_rank=gib, force=False)  # the default 4 ranks fit 2 cores
    with pytest.raises(_args.UsageError, match="more CPU ranks than this machine's 2 cores"):
        _args.check_world_size(5, gpu=False, bytes_per_rank=gib, force=False)
    with pytest.raises(_args.UsageError, match=r"3 ranks need about 4\.5 GiB of memory \(1\.50 GiB each\), "
                                               r"4\.0 GiB available; pass --force"):
        _args.check_world_size(3, gpu=False, bytes_per_rank=3 * gib // 2, force=False)
    with pytest.raises(_args.UsageError, match="NCCL needs one GPU per rank, 0 visible"):
        _args.check_world_size(1, gpu=True, bytes_per_rank=gib, force=False)
    for world, gpu in [(1000, False), (3, False), (1, True)]:  # --force: the user knows better
        _args.check_world_size(world, gpu=gpu, bytes_per_rank=3 * gib // 2, force=True)


def test_output_paths(tmp_path):
    assert _args.output_path(str(tmp_path / "x.json")) == str(tmp_path / "x.json")
    for bad, message in [(str(tmp_path), "is a directory"), (str(tmp_path / "no" / "x.json"), "does not exist"),
                         ("", "empty path")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            _args.output_path(bad)
    merge = _args.merge_path("sources", "tables")
    table = tmp_path / "table.json"
    assert merge(str(table)) == str(table)  # a new table
    table.write_text(json.dumps({"sources": {}, "tables": {}}))
    assert merge(str(table)) == str(table)  # an existing one
    table.write_text(json.dumps({"sources": {}}))
    with pytest.raises(argparse.ArgumentTypeError, match="not a table with keys sources, tables"):
        merge(str(table))
    table.write_text("{not json")
    with pytest.raises(argparse.ArgumentTypeError, match="exists but is not readable JSON"):
        merge(str(table))


def test_int_list_and_choice_list():
    assert _args.int_list()("1, 16,128") == [1, 16, 128]
    assert _args.int_list(minimum=0)("2,4,0") == [2, 4, 0]  # bench moe --chunks: 0 = the automatic choice
    assert _args.choice_list(["a", "b"])(" b,a ") == ["b", "a"]


def _parser(module: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    return parser


MODULES = ["moecomm.demo", "moecomm.bench.collectives", "moecomm.bench.quant", "moecomm.bench.experts",
           "moecomm.bench.moe", "moecomm.bench.accuracy"]


def test_json_and_plot_options_read_the_same_everywhere():
    actions = {m: {a.dest: a for a in _parser(m)._actions} for m in MODULES}
    first = actions[MODULES[0]]["json"]
    for m in MODULES:
        json_action = actions[m]["json"]
        assert (json_action.help, json_action.metavar, json_action.type) == (first.help, "PATH", _args.output_path)
    assert actions["moecomm.bench.moe"]["plot"].type is _args.output_path


def test_demo_auto_strategy_resolves_and_is_shown(capsys):
    from moecomm.demo import StrategyResult, print_results, resolve_strategy

    # the demo's experts are bf16 and quantize nothing: "auto" runs agrs whatever the token count
    assert resolve_strategy("auto", [3, 5]) == "agrs" and resolve_strategy("auto", [4096] * 4) == "agrs"
    assert resolve_strategy("agrs-fp8", [3, 5]) == "agrs-fp8"
    result = StrategyResult("auto", "agrs", "uneven", [1, 1], [2, 3], 832 + 768, 0.5, 0.99, 0.995, 0.1, 1.0, 1.0)
    config = {"num_sentences": 2, "num_tokens": 5, "world_size": 2, "backend": "gloo", "num_experts": 8,
              "experts_per_rank": 4, "routing": "all experts at weight 1", "oracle_seconds": 1.0}
    print_results([result], config)
    assert "auto → agrs" in capsys.readouterr().out
    assert result.to_json()["resolved_strategy"] == "agrs"


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _moe_result(regime, pattern, sizes, strategy, seconds=1e-3):
    stages = dict.fromkeys(("quantize", "dispatch", "experts", "combine"), seconds / 4)
    return {"regime": regime, "pattern": pattern, "sizes": sizes, "strategy": strategy,
            "seconds": {**stages, "total": seconds}}


def test_moe_plot_is_a_grid_in_the_tables_order(tmp_path):
    """A row of panels per regime and token count, a column per pattern (world size 2), or three panels a row
    for one pattern (world size 1): the figure's size tells the grid (4.6 x 2.9 inches a panel, 110 dpi)."""
    from moecomm.bench.moe import _plot

    cases = [("prefill", "balanced", [8, 8]), ("prefill", "skewed", [5, 11]), ("prefill", "idle", [0, 16]),
             ("decode", "balanced", [1, 1]), ("decode", "skewed", [0, 2])]  # idle [0, 2] = skewed: not repeated
    results = [_moe_result(*c, s) for c in cases for s in ("allreduce", "agrs", "agrs-nvfp4/unpacked")]
    results.append(_moe_result("padding", "live 1, bucket 1", [1, 1], "agrs"))  # not in the main table
    _plot(results, tmp_path / "ws2.png", "world size 2")
    assert _png_size(tmp_path / "ws2.png") == (round(3 * 4.6 * 110), round((2 * 2.9 + 0.9) * 110))
    one_rank = [_moe_result(r, "balanced", [n], "agrs") for r, n in [("prefill", 256), ("decode", 1),
                                                                     ("decode", 16), ("decode", 64)]]
    _plot(one_rank, tmp_path / "ws1.png", "world size 1")
    assert _png_size(tmp_path / "ws1.png") == (round(3 * 4.6 * 110), round((2 * 2.9 + 0.9) * 110))


def test_bench_moe_shared_experts_on_cpu(tmp_path, capsys):
    """``--shared-experts``: every strategy timed four ways, the ratios computed from those times."""
    path = tmp_path / "shared.json"
    assert main(["bench", "moe", "--world-size", "2", "--shared-experts", "1", "--iters", "1", "--prefill", "8",
                 "--decode", "1", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert (data["shared_experts"], data["shared_intermediate"]) == (1, 128)
    assert {r["strategy"] for r in data["results"]} == {"allreduce", "agrs", "agrs-nvfp4", "agrs-nvfp4/unpacked",
                                                        "agrs-fp8"}
    base = {(r["regime"], str(r["sizes"])): r["seconds"]["sequential"] for r in data["results"]
            if r["strategy"] == "allreduce"}
    for r in data["results"]:
        s = r["seconds"]
        assert all(s[k] > 0 for k in ("routed", "shared", "sequential", "overlapped")), r
        assert s["host_sequential"] is None and s["host_overlapped"] is None  # host time: CUDA only
        assert r["overlapped_vs_sequential"] == pytest.approx(s["overlapped"] / s["sequential"])
        assert r["overlapped_vs_routed_plus_shared"] == pytest.approx(s["overlapped"] / (s["routed"] + s["shared"]))
        assert r["speedup_vs_allreduce_sequential"] == pytest.approx(base[r["regime"], str(r["sizes"])] / s["overlapped"])
    assert "MoE layer step with 1 shared expert(s) (intermediate 128), world size 2" in capsys.readouterr().out


def test_bench_moe_without_the_bf16_combine(tmp_path, capsys):
    """``--combine-formats int8`` runs no allreduce (it combines in bf16 only): the speedups over allreduce are
    n/a (null in the JSON), not a KeyError after the whole run; likewise the shared-experts table."""
    from moecomm.bench import shared_experts
    from moecomm.bench.moe import SMALL

    path = tmp_path / "int8.json"
    assert main(["bench", "moe", "--world-size", "2", "--combine-formats", "int8", "--iters", "1", "--prefill", "8",
                 "--decode", "1", "--chunks", "2", "--no-progress", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    assert results and all(r["combine_format"] == "int8" and r["strategy"].endswith("+ int8 combine") for r in results)
    assert all(r["speedup_vs_allreduce"] is None and r["seconds"]["total"] > 0 for r in results)
    seconds = dict.fromkeys(("routed", "shared", "sequential", "overlapped"), 2e-3)
    rows = [{"regime": "decode", "pattern": "balanced", "sizes": [1, 1], "strategy": "agrs + int8 combine",
             "seconds": {**seconds, "host_sequential": float("nan"), "host_overlapped": float("nan")}}]
    shared_experts.report(rows, world=2, device=torch.device("cpu"), experts="bf16", shape=SMALL, count=1,
                          json_path=None)
    assert rows[0]["speedup_vs_allreduce_sequential"] != rows[0]["speedup_vs_allreduce_sequential"]  # NaN: n/a
    assert "agrs + int8 combine" in capsys.readouterr().out
