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


class RayPool:
    def __init__(self, spec: JobSpec, payload: dict, address: Optional[str] = None):
        self.spec, self.payload, self.address = spec, payload, address or os.environ.get("RAY_ADDRESS")
        self.actors: list = []
        self.names: list[str] = []
        self.engines: dict[str, str] = {}
        self.infos: dict[str, dict] = {}  # per worker: engine, engine timings (auto), load seconds, CPU
        self.heavy_imports: list[str] = []  # modules a worker should never load (nemo, lightning)
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
        self.payload_ref = ray.put(self.payload)
        self._remote = ray.remote(ShardWorker).options(num_cpus=threads)
        self._args = (self.payload_ref, threads, options)
        self.actors = [self._remote.remote(*self._args) for _ in range(count)]
        infos = ray.get([a.info.remote() for a in self.actors])
        self.names = [i["worker"] for i in infos]
        self.engines = {i["worker"]: i["engine"] for i in infos}
        self.infos = {i["worker"]: {k: i[k] for k in ("engine", "engine_seconds", "load_seconds", "cpu")} for i in infos}
        self.heavy_imports = sorted({m for i in infos for m in i["heavy_imports"]})
        log.debug("%d workers ready (%d thread(s) each)", count, threads)
        return self

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
        """(shard, items) pairs in -> (shard, rows, ShardResult) out, as they complete."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending: dict = {}  # ObjectRef -> (shard, items, actor index, attempt)
        load = {i: 0 for i in range(len(self.actors))}
        work = iter(work)
        exhausted = False
        retry: list = []
        while True:
            while (retry or not exhausted) and min(load.values()) < IN_FLIGHT_PER_WORKER:
                if retry:
                    shard, items, attempt = retry.pop()
                else:
                    nxt = next(work, None)
                    if nxt is None:
                        exhausted = True
                        break
                    (shard, items), attempt = nxt, 1
                idx = min(load, key=load.get)
                pending[self.actors[idx].__call__.remote(shard.index, items)] = (shard, items, idx, attempt)
                load[idx] += 1
            if not pending:
                return
            [ready], _ = ray.wait(list(pending), num_returns=1)
            shard, items, idx, attempt = pending.pop(ready)
            load[idx] -= 1
            try:
                result = ray.get(ready)
            except (RayActorError, RayTaskError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if attempt >= SHARD_ATTEMPTS:
                    raise WorkersLost(f"shard {shard.index} failed {attempt} times (last: {reason}); "
                                      "finished parts are kept: run again with --resume") from None
                log.warning("shard %d lost with its worker (%s); retrying (attempt %d)", shard.index, reason,
                            attempt + 1)
                if isinstance(exc, RayActorError):
                    self._replace(idx)
                retry.append((shard, items, attempt + 1))
                continue
            yield shard, result.rows, result

    def _replace(self, idx: int) -> None:
        """A fresh actor in slot `idx` (once per death: later failures of the same actor are no-ops)."""
        import ray

        old = self.actors[idx]
        try:
            ray.get(old.info.remote(), timeout=5)
            return  # still alive: an earlier failure already replaced the dead one
        except Exception:  # noqa: BLE001 - dead, unreachable or restarting
            pass
        self.actors[idx] = self._remote.remote(*self._args)
        info = ray.get(self.actors[idx].info.remote())
        self.names.append(info["worker"])
        self.engines[info["worker"]] = info["engine"]
        self.infos[info["worker"]] = {k: info[k] for k in ("engine", "engine_seconds", "load_seconds", "cpu")}
        log.warning("started replacement worker %s", info["worker"])

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if self._started_ray:
            ray.shutdown()
