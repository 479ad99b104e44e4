"""The demo's progress display: the oracle's pass, then one bar per (split, run) that rank 0 advances per layer."""

from __future__ import annotations

import queue as queue_mod
import threading
from typing import Any

__all__ = ["Display", "run_label"]


def run_label(strategy: str, combine_format: str) -> str:
    """A run's name in the progress bars: the strategy, and the combine format where it is not bf16."""
    return strategy if combine_format == "bf16" else f"{strategy} + {combine_format} combine"


class Display:
    """Rich progress: the oracle/calibration pass, then one bar per (split, strategy) advanced per layer by rank 0."""

    def __init__(self, enabled: bool, *, layers: int, oracle_steps: int):
        self.enabled = enabled
        self.layers = layers
        self._thread: threading.Thread | None = None
        self._queue = None
        self._stop = threading.Event()
        self.tasks: dict[tuple[str, str], Any] = {}
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description:<32}"), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn())
            self.oracle_task = self.progress.add_task("oracle fp32 + calibration", total=oracle_steps, info="")

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def oracle_step(self) -> None:
        if self.enabled:
            self.progress.advance(self.oracle_task)

    def listen(self, q) -> None:
        if not self.enabled or q is None:
            return
        self._queue = q
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop_listening(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                event = self._queue.get(timeout=0.1)
            except queue_mod.Empty:
                if self._stop.is_set():
                    return
                continue
            kind, split, strategy, *rest = event
            key = (split, strategy)
            if kind == "start":
                self.tasks[key] = self.progress.add_task(f"{strategy} ({split} split)", total=self.layers, info="")
            elif kind == "layer" and key in self.tasks:
                self.progress.update(self.tasks[key], completed=rest[0] + 1, info=f"layer {rest[0] + 1}/{self.layers}")
            elif kind == "done" and key in self.tasks:
                self.progress.update(self.tasks[key], completed=self.layers, info=f"{rest[0]:.2f} s")
