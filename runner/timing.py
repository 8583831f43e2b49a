"""Per-stage seconds: a context manager that adds elapsed time to a dict, when one is given."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

WORKER_STAGES = ("read", "resample", "features", "encoder", "decode")


@contextmanager
def timed(timings: Optional[dict], stage: str) -> Iterator[None]:
    """Add the seconds spent in the block to `timings[stage]`; a no-op when `timings` is None."""
    if timings is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
