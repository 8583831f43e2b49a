"""Word and character error rates (fractions, not percentages).

The edit distance is rapidfuzz's (C++, bit-parallel: a 3-hour recording's reference against
its transcript, ~160k characters, in about a second), the library jiwer builds on; the
pure-Python dynamic programme this replaced took ~100 s for one 16-minute recording.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1) between two strings
    (characters) or two sequences of words."""
    return Levenshtein.distance(ref, hyp)


def error_rate(refs: Sequence[str], hyps: Sequence[str], unit: str = "word") -> float:
    """Corpus-level WER (`unit="word"`) or CER (`unit="char"`): total edits / total reference units."""
    split = str.split if unit == "word" else (lambda s: " ".join(s.split()))
    edits = units = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = split(ref), split(hyp)
        edits += edit_distance(r, h)
        units += len(r)
    return edits / units if units else 0.0


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return error_rate(refs, hyps, "word")


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    return error_rate(refs, hyps, "char")


def normalize_text(text: str) -> str:
    """Lowercase, keep letters, digits and apostrophes, collapse spaces: how WER is scored here."""
    kept = "".join(c if (c.isalnum() or c == "'") else " " for c in text.lower())
    return " ".join(kept.split())


def matched_words(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j) with a[i] == b[j] on a minimal edit alignment of two word lists (the words
    the alignment keeps: neither substituted, inserted nor deleted)."""
    pairs = []
    for tag, a0, a1, b0, _b1 in Levenshtein.opcodes(a, b):
        if tag == "equal":
            pairs += [(a0 + k, b0 + k) for k in range(a1 - a0)]
    return pairs


def word_timing_figures(pairs: Sequence[tuple[list[dict], list[dict]]], frame_seconds: float) -> dict:
    """How two runs' words of the same utterances differ in time and confidence. `pairs`: per utterance,
    (words of run A, words of run B) as {word, start, end, confidence}. Over the words both runs
    recognized alike: mean |start difference| and |end difference| (seconds), the share within one
    output frame (`frame_seconds`), and the mean |confidence difference|."""
    starts, ends, within, conf = [], [], 0, []
    for a, b in pairs:
        for i, j in matched_words([w["word"] for w in a], [w["word"] for w in b]):
            ds, de = abs(a[i]["start"] - b[j]["start"]), abs(a[i]["end"] - b[j]["end"])
            starts.append(ds)
            ends.append(de)
            within += ds <= frame_seconds * 1.001 and de <= frame_seconds * 1.001
            if a[i]["confidence"] is not None and b[j]["confidence"] is not None:
                conf.append(abs(a[i]["confidence"] - b[j]["confidence"]))
    n = len(starts)
    return {
        "matched_words": n,
        "mean_abs_start_diff": sum(starts) / n if n else None,
        "mean_abs_end_diff": sum(ends) / n if n else None,
        "within_one_frame": within / n if n else None,
        "mean_abs_confidence_diff": sum(conf) / len(conf) if conf else None,
    }


def confidence_usefulness(rows: Sequence[tuple[str, list[dict]]], threshold: float = 0.5) -> dict:
    """Is confidence useful? `rows`: (reference text, hypothesis words). A hypothesis word is right when a
    minimal edit alignment with the normalized reference keeps it; returns how often words below and
    at-or-above `threshold` are wrong, and their ratio (the field's first check of word confidence)."""
    low = [0, 0]  # wrong, total
    high = [0, 0]
    for reference, words in rows:
        hyp = [normalize_text(w["word"]) for w in words]
        right = {j for _, j in matched_words(normalize_text(reference).split(), hyp)}
        for j, w in enumerate(words):
            bucket = low if w["confidence"] < threshold else high
            bucket[0] += j not in right
            bucket[1] += 1
    low_rate = low[0] / low[1] if low[1] else None
    high_rate = high[0] / high[1] if high[1] else None
    return {
        "threshold": threshold,
        "low_words": low[1],
        "high_words": high[1],
        "wrong_below": low_rate,
        "wrong_at_or_above": high_rate,
        "ratio": (low_rate / high_rate) if low_rate is not None and high_rate else None,
    }
