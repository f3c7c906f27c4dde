"""Per-phase progress for long commands: rich bars on a terminal, plain lines in a log file.

    with Progress() as progress:
        task = progress.phase("sample", total=512)
        progress.advance(task, 64)
        progress.end(task)               # plain mode: "sample: 512/512 in 3.1s"
        progress.log("iter 3: acc=0.41")

Plain mode writes nothing while a phase runs and one line when it ends, so a redirected log
stays readable; rich mode shows live bars and prints the same line when a phase ends.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class _Phase:
    name: str
    total: int | None
    started: float
    completed: int = 0
    rich_id: Any = None  # the rich TaskID in rich mode


class Progress:
    """Progress display for the phases of a run (sample, grade, train, eval, ...).

    enabled: True for rich bars, False for plain lines, None to pick rich bars only when
    `stream` is a terminal. stream: where everything goes (stderr by default, keeping stdout
    for results).
    """

    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = self.stream.isatty()
        self._phases: dict[int, _Phase] = {}
        self._next_id = 0
        self._bars = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self._bars = RichProgress(
                *RichProgress.get_default_columns(),
                console=Console(file=self.stream),
                transient=True,
            )

    def __enter__(self) -> Progress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def phase(self, name: str, total: int | None = None) -> int:
        """Start a phase of `total` units (None when unknown); returns its task id."""
        task = self._next_id
        self._next_id += 1
        rich_id = None if self._bars is None else self._bars.add_task(name, total=total)
        self._phases[task] = _Phase(name, total, time.monotonic(), rich_id=rich_id)
        return task

    def advance(self, task: int, n: int = 1) -> None:
        phase = self._phases[task]
        phase.completed += n
        if self._bars is not None:
            self._bars.advance(phase.rich_id, n)

    def end(self, task: int) -> float:
        """Finish a phase, report "name: done/total in S s", and return its seconds."""
        phase = self._phases.pop(task)
        seconds = time.monotonic() - phase.started
        count = f"{phase.completed}" if phase.total is None else f"{phase.completed}/{phase.total}"
        if self._bars is not None:
            self._bars.remove_task(phase.rich_id)
            self._bars.refresh()  # else the next print redraws the finished bar from cache
        self.log(f"{phase.name}: {count} in {seconds:.1f}s")
        return seconds

    def log(self, message: str) -> None:
        """One line of text above the bars (rich) or on the stream (plain)."""
        if self._bars is not None:
            self._bars.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table of `rows` restricted to `columns`, for summaries printed by commands.

    Numeric columns are right-aligned and floats shown with 4 significant digits; a missing
    value prints as "-". Plain ASCII so it reads the same in a terminal and a log file.
    """
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), numbers.Number) for row in rows if row.get(c) is not None)
        for c in columns
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)
        ]
        return "  ".join(padded).rstrip()

    rule = ["-" * w for w in widths]
    return "\n".join([line(list(columns)), line(rule)] + [line(r) for r in cells])
