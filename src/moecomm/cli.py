"""The ``moecomm`` command: ``moecomm demo`` and ``moecomm bench {collectives,quant,experts,moe,counted,accuracy}``.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their subcommand runs, so ``moecomm --help`` stays fast. A bad argument
ends the command with one line and exit status 2 (:mod:`moecomm._args`), before any work starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moecomm import __version__
from moecomm._args import UsageError

_COMMANDS = {
    "demo": ("moecomm.demo", "run a real transformer with DP attention and EP MoE on N ranks"),
}
_BENCHES = {
    "collectives": ("moecomm.bench.collectives", "allgatherv / reducescatterv vs native collectives"),
    "quant": ("moecomm.bench.quant", "NVFP4 / MXFP4 / FP8 quantizers vs copy bandwidth"),
    "experts": ("moecomm.bench.experts", "expert compute vs a bare grouped GEMM"),
    "moe": ("moecomm.bench.moe", "a whole MoE layer step per dispatch strategy"),
    "counted": ("moecomm.bench.counted", "device token counts: one CUDA graph per rank vs bucket graphs"),
    "accuracy": ("moecomm.bench.accuracy", "the combine formats' error on a DeepSeek-V3 MoE layer (CPU ranks)"),
}


def _add(subparsers, name: str, module: str, help: str) -> None:
    p = subparsers.add_parser(name, help=help, description=help)
    mod = importlib.import_module(module)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run, _parser=p)


def main(argv: list[str] | None = None) -> int:
    """Run the ``moecomm`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``moecomm`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status, 0.

    Raises
    ------
    SystemExit
        With status 2 and one error line on stderr for a bad argument (argparse's convention), 0 for
        ``--help`` / ``--version``.
    """
    parser = argparse.ArgumentParser(
        prog="moecomm", description="MoE communication for DP attention + EP experts: the demo and the benchmarks.")
    parser.add_argument("--version", action="version", version=f"moecomm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    words = sys.argv[1:] if argv is None else argv
    for name, (module, help) in _COMMANDS.items():
        if words[:1] == [name]:
            _add(sub, name, module, help)
        else:
            sub.add_parser(name, help=help)
    bench = sub.add_parser("bench", help="benchmarks: print a table, --json writes the numbers")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help) in _BENCHES.items():
        if words[:2] == ["bench", name]:
            _add(bench_sub, name, module, help)
        else:
            bench_sub.add_parser(name, help=help)
    args = parser.parse_args(words)
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        args._parser.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
