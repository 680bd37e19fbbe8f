"""Progress for long silent steps (issue 14, a new user's first hour): exporting SmolLM2's target
graph takes ~115 s in one call, a 2,000-token prefill ~70 s on the CPU. A progress bar that does
not move for that long reads as a hang; `heartbeat` calls a tick (redraw the bar, print elapsed
seconds) every second from a daemon thread while the step runs."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def heartbeat(tick: Callable[[float], None] | None, every: float = 1.0,
              clear: Callable[[], None] | None = None) -> Iterator[None]:
    """Run the block; meanwhile call tick(elapsed seconds) every `every` s. tick None: no thread.
    `clear` runs once after the block if tick ran at least once (e.g. to erase a status line)."""
    if tick is None:
        yield
        return
    done = threading.Event()
    ticked = threading.Event()
    start = time.monotonic()

    def loop() -> None:
        while not done.wait(every):
            tick(time.monotonic() - start)
            ticked.set()

    thread = threading.Thread(target=loop, name="treespec-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if clear is not None and ticked.is_set():
            clear()
