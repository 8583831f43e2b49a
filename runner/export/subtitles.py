"""SRT and WebVTT: one subtitle file per audio file, its rows' words merged in time order into cues.

SRT: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each. WebVTT: a `WEBVTT` header,
`HH:MM:SS.mmm` times, and `&`, `<`, `>` escaped in the text as the format requires. Both UTF-8, `\\n`
line ends. Files are named by `runner.export.names.file_ids`.
"""

from __future__ import annotations

from pathlib import Path

from runner.export.cues import Cue, CueRules, build_cues
from runner.export.names import file_ids
from runner.export.rows import NO_WORDS, RunRows, Skipped, Written
from runner.job.run_folder import write_atomic

SUBTITLE_FORMATS = ("srt", "vtt")


def timestamp(ms: int, decimal_marker: str) -> str:
    """`HH:MM:SS<marker>mmm` (hours grow past two digits rather than wrap)."""
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal_marker}{millis:03d}"


def srt(cues: list[Cue]) -> str:
    return "".join(
        f"{i}\n{timestamp(c.start_ms, ',')} --> {timestamp(c.end_ms, ',')}\n" + "\n".join(c.lines) + "\n\n"
        for i, c in enumerate(cues, 1)
    )


def vtt(cues: list[Cue]) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(c.start_ms, '.')} --> {timestamp(c.end_ms, '.')}\n" + "\n".join(map(_vtt_escape, c.lines)) + "\n\n"
        for c in cues
    )


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_subtitles(run: RunRows, out: Path, fmt: str, rules: CueRules = CueRules()) -> Written:
    """`out/NAME.srt` (or `.vtt`) for each audio file of the run's ok rows; rows without word timestamps
    are skipped (reported in `Written.skipped`). Every audio file gets a file, an empty one if no word
    was heard in it."""
    if fmt not in SUBTITLE_FORMATS:
        raise ValueError(f"subtitle format {fmt!r}: expected one of {', '.join(SUBTITLE_FORMATS)}")
    render = srt if fmt == "srt" else vtt
    names = file_ids(run.audio_files())
    files, skipped, rows, words = [], [], 0, 0
    for path, utterances in run.by_audio_file():
        timed = [u for u in utterances if u.words is not None]
        skipped += [Skipped(u.id, u.audio_filepath, NO_WORDS) for u in utterances if u.words is None]
        if not timed:
            continue
        cues = build_cues([w for u in timed for w in u.words], rules)
        target = out / f"{names[path]}.{fmt}"
        write_atomic(target, render(cues).encode())
        files.append(target)
        rows += len(timed)
        words += sum(len(c.words) for c in cues)
    return Written(tuple(files), rows, words, tuple(skipped))
