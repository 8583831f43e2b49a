"""A NeMo JSONL manifest of the run: one line per ok row, in run order, with the keys NeMo's own
`transcribe_speech.py` writes (`write_transcription` in `nemo/collections/asr/parts/utils/transcribe_utils.py`),
so NeMo's tools read it (`read_manifest`; `pred_text` and `text` for its WER scripts):

- `audio_filepath`, `offset`, `duration` as the job read them, `id`; `text` (the reference) only when
  the manifest gave one; `pred_text` (the hypothesis);
- with word timestamps: `word`, NeMo's word timestamps (`{"word", "start", "end"}`, seconds from the
  segment's start as NeMo gives them for audio read at an `offset`: add `offset` for the time in the
  file); `words` and `word_confidence`, NeMo's per-word confidence lists; `confidence`, the utterance's.
  Without them (`timestamps: false`), only `pred_text`.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.export.output import write_lines
from runner.export.rows import RunRows, Utterance, Written


def manifest_item(u: Utterance) -> dict:
    item = {"audio_filepath": u.audio_filepath, "offset": u.offset, "duration": u.duration, "id": u.id}
    if u.reference is not None:
        item["text"] = u.reference
    item["pred_text"] = u.text
    if u.words is not None:
        item["word"] = [
            {"word": w.word, "start": _seconds(w.start - u.offset), "end": _seconds(w.end - u.offset)} for w in u.words
        ]
        item["words"] = [w.word for w in u.words]
        item["word_confidence"] = [w.confidence for w in u.words]
    if u.confidence is not None:
        item["confidence"] = u.confidence
    return item


def _seconds(x: float) -> float:
    return round(max(0.0, x), 6)  # no float noise from the subtraction (CTC frames are whole milliseconds)


def write_manifest(run: RunRows, target: Path) -> Written:
    """The run's ok rows as a NeMo manifest at `target` (UTF-8 JSON lines)."""
    words = [0]

    def lines():
        for u in run.utterances():
            words[0] += len(u.words or ())
            yield json.dumps(manifest_item(u), ensure_ascii=False)

    count = write_lines(target, lines())
    return Written((target,), count, words[0])
