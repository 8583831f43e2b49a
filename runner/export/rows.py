"""A run folder's rows, read for export: which rows are ok, which were skipped and why, grouped per audio file.

The rows stay in one Arrow table (columnar, compact); Python objects are made one audio file (or one
batch) at a time, so a run of a million utterances is never held as a million dicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import InputError
from runner.job.run_folder import JOB_FILE, PARTS_DIR, SCHEMA, SUCCESS_FILE, existing_parts, read_rows

MIN_WORD_SECONDS = 0.02  # how long a word lasts whose end is not after its start (shorter than any CTC frame)
NO_WORDS = "no word timestamps (transcribed with `timestamps: false`)"  # why an ok row is left out of srt/vtt/ctm


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds in the audio file (the row's offset included)
    end: float
    confidence: float | None  # in [0, 1]


@dataclass(frozen=True)
class Utterance:
    """One ok row: a segment of `audio_filepath` starting `offset` seconds into it."""

    id: str
    audio_filepath: str
    offset: float
    duration: float
    text: str  # the hypothesis
    reference: str | None  # the manifest's `text`
    words: tuple[Word, ...] | None  # None: the job ran with `timestamps: false`
    confidence: float | None  # the utterance's


@dataclass(frozen=True)
class Skipped:
    """A row left out of an export, and why."""

    id: str
    audio_filepath: str
    reason: str


@dataclass(frozen=True)
class Written:
    """What one export wrote."""

    files: tuple[Path, ...]
    utterances: int  # rows written
    words: int
    skipped: tuple[Skipped, ...] = ()  # ok rows the format could not use (no word timestamps)


@dataclass(frozen=True)
class RunRows:
    path: Path
    table: pa.Table  # every row of the run's parts, in run order (shard, then row)
    parts: int  # parts written
    planned: int | None  # parts the job plans (None: job.json holds no plan)
    finished: bool  # `_SUCCESS` is there

    def incomplete(self) -> str | None:
        """Why this run is not a finished one (None when it is)."""
        if self.finished:
            return None
        written = f"{self.parts} of {self.planned} parts written" if self.planned else f"{self.parts} parts written"
        return f"{self.path} is unfinished (no {SUCCESS_FILE}; {written})"

    def errors(self) -> list[Skipped]:
        """Rows with status error: they have no transcript to export."""
        rows = self.table.filter(pc.not_equal(self.table["status"], "ok"))
        return [
            Skipped(r["id"], r["audio_filepath"], f"status {r['status']}: {r['error'] or 'no reason recorded'}")
            for r in rows.select(["id", "audio_filepath", "status", "error"]).to_pylist()
        ]

    def ok(self) -> pa.Table:
        return self.table.filter(pc.equal(self.table["status"], "ok"))

    def has_words(self) -> bool:
        """Whether any ok row carries word timestamps (the job ran with `timestamps: true`)."""
        ok = self.ok()
        return ok.num_rows > ok["words"].null_count

    def utterances(self, batch_rows: int = 4096) -> Iterator[Utterance]:
        """The ok rows in run order."""
        for batch in self.ok().to_batches(max_chunksize=batch_rows):
            yield from (_utterance(row) for row in batch.to_pylist())

    def audio_files(self) -> list[str]:
        """The distinct audio files of the ok rows, sorted."""
        return sorted(pc.unique(self.ok()["audio_filepath"]).to_pylist())

    def by_audio_file(self, order: list[str] | None = None) -> Iterator[tuple[str, list[Utterance]]]:
        """Each audio file (in `order`, default sorted by path) with its ok rows ordered by offset (the
        segments of one recording, whichever shards they are in)."""
        table = self.ok().sort_by([("audio_filepath", "ascending"), ("offset", "ascending"), ("id", "ascending")])
        paths = table["audio_filepath"].to_pylist()
        spans, start = {}, 0
        for end in range(1, len(paths) + 1):
            if end == len(paths) or paths[end] != paths[start]:
                spans[paths[start]] = (start, end - start)
                start = end
        for path in sorted(spans) if order is None else order:
            yield path, [_utterance(r) for r in table.slice(*spans[path]).to_pylist()]


def read_run(path: Path) -> RunRows:
    """The rows of the run folder `path`; `InputError` (exit 2) naming it if it is not a run or holds no part.

    An unfinished run (no `_SUCCESS`) is read as it is: `RunRows.incomplete()` says so."""
    path = Path(path)
    if not (path / JOB_FILE).is_file():
        raise InputError(
            f"{path}: not a run folder (no {JOB_FILE}); give the --out folder of an `asr-runner run` (e.g. runs/my-job)"
        )
    planned = _planned(path)
    parts = existing_parts(path)
    if not parts:
        raise InputError(
            f"{path}: the run has no transcripts yet (no part in {path / PARTS_DIR}); run the job "
            f"(`asr-runner run JOB.yaml --out {path} --resume`), then convert"
        )
    table = _with_word_columns(read_rows(path))
    return RunRows(path, table, len(parts), planned, (path / SUCCESS_FILE).is_file())


def _planned(path: Path) -> int | None:
    try:
        job = json.loads((path / JOB_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path / JOB_FILE}: not readable as JSON ({exc}); is {path} a run folder?") from None
    plan = job.get("plan") if isinstance(job, dict) else None
    return len(plan) if isinstance(plan, list) else None


def _with_word_columns(table: pa.Table) -> pa.Table:
    """Runs made before word timestamps existed have no `words`/`confidence` columns: all null then."""
    for name in ("words", "confidence"):
        if name not in table.column_names:
            field = SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table


def _utterance(row: dict) -> Utterance:
    words = row["words"]
    return Utterance(
        id=row["id"],
        audio_filepath=row["audio_filepath"],
        offset=row["offset"] or 0.0,
        duration=row["duration"] or 0.0,
        text=row["text"] or "",
        reference=row["reference"],
        words=None if words is None else tuple(Word(**w) for w in words),
        confidence=row["confidence"],
    )
