"""What a `RayPool` has in flight: the calls it was given, each send of one, each actor's queue. No Ray here.

An actor runs its calls one after another, so a call's clock (its time limit) starts when it reaches the
head of its actor's queue, not when it was sent; the queues are kept in the order each actor runs them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class Call(Protocol):
    """What the caller sends; the pool never looks inside `args`."""

    args: tuple  # positional arguments of the actor's `__call__`
    limit: float | None  # seconds from when its actor starts it; None: no limit
    label: str  # names it in log lines and errors ("shard 3")


class Done(NamedTuple):
    """A call and what became of it: the actor's return value, or the result `on_timeout` gave it."""

    call: Any
    result: Any


class TimedOut(NamedTuple):
    """The caller's answer for a call past its limit: calls sent in its place, or (none) its result."""

    resend: Sequence = ()
    result: Any = None


OnTimeout = Callable[[Any, str], TimedOut]  # (the call, the name of the worker that was stopped)


@dataclass(eq=False)
class Sent:
    """A call as the pool tracks it: which send this is, on which slot's actor, and since when it runs."""

    call: Any
    attempt: int = 1
    slot: int = -1
    actor: Any = None
    started: float | None = None  # when the actor started it: when it became the first of its queue

    def deadline(self) -> float:
        limit = self.call.limit
        return math.inf if limit is None or self.started is None else self.started + limit

    def again(self, attempt: int) -> Sent:
        return Sent(self.call, attempt)


@dataclass(eq=False)
class Flight:
    """The state of one `map`: calls not yet sent, those sent and not returned, each live slot's queue."""

    calls: Iterator
    queues: dict  # live slot -> result refs of its calls, in the order its actor runs them
    pending: dict = field(default_factory=dict)  # result ref -> Sent
    retry: list = field(default_factory=list)  # Sent to send again, the last one first
    exhausted: bool = False  # `calls` has no more

    def has_room(self, in_flight: int) -> bool:
        """A live slot has fewer than `in_flight` calls, and there is a call to send (or maybe one)."""
        return (
            bool(self.queues and (self.retry or not self.exhausted)) and min(map(len, self.queues.values())) < in_flight
        )

    def least_busy(self) -> int:
        return min(self.queues, key=lambda i: len(self.queues[i]))

    def add(self, ref, sent: Sent) -> None:
        """`sent` went to its slot's actor as `ref`; its clock starts now if nothing is queued there before it."""
        sent.started = None if self.queues[sent.slot] else time.monotonic()
        self.queues[sent.slot].append(ref)
        self.pending[ref] = sent

    def take(self, ref, actors: list) -> Sent:
        """`ref` returned (or failed): off the books, and the next call on its actor starts now. `actors`: each
        slot's current actor; if the call's actor is gone, the slot's queue belongs to its replacement."""
        sent = self.pending.pop(ref)
        queue = self.queues.get(sent.slot)
        if queue is not None and actors[sent.slot] is sent.actor:
            queue.remove(ref)
            if queue and self.pending[queue[0]].started is None:
                self.pending[queue[0]].started = time.monotonic()
        return sent

    def drop_slot(self, idx: int) -> tuple[Sent, list[Sent]]:
        """Slot `idx`'s actor is being stopped: its running call and those queued behind it, off the books."""
        queue = self.queues.pop(idx)
        sent = self.pending.pop(queue.popleft())
        return sent, [self.pending.pop(ref) for ref in queue]

    def next_call(self) -> Sent | None:
        if self.retry:
            return self.retry.pop()
        call = next(self.calls, None)
        if call is None:
            self.exhausted = True
            return None
        return Sent(call)

    def finished(self) -> bool:
        return not self.pending and self.exhausted and not self.retry

    def nearest_deadline(self) -> float:
        return min((self.pending[q[0]].deadline() for q in self.queues.values() if q), default=math.inf)

    def overdue(self, now: float) -> list[int]:
        """Slots whose running call is past its deadline."""
        return [i for i, q in self.queues.items() if q and self.pending[q[0]].deadline() <= now]
