"""Progress bars of the long-running commands (private, for ``moecomm demo`` and ``moecomm bench``).

Rich progress bars on stderr (stdout keeps the tables), fed by this process and by rank 0 of the ranks it
launches: :class:`Progress` owns a ``spawn`` queue that travels to the ranks with their arguments, and a
thread that applies what rank 0 sends with :func:`report`. ``--no-progress`` (``enabled=False``) shows
nothing and sends nothing. Under ``torchrun`` every process shows the bars of its own rank 0 calls, i.e.
only rank 0's process shows any.
"""

from __future__ import annotations

import queue as queue_mod
import threading
from typing import Any, Hashable

__all__ = ["Progress", "report"]


class Progress:
    """Bars keyed by any hashable: :meth:`add` one, :meth:`update` it; a context manager.

    ``queue`` is None when disabled; pass it to the ranks, whose rank 0 calls :func:`report`.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.queue = None
        self._tasks: dict[Hashable, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            import torch.multiprocessing as mp
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            from moecomm._output import console

            self.queue = mp.get_context("spawn").Queue()
            self._bars = Bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console(stderr=True))

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._bars.__enter__()
            self._thread = threading.Thread(target=self._listen, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._bars.__exit__(*exc)
            self.queue.close()
            self.queue.join_thread()

    def add(self, key: Hashable, description: str, total: int) -> None:
        """A new bar of ``total`` steps."""
        if self.enabled:
            self._tasks[key] = self._bars.add_task(description, total=total, info="")

    def update(self, key: Hashable, *, advance: int = 0, completed: int | None = None, info: str | None = None) -> None:
        """Move bar ``key`` on by ``advance`` steps or to ``completed``; ``info``: the text beside it."""
        if self.enabled and key in self._tasks:
            fields = {} if info is None else {"info": info}
            self._bars.update(self._tasks[key], advance=advance or None, completed=completed, **fields)

    def _listen(self) -> None:
        while True:
            try:
                method, args, kwargs = self.queue.get(timeout=0.1)
            except queue_mod.Empty:
                if self._stop.is_set():
                    return
                continue
            getattr(self, method)(*args, **kwargs)


def report(queue, method: str, *args, **kwargs) -> None:
    """On a launched rank: ``Progress.<method>(*args, **kwargs)`` in the parent, sent by rank 0 only (``queue``:
    :attr:`Progress.queue`, None when progress is off)."""
    import torch.distributed as dist

    if queue is not None and dist.get_rank() == 0:
        queue.put((method, args, kwargs))
