"""Command-line argument types and checks shared by ``moecomm demo`` and ``moecomm bench ...`` (private).

Every argument is checked before any work starts. A bad one ends the command the way argparse ends it:
the usage, one line ``moecomm <command>: error: ...`` on stderr and exit status 2, never a traceback.
Types reject what they can alone (``--iters 0``, ``--rows -1``, an output path in a missing directory);
checks that depend on other arguments or on the machine raise :class:`UsageError` from the command's
``run``, which :func:`moecomm.cli.main` reports the same way.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Sequence

import torch

__all__ = [
    "UsageError",
    "positive_int",
    "nonnegative_int",
    "int_list",
    "choice_list",
    "device_choice",
    "output_path",
    "merge_path",
    "add_output_arguments",
    "add_progress_argument",
    "add_world_size_arguments",
    "check_world_size",
    "DEFAULT_CPU_RANKS",
    "RANK_MEMORY",
]

DEFAULT_CPU_RANKS = 4  # what the commands run on a machine without GPUs; always allowed (CI has 2 cores)
RANK_MEMORY = 1 << 30  # bytes, a rough estimate of one benchmark rank's memory (torch, buffers, inputs)


class UsageError(ValueError):
    """A bad command-line argument found after parsing (it depends on other arguments or on the machine).

    :func:`moecomm.cli.main` reports it as argparse reports a bad argument: one line, exit status 2.
    """


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def int_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """argparse type factory: ``"1,16,128"`` -> ``[1, 16, 128]``, at least one value, each >= ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one integer")
        bad = [v for v in values if v < minimum]
        if bad:
            raise argparse.ArgumentTypeError(f"every value must be at least {minimum}, got {bad[0]}")
        return values

    return parse


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type factory: ``"a,b"`` -> ``["a", "b"]``, at least one value, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {', '.join(choices)}")
        if not items:
            raise argparse.ArgumentTypeError(f"expected at least one of {', '.join(choices)}")
        return items

    return parse


def device_choice(text: str) -> str:
    """argparse type: ``auto``, ``cpu`` or ``cuda``; ``cuda`` only where a CUDA device is visible."""
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"choose from auto, cpu, cuda, got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda, but no CUDA device is visible; use --device cpu")
    return text


def output_path(text: str) -> str:
    """argparse type: a file path that can be written (its directory exists and is writable; not a directory)."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"directory {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    return text


def merge_path(*keys: str) -> Callable[[str], str]:
    """argparse type factory: an :func:`output_path` whose existing content, if any, is a JSON object with
    ``keys`` (the table the command merges its results into)."""

    def parse(text: str) -> str:
        output_path(text)
        if not os.path.exists(text):
            return text
        try:
            with open(text) as f:
                table = json.load(f)
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{text} exists but is not readable JSON ({e})") from None
        if not isinstance(table, dict) or any(k not in table for k in keys):
            raise argparse.ArgumentTypeError(f"{text} exists but is not a table with keys {', '.join(keys)}")
        return text

    return parse


def add_output_arguments(parser: argparse.ArgumentParser, *, plot: bool = False) -> None:
    """``--json PATH`` (and with ``plot``, ``--plot PATH``): the same options and help in every command."""
    parser.add_argument("--json", metavar="PATH", type=output_path, default=None,
                        help="also write the results as JSON to PATH (its directory is checked before the run)")
    if plot:
        parser.add_argument("--plot", metavar="PATH", type=output_path, default=None,
                            help="also write a PNG of the results to PATH (its directory is checked before the run)")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: the same option and help in every command that shows progress bars (on stderr)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")


def add_world_size_arguments(parser: argparse.ArgumentParser, *, default: int | None, default_help: str) -> None:
    """``--world-size N`` (``None``: the command picks) and ``--force`` (skip :func:`check_world_size`)."""
    parser.add_argument("--world-size", type=positive_int, default=default, metavar="N",
                        help=f"number of ranks (default {default_help})")
    parser.add_argument("--force", action="store_true",
                        help="run even with more ranks than this machine holds: more NCCL ranks than GPUs, more CPU "
                             f"ranks than the larger of {DEFAULT_CPU_RANKS} and the CPU cores, or more than the "
                             "memory fits")


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_world_size(world_size: int, *, gpu: bool, force: bool, bytes_per_rank: int = RANK_MEMORY) -> None:
    """Refuse a world size this machine cannot hold, before any rank starts.

    Parameters
    ----------
    world_size : int
        Ranks, each a process.
    gpu : bool
        NCCL ranks, one GPU each; else gloo ranks, at most one per CPU core (but
        :data:`DEFAULT_CPU_RANKS` are always allowed).
    force : bool
        Skip the checks (``--force``).
    bytes_per_rank : int
        A rough estimate of one rank's host memory; ``world_size`` of them must fit in the memory
        available now (where the system says: Linux).

    Raises
    ------
    UsageError
        Too many ranks for the GPUs, the CPU cores or the memory; the message names the limit and ``--force``.
    """
    if force:
        return
    hint = "; pass --force to run anyway"
    if gpu:
        gpus = torch.cuda.device_count()
        if world_size > gpus:
            raise UsageError(f"--world-size {world_size}: NCCL needs one GPU per rank, {gpus} visible{hint}")
    else:
        cores = _cpu_cores()
        if world_size > max(DEFAULT_CPU_RANKS, cores):
            raise UsageError(f"--world-size {world_size}: more CPU ranks than this machine's {cores} cores "
                             f"(at most {max(DEFAULT_CPU_RANKS, cores)}){hint}")
    available = _available_memory()
    if available is not None and world_size * bytes_per_rank > available:
        raise UsageError(f"--world-size {world_size}: {world_size} ranks need about "
                         f"{world_size * bytes_per_rank / 2**30:.1f} GiB of memory "
                         f"({bytes_per_rank / 2**30:.2f} GiB each), {available / 2**30:.1f} GiB available{hint}")
