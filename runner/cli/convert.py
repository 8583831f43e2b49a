"""`asr-runner convert RUN --to srt|vtt|ctm|manifest --out DIR`: a run's transcripts in the formats people
deliver: subtitles (one SRT or WebVTT file per audio file), NIST CTM or a NeMo JSONL manifest.

Reads the run folder, checks the format can be made from it, writes into DIR and says what it wrote and
what it skipped (error rows, rows without word timestamps); the formats themselves are `runner.export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.errors import InputError
from runner.export import CueRules, RunRows, Skipped, Written, read_run, write_ctm, write_manifest, write_subtitles

FORMATS = ("srt", "vtt", "ctm", "manifest")
LISTED_SKIPS = 20  # skipped rows named one by one; the rest are counted


@dataclass(frozen=True)
class Conversion:
    run: Path
    out: Path
    format: str
    written: Written
    skipped: tuple[Skipped, ...]  # error rows, then ok rows the format could not use
    warning: str | None  # the run is unfinished


def convert(run: Path, to: str, out: Path, rules: CueRules = CueRules()) -> Conversion:
    """Convert run folder `run` to format `to` in folder `out` (created); `InputError` (exit 2) naming the
    run when it is not one, has no row to convert, or lacks the word timestamps `to` needs."""
    if to not in FORMATS:
        raise InputError(f"--to {to}: not a format; choose one of {', '.join(FORMATS)}")
    rows = read_run(Path(run))
    errors = rows.errors()
    _check_convertible(rows, to, errors)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: a file, not a folder; give a folder for the {to} files")
    out.mkdir(parents=True, exist_ok=True)
    written = _write(rows, to, out, rules)
    warning = rows.incomplete()
    if warning:
        warning += f": converted the rows it has; finish the job (`asr-runner run JOB.yaml --out {run} --resume`)"
    return Conversion(rows.path, out, to, written, tuple(errors) + written.skipped, warning)


def _check_convertible(rows: RunRows, to: str, errors: list[Skipped]) -> None:
    if rows.ok().num_rows == 0:
        first = f" (the first, {errors[0].id}: {errors[0].reason})" if errors else ""
        raise InputError(
            f"{rows.path}: no row to convert: all {len(errors)} rows have status error{first}; fix the inputs "
            f"and re-run them (`asr-runner run JOB.yaml --out {rows.path} --retry-errors`)"
        )
    if to != "manifest" and not rows.has_words():
        raise InputError(
            f"{rows.path}: the run has no word timestamps (it ran with `timestamps: false`), which {to} needs; "
            "run the job again with `timestamps: true` in its spec (into a new --out), "
            "or convert this run `--to manifest` (transcripts without word times)"
        )


def _write(rows: RunRows, to: str, out: Path, rules: CueRules) -> Written:
    name = rows.path.resolve().name
    if to == "ctm":
        return write_ctm(rows, out / f"{name}.ctm")
    if to == "manifest":
        return write_manifest(rows, out / f"{name}.jsonl")
    return write_subtitles(rows, out, to, rules)


def summary(c: Conversion) -> str:
    """One line: the files, rows and words written, the rows skipped."""
    w = c.written
    where = f"{w.files[0]}" if len(w.files) == 1 else f"{len(w.files)} {c.format} files to {c.out}"
    skipped = f"; skipped {len(c.skipped)} row{'s' if len(c.skipped) != 1 else ''}" if c.skipped else ""
    return f"wrote {where} ({w.utterances} utterances, {w.words} words){skipped}"


def skipped_lines(c: Conversion, limit: int = LISTED_SKIPS) -> list[str]:
    """The skipped rows, one line each (id, audio file, reason), the first `limit` of them."""
    lines = [f"skipped {s.id} ({s.audio_filepath}): {s.reason}" for s in c.skipped[:limit]]
    if len(c.skipped) > limit:
        lines.append(f"... and {len(c.skipped) - limit} more skipped rows")
    return lines
