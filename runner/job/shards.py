"""Shard plan: consecutive manifest lines packed into shards of about `shard_seconds` of audio.

Deterministic (the same manifest and `shard_seconds` give the same plan) and stable (shard
numbers follow manifest order), so a part file on disk always means the same lines. The plan
holds line ranges, not items: it stays small for million-line manifests. `prepare` validates a
job's manifest and plans it (or takes the plan a resumed job recorded).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from runner.errors import InputError
from runner.inputs.manifest import ManifestItem, check_unique_ids, file_sha256, iter_manifest
from runner.job.spec import JobSpec

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
    def from_list(cls, row: list) -> Shard:
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


def group_items(
    items: Iterable[ManifestItem], shards: list[Shard], wanted: set[int]
) -> Iterator[tuple[Shard, list[ManifestItem]]]:
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


@dataclass
class Plan:
    """A job's shards and what its manifest holds (items, audio seconds, lines with a reference)."""

    shards: list[Shard]
    items: int
    seconds: float
    with_text: int
    manifest_sha256: str


def prepare(spec: JobSpec, recorded: dict | None = None) -> Plan:
    """Validate every manifest line and plan shards; raises `ManifestError` (exit 2) first.

    `recorded` (a resumed job's `job.json`): its plan is reused when the manifest is the one it was
    made from, so the plan never moves because a file became readable (an unreadable file weighs
    0 s when the plan is made; once repaired it would weigh its length and move every boundary
    after it). Audio headers are then not read at all.
    """
    sha = file_sha256(spec.manifest)
    shards = _recorded_shards(recorded, sha)
    counts = {"items": 0, "seconds": 0.0, "with_text": 0}

    def counted():
        items = iter_manifest(spec.manifest, read_missing_durations=shards is None)
        for item in check_unique_ids(items, spec.manifest):
            counts["items"] += 1
            counts["seconds"] += item.duration or 0.0
            counts["with_text"] += item.text is not None
            yield item

    if shards is None:
        shards = plan_shards(counted(), spec.shard_seconds)
    else:
        for _ in counted():
            pass
        counts["seconds"] = sum(s.seconds for s in shards)
    if not shards:
        raise InputError(f"{spec.manifest}: the manifest has no items")
    return Plan(shards, counts["items"], counts["seconds"], counts["with_text"], sha)


def _recorded_shards(recorded: dict | None, manifest_sha256: str) -> list[Shard] | None:
    """The shards `job.json` planned, if it was planned from this very manifest (else the
    fingerprint check refuses the resume, naming what changed)."""
    try:
        if recorded is None or recorded["fingerprint"]["manifest_sha256"] != manifest_sha256:
            return None
        return [Shard.from_list(row) for row in recorded["plan"]]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
