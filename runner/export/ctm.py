"""NIST CTM: one line per word, `<file-id> <channel> <start> <duration> <word> <confidence>`.

The file id is the audio file's name from `runner.export.names.file_ids` (the stem, whitespace as `_`,
a hash suffix where two files share it); the channel is `1`; start and duration in seconds with three
decimals (start in the audio file, the row's offset included); a word whose end is not after its start
lasts `MIN_WORD_SECONDS`; whitespace inside a word becomes `_`; the confidence in [0, 1] with four
decimals, left out (the field is optional) for a word without one. Lines are sorted by file id, then
start, as sclite expects. One file for the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from runner.export.names import file_ids
from runner.export.output import write_lines
from runner.export.rows import MIN_WORD_SECONDS, NO_WORDS, RunRows, Skipped, Word, Written

CHANNEL = "1"


def ctm_line(file_id: str, word: Word) -> str:
    start = max(0, round(word.start * 1000))
    end = max(round(word.end * 1000), start + round(MIN_WORD_SECONDS * 1000))
    line = f"{file_id} {CHANNEL} {start / 1000:.3f} {(end - start) / 1000:.3f} {'_'.join(word.word.split())}"
    return line if word.confidence is None else f"{line} {min(1.0, max(0.0, word.confidence)):.4f}"


def write_ctm(run: RunRows, target: Path) -> Written:
    """The run's words as one CTM file at `target`; rows without word timestamps are skipped (reported)."""
    skipped: list[Skipped] = []
    rows = [0]

    def lines() -> Iterator[str]:
        names = file_ids(run.audio_files())
        for path, utterances in run.by_audio_file(sorted(names, key=lambda p: (names[p], p))):
            skipped.extend(Skipped(u.id, u.audio_filepath, NO_WORDS) for u in utterances if u.words is None)
            timed = [u for u in utterances if u.words is not None]
            rows[0] += len(timed)
            words = sorted((w for u in timed for w in u.words if w.word.strip()), key=lambda w: (w.start, w.end))
            yield from (ctm_line(names[path], w) for w in words)

    count = write_lines(target, lines())
    return Written((target,), rows[0], count, tuple(skipped))
