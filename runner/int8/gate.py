"""The accuracy gate's held-out audio, scored in chunks: fp32 once, every int8 candidate against it.

    gate audio (sampled order) -> `CHUNKS` chunks of consecutive items, each batched by length
    -> per chunk, on demand: the fp32 model's logits and transcripts (computed once, reused by
       every candidate, by the sensitivity ranking and by the workers' self-check reference)
    -> per candidate and batch, cached: logit sums, word edits against fp32's transcripts and,
       with references, against them

A gate may stop after a chunk when its decision is clear (`GateSet.clear_pass`): the same
candidate has led after every chunk so far, and even the upper confidence bound of its
disagreement with fp32 stays under the limit. Otherwise it reads every chunk, as a gate without
early stopping does. No Ray, no NeMo: torch and the lean model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from runner.int8.self_check import compared, summarize, texts
from runner.metrics import cer, edit_distance, normalize_text, wer
from runner.model.ctc import LeanModel
from runner.model.transcribe import pad_batch

Run = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

CHUNKS = 4  # the gate's audio is read in this many chunks; it may stop after the second
CONFIDENCE_Z = 1.645  # one-sided 95%: the bound `clear_pass` compares with the limit
MIN_CHUNKS = 2  # chunks a decision must hold over before the gate may stop


def feature_batches(
    model: LeanModel, audios: Sequence[np.ndarray], batch_size: int = 8, ids: Sequence[int] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(features, frames, indices) batches of `audios[ids]` (default: all), sorted by length: the workers' batching."""
    order = sorted(range(len(audios)) if ids is None else ids, key=lambda i: len(audios[i]))
    out = []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            feats, frames = model.features(*pad_batch([audios[i] for i in picked]))
            out.append((feats, frames, picked))
    return out


def wilson_upper(errors: int, trials: int, z: float = CONFIDENCE_Z) -> float:
    """One-sided upper confidence bound (Wilson score) of a rate seen as `errors` in `trials`."""
    if trials <= 0:
        return 1.0
    p = errors / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + spread) / (1 + z * z / trials))


class GateSet:
    """Held-out utterances with the fp32 model's logits and transcripts, to score int8 variants against."""

    def __init__(
        self, model: LeanModel, audios: Sequence[np.ndarray], references: list[str] | None, chunks: int = CHUNKS
    ):
        self.model = model
        self.reader = model.reader
        self.rate = model.spec.features.sample_rate
        self.references = [normalize_text(r) for r in references] if references else None
        self.audios = audios
        n = len(audios)
        chunks = max(1, min(chunks, n // 8))  # at least a batch per chunk
        bounds = [round(k * n / chunks) for k in range(chunks + 1)]
        self.chunks = [feature_batches(model, audios, ids=range(a, b)) for a, b in zip(bounds, bounds[1:])]
        self.read = 0  # chunks whose fp32 outputs are known
        self.batches: list = []  # (feats, frames, ids) of the chunks read
        self.fp32: list = []  # (logits, lens) per batch read
        self.fp32_texts: dict[int, str] = {}
        self._cache: dict[str, list] = {}
        self.read_more()

    # ------------------------------------------------------------------ the audio read so far
    @property
    def complete(self) -> bool:
        return self.read == len(self.chunks)

    @torch.inference_mode()
    def read_more(self) -> None:
        """fp32 logits and transcripts of the next chunk."""
        for feats, frames, ids in self.chunks[self.read]:
            logits, lens = self.model.logits(feats, frames)
            self.batches.append((feats, frames, ids))
            self.fp32.append((logits, lens))
            self.fp32_texts.update(zip(ids, texts(logits, lens, self.reader)))
        self.read += 1

    def read_all(self) -> None:
        while not self.complete:
            self.read_more()

    @property
    def ids(self) -> list[int]:
        return [i for *_, ids in self.batches for i in ids]

    @property
    def seconds(self) -> float:
        return sum(len(self.audios[i]) for i in self.ids) / self.rate

    @property
    def planned_seconds(self) -> float:
        return sum(len(a) for a in self.audios) / self.rate

    @property
    def fp32_figures(self) -> dict:
        if self.references is None:
            return {}
        ids = self.ids
        return _rates([self.references[i] for i in ids], [self.fp32_texts[i] for i in ids])

    def reference(self, items: int, seconds: float) -> dict:
        """The workers' self-check reference (`runner.int8.self_check`) from audio the gate read: the longest
        utterances of the first chunk (up to `items`, `seconds` in all; at least one), their features and
        fp32 logits as the gate computed them, trimmed to the longest one kept."""
        last = len(self.chunks[0]) - 1  # batches are sorted by length: the first chunk's last batch
        feats, frames, ids = self.batches[last]
        logits, lens = self.fp32[last]
        rows, total = [], 0.0
        for r in reversed(range(len(ids))):
            length = len(self.audios[ids[r]]) / self.rate
            if len(rows) >= items or (rows and total + length > seconds):
                continue
            rows.append(r)
            total += length
        rows = torch.tensor(sorted(rows))
        frames, lens = frames[rows], lens[rows]
        return {
            "features": feats[rows][:, :, : int(frames.max())].contiguous(),
            "frames": frames,
            "logits": logits[rows][:, :, : int(lens.max())].contiguous(),
            "lengths": lens,
            "texts": [self.fp32_texts[ids[r]] for r in rows.tolist()],  # fp32's transcripts (normalized)
            "seconds": round(total, 2),
            "expected": {},
        }

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, run: Run, key: str | None = None) -> dict:
        """Figures of a model variant over the chunks read: agreement with fp32 transcripts (`wer_vs_fp32`),
        logit similarity, WER/CER with references. `key` names a variant whose per-batch results are kept,
        so scoring it again after `read_more` runs only the new batches."""
        done = self._cache.setdefault(key, []) if key is not None else []
        reader = getattr(run, "reader", self.reader)  # the variant's own (a transducer's int8 prediction network)
        for (feats, frames, ids), (ref_logits, _) in zip(self.batches[len(done) :], self.fp32[len(done) :]):
            logits, lens = run(feats, frames)
            found = dict(zip(ids, texts(logits, lens, reader)))
            done.append((compared(logits, ref_logits, lens, reader), found))
        found = {i: t for _, batch in done for i, t in batch.items()}
        ids = self.ids
        figures = summarize([sums for sums, _ in done])
        # word edits against fp32's transcripts, counted once: `wer_vs_fp32` and `clear_pass` both use them
        edits = sum(edit_distance(self.fp32_texts[i].split(), found[i].split()) for i in ids)
        words = sum(len(self.fp32_texts[i].split()) for i in ids)
        figures["wer_vs_fp32"] = edits / words if words else 0.0
        if self.references is not None:
            figures.update(_rates([self.references[i] for i in ids], [found[i] for i in ids]))
        figures = {k: round(v, 6) for k, v in figures.items()}
        figures["_edits_vs_fp32"] = edits
        return figures

    def increase(self, figures: dict) -> float:
        """What the gate compares with `max_wer_increase`: WER increase over fp32 with references,
        else the WER of int8 against the fp32 transcripts (an upper bound on the increase)."""
        if self.references is not None:
            return figures["wer"] - self.fp32_figures["wer"]
        return figures["wer_vs_fp32"]

    def clear_pass(self, figures: dict, limit: float) -> bool:
        """Whether the increase is under `limit` with 95% confidence from the items read so far.

        Per utterance, the int8 transcript's edits to the reference are at most fp32's plus its edits to
        fp32's transcript (edit distance is a metric), so the increase is at most (edits to fp32) / (words),
        words being the references' (or, without references, fp32's); the Wilson upper bound of that rate
        must stay within the limit."""
        ids = self.ids
        words = sum(len((self.references or self.fp32_texts)[i].split()) for i in ids)
        return wilson_upper(figures["_edits_vs_fp32"], words) <= limit


def public(figures: dict) -> dict:
    """`figures` without the counts kept for `GateSet.clear_pass`."""
    return {k: v for k, v in figures.items() if not k.startswith("_")}


def _rates(refs: list[str], hyps: list[str]) -> dict:
    return {"wer": wer(refs, hyps), "cer": cer(refs, hyps)}
