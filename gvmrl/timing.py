"""An iteration's metrics in the order they arise, with the wall time of each phase."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class IterationMetrics:
    """Collects one iteration's metrics; `with metrics.timed("update"):` records the block's wall
    time as `time_update`."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.values[f"time_{phase}"] = time.perf_counter() - start

    def add(self, values: dict[str, Any]) -> None:
        self.values.update(values)
