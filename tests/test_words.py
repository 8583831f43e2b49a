"""Word times and confidence without a model: NeMo's confidence formulas, token aggregation, word grouping.

The comparisons with NeMo's whole `transcribe(timestamps=True)` are in test_model.py (characters) and
test_citrinet.py (SentencePiece)."""

import itertools
import random

import numpy as np
import pytest
import torch

from runner.model.decoding import TextDecoder
from runner.model.words import ConfidenceMethod, WordAligner, aggregate, frame_confidence, vocabulary_punctuation

VOCAB = list("abc '")  # blank = 5


def test_frame_confidence_is_nemos_for_every_measure():
    """Every method x entropy type x norm x alpha (1.0 takes NeMo's Gibbs shortcut) against NeMo's own bank."""
    from nemo.collections.asr.parts.utils.asr_confidence_utils import get_confidence_measure_bank

    bank = get_confidence_measure_bank()
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 50, 29) * 4, dim=-1)
    log_probs[0, 0] = torch.log_softmax(torch.tensor([30.0] + [0.0] * 28), dim=-1)  # a near-certain frame
    for alpha in (0.33, 1.0, 0.5):
        for name in ("max_prob", *(f"entropy_{t}_{n}" for t in ("gibbs", "tsallis", "renyi") for n in ("lin", "exp"))):
            if name == "max_prob":
                method = ConfidenceMethod(method="max_prob", alpha=alpha)
            else:
                _, kind, norm = name.split("_")
                method = ConfidenceMethod(entropy_type=kind, entropy_norm=norm, alpha=alpha)
            theirs = bank[name](log_probs, v=29, t=alpha)
            ours = frame_confidence(log_probs, method)
            assert torch.allclose(ours, theirs, atol=1e-6), (name, alpha)
            assert ours.min() >= -1e-6 and ours.max() <= 1 + 1e-6, (name, alpha)


def brute_force_token_confidence(row, conf, blank, method):
    """NeMo's loop: runs of one class; a token's frames are its run, or up to the next token (blanks kept)."""
    runs = [(k, len(list(g))) for k, g in itertools.groupby(row)]
    spans, t = [], 0
    for cls, n in runs:
        if cls != blank:
            spans.append([t, t + n])
        t += n
    if not method.exclude_blank:
        for k in range(len(spans)):
            spans[k][1] = spans[k + 1][0] if k + 1 < len(spans) else len(row)
    return [aggregate(conf[s:e], method.aggregation) for s, e in spans]


@pytest.mark.parametrize("aggregation", ["min", "max", "mean", "prod"])
@pytest.mark.parametrize("exclude_blank", [True, False])
def test_token_confidence_aggregates_the_frames_nemo_does(aggregation, exclude_blank):
    rng = random.Random(0)
    method = ConfidenceMethod(aggregation=aggregation, exclude_blank=exclude_blank)
    aligner = WordAligner(TextDecoder(VOCAB), 0.02, method)
    for _ in range(200):
        row = [rng.choice([0, 1, 2, 3, 4, 5, 5, 5]) for _ in range(rng.randint(1, 40))]
        conf = np.array([rng.random() for _ in row], dtype=np.float32)
        got = [t.confidence for t in aligner._tokens(torch.tensor(row), torch.from_numpy(conf))]
        expected = brute_force_token_confidence(row, conf.astype(np.float64).tolist(), 5, method)
        assert np.allclose(got, expected, rtol=0, atol=1e-12), (row, got, expected)


def frames(text: str, repeat: int = 2, gap: int = 1) -> list[int]:
    """Greedy frames spelling `text`: each character `repeat` frames, then `gap` blanks."""
    out = []
    for c in text:
        out += [VOCAB.index(c)] * repeat + [5] * gap
    return out


def test_words_follow_nemos_offsets_spaces_and_punctuation():
    aligner = WordAligner(TextDecoder(VOCAB), 0.02, ConfidenceMethod())
    assert vocabulary_punctuation(VOCAB) == {"'"}
    row = [5, 5] + frames("ab  c ' a")  # two spaces, a space before the apostrophe
    words, confidence = aligner.words(torch.tensor(row), torch.full((len(row),), 0.5), offset=10.0)
    assert [w["word"] for w in words] == ["ab", "c'", "a"]
    # token k is emitted at frame 2 + 3k; a word runs from its first token's start (the previous token's
    # frame; the first token's: one frame before it) to its last token's frame; the apostrophe takes no time.
    assert words[0]["start"] == pytest.approx(10.0 + 0.02 * 1) and words[0]["end"] == pytest.approx(10.0 + 0.02 * 5)
    assert words[1]["start"] == pytest.approx(10.0 + 0.02 * 11) and words[1]["end"] == pytest.approx(10.0 + 0.02 * 17)
    assert words[2]["start"] == pytest.approx(10.0 + 0.02 * 23) and words[2]["end"] == pytest.approx(10.0 + 0.02 * 26)
    assert confidence == pytest.approx(0.5) and all(w["confidence"] == pytest.approx(0.5) for w in words)


def test_silence_and_blank_only_frames_have_no_words():
    aligner = WordAligner(TextDecoder(VOCAB), 0.02, ConfidenceMethod())
    assert aligner.words(torch.tensor([5] * 30), torch.ones(30)) == ([], None)
    assert aligner.words(torch.tensor([], dtype=torch.long), torch.ones(0)) == ([], None)
    assert aligner.words(torch.tensor(frames("  ")), torch.ones(6)) == ([], None)


def test_a_long_utterance_is_linear():
    """Tens of thousands of tokens (an hour of speech in one file): every word, in order."""
    aligner = WordAligner(TextDecoder(VOCAB), 0.02, ConfidenceMethod())
    text = " ".join(["abc", "ba", "c'a"] * 4000)
    row = torch.tensor(frames(text))
    words, _ = aligner.words(row, torch.rand(row.numel()))
    assert [w["word"] for w in words] == text.split()
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(words))


def test_bad_confidence_settings_name_the_key():
    assert ConfidenceMethod().problems() == []
    problems = ConfidenceMethod(method="entropie", alpha=-1, aggregation="median", exclude_blank="yes").problems()
    assert [p.split(" ")[0] for p in problems] == [
        "confidence.method",
        "confidence.aggregation",
        "confidence.alpha",
        "confidence.exclude_blank",
    ]
