"""The Ray edge: start or join a cluster, one `ShardWorker` actor per worker, shards in, results out.

Local by default (`ray.init` with this machine's CPUs); `--address` or `RAY_ADDRESS` joins an
existing cluster, shipping the `runner` package to its nodes. The model payload is `ray.put`
once and every actor receives it by reference. When an actor's process dies (killed, out of
memory, node lost), the pool starts a replacement and sends its unfinished shards again, up
to `SHARD_ATTEMPTS` times per shard. A shard that runs past its time limit
(`shard_timeout_seconds`: a read that never returns, from a mount that stopped answering or a
named pipe) has its worker stopped and replaced, and is sent again one item per call, so that
only the item that hangs again becomes an error row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from runner.errors import RunnerError
from runner.inputs.manifest import ManifestItem
from runner.job.shards import Shard
from runner.job.spec import SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS, JobSpec, time_limit
from runner.model.transcribe import DecodeOptions
from runner.job.worker import ShardResult, ShardWorker, _fail, _row

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # one running, one queued: an actor never waits for the driver
SHARD_ATTEMPTS = 4
# kept per worker in stats.json
INFO_KEYS = ("engine", "engine_seconds", "int8_check", "load_seconds", "cpu", "peak_rss_mb")
MAX_REPLACEMENTS_PER_WORKER = 4  # more deaths than this means something is wrong beyond bad luck
# Timeouts are counted apart: a worker stopped because one file hung is no sign of a sick cluster, so only
# this many timeouts *in a row* (no call finishing in between: the mount itself stopped answering) stop the job.
MAX_TIMEOUTS_IN_A_ROW_PER_WORKER = 4
STARTUP_GRACE_SECONDS = 60.0  # a job starts once every worker is up, or with those up after this
WORKER_WAIT_SECONDS = 300.0  # with every worker lost: how long to wait for a replacement to start


class WorkersLost(RunnerError):
    """A shard could not be completed because its worker kept dying."""


def _token_auth_if_available() -> None:
    """Joining a cluster: use Ray token authentication when a token is at hand, as `ray start` does.

    Ray 2.60 enables token auth on clusters it starts and stores the token in ~/.ray/auth_token;
    a client must then set RAY_AUTH_MODE=token, else every connection is refused.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        log.info("Ray token authentication: using the token from %s",
                 "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "~/.ray/auth_token")


class Deferred:
    """A payload value kept in Ray's object store apart from the payload: an actor that calls it
    fetches it then, one that never calls it never copies it (the fp32 weights, for a worker whose
    int8 self-check fails)."""

    def __init__(self, ref):
        self.ref = ref

    def __call__(self):
        import ray

        return ray.get(self.ref)


def _deferring(ray, payload: dict) -> dict:
    """The payload with the values named in its `deferred` key put apart, as `Deferred`."""
    deferred = set(payload.get("deferred", ()))
    return {k: Deferred(ray.put(v)) if k in deferred else v for k, v in payload.items()}


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
    alone = [i.duration if i.duration is not None else max(from_headers, SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS)
             for i in items]
    return whole, alone


@dataclass(eq=False)
class _Call:
    """One call to an actor: a shard, or one item of a shard that timed out (`item`: its position there)."""
    shard: Shard
    items: list
    attempt: int
    limit: Optional[float]  # seconds; None: no limit
    item: Optional[int] = None
    slot: int = -1
    actor: Any = None
    started: Optional[float] = None  # when the actor started it: when it became the first of its queue

    def deadline(self) -> float:
        return math.inf if self.limit is None or self.started is None else self.started + self.limit

    def again(self, attempt: int) -> "_Call":
        return dataclasses.replace(self, attempt=attempt, slot=-1, actor=None, started=None)


@dataclass(eq=False)
class _Isolated:
    """A shard that timed out, sent again one item per call; complete once every item has its row."""
    shard: Shard
    items: list
    rows: dict = field(default_factory=dict)  # position -> the item's row
    results: list = field(default_factory=list)  # ShardResults of the item calls that returned
    worker: str = ""  # of the last call that timed out: the shard's worker if none returned
    engine: str = "fp32"

    def add(self, position: int, rows: list[dict], result: Optional[ShardResult]) -> bool:
        self.rows[position] = rows[0]
        if result is not None:
            self.results.append(result)
        return len(self.rows) == len(self.items)

    def combined(self) -> tuple:
        """(shard, rows in item order, one ShardResult summing those of its calls), as `map` yields a shard."""
        rows = [self.rows[i] for i in range(len(self.items))]
        stages: dict[str, float] = {}
        for r in self.results:
            for name, seconds in r.stages.items():
                stages[name] = stages.get(name, 0.0) + seconds
        last = self.results[-1] if self.results else None
        result = ShardResult(self.shard.index, rows, sum(r.audio_seconds for r in self.results),
                             sum(r.compute_seconds for r in self.results), last.worker if last else self.worker,
                             last.engine if last else self.engine, stages,
                             max((r.peak_rss_mb for r in self.results), default=0.0))
        return self.shard, rows, result


def _seconds(limit: float) -> str:
    return f"{limit:.0f}" if limit >= 10 else f"{limit:.1f}".rstrip("0").rstrip(".")


class RayPool:
    def __init__(self, spec: JobSpec, payload: dict, address: Optional[str] = None):
        self.spec, self.payload, self.address = spec, payload, address or os.environ.get("RAY_ADDRESS")
        self.actors: list = []
        self.names: list[str] = []
        self.engines: dict[str, str] = {}
        self.infos: dict[str, dict] = {}  # per worker: INFO_KEYS
        self.heavy_imports: list[str] = []  # modules a worker should never load (nemo, lightning)
        self.replacements = 0  # actors started in place of others: dead ones and those stopped for a timeout
        self.timeouts = 0
        self._timeouts_in_a_row = 0
        self._slot_workers: dict[int, str] = {}  # slot -> the worker name of its current actor
        self._started_ray = False

    def __enter__(self) -> "RayPool":
        if self.address:
            _token_auth_if_available()  # before `import ray`: Ray reads its auth mode at import
        import ray

        if not ray.is_initialized():
            self._init(ray)
        threads = self.spec.threads_per_worker
        count = self.spec.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        options = DecodeOptions(batch_size=self.spec.batch_size, window_seconds=self.spec.window_seconds)
        # The driver holds this reference for the pool's lifetime, so replacements can use it.
        self.payload_ref = ray.put(_deferring(ray, self.payload))
        self._remote = ray.remote(ShardWorker).options(num_cpus=threads)
        self._args = (self.payload_ref, threads, options)
        self.actors = [self._remote.remote(*self._args) for _ in range(count)]
        self._starting = {a.info.remote(): i for i, a in enumerate(self.actors)}
        self._live = self._await_first_workers(ray)
        log.debug("%d workers ready (%d thread(s) each)", count, threads)
        return self

    def _await_first_workers(self, ray) -> set[int]:
        """Slots whose actor is up. All of them normally; on a cluster short of CPUs the job starts with
        those that came up within `STARTUP_GRACE_SECONDS` and the others join when they can."""
        refs = list(self._starting)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STARTUP_GRACE_SECONDS)
        if not ready:
            ready, _ = ray.wait(refs, num_returns=1, timeout=WORKER_WAIT_SECONDS - STARTUP_GRACE_SECONDS)
        if not ready:
            raise WorkersLost(f"none of {len(refs)} workers started in {WORKER_WAIT_SECONDS:.0f} s: the cluster has "
                              f"no free CPU for a worker of {self.spec.threads_per_worker} thread(s); check "
                              "`ray status`, or lower workers / threads_per_worker")
        live = set()
        for ref in ready:
            idx = self._starting.pop(ref)
            try:
                self._register(ray.get(ref), idx)
            except ray.exceptions.RayError as exc:  # the model did not build in the worker: no use retrying
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise WorkersLost(f"a worker failed to start ({reason}); nothing was transcribed") from None
            live.add(idx)
        if self._starting:
            log.warning("%d of %d workers are waiting for free CPUs on the cluster; starting with %d",
                        len(self._starting), len(refs), len(live))
        return live

    def _init(self, ray) -> None:
        common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                      configure_logging=True)
        if self.address:
            package = str(Path(__file__).resolve().parents[1])  # the runner package
            ray.init(address=self.address, runtime_env={"py_modules": [package]}, **common)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), **common)  # never a leftover local cluster
        self._started_ray = True

    def map(self, work: Iterator) -> Iterator[tuple]:
        """(shard, items) pairs in -> (shard, rows, ShardResult) out, as they complete.

        A shard whose worker dies (process killed, node lost, out of memory) goes to another worker,
        up to `SHARD_ATTEMPTS` times. The dead worker's slot gets a replacement actor, which takes
        work only once it is up: on a cluster that lost a node it may wait for free CPUs while the
        survivors finish the job. With no worker left, the pool waits `WORKER_WAIT_SECONDS` for
        one to start, then gives up (`WorkersLost`; the finished parts stay valid for --resume).

        A shard still running after its time limit (`shard_timeout_seconds`; its clock starts when its
        actor starts it, after the call queued before it) is taken as a hung read: its worker is stopped
        and replaced, the call queued behind it is sent again as it was, and its items are sent again
        one per call, each with its own limit. An item that runs past that too becomes an error row
        (its worker replaced as well); the shard is yielded once, complete, when all its items are in.
        """
        import ray
        from ray.exceptions import RayActorError, RayError

        pending: dict = {}  # result ref -> _Call
        starting: dict = self._starting  # info ref of an actor still starting -> slot
        queues: dict[int, deque] = {i: deque() for i in self._live}  # live slots -> their calls, in order
        isolated: dict[int, _Isolated] = {}  # shard index -> a timed-out shard sent item by item
        work = iter(work)
        exhausted = False
        retry: list[_Call] = []
        while True:
            while queues and (retry or not exhausted) and min(len(q) for q in queues.values()) < IN_FLIGHT_PER_WORKER:
                if retry:
                    call = retry.pop()
                else:
                    nxt = next(work, None)
                    if nxt is None:
                        exhausted = True
                        break
                    shard, items = nxt
                    limit = time_limit(self.spec.shard_timeout_seconds, audio_seconds(shard, items)[0])
                    call = _Call(shard, items, 1, limit)
                self._submit(call, min(queues, key=lambda i: len(queues[i])), queues, pending)
            if not pending and exhausted and not retry:
                return
            nearest = min((pending[q[0]].deadline() for q in queues.values() if q), default=math.inf)
            if not pending:  # waiting for workers
                timeout = WORKER_WAIT_SECONDS
            else:
                timeout = None if nearest == math.inf else max(nearest - time.monotonic(), 0.0)
            ready, _ = ray.wait(list(pending) + list(starting), num_returns=1, timeout=timeout)
            if not ready and not pending:
                raise WorkersLost(f"no worker is left and none could be started in {WORKER_WAIT_SECONDS:.0f} s "
                                  "(the cluster has no free CPU for one); finished parts are kept: "
                                  "run again with --resume once the cluster has capacity")
            if not ready:  # nothing finished, not even the calls past their deadline
                now = time.monotonic()
                for idx in [i for i, q in queues.items() if q and pending[q[0]].deadline() <= now]:
                    done = self._time_out(idx, queues, pending, starting, retry, isolated)
                    if done is not None:
                        yield done
                continue
            ref = ready[0]
            if ref in starting:
                self._started(starting.pop(ref), ref, queues, starting)
                continue
            call = pending.pop(ref)
            self._dequeue(ref, call, queues, pending)
            try:
                result = ray.get(ref)
            except RayError as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                what = f"shard {call.shard.index}" + ("" if call.item is None else f" (item {call.items[0].id})")
                if call.attempt >= SHARD_ATTEMPTS:
                    raise WorkersLost(f"{what} failed {call.attempt} times (last: {reason}); "
                                      "finished parts are kept: run again with --resume") from None
                log.warning("%s lost with its worker (%s); retrying (attempt %d)", what, reason, call.attempt + 1)
                if isinstance(exc, RayActorError) and call.slot in queues and self.actors[call.slot] is call.actor:
                    del queues[call.slot]  # once per death: later failures of the same actor find it replaced
                    self._replace(call.slot, starting)
                retry.append(call.again(call.attempt + 1))
                continue
            self._timeouts_in_a_row = 0
            if call.item is None:
                yield call.shard, result.rows, result
            elif isolated[call.shard.index].add(call.item, result.rows, result):
                yield isolated.pop(call.shard.index).combined()

    def _submit(self, call: _Call, idx: int, queues: dict, pending: dict) -> None:
        """Send `call` to slot `idx`'s actor; its clock starts now if nothing is queued there before it."""
        call.slot, call.actor = idx, self.actors[idx]
        ref = call.actor.__call__.remote(call.shard.index, call.items)
        call.started = None if queues[idx] else time.monotonic()
        queues[idx].append(ref)
        pending[ref] = call

    def _dequeue(self, ref, call: _Call, queues: dict, pending: dict) -> None:
        """A call returned: the next one on its actor starts now (an actor runs its calls in order)."""
        queue = queues.get(call.slot)
        if queue is None or self.actors[call.slot] is not call.actor:
            return  # its actor is gone: the slot's queue, if any, belongs to the replacement
        queue.remove(ref)
        if queue and pending[queue[0]].started is None:
            pending[queue[0]].started = time.monotonic()

    def _time_out(self, idx: int, queues: dict, pending: dict, starting: dict, retry: list,
                  isolated: dict) -> Optional[tuple]:
        """Slot `idx`'s running call passed its limit: stop and replace the actor, resend what was queued
        on it, isolate the shard's items (or, for one item, make it an error row). Returns a shard that
        this completed, as `map` yields it, or None."""
        queue = queues.pop(idx)
        call = pending.pop(queue.popleft())
        for ref in queue:  # queued behind the hung call, never started: sent again as they were
            queued = pending.pop(ref)
            retry.append(queued.again(queued.attempt))
        worker = self._slot_workers.get(idx, f"slot {idx}")
        limit = _seconds(call.limit)
        if call.item is None:
            log.warning("shard %d (%d items) did not finish within %s s (shard_timeout_seconds) on worker %s: "
                        "stopping that worker and sending the shard's items one per call", call.shard.index,
                        len(call.items), limit, worker)
        else:
            log.warning("item %s (%s) of shard %d did not finish within %s s (shard_timeout_seconds) on worker "
                        "%s: stopping that worker; the item becomes an error row", call.items[0].id,
                        call.items[0].audio_filepath, call.shard.index, limit, worker)
        self._replace(idx, starting, timed_out=True)
        if call.item is None:
            isolated[call.shard.index] = _Isolated(call.shard, call.items, worker=worker,
                                                   engine=self.engines.get(worker, "fp32"))
            alone = audio_seconds(call.shard, call.items)[1]
            retry.extend(reversed([_Call(call.shard, [item], 1, time_limit(self.spec.shard_timeout_seconds, seconds),
                                         item=position)
                                   for position, (item, seconds) in enumerate(zip(call.items, alone))]))
            return isolated.pop(call.shard.index).combined() if not call.items else None
        item, group = call.items[0], isolated[call.shard.index]
        row = _row(item, call.shard.index)
        _fail(row, item, f"reading or transcribing did not finish within {limit} s (shard_timeout_seconds); "
                         "the file may be on a mount that stopped answering, or not a regular file: check it, "
                         "then run again with --retry-errors")
        group.worker, group.engine = worker, self.engines.get(worker, group.engine)
        return isolated.pop(call.shard.index).combined() if group.add(call.item, [row], None) else None

    def _replace(self, idx: int, starting: dict, timed_out: bool = False) -> None:
        """Start a fresh actor for slot `idx`; it joins the pool when its `info()` returns."""
        import ray

        self.replacements += 1
        if timed_out:
            self.timeouts += 1
            self._timeouts_in_a_row += 1
            if self._timeouts_in_a_row > MAX_TIMEOUTS_IN_A_ROW_PER_WORKER * len(self.actors):
                raise WorkersLost(f"{self._timeouts_in_a_row} worker calls in a row did not finish within "
                                  "shard_timeout_seconds: the audio is probably on a mount that stopped answering; "
                                  "finished parts are kept: check it, then run again with --resume")
        elif self.replacements - self.timeouts > MAX_REPLACEMENTS_PER_WORKER * len(self.actors):
            raise WorkersLost(f"{self.replacements - self.timeouts - 1} workers died during this job; finished "
                              "parts are kept: check the workers' memory and the cluster's health, then run again "
                              "with --resume")
        try:
            ray.kill(self.actors[idx], no_restart=True)  # it may be unreachable rather than dead
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[idx] = self._remote.remote(*self._args)
        self._slot_workers.pop(idx, None)
        starting[self.actors[idx].info.remote()] = idx
        log.warning("worker slot %d: starting a replacement", idx)

    def _started(self, idx: int, ref, queues: dict, starting: dict) -> None:
        import ray
        from ray.exceptions import RayError

        try:
            info = ray.get(ref)
        except RayError as exc:  # the replacement died while starting: try another
            log.warning("replacement for worker slot %d failed to start (%s)", idx, type(exc).__name__)
            self._replace(idx, starting)
            return
        self._register(info, idx)
        queues[idx] = deque()
        log.warning("worker %s joined (slot %d)", info["worker"], idx)

    def _register(self, info: dict, idx: int) -> None:
        self._slot_workers[idx] = info["worker"]
        self.names.append(info["worker"])
        self.engines[info["worker"]] = info["engine"]
        self.infos[info["worker"]] = {k: info[k] for k in INFO_KEYS}
        self.heavy_imports = sorted(set(self.heavy_imports) | set(info["heavy_imports"]))

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if self._started_ray:
            ray.shutdown()
