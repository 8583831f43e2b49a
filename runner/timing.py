"""Per-stage seconds: a context manager that adds elapsed time to a dict, when one is given."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

WORKER_STAGES = ("read", "resample", "features", "encoder", "decode", "words")


@contextmanager
def timed(timings: dict | None, stage: str) -> Iterator[None]:
    """Add the seconds spent in the block to `timings[stage]`; a no-op when `timings` is None."""
    if timings is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
