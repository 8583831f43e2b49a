"""Subtitle cues from timed words, by the rules of the field's subtitle writers.

whisper's `WriteSRT` (and WhisperX's copy of it) with `max_line_width=42, max_line_count=2` fills a cue
word by word while the words fit in its lines, and starts a new cue after a long pause. We do the same,
with the limits broadcasters set (Netflix: 42 characters a line, 2 lines, at most 7 s, at least 5/6 s):

- a cue never splits a word; its words, in time order, are joined by single spaces;
- at most `max_lines` lines of at most `max_line_width` characters (a single longer word stands alone);
  the words fill a cue while they fit, then its text is broken into the most even lines (of equally even
  ones, the one with the shorter line on top);
- at most `max_duration` seconds from its first word's start to its last word's end (a single longer
  word stands alone);
- a silence longer than `pause` between two words starts a new cue (whisper: 3 s; CTC word times are
  tight, so a shorter pause is already a real one), and so does a word ending a sentence (`. ? !`);
- times are whole milliseconds; a word whose end is not after its start lasts `min_word`; a cue starts
  no earlier than the previous one ends, ends at the latest where the next one starts, and a cue shorter
  than `min_duration` is held on screen up to that where the next cue leaves room.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from runner.export.rows import MIN_WORD_SECONDS, Word

SENTENCE_END = re.compile(r"[.!?\u2026]['\")\]\u00bb\u201d\u2019]*$")  # a closing quote or bracket may follow


@dataclass(frozen=True)
class CueRules:
    max_line_width: int = 42  # characters a line (Netflix; whisper users pass --max_line_width 42)
    max_lines: int = 2  # lines a cue
    max_duration: float = 7.0  # seconds from a cue's first word's start to its last word's end
    pause: float = 1.5  # seconds of silence between two words that start a new cue
    min_duration: float = 0.8  # seconds a short cue is held where the next leaves room (Netflix: 5/6 s)
    min_word: float = MIN_WORD_SECONDS  # seconds a word lasts whose end is not after its start

    def __post_init__(self) -> None:
        if self.max_line_width < 1 or self.max_lines < 1:
            raise ValueError(f"max_line_width and max_lines must be >= 1, got {self.max_line_width}, {self.max_lines}")
        if min(self.max_duration, self.pause, self.min_word) <= 0 or self.min_duration < 0:
            raise ValueError("max_duration, pause and min_word must be > 0 and min_duration >= 0 (seconds)")


@dataclass(frozen=True)
class Cue:
    start_ms: int
    end_ms: int  # > start_ms
    lines: tuple[str, ...]
    words: tuple[Word, ...]  # the words shown, in order

    @property
    def text(self) -> str:
        return " ".join(self.lines)


@dataclass(frozen=True)
class _Timed:
    text: str
    start: int  # ms
    end: int  # ms, > start
    word: Word


def build_cues(words: Iterable[Word], rules: CueRules = CueRules()) -> list[Cue]:
    """The cues showing `words` (of one audio file, any order) by `rules`: every word once, in time order."""
    timed = sorted((_timed(w, rules) for w in words if w.word.strip()), key=lambda t: (t.start, t.end, t.word.start))
    groups: list[list[_Timed]] = []
    for t in timed:
        if groups and _joins(groups[-1], t, rules):
            groups[-1].append(t)
        else:
            groups.append([t])
    return _cues(groups, rules)


def _timed(w: Word, rules: CueRules) -> _Timed:
    start = _ms(w.start)
    return _Timed(" ".join(w.word.split()), start, max(_ms(w.end), start + max(1, _ms(rules.min_word))), w)


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _joins(cue: list[_Timed], t: _Timed, rules: CueRules) -> bool:
    """Whether word `t` goes on in `cue` rather than starting the next one."""
    last_end = max(x.end for x in cue)
    return (
        not SENTENCE_END.search(cue[-1].text)
        and t.start - last_end <= _ms(rules.pause)
        and max(last_end, t.end) - cue[0].start <= _ms(rules.max_duration)
        and len(_fill([x.text for x in cue] + [t.text], rules.max_line_width)) <= rules.max_lines
    )


def _fill(texts: list[str], width: int) -> list[list[str]]:
    """Words into lines of at most `width` characters, each line filled before the next starts."""
    lines: list[list[str]] = []
    length = 0
    for text in texts:
        if lines and length + 1 + len(text) <= width:
            lines[-1].append(text)
            length += 1 + len(text)
        else:
            lines.append([text])
            length = len(text)
    return lines


def _layout(texts: list[str], rules: CueRules) -> tuple[str, ...]:
    """A cue's lines: one if the words fit in one; two as even as they can be (a tie: the shorter on top)."""
    lines = _fill(texts, rules.max_line_width)
    if len(lines) == 2:
        splits = [(" ".join(texts[:k]), " ".join(texts[k:])) for k in range(1, len(texts))]
        fitting = [s for s in splits if max(map(len, s)) <= rules.max_line_width]
        if fitting:
            return min(fitting, key=lambda s: (max(map(len, s)), len(s[0]) > len(s[1])))
    return tuple(" ".join(line) for line in lines)


def _cues(groups: list[list[_Timed]], rules: CueRules) -> list[Cue]:
    starts = [g[0].start for g in groups]
    cues, previous_end = [], 0
    for k, group in enumerate(groups):
        start = max(starts[k], previous_end)  # words of overlapping segments: never two cues at once
        end = max(max(t.end for t in group), start + 1, start + _ms(rules.min_duration))
        if k + 1 < len(groups) and starts[k + 1] > start:
            end = min(end, starts[k + 1])
        cues.append(Cue(start, end, _layout([t.text for t in group], rules), tuple(t.word for t in group)))
        previous_end = end
    return cues
