"""WER/CER scoring: rapidfuzz's edit distance gives the figures of the textbook dynamic programme."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from runner.metrics import cer, edit_distance, normalize_text, wer

ROOT = Path(__file__).resolve().parents[1]


def textbook_distance(ref, hyp) -> int:
    """The O(n*m) Levenshtein programme the runner used before: the reference for these tests."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def textbook_rate(refs, hyps, unit):
    split = str.split if unit == "word" else (lambda s: list(" ".join(s.split())))
    edits = sum(textbook_distance(split(r), split(h)) for r, h in zip(refs, hyps))
    units = sum(len(split(r)) for r in refs)
    return edits / units if units else 0.0


def test_edit_distance_matches_the_textbook_programme_on_words_and_characters():
    rng = random.Random(0)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "don't", "it's", "red", "x"]
    for _ in range(300):
        ref = [rng.choice(vocab) for _ in range(rng.randrange(0, 25))]
        hyp = [rng.choice(vocab) for _ in range(rng.randrange(0, 25))]
        assert edit_distance(ref, hyp) == textbook_distance(ref, hyp), (ref, hyp)
        r, h = " ".join(ref), " ".join(hyp)
        assert edit_distance(r, h) == textbook_distance(r, h), (r, h)
    # Words are compared whole (not by their characters) and unicode characters one each.
    assert edit_distance(["cat"], ["cut"]) == 1 and edit_distance("naïve café", "naive cafe") == 2


def test_error_rates_on_the_demo_set_are_those_of_the_textbook_programme():
    rows = [json.loads(line) for line in (ROOT / "manifests/demo/test.jsonl").read_text().splitlines()]
    refs = [normalize_text(r["text"]) for r in rows]
    rng = random.Random(1)
    hyps = []
    for ref in refs:  # hypotheses with word and letter errors, as a small model makes them
        words = ref.split()
        for _ in range(rng.randrange(0, 3)):
            if words:
                k = rng.randrange(len(words))
                words[k] = rng.choice([words[k][:-1], words[k] + "s", "uh", ""])
        hyps.append(" ".join(w for w in words if w))
    assert wer(refs, hyps) == pytest.approx(textbook_rate(refs, hyps, "word"), abs=1e-12)
    assert cer(refs, hyps) == pytest.approx(textbook_rate(refs, hyps, "char"), abs=1e-12)
    assert 0 < wer(refs, hyps) < 0.5 and 0 < cer(refs, hyps) < wer(refs, hyps)
    assert wer(refs, refs) == 0 and cer(["a b"], [""]) == 1.0 and wer([""], ["x"]) == 0.0
