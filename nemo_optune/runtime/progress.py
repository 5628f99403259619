"""Per-phase progress bars with an ETA (tqdm), on the logging rank only and only when stdout
is a terminal (trainer.progress_bar): logs written to files or pipes stay clean. A bar is
cleared when its phase ends; the one metrics line per iteration stays as it is.

    with progress("training", total=steps, enabled=True) as bar:
        ...
        bar.update(1)
"""

import contextlib
import sys


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


NO_BAR = _NoBar()


def terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextlib.contextmanager
def progress(name: str, total: int, enabled: bool, unit: str = "it", stream=None):
    """A bar named `name` counting to `total` (an object with update(n)); a no-op unless
    `enabled` and `stream` (default stdout) is a terminal."""
    stream = stream if stream is not None else sys.stdout
    if not enabled or total <= 0 or not terminal(stream):
        yield NO_BAR
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=name, unit=unit, leave=False, file=stream, dynamic_ncols=True, mininterval=0.25)
    try:
        yield bar
    finally:
        bar.close()


class PhaseProgress:
    """The trainer's bars. `rows(total)` is what a generation engine takes as its `progress`
    argument: a bar named after the current phase ("generation" unless `phase` says otherwise).
    One bar at a time: one opened inside another (HyPO's samples inside a training step) is a no-op."""

    def __init__(self, enabled: bool, stream=None):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled and terminal(self.stream)
        self.label = "generation"
        self._open = False

    @contextlib.contextmanager
    def bar(self, name: str, total: int, unit: str = "it"):
        if self._open or not self.enabled:
            yield NO_BAR
            return
        self._open = True
        try:
            with progress(name, total, True, unit, self.stream) as bar:
                yield bar
        finally:
            self._open = False

    def iterate(self, name: str, items, unit: str = "it"):
        """`items`, one at a time, the bar advancing as each one is done (when the next is asked for)."""
        with self.bar(name, len(items), unit) as bar:
            for item in items:
                yield item
                bar.update(1)

    def rows(self, total: int):
        return self.bar(self.label, total, unit="rows")

    @contextlib.contextmanager
    def phase(self, name: str):
        """Bars opened by `rows` inside this block are named `name`."""
        previous, self.label = self.label, name
        try:
            yield
        finally:
            self.label = previous
