"""The Ray edge: start or join a cluster, one `ShardWorker` actor per worker, shards in, results out.

Local by default (`ray.init` with this machine's CPUs); `--address` or `RAY_ADDRESS` joins an
existing cluster, shipping the `runner` package to its nodes. The model payload is `ray.put`
once and every actor receives it by reference. When an actor's process dies (killed, out of
memory, node lost), the pool starts a replacement and sends its unfinished shards again, up
to `SHARD_ATTEMPTS` times per shard.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from .errors import RunnerError
from .spec import JobSpec
from .transcribe import DecodeOptions
from .worker import ShardWorker

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # one running, one queued: an actor never waits for the driver
SHARD_ATTEMPTS = 4
# kept per worker in stats.json
INFO_KEYS = ("engine", "engine_seconds", "int8_check", "load_seconds", "cpu", "peak_rss_mb")
MAX_REPLACEMENTS_PER_WORKER = 4  # more deaths than this means something is wrong beyond bad luck
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


class RayPool:
    def __init__(self, spec: JobSpec, payload: dict, address: Optional[str] = None):
        self.spec, self.payload, self.address = spec, payload, address or os.environ.get("RAY_ADDRESS")
        self.actors: list = []
        self.names: list[str] = []
        self.engines: dict[str, str] = {}
        self.infos: dict[str, dict] = {}  # per worker: INFO_KEYS
        self.heavy_imports: list[str] = []  # modules a worker should never load (nemo, lightning)
        self.replacements = 0
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
                self._register(ray.get(ref))
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
            package = str(Path(__file__).resolve().parent)
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
        """
        import ray
        from ray.exceptions import RayActorError, RayError

        pending: dict = {}  # result ref -> (shard, items, slot, actor, attempt)
        starting: dict = self._starting  # info ref of an actor still starting -> slot
        load = {i: 0 for i in self._live}  # live slots -> shards in flight
        work = iter(work)
        exhausted = False
        retry: list = []
        while True:
            while load and (retry or not exhausted) and min(load.values()) < IN_FLIGHT_PER_WORKER:
                if retry:
                    shard, items, attempt = retry.pop()
                else:
                    nxt = next(work, None)
                    if nxt is None:
                        exhausted = True
                        break
                    (shard, items), attempt = nxt, 1
                idx = min(load, key=load.get)
                actor = self.actors[idx]
                pending[actor.__call__.remote(shard.index, items)] = (shard, items, idx, actor, attempt)
                load[idx] += 1
            if not pending and exhausted and not retry:
                return
            waiting_for_workers = not pending
            ready, _ = ray.wait(list(pending) + list(starting), num_returns=1,
                                timeout=WORKER_WAIT_SECONDS if waiting_for_workers else None)
            if not ready:
                raise WorkersLost(f"no worker is left and none could be started in {WORKER_WAIT_SECONDS:.0f} s "
                                  "(the cluster has no free CPU for one); finished parts are kept: "
                                  "run again with --resume once the cluster has capacity")
            ref = ready[0]
            if ref in starting:
                self._started(starting.pop(ref), ref, load, starting)
                continue
            shard, items, idx, actor, attempt = pending.pop(ref)
            if idx in load and self.actors[idx] is actor:
                load[idx] -= 1
            try:
                result = ray.get(ref)
            except RayError as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if attempt >= SHARD_ATTEMPTS:
                    raise WorkersLost(f"shard {shard.index} failed {attempt} times (last: {reason}); "
                                      "finished parts are kept: run again with --resume") from None
                log.warning("shard %d lost with its worker (%s); retrying (attempt %d)", shard.index, reason,
                            attempt + 1)
                if isinstance(exc, RayActorError) and idx in load and self.actors[idx] is actor:
                    del load[idx]  # once per death: later failures of the same actor find it replaced
                    self._replace(idx, starting)
                retry.append((shard, items, attempt + 1))
                continue
            yield shard, result.rows, result

    def _replace(self, idx: int, starting: dict) -> None:
        """Start a fresh actor for slot `idx`; it joins the pool when its `info()` returns."""
        import ray

        self.replacements += 1
        if self.replacements > MAX_REPLACEMENTS_PER_WORKER * len(self.actors):
            raise WorkersLost(f"{self.replacements - 1} workers died during this job; finished parts are kept: "
                              "check the workers' memory and the cluster's health, then run again with --resume")
        try:
            ray.kill(self.actors[idx], no_restart=True)  # it may be unreachable rather than dead
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[idx] = self._remote.remote(*self._args)
        starting[self.actors[idx].info.remote()] = idx
        log.warning("worker slot %d: starting a replacement", idx)

    def _started(self, idx: int, ref, load: dict, starting: dict) -> None:
        import ray
        from ray.exceptions import RayError

        try:
            info = ray.get(ref)
        except RayError as exc:  # the replacement died while starting: try another
            log.warning("replacement for worker slot %d failed to start (%s)", idx, type(exc).__name__)
            self._replace(idx, starting)
            return
        self._register(info)
        load[idx] = 0
        log.warning("worker %s joined (slot %d)", info["worker"], idx)

    def _register(self, info: dict) -> None:
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
