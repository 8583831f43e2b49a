"""A generic pool of Ray actors: start or join a cluster, `count` actors of one class, calls in, results out.

The pool knows nothing of what its actors do (Ray Data's `_MapWorker` pattern): the caller gives an actor
class, its constructor arguments, a count and threads per actor, then sends `Call`s (the arguments of the
actor's `__call__`, a time limit, a label for log lines). It asks one thing of the actor class: an `info()`
returning a dict whose `worker` entry names the actor; it is how the pool knows an actor is up (`on_ready`
gets the dict). The only module that imports Ray (lazily).

Local by default; an address or `RAY_ADDRESS` joins a cluster, shipping the actor class's package. Each
constructor argument is `ray.put` once and every actor, replacements included, gets it by reference (a
`Deferred` in one is put apart, copied only by an actor that calls it). How hard it tries is a `Policy`:
- an actor whose process dies (killed, out of memory, node lost) is replaced and its unfinished calls go to
  other actors, up to `attempts` sends per call; too many deaths, or no actor for `worker_wait_seconds`,
  raise `WorkersLost`;
- a call past its limit (its clock starts when its actor starts it, after the call queued before it) has
  its actor stopped and replaced and the calls queued behind it sent again as they were; the caller's
  `on_timeout` says what it becomes (calls sent in its place, or a result). Too many timeouts in a row
  (no call returning in between) raise `WorkersLost`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.job.in_flight import Call, Done, Flight, OnTimeout, Sent, TimedOut

__all__ = ["Call", "Deferred", "Done", "Policy", "RayPool", "TimedOut", "WorkersLost"]

log = logging.getLogger(__name__)

# The defaults of `Policy`, read when a pool is made (so a test can shorten one).
IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: an actor never waits for the driver
CALL_ATTEMPTS = 4
MAX_REPLACEMENTS_PER_ACTOR = 4  # more deaths than this means something is wrong beyond bad luck
# Timeouts are counted apart: an actor stopped because one file hung is no sign of a sick cluster, so only
# this many timeouts *in a row* (no call finishing in between: the mount itself stopped answering) stop the job.
MAX_TIMEOUTS_IN_A_ROW_PER_ACTOR = 4
STARTUP_GRACE_SECONDS = 60.0  # a job starts once every actor is up, or with those up after this
WORKER_WAIT_SECONDS = 300.0  # with every actor lost: how long to wait for a replacement to start


class WorkersLost(RunnerError):
    """A call could not be completed because its workers kept dying (or none could start)."""


@dataclass(frozen=True)
class Policy:
    """How hard the pool tries before it gives up (`WorkersLost`); see the module docstring."""

    in_flight_per_actor: int
    attempts: int  # per call, counting sends after an actor died
    max_replacements_per_actor: int
    max_timeouts_in_a_row_per_actor: int
    startup_grace_seconds: float
    worker_wait_seconds: float

    @classmethod
    def default(cls) -> Policy:
        return cls(
            IN_FLIGHT_PER_ACTOR,
            CALL_ATTEMPTS,
            MAX_REPLACEMENTS_PER_ACTOR,
            MAX_TIMEOUTS_IN_A_ROW_PER_ACTOR,
            STARTUP_GRACE_SECONDS,
            WORKER_WAIT_SECONDS,
        )


class Deferred:
    """A value put in Ray's object store apart from the argument holding it: an actor that calls it fetches
    it then, one that never calls it never copies it. Outside a pool, calling it returns the value."""

    def __init__(self, value: Any = None, ref: Any = None):
        self._value, self._ref = value, ref

    def __call__(self) -> Any:
        if self._ref is None:
            return self._value
        import ray

        return ray.get(self._ref)


def _put_apart(ray, value: Any) -> Any:
    """`value` (a constructor argument) with each `Deferred` in it, or in its dataclass fields, in the store."""
    if isinstance(value, Deferred):
        return Deferred(ref=ray.put(value()))
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    changes = {
        f.name: _put_apart(ray, getattr(value, f.name))
        for f in dataclasses.fields(value)
        if isinstance(getattr(value, f.name), Deferred)
    }
    return dataclasses.replace(value, **changes) if changes else value


def _token_auth_if_available() -> None:
    """Joining a cluster: use Ray token authentication when a token is at hand, as `ray start` does.

    Ray 2.60 enables token auth on clusters it starts and stores the token in ~/.ray/auth_token;
    a client must then set RAY_AUTH_MODE=token, else every connection is refused.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        log.info(
            "Ray token authentication: using the token from %s",
            "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "~/.ray/auth_token",
        )


def _stop_autoscaler_monitor(ray) -> None:
    """Kill the autoscaler monitor of the local cluster this process started, before `ray.shutdown`.

    A local cluster has nothing to autoscale, and `ray.shutdown` gives the monitor a SIGTERM and one
    second to exit, which it never does, then kills it: 1.0 of the 1.35 s a shutdown took (Ray 2.60,
    the process timings of `Node._kill_process_type`), on every job's clock. Ray's own handles to it are
    private; where they are not as expected, the shutdown is Ray's own as before."""
    try:
        for info in ray._private.worker._global_node.all_processes.get("monitor", []):
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - best effort: Ray's shutdown stops it anyway
        pass


def _reason(exc: Exception, line: int) -> str:
    text = str(exc).strip()
    return text.splitlines()[line] if text else type(exc).__name__


class RayPool:
    """`count` actors of `actor_class(*args)` with `threads` CPUs each; `map` sends calls to them."""

    def __init__(
        self,
        actor_class: type,
        args: tuple,
        count: int | None,
        threads: int,
        address: str | None = None,
        policy: Policy | None = None,
        on_ready: Callable[[dict], None] = lambda info: None,
    ):
        """`count` None: one actor per `threads` CPUs of the cluster. `on_ready` gets each actor's `info()`
        as it comes up, replacements included."""
        self.actor_class, self.args, self.count, self.threads = actor_class, args, count, threads
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.policy = policy or Policy.default()
        self.on_ready = on_ready
        self.actors: list = []
        self.replacements = 0  # actors started in place of others: dead ones and those stopped for a timeout
        self.timeouts = 0
        self._timeouts_in_a_row = 0
        self._slot_workers: dict[int, str] = {}  # slot -> the worker name of its current actor
        self._starting: dict = {}  # info ref of an actor still starting -> its slot
        self._started_ray = False

    def __enter__(self) -> RayPool:
        if self.address:
            _token_auth_if_available()  # before `import ray`: Ray reads its auth mode at import
        import ray

        if not ray.is_initialized():
            self._init(ray)
        count = self.count or max(1, int(ray.cluster_resources().get("CPU", 1) // self.threads))
        # The driver holds these references for the pool's lifetime, so replacements can use them.
        self._refs = tuple(ray.put(_put_apart(ray, arg)) for arg in self.args)
        self._remote = ray.remote(self.actor_class).options(num_cpus=self.threads)
        self.actors = [self._remote.remote(*self._refs) for _ in range(count)]
        self._starting = {a.info.remote(): i for i, a in enumerate(self.actors)}
        self._live = self._await_first_workers(ray)
        log.debug("%d workers ready (%d thread(s) each)", count, self.threads)
        return self

    def _init(self, ray) -> None:
        common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        if self.address:
            package = self.actor_class.__module__.split(".")[0]  # shipped to the cluster's nodes
            path = str(Path(importlib.import_module(package).__file__).parent)
            ray.init(address=self.address, runtime_env={"py_modules": [path]}, **common)
        else:
            ray.init(address="local", num_cpus=os.cpu_count(), **common)  # never a leftover local cluster
        self._started_ray = True

    def _await_first_workers(self, ray) -> set[int]:
        """Slots whose actor is up. All of them normally; on a cluster short of CPUs the job starts with
        those that came up within the startup grace and the others join when they can."""
        refs, policy = list(self._starting), self.policy
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=policy.startup_grace_seconds)
        if not ready:
            ready, _ = ray.wait(refs, num_returns=1, timeout=policy.worker_wait_seconds - policy.startup_grace_seconds)
        if not ready:
            raise WorkersLost(
                f"none of {len(refs)} workers started in {policy.worker_wait_seconds:.0f} s: the "
                f"cluster has no free CPU for a worker of {self.threads} thread(s); check "
                "`ray status`, or lower workers / threads_per_worker"
            )
        live = set()
        for ref in ready:
            idx = self._starting.pop(ref)
            try:
                self._register(ray.get(ref), idx)
            except ray.exceptions.RayError as exc:  # the actor could not be built: no use retrying
                raise WorkersLost(f"a worker failed to start ({_reason(exc, -1)}); nothing was transcribed") from None
            live.add(idx)
        if self._starting:
            log.warning(
                "%d of %d workers are waiting for free CPUs on the cluster; starting with %d",
                len(self._starting),
                len(refs),
                len(live),
            )
        return live

    def map(self, calls: Iterable[Call], on_timeout: OnTimeout) -> Iterator[Done]:
        """Calls in -> `Done(call, result)` out, as they complete (see the module docstring for retries,
        replacements and time limits). With no actor left, waits `worker_wait_seconds` for one to start,
        then raises `WorkersLost`."""
        flight = Flight(iter(calls), {i: deque() for i in self._live})
        while True:
            self._fill(flight)
            if flight.finished():
                return
            ref = self._wait(flight)
            if ref is None:  # nothing returned, not even the calls past their deadline
                for idx in flight.overdue(time.monotonic()):
                    done = self._time_out(idx, flight, on_timeout)
                    if done is not None:
                        yield done
            elif ref in self._starting:
                self._started(self._starting.pop(ref), ref, flight)
            else:
                done = self._returned(ref, flight)
                if done is not None:
                    yield done

    def _fill(self, flight: Flight) -> None:
        """Send calls until every live actor has `in_flight_per_actor`, to the least busy first."""
        while flight.has_room(self.policy.in_flight_per_actor):
            sent = flight.next_call()
            if sent is None:
                return
            self._submit(sent, flight.least_busy(), flight)

    def _submit(self, sent: Sent, idx: int, flight: Flight) -> None:
        sent.slot, sent.actor = idx, self.actors[idx]
        flight.add(sent.actor.__call__.remote(*sent.call.args), sent)

    def _wait(self, flight: Flight):
        """The first call or starting actor to return, or None once the nearest deadline has passed."""
        import ray

        if not flight.pending:  # waiting for workers
            timeout = self.policy.worker_wait_seconds
        else:
            nearest = flight.nearest_deadline()
            timeout = None if nearest == math.inf else max(nearest - time.monotonic(), 0.0)
        ready, _ = ray.wait(list(flight.pending) + list(self._starting), num_returns=1, timeout=timeout)
        if not ready and not flight.pending:
            raise WorkersLost(
                f"no worker is left and none could be started in "
                f"{self.policy.worker_wait_seconds:.0f} s (the cluster has no free CPU for "
                "one); finished parts are kept: run again with --resume once the cluster has capacity"
            )
        return ready[0] if ready else None

    def _returned(self, ref, flight: Flight) -> Done | None:
        """A call's result; None when its actor failed it (it is sent again, or the job stops)."""
        import ray
        from ray.exceptions import RayError

        sent = flight.take(ref, self.actors)
        try:
            result = ray.get(ref)
        except RayError as exc:
            self._lost(sent, exc, flight)
            return None
        self._timeouts_in_a_row = 0
        return Done(sent.call, result)

    def _lost(self, sent: Sent, exc: Exception, flight: Flight) -> None:
        """A call failed with its actor: send it again (replacing the actor if it died), or stop the job."""
        from ray.exceptions import RayActorError

        reason, what = _reason(exc, 0), sent.call.label
        if sent.attempt >= self.policy.attempts:
            raise WorkersLost(
                f"{what} failed {sent.attempt} times (last: {reason}); finished parts are kept: run again with --resume"
            ) from None
        log.warning("%s lost with its worker (%s); retrying (attempt %d)", what, reason, sent.attempt + 1)
        if isinstance(exc, RayActorError) and sent.slot in flight.queues and self.actors[sent.slot] is sent.actor:
            del flight.queues[sent.slot]  # once per death: later failures of the same actor find it replaced
            self._replace(sent.slot)
        flight.retry.append(sent.again(sent.attempt + 1))

    def _time_out(self, idx: int, flight: Flight, on_timeout: OnTimeout) -> Done | None:
        """Slot `idx`'s running call passed its limit: ask the caller what it becomes, stop and replace the
        actor, resend what was queued on it. Returns the call with the caller's result when it resends none."""
        sent, queued = flight.drop_slot(idx)
        flight.retry.extend(q.again(q.attempt) for q in queued)  # never started: sent again as they were
        answer = on_timeout(sent.call, self._slot_workers.get(idx, f"slot {idx}"))
        self._replace(idx, timed_out=True)
        flight.retry.extend(Sent(call) for call in reversed(answer.resend))
        return None if answer.resend else Done(sent.call, answer.result)

    def _replace(self, idx: int, timed_out: bool = False) -> None:
        """Start a fresh actor for slot `idx`; it joins the pool when its `info()` returns."""
        import ray

        self._count_replacement(timed_out)
        try:
            ray.kill(self.actors[idx], no_restart=True)  # it may be unreachable rather than dead
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[idx] = self._remote.remote(*self._refs)
        self._slot_workers.pop(idx, None)
        self._starting[self.actors[idx].info.remote()] = idx
        log.warning("worker slot %d: starting a replacement", idx)

    def _count_replacement(self, timed_out: bool) -> None:
        """Raise `WorkersLost` past the policy's limits on deaths and on timeouts in a row."""
        self.replacements += 1
        actors, policy = len(self.actors), self.policy
        if timed_out:
            self.timeouts += 1
            self._timeouts_in_a_row += 1
            if self._timeouts_in_a_row > policy.max_timeouts_in_a_row_per_actor * actors:
                raise WorkersLost(
                    f"{self._timeouts_in_a_row} worker calls in a row did not finish within "
                    "shard_timeout_seconds: the audio is probably on a mount that stopped answering; "
                    "finished parts are kept: check it, then run again with --resume"
                )
        elif self.replacements - self.timeouts > policy.max_replacements_per_actor * actors:
            raise WorkersLost(
                f"{self.replacements - self.timeouts - 1} workers died during this job; finished "
                "parts are kept: check the workers' memory and the cluster's health, then run again "
                "with --resume"
            )

    def _started(self, idx: int, ref, flight: Flight) -> None:
        """A replacement (or a late first actor) is up: it takes calls from now on."""
        import ray
        from ray.exceptions import RayError

        try:
            info = ray.get(ref)
        except RayError as exc:  # the replacement died while starting: try another
            log.warning("replacement for worker slot %d failed to start (%s)", idx, type(exc).__name__)
            self._replace(idx)
            return
        self._register(info, idx)
        flight.queues[idx] = deque()
        log.warning("worker %s joined (slot %d)", info["worker"], idx)

    def _register(self, info: dict, idx: int) -> None:
        self._slot_workers[idx] = info["worker"]
        self.on_ready(info)

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if self._started_ray:
            _stop_autoscaler_monitor(ray)
            ray.shutdown()
