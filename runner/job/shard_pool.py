"""The job's workers: `ShardWorker` actors in a generic `RayPool`; (shard, items) in, `ShardDone` out.

What the pool leaves to its caller is decided here: the actor and its arguments (the `WorkerPayload`,
threads, decoding options), each call's time limit (`shard_timeout_seconds`, from the call's audio
seconds), and what a call past its limit becomes. A shard that timed out (a read that never returns, from
a mount that stopped answering or a named pipe) is sent again one item per call, each with its own limit,
so that only the item that hangs again becomes an error row; the shard is yielded once, complete, when
all its items are in. Worker deaths, replacements and retries are the pool's (`runner.job.ray_pool`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from runner.inputs.manifest import ManifestItem
from runner.job.ray_pool import RayPool, TimedOut
from runner.job.shards import Shard
from runner.job.spec import SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS, JobSpec, time_limit
from runner.job.worker import ShardResult, ShardWorker, WorkerPayload, item_row, mark_failed
from runner.model.transcribe import DecodeOptions

log = logging.getLogger(__name__)

# kept per worker in stats.json
INFO_KEYS = (
    "engine",
    "engine_seconds",
    "engine_choice",
    "int8_check",
    "load_seconds",
    "cpu",
    "peak_rss_mb",
    "frame_seconds",
)


def audio_seconds(shard: Shard, items: list[ManifestItem]) -> tuple[float, list[float]]:
    """Audio seconds of a shard's call and of each of its items alone, which set their time limits.

    The plan's `shard.seconds` holds the durations from the manifest or, for lines without one, from the
    audio header; the items the driver sends carry only the manifest's (it reads no header twice). So an
    item without a duration is bounded by what the headers added to its shard, or, where they added nothing
    (the driver could not read them: a named pipe, a path only the workers see), counts as
    SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS.
    """
    known = sum(i.duration for i in items if i.duration is not None)
    unknown = sum(i.duration is None for i in items)
    from_headers = max(shard.seconds - known, 0.0)
    nothing_read = from_headers < 0.01
    whole = max(shard.seconds, known) + (SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS * unknown if nothing_read else 0.0)
    alone = [
        i.duration if i.duration is not None else max(from_headers, SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS) for i in items
    ]
    return whole, alone


@dataclass(frozen=True, eq=False)
class ShardCall:
    """One call to a worker (a `ray_pool.Call`): a shard, or one item of a shard that timed out."""

    shard: Shard
    items: list
    limit: float | None  # seconds; None: no limit
    item: int | None = None  # the item's position in its shard, for a call of one item

    @property
    def args(self) -> tuple:
        return self.shard.index, self.items

    @property
    def label(self) -> str:
        return f"shard {self.shard.index}" + ("" if self.item is None else f" (item {self.items[0].id})")


class ShardDone(NamedTuple):
    """A shard transcribed: its rows (Parquet schema, manifest order) and the worker's figures."""

    shard: Shard
    rows: list[dict]
    result: ShardResult


class _HungItem(NamedTuple):
    """What an item call that ran past its limit becomes: its error row."""

    row: dict


@dataclass(eq=False)
class _Isolated:
    """A shard that timed out, sent again one item per call; complete once every item has its row."""

    shard: Shard
    items: list
    rows: dict = field(default_factory=dict)  # position -> the item's row
    results: list = field(default_factory=list)  # ShardResults of the item calls that returned
    worker: str = ""  # of the last call that timed out: the shard's worker if none returned
    engine: str = "fp32"

    def add(self, position: int, rows: list[dict], result: ShardResult | None) -> bool:
        self.rows[position] = rows[0]
        if result is not None:
            self.results.append(result)
        return len(self.rows) == len(self.items)

    def combined(self) -> ShardDone:
        """The shard, its rows in item order, one ShardResult summing those of its calls."""
        rows = [self.rows[i] for i in range(len(self.items))]
        stages: dict[str, float] = {}
        for r in self.results:
            for name, seconds in r.stages.items():
                stages[name] = stages.get(name, 0.0) + seconds
        last = self.results[-1] if self.results else None
        result = ShardResult(
            self.shard.index,
            rows,
            sum(r.audio_seconds for r in self.results),
            sum(r.compute_seconds for r in self.results),
            last.worker if last else self.worker,
            last.engine if last else self.engine,
            stages,
            max((r.peak_rss_mb for r in self.results), default=0.0),
        )
        return ShardDone(self.shard, rows, result)


def _seconds(limit: float) -> str:
    return f"{limit:.0f}" if limit >= 10 else f"{limit:.1f}".rstrip("0").rstrip(".")


class ShardPool:
    """`spec.workers` ShardWorkers (one per CPU by default) holding `payload`; what they are, as they start."""

    def __init__(self, spec: JobSpec, payload: WorkerPayload, address: str | None = None):
        self.spec = spec
        self.names: list[str] = []  # every worker that came up, replacements included
        self.engines: dict[str, str] = {}
        self.infos: dict[str, dict] = {}  # per worker: INFO_KEYS
        self.heavy_imports: list[str] = []  # modules a worker should never load (nemo, lightning)
        options = DecodeOptions(
            batch_size=spec.batch_size,
            window_seconds=spec.window_seconds,
            confidence=spec.confidence if spec.timestamps else None,
        )
        threads = spec.threads_per_worker
        self.pool = RayPool(
            ShardWorker, (payload, threads, options), spec.workers, threads, address, on_ready=self._register
        )

    def __enter__(self) -> ShardPool:
        self.pool.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.pool.__exit__(*exc)

    @property
    def count(self) -> int:
        """Workers the job started with (replacements do not add to it)."""
        return len(self.pool.actors)

    def map(self, work: Iterable[tuple[Shard, list[ManifestItem]]]) -> Iterator[ShardDone]:
        """(shard, items) pairs in -> `ShardDone` out, as they complete; a shard that timed out comes out
        once, when each of its items has a row."""
        isolated: dict[int, _Isolated] = {}  # shard index -> a timed-out shard sent item by item
        calls = (self._call(shard, items) for shard, items in work)
        for call, result in self.pool.map(calls, lambda call, worker: self._timed_out(call, worker, isolated)):
            done = self._collect(call, result, isolated)
            if done is not None:
                yield done

    def _call(self, shard: Shard, items: list[ManifestItem]) -> ShardCall:
        return ShardCall(shard, items, time_limit(self.spec.shard_timeout_seconds, audio_seconds(shard, items)[0]))

    def _collect(self, call: ShardCall, result, isolated: dict[int, _Isolated]) -> ShardDone | None:
        """A call's result -> the shard it completes, if any."""
        if call.item is None:
            return ShardDone(call.shard, result.rows, result)
        group = isolated[call.shard.index]
        if isinstance(result, _HungItem):
            complete = group.add(call.item, [result.row], None)
        else:
            complete = group.add(call.item, result.rows, result)
        return isolated.pop(call.shard.index).combined() if complete else None

    def _timed_out(self, call: ShardCall, worker: str, isolated: dict[int, _Isolated]) -> TimedOut:
        """A shard past its limit: its items, one per call. An item past its own: an error row."""
        limit = _seconds(call.limit)
        if call.item is not None:
            return self._hung_item(call, worker, limit, isolated[call.shard.index])
        log.warning(
            "shard %d (%d items) did not finish within %s s (shard_timeout_seconds) on worker %s: "
            "stopping that worker and sending the shard's items one per call",
            call.shard.index,
            len(call.items),
            limit,
            worker,
        )
        group = _Isolated(call.shard, call.items, worker=worker, engine=self.engines.get(worker, "fp32"))
        alone = audio_seconds(call.shard, call.items)[1]
        resend = [
            ShardCall(call.shard, [item], time_limit(self.spec.shard_timeout_seconds, seconds), position)
            for position, (item, seconds) in enumerate(zip(call.items, alone))
        ]
        if not resend:
            return TimedOut(result=group.combined().result)
        isolated[call.shard.index] = group
        return TimedOut(resend)

    def _hung_item(self, call: ShardCall, worker: str, limit: str, group: _Isolated) -> TimedOut:
        item = call.items[0]
        log.warning(
            "item %s (%s) of shard %d did not finish within %s s (shard_timeout_seconds) on worker "
            "%s: stopping that worker; the item becomes an error row",
            item.id,
            item.audio_filepath,
            call.shard.index,
            limit,
            worker,
        )
        row = item_row(item, call.shard.index)
        mark_failed(
            row,
            item,
            f"reading or transcribing did not finish within {limit} s (shard_timeout_seconds); "
            "the file may be on a mount that stopped answering, or not a regular file: check it, "
            "then run again with --retry-errors",
        )
        group.worker, group.engine = worker, self.engines.get(worker, group.engine)
        return TimedOut(result=_HungItem(row))

    def _register(self, info: dict) -> None:
        self.names.append(info["worker"])
        self.engines[info["worker"]] = info["engine"]
        self.infos[info["worker"]] = {k: info[k] for k in INFO_KEYS}
        self.heavy_imports = sorted(set(self.heavy_imports) | set(info["heavy_imports"]))
