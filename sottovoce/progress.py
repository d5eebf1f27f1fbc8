"""Progress of a long local phase (scoring the base model on every set) for a person watching.

On a terminal it is a live line (a spinner, a count, the elapsed time); in a log file or CI,
where a live line would print nothing useful, it is a plain line every ``every_s`` seconds
and one at the end, so a non-TTY log is never silent for minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextmanager
def counted_phase(
    console: Console, label: str, unit: str, *, every_s: float = 10.0
) -> Iterator[Callable[[], None]]:
    """Show ``label`` and how many ``unit`` are done; yields the callable that counts one."""
    plain = not console.is_terminal
    started = time.monotonic()
    done, last_line = [0], [started]
    progress = Progress(
        SpinnerColumn(),
        TextColumn(f"{label}: {{task.completed:.0f}} {unit}"),
        TimeElapsedColumn(),
        console=console,
        disable=plain,
        transient=False,
    )
    task = progress.add_task(label, total=None)

    closed = [False]

    def advance() -> None:
        if closed[0]:  # called after the phase ended (a hook left attached): not this phase
            return
        done[0] += 1
        progress.update(task, completed=done[0])
        now = time.monotonic()
        if plain and now - last_line[0] >= every_s:
            last_line[0] = now
            console.print(f"{label}: {done[0]} {unit} ({now - started:.0f} s)", soft_wrap=True)

    with progress:
        yield advance
    closed[0] = True
    if plain:
        elapsed = time.monotonic() - started
        console.print(f"{label}: {done[0]} {unit}, done in {elapsed:.0f} s", soft_wrap=True)
