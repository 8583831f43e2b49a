"""Split lines on the driver: each segment's frames kept in `segments/`, then the line joined into one row.

A long line's segments are shards of their own (`runner.job.shards`), transcribed on any worker into
frames: the best class and the confidence of each output frame of their span (`worker.transcribe_segment`).
The driver writes each as `segments/seg-NNNNN.parquet` (atomically, with page CRCs and a digest, like the
parts), so a resume or a retry recomputes only the segments that are missing, damaged or failed. Once every
segment of a line is there, `LineJoiner` decodes the line's frames in one pass, exactly as if the whole file
had been one utterance (text, words in file time, confidence), and the row goes to the part of the line's
first segment shard, with the spans in its `segments` column (where the cuts fell, and how).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import RunnerError
from runner.job.run_folder import (
    DIGEST_KEY,
    META_KEY,
    part_is_valid,
    read_part,
    rows_digest,
    write_atomic,
    write_checked,
    write_part,
)
from runner.job.shards import Plan, Shard

log = logging.getLogger(__name__)


class SegmentsLost(RunnerError):
    """A line's segment files went missing between being written and the join (exit 1; --resume redoes them)."""


SEGMENTS_DIR = "segments"
SEGMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the line's
        ("audio_filepath", pa.string()),
        ("offset", pa.float64()),  # the line's offset in the file
        ("reference", pa.string()),  # the line's reference text
        ("shard", pa.int32()),
        ("segment", pa.int32()),  # its number in the line, from 0
        ("segments", pa.int32()),  # the line's segment count
        ("start", pa.float64()),  # seconds from the line's start
        ("end", pa.float64()),
        ("cut", pa.string()),  # how it ends: pause | forced | end
        ("duration", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("first_frame", pa.int64()),  # the line's output frame its first frame is
        ("best", pa.list_(pa.int32())),  # the best class of each output frame of the span
        ("frame_confidence", pa.list_(pa.float32())),  # their confidence (null without words)
    ]
)


def segment_path(out: Path, shard: int) -> Path:
    return out / SEGMENTS_DIR / f"seg-{shard:05d}.parquet"


def write_segment(out: Path, shard: int, row: dict, metadata: dict | None = None) -> Path:
    """`segments/seg-NNNNN.parquet`, checked as a part is (`run_folder.write_checked`: page CRCs, digest),
    with `metadata` (the worker and engine that made it) in the footer."""
    return write_checked(segment_path(out, shard), pa.Table.from_pylist([row], schema=SEGMENT_SCHEMA), metadata)


def read_segment(out: Path, shard: int) -> tuple[dict, dict] | None:
    """(the segment's row, what `write_segment` recorded about it) when its file reads in full (page CRCs),
    matches its digest and is this shard's; else None (the segment is recomputed)."""
    path = segment_path(out, shard)
    try:
        footer = pq.ParquetFile(path).schema_arrow.metadata or {}
        table = pq.read_table(path, schema=SEGMENT_SCHEMA, page_checksum_verification=True)
        metadata = json.loads(footer.get(META_KEY, b"{}"))
    except Exception:  # noqa: BLE001 - missing, cut short, flipped bytes: not a finished segment
        return None
    digest = footer.get(DIGEST_KEY, b"").decode()
    if table.num_rows != 1 or digest != rows_digest(table) or table["shard"][0].as_py() != shard:
        return None
    return table.to_pylist()[0], metadata


def remove_segment_temporaries(out: Path) -> None:
    folder = out / SEGMENTS_DIR
    if folder.is_dir():
        for tmp in folder.glob(".seg-*.parquet.*.tmp"):
            tmp.unlink(missing_ok=True)


class LineJoiner:
    """The frames of a line's segments -> the line's row (Parquet schema): text, words, confidence, spans.

    Built on the driver from what the workers got (`model_spec`), with the job's confidence method."""

    def __init__(self, spec, confidence) -> None:
        from runner.model.decoding import TextDecoder
        from runner.model.transcribe import frame_seconds
        from runner.model.words import WordAligner

        self.text = TextDecoder.from_spec(spec)
        self.aligner = WordAligner(self.text, frame_seconds(spec), confidence) if confidence is not None else None

    def join(self, rows: list[dict], shard: int) -> dict:
        """One row for the line whose segment rows (all of them, any order) are `rows`; `shard`: its part."""
        import torch

        from runner.model.decoding import collapse

        rows = sorted(rows, key=lambda r: r["segment"])
        head = rows[0]
        offset = head["offset"] or 0.0
        line = {
            "id": head["id"],
            "audio_filepath": head["audio_filepath"],
            "offset": head["offset"],
            "duration": rows[-1]["end"],
            "text": None,
            "reference": head["reference"],
            "status": "ok",
            "error": None,
            "shard": shard,
            "words": None,
            "confidence": None,
            "segments": [{"start": offset + r["start"], "end": offset + r["end"], "cut": r["cut"]} for r in rows],
        }
        failed = [r for r in rows if r["status"] != "ok"]
        if failed:
            line.update(status="error", error=_why(head, failed, len(rows)))
            return line
        best = torch.tensor([b for r in rows for b in r["best"]], dtype=torch.long)
        scores = [r["frame_confidence"] for r in rows]
        confidence = None if any(s is None for s in scores) else torch.tensor([c for s in scores for c in s])
        line["text"] = self.text(collapse(best, self.text.blank_id))
        if self.aligner is not None:
            line["words"], line["confidence"] = self.aligner.words(best, confidence, offset)
        return line


def _why(head: dict, failed: list[dict], count: int) -> str:
    """The line's error: its id and path once, then each failed segment's reason (the same reason once)."""
    prefix = f"id {head['id']} ({head['audio_filepath']}): "
    reasons: dict[str, list[str]] = {}
    for r in failed:
        label = f"{r['segment'] + 1} ({r['start']:.2f}-{r['end']:.2f} s)"
        reasons.setdefault((r["error"] or "failed").removeprefix(prefix), []).append(label)
    parts = []
    for reason, labels in reasons.items():
        if len(labels) == count:
            parts.append(f"all {count} segments: {reason}")
        else:
            more = f" and {len(labels) - 3} more" if len(labels) > 3 else ""
            which = "segment" if len(labels) == 1 else "segments"
            parts.append(f"{which} {', '.join(labels[:3])}{more} of {count}: {reason}")
    return prefix + "; ".join(parts)


def line_norms(pool, plan: Plan, todo: list[int], spec, model, totals) -> dict:
    """The log-mel statistics of each split line with segments in `todo` (first segment shard -> `LineNorm`),
    from `segments/norm-NNNNN.json` when an earlier run wrote it, else summed over all the line's segments
    on the workers at once (`worker.segment_feature_sums`: reading and log-mel only) and written there.
    Empty when the model (`ModelSpec`) normalizes nothing; a line whose sums failed gets None (its segments
    then normalize on their own, and those that cannot be read fail with the reason). The workers' seconds
    count in `totals` (a `RunTotals`), their audio does not (it is transcribed next)."""
    from runner.inputs.manifest import iter_manifest
    from runner.job.shards import group_items
    from runner.model.features import LineNorm

    t0 = time.perf_counter()
    out, kind = Path(spec.output), model.features.normalize
    lines = sorted({plan.shards[i].first_segment for i in todo if plan.shards[i].segment is not None})
    if kind not in ("per_feature", "all_features") or not lines:
        return {}
    norms = {first: _read_norm(out, first) for first in lines}
    need = {s.index for first, norm in norms.items() if norm is None for s in plan.segments_of(plan.shards[first])}
    if not need:
        return norms
    sums: dict[int, dict[int, object]] = {}

    def calls():
        for shard, batch in group_items(iter_manifest(spec.manifest, read_missing_durations=False), plan.shards, need):
            yield shard, [dataclasses.replace(batch[0], sums_only=True)]

    for shard, rows, result in pool.map(calls()):
        totals.add_shard(dataclasses.replace(result, audio_seconds=0.0), 0.0)
        got = sums.setdefault(shard.first_segment, {})
        got[shard.index] = rows[0].get("sums") if rows[0]["status"] == "ok" else None
        if len(got) < shard.segment[1]:
            continue
        if any(v is None for v in got.values()):
            log.warning(
                "line %d (%s): the log-mel statistics of some segments failed; its segments normalize on their own",
                shard.first_line,
                rows[0]["audio_filepath"],
            )
            norms[shard.first_segment] = None
            continue
        norm = LineNorm.combine([got[i] for i in sorted(got)], kind)
        write_atomic(_norm_path(out, shard.first_segment), json.dumps(dataclasses.asdict(norm)).encode())
        norms[shard.first_segment] = norm
    if totals.split is not None:
        totals.split["line_stats_seconds"] = round(time.perf_counter() - t0, 3)
    return norms


def _norm_path(out: Path, first: int) -> Path:
    return out / SEGMENTS_DIR / f"norm-{first:05d}.json"


def _read_norm(out: Path, first: int):
    from runner.model.features import LineNorm

    try:
        data = json.loads(_norm_path(out, first).read_text())
        norm = LineNorm(tuple(map(float, data["mean"])), tuple(map(float, data["std"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return norm if len(norm.mean) == len(norm.std) > 0 else None


def segments_to_run(out: Path, plan: Plan, parts: dict[int, Path], retry_errors: bool) -> list[int]:
    """The segment shards to run: of each split line not yet joined, those without a valid file in
    `segments/`; with `retry_errors`, of each line joined as an error, also the failed ones."""
    todo = []
    for first in plan.split_lines:
        segments = plan.segments_of(plan.shards[first])
        path = parts.get(first)
        joined = path is not None and part_is_valid(path, first, 1)
        if path is not None and not joined:
            log.warning("part %s is damaged or incomplete; joining line %d again", path.name, segments[0].first_line)
        if joined and (not retry_errors or read_part(path, ["status"])["status"][0].as_py() == "ok"):
            continue
        rows = [read_segment(out, s.index) for s in segments]
        redo = [s.index for s, r in zip(segments, rows) if r is None or (retry_errors and r[0]["status"] != "ok")]
        # every segment in but the line not joined (the driver stopped in between): one is run again, and
        # the line is joined when it returns
        todo += redo or [segments[-1].index]
    return todo


def rewritten_parts(plan: Plan, todo: list[int]) -> set[int]:
    """The parts `todo` rewrites: its shards', and the joined part of each line with a segment in it."""
    return set(todo) | {plan.shards[i].first_segment for i in todo}


class SplitLines:
    """The split lines with segments in `todo`: each segment's file written as it returns, the line joined
    (and its part written) when its last one is in."""

    def __init__(self, out: Path, plan: Plan, todo: list[int], model, confidence) -> None:
        self.out, self.plan = out, plan
        self.waiting: dict[int, set[int]] = {}  # first segment shard of a line -> its segments still to come
        for i in todo:
            if plan.shards[i].segment is not None:
                self.waiting.setdefault(plan.shards[i].first_segment, set()).add(i)
        self.joiner = None
        if self.waiting:
            self.joiner = LineJoiner(model, confidence)

    def add(self, shard: Shard, row: dict, metadata: dict) -> list[dict]:
        """Keep a returned segment; once it is its line's last, the line's row (written to its part)."""
        write_segment(self.out, shard.index, row, metadata)
        first = shard.first_segment
        self.waiting[first].discard(shard.index)
        if self.waiting[first]:
            return []
        del self.waiting[first]
        segments = self.plan.segments_of(shard)
        read = [read_segment(self.out, s.index) for s in segments]
        if any(r is None for r in read):  # a segment file lost under our feet: the next --resume redoes it
            missing = [s.index for s, r in zip(segments, read) if r is None]
            raise SegmentsLost(
                f"segment files of shards {missing} are missing or damaged in {self.out}; run again with --resume"
            )
        rows, made = [r[0] for r in read], [r[1] for r in read]
        line = self.joiner.join(rows, first)
        record = {key: sorted({m[key] for m in made if m.get(key)}) for key in ("worker", "engine")}
        write_part(
            self.out,
            first,
            [line],
            {"joined_segments": len(rows), "workers": record["worker"], "engines": record["engine"]},
        )
        return [line]


def model_spec(payload):
    """The model spec the workers were sent (to decode the joined lines with its vocabulary)."""
    from runner.model.arch import ModelSpec

    if hasattr(payload, "artifact"):
        from runner.int8.artifact import Artifact

        return Artifact.from_bytes(payload.artifact).spec
    return ModelSpec.from_dict(payload.spec)
