"""Alternated timing for the benchmarks that compare variants in one process (no torch, no NeMo here).

The machines drift 10-36% over minutes, so variants are timed call by call in turn, and each is summed up by
its median with min and max beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternated(fns: dict[str, Callable[[], object]], rounds: int, warmups: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn over `rounds` rounds, the fns taking turns within every round, after
    `warmups` calls of each."""
    for fn in fns.values():
        for _ in range(warmups):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def figure(values: list[float], scale: float = 1.0, digits: int = 4) -> dict:
    """Median, min and max of `values` times `scale` (1e3: seconds to ms)."""
    return {
        key: round(scale * f(values), digits) for key, f in (("median", statistics.median), ("min", min), ("max", max))
    }
