"""Shard plan: consecutive manifest lines packed into shards of about `shard_seconds` of audio.

Deterministic (the same manifest, audio and settings give the same plan) and stable (shard
numbers follow manifest order), so a part file on disk always means the same lines. The plan
holds line ranges, not items: it stays small for million-line manifests. A line longer than
`split_seconds` becomes several shards of one segment each (`runner.inputs.split`: cut at pauses),
so one long recording keeps every worker busy; the plan records each segment's span. `prepare`
validates a job's manifest and plans it (or takes the plan a resumed job recorded).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from runner.errors import InputError
from runner.inputs.manifest import ManifestItem, check_unique_ids, file_sha256, iter_manifest
from runner.inputs.split import SegmentItem, Span, SplitFigures, split_line
from runner.job.spec import JobSpec

UNKNOWN_DURATION = 0.0  # unreadable items weigh nothing; they become error rows quickly
SPLIT_SEARCH_SECONDS = 10.0  # a cut may move this far (at most a quarter segment) from its target to a pause


@dataclass(frozen=True)
class Shard:
    index: int
    first_line: int
    last_line: int
    items: int
    seconds: float
    span: Span | None = None  # a segment of one long line (`first_line`); None: whole lines
    segment: tuple[int, int] | None = None  # (the segment's number in its line, the line's segments)

    def to_list(self) -> list:
        row = [self.index, self.first_line, self.last_line, self.items, round(self.seconds, 3)]
        if self.span is not None and self.segment is not None:
            row += [self.span.start, self.span.end, self.span.cut, self.segment[0], self.segment[1]]
        return row

    @classmethod
    def from_list(cls, row: list) -> Shard:
        shard = cls(int(row[0]), int(row[1]), int(row[2]), int(row[3]), float(row[4]))
        if len(row) > 5:
            span = Span(float(row[5]), float(row[6]), str(row[7]))
            shard = cls(*shard.to_list()[:4], shard.seconds, span, (int(row[8]), int(row[9])))
        return shard

    @property
    def first_segment(self) -> int:
        """The shard of its line's first segment (whose part holds the joined line); itself when whole lines."""
        return self.index - self.segment[0] if self.segment is not None else self.index


Splitter = Callable[[ManifestItem], "list[Span] | None"]


def plan_shards(items: Iterable[ManifestItem], shard_seconds: float, split: Splitter | None = None) -> list[Shard]:
    """Cut the item stream into shards once a shard reaches `shard_seconds`; a line that `split`
    cuts into spans becomes one shard per span, after the shard before it is closed."""
    shards: list[Shard] = []
    first = last = count = 0
    seconds = 0.0
    for item in items:
        spans = split(item) if split is not None else None
        if spans:
            if count:
                shards.append(Shard(len(shards), first, last, count, seconds))
                count, seconds = 0, 0.0
            for k, span in enumerate(spans):
                seg = Shard(len(shards), item.line, item.line, 1, span.end - span.start, span, (k, len(spans)))
                shards.append(seg)
            continue
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
) -> Iterator[tuple[Shard, list[ManifestItem | SegmentItem]]]:
    """One streaming pass over the manifest, yielding the items of each wanted shard in order
    (a segment shard: its line's item as a `SegmentItem`)."""
    it = iter(items)
    pending: list[ManifestItem] = []
    line_item: ManifestItem | None = None  # the split line whose segments are being yielded
    for shard in shards:
        if shard.span is not None and line_item is not None and line_item.line == shard.first_line:
            batch = [line_item]
        else:
            batch = [item for item in _until(it, pending, shard.last_line) if item.line >= shard.first_line]
        if shard.span is not None and shard.segment is not None:
            line_item = batch[0]
            batch = [SegmentItem(line_item, shard.span, *shard.segment)]
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
    split: SplitFigures = field(default_factory=SplitFigures)  # what splitting long lines cost now

    def segments_of(self, shard: Shard) -> list[Shard]:
        """Every segment shard of `shard`'s line (`shard` must be a segment shard)."""
        first = shard.first_segment
        return self.shards[first : first + shard.segment[1]]

    @property
    def split_lines(self) -> list[int]:
        """The first segment shard of every split line."""
        return [s.index for s in self.shards if s.segment is not None and s.segment[0] == 0]


def expected_workers(spec: JobSpec, address: str | None) -> int | None:
    """How many workers the job will start, when the driver can tell before Ray starts: the spec's, or one
    per `threads_per_worker` CPUs of this machine for a local cluster; None on a cluster not yet joined."""
    if spec.workers:
        return spec.workers
    if address is None and not os.environ.get("RAY_ADDRESS"):
        return max(1, (os.cpu_count() or 1) // spec.threads_per_worker)
    return None


def prepare(spec: JobSpec, recorded: dict | None = None, workers: int | None = None) -> Plan:
    """Validate every manifest line and plan shards; raises `ManifestError` (exit 2) first.

    `recorded` (a resumed job's `job.json`): its plan is reused when the manifest is the one it was
    made from, so the plan never moves because a file became readable (an unreadable file weighs
    0 s when the plan is made; once repaired it would weigh its length and move every boundary
    after it). Audio headers are then not read at all. `workers`: how many the job will have, when known
    (a long line's segments then come in whole rounds of them).
    """
    sha = file_sha256(spec.manifest)
    shards = _recorded_shards(recorded, sha)
    counts = {"items": 0, "seconds": 0.0, "with_text": 0}
    figures = SplitFigures()

    def split(item: ManifestItem) -> list[Span] | None:
        if not spec.split_seconds or item.duration is None or item.duration <= spec.split_seconds:
            return None
        t0 = time.perf_counter()
        spans = split_line(item, spec.segment_seconds, SPLIT_SEARCH_SECONDS, figures, workers)
        figures.seconds += time.perf_counter() - t0
        return spans

    def counted():
        items = iter_manifest(spec.manifest, read_missing_durations=shards is None)
        for item in check_unique_ids(items, spec.manifest):
            counts["items"] += 1
            counts["seconds"] += item.duration or 0.0
            counts["with_text"] += item.text is not None
            yield item

    if shards is None:
        shards = plan_shards(counted(), spec.shard_seconds, split)
    else:
        for _ in counted():
            pass
        counts["seconds"] = sum(s.seconds for s in shards)
        cuts = [s.span.cut for s in shards if s.span is not None]  # the split the recorded plan made (not timed now)
        figures = SplitFigures(cuts.count("end"), len(cuts), cuts.count("pause"), cuts.count("forced"))
    if not shards:
        raise InputError(f"{spec.manifest}: the manifest has no items")
    return Plan(shards, counts["items"], counts["seconds"], counts["with_text"], sha, figures)


def _recorded_shards(recorded: dict | None, manifest_sha256: str) -> list[Shard] | None:
    """The shards `job.json` planned, if it was planned from this very manifest (else the
    fingerprint check refuses the resume, naming what changed)."""
    try:
        if recorded is None or recorded["fingerprint"]["manifest_sha256"] != manifest_sha256:
            return None
        return [Shard.from_list(row) for row in recorded["plan"]]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
