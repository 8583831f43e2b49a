"""What a job tells its caller as it runs: `run_job(on_event=handler)` calls `handler(kind, **data)`.

The kinds, in order, and their data (keyword arguments):
- QUANTIZING (int8, when an artifact is made): `model`
- QUANTIZED (int8): `sha256`, `from_cache`, `source` (made | cache | job), `seconds`, `fp32_units`, `gate`
- PLANNED: `shards`, `todo`, `items`, `seconds`, `todo_seconds`
- WORKERS (once they are up): `names`, `engines` (worker -> engine), `startup` (seconds)
- SHARD (each part written): `shard`, `audio_seconds`, `worker`, `failed` (so far), `errors` (up to 3)
- FINISHED: `stats` (what `stats.json` holds)
A `StrEnum`: a kind equals its name as a string ("shard"), so handlers may compare either.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum


class EventKind(StrEnum):
    QUANTIZING = "quantizing"
    QUANTIZED = "quantized"
    PLANNED = "planned"
    WORKERS = "workers"
    SHARD = "shard"
    FINISHED = "finished"


EventHandler = Callable[..., None]  # handler(kind: EventKind, **data)
