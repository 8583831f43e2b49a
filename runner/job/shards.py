"""Shard plan: consecutive manifest lines packed into shards of about `shard_seconds` of audio.

Deterministic (the same manifest and `shard_seconds` give the same plan) and stable (shard
numbers follow manifest order), so a part file on disk always means the same lines. The plan
holds line ranges, not items: it stays small for million-line manifests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from runner.inputs.manifest import ManifestItem

UNKNOWN_DURATION = 0.0  # unreadable items weigh nothing; they become error rows quickly


@dataclass(frozen=True)
class Shard:
    index: int
    first_line: int
    last_line: int
    items: int
    seconds: float

    def to_list(self) -> list:
        return [self.index, self.first_line, self.last_line, self.items, round(self.seconds, 3)]

    @classmethod
    def from_list(cls, row: list) -> "Shard":
        return cls(int(row[0]), int(row[1]), int(row[2]), int(row[3]), float(row[4]))


def plan_shards(items: Iterable[ManifestItem], shard_seconds: float) -> list[Shard]:
    """Cut the item stream into shards once a shard reaches `shard_seconds`."""
    shards: list[Shard] = []
    first = last = count = 0
    seconds = 0.0
    for item in items:
        if count == 0:
            first = item.line
        last, count = item.line, count + 1
        seconds += item.duration if item.duration is not None else UNKNOWN_DURATION
        if seconds >= shard_seconds:
            shards.append(Shard(len(shards), first, last, count, seconds))
            count, seconds = 0, 0.0
    if count:
        shards.append(Shard(len(shards), first, last, count, seconds))
    return shards


def group_items(items: Iterable[ManifestItem], shards: list[Shard], wanted: set[int]) -> Iterator[tuple[Shard, list[ManifestItem]]]:
    """One streaming pass over the manifest, yielding the items of each wanted shard in order."""
    it = iter(items)
    pending: list[ManifestItem] = []
    for shard in shards:
        batch = []
        for item in _until(it, pending, shard.last_line):
            if item.line >= shard.first_line:
                batch.append(item)
        if shard.index in wanted:
            yield shard, batch


def _until(it: Iterator[ManifestItem], pending: list[ManifestItem], last_line: int) -> Iterator[ManifestItem]:
    while pending:
        yield pending.pop()
    for item in it:
        if item.line > last_line:
            pending.append(item)
            return
        yield item
