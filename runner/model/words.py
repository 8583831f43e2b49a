"""Words with times and confidence from the greedy CTC pass, as NeMo computes them.

Times follow NeMo's CTC word timestamps (`transcribe(timestamps=True)`,
`AbstractCTCDecoding.compute_ctc_timestamps` and `timestamp_utils.get_words_offsets`): a token's
`end` is the output frame where it is first emitted; its `start` is the previous token's `end` (the
first token's: one frame before it is emitted); a word spans its tokens; frames become seconds as
frame x window stride x subsampling, plus the item's `offset`. A word starts at the space token
(character models) or at a SentencePiece piece that starts with `▁`; punctuation from the
vocabulary (Unicode category P) joins the word before it and takes no time.

Confidence follows NeMo's `ConfidenceConfig` (defaults: Tsallis entropy, alpha 0.33, exponential
normalization; blank frames excluded; `min` aggregation): a frame's confidence from its
log-probabilities; a token's from the frames where it was emitted; a word's from its tokens. The
utterance's `confidence` is the mean of its words' (NeMo has no utterance figure; the mean does not
sink with the length of the utterance as `min` would).

Long files: the windows' output frames are concatenated before this runs (`transcribe`), so word
times are continuous through the file and no word is cut or repeated at a window border.
"""

from __future__ import annotations

import bisect
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from runner.model.decoding import TextDecoder

METHODS = ("max_prob", "entropy")
ENTROPY_TYPES = ("gibbs", "tsallis", "renyi")
ENTROPY_NORMS = ("lin", "exp")
AGGREGATIONS = ("mean", "min", "max", "prod")


@dataclass(frozen=True)
class ConfidenceMethod:
    """NeMo's `ConfidenceMethodConfig` + `ConfidenceConfig.aggregation/exclude_blank`, NeMo's defaults."""

    method: str = "entropy"  # max_prob | entropy
    entropy_type: str = "tsallis"  # gibbs | tsallis | renyi
    alpha: float = 0.33  # > 0
    entropy_norm: str = "exp"  # lin | exp
    aggregation: str = "min"  # frames -> token -> word: mean | min | max | prod
    exclude_blank: bool = True  # a token's frames: where it was emitted (else: up to the next token)

    def problems(self, prefix: str = "confidence.") -> list[str]:
        """One line per bad value, naming the key as the user wrote it."""
        out = []
        for key, allowed in (
            ("method", METHODS),
            ("entropy_type", ENTROPY_TYPES),
            ("entropy_norm", ENTROPY_NORMS),
            ("aggregation", AGGREGATIONS),
        ):
            if getattr(self, key) not in allowed:
                out.append(f"{prefix}{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or math.isinf(alpha):
            out.append(f"{prefix}alpha must be a number > 0, got {alpha!r}")
        if not isinstance(self.exclude_blank, bool):
            out.append(f"{prefix}exclude_blank must be true or false, got {self.exclude_blank!r}")
        return out


def frame_confidence(log_probs: torch.Tensor, method: ConfidenceMethod) -> torch.Tensor:
    """[..., C] log-probabilities (C classes, blank included) -> [...] confidence in [0, 1]
    (NeMo's `get_confidence_measure_bank`, the same formulas)."""
    x = torch.nan_to_num(log_probs.float())
    v, t = x.shape[-1], float(method.alpha)
    if method.method == "max_prob":
        best = x.max(dim=-1).values
        if t == 1.0:
            return (best.exp() * v - 1) / (v - 1)
        return ((best * t).exp() * math.pow(v, t) - 1) / (math.pow(v, t) - 1)
    kind, norm = method.entropy_type, method.entropy_norm
    if t == 1.0:  # every entropy is Gibbs' at alpha 1
        neg_entropy = (x.exp() * x).sum(-1)
        return 1 + neg_entropy / math.log(v) if norm == "lin" else (neg_entropy.exp() * v - 1) / (v - 1)
    if kind == "gibbs":
        neg_entropy = ((x * t).exp() * x).sum(-1)
        if norm == "lin":
            return 1 + neg_entropy / math.log(v) / math.pow(v, 1 - t)
        floor = math.pow(v, -t * math.pow(v, 1 - t))
        return ((neg_entropy * t).exp() - floor) / (1 - floor)
    power_sum = (x * t).exp().sum(-1)
    if kind == "tsallis":
        if norm == "lin":
            return 1 + (1 - power_sum) / (math.pow(v, 1 - t) - 1)
        floor = math.exp((1 - math.pow(v, 1 - t)) / (1 - t))
        return (((1 - power_sum) / (1 - t)).exp() - floor) / (1 - floor)
    if norm == "lin":  # renyi
        return 1 + power_sum.log2() / (t - 1) / math.log(v, 2)
    return (power_sum.pow(1 / (t - 1)) * v - 1) / (v - 1)


def aggregate(values: Sequence[float], how: str) -> float:
    if how == "mean":
        return sum(values) / len(values)
    if how == "min":
        return min(values)
    if how == "max":
        return max(values)
    return math.prod(values)


def vocabulary_punctuation(vocabulary: Sequence[str]) -> frozenset[str]:
    """Punctuation marks in the vocabulary (NeMo's `extract_punctuation_from_vocab`)."""
    special = ("[", "<", "##", "▁")

    def is_special(token: str) -> bool:
        return (
            (token.startswith("[") and token.endswith("]"))
            or (token.startswith("<") and token.endswith(">"))
            or token.startswith(special[2:])
            or not token.strip()
        )

    return frozenset(
        c for token in vocabulary for c in token if unicodedata.category(c).startswith("P") and not is_special(token)
    )


@dataclass
class _Token:
    id: int
    piece: str  # as the vocabulary has it (`▁the`)
    text: str  # decoded alone (`the`)
    start: int  # output frames, NeMo's offsets
    end: int
    confidence: float | None


class WordAligner:
    """Greedy CTC frames of one utterance -> words with times and confidence, for one model's vocabulary."""

    def __init__(self, text: TextDecoder, frame_seconds: float, method: ConfidenceMethod | None = ConfidenceMethod()):
        self.text = text
        self.frame_seconds = frame_seconds  # window stride x subsampling
        self.method = method
        self.punctuation = vocabulary_punctuation(text.vocabulary)
        self.subword = text.is_subword
        self._pieces: dict[int, tuple[str, str]] = {}

    def confidences(self, log_probs: torch.Tensor) -> torch.Tensor | None:
        """Per-frame confidence of a batch [B, T, C] -> [B, T] (None without a method)."""
        return None if self.method is None else frame_confidence(log_probs, self.method)

    def words(
        self, best: torch.Tensor, frame_conf: torch.Tensor | None, offset: float = 0.0
    ) -> tuple[list[dict], float | None]:
        """`best`: the argmax class of each valid frame [T]; `frame_conf`: their confidence [T] or None.
        -> words [{word, start, end, confidence}] (seconds in the file) and the utterance's confidence."""
        return self._words(self._tokens(best, frame_conf), offset)

    def transducer_words(
        self,
        ids: Sequence[int],
        frames: Sequence[int],
        durations: Sequence[int] | None,
        log_probs: torch.Tensor | None,
        offset: float = 0.0,
        blank_confidence: torch.Tensor | None = None,
    ) -> tuple[list[dict], float | None]:
        """Words of one transducer hypothesis: its tokens, the frame each was emitted at and (TDT) its
        duration, and the joint's log-probabilities at each emission [N, C] (for confidence; None: none).

        Times are NeMo's transducer offsets (`compute_rnnt_timestamps`): a token spans its frame and the
        next (RNN-T) or its frame and its duration (TDT; punctuation takes the previous token's end and
        no time). A token's confidence: `transducer_token_confidence`."""
        conf = self.transducer_token_confidence(frames, log_probs, blank_confidence, durations is not None)
        tokens: list[_Token] = []
        for k, (i, frame) in enumerate(zip(ids, frames)):
            piece, text = self._piece(i)
            start, end = frame, frame + (durations[k] if durations is not None else 1)
            if durations is not None and text and text[0] in self.punctuation and k > 0:
                start = end = tokens[-1].end
            tokens.append(_Token(i, piece, text, start, end, None if conf is None else conf[k]))
        return self._words(tokens, offset)

    def step_confidence(self, log_probs: torch.Tensor) -> torch.Tensor:
        """The confidence of transducer steps from their joint's log-probabilities [N, classes] (NeMo's
        `_get_step_confidence`: renormalized over the classes, TDT's durations left out)."""
        return frame_confidence(torch.log_softmax(log_probs.float(), dim=-1), self.method)

    def transducer_token_confidence(
        self,
        frames: Sequence[int],
        log_probs: torch.Tensor | None,
        blank_confidence: torch.Tensor | None = None,
        tdt: bool = False,
    ) -> list[float] | None:
        """Each emitted token's confidence as NeMo's `RNNTDecoding.compute_confidence` gives it: that of the
        step that emitted it (`log_probs` [N, classes]); with `exclude_blank: false`, aggregated with the blank
        steps credited to it (`blank_confidence`: each frame's blank step, nan where none). RNN-T credits a
        token with the blanks of the frames after its own up to the next token's frame; the blank that ends a
        frame with tokens counts for none. TDT credits it with every blank step after it up to the next
        label. Blanks before the first token count for none."""
        if log_probs is None or self.method is None or not len(frames):
            return None
        conf = self.step_confidence(log_probs).tolist()
        if self.method.exclude_blank or blank_confidence is None:
            return conf
        credited: list[list[float]] = [[] for _ in conf]
        emitting = set() if tdt else set(frames)  # RNN-T: a frame's blank after its own tokens counts for none
        for t, c in enumerate(blank_confidence.tolist()):
            k = (bisect.bisect_right if tdt else bisect.bisect_left)(frames, t) - 1  # the last token at / before t
            if c == c and k >= 0 and t not in emitting:  # c != c: nan, no blank step on this frame
                credited[k].append(c)
        return [aggregate([c, *more], self.method.aggregation) if more else c for c, more in zip(conf, credited)]

    def _words(self, tokens: list[_Token], offset: float) -> tuple[list[dict], float | None]:
        groups = self._word_groups(tokens)
        words = []
        for n, group in enumerate(groups):
            first, last = tokens[0 if n == 0 else group[0]], tokens[group[-1]]  # NeMo: word 1 from token 1
            conf = [tokens[i].confidence for i in group]
            words.append(
                {
                    "word": self._join([tokens[i] for i in group]),
                    "start": offset + first.start * self.frame_seconds,
                    "end": offset + last.end * self.frame_seconds,
                    "confidence": None if conf[0] is None else aggregate(conf, self.method.aggregation),
                }
            )
        scores = [w["confidence"] for w in words if w["confidence"] is not None]
        return words, (sum(scores) / len(scores) if scores else None)

    def _tokens(self, best: torch.Tensor, frame_conf: torch.Tensor | None) -> list[_Token]:
        """The collapsed tokens with NeMo's frame offsets and each token's confidence (numpy: a long
        file has tens of thousands of tokens)."""
        row = best.numpy()
        frames = row.size
        if frames == 0:
            return []
        run_starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        keep = row[run_starts] != self.text.blank_id
        starts = run_starts[keep]  # each emitted token's first frame
        if starts.size == 0:
            return []
        ends = np.r_[run_starts[1:], frames][keep]  # ... and the frame after its run
        conf = self._token_confidence(frame_conf, starts, ends, frames) if frame_conf is not None else None
        begin = np.r_[max(0, int(starts[0]) - 1), starts[:-1]]  # NeMo: the previous token's frame
        tokens = []
        for k, (i, s, b) in enumerate(zip(row[starts].tolist(), starts.tolist(), begin.tolist())):
            piece, text = self._piece(i)
            end = b if text and text[0] in self.punctuation and k > 0 else s  # NeMo's _refine_timestamps
            tokens.append(_Token(i, piece, text, b, end, None if conf is None else conf[k]))
        return tokens

    def _token_confidence(self, frame_conf: torch.Tensor, starts, ends, frames: int) -> list[float]:
        """Each token's frames aggregated: the frames of its run (blanks excluded, NeMo's default) or from
        its first frame up to the next token's."""
        conf = np.r_[frame_conf.numpy().astype(np.float64), 0.0]  # a spare frame: no bound equals len
        if self.method.exclude_blank:
            bounds = np.stack([starts, ends], axis=1).ravel()  # [s0, e0, s1, e1, ...]: keep the even spans
            lengths = ends - starts
        else:
            bounds = np.r_[starts, frames]
            lengths = np.diff(bounds)
        how = self.method.aggregation
        ufunc = {"min": np.minimum, "max": np.maximum, "prod": np.multiply, "mean": np.add}[how]
        out = ufunc.reduceat(conf, bounds)
        out = out[0::2] if self.method.exclude_blank else out[: len(starts)]
        if how == "mean":
            out = out / lengths
        return out.tolist()

    def _piece(self, i: int) -> tuple[str, str]:
        if i not in self._pieces:
            piece = self.text.piece(i)
            self._pieces[i] = (piece, self.text.pieces_text([piece]))
        return self._pieces[i]

    def _word_groups(self, tokens: list[_Token]) -> list[list[int]]:
        """Token indices of each word (NeMo's `get_words_offsets`, word delimiter " ")."""
        groups: list[list[int]] = []
        built: list[int] = []
        following_texts: list[str | None] = [None] * len(tokens)  # the next token's text that is not " " or ""
        for i in range(len(tokens) - 2, -1, -1):
            t = tokens[i + 1].text
            following_texts[i] = t if t and t != " " else following_texts[i + 1]
        for i, tok in enumerate(tokens):
            punct = tok.text in self.punctuation and tok.text != " "
            following = following_texts[i]
            if self.subword:
                starts = tok.piece != tok.text or (tok.text == " " and following not in self.punctuation)
            else:
                starts = tok.text == " " and following not in self.punctuation
            if starts and not punct:
                if built:
                    groups.append(built)
                built = [] if tok.text == " " else [i]
            elif punct and not built and groups:
                groups[-1].append(i)
            elif punct and built:
                if tokens[built[-1]].piece in (" ", "_", "▁"):
                    built = built[:-1]
                built.append(i)
            else:
                built.append(i)
        if built:
            groups.append(built)
        return [g for g in groups if self._join([tokens[i] for i in g])]

    def _join(self, tokens: list[_Token]) -> str:
        return self.text.pieces_text([t.piece for t in tokens])
