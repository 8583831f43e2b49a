"""Word and character error rates (fractions, not percentages)."""

from __future__ import annotations

from typing import Sequence


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rate(refs: Sequence[str], hyps: Sequence[str], unit: str = "word") -> float:
    """Corpus-level WER (`unit="word"`) or CER (`unit="char"`): total edits / total reference units."""
    split = str.split if unit == "word" else (lambda s: list(" ".join(s.split())))
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
