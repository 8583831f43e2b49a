"""Long recordings cut into segments at pauses, so one file can use every worker.

A manifest line longer than `split_seconds` becomes segments of about `segment_seconds`. Each cut
is looked for within `search` seconds of its target: the longest pause there (a run of quiet
10 ms frames, at least MIN_PAUSE_SECONDS long) wins, nearest to the target on a tie, and the cut
goes to its middle. Where that stretch holds no pause (music, crosstalk, one long run of speech)
the cut is forced at the target; workers encode every segment with `context` seconds of the audio
on each side and keep only their own frames, and the driver decodes the frames of all segments of
a line in one pass, so even a forced cut splits no word and loses no frame (`runner.job.segments`).

The detector is energy-based: per 10 ms frame, the mean square of the samples in decibels; a frame
is quiet when it lies in the lower QUIET_SHARE of the stretch's own dynamic range (10th to 95th
percentile) and at least MIN_DROP_DB below its speech level. It needs no model, reads only
2 x `search` seconds of audio per cut (the driver does this when it plans the job, seeking in the
file), and is measured against silero-vad in benchmarks/split_points.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from runner.inputs.manifest import ManifestItem

FRAME_SECONDS = 0.01  # energy frames: 10 ms hop, 20 ms window
MIN_PAUSE_SECONDS = 0.15  # shorter quiet runs are stops inside words ("p", "t", "k")
QUIET_SHARE = 0.3  # quiet: the lower 30% of the stretch's dynamic range...
MIN_DROP_DB = 12.0  # ...and at least 12 dB under its speech level (95th percentile)
CUT_KINDS = ("pause", "forced", "end")  # how a segment ends: in a pause, at its target, at the line's end


@dataclass(frozen=True)
class Span:
    """One segment of a line: seconds from the line's start (its `offset` excluded) and how it ends."""

    start: float
    end: float
    cut: str  # CUT_KINDS


@dataclass(frozen=True)
class SegmentItem:
    """What a worker is sent for one segment: the line's item and the segment's span in it."""

    item: ManifestItem
    span: Span
    index: int  # the segment's number in its line, from 0
    count: int  # segments in the line
    norm: Any = None  # the line's log-mel statistics (`runner.model.features.LineNorm`); None: the segment's own
    sums_only: bool = False  # only what its frames add to those statistics (`worker.segment_feature_sums`)

    @property
    def id(self) -> str:
        return self.item.id

    @property
    def audio_filepath(self) -> str:
        return self.item.audio_filepath

    @property
    def line(self) -> int:
        return self.item.line

    @property
    def duration(self) -> float:
        """The segment's own seconds (what its time limit and the throughput count)."""
        return self.span.end - self.span.start

    @property
    def label(self) -> str:
        return f"segment {self.index + 1} of {self.count} ({self.span.start:.2f}-{self.span.end:.2f} s)"


@dataclass
class SplitFigures:
    """What splitting cost at plan time: lines split, segments, cuts at pauses / forced, seconds."""

    lines: int = 0
    segments: int = 0
    at_pause: int = 0
    forced: int = 0
    unreadable: int = 0  # lines whose audio could not be read at plan time: cut at the targets
    scanned_audio_seconds: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["seconds"] = round(self.seconds, 3)
        d["scanned_audio_seconds"] = round(self.scanned_audio_seconds, 3)
        return d


def targets(duration: float, segment_seconds: float, workers: int | None = None) -> list[float]:
    """Evenly spaced cut targets: ceil(duration / segment_seconds) segments of equal length; with `workers`
    (when there are at least as many segments), rounded up to a multiple of them, so that the last round
    of segments keeps every worker busy (16 min on 2 workers: 10 segments of 96 s, not 9 of 107 s)."""
    count = max(1, math.ceil(duration / segment_seconds - 1e-9))
    if workers and count >= workers > 1:
        count = math.ceil(count / workers) * workers
    return [duration * k / count for k in range(1, count)]


def pause_cut(samples: np.ndarray, rate: int, target: int) -> int | None:
    """The sample where to cut mono `samples` (target at index `target`): the middle of the longest
    pause (nearest the target on a tie), or None when the stretch holds no pause."""
    hop = max(1, int(rate * FRAME_SECONDS))
    frames = (len(samples) - hop) // hop
    if frames < 3:
        return None
    x = samples[: (frames + 1) * hop].astype(np.float64)
    power = (x[: frames * hop].reshape(frames, hop) ** 2).mean(1) + (x[hop:].reshape(frames, hop) ** 2).mean(1)
    db = 10.0 * np.log10(power / 2 + 1e-12)
    low, speech = np.percentile(db, 10), np.percentile(db, 95)
    if speech - low < MIN_DROP_DB:
        return None  # one level throughout: all speech, all music, or all silence
    quiet = (db <= low + QUIET_SHARE * (speech - low)) & (db <= speech - MIN_DROP_DB)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], quiet.astype(np.int8), [0]))))
    runs = edges.reshape(-1, 2)  # [first, end) frame of each quiet run
    runs = runs[(runs[:, 1] - runs[:, 0]) * FRAME_SECONDS >= MIN_PAUSE_SECONDS]
    if not len(runs):
        return None
    middles = (runs[:, 0] + runs[:, 1]) * hop // 2 + hop // 2
    lengths = runs[:, 1] - runs[:, 0]
    best = min(range(len(runs)), key=lambda i: (-lengths[i], abs(int(middles[i]) - target)))
    return int(middles[best])


def split_line(
    item: ManifestItem, segment_seconds: float, search: float, figures: SplitFigures, workers: int | None = None
) -> list[Span]:
    """The spans of one long line (its `duration` known), cut at pauses where there are any; `workers`: how
    many will share the segments, when known (see `targets`)."""
    duration = float(item.duration or 0.0)
    cuts: list[tuple[float, str]] = []
    search = min(search, segment_seconds / 4)
    try:
        with sf.SoundFile(item.audio_filepath) as f:
            rate = f.samplerate
            for target in targets(duration, segment_seconds, workers):
                lo, hi = max(0.0, target - search), min(duration, target + search)
                first = int(round((item.offset + lo) * rate))
                f.seek(first)
                block = f.read(frames=int(round((hi - lo) * rate)), dtype="float32", always_2d=True).mean(axis=1)
                figures.scanned_audio_seconds += len(block) / rate
                at = pause_cut(block, rate, int(round((target - lo) * rate)))
                cuts.append((target, "forced") if at is None else (lo + at / rate, "pause"))
    except Exception:  # noqa: BLE001 - unreadable here: the workers will say why, per segment
        figures.unreadable += 1
        cuts = [(t, "forced") for t in targets(duration, segment_seconds, workers)]
    spans, start = [], 0.0
    for at, kind in cuts:
        if at > start:  # two pauses found for neighbouring targets can coincide only when segments are tiny
            spans.append(Span(round(start, 6), round(at, 6), kind))
            start = at
    spans.append(Span(round(start, 6), duration, "end"))
    figures.lines += 1
    figures.segments += len(spans)
    figures.at_pause += sum(s.cut == "pause" for s in spans)
    figures.forced += sum(s.cut == "forced" for s in spans)
    return spans
